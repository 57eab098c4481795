//! The journal beside each cache file, and recovery from it at start.
//!
//! # Contract
//! - A chunk is named in its file's journal (`+INDEX CRC`) only once it is whole and checked,
//!   and named gone (`-INDEX`) once it is punched; a torn last line is ignored.
//! - [`MemoryTier::recover`] keeps only chunks whose journal names them and whose bytes match
//!   their crc32c, within the budget; everything else in the directory that is ours is
//!   punched or removed. The journal is compacted when it outgrows its chunks.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use super::file::{punch, ObjFile, Slot};
use super::{put_back, MemoryTier, DATA_SUFFIX};
use crate::cache::chunk::{chunk_count, chunk_range, ChunkKey};
use crate::catalog::ObjectVersion;
use crate::error::lock;

/// Suffix of each data file's journal: a JSON header line, then `+INDEX CRC` once a chunk is
/// fully written and `-INDEX` once it is evicted. Replayed (and every chunk re-verified) at start.
pub const JOURNAL_SUFFIX: &str = ".journal";
/// Suffix of a journal being rewritten (renamed over the journal once whole).
pub(super) const JOURNAL_TMP_SUFFIX: &str = ".journal.tmp";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(super) struct JournalHeader {
    pub(super) v: u32,
    pub(super) key: String,
    pub(super) size: u64,
    pub(super) chunk_size: u64,
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

impl ObjFile {
    /// Append one journal line; a failure only costs the warm restart of this chunk.
    pub(super) fn journal(&self, line: &str) {
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
    pub(super) fn rewrite_journal(&self) -> io::Result<File> {
        let mut body = format!("{}\n", self.header_line);
        let mut n = 0;
        for (i, s) in self.slots().iter().enumerate().filter(|(_, s)| s.present) {
            body.push_str(&format!("+{i} {}\n", s.crc));
            n += 1;
        }
        let tmp = self.journal_path.with_extension(JOURNAL_TMP_SUFFIX.trim_start_matches('.'));
        super::private::write(&tmp, body.as_bytes())?;
        std::fs::rename(&tmp, &self.journal_path)?;
        self.journal_lines.store(n, std::sync::atomic::Ordering::Relaxed);
        OpenOptions::new().append(true).open(&self.journal_path)
    }
}

pub(super) fn open_journal(path: &Path, header: Option<&JournalHeader>) -> io::Result<File> {
    use std::io::Write;
    let mut f = super::private::options().create(true).append(true).open(path)?;
    if let Some(h) = header {
        let mut line = serde_json::to_string(h).map_err(io::Error::other)?;
        line.push('\n');
        f.write_all(line.as_bytes())?;
    }
    Ok(f)
}

impl MemoryTier {
    pub(super) fn journal_path(&self, obj: &ObjectVersion) -> PathBuf {
        self.dir.join(format!("{}{JOURNAL_SUFFIX}", obj.id))
    }

    pub(super) fn header(&self, obj: &ObjectVersion) -> JournalHeader {
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
            let victims = self.choose_victims(&mut idx, None);
            self.metrics.cache_bytes.set(idx.used as i64);
            victims
        };
        let kept = self.evict(victims);
        put_back(&mut lock(&self.index), kept);
        Ok(r)
    }

    /// Returns Ok(false) if the files do not belong to this version and chunk size.
    pub(super) fn recover_one(&self, obj: &Arc<ObjectVersion>, r: &mut Recovered) -> io::Result<bool> {
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
            idx.lru.put(ChunkKey { object: obj.id.clone(), index: i }, super::budget::Held { len, used: std::time::Instant::now() });
            idx.used += len;
            r.chunks += 1;
            r.bytes += len;
        }
        Ok(true)
    }
}
