//! Drain: `serving → draining → drained`. Cloud preemption watchers (planned) start it on a
//! notice; today `cachefs drain` (admin `POST /drain`) does.
//!
//! # Contract
//! While draining: `/readyz` answers 503, `cachefs_drain_state` is 1, peers are told and stop
//! choosing this agent as owner or source for new chunks, streams already being served continue,
//! and the FUSE mount keeps serving local readers. `drained` (2) when no peer transfer is in
//! flight, or at the deadline, whichever comes first.

use std::sync::atomic::{AtomicBool, AtomicU8, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::info;

use crate::metrics::Metrics;
use crate::peer::Membership;

pub const SERVING: u8 = 0;
pub const DRAINING: u8 = 1;
pub const DRAINED: u8 = 2;

pub fn state_name(s: u8) -> &'static str {
    match s {
        SERVING => "serving",
        DRAINING => "draining",
        _ => "drained",
    }
}

pub struct Drain {
    pub state: AtomicU8,
    /// Shared with `/readyz`.
    pub ready: Arc<AtomicBool>,
    /// Shared with the peer tier and server (not an owner, says so in Hello).
    pub draining: Arc<AtomicBool>,
    /// Chunk streams this agent is serving to peers.
    pub peer_streams: Arc<AtomicUsize>,
    pub membership: Option<Arc<Membership>>,
    pub metrics: Arc<Metrics>,
}

impl Drain {
    pub fn state(&self) -> u8 {
        self.state.load(Ordering::SeqCst)
    }

    /// Drain (once): returns false if a drain had already started.
    pub async fn run(&self, reason: &str, deadline: Duration) -> bool {
        if self.state.compare_exchange(SERVING, DRAINING, Ordering::SeqCst, Ordering::SeqCst).is_err() {
            return false;
        }
        info!(reason, "draining: readiness off, peers told; local readers keep being served");
        self.ready.store(false, Ordering::SeqCst);
        self.draining.store(true, Ordering::SeqCst);
        self.metrics.drain_state.set(DRAINING as i64);
        crate::systemd::status(&format!("draining: {reason}"));
        if let Some(m) = &self.membership {
            m.announce_drain(true).await;
        }
        let end = tokio::time::Instant::now() + deadline;
        while self.peer_streams.load(Ordering::SeqCst) > 0 && tokio::time::Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.state.store(DRAINED, Ordering::SeqCst);
        self.metrics.drain_state.set(DRAINED as i64);
        crate::systemd::status("drained: ready to be stopped");
        info!(in_flight = self.peer_streams.load(Ordering::SeqCst), "drain_ready");
        true
    }
}
