//! The tiered reader: memory → sources below it (peers, origin) in order, with single-flight
//! per chunk, sequential readahead under a global budget, and a deadline on every read.
//!
//! # Contract
//! - [`Reader::read`] returns exactly the bytes `[offset, offset+len)` of the object version,
//!   clamped to its size, or an error within the read deadline; never other bytes.
//! - N concurrent reads of one cold chunk cause one fetch from the sources (single-flight); a
//!   failed fetch is forgotten, so the next read tries again.
//! - Fetches run as tracked tasks: they finish (and fill the memory tier) even if the reader
//!   that started them gave up, and stop when [`Reader::shutdown`] is called.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use super::chunk::{chunk_count, chunk_range, split_read, ChunkKey};
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
/// must return within a bounded time.
pub trait ChunkSource: Send + Sync + 'static {
    fn tier(&self) -> Tier;
    fn fetch<'a>(&'a self, obj: &'a Arc<ObjectVersion>, index: u64, range: Range<u64>) -> BoxFuture<'a, Result<Option<Bytes>, Error>>;
}

#[derive(Debug, Clone)]
pub struct ReaderOptions {
    pub chunk_size: u64,
    pub read_timeout: Duration,
    /// Bytes of readahead in flight over all files.
    pub readahead_budget: u64,
}

/// A fetched chunk, the tier it came from, and the bytes of it already served to readers
/// before it was stored (see [`MemoryTier::credit`]).
#[derive(Clone)]
struct Fetch {
    bytes: Bytes,
    tier: Tier,
    served_early: Arc<AtomicU64>,
}

type Fetched = Result<Fetch, Error>;

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
}

pub struct Reader {
    memory: Arc<MemoryTier>,
    sources: Vec<Arc<dyn ChunkSource>>,
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
    /// Fetched chunks not yet written to memory, and a wake-up each time one is.
    pending_stores: std::sync::atomic::AtomicUsize,
    stored: tokio::sync::Notify,
}

