//! The fuser adapter: each handler calls the core (`fs::FsCore`) and replies, or fails through
//! one helper ([`CachefsFuse::fail`]) that maps the error to an errno ([`errno`]), counts it and
//! logs it. What the adapter keeps is what fuser needs: the kernel's backing ids of passthrough
//! files. Reads that are wholly in memory are answered on the FUSE thread; all others from a
//! tokio task, so no FUSE thread ever waits on the network.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner, OpenAccMode, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn, Instrument};

use crate::catalog::{Entry, Kind};
use crate::error::Error;
use crate::fs::{FsCore, OpenMode};
use crate::metrics::Metrics;

/// How long the kernel may cache names and attributes.
const TTL: Duration = Duration::from_secs(1);
const BLOCK: u32 = 4096;

/// The one place core errors become errnos.
pub fn errno(e: &Error) -> Errno {
    match e {
        Error::NotFound => Errno::ENOENT,
        Error::NotDir => Errno::ENOTDIR,
        Error::IsDir => Errno::EISDIR,
        Error::ReadOnly => Errno::EROFS,
        Error::BadHandle => Errno::EBADF,
        Error::Stale(_) => Errno::ESTALE,
        Error::Unavailable(_) | Error::TimedOut(_) => Errno::EIO,
    }
}

/// The replies an operation can fail with.
trait ErrorReply {
    fn error(self, e: Errno);
}

macro_rules! error_reply {
    ($($t:ty),*) => { $(impl ErrorReply for $t { fn error(self, e: Errno) { <$t>::error(self, e) } })* };
}
error_reply!(ReplyEntry, ReplyAttr, ReplyOpen, ReplyData, ReplyDirectory);

/// Answer a failed operation `op`: errno, `cachefs_fuse_errors_total{op,errno}`, and a log line
/// (debug for a name that does not exist, which the kernel asks about all the time).
fn fail(metrics: &Metrics, op: &'static str, e: &Error, reply: impl ErrorReply) {
    let code = errno(e);
    metrics.add_fuse_error(op, code.code());
    match e {
        Error::NotFound => debug!(op, error = %e, "FUSE operation failed"),
        _ => warn!(op, error = %e, "FUSE operation failed"),
    }
    reply.error(code);
}

/// One backing file registered with the kernel for an inode, shared by its passthrough handles.
struct Backing {
    id: fuser::BackingId,
    version: Arc<str>,
    handles: usize,
}

pub struct CachefsFuse {
    core: Arc<FsCore>,
    metrics: Arc<Metrics>,
    rt: tokio::runtime::Handle,
    tasks: TaskTracker,
    uid: u32,
    gid: u32,
    /// Asked for by the configuration (whether the kernel agreed is the core's to know).
    passthrough_wanted: bool,
    /// The kernel lets direct-I/O handles be mapped (FUSE_DIRECT_IO_ALLOW_MMAP, Linux 6.6+).
    direct_io: AtomicBool,
    backings: Mutex<HashMap<u64, Backing>>,
    /// Passthrough handle → inode.
    pt_handles: Mutex<HashMap<u64, u64>>,
}

use crate::error::lock;

impl CachefsFuse {
    pub fn new(core: Arc<FsCore>, metrics: Arc<Metrics>, rt: tokio::runtime::Handle, tasks: TaskTracker, passthrough: bool) -> Self {
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        CachefsFuse {
            core,
            metrics,
            rt,
            tasks,
            uid,
            gid,
            passthrough_wanted: passthrough,
            direct_io: AtomicBool::new(false),
            backings: Mutex::new(HashMap::new()),
            pt_handles: Mutex::new(HashMap::new()),
        }
    }

    /// Answer `open` of handle `fh` with passthrough to `path`, the backing file of `ino` (one
    /// backing id per inode, shared by its handles of one version of `size` bytes). Gives the
    /// reply back when the handle must be served the normal way.
    fn open_backing(
        &self,
        ino: u64,
        fh: u64,
        (version, size): (&Arc<str>, u64),
        path: &std::path::Path,
        reply: ReplyOpen,
    ) -> Result<(), ReplyOpen> {
        let mut backings = lock(&self.backings);
        match backings.get_mut(&ino) {
            Some(b) if &b.version == version => b.handles += 1,
            // Handles of another version of this inode hold its one backing id.
            Some(_) => return Err(reply),
            None => match std::fs::File::open(path).and_then(|f| reply.open_backing(&f)) {
                Ok(id) => {
                    backings.insert(ino, Backing { id, version: version.clone(), handles: 1 });
                }
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "FUSE passthrough open failed; using normal replies");
                    return Err(reply);
                }
            },
        }
        let Some(b) = backings.get(&ino) else { return Err(reply) };
        lock(&self.pt_handles).insert(fh, ino);
        self.metrics.passthrough_opens.inc();
        self.metrics.passthrough_open_bytes.inc_by(size);
        reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b.id);
        Ok(())
    }

    /// The last passthrough handle of an inode releases its backing id.
    fn release_backing(&self, fh: u64) {
        let Some(ino) = lock(&self.pt_handles).remove(&fh) else { return };
        let mut backings = lock(&self.backings);
        if let Some(b) = backings.get_mut(&ino) {
            b.handles -= 1;
            if b.handles == 0 {
                backings.remove(&ino);
            }
        }
    }

    fn attr(&self, e: &Entry) -> FileAttr {
        let (kind, nlink) = match e.kind {
            Kind::Dir => (FileType::Directory, 2),
            Kind::File => (FileType::RegularFile, 1),
        };
        let perm = e.perm();
        FileAttr {
            ino: INodeNo(e.ino),
            size: e.size,
            blocks: e.size.div_ceil(512),
            atime: e.mtime,
            mtime: e.mtime,
            ctime: e.mtime,
            crtime: e.mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: BLOCK,
            flags: 0,
        }
    }
}

