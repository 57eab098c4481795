//! The memory tier: one sparse file per object version in the cache directory (tmpfs), filled
//! chunk by chunk, with an LRU index of chunks under a byte budget.
//!
//! # Contract
//! - [`MemoryTier::read`] returns `Some` only with bytes of a chunk that was fully written and
//!   whose crc32c was recorded, and that was not evicted while it was being read; otherwise
//!   `None` (a miss, never an error and never zeros from a punched hole).
//! - [`MemoryTier::insert`] stores a whole chunk; when it returns, the bytes held are within the
//!   budget. A chunk larger than the whole budget is not stored (`Ok(false)`).
//! - Eviction punches a hole in the file (`fallocate(PUNCH_HOLE)`), so tmpfs pages go back to
//!   the kernel. File I/O and hole punching happen outside the index lock.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use lru::LruCache;
use tracing::warn;

use super::chunk::{chunk_count, chunk_range, ChunkKey};
use crate::catalog::ObjectVersion;
use crate::metrics::{Metrics, Tier};

/// Suffix of the memory tier's data files in the cache directory.
pub const DATA_SUFFIX: &str = ".chunks";
/// Suffix of each data file's journal: a JSON header line, then `+INDEX CRC` once a chunk is
/// fully written and `-INDEX` once it is evicted. Replayed (and every chunk re-verified) at start.
pub const JOURNAL_SUFFIX: &str = ".journal";

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
    epoch: u64,
    crc: u32,
    /// Bytes of this chunk not yet served since it was filled: they count for `source`.
    fresh: u64,
    source: Option<Tier>,
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
    slots: Mutex<Vec<Slot>>,
    /// A shared read-only mapping of the whole file, made on first use (peer serving).
    map: std::sync::OnceLock<Option<Arc<memmap2::Mmap>>>,
}

/// A range of a mapping, owned: lets `Bytes` point into the tmpfs file without a copy.
struct MapSlice {
    map: Arc<memmap2::Mmap>,
    range: Range<usize>,
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        self.map.get(self.range.clone()).unwrap_or(&[])
    }
}

