//! The tiered reader: memory → sources below it (peers, origin) in order, with single-flight
//! per chunk, sequential readahead under a global budget, and a deadline on every read.
//!
//! # Contract
//! - [`Reader::read`] returns exactly the bytes `[offset, offset+len)` of the object version,
//!   clamped to its size, or an error within the read deadline; never other bytes.
//! - N concurrent reads of one cold chunk cause one fetch from the sources (single-flight); a
//!   failed fetch is forgotten, so the next read tries again.
//! - Fetches run as tracked tasks: they finish (and fill the memory tier) even if the reader
//!   that started them gave up, and stop when [`Reader::shutdown`] is called. A fetch hands its
//!   bytes to waiters only once they are stored, so a file read to its end is in memory.
//! - A fill asked for by a peer never asks peers in turn.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use super::chunk::{chunk_count, chunk_range, split_read, ChunkKey};
use super::credit::Credits;
use super::memory::MemoryTier;
use crate::catalog::ObjectVersion;
use crate::error::Error;
use crate::metrics::{Metrics, Tier};

/// A tier below memory that can supply whole chunks.
///
/// # Contract
/// `fetch` returns the whole chunk `index` of exactly that object version (`range` is its byte
/// range in the object, already clamped to the size), `Ok(None)` when this source cannot supply
/// it (a miss, not an error), or an error. It must never return bytes of another version, and
/// must return within a bounded time. A source may store the chunk in the memory tier itself as
/// it receives it (then `stored` is true and the bytes are a view of the tier's file).
/// `stage` tells others what the fetch waits on: a source that asks another peer for the bytes
/// says so while it does.
pub trait ChunkSource: Send + Sync + 'static {
    fn tier(&self) -> Tier;
    fn fetch<'a>(
        &'a self,
        obj: &'a Arc<ObjectVersion>,
        index: u64,
        range: Range<u64>,
        stage: &'a Stage,
    ) -> BoxFuture<'a, Result<Option<Chunk>, Error>>;
}

/// What a fetch in flight waits on. A peer asking this agent to fill a chunk joins the fetch in
/// flight unless it waits on another peer (which could be the asker: a cycle); peers are told
/// of fetches from the origin, so they join them instead of starting their own.
#[derive(Debug, Default)]
pub struct Stage(std::sync::atomic::AtomicU8);

impl Stage {
    const DECIDING: u8 = 0;
    const PEER: u8 = 1;
    const ORIGIN: u8 = 2;

    /// The fetch now waits on another peer (`true`) or no longer does.
    pub fn waiting_on_peer(&self, yes: bool) {
        self.0.store(if yes { Self::PEER } else { Self::DECIDING }, Ordering::SeqCst);
    }

    fn mark_origin(&self) {
        self.0.store(Self::ORIGIN, Ordering::SeqCst);
    }

    fn is_peer(&self) -> bool {
        self.0.load(Ordering::SeqCst) == Self::PEER
    }

    fn is_origin(&self) -> bool {
        self.0.load(Ordering::SeqCst) == Self::ORIGIN
    }
}

/// A whole chunk from a source.
pub struct Chunk {
    pub bytes: Bytes,
    /// Already in the memory tier (committed with its crc32c).
    pub stored: bool,
}

impl From<Bytes> for Chunk {
    fn from(bytes: Bytes) -> Self {
        Chunk { bytes, stored: false }
    }
}

#[derive(Debug, Clone)]
pub struct ReaderOptions {
    pub chunk_size: u64,
    pub read_timeout: Duration,
    /// Bytes of readahead in flight over all files.
    pub readahead_budget: u64,
}

/// A fetched chunk, the tier it came from, and whether it is in the memory tier.
#[derive(Clone)]
struct Fetch {
    bytes: Bytes,
    tier: Tier,
    stored: bool,
}

type Fetched = Result<Fetch, Error>;

/// Who a fill is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Purpose {
    /// A local reader: the bytes count for the tier that supplied them.
    Read,
    /// Nobody local (`warm`): once stored, local reads count as memory hits.
    Background,
    /// A peer asked this agent to fill it: never asks peers in turn (no chains, no cycles).
    Peer,
}

/// Concurrent writes into the memory tier (measured here: more writers to one tmpfs file spin on
/// its inode lock and slow everything down on a 2-core machine).
const MEMORY_WRITERS: usize = 2;
type Flight = Shared<BoxFuture<'static, Fetched>>;

/// A fetch in flight: joined by readers of the same chunk until it is older than the read
/// deadline; then a new fetch replaces it (an origin connection that hangs must not hold a chunk
/// hostage after the origin recovered).
struct InFlight {
    id: u64,
    started: std::time::Instant,
    flight: Flight,
    stage: Arc<Stage>,
}