fn kind_of(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
    }
}

impl Filesystem for CachefsFuse {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_background(64);
        if self.passthrough_wanted {
            match config.add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH) {
                Ok(()) if config.set_max_stack_depth(1).is_ok() => {
                    self.core.enable_passthrough();
                    tracing::info!("FUSE passthrough enabled: files wholly in memory are read straight from tmpfs");
                }
                _ => warn!("this kernel does not offer FUSE passthrough (needs Linux 6.9+ and root); local hits use normal FUSE replies"),
            }
        }
        // Misses are answered without the page cache (see `Opened::in_memory`); only where mmap
        // of such handles still works, as model loaders map their files.
        if config.add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP).is_ok() {
            self.direct_io.store(true, Ordering::Relaxed);
        }
        if let Err(max) = config.set_max_readahead(u32::MAX) {
            let _ = config.set_max_readahead(max);
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else { return reply.error(Errno::ENOENT) };
        match self.core.lookup(parent.0, name) {
            Ok(e) => reply.entry(&TTL, &self.attr(&e), Generation(0)),
            Err(e) => fail(&self.metrics, "lookup", &e, reply),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core.getattr(ino.0, fh.map(|f| f.0)) {
            Ok(e) => reply.attr(&TTL, &self.attr(&e)),
            Err(e) => fail(&self.metrics, "getattr", &e, reply),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY || flags.0 & (libc::O_TRUNC | libc::O_CREAT) != 0;
        let o = match self.core.open(ino.0, write) {
            Ok(o) => o,
            Err(e) => return fail(&self.metrics, "open", &e, reply),
        };
        let (uncached, reply) = match &o.mode {
            OpenMode::Passthrough(path) => {
                let (version, size) = match self.core.handle(o.fh) {
                    Ok(h) => (h.obj.id.clone(), h.obj.size),
                    Err(e) => return fail(&self.metrics, "open", &e, reply),
                };
                let Err(reply) = self.open_backing(ino.0, o.fh, (&version, size), path, reply) else { return };
                self.core.passthrough_refused(o.fh);
                (false, reply)
            }
            OpenMode::Cached => (false, reply),
            OpenMode::Uncached => (true, reply),
        };
        // An inode is one version: what the kernel cached of it stays true.
        let f = if uncached && self.direct_io.load(Ordering::Relaxed) { FopenFlags::FOPEN_DIRECT_IO } else { FopenFlags::FOPEN_KEEP_CACHE };
        reply.opened(FileHandle(o.fh), f)
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.metrics.fuse_read_requests.inc();
        let h = match self.core.handle(fh.0) {
            Ok(h) => h,
            Err(e) => return fail(&self.metrics, "read", &e, reply),
        };
        let pending = match self.core.start_read(h, offset, size) {
            Ok(bytes) => return reply.data(&bytes),
            Err(p) => p,
        };
        let core = self.core.clone();
        let metrics = self.metrics.clone();
        let span = tracing::debug_span!("read", ino = ino.0, key = %pending.handle().obj.key, offset, size);
        self.tasks.spawn_on(
            async move {
                match core.finish_read(pending).await {
                    Ok(bytes) => reply.data(&bytes),
                    Err(e) => {
                        metrics.read_errors.inc();
                        fail(&metrics, "read", &e, reply)
                    }
                }
            }
            .instrument(span),
            &self.rt,
        );
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn getxattr(&self, _req: &Request, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::from_i32(libc::ENODATA));
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0)
        } else {
            reply.data(&[])
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.release_backing(fh.0);
        self.core.release(fh.0);
        reply.ok();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.core.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => fail(&self.metrics, "opendir", &e, reply),
        }
    }

    fn releasedir(&self, _req: &Request, _ino: INodeNo, fh: FileHandle, _flags: OpenFlags, reply: ReplyEmpty) {
        self.core.releasedir(fh.0);
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let entries = match self.core.readdir(ino.0, fh.0) {
            Ok(v) => v,
            Err(e) => return fail(&self.metrics, "readdir", &e, reply),
        };
        // The offset handed back with each entry is the index of the next one.
        for (i, e) in entries.iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(e.ino), (i + 1) as u64, kind_of(e.kind), &e.name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let files = self.core.catalog().files();
        let bytes: u64 = files.iter().map(|o| o.size).sum();
        let blocks = bytes.div_ceil(BLOCK as u64);
        reply.statfs(blocks, 0, 0, files.len() as u64, 0, BLOCK, 1024, BLOCK);
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn mknod(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, _rdev: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _req: &Request, _parent: INodeNo, _link_name: &OsStr, _target: &std::path::Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(
        &self,
        _req: &Request,
        _parent: INodeNo,
        _name: &OsStr,
        _newparent: INodeNo,
        _newname: &OsStr,
        _flags: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _req: &Request, _ino: INodeNo, _newparent: INodeNo, _newname: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: fuser::WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: fuser::ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    /// No ioctl applies to these files: ENOTTY, as for a regular file (Python and others probe some).
    #[allow(clippy::too_many_arguments)]
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        debug!(cmd, "ioctl: not supported (ENOTTY)");
        reply.error(Errno::ENOTTY);
    }

    fn create(&self, _req: &Request, _parent: INodeNo, _name: &OsStr, _mode: u32, _umask: u32, _flags: i32, reply: fuser::ReplyCreate) {
        debug!("create refused: read-only");
        reply.error(Errno::EROFS);
    }
}
