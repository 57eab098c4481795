//! A cache file of one object version: the sparse data file, the state of each chunk in it,
//! and views of its mapping that keep a chunk from being punched while they live.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tracing::warn;

use super::journal::JournalHeader;
use crate::error::lock;
use crate::metrics::Tier;

#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Slot {
    pub(super) present: bool,
    pub(super) writing: bool,
    pub(super) crc: u32,
    /// CRC-64 of the chunk in the origin's whole-object algorithm (0 when none is kept).
    pub(super) crc64: u64,
    /// BLAKE3 of the chunk, what this agent vouches for: None until first asked for (or
    /// taken as it landed, when it was checked by one).
    pub(super) digest: Option<[u8; 32]>,
    /// The tier that filled it (a file assembled from peers is checked whole).
    pub(super) source: Option<Tier>,
    /// Live `Bytes` into this chunk's mapping: it is not evicted while any exists.
    pub(super) readers: u32,
    /// Dropped while it had readers: its hole is punched when the last of them goes, and no
    /// fill starts before that.
    pub(super) punch_when_read: bool,
}

pub(super) struct ObjFile {
    pub(super) file: File,
    /// Append-only journal of present chunks (None if it could not be opened: no warm restart).
    pub(super) journal: Mutex<Option<File>>,
    /// Where the journal is, its header line, and lines appended since it was last written
    /// whole: it is rewritten from the slots once it holds many more lines than chunks.
    pub(super) journal_path: PathBuf,
    pub(super) header_line: String,
    pub(super) journal_lines: std::sync::atomic::AtomicU64,
    pub(super) slots: Mutex<Vec<Slot>>,
    /// A shared read-only mapping of the whole file, made on first use.
    pub(super) map: std::sync::OnceLock<Option<Arc<memmap2::Mmap>>>,
    /// Held around each write: concurrent writes to one tmpfs file spin on its inode lock
    /// (measured: 7% of a remote hit's CPU); waiting here sleeps instead.
    pub(super) write: Mutex<()>,
    /// Held while digests are taken (see `digests.rs`): one caller hashes, the others wait.
    pub(super) hashing: Mutex<()>,
}

/// A range of a mapping, owned: lets `Bytes` point into the tmpfs file without a copy. It
/// counts as a reader of its chunk until dropped, so the chunk cannot be punched under it.
pub(super) struct MapSlice {
    pub(super) map: Arc<memmap2::Mmap>,
    pub(super) range: Range<usize>,
    pub(super) file: Arc<ObjFile>,
    pub(super) index: usize,
    /// The whole chunk's place in the file (punched here if it was dropped while read).
    pub(super) chunk: Range<u64>,
}

impl Drop for MapSlice {
    fn drop(&mut self) {
        let mut slots = self.file.slots();
        if let Some(s) = slots.get_mut(self.index) {
            s.readers = s.readers.saturating_sub(1);
            if s.readers == 0 && s.punch_when_read {
                // Under the slot lock, so no fill of the chunk starts before the hole.
                punch(&self.file.file, self.chunk.start, self.chunk.end - self.chunk.start);
                s.punch_when_read = false;
            }
        }
    }
}

impl AsRef<[u8]> for MapSlice {
    fn as_ref(&self) -> &[u8] {
        self.map.get(self.range.clone()).unwrap_or(&[])
    }
}

impl ObjFile {
    pub(super) fn new(file: File, journal: Option<File>, journal_path: PathBuf, header: &JournalHeader, slots: Vec<Slot>) -> Arc<Self> {
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
            hashing: Mutex::new(()),
        })
    }

    /// Write `data` at `offset` of the file, one writer at a time.
    pub(super) fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        let _one = lock(&self.write);
        self.file.write_all_at(data, offset)
    }

    pub(super) fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The shared read-only mapping of the whole file, made on first use.
    pub(super) fn mapping(&self) -> Option<Arc<memmap2::Mmap>> {
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
    pub(super) fn view(self: &Arc<Self>, index: u64, chunk: Range<u64>, within: Range<u64>) -> Option<(Bytes, Slot)> {
        self.view_with(index, chunk, within, |s| s.present.then_some(()))
    }

    /// [`ObjFile::view`] of a chunk that `admit` accepts (it may change the slot), decided under
    /// the slot lock together with registering the reader.
    pub(super) fn view_with(
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
        let owner = MapSlice { map, range: start as usize..end as usize, file: self.clone(), index: index as usize, chunk };
        Some((Bytes::from_owner(owner), slot))
    }
}

pub(super) fn punch(file: &File, offset: u64, len: u64) {
    // SAFETY: fallocate on an owned, open fd with in-range arguments has no memory effects.
    let rc = unsafe {
        libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset as libc::off_t, len as libc::off_t)
    };
    if rc != 0 {
        warn!(error = %io::Error::last_os_error(), "punching a hole in the cache file failed");
    }
}
