//! The memory tier: one sparse file per object version in the cache directory (tmpfs), filled
//! chunk by chunk, with an LRU index of chunks under a byte budget.
//!
//! # Contract
//! - [`MemoryTier::read`] returns `Some` only with bytes of a chunk that was fully written and
//!   whose crc32c was recorded, and that was not evicted while it was being read; otherwise
//!   `None` (a miss, never an error and never zeros from a punched hole).
//! - [`MemoryTier::insert`] stores a whole chunk; [`MemoryTier::begin_fill`] lets a receiver
//!   write one straight into the file as it arrives, present only once committed with a matching
//!   crc32c. Room is reserved first, so the bytes held never exceed the budget. A chunk larger
//!   than the whole budget is not stored (`Ok(false)`).
//! - Bytes handed out ([`MemoryTier::read`], [`MemoryTier::map_chunk`]) point into the file's
//!   mapping without a copy; while any of them is alive, that chunk is not evicted.
//! - Eviction punches a hole in the file (`fallocate(PUNCH_HOLE)`), so tmpfs pages go back to
//!   the kernel. File I/O and hole punching happen outside the index lock. An object dropped
//!   at once ([`MemoryTier::drop_object`]) keeps the pages of chunks with live views until
//!   the last view goes: a view never reads a hole.
//!
//! # Parts
//! [`file`] (a cache file, its chunk slots and mapped views), [`journal`] (what survives a
//! restart, and recovery), [`budget`] (LRU index, pins, reservation, eviction), [`fill`] (a
//! chunk being written).
//!
//! # Lock order
//! A thread holding one of these locks takes only locks later in this list:
//! `index` → `pins` → `files` → a file's `journal` → its `slots` → its `write`.
//! No file I/O (writes, hole punching, journal lines) is done while `index` is held.

mod budget;
mod digests;
mod file;
mod fill;
mod journal;
pub mod private;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use lru::LruCache;
use tracing::{debug, warn};

use self::budget::{put_back, Index};
use self::file::{punch, ObjFile, Slot};
pub use self::fill::Fill;
use self::journal::open_journal;
pub use self::journal::{Recovered, JOURNAL_SUFFIX};
use super::chunk::{chunk_count, chunk_range, ChunkKey};
use crate::catalog::ObjectVersion;
use crate::error::lock;
use crate::metrics::{Metrics, Tier};

/// Suffix of the memory tier's data files in the cache directory.
pub const DATA_SUFFIX: &str = ".chunks";

/// The cache file a present chunk lies in, and its offset there (see
/// [`MemoryTier::map_chunk_in_file`]).
pub struct ChunkFile {
    file: Arc<ObjFile>,
    pub offset: u64,
}

impl AsRawFd for ChunkFile {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.file.as_raw_fd()
    }
}

pub struct MemoryTier {
    dir: PathBuf,
    chunk_size: u64,
    /// The byte budget; lowered if the cache filesystem fills up (ENOSPC) before it.
    capacity: std::sync::atomic::AtomicU64,
    index: Mutex<Index>,
    files: Mutex<HashMap<Arc<str>, Arc<ObjFile>>>,
    /// Object versions whose chunks must not be evicted (open passthrough handles read the
    /// tmpfs file directly: a hole would read as zeros), with a count per version.
    pins: Mutex<HashMap<Arc<str>, usize>>,
    metrics: Arc<Metrics>,
    /// Each chunk's CRC-64 is kept in this algorithm (the origin's whole-object checksum).
    crc64: Option<crc_fast::CrcAlgorithm>,
    /// Keep a BLAKE3 digest of every chunk (peers vouch for chunks with them).
    digests: bool,
    /// Told of every chunk evicted (set once; see [`MemoryTier::on_evict`]).
    evicted: std::sync::OnceLock<EvictHook>,
    /// Held (flock) for the tier's life: one agent per cache directory.
    _lock: File,
}

/// What [`MemoryTier::on_evict`] calls, outside every lock of the tier.
pub type EvictHook = Box<dyn Fn(&ChunkKey) + Send + Sync>;

/// Name of the lock file in the cache directory (it holds the owner's pid).
pub const LOCK_FILE: &str = ".lock";