pub struct Reader {
    memory: Arc<MemoryTier>,
    sources: Vec<Arc<dyn ChunkSource>>,
    /// Which tier each read's bytes count for.
    credits: Credits,
    flights: Mutex<HashMap<ChunkKey, InFlight>>,
    next_flight: std::sync::atomic::AtomicU64,
    readahead: Arc<Semaphore>,
    /// Writers into the tmpfs files at once: more only spin on the file's inode lock.
    writers: Arc<Semaphore>,
    opts: ReaderOptions,
    metrics: Arc<Metrics>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    /// Fetches are spawned here: `read_cached`/`prefetch` run on FUSE threads, outside the runtime.
    rt: tokio::runtime::Handle,
}

impl Reader {
    /// Must be called inside a tokio runtime: background fetches run on it.
    pub fn new(memory: Arc<MemoryTier>, sources: Vec<Arc<dyn ChunkSource>>, opts: ReaderOptions, metrics: Arc<Metrics>) -> Arc<Self> {
        let permits = (opts.readahead_budget / opts.chunk_size).max(1) as usize;
        // Chunks filled for readers but not yet read: at most what the tier holds, plus readahead.
        let credits = Credits::new((memory.capacity() / opts.chunk_size) as usize + permits);
        Arc::new(Reader {
            memory,
            sources,
            credits,
            flights: Mutex::new(HashMap::new()),
            next_flight: std::sync::atomic::AtomicU64::new(0),
            readahead: Arc::new(Semaphore::new(permits)),
            writers: Arc::new(Semaphore::new(MEMORY_WRITERS)),
            opts,
            metrics,
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            rt: tokio::runtime::Handle::current(),
        })
    }

    pub fn memory(&self) -> &Arc<MemoryTier> {
        &self.memory
    }

    pub fn chunk_size(&self) -> u64 {
        self.opts.chunk_size
    }

    /// Most chunks a single file's readahead window may span.
    pub fn max_window(&self) -> u64 {
        (self.opts.readahead_budget / self.opts.chunk_size).clamp(1, 16)
    }

    /// Whether chunk `index` of `obj` is being fetched from the origin here right now.
    pub fn filling(&self, obj: &ObjectVersion, index: u64) -> bool {
        let key = ChunkKey { object: obj.id.clone(), index };
        self.flights.lock().unwrap_or_else(|p| p.into_inner()).get(&key).is_some_and(|f| f.stage.is_origin())
    }

    /// The read, if every byte of it is in memory now (no waiting, no I/O but tmpfs).
    pub fn read_cached(&self, obj: &ObjectVersion, offset: u64, len: u64) -> Option<Bytes> {
        let pieces = split_read(offset, len, obj.size, self.opts.chunk_size);
        // All or nothing: a part read (and credited) here would be read again by `read`.
        if !pieces.iter().all(|p| self.memory.contains(obj, p.index)) {
            return None;
        }
        let mut parts = Vec::with_capacity(pieces.len());
        for p in &pieces {
            parts.push(self.memory.read(obj, p.index, p.within.clone())?);
        }
        let parts = pieces.iter().zip(parts).map(|(p, hit)| self.credit_hit(obj, p.index, hit)).collect();
        Some(join(parts))
    }

    /// Count a memory-tier hit for the tier it is credited to, and return its bytes.
    fn credit_hit(&self, obj: &ObjectVersion, index: u64, (bytes, filler): (Bytes, Tier)) -> Bytes {
        self.credits.record_hit(&self.metrics, &ChunkKey { object: obj.id.clone(), index }, filler, bytes.len() as u64);
        bytes
    }

    /// Exactly the bytes `[offset, offset+len)` of `obj` (clamped to its size), from the first
    /// tier that has them, within the read deadline.
    pub async fn read(self: &Arc<Self>, obj: &Arc<ObjectVersion>, offset: u64, len: u64) -> Result<Bytes, Error> {
        let deadline = self.opts.read_timeout;
        match tokio::time::timeout(deadline, self.read_inner(obj, offset, len)).await {
            Ok(r) => r,
            Err(_) => Err(Error::TimedOut(deadline)),
        }
    }

