//! The filesystem core behind the FUSE adapter: names and attributes from the catalog, open
//! handles pinned to one object version, reads through the tiered reader, and the readahead
//! policy. No fuser types; tested without a mount.
//!
//! # Contract
//! - An open handle reads only the version it opened, for its whole life.
//! - An inode is one version (see `catalog`), so the kernel may always keep its page cache.
//! - An inode the catalog retired (its object changed) still answers `getattr` while a handle
//!   of it is open.
//! - A version the catalog no longer lists is forgotten by the memory tier once no handle of it
//!   is open ([`FsCore::retire`]): no file, mapping or chunk of it outlives its last reader.
//! - Writes of any kind are `Error::ReadOnly`.
//! - The open mode is decided here ([`OpenMode`]): a version wholly in memory at open may be
//!   read with passthrough to its tmpfs file, and is pinned until its handle is released.
//! - Every read runs the readahead policy: [`FsCore::start_read`] is the only way to a read.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::cache::Reader;
use crate::catalog::{Catalog, DirEntry, Entry, ObjectVersion};
use crate::error::Error;

/// One open file.
pub struct Handle {
    pub ino: u64,
    pub obj: Arc<ObjectVersion>,
    ra: Mutex<Readahead>,
    /// The version is pinned in memory for this handle (passthrough).
    pinned: AtomicBool,
}

#[derive(Default)]
struct Readahead {
    /// Where the next sequential read would start.
    next_offset: u64,
    /// Chunks to keep fetched ahead of the reader; 0 = not sequential.
    window: u64,
    /// Chunks below this index were already requested.
    upto: u64,
    last_chunk: Option<u64>,
}

/// How a handle should be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenMode {
    /// Every byte is in memory and pinned there while the handle is open: reads may go straight
    /// to this file (FUSE passthrough). If the adapter cannot use it, it calls
    /// [`FsCore::passthrough_refused`] and serves the handle as `Cached`.
    Passthrough(PathBuf),
    /// Every byte is in memory now: the kernel may keep its page cache (an inode is one version).
    Cached,
    /// Not every byte is in memory: the handle may bypass the kernel's page cache; its bytes land
    /// in the memory tier anyway, and a second copy there costs a page allocation and a copy per
    /// page on the miss path.
    Uncached,
}

#[derive(Debug, Clone)]
pub struct Opened {
    pub fh: u64,
    pub mode: OpenMode,
}

/// A read that was not wholly in memory; finish it with [`FsCore::finish_read`] (off the FUSE
/// thread). Only [`FsCore::start_read`] makes one, so readahead has run.
pub struct PendingRead {
    handle: Arc<Handle>,
    offset: u64,
    size: u32,
}

impl PendingRead {
    pub fn handle(&self) -> &Arc<Handle> {
        &self.handle
    }
}

pub struct FsCore {
    catalog: Arc<Catalog>,
    reader: Arc<Reader>,
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    /// Open directories: the listing taken at `opendir`, paged through by `readdir`.
    dirs: Mutex<HashMap<u64, Arc<Vec<DirEntry>>>>,
    /// Versions no longer listed that an open handle still reads (lock order: handles, then this).
    retired: Mutex<HashMap<Arc<str>, Arc<ObjectVersion>>>,
    next_fh: AtomicU64,
    /// The kernel agreed to FUSE passthrough (set by the adapter at `init`).
    passthrough: AtomicBool,
}

use crate::error::lock;

