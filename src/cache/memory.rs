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
//!   the kernel. File I/O and hole punching happen outside the index lock.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use lru::LruCache;
use tracing::{debug, warn};

use super::chunk::{chunk_count, chunk_range, ChunkKey};
use crate::catalog::ObjectVersion;
use crate::metrics::{Metrics, Tier};

/// Suffix of the memory tier's data files in the cache directory.
pub const DATA_SUFFIX: &str = ".chunks";
/// Suffix of each data file's journal: a JSON header line, then `+INDEX CRC` once a chunk is
/// fully written and `-INDEX` once it is evicted. Replayed (and every chunk re-verified) at start.
pub const JOURNAL_SUFFIX: &str = ".journal";
/// Suffix of a journal being rewritten (renamed over the journal once whole).
const JOURNAL_TMP_SUFFIX: &str = ".journal.tmp";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct JournalHeader {
    v: u32,
    key: String,
    size: u64,
    chunk_size: u64,
}

/// What [`MemoryTier::recover`] found in the cache directory.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Recovered {
    pub objects: usize,
    pub chunks: usize,
    pub bytes: u64,
    /// Chunks whose data did not match their checksum (or was missing): dropped, never served.
    pub dropped: usize,
    /// Files of versions no longer in the catalog, or unreadable: removed.
    pub removed_files: usize,
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    present: bool,
    writing: bool,
    crc: u32,
    /// CRC-64 of the chunk in the origin's whole-object algorithm (0 when none is kept).
    crc64: u64,
    /// Bytes of this chunk not yet served since it was filled: they count for `source`.
    fresh: u64,
    source: Option<Tier>,
    /// Live `Bytes` into this chunk's mapping: it is not evicted while any exists.
    readers: u32,
}

/// Who a read's bytes are credited to: the first pass over a freshly filled chunk (readahead
/// included) counts for the tier that filled it, later reads for memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credit {
    pub source: Tier,
    pub source_bytes: u64,
}

impl Credit {
    pub fn record(&self, metrics: &Metrics, total: u64) {
        metrics.add_read(self.source, self.source_bytes);
        metrics.add_read(Tier::memory, total - self.source_bytes);
    }
}

fn take_fresh(s: &mut Slot, n: u64) -> Credit {
    let take = s.fresh.min(n);
    s.fresh -= take;
    Credit { source: s.source.unwrap_or(Tier::memory), source_bytes: take }
}

struct ObjFile {
    file: File,
    /// Append-only journal of present chunks (None if it could not be opened: no warm restart).
    journal: Mutex<Option<File>>,
    /// Where the journal is, its header line, and lines appended since it was last written
    /// whole: it is rewritten from the slots once it holds many more lines than chunks.
    journal_path: PathBuf,
    header_line: String,
    journal_lines: std::sync::atomic::AtomicU64,
    slots: Mutex<Vec<Slot>>,
    /// A shared read-only mapping of the whole file, made on first use.
    map: std::sync::OnceLock<Option<Arc<memmap2::Mmap>>>,
    /// Held around each write: concurrent writes to one tmpfs file spin on its inode lock
    /// (measured: 7% of a remote hit's CPU); waiting here sleeps instead.
    write: Mutex<()>,
}

/// A range of a mapping, owned: lets `Bytes` point into the tmpfs file without a copy. It
/// counts as a reader of its chunk until dropped, so the chunk cannot be punched under it.
struct MapSlice {
    map: Arc<memmap2::Mmap>,
    range: Range<usize>,
    file: Arc<ObjFile>,
    index: usize,
}

impl Drop for MapSlice {
    fn drop(&mut self) {
        if let Some(s) = self.file.slots().get_mut(self.index) {
            s.readers = s.readers.saturating_sub(1);
        }
    }
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        self.map.get(self.range.clone()).unwrap_or(&[])
    }
}

impl ObjFile {
    fn new(file: File, journal: Option<File>, journal_path: PathBuf, header: &JournalHeader, slots: Vec<Slot>) -> Arc<Self> {
        let header_line = serde_json::to_string(header).unwrap_or_default();
        let journal_lines = (slots.iter().filter(|s| s.present).count() as u64).into();
        Arc::new(ObjFile {
            file,
            journal: Mutex::new(journal),
            journal_path,
            header_line,
            journal_lines,
            slots: Mutex::new(slots),
            map: Default::default(),
            write: Mutex::new(()),
        })
    }

    /// Write `data` at `offset` of the file, one writer at a time.
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let _one = lock(&self.write);
        self.file.write_all_at(data, offset)
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared read-only mapping of the whole file, made on first use.
    fn mapping(&self) -> Option<Arc<memmap2::Mmap>> {
        self.map
            .get_or_init(|| {
                // SAFETY: the file is only written through this tier, in chunks not marked present
                // and not handed out; present chunks with live readers are never punched.
                unsafe { memmap2::Mmap::map(&self.file) }.ok().map(Arc::new)
            })
            .clone()
    }