    async fn read_inner(self: &Arc<Self>, obj: &Arc<ObjectVersion>, offset: u64, len: u64) -> Result<Bytes, Error> {
        let pieces = split_read(offset, len, obj.size, self.opts.chunk_size);
        let parts = futures::future::try_join_all(pieces.into_iter().map(|p| async move {
            if let Some(hit) = self.memory.read(obj, p.index, p.within.clone()) {
                return Ok::<_, Error>(self.credit_hit(obj, p.index, hit));
            }
            let f = self.chunk_for(obj, p.index, Purpose::Read).await?;
            if f.stored {
                if let Some(hit) = self.memory.read(obj, p.index, p.within.clone()) {
                    return Ok(self.credit_hit(obj, p.index, hit));
                }
            }
            // Not stored (no room): served from the fetched bytes, all counted for their tier.
            let within = p.within.start as usize..(p.within.end as usize).min(f.bytes.len());
            self.metrics.add_read(f.tier, within.len() as u64);
            Ok(f.bytes.slice(within))
        }))
        .await?;
        Ok(join(parts))
    }

    /// The whole chunk `index` of `obj`: joins a fetch in flight or starts one. The flight ends
    /// once the chunk is in the memory tier (or could not be stored), so a file whose last chunk
    /// was read is complete in memory at that moment.
    fn chunk_for(self: &Arc<Self>, obj: &Arc<ObjectVersion>, index: u64, purpose: Purpose) -> Flight {
        let key = ChunkKey { object: obj.id.clone(), index };
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = flights.get(&key) {
            if f.started.elapsed() < self.opts.read_timeout {
                return f.flight.clone();
            }
            warn!(key = %obj.key, index, "a fetch of this chunk is older than the read deadline; starting another");
        }
        if purpose == Purpose::Read {
            let r = chunk_range(index, obj.size, self.opts.chunk_size);
            self.credits.fetching(key.clone(), r.end - r.start);
        }
        let id = self.next_flight.fetch_add(1, Ordering::Relaxed);
        let stage = Arc::new(Stage::default());
        let (this, obj, task_stage) = (self.clone(), obj.clone(), stage.clone());
        let span = tracing::debug_span!("fill", key = %obj.key, index);
        let task_key = key.clone();
        let (tx, rx) = tokio::sync::oneshot::channel::<Fetched>();
        self.tracker.spawn_on(
            async move {
                let result = tokio::select! {
                    r = this.fetch_and_store(&obj, index, purpose, &task_stage) => r,
                    _ = this.cancel.cancelled() => Err(Error::unavailable("agent is shutting down")),
                };
                let _ = tx.send(result);
                let mut flights = this.flights.lock().unwrap_or_else(|p| p.into_inner());
                if flights.get(&task_key).is_some_and(|f| f.id == id) {
                    flights.remove(&task_key);
                }
            }
            .instrument(span),
            &self.rt,
        );
        let flight = async move { rx.await.unwrap_or_else(|_| Err(Error::unavailable("fetch task ended"))) }.boxed().shared();
        flights.insert(key, InFlight { id, started: std::time::Instant::now(), flight: flight.clone(), stage });
        flight
    }

    /// Fetch the chunk and put it in the memory tier (unless its source already did).
    async fn fetch_and_store(&self, obj: &Arc<ObjectVersion>, index: u64, purpose: Purpose, stage: &Stage) -> Fetched {
        let key = ChunkKey { object: obj.id.clone(), index };
        let mut f = self.ask_sources(obj, index, purpose, stage).await.inspect_err(|_| self.credits.settled(&key))?;
        if !f.stored {
            f.stored = self.store(obj, index, &f).await;
        }
        if !f.stored || purpose != Purpose::Read {
            self.credits.settled(&key);
        }
        Ok(f)
    }

    /// Write a fetched chunk into the memory tier, off the async workers, a few at a time.
    async fn store(&self, obj: &Arc<ObjectVersion>, index: u64, f: &Fetch) -> bool {
        let Ok(_permit) = self.writers.acquire().await else { return false };
        let (memory, o, bytes, tier) = (self.memory.clone(), obj.clone(), f.bytes.clone(), f.tier);
        match tokio::task::spawn_blocking(move || memory.insert(&o, index, &bytes, tier)).await {
            Ok(Ok(stored)) => stored,
            Ok(Err(e)) => {
                warn!(key = %obj.key, index, error = %e, "could not store chunk in the memory tier");
                false
            }
            Err(e) => {
                warn!(key = %obj.key, index, error = %e, "memory tier write task failed");
                false
            }
        }
    }