/// Take the cache directory for this process, or say which process has it.
fn lock_dir(dir: &Path) -> io::Result<File> {
    use std::io::{Read, Seek, Write};
    let mut f = private::options().read(true).write(true).create(true).truncate(false).open(dir.join(LOCK_FILE))?;
    // SAFETY: flock on an owned, open fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
            return Err(e);
        }
        let mut pid = String::new();
        let _ = f.read_to_string(&mut pid);
        let who = if pid.trim().is_empty() { String::new() } else { format!(" (pid {})", pid.trim()) };
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("it is in use by another cachefs agent{who}; give each agent its own --cache-dir"),
        ));
    }
    f.set_len(0)?;
    f.rewind()?;
    write!(f, "{}", std::process::id())?;
    Ok(f)
}

impl MemoryTier {
    /// Open the tier in `dir` (created if missing; made private, see [`private`]). Files of an earlier run stay until
    /// [`MemoryTier::recover`] reuses or removes them.
    /// Fails if another agent (process or tier) uses `dir`.
    pub fn new(dir: &Path, chunk_size: u64, capacity: u64, metrics: Arc<Metrics>) -> io::Result<Self> {
        private::prepare_dir(dir)?;
        let lock = lock_dir(dir)?;
        metrics.cache_capacity_bytes.set(capacity as i64);
        metrics.cache_bytes.set(0);
        Ok(MemoryTier {
            dir: dir.to_path_buf(),
            chunk_size,
            capacity: capacity.into(),
            index: Mutex::new(Index { lru: LruCache::unbounded(), used: 0 }),
            files: Mutex::new(HashMap::new()),
            pins: Mutex::new(HashMap::new()),
            metrics,
            crc64: None,
            digests: true,
            evicted: std::sync::OnceLock::new(),
            _lock: lock,
        })
    }

    /// Keep each chunk's CRC-64 in `alg`, so a whole object can be checked against the origin's
    /// checksum without reading it again ([`MemoryTier::whole_crc64`]).
    pub fn with_crc64(mut self, alg: Option<crc_fast::CrcAlgorithm>) -> Self {
        self.crc64 = alg;
        self
    }

    /// Whether chunks have BLAKE3 digests to vouch for (default: yes; see
    /// [`MemoryTier::digests`]).
    pub fn with_digests(mut self, on: bool) -> Self {
        self.digests = on;
        self
    }

    /// Whether chunks get digests.
    pub fn keeps_digests(&self) -> bool {
        self.digests
    }

    /// The CRC-64 of the whole of `obj`, combined from its chunks', if every chunk is present
    /// and the tier keeps CRC-64s; and whether any chunk came from a peer. Costs about 0.3 ms
    /// of CPU per chunk (outside any lock): call it off the async threads for large files.
    pub fn whole_crc64(&self, obj: &ObjectVersion) -> Option<(u64, bool)> {
        let alg = self.crc64?;
        let (crcs, from_peer) = {
            let f = self.existing(obj)?;
            let slots = f.slots();
            if !slots.iter().all(|s| s.present) {
                return None;
            }
            (slots.iter().map(|s| s.crc64).collect::<Vec<_>>(), slots.iter().any(|s| s.source == Some(Tier::peer)))
        };
        let whole = crcs.iter().enumerate().fold(crc_fast::checksum(alg, &[]), |acc, (i, c)| {
            let r = chunk_range(i as u64, obj.size, self.chunk_size);
            crc_fast::checksum_combine(alg, acc, *c, r.end - r.start)
        });
        Some((whole, from_peer))
    }

    /// Drop every chunk of `obj` at once, pinned or not (its bytes are known bad, or its
    /// version is gone): none is present after this. A chunk with live views (a send to a peer,
    /// a reply in progress) keeps its bytes until the last view goes, then is punched; it is
    /// not refilled before that. Returns the bytes taken out of the budget.
    pub fn drop_object(&self, obj: &ObjectVersion) -> u64 {
        let Some(f) = self.existing(obj) else { return 0 };
        let mut gone = Vec::new();
        {
            let _pins = lock(&self.pins);
            let mut slots = f.slots();
            for (i, s) in slots.iter_mut().enumerate() {
                if s.present {
                    s.present = false;
                    if s.readers > 0 {
                        s.punch_when_read = true;
                    } else {
                        let r = chunk_range(i as u64, obj.size, self.chunk_size);
                        punch(&f.file, r.start, r.end - r.start);
                    }
                    gone.push(i as u64);
                }
            }
        }
        let mut freed = 0;
        {
            let mut idx = lock(&self.index);
            for i in &gone {
                if let Some(h) = idx.lru.pop(&ChunkKey { object: obj.id.clone(), index: *i }) {
                    idx.used -= h.len;
                    freed += h.len;
                }
            }
            self.metrics.cache_bytes.set(idx.used as i64);
        }
        for i in &gone {
            f.journal(&format!("-{i}\n"));
        }
        freed
    }