impl FsCore {
    pub fn new(catalog: Arc<Catalog>, reader: Arc<Reader>) -> Self {
        FsCore {
            catalog,
            reader,
            handles: Mutex::new(HashMap::new()),
            dirs: Mutex::new(HashMap::new()),
            retired: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            passthrough: AtomicBool::new(false),
        }
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    pub fn reader(&self) -> &Arc<Reader> {
        &self.reader
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Entry, Error> {
        self.catalog.lookup(parent, name)
    }

    /// Let `open` offer [`OpenMode::Passthrough`] (the kernel supports it).
    pub fn enable_passthrough(&self) {
        self.passthrough.store(true, Ordering::Relaxed);
    }

    /// Attributes of `ino`; with an open handle `fh`, those of the version that handle reads.
    pub fn getattr(&self, ino: u64, fh: Option<u64>) -> Result<Entry, Error> {
        if let Some(h) = fh.and_then(|fh| self.handle(fh).ok()) {
            return Ok(Entry::file(ino, &h.obj));
        }
        match self.catalog.getattr(ino) {
            Err(Error::Stale(why)) => {
                let open = lock(&self.handles).values().find(|h| h.ino == ino).map(|h| h.obj.clone());
                let o = open.ok_or(Error::Stale(why))?;
                Ok(Entry::file(ino, &o))
            }
            r => r,
        }
    }

    /// Open directory `ino`: its entries are taken once, here (a directory of n entries costs
    /// O(n) over all the `readdir` calls that page through it, and the pages agree).
    pub fn opendir(&self, ino: u64) -> Result<u64, Error> {
        let entries = Arc::new(self.catalog.readdir(ino)?);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        lock(&self.dirs).insert(fh, entries);
        Ok(fh)
    }

    /// The entries of open directory `fh` (or, for an unknown handle, of `ino` now).
    pub fn readdir(&self, ino: u64, fh: u64) -> Result<Arc<Vec<DirEntry>>, Error> {
        match lock(&self.dirs).get(&fh) {
            Some(e) => Ok(e.clone()),
            None => self.catalog.readdir(ino).map(Arc::new),
        }
    }

    pub fn releasedir(&self, fh: u64) {
        lock(&self.dirs).remove(&fh);
    }

    pub fn open(&self, ino: u64, write: bool) -> Result<Opened, Error> {
        if write {
            return Err(Error::ReadOnly);
        }
        let obj = self.catalog.object(ino)?;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let memory = self.reader.memory();
        let mut handles = lock(&self.handles);
        // The kernel keeps one I/O mode per inode: while any handle of it is served without
        // passthrough (and may have mapped it), a passthrough open would fail with EIO.
        let mixed = handles.values().any(|h| h.ino == ino && !h.pinned.load(Ordering::Relaxed));
        let pinned = !mixed && self.passthrough.load(Ordering::Relaxed) && memory.pin_if_complete(&obj);
        let mode = if pinned {
            OpenMode::Passthrough(memory.file_path(&obj))
        } else if memory.is_complete(&obj) {
            OpenMode::Cached
        } else {
            OpenMode::Uncached
        };
        let h = Handle { ino, obj, ra: Mutex::new(Readahead::default()), pinned: AtomicBool::new(pinned) };
        handles.insert(fh, Arc::new(h));
        Ok(Opened { fh, mode })
    }

    /// The adapter could not serve handle `fh` with passthrough: its version is unpinned.
    pub fn passthrough_refused(&self, fh: u64) {
        if let Ok(h) = self.handle(fh) {
            self.unpin(&h);
        }
    }

    fn unpin(&self, h: &Handle) {
        if h.pinned.swap(false, Ordering::Relaxed) {
            self.reader.memory().unpin(&h.obj);
        }
    }

    pub fn handle(&self, fh: u64) -> Result<Arc<Handle>, Error> {
        lock(&self.handles).get(&fh).cloned().ok_or(Error::BadHandle)
    }

    pub fn release(&self, fh: u64) {
        let gone = {
            let mut handles = lock(&self.handles);
            let Some(h) = handles.remove(&fh) else { return };
            self.unpin(&h);
            if handles.values().any(|o| o.obj.id == h.obj.id) {
                return;
            }
            lock(&self.retired).remove(&h.obj.id)
        };
        if let Some(v) = gone {
            self.reader.memory().forget(&v);
        }
    }

    /// Versions the catalog no longer lists (see [`crate::catalog::Changes::retired`]): each is
    /// forgotten now, or when the last handle of it is released.
    pub fn retire(&self, versions: &[Arc<ObjectVersion>]) {
        let now: Vec<&Arc<ObjectVersion>> = {
            let handles = lock(&self.handles);
            let mut retired = lock(&self.retired);
            versions
                .iter()
                .filter(|v| {
                    let open = handles.values().any(|h| h.obj.id == v.id);
                    if open {
                        retired.insert(v.id.clone(), (*v).clone());
                    }
                    !open
                })
                .collect()
        };
        for v in now {
            self.reader.memory().forget(v);
        }
    }

    pub fn open_handles(&self) -> usize {
        lock(&self.handles).len()
    }

    /// Begin a read: drive readahead, and answer at once (on the caller's thread) when the
    /// range is wholly in memory; otherwise the read to finish with [`FsCore::finish_read`].
    pub fn start_read(&self, h: Arc<Handle>, offset: u64, size: u32) -> Result<Bytes, PendingRead> {
        self.readahead(&h, offset, size as u64);
        match self.reader.read_cached(&h.obj, offset, size as u64) {
            Some(b) => Ok(b),
            None => Err(PendingRead { handle: h, offset, size }),
        }
    }

    /// Finish a read through every tier.
    pub async fn finish_read(&self, p: PendingRead) -> Result<Bytes, Error> {
        self.reader.read(&p.handle.obj, p.offset, p.size as u64).await
    }

    /// A whole read: [`FsCore::start_read`], then [`FsCore::finish_read`] if needed.
    pub async fn read(&self, h: &Arc<Handle>, offset: u64, size: u32) -> Result<Bytes, Error> {
        match self.start_read(h.clone(), offset, size) {
            Ok(b) => Ok(b),
            Err(p) => self.finish_read(p).await,
        }
    }

    /// Sequential readers get the next chunks fetched ahead, in a window that doubles each time
    /// the reader enters a new chunk; a jump resets it. Random readers fetch only what they touch.
    fn readahead(&self, h: &Handle, offset: u64, len: u64) {
        let cs = self.reader.chunk_size();
        let mut ra = lock(&h.ra);
        let chunk = offset / cs;
        let near = offset <= ra.next_offset.saturating_add(cs) && offset.saturating_add(cs) >= ra.next_offset;
        // The kernel keeps several reads in flight (mmap faults, async readahead), so they may
        // arrive out of order: a read inside the window already fetched is still sequential.
        let in_window = ra.window > 0 && ra.last_chunk.is_some_and(|l| chunk + ra.window >= l) && chunk < ra.upto;
        let sequential = near || in_window;
        let end = offset.saturating_add(len);
        ra.next_offset = if in_window { ra.next_offset.max(end) } else { end };
        if !sequential {
            tracing::debug!(offset, next = ra.next_offset, "random read: readahead reset");
            ra.window = 0;
            ra.upto = 0;
            ra.last_chunk = Some(chunk);
            return;
        }
        if ra.window == 0 || ra.last_chunk.is_none_or(|l| chunk > l) {
            ra.window = (ra.window * 2).clamp(1, self.reader.max_window());
            ra.last_chunk = Some(chunk);
        }
        let from = (chunk + 1).max(ra.upto);
        let to = chunk + 1 + ra.window;
        let mut next = from;
        while next < to {
            if !self.reader.prefetch(&h.obj, next) {
                break;
            }
            next += 1;
        }
        ra.upto = next;
    }
}