    /// Bytes `within` (inside the chunk at `chunk`) of present chunk `index`, from the mapping,
    /// registered as a reader; with the slot as it was.
    fn view(self: &Arc<Self>, index: u64, chunk: Range<u64>, within: Range<u64>) -> Option<(Bytes, Slot)> {
        self.view_with(index, chunk, within, |s| s.present.then_some(()))
    }

    /// [`ObjFile::view`] of a chunk that `admit` accepts (it may change the slot), decided under
    /// the slot lock together with registering the reader.
    fn view_with(
        self: &Arc<Self>,
        index: u64,
        chunk: Range<u64>,
        within: Range<u64>,
        admit: impl FnOnce(&mut Slot) -> Option<()>,
    ) -> Option<(Bytes, Slot)> {
        let map = self.mapping()?;
        let (start, end) = (chunk.start + within.start, chunk.start + within.end);
        if within.end > chunk.end - chunk.start || end as usize > map.len() {
            return None;
        }
        let slot = {
            let mut slots = self.slots();
            let s = slots.get_mut(index as usize)?;
            admit(s)?;
            s.readers += 1;
            *s
        };
        let owner = MapSlice { map, range: start as usize..end as usize, file: self.clone(), index: index as usize };
        Some((Bytes::from_owner(owner), slot))
    }

    /// Append one journal line; a failure only costs the warm restart of this chunk.
    fn journal(&self, line: &str) {
        use std::io::Write;
        let mut journal = lock(&self.journal);
        let Some(j) = journal.as_mut() else { return };
        if let Err(e) = j.write_all(line.as_bytes()) {
            warn!(error = %e, "cache journal write failed");
        }
        let lines = self.journal_lines.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let chunks = self.slots().len() as u64;
        if lines > 2 * chunks + 64 {
            match self.rewrite_journal() {
                Ok(f) => *journal = Some(f),
                Err(e) => warn!(error = %e, path = %self.journal_path.display(), "cannot compact the cache journal"),
            }
        }
    }

    /// Write the journal whole from the slots (to a temporary file renamed over it).
    fn rewrite_journal(&self) -> io::Result<File> {
        let mut body = format!("{}\n", self.header_line);
        let mut n = 0;
        for (i, s) in self.slots().iter().enumerate().filter(|(_, s)| s.present) {
            body.push_str(&format!("+{i} {}\n", s.crc));
            n += 1;
        }
        let tmp = self.journal_path.with_extension(JOURNAL_TMP_SUFFIX.trim_start_matches('.'));
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, &self.journal_path)?;
        self.journal_lines.store(n, std::sync::atomic::Ordering::Relaxed);
        OpenOptions::new().append(true).open(&self.journal_path)
    }
}

fn open_journal(path: &Path, header: Option<&JournalHeader>) -> io::Result<File> {
    use std::io::Write;
    let mut f = OpenOptions::new().create(true).append(true).open(path)?;
    if let Some(h) = header {
        let mut line = serde_json::to_string(h).map_err(io::Error::other)?;
        line.push('\n');
        f.write_all(line.as_bytes())?;
    }
    Ok(f)
}

struct Index {
    lru: LruCache<ChunkKey, u64>,
    used: u64,
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
    /// Held (flock) for the tier's life: one agent per cache directory.
    _lock: File,
}

/// Name of the lock file in the cache directory (it holds the owner's pid).
pub const LOCK_FILE: &str = ".lock";