impl Reader {
    /// Must be called inside a tokio runtime: background fetches run on it.
    pub fn new(memory: Arc<MemoryTier>, sources: Vec<Arc<dyn ChunkSource>>, opts: ReaderOptions, metrics: Arc<Metrics>) -> Arc<Self> {
        let permits = (opts.readahead_budget / opts.chunk_size).max(1) as usize;
        Arc::new(Reader {
            memory,
            sources,
            flights: Mutex::new(HashMap::new()),
            next_flight: std::sync::atomic::AtomicU64::new(0),
            readahead: Arc::new(Semaphore::new(permits)),
            writers: Arc::new(Semaphore::new(MEMORY_WRITERS)),
            opts,
            metrics,
            tracker: TaskTracker::new(),
            cancel: CancellationToken::new(),
            rt: tokio::runtime::Handle::current(),
            pending_stores: std::sync::atomic::AtomicUsize::new(0),
            stored: tokio::sync::Notify::new(),
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

    /// The read, if every byte of it is in memory now (no waiting, no I/O but tmpfs).
    pub fn read_cached(&self, obj: &ObjectVersion, offset: u64, len: u64) -> Option<Bytes> {
        let pieces = split_read(offset, len, obj.size, self.opts.chunk_size);
        let out = match pieces.as_slice() {
            [] => Bytes::new(),
            [p] => {
                let (b, credit) = self.memory.read(obj, p.index, p.within.clone())?;
                credit.record(&self.metrics, b.len() as u64);
                b
            }
            many => {
                let mut parts = Vec::with_capacity(many.len());
                for p in many {
                    parts.push(self.memory.read(obj, p.index, p.within.clone())?);
                }
                let mut buf = BytesMut::new();
                for (b, credit) in parts {
                    credit.record(&self.metrics, b.len() as u64);
                    buf.extend_from_slice(&b);
                }
                buf.freeze()
            }
        };
        Some(out)
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
                return Ok::<_, Error>(hit);
            }
            let f = self.chunk(obj, p.index).await?;
            let within = p.within.start as usize..(p.within.end as usize).min(f.bytes.len());
            let credit = self.memory.credit(obj, p.index, within.len() as u64, f.tier, &f.served_early);
            Ok((f.bytes.slice(within), credit))
        }))
        .await?;
        for (b, credit) in &parts {
            credit.record(&self.metrics, b.len() as u64);
        }
        Ok(match parts.len() {
            1 => parts.into_iter().next().map(|(b, _)| b).unwrap_or_default(),
            _ => {
                let mut buf = BytesMut::with_capacity(parts.iter().map(|(b, _)| b.len()).sum());
                for (b, _) in parts {
                    buf.extend_from_slice(&b);
                }
                buf.freeze()
            }
        })
    }

    /// The whole chunk `index` of `obj`: joins a fetch in flight or starts one.
    fn chunk(self: &Arc<Self>, obj: &Arc<ObjectVersion>, index: u64) -> Flight {
        self.chunk_for(obj, index, false)
    }

    /// `background`: the fill serves no local reader (a peer, or `warm`); once stored, local
    /// reads of it count as memory hits.
    fn chunk_for(self: &Arc<Self>, obj: &Arc<ObjectVersion>, index: u64, background: bool) -> Flight {
        let key = ChunkKey { object: obj.id.clone(), index };
        let mut flights = self.flights.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = flights.get(&key) {
            if f.started.elapsed() < self.opts.read_timeout {
                return f.flight.clone();
            }
            warn!(key = %obj.key, index, "a fetch of this chunk is older than the read deadline; starting another");
        }
        let id = self.next_flight.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let this = self.clone();
        let obj = obj.clone();
        let span = tracing::debug_span!("fill", key = %obj.key, index);
        let task_key = key.clone();
        // Waiters get the bytes as soon as they are fetched; the tmpfs write comes after.
        let (tx, rx) = tokio::sync::oneshot::channel::<Fetched>();
        self.tracker.spawn_on(
            async move {
                let result = tokio::select! {
                    r = this.fetch(&obj, index) => r,
                    _ = this.cancel.cancelled() => Err(Error::unavailable("agent is shutting down")),
                };
                let store = result.as_ref().ok().cloned();
                if store.is_some() {
                    this.pending_stores.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
                let _ = tx.send(result);
                if let Some(f) = store {
                    if background {
                        f.served_early.fetch_add(f.bytes.len() as u64, std::sync::atomic::Ordering::SeqCst);
                    }
                    this.store(&obj, index, f).await;
                    this.pending_stores.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    this.stored.notify_waiters();
                }
                let mut flights = this.flights.lock().unwrap_or_else(|p| p.into_inner());
                if flights.get(&task_key).is_some_and(|f| f.id == id) {
                    flights.remove(&task_key);
                }
            }
            .instrument(span),
            &self.rt,
        );
        let flight = async move { rx.await.unwrap_or_else(|_| Err(Error::unavailable("fetch task ended"))) }.boxed().shared();
        flights.insert(key, InFlight { id, started: std::time::Instant::now(), flight: flight.clone() });
        flight
    }

    /// Write a fetched chunk into the memory tier, off the async workers, a few at a time.
    async fn store(&self, obj: &Arc<ObjectVersion>, index: u64, f: Fetch) {
        let Ok(_permit) = self.writers.acquire().await else { return };
        let (memory, o) = (self.memory.clone(), obj.clone());
        match tokio::task::spawn_blocking(move || memory.insert(&o, index, &f.bytes, f.tier, &f.served_early)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => warn!(key = %obj.key, index, error = %e, "could not store chunk in the memory tier"),
            Err(e) => warn!(key = %obj.key, index, error = %e, "memory tier write task failed"),
        }
    }

    async fn fetch(&self, obj: &Arc<ObjectVersion>, index: u64) -> Fetched {
        let range = chunk_range(index, obj.size, self.opts.chunk_size);
        let want = range.end - range.start;
        let mut last: Option<Error> = None;
        for source in &self.sources {
            let t = std::time::Instant::now();
            match source.fetch(obj, index, range.clone()).await {
                Ok(Some(bytes)) if bytes.len() as u64 == want => {
                    debug!(key = %obj.key, index, tier = ?source.tier(), elapsed = ?t.elapsed(), "chunk fetched");
                    return Ok(Fetch { bytes, tier: source.tier(), served_early: Arc::new(AtomicU64::new(0)) });
                }
                Ok(Some(bytes)) => {
                    warn!(key = %obj.key, index, tier = ?source.tier(), got = bytes.len(), want, "source returned a chunk of the wrong size");
                }
                Ok(None) => {}
                Err(e @ Error::Stale(_)) => return Err(e),
                Err(e) => {
                    debug!(key = %obj.key, index, tier = ?source.tier(), error = %e, "source failed; trying the next");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| Error::unavailable("no source has this chunk")))
    }

    /// The whole chunk `index` of `obj` through the same single-flight path as a local miss
    /// (used to fill chunks for peers), within the read deadline.
    pub async fn fetch_chunk(self: &Arc<Self>, obj: &Arc<ObjectVersion>, index: u64) -> Result<Bytes, Error> {
        if let Some((b, _)) = self.memory.map_chunk(obj, index) {
            return Ok(b);
        }
        match tokio::time::timeout(self.opts.read_timeout, self.chunk_for(obj, index, true)).await {
            Ok(r) => r.map(|f| f.bytes),
            Err(_) => Err(Error::TimedOut(self.opts.read_timeout)),
        }
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
        let flight = self.chunk(obj, index);
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
                    this.chunk_for(&obj, i, true).await.map(|_| chunk_range(i, obj.size, this.opts.chunk_size))
                }
            })
            .buffer_unordered(parallel);
        use futures::StreamExt;
        while let Some(r) = stream.next().await {
            let r = r?;
            progress(r.end - r.start);
        }
        // Done means in memory: wait for the last writes (bounded by the read deadline).
        let deadline = tokio::time::Instant::now() + self.opts.read_timeout;
        loop {
            let woken = self.stored.notified();
            if self.memory.is_complete(obj) || self.pending_stores.load(std::sync::atomic::Ordering::SeqCst) == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                break;
            }
        }
        Ok(())
    }

    /// Stop background fetches and wait (bounded) for them to end.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await.is_err() {
            warn!("background fetches did not stop within 5 s");
        }
    }
}

