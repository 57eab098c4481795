//! Reading from an origin that ignores `Range` (it answers a ranged GET with `200` and the whole
//! object): one stream of the whole object serves every chunk it passes, so reading a file costs
//! its size in egress, not its size times its chunk count.
//!
//! # Contract
//! - [`WholeStreams::chunk`] gives the whole chunk `index` of exactly that object version, or the
//!   error that ended the stream; it joins a stream of that version already under way that has
//!   not yet passed `index`, else takes it from the memory tier when a stream stored it, else
//!   starts one from byte 0.
//! - [`WholeStreams::join`] does the joining only (`None`: no stream will pass `index`).
//! - A stream stores every chunk it passes that the memory tier lacks and has room for, and hands
//!   each waiter its chunk (stored, or in a buffer when there was no room). It runs to the end of
//!   the object while readers keep asking for chunks ahead of it; with no demand within
//!   [`IDLE`] of its position it stops. Streams run on the agent's tracker and stop on its token.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::GetOptions;
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{map_err, Origin, OriginError};
use crate::cache::chunk::{chunk_count, chunk_range};
use crate::cache::memory::Fill;
use crate::cache::{Chunk, MemoryTier};
use crate::catalog::ObjectVersion;
use crate::metrics::Tier;

/// Chunks a stream may run ahead of the furthest chunk asked for before it waits for demand.
const AHEAD: u64 = 16;
/// How long a stream that is [`AHEAD`] waits for a reader to ask for more before it stops.
pub const IDLE: Duration = Duration::from_secs(5);

type Answer = Result<Chunk, OriginError>;

/// The whole-object streams in flight, one per object version at most.
pub struct WholeStreams {
    origin: Arc<Origin>,
    memory: Arc<MemoryTier>,
    streams: Mutex<HashMap<Arc<str>, Arc<Stream>>>,
    /// Told of each chunk stored (the end-to-end check of files assembled from peers).
    on_stored: Option<Arc<crate::cache::verify::Verifier>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

/// One whole-object stream: the chunk it is passing, the furthest one asked for, and who waits.
struct Stream {
    state: Mutex<State>,
    demand: Notify,
}

#[derive(Default)]
struct State {
    current: u64,
    wanted: u64,
    ended: bool,
    waiters: HashMap<u64, Vec<oneshot::Sender<Answer>>>,
}

impl Stream {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for chunk `index` if the stream has not passed it yet.
    fn wait_for(&self, index: u64) -> Option<oneshot::Receiver<Answer>> {
        let mut s = self.state();
        if s.ended || s.current > index {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        s.waiters.entry(index).or_default().push(tx);
        s.wanted = s.wanted.max(index);
        drop(s);
        self.demand.notify_one();
        Some(rx)
    }

    fn deliver(&self, index: u64, answer: impl Fn() -> Answer) {
        let waiters = self.state().waiters.remove(&index).unwrap_or_default();
        for w in waiters {
            let _ = w.send(answer());
        }
    }

    /// No more chunks: everyone still waiting gets `why`.
    fn end(&self, why: &OriginError) {
        let waiters = {
            let mut s = self.state();
            s.ended = true;
            std::mem::take(&mut s.waiters)
        };
        for w in waiters.into_values().flatten() {
            let _ = w.send(Err(copy_error(why)));
        }
    }
}

fn copy_error(e: &OriginError) -> OriginError {
    match e {
        OriginError::Changed(k) => OriginError::Changed(k.clone()),
        OriginError::NotFound(k) => OriginError::NotFound(k.clone()),
        OriginError::Timeout(t) => OriginError::Timeout(*t),
        other => OriginError::Request(other.to_string()),
    }
}

/// Where one chunk's bytes go as the stream passes it.
#[allow(clippy::large_enum_variant)] // one per chunk in flight
enum Out {
    Store(Fill),
    Buffer(BytesMut),
    /// Already present here: the bytes are passed over.
    Skip,
    /// Could not be written to the tier part way through: its bytes are passed over.
    Lost,
}

impl WholeStreams {
    pub fn new(
        origin: Arc<Origin>,
        memory: Arc<MemoryTier>,
        on_stored: Option<Arc<crate::cache::verify::Verifier>>,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        WholeStreams { origin, memory, streams: Mutex::new(HashMap::new()), on_stored, tasks, stop }
    }