    /// Forget `obj` wholly (a version no longer listed, with no file of it open): its chunks, its
    /// pins, its cache file and journal, its mapping once the last view of it is gone. A later
    /// fill of it starts afresh. Returns the bytes freed.
    pub fn forget(&self, obj: &ObjectVersion) -> u64 {
        let freed = self.drop_object(obj);
        lock(&self.pins).remove(&obj.id);
        if lock(&self.files).remove(&obj.id).is_some() {
            for p in [self.file_path(obj), self.journal_path(obj)] {
                if let Err(e) = std::fs::remove_file(&p) {
                    debug!(path = %p.display(), error = %e, "cannot remove a forgotten cache file");
                }
            }
        }
        freed
    }

    /// Call `hook` with each chunk evicted from now on (once per tier; a second hook is ignored).
    pub fn on_evict(&self, hook: EvictHook) {
        let _ = self.evicted.set(hook);
    }

    /// Object versions with a cache file open here.
    pub fn open_files(&self) -> usize {
        lock(&self.files).len()
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    /// Path of the data file of `obj` (whether or not it exists).
    pub fn file_path(&self, obj: &ObjectVersion) -> PathBuf {
        self.dir.join(format!("{}{DATA_SUFFIX}", obj.id))
    }

    fn existing(&self, obj: &ObjectVersion) -> Option<Arc<ObjFile>> {
        lock(&self.files).get(&obj.id).cloned()
    }

    fn open_file(&self, obj: &ObjectVersion) -> io::Result<Arc<ObjFile>> {
        let mut files = lock(&self.files);
        if let Some(f) = files.get(&obj.id) {
            return Ok(f.clone());
        }
        // A new version starts empty: whatever an earlier run left under this name is not trusted.
        let file = private::options().read(true).write(true).create(true).truncate(true).open(self.file_path(obj))?;
        file.set_len(obj.size)?;
        let journal =
            match std::fs::remove_file(self.journal_path(obj))
                .or_else(|e| if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
            {
                Ok(()) => open_journal(&self.journal_path(obj), Some(&self.header(obj))).ok(),
                Err(_) => None,
            };
        if journal.is_none() {
            warn!(key = %obj.key, "cannot write the cache journal: this object's chunks will not survive a restart");
        }
        let n = chunk_count(obj.size, self.chunk_size) as usize;
        let f = ObjFile::new(file, journal, self.journal_path(obj), &self.header(obj), vec![Slot::default(); n]);
        files.insert(obj.id.clone(), f.clone());
        Ok(f)
    }

    /// Whether chunk `index` of `obj` is present.
    pub fn contains(&self, obj: &ObjectVersion, index: u64) -> bool {
        self.present(obj, index).is_some()
    }

    /// Whether every chunk of `obj` is present.
    pub fn is_complete(&self, obj: &ObjectVersion) -> bool {
        if obj.size == 0 {
            return true;
        }
        self.existing(obj).is_some_and(|f| f.slots().iter().all(|s| s.present))
    }

    /// Bytes `within` of chunk `index` of `obj`, if present, and the tier that stored them.
    pub fn read(&self, obj: &ObjectVersion, index: u64, within: Range<u64>) -> Option<(Bytes, Tier)> {
        let chunk = chunk_range(index, obj.size, self.chunk_size);
        if within.is_empty() {
            return None;
        }
        let f = self.existing(obj)?;
        let (bytes, slot) = f.view(index, chunk, within)?;
        lock(&self.index).touch(&ChunkKey { object: obj.id.clone(), index });
        Some((bytes, slot.source.unwrap_or(Tier::memory)))
    }

    /// being written by someone else, or larger than the budget).
    pub fn insert(self: &Arc<Self>, obj: &ObjectVersion, index: u64, data: &[u8], source: Tier) -> io::Result<bool> {
        let len = chunk_range(index, obj.size, self.chunk_size);
        if data.len() as u64 != len.end - len.start {
            let msg = format!("chunk {index} of {} has {} bytes, expected {}", obj.key, data.len(), len.end - len.start);
            return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
        }
        let Some(mut fill) = self.begin_fill(obj, index)? else { return Ok(false) };
        fill.write(data)?;
        let crc = fill.crc();
        fill.commit(crc, source).map(|_| true)
    }

    /// Reserve room for chunk `index` of `obj` and mark it being written. `Ok(None)` if it is
    /// present, being written by someone else, or cannot be given room within the budget.
    pub fn begin_fill(self: &Arc<Self>, obj: &ObjectVersion, index: u64) -> io::Result<Option<Fill>> {
        self.begin_fill_used(obj, index, None)
    }

    /// As [`MemoryTier::begin_fill`], for a chunk last used `idle` ago elsewhere (handed off by
    /// a peer): room is made only by evicting chunks used less recently than that, and the
    /// chunk keeps that last use once stored.
    pub fn begin_fill_colder(self: &Arc<Self>, obj: &ObjectVersion, index: u64, idle: Duration) -> io::Result<Option<Fill>> {
        let used = Instant::now().checked_sub(idle).unwrap_or_else(Instant::now);
        self.begin_fill_used(obj, index, Some(used))
    }

    fn begin_fill_used(self: &Arc<Self>, obj: &ObjectVersion, index: u64, used: Option<Instant>) -> io::Result<Option<Fill>> {
        let chunk = chunk_range(index, obj.size, self.chunk_size);
        let len = chunk.end - chunk.start;
        if len > self.capacity() || len == 0 {
            return Ok(None);
        }
        let f = self.open_file(obj)?;
        {
            let mut slots = f.slots();
            let Some(s) = slots.get_mut(index as usize) else { return Ok(None) };
            if s.present || s.writing || s.punch_when_read {
                return Ok(None);
            }
            s.writing = true;
        }
        // Dropped unreserved, it only clears `writing`.
        let key = ChunkKey { object: obj.id.clone(), index };
        let crc64 = self.crc64.map(crc_fast::Digest::new);
        let mut fill = Fill {
            tier: self.clone(),
            file: f,
            key,
            chunk,
            written: 0,
            crc: 0,
            crc64,
            digest: None,
            by_digest: false,
            reserved: false,
            staged: Vec::new(),
            used,
        };
        fill.reserved = self.reserve(len, used);
        Ok(fill.reserved.then_some(fill))
    }

    /// A present chunk as `Bytes` pointing into the file's mapping (no copy), with the crc32c
    /// recorded when it was stored. The chunk is not evicted while the bytes are alive.
    pub fn map_chunk(&self, obj: &ObjectVersion, index: u64) -> Option<(Bytes, u32)> {
        self.map_chunk_in_file(obj, index).map(|(bytes, crc, _)| (bytes, crc))
    }

    /// [`MemoryTier::map_chunk`], with where the chunk lies in its cache file: while the view
    /// lives, the file's bytes there are the view's (they can be sent with `sendfile`).
    pub fn map_chunk_in_file(&self, obj: &ObjectVersion, index: u64) -> Option<(Bytes, u32, ChunkFile)> {
        let f = self.existing(obj)?;
        let chunk = chunk_range(index, obj.size, self.chunk_size);
        let (bytes, slot) = f.view(index, chunk.clone(), 0..chunk.end - chunk.start)?;
        lock(&self.index).touch(&ChunkKey { object: obj.id.clone(), index });
        Some((bytes, slot.crc, ChunkFile { file: f, offset: chunk.start }))
    }

    /// crc32c of a present chunk.
    pub fn crc(&self, obj: &ObjectVersion, index: u64) -> Option<u32> {
        self.present(obj, index).map(|(_, s)| s.crc)
    }

    /// The file and a snapshot of the slot of chunk `index`, if that chunk is present.
    fn present(&self, obj: &ObjectVersion, index: u64) -> Option<(Arc<ObjFile>, Slot)> {
        let f = self.existing(obj)?;
        let slot = f.slots().get(index as usize).copied().filter(|s| s.present)?;
        Some((f, slot))
    }
}
