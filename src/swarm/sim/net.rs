//! The emulated network of the scale simulation: per-message latency, links with a bandwidth
//! each way, an origin with its own bandwidth, per-connection rate and latency. Transfers
//! queue on the sender's uplink and the receiver's downlink (store and forward, whole chunks).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// One direction of a link: transfers take turns at `bytes_per_s`.
pub struct Link {
    bytes_per_s: f64,
    free_at: Mutex<Instant>,
}

impl Link {
    pub fn new(bytes_per_s: f64) -> Self {
        Link { bytes_per_s, free_at: Mutex::new(Instant::now()) }
    }

    fn time_for(&self, bytes: u64) -> Duration {
        Duration::from_secs_f64(bytes as f64 / self.bytes_per_s)
    }

    /// Book the link for `bytes` from `from` or when it is free; returns when they are through.
    fn occupy(&self, from: Instant, bytes: u64) -> Instant {
        let mut f = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
        let start = (*f).max(from);
        *f = start + self.time_for(bytes);
        *f
    }
}

/// Move `bytes` from `up` to `down`, then `latency`. The sender sends in the order asked (its
/// uplink is booked ahead); the receiver's downlink is booked only once the sender starts, so
/// a busy sender never holds a receiver's link idle.
pub async fn transfer(up: &Link, down: &Link, bytes: u64, latency: Duration) {
    let up_end = up.occupy(Instant::now(), bytes);
    tokio::time::sleep_until(up_end - up.time_for(bytes)).await;
    let down_end = down.occupy(Instant::now(), bytes);
    tokio::time::sleep_until(up_end.max(down_end) + latency).await;
}

/// The object store every agent loads from.
pub struct Origin {
    pub link: Link,
    pub per_connection: f64,
    pub rtt: Duration,
    pub bytes: AtomicU64,
    pub requests: AtomicU64,
}

impl Origin {
    /// One ranged GET of `bytes` into `down`.
    pub async fn get(&self, down: &Link, bytes: u64) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        let asked = Instant::now();
        tokio::time::sleep(self.rtt).await;
        let up_end = self.link.occupy(Instant::now(), bytes);
        tokio::time::sleep_until(up_end - self.link.time_for(bytes)).await;
        let down_end = down.occupy(Instant::now(), bytes);
        let one_connection = asked + self.rtt + Duration::from_secs_f64(bytes as f64 / self.per_connection);
        tokio::time::sleep_until(up_end.max(down_end).max(one_connection)).await;
    }
}

/// Control messages an agent sent and answered, and where its chunks came from.
#[derive(Default)]
pub struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub from_holders: AtomicU64,
    pub from_owners: AtomicU64,
    pub from_origin: AtomicU64,
    pub refused: AtomicU64,
}

impl Counters {
    pub fn total(&self) -> u64 {
        self.sent.load(Ordering::Relaxed) + self.received.load(Ordering::Relaxed)
    }
}