/// Take the cache directory for this process, or say which process has it.
fn lock_dir(dir: &Path) -> io::Result<File> {
    use std::io::{Read, Seek, Write};
    let mut f = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(dir.join(LOCK_FILE))?;
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

use crate::error::lock;

impl MemoryTier {
    /// Open the tier in `dir` (created if missing). Files of an earlier run stay until
    /// [`MemoryTier::recover`] reuses or removes them.
    /// Fails if another agent (process or tier) uses `dir`.
    pub fn new(dir: &Path, chunk_size: u64, capacity: u64, metrics: Arc<Metrics>) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
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
            _lock: lock,
        })
    }

    /// Keep each chunk's CRC-64 in `alg`, so a whole object can be checked against the origin's
    /// checksum without reading it again ([`MemoryTier::whole_crc64`]).
    pub fn with_crc64(mut self, alg: Option<crc_fast::CrcAlgorithm>) -> Self {
        self.crc64 = alg;
        self
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

    /// Drop every chunk of `obj` at once, pinned or read or not (its bytes are known bad).
    pub fn drop_object(&self, obj: &ObjectVersion) -> u64 {
        let Some(f) = self.existing(obj) else { return 0 };
        let mut gone = Vec::new();
        {
            let _pins = lock(&self.pins);
            let mut slots = f.slots();
            for (i, s) in slots.iter_mut().enumerate() {
                if s.present {
                    s.present = false;
                    s.fresh = 0;
                    let r = chunk_range(i as u64, obj.size, self.chunk_size);
                    punch(&f.file, r.start, r.end - r.start);
                    gone.push(i as u64);
                }
            }
        }
        let mut freed = 0;
        let mut idx = lock(&self.index);
        for i in &gone {
            f.journal(&format!("-{i}\n"));
            if let Some(len) = idx.lru.pop(&ChunkKey { object: obj.id.clone(), index: *i }) {
                idx.used -= len;
                freed += len;
            }
        }
        self.metrics.cache_bytes.set(idx.used as i64);
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

    /// Object versions with a cache file open here.
    pub fn open_files(&self) -> usize {
        lock(&self.files).len()
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    pub fn capacity(&self) -> u64 {
        self.capacity.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cache filesystem is full (ENOSPC) while a chunk of `len` reserved bytes was being
    /// written: the budget becomes what is held without it (the filesystem is smaller than the
    /// budget, or shared), and chunks are evicted to stay within it.
    fn out_of_space(&self, len: u64) {
        let victims = {
            let mut idx = lock(&self.index);
            let was = self.capacity();
            let now = idx.used.saturating_sub(len).min(was);
            self.capacity.store(now, std::sync::atomic::Ordering::Relaxed);
            self.metrics.cache_capacity_bytes.set(now as i64);
            warn!(dir = %self.dir.display(), was = %crate::size::format_size(was), now = %crate::size::format_size(now), "the cache directory's filesystem is full: cache budget lowered (free space there, or give it a bigger tmpfs, and restart to raise it)");
            self.choose_victims(&mut idx)
        };
        let kept = self.evict(victims);
        put_back(&mut lock(&self.index), kept);
    }

    /// Bytes of chunks held now.
    pub fn used(&self) -> u64 {
        lock(&self.index).used
    }

    /// Path of the data file of `obj` (whether or not it exists).
    pub fn file_path(&self, obj: &ObjectVersion) -> PathBuf {
        self.dir.join(format!("{}{DATA_SUFFIX}", obj.id))
    }

    fn journal_path(&self, obj: &ObjectVersion) -> PathBuf {
        self.dir.join(format!("{}{JOURNAL_SUFFIX}", obj.id))
    }

    fn header(&self, obj: &ObjectVersion) -> JournalHeader {
        JournalHeader { v: 1, key: obj.key.clone(), size: obj.size, chunk_size: self.chunk_size }
    }

    /// Reuse what an earlier run left in the cache directory for the versions in `versions`:
    /// replay each journal, re-verify every chunk's crc32c against the data, keep what matches
    /// (within the budget), and remove everything else.
    pub fn recover(&self, versions: &[Arc<ObjectVersion>]) -> io::Result<Recovered> {
        let mut r = Recovered::default();
        let by_id: HashMap<&str, &Arc<ObjectVersion>> = versions.iter().map(|v| (v.id.as_ref(), v)).collect();
        let mut keep: std::collections::HashSet<String> = Default::default();
        for entry in std::fs::read_dir(&self.dir)? {
            let name = entry?.file_name().to_string_lossy().to_string();
            let Some(id) = name.strip_suffix(JOURNAL_SUFFIX) else { continue };
            let Some(obj) = by_id.get(id) else { continue };
            match self.recover_one(obj, &mut r) {
                Ok(true) => {
                    keep.insert(format!("{id}{DATA_SUFFIX}"));
                    keep.insert(name.clone());
                    r.objects += 1;
                }
                Ok(false) => {}
                Err(e) => warn!(key = %obj.key, error = %e, "cannot reuse cached chunks; dropping them"),
            }
        }
        for entry in std::fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().to_string();
            let ours = name.ends_with(DATA_SUFFIX) || name.ends_with(JOURNAL_SUFFIX) || name.ends_with(JOURNAL_TMP_SUFFIX);
            if ours && !keep.contains(&name) {
                std::fs::remove_file(entry.path())?;
                r.removed_files += 1;
            }
        }
        // The budget holds after a restart too (the budget may have shrunk).
        let victims = {
            let mut idx = lock(&self.index);
            let victims = self.choose_victims(&mut idx);
            self.metrics.cache_bytes.set(idx.used as i64);
            victims
        };
        let kept = self.evict(victims);
        put_back(&mut lock(&self.index), kept);
        Ok(r)
    }

    /// Returns Ok(false) if the files do not belong to this version and chunk size.
    fn recover_one(&self, obj: &Arc<ObjectVersion>, r: &mut Recovered) -> io::Result<bool> {
        let text = std::fs::read_to_string(self.journal_path(obj))?;
        let mut lines = text.lines();
        let header: Option<JournalHeader> = lines.next().and_then(|l| serde_json::from_str(l).ok());
        let Some(h) = header else { return Ok(false) };
        if h.v != 1 || h.size != obj.size || h.chunk_size != self.chunk_size || h.key != obj.key {
            return Ok(false);
        }
        let n = chunk_count(obj.size, self.chunk_size);
        let mut present: std::collections::BTreeMap<u64, u32> = Default::default();
        for line in lines {
            // A torn last line (crash mid-append) does not parse and is ignored.
            if let Some(rest) = line.strip_prefix('+') {
                let mut it = rest.split(' ');
                if let (Some(Ok(i)), Some(Ok(c))) = (it.next().map(str::parse::<u64>), it.next().map(str::parse::<u32>)) {
                    if i < n {
                        present.insert(i, c);
                    }
                }
            } else if let Some(Ok(i)) = line.strip_prefix('-').map(str::parse::<u64>) {
                present.remove(&i);
            }
        }
        let file = OpenOptions::new().read(true).write(true).open(self.file_path(obj))?;
        if file.metadata()?.len() != obj.size {
            return Ok(false);
        }
        // SAFETY: nothing else writes the file during recovery (the agent has not started serving).
        let map = unsafe { memmap2::Mmap::map(&file) }?;
        let mut slots = vec![Slot::default(); n as usize];
        let mut good = Vec::new();
        for (i, crc) in present {
            let cr = chunk_range(i, obj.size, self.chunk_size);
            let ok = map.get(cr.start as usize..cr.end as usize).is_some_and(|b| crc32c::crc32c(b) == crc);
            if ok {
                if let Some(s) = slots.get_mut(i as usize) {
                    let crc64 = match (self.crc64, map.get(cr.start as usize..cr.end as usize)) {
                        (Some(alg), Some(b)) => crc_fast::checksum(alg, b),
                        _ => 0,
                    };
                    *s = Slot { present: true, crc, crc64, ..Slot::default() };
                }
                good.push((i, crc, cr.end - cr.start));
            } else {
                punch(&file, cr.start, cr.end - cr.start);
                r.dropped += 1;
                warn!(key = %obj.key, index = i, "cached chunk does not match its checksum; dropped");
            }
        }
        drop(map);
        // Pages written before a crash but never journaled go back to the kernel.
        for i in (0..n).filter(|i| slots.get(*i as usize).is_some_and(|s| !s.present)) {
            let cr = chunk_range(i, obj.size, self.chunk_size);
            punch(&file, cr.start, cr.end - cr.start);
        }
        // The journal is rewritten with what is really there.
        let f = ObjFile::new(file, None, self.journal_path(obj), &self.header(obj), slots);
        *lock(&f.journal) = Some(f.rewrite_journal()?);
        lock(&self.files).insert(obj.id.clone(), f);
        let mut idx = lock(&self.index);
        for (i, _, len) in good {
            idx.lru.put(ChunkKey { object: obj.id.clone(), index: i }, len);
            idx.used += len;
            r.chunks += 1;
            r.bytes += len;
        }
        Ok(true)
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
        let file = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(self.file_path(obj))?;
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

    /// Pin `obj` if every chunk of it is present: until [`MemoryTier::unpin`], none is evicted.
    pub fn pin_if_complete(&self, obj: &ObjectVersion) -> bool {
        let mut pins = lock(&self.pins);
        if obj.size == 0 || !self.is_complete(obj) {
            return false;
        }
        *pins.entry(obj.id.clone()).or_default() += 1;
        true
    }

    pub fn unpin(&self, obj: &ObjectVersion) {
        let mut pins = lock(&self.pins);
        if let Some(n) = pins.get_mut(&obj.id) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&obj.id);
            }
        }
    }

    /// Whether `obj` is pinned now.
    pub fn is_pinned(&self, obj: &ObjectVersion) -> bool {
        lock(&self.pins).contains_key(&obj.id)
    }

    /// Whether every chunk of `obj` is present.
    pub fn is_complete(&self, obj: &ObjectVersion) -> bool {
        if obj.size == 0 {
            return true;
        }
        self.existing(obj).is_some_and(|f| f.slots().iter().all(|s| s.present))
    }

    /// Bytes `within` of chunk `index` of `obj`, if present, and whom to credit them to.
    pub fn read(&self, obj: &ObjectVersion, index: u64, within: Range<u64>) -> Option<(Bytes, Credit)> {
        let chunk = chunk_range(index, obj.size, self.chunk_size);
        if within.is_empty() {
            return None;
        }
        let f = self.existing(obj)?;
        let (bytes, _) = f.view(index, chunk, within)?;
        let credit = {
            let mut slots = f.slots();
            let s = slots.get_mut(index as usize)?;
            take_fresh(s, bytes.len() as u64)
        };
        let key = ChunkKey { object: obj.id.clone(), index };
        lock(&self.index).lru.promote(&key);
        Some((bytes, credit))
    }

    /// Bytes of chunk `index` that were filled for no local reader (a peer, `warm`): local reads
    /// of them count as memory hits.
    pub fn settle(&self, obj: &ObjectVersion, index: u64) {
        if let Some(f) = self.existing(obj) {
            if let Some(s) = f.slots().get_mut(index as usize) {
                s.fresh = 0;
            }
        }
    }

    /// Store the whole chunk `index` of `obj`. `Ok(false)` if it was not stored (already present,
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
        let chunk = chunk_range(index, obj.size, self.chunk_size);
        let len = chunk.end - chunk.start;
        if len > self.capacity() || len == 0 {
            return Ok(None);
        }
        let f = self.open_file(obj)?;
        {
            let mut slots = f.slots();
            let Some(s) = slots.get_mut(index as usize) else { return Ok(None) };
            if s.present || s.writing {
                return Ok(None);
            }
            s.writing = true;
        }
        // Dropped unreserved, it only clears `writing`.
        let key = ChunkKey { object: obj.id.clone(), index };
        let crc64 = self.crc64.map(crc_fast::Digest::new);
        let mut fill = Fill { tier: self.clone(), file: f, key, chunk, written: 0, crc: 0, crc64, reserved: false, staged: Vec::new() };
        fill.reserved = self.reserve(len);
        Ok(fill.reserved.then_some(fill))
    }

    /// Make room for `len` more bytes, evicting least recently used chunks. Pinned and read
    /// chunks are passed over; false (nothing reserved) if room cannot be made: the budget is a
    /// hard limit, and the tmpfs files never hold more than it, even briefly.
    fn reserve(&self, len: u64) -> bool {
        let (victims, fits) = {
            let mut idx = lock(&self.index);
            idx.used += len;
            let victims = self.choose_victims(&mut idx);
            let fits = idx.used <= self.capacity();
            if !fits {
                idx.used -= len;
            }
            self.metrics.cache_bytes.set(idx.used as i64);
            (victims, fits)
        };
        let kept = self.evict(victims);
        // Victims that could not go come back, and the reservation is kept only if it still
        // fits: in one step, so the bytes held are never over the budget, even briefly.
        let mut idx = lock(&self.index);
        put_back(&mut idx, kept);
        // `fits` false: the reservation was already given back above.
        if fits && idx.used > self.capacity() {
            idx.used -= len;
            self.metrics.cache_bytes.set(idx.used as i64);
            return false;
        }
        self.metrics.cache_bytes.set(idx.used as i64);
        fits
    }

    /// Take least recently used chunks out of the index until the budget holds, passing over
    /// pinned ones (in use through an open file). If the budget cannot be met without them,
    /// nothing is taken: evicting everything else would still not make room. The caller punches
    /// the holes with [`MemoryTier::evict`], outside the index lock.
    fn choose_victims(&self, idx: &mut Index) -> Vec<(ChunkKey, u64)> {
        let over = idx.used.saturating_sub(self.capacity());
        if over == 0 {
            return Vec::new();
        }
        let pins = lock(&self.pins);
        let mut chosen = Vec::new();
        let mut freed = 0;
        for (k, l) in idx.lru.iter().rev() {
            if freed >= over {
                break;
            }
            if !pins.contains_key(&k.object) {
                chosen.push(k.clone());
                freed += l;
            }
        }
        if freed < over {
            return Vec::new();
        }
        let victims: Vec<(ChunkKey, u64)> = chosen.into_iter().filter_map(|k| idx.lru.pop_entry(&k)).collect();
        idx.used -= victims.iter().map(|(_, l)| l).sum::<u64>();
        victims
    }

    /// Punch the victims' holes; returns those that could not go (pinned, or read since they
    /// were chosen), for the caller to put back.
    fn evict(&self, victims: Vec<(ChunkKey, u64)>) -> Vec<(ChunkKey, u64)> {
        let mut kept = Vec::new();
        for (key, len) in victims {
            let Some(f) = lock(&self.files).get(&key.object).cloned() else { continue };
            // The pins lock is held until the hole is punched, so `pin_if_complete` never sees a
            // chunk that is about to go; the slot lock, so no reader view starts meanwhile.
            let pins = lock(&self.pins);
            let mut slots = f.slots();
            let Some(s) = slots.get_mut(key.index as usize) else { continue };
            if pins.contains_key(&key.object) || s.readers > 0 {
                kept.push((key, len));
                continue;
            }
            s.present = false;
            // The hole is punched under the slot lock so a refill cannot start before it.
            let start = key.index * self.chunk_size;
            punch(&f.file, start, self.chunk_size);
            drop((slots, pins));
            f.journal(&format!("-{}\n", key.index));
            self.metrics.evictions.inc();
        }
        kept
    }

    /// A present chunk as `Bytes` pointing into the file's mapping (no copy), with the crc32c
    /// recorded when it was stored. The chunk is not evicted while the bytes are alive.
    pub fn map_chunk(&self, obj: &ObjectVersion, index: u64) -> Option<(Bytes, u32)> {
        let f = self.existing(obj)?;
        let chunk = chunk_range(index, obj.size, self.chunk_size);
        let (bytes, slot) = f.view(index, chunk.clone(), 0..chunk.end - chunk.start)?;
        let key = ChunkKey { object: obj.id.clone(), index };
        lock(&self.index).lru.promote(&key);
        Some((bytes, slot.crc))
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

/// A chunk being written into the tier (see [`MemoryTier::begin_fill`]): bytes are written in
/// order with [`Fill::write`]; [`Fill::commit`] makes the chunk present if the crc32c of what was
/// written matches. Dropped uncommitted, it punches what was written and gives the room back.
pub struct Fill {
    tier: Arc<MemoryTier>,
    file: Arc<ObjFile>,
    key: ChunkKey,
    chunk: Range<u64>,
    /// Bytes taken (written to the file, or staged).
    written: u64,
    crc: u32,
    /// The chunk's CRC-64 so far, when the tier keeps them.
    crc64: Option<crc_fast::Digest>,
    reserved: bool,
    /// Small pieces (an HTTP body arrives in a few KiB at a time) gathered into larger writes.
    staged: Vec<u8>,
}

/// Writes smaller than this are staged and written together.
const STAGE_BYTES: usize = 1 << 20;

impl Fill {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes of the chunk still to be written.
    pub fn remaining(&self) -> u64 {
        (self.chunk.end - self.chunk.start) - self.written
    }

    /// crc32c of the bytes written so far.
    pub fn crc(&self) -> u32 {
        self.crc
    }

    /// Append `data` to the chunk (never past its end).
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if data.len() as u64 > self.remaining() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "more bytes than the chunk holds"));
        }
        self.crc = crc32c::crc32c_append(self.crc, data);
        if let Some(d) = &mut self.crc64 {
            d.update(data);
        }
        self.written += data.len() as u64;
        if self.staged.is_empty() && data.len() >= STAGE_BYTES {
            let r = self.file.write_at(data, self.chunk.start + self.written - data.len() as u64);
            return self.full(r);
        }
        if self.staged.capacity() == 0 {
            self.staged.reserve_exact(STAGE_BYTES);
        }
        self.staged.extend_from_slice(data);
        if self.staged.len() >= STAGE_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Write what is staged.
    fn flush(&mut self) -> io::Result<()> {
        if !self.staged.is_empty() {
            let at = self.chunk.start + self.written - self.staged.len() as u64;
            let r = self.file.write_at(&self.staged, at);
            self.full(r)?;
            self.staged.clear();
        }
        Ok(())
    }

    /// A write that found the filesystem full lowers the tier's budget (see `out_of_space`).
    fn full(&self, r: io::Result<()>) -> io::Result<()> {
        if let Err(e) = &r {
            if e.raw_os_error() == Some(libc::ENOSPC) && self.reserved {
                self.tier.out_of_space(self.chunk.end - self.chunk.start);
            }
        }
        r
    }

    /// Start the chunk over (a source retries from its start).
    pub fn restart(&mut self) {
        self.written = 0;
        self.crc = 0;
        if let Some(d) = &mut self.crc64 {
            d.reset();
        }
        self.staged.clear();
    }

    /// Make the chunk present if it is whole and its crc32c is `crc`; its bytes count for
    /// `source` on their first local read. Returns them (a view of the mapping).
    pub fn commit(mut self, crc: u32, source: Tier) -> io::Result<Bytes> {
        self.flush()?;
        if self.remaining() != 0 || self.crc != crc {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk incomplete or checksum mismatch"));
        }
        let (index, len) = (self.key.index, self.chunk.end - self.chunk.start);
        let crc64 = self.crc64.as_ref().map(|d| d.finalize()).unwrap_or(0);
        // Present and handed out in one step, so it cannot be evicted before the caller has it.
        let present = |s: &mut Slot| {
            *s = Slot { present: true, writing: false, crc, crc64, fresh: len, source: Some(source), readers: s.readers };
            Some(())
        };
        let view = self.file.view_with(index, self.chunk.clone(), 0..len, present);
        let Some((bytes, _)) = view else { return Err(io::Error::other("cannot map the cache file")) };
        self.file.journal(&format!("+{index} {crc}\n"));
        {
            let mut idx = lock(&self.tier.index);
            idx.lru.put(self.key.clone(), len);
            self.tier.metrics.cache_bytes.set(idx.used as i64);
        }
        self.reserved = false;
        Ok(bytes)
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if !self.reserved {
            // Committed (or never given room): only a failed commit may leave `writing` set.
            if let Some(s) = self.file.slots().get_mut(self.key.index as usize) {
                s.writing = false;
            }
            return;
        }
        let len = self.chunk.end - self.chunk.start;
        punch(&self.file.file, self.chunk.start, len);
        if let Some(s) = self.file.slots().get_mut(self.key.index as usize) {
            s.writing = false;
        }
        let mut idx = lock(&self.tier.index);
        idx.used -= len;
        self.tier.metrics.cache_bytes.set(idx.used as i64);
    }
}