    fn streams(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Arc<Stream>>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Chunk `index` from a stream under way that has not passed it yet.
    pub fn join(&self, obj: &ObjectVersion, index: u64) -> Option<oneshot::Receiver<Answer>> {
        self.streams().get(&obj.id)?.wait_for(index)
    }

    /// Chunk `index` of `obj`, from a stream under way or a new one.
    pub async fn chunk(self: &Arc<Self>, obj: &Arc<ObjectVersion>, index: u64) -> Answer {
        let rx = {
            let mut streams = self.streams();
            match streams.get(&obj.id).and_then(|s| s.wait_for(index)) {
                Some(rx) => rx,
                // A stream passed this chunk while the caller's ranged GET was finding out that
                // the origin ignores Range: it is in the tier, no new stream is needed.
                None if let Some((bytes, _)) = self.memory.map_chunk(obj, index) => return Ok(Chunk { bytes, stored: true }),
                None => {
                    let stream = Arc::new(Stream { state: Mutex::new(State::default()), demand: Notify::new() });
                    let Some(rx) = stream.wait_for(index) else { return Err(OriginError::Request("stream ended".into())) };
                    streams.insert(obj.id.clone(), stream.clone());
                    let (this, obj) = (self.clone(), obj.clone());
                    self.tasks.spawn(async move { this.run(obj, stream).await });
                    rx
                }
            }
        };
        rx.await.unwrap_or_else(|_| Err(OriginError::Request("the whole-object stream ended".into())))
    }

    async fn run(self: Arc<Self>, obj: Arc<ObjectVersion>, stream: Arc<Stream>) {
        debug!(key = %obj.key, "origin ignores Range: streaming the whole object");
        let why = tokio::select! {
            r = self.pass(&obj, &stream) => r.err().unwrap_or_else(|| OriginError::Request("the stream stopped before this chunk".into())),
            _ = self.stop.cancelled() => OriginError::Request("shutting down".into()),
        };
        stream.end(&why);
        let mut streams = self.streams();
        if streams.get(&obj.id).is_some_and(|s| Arc::ptr_eq(s, &stream)) {
            streams.remove(&obj.id);
        }
    }

    /// GET the whole object and pass every chunk of it, as long as readers want them.
    async fn pass(&self, obj: &Arc<ObjectVersion>, stream: &Stream) -> Result<(), OriginError> {
        let origin = &self.origin;
        let _permit = origin.limit.acquire().await.map_err(|_| OriginError::Request("shutting down".into()))?;
        origin.metrics.origin_requests.inc();
        let opts = GetOptions { if_match: obj.etag.clone(), version: obj.version.clone(), ..Default::default() };
        let res = tokio::time::timeout(origin.request_timeout, origin.store.get_opts(&obj.location, opts))
            .await
            .map_err(|_| OriginError::Timeout(origin.request_timeout))?
            .map_err(|e| map_err(&obj.key, e))?;
        if res.range.start != 0 {
            return Err(OriginError::Request(format!("origin returned range {:?} for a whole-object GET", res.range)));
        }
        let mut body = res.into_stream();
        let mut pending = Bytes::new();
        let chunk_size = self.memory.chunk_size();
        for index in 0..chunk_count(obj.size, chunk_size) {
            if !self.wait_for_demand(stream, index).await {
                return Ok(());
            }
            let len = chunk_range(index, obj.size, chunk_size).end - chunk_range(index, obj.size, chunk_size).start;
            let mut out = self.open(obj, index, len);
            let mut got = 0;
            while got < len {
                if pending.is_empty() {
                    let next = tokio::time::timeout(origin.request_timeout, body.next())
                        .await
                        .map_err(|_| OriginError::Timeout(origin.request_timeout))?;
                    pending = next
                        .ok_or(OriginError::Short { want: obj.size, got: index * chunk_size + got })?
                        .map_err(|e| map_err(&obj.key, e))?;
                }
                let take = (len - got).min(pending.len() as u64) as usize;
                out = self.put(out, &pending[..take], obj, index);
                pending = pending.slice(take..);
                got += take as u64;
            }
            origin.metrics.origin_bytes.inc_by(len);
            self.finish(out, obj, index, stream);
        }
        Ok(())
    }

    /// Note the chunk being passed; if it is far ahead of what readers asked for, wait (bounded)
    /// for them to ask for more. False: nobody wants more, stop.
    async fn wait_for_demand(&self, stream: &Stream, index: u64) -> bool {
        loop {
            let notified = stream.demand.notified();
            {
                let mut s = stream.state();
                s.current = index;
                if index <= s.wanted + AHEAD {
                    return true;
                }
            }
            if tokio::time::timeout(IDLE, notified).await.is_err() {
                return false;
            }
        }
    }

    fn open(&self, obj: &ObjectVersion, index: u64, len: u64) -> Out {
        match self.memory.begin_fill(obj, index) {
            Ok(Some(fill)) => Out::Store(fill),
            _ if self.memory.contains(obj, index) => Out::Skip,
            _ => Out::Buffer(BytesMut::with_capacity(len as usize)),
        }
    }

    /// Put bytes where they go; a chunk that cannot be written to the tier is lost (its waiters
    /// get an error and ask again; the tier's budget has shrunk, so the next pass buffers it).
    fn put(&self, out: Out, data: &[u8], obj: &ObjectVersion, index: u64) -> Out {
        match out {
            Out::Store(mut fill) => match fill.write(data) {
                Ok(()) => Out::Store(fill),
                Err(e) => {
                    warn!(key = %obj.key, index, error = %e, "cannot keep the chunk in the memory tier");
                    Out::Lost
                }
            },
            Out::Buffer(mut b) => {
                b.extend_from_slice(data);
                Out::Buffer(b)
            }
            other => other,
        }
    }

    /// The chunk has passed: store it and hand it to its waiters.
    fn finish(&self, out: Out, obj: &Arc<ObjectVersion>, index: u64, stream: &Stream) {
        let chunk = match out {
            Out::Store(fill) => {
                let crc = fill.crc();
                match fill.commit(crc, Tier::origin) {
                    Ok(bytes) => {
                        if let Some(v) = &self.on_stored {
                            v.stored(obj);
                        }
                        Some(Chunk { bytes, stored: true })
                    }
                    Err(e) => {
                        warn!(key = %obj.key, index, error = %e, "storing the chunk failed");
                        None
                    }
                }
            }
            Out::Buffer(b) => Some(Chunk { bytes: b.freeze(), stored: false }),
            Out::Skip => self.memory.map_chunk(obj, index).map(|(bytes, _)| Chunk { bytes, stored: true }),
            Out::Lost => None,
        };
        stream.deliver(index, || match &chunk {
            Some(c) => Ok(Chunk { bytes: c.bytes.clone(), stored: c.stored }),
            None => Err(OriginError::Local("the chunk could not be kept".into())),
        });
    }
}