    async fn ask_sources(&self, obj: &Arc<ObjectVersion>, index: u64, purpose: Purpose, stage: &Stage) -> Fetched {
        let range = chunk_range(index, obj.size, self.opts.chunk_size);
        let want = range.end - range.start;
        let mut last: Option<Error> = None;
        for source in &self.sources {
            let tier = source.tier();
            if purpose == Purpose::Peer && tier == Tier::peer {
                continue;
            }
            if tier == Tier::origin {
                stage.mark_origin();
            }
            let t = std::time::Instant::now();
            match source.fetch(obj, index, range.clone(), stage).await {
                Ok(Some(c)) if c.bytes.len() as u64 == want => {
                    debug!(key = %obj.key, index, ?tier, elapsed = ?t.elapsed(), "chunk fetched");
                    return Ok(Fetch { bytes: c.bytes, tier, stored: c.stored });
                }
                Ok(Some(c)) => warn!(key = %obj.key, index, ?tier, got = c.bytes.len(), want, "source returned a chunk of the wrong size"),
                Ok(None) => {}
                Err(e @ Error::Stale(_)) => return Err(e),
                Err(e) => {
                    debug!(key = %obj.key, index, ?tier, error = %e, "source failed; trying the next");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::unavailable("no source has this chunk")))
    }

    /// The whole chunk `index` of `obj` for a peer, with its crc32c, within the read deadline:
    /// from memory, else by joining a fetch from the origin in flight, else from the origin
    /// through the same single-flight path as a local miss. Never by asking another peer.
    pub async fn fetch_chunk(self: &Arc<Self>, obj: &Arc<ObjectVersion>, index: u64) -> Result<(Bytes, u32), Error> {
        if let Some(hit) = self.memory.map_chunk(obj, index) {
            return Ok(hit);
        }
        let key = ChunkKey { object: obj.id.clone(), index };
        let waits_on_peer = self.flights.lock().unwrap_or_else(|p| p.into_inner()).get(&key).is_some_and(|f| f.stage.is_peer());
        let fetched = async {
            if waits_on_peer {
                // Joining a fetch that waits on another peer could wait on the caller itself.
                return self.ask_sources(obj, index, Purpose::Peer, &Stage::default()).await;
            }
            self.chunk_for(obj, index, Purpose::Peer).await
        };
        let f = match tokio::time::timeout(self.opts.read_timeout, fetched).await {
            Ok(r) => r?,
            Err(_) => return Err(Error::TimedOut(self.opts.read_timeout)),
        };
        if f.stored {
            if let Some(hit) = self.memory.map_chunk(obj, index) {
                return Ok(hit);
            }
        }
        let crc = crc32c::crc32c(&f.bytes);
        Ok((f.bytes, crc))
    }

    /// Start fetching chunk `index` in the background if it is missing and the readahead
    /// budget allows. Returns false when the budget is used up.
    pub fn prefetch(self: &Arc<Self>, obj: &Arc<ObjectVersion>, index: u64) -> bool {
        if index >= chunk_count(obj.size, self.opts.chunk_size) || self.memory.contains(obj, index) {
            return true;
        }
        let key = ChunkKey { object: obj.id.clone(), index };
        if self.flights.lock().unwrap_or_else(|p| p.into_inner()).contains_key(&key) {
            return true;
        }
        let Ok(permit) = self.readahead.clone().try_acquire_owned() else { return false };
        let flight = self.chunk_for(obj, index, Purpose::Read);
        self.tracker.spawn_on(
            async move {
                let _ = flight.await;
                drop(permit);
            },
            &self.rt,
        );
        true
    }

    /// Load every chunk of `obj` into memory, calling `progress` with each chunk's length.
    pub async fn load_all(self: &Arc<Self>, obj: &Arc<ObjectVersion>, mut progress: impl FnMut(u64)) -> Result<(), Error> {
        let n = chunk_count(obj.size, self.opts.chunk_size);
        let parallel = self.max_window().max(2) as usize;
        let mut stream = futures::stream::iter(0..n)
            .map(|i| {
                let this = self.clone();
                let obj = obj.clone();
                async move {
                    if this.memory.contains(&obj, i) {
                        return Ok(chunk_range(i, obj.size, this.opts.chunk_size));
                    }
                    this.chunk_for(&obj, i, Purpose::Background).await.map(|_| chunk_range(i, obj.size, this.opts.chunk_size))
                }
            })
            .buffer_unordered(parallel);
        use futures::StreamExt;
        while let Some(r) = stream.next().await {
            let r = r?;
            progress(r.end - r.start);
        }
        Ok(())
    }

    /// Stop background fetches and wait at most `limit` for them to end.
    pub async fn shutdown(&self, limit: Duration) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(limit, self.tracker.wait()).await.is_err() {
            warn!(?limit, "background fetches did not stop in time");
        }
    }
}

/// The parts of a read as one buffer (a copy only if there are several).
fn join(parts: Vec<Bytes>) -> Bytes {
    match parts.len() {
        1 => parts.into_iter().next().unwrap_or_default(),
        _ => {
            let mut buf = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
            for b in parts {
                buf.extend_from_slice(&b);
            }
            buf.freeze()
        }
    }
}
