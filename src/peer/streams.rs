//! Chunk streams served over gRPC.
//!
//! # Contract
//! A stream sends its chunk in `MESSAGE_BYTES` pieces (the first carries the chunk's length and
//! crc32c) straight from the chunk's bytes, and lets go of them (and of its place among the
//! transfers drain waits for) as soon as the last piece is taken, or [`STREAM_LIMIT`] after it
//! began, whatever the client does: one that stops reading (HTTP/2 flow control) then pins no
//! mapping and holds no drain, and its stream ends with `DEADLINE_EXCEEDED` if it reads again.

use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use super::proto::ChunkData;
use super::server::ActiveGuard;
use super::MESSAGE_BYTES;
use crate::metrics::Metrics;

/// Longest a chunk stream may take: well past the clients' own limits for one chunk.
pub const STREAM_LIMIT: Duration = Duration::from_secs(15);

/// How often streams past their limit are looked for.
const SWEEP: Duration = Duration::from_secs(1);

pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<ChunkData, Status>> + Send>>;

/// What a stream still has to send.
type Slot = Mutex<Option<(Bytes, ActiveGuard)>>;

fn take(slot: &Slot) -> Option<(Bytes, ActiveGuard)> {
    slot.lock().unwrap_or_else(|p| p.into_inner()).take()
}

/// The chunk streams begun lately.
#[derive(Default)]
pub struct Streams {
    open: Mutex<Vec<(Instant, Weak<Slot>)>>,
}

impl Streams {
    /// Stream `chunk` (with its `crc`), counted by `guard` until it lets go of it.
    pub fn stream(&self, chunk: Bytes, crc: u32, guard: ActiveGuard, metrics: Arc<Metrics>) -> ChunkStream {
        let slot: Arc<Slot> = Arc::new(Mutex::new(Some((chunk, guard))));
        self.open.lock().unwrap_or_else(|p| p.into_inner()).push((Instant::now(), Arc::downgrade(&slot)));
        Box::pin(futures::stream::unfold((slot, 0usize, false), move |(slot, start, done)| {
            let piece = if done { None } else { Some(next_piece(&slot, start, crc, &metrics)) };
            futures::future::ready(piece.map(|(msg, end, done)| (msg, (slot, end, done))))
        }))
    }

    /// Let go of streams older than the limit; forget those that ended.
    fn sweep(&self) {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        open.retain(|(began, slot)| {
            let Some(slot) = slot.upgrade() else { return false };
            if began.elapsed() < STREAM_LIMIT {
                return true;
            }
            if take(&slot).is_some() {
                tracing::debug!("a chunk stream ran past its limit; its chunk is let go");
            }
            false
        });
    }

    /// Sweep until `stop`.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => self.sweep(),
            }
        }
    }
}

/// The piece of the chunk in `slot` at `start`: (message, next start, whether it was the last).
fn next_piece(slot: &Slot, start: usize, crc: u32, metrics: &Metrics) -> (Result<ChunkData, Status>, usize, bool) {
    let mut held = slot.lock().unwrap_or_else(|p| p.into_inner());
    let Some((chunk, _)) = held.as_ref() else {
        let late = Status::deadline_exceeded(format!("the chunk stream took longer than {} s", STREAM_LIMIT.as_secs()));
        return (Err(late), start, true);
    };
    let len = chunk.len();
    let end = (start + MESSAGE_BYTES).min(len);
    let data = chunk.slice(start..end);
    metrics.peer_sent_bytes.inc_by(data.len() as u64);
    let first = start == 0;
    let msg = ChunkData { offset: start as u64, data, chunk_len: if first { len as u64 } else { 0 }, crc32c: if first { crc } else { 0 } };
    let last = end >= len;
    if last {
        *held = None;
    }
    (Ok(msg), end, last)
}