/// Return chunks that could not be evicted to the index.
fn put_back(idx: &mut Index, kept: Vec<(ChunkKey, u64)>) {
    for (k, l) in kept {
        idx.used += l;
        idx.lru.put(k, l);
    }
}

fn punch(file: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on an owned, open fd with in-range arguments has no memory effects.
    let rc = unsafe {
        libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as libc::off_t, len as libc::off_t)
    };
    if rc != 0 {
        warn!(error = %io::Error::last_os_error(), "punching a hole in the cache file failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::path::Path as OPath;
    use std::time::SystemTime;

    fn obj(size: u64) -> ObjectVersion {
        obj_named("f", size)
    }

    fn obj_named(key: &str, size: u64) -> ObjectVersion {
        ObjectVersion::new(key.into(), OPath::from(key), Some("e".into()), None, size, SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn whole_crc64_is_combined_from_chunks_and_dropped_objects_are_gone() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        for alg in [crc_fast::CrcAlgorithm::Crc64Nvme, crc_fast::CrcAlgorithm::Crc64Xz] {
            let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 16 * 4096, m.clone()).unwrap().with_crc64(Some(alg)));
            let o = obj(3 * 4096 + 77);
            let data: Vec<u8> = (0..o.size).map(|i| (i * 7 % 253) as u8).collect();
            for i in [2u64, 0, 3] {
                let r = chunk_range(i, o.size, 4096);
                tier.insert(&o, i, &data[r.start as usize..r.end as usize], Tier::peer).unwrap();
            }
            assert_eq!(tier.whole_crc64(&o), None, "not whole yet");
            let r = chunk_range(1, o.size, 4096);
            tier.insert(&o, 1, &data[r.start as usize..r.end as usize], Tier::origin).unwrap();
            assert_eq!(tier.whole_crc64(&o), Some((crc_fast::checksum(alg, &data), true)));
            assert_eq!(tier.drop_object(&o), o.size);
            assert!(!tier.contains(&o, 0) && !tier.contains(&o, 3));
            assert_eq!(tier.used(), 0);
        }
    }

    #[test]
    fn insert_read_evict_budget() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 3 * 4096, m.clone()).unwrap());
        let o = obj(5 * 4096 + 10);
        let data: Vec<u8> = (0..o.size).map(|i| (i % 251) as u8).collect();
        for i in 0..6u64 {
            let r = chunk_range(i, o.size, 4096);
            assert!(tier.insert(&o, i, &data[r.start as usize..r.end as usize], Tier::origin).unwrap());
            assert!(tier.used() <= tier.capacity());
        }
        // The first chunks were evicted; the last three are present.
        assert!(!tier.contains(&o, 0) && !tier.contains(&o, 2));
        assert!(tier.contains(&o, 3) && tier.contains(&o, 5));
        assert_eq!(tier.read(&o, 0, 0..10), None);
        let (b, credit) = tier.read(&o, 5, 2..10).unwrap();
        assert_eq!(&b[..], &data[5 * 4096 + 2..5 * 4096 + 10]);
        assert_eq!(credit, Credit { source: Tier::origin, source_bytes: 8 });
        // Only the chunk's own length is ever credited to the filling tier.
        assert_eq!(tier.read(&o, 4, 0..4096).unwrap().1.source_bytes, 4096);
        assert_eq!(tier.read(&o, 4, 0..4096).unwrap().1.source_bytes, 0);
        assert_eq!(tier.read(&o, 5, 2..11), None, "past the end of the chunk");
        assert_eq!(m.evictions.get(), 3);
        // The punched range really holds no pages.
        let blocks = std::fs::metadata(tier.file_path(&o)).map(|md| std::os::unix::fs::MetadataExt::blocks(&md)).unwrap();
        assert!(blocks * 512 <= 3 * 4096 + 4096, "blocks {blocks}");
        assert_eq!(tier.crc(&o, 4), Some(crc32c::crc32c(&data[4 * 4096..5 * 4096])));
        assert!(tier.insert(&o, 0, &data[..10], Tier::origin).is_err(), "wrong length is refused");
    }

    #[test]
    fn the_journal_stays_small_and_recovery_reclaims_what_it_does_not_name() {
        let dir = tempfile::tempdir().unwrap();
        let o = obj(4 * 4096);
        {
            let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 2 * 4096, Arc::new(Metrics::new())).unwrap());
            // Thousands of fills and evictions of four chunks.
            for round in 0..2000u64 {
                let i = round % 4;
                tier.insert(&o, i, &[i as u8; 4096], Tier::origin).unwrap();
            }
            let journal = std::fs::metadata(tier.journal_path(&o)).unwrap().len();
            assert!(journal < 4096, "the journal grew to {journal} bytes");
            // A crash: chunk 0's pages written but never journaled, a temporary journal left.
            assert!(!tier.contains(&o, 0));
            tier.files.lock().unwrap()[&o.id].file.write_all_at(&[9u8; 4096], 0).unwrap();
            std::fs::write(dir.path().join(format!("{}.journal.tmp", o.id)), "torn").unwrap();
        }
        let tier = MemoryTier::new(dir.path(), 4096, 2 * 4096, Arc::new(Metrics::new())).unwrap();
        let r = tier.recover(&[Arc::new(o.clone())]).unwrap();
        assert_eq!(r.chunks, 2);
        assert!(!dir.path().join(format!("{}.journal.tmp", o.id)).exists());
        let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(tier.file_path(&o)).unwrap());
        assert!(blocks * 512 <= 2 * 4096, "unjournaled pages were kept: {blocks} blocks");
        assert_eq!(tier.read(&o, 3, 0..4096).map(|(b, _)| b.to_vec()), Some(vec![3u8; 4096]));
    }

    #[test]
    fn a_chunk_being_streamed_is_not_punched_or_refilled() {
        let dir = tempfile::tempdir().unwrap();
        let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 2 * 4096, Arc::new(Metrics::new())).unwrap());
        let o = obj(4 * 4096);
        tier.insert(&o, 0, &[1u8; 4096], Tier::origin).unwrap();
        // A peer stream holds chunk 0's bytes (a view of the mapping, no copy).
        let (streaming, crc) = tier.map_chunk(&o, 0).unwrap();
        for i in 1..4u64 {
            tier.insert(&o, i, &[i as u8 + 1; 4096], Tier::origin).unwrap();
        }
        assert!(tier.contains(&o, 0), "a chunk being streamed was evicted");
        assert!(streaming.iter().all(|b| *b == 1) && crc == crc32c::crc32c(&[1u8; 4096]));
        assert!(tier.used() <= tier.capacity());
        drop(streaming);
        tier.insert(&o, 1, &[2u8; 4096], Tier::origin).unwrap();
        tier.insert(&o, 2, &[3u8; 4096], Tier::origin).unwrap();
        assert!(!tier.contains(&o, 0), "once the stream is done the chunk can go");
    }

    #[test]
    fn one_tier_per_directory() {
        let dir = tempfile::tempdir().unwrap();
        let first = MemoryTier::new(dir.path(), 4096, 4096, Arc::new(Metrics::new())).unwrap();
        let e = MemoryTier::new(dir.path(), 4096, 4096, Arc::new(Metrics::new())).err().expect("a second tier on one directory");
        assert!(e.to_string().contains(&format!("in use by another cachefs agent (pid {})", std::process::id())), "{e}");
        drop(first);
        MemoryTier::new(dir.path(), 4096, 4096, Arc::new(Metrics::new())).expect("free again once the first is gone");
    }

    #[test]
    fn pinned_files_do_not_wipe_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 4 * 4096, Arc::new(Metrics::new())).unwrap());
        let (a, b, c) = (obj_named("a", 3 * 4096 + 2048), obj_named("b", 1024), obj_named("c", 4096));
        for i in 0..4u64 {
            let r = chunk_range(i, a.size, 4096);
            assert!(tier.insert(&a, i, &vec![1u8; (r.end - r.start) as usize], Tier::origin).unwrap());
        }
        assert!(tier.insert(&b, 0, &[2u8; 1024], Tier::origin).unwrap());
        assert!(tier.pin_if_complete(&a));
        // Room for c needs 3072 bytes: evicting all of b (1024) would not make it.
        assert!(!tier.insert(&c, 0, &[3u8; 4096], Tier::origin).unwrap());
        assert!(tier.contains(&b, 0), "b was evicted for nothing");
        assert_eq!(tier.used(), a.size + b.size);
        // Unpinned, a's oldest chunk makes room.
        tier.unpin(&a);
        assert!(tier.insert(&c, 0, &[3u8; 4096], Tier::origin).unwrap());
        assert!(!tier.contains(&a, 0) && tier.contains(&b, 0) && tier.contains(&c, 0));
    }

    #[test]
    fn chunk_larger_than_budget_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let tier = Arc::new(MemoryTier::new(dir.path(), 4096, 1000, Arc::new(Metrics::new())).unwrap());
        let o = obj(4096);
        assert!(!tier.insert(&o, 0, &[1u8; 4096], Tier::origin).unwrap());
        assert_eq!(tier.used(), 0);
    }
}