impl ObjFile {
    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Append one journal line; a failure only costs the warm restart of this chunk.
    fn journal(&self, line: &str) {
        use std::io::Write;
        if let Some(j) = lock(&self.journal).as_mut() {
            if let Err(e) = j.write_all(line.as_bytes()) {
                warn!(error = %e, "cache journal write failed");
            }
        }
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
    capacity: u64,
    index: Mutex<Index>,
    files: Mutex<HashMap<Arc<str>, Arc<ObjFile>>>,
    /// Object versions whose chunks must not be evicted (open passthrough handles read the
    /// tmpfs file directly: a hole would read as zeros), with a count per version.
    pins: Mutex<HashMap<Arc<str>, usize>>,
    metrics: Arc<Metrics>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl MemoryTier {
    /// Open the tier in `dir` (created if missing). Files of an earlier run stay until
    /// [`MemoryTier::recover`] reuses or removes them.
    pub fn new(dir: &Path, chunk_size: u64, capacity: u64, metrics: Arc<Metrics>) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        metrics.cache_capacity_bytes.set(capacity as i64);
        metrics.cache_bytes.set(0);
        Ok(MemoryTier {
            dir: dir.to_path_buf(),
            chunk_size,
            capacity,
            index: Mutex::new(Index { lru: LruCache::unbounded(), used: 0 }),
            files: Mutex::new(HashMap::new()),
            pins: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    pub fn chunk_size(&self) -> u64 {
        self.chunk_size
    }

    pub fn capacity(&self) -> u64 {
        self.capacity
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
            if (name.ends_with(DATA_SUFFIX) || name.ends_with(JOURNAL_SUFFIX)) && !keep.contains(&name) {
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
        self.evict(victims);
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
                    *s = Slot { present: true, epoch: 1, crc, ..Slot::default() };
                }
                good.push((i, crc, cr.end - cr.start));
            } else {
                punch(&file, cr.start, cr.end - cr.start);
                r.dropped += 1;
                warn!(key = %obj.key, index = i, "cached chunk does not match its checksum; dropped");
            }
        }
        drop(map);
        // Rewrite the journal with what is really there.
        let tmp = self.dir.join(format!("{}{JOURNAL_SUFFIX}.tmp", obj.id));
        {
            use std::io::Write;
            let mut j = open_journal(&tmp, Some(&self.header(obj)))?;
            let mut body = String::new();
            for (i, crc, _) in &good {
                body.push_str(&format!("+{i} {crc}\n"));
            }
            j.write_all(body.as_bytes())?;
        }
        std::fs::rename(&tmp, self.journal_path(obj))?;
        let journal = open_journal(&self.journal_path(obj), None).ok();
        let f = Arc::new(ObjFile { file, journal: Mutex::new(journal), slots: Mutex::new(slots), map: std::sync::OnceLock::new() });
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
        let journal = match std::fs::remove_file(self.journal_path(obj)).or_else(|e| if e.kind() == io::ErrorKind::NotFound { Ok(()) } else { Err(e) }) {
            Ok(()) => open_journal(&self.journal_path(obj), Some(&self.header(obj))).ok(),
            Err(_) => None,
        };
        if journal.is_none() {
            warn!(key = %obj.key, "cannot write the cache journal: this object's chunks will not survive a restart");
        }
        let n = chunk_count(obj.size, self.chunk_size) as usize;
        let f = Arc::new(ObjFile { file, journal: Mutex::new(journal), slots: Mutex::new(vec![Slot::default(); n]), map: std::sync::OnceLock::new() });
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
        if within.end > chunk.end - chunk.start || within.is_empty() {
            return None;
        }
        let (f, slot) = self.present(obj, index)?;
        let epoch = slot.epoch;
        let mut buf = BytesMut::zeroed((within.end - within.start) as usize);
        if let Err(e) = f.file.read_exact_at(&mut buf, chunk.start + within.start) {
            warn!(key = %obj.key, index, error = %e, "memory tier read failed; treating as a miss");
            return None;
        }
        // Still present and not evicted (then re-filled) while we read: the bytes are good.
        let credit = {
            let mut slots = f.slots();
            let s = slots.get_mut(index as usize)?;
            if !(s.present && s.epoch == epoch) {
                return None;
            }
            take_fresh(s, buf.len() as u64)
        };
        let key = ChunkKey { object: obj.id.clone(), index };
        lock(&self.index).lru.promote(&key);
        Some((buf.freeze(), credit))
    }

    /// Credit `n` bytes of chunk `index` served straight from a fetch (not read back from the
    /// file). Before the chunk is stored they count for `fetched_from` and are added to
    /// `served_early`, which [`MemoryTier::insert`] subtracts from the chunk's fresh bytes; after,
    /// they draw on the fresh bytes like any read. Both sides decide under the chunk's lock, so
    /// no byte is credited twice.
    pub fn credit(&self, obj: &ObjectVersion, index: u64, n: u64, fetched_from: Tier, served_early: &AtomicU64) -> Credit {
        let early = Credit { source: fetched_from, source_bytes: n };
        let Ok(f) = self.open_file(obj) else { return early };
        let mut slots = f.slots();
        match slots.get_mut(index as usize) {
            Some(s) if s.present => take_fresh(s, n),
            _ => {
                served_early.fetch_add(n, Ordering::SeqCst);
                early
            }
        }
    }

    /// Store the whole chunk `index` of `obj`. `Ok(false)` if it was not stored (already present,
    /// being written by someone else, or larger than the budget).
    pub fn insert(&self, obj: &ObjectVersion, index: u64, data: &[u8], source: Tier, served_early: &AtomicU64) -> io::Result<bool> {
        let chunk = chunk_range(index, obj.size, self.chunk_size);
        let len = chunk.end - chunk.start;
        if data.len() as u64 != len {
            return Err(io::Error::new(io::ErrorKind::InvalidData, format!("chunk {index} of {} has {} bytes, expected {len}", obj.key, data.len())));
        }
        if len > self.capacity || len == 0 {
            return Ok(false);
        }
        let f = self.open_file(obj)?;
        {
            let mut slots = f.slots();
            let Some(s) = slots.get_mut(index as usize) else { return Ok(false) };
            if s.present || s.writing {
                return Ok(false);
            }
            s.writing = true;
        }
        // Make room first, so the tmpfs files never hold more than the budget, even briefly.
        // Pinned chunks are passed over; if no room can be made (the rest is pinned or being
        // written), the chunk is not stored: the budget is a hard limit.
        let (victims, fits) = {
            let mut idx = lock(&self.index);
            idx.used += len;
            let victims = self.choose_victims(&mut idx);
            let fits = idx.used <= self.capacity;
            if !fits {
                idx.used -= len;
            }
            self.metrics.cache_bytes.set(idx.used as i64);
            (victims, fits)
        };
        self.evict(victims);
        if !fits {
            if let Some(s) = f.slots().get_mut(index as usize) {
                s.writing = false;
            }
            return Ok(false);
        }
        let crc = crc32c::crc32c(data);
        let written = f.file.write_all_at(data, chunk.start);
        {
            let mut slots = f.slots();
            if let Some(s) = slots.get_mut(index as usize) {
                s.writing = false;
                if written.is_ok() {
                    s.present = true;
                    s.crc = crc;
                    s.epoch += 1;
                    s.fresh = len.saturating_sub(served_early.load(Ordering::SeqCst));
                    s.source = Some(source);
                }
            }
        }
        if written.is_ok() {
            f.journal(&format!("+{index} {crc}\n"));
        }
        let mut idx = lock(&self.index);
        match written {
            Ok(()) => {
                idx.lru.put(ChunkKey { object: obj.id.clone(), index }, len);
                self.metrics.cache_bytes.set(idx.used as i64);
                Ok(true)
            }
            Err(e) => {
                idx.used -= len;
                self.metrics.cache_bytes.set(idx.used as i64);
                drop(idx);
                punch(&f.file, chunk.start, len);
                Err(e)
            }
        }
    }

    /// Take least recently used chunks out of the index until the budget holds, passing over
    /// pinned ones (they go back as most recently used: they are in use through an open file).
    /// The caller punches their holes with [`MemoryTier::evict`], outside the index lock.
    fn choose_victims(&self, idx: &mut Index) -> Vec<(ChunkKey, u64)> {
        let pins = lock(&self.pins);
        let mut victims = Vec::new();
        let mut skipped = Vec::new();
        while idx.used > self.capacity {
            match idx.lru.pop_lru() {
                Some((k, l)) if pins.contains_key(&k.object) => skipped.push((k, l)),
                Some((k, l)) => {
                    idx.used -= l;
                    victims.push((k, l));
                }
                None => break,
            }
        }
        for (k, l) in skipped {
            idx.lru.put(k, l);
        }
        victims
    }

    fn evict(&self, victims: Vec<(ChunkKey, u64)>) {
        for (key, len) in victims {
            let Some(f) = lock(&self.files).get(&key.object).cloned() else { continue };
            // Pinned since it was chosen: put it back instead. The pins lock is held until the
            // hole is punched, so `pin_if_complete` never sees a chunk that is about to go.
            let pins = lock(&self.pins);
            if pins.contains_key(&key.object) {
                drop(pins);
                let mut idx = lock(&self.index);
                idx.used += len;
                idx.lru.put(key, len);
                continue;
            }
            let mut slots = f.slots();
            let Some(s) = slots.get_mut(key.index as usize) else { continue };
            s.present = false;
            s.epoch += 1;
            // The hole is punched under the slot lock so a refill cannot start before it.
            let start = key.index * self.chunk_size;
            punch(&f.file, start, self.chunk_size);
            drop(slots);
            f.journal(&format!("-{}\n", key.index));
            self.metrics.evictions.inc();
        }
    }

    /// A present chunk as `Bytes` pointing into the file's mapping (no copy), with its crc32c.
    /// If the chunk is evicted while the bytes are still in use they may read as zeros: whoever
    /// receives them must check the crc32c (peers do).
    pub fn map_chunk(&self, obj: &ObjectVersion, index: u64) -> Option<(Bytes, u32)> {
        let (f, slot) = self.present(obj, index)?;
        let crc = slot.crc;
        let map = f
            .map
            .get_or_init(|| {
                // SAFETY: the file is only written through this tier, in chunks not marked present;
                // readers of a present chunk check its crc32c (see the doc above).
                unsafe { memmap2::Mmap::map(&f.file) }.ok().map(Arc::new)
            })
            .clone()?;
        let r = chunk_range(index, obj.size, self.chunk_size);
        if r.end as usize > map.len() {
            return None;
        }
        let key = ChunkKey { object: obj.id.clone(), index };
        lock(&self.index).lru.promote(&key);
        Some((Bytes::from_owner(MapSlice { map, range: r.start as usize..r.end as usize }), crc))
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

fn punch(file: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on an owned, open fd with in-range arguments has no memory effects.
    let rc = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
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
        ObjectVersion::new("f".into(), OPath::from("f"), Some("e".into()), None, size, SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn insert_read_evict_budget() {
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(Metrics::new());
        let tier = MemoryTier::new(dir.path(), 4096, 3 * 4096, m.clone()).unwrap();
        let o = obj(5 * 4096 + 10);
        let data: Vec<u8> = (0..o.size).map(|i| (i % 251) as u8).collect();
        for i in 0..6u64 {
            let r = chunk_range(i, o.size, 4096);
            assert!(tier.insert(&o, i, &data[r.start as usize..r.end as usize], Tier::origin, &AtomicU64::new(0)).unwrap());
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
        assert!(tier.insert(&o, 0, &data[..10], Tier::origin, &AtomicU64::new(0)).is_err(), "wrong length is refused");
    }

    #[test]
    fn chunk_larger_than_budget_is_not_stored() {
        let dir = tempfile::tempdir().unwrap();
        let tier = MemoryTier::new(dir.path(), 4096, 1000, Arc::new(Metrics::new())).unwrap();
        let o = obj(4096);
        assert!(!tier.insert(&o, 0, &[1u8; 4096], Tier::origin, &AtomicU64::new(0)).unwrap());
        assert_eq!(tier.used(), 0);
    }
}
