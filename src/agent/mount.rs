//! The FUSE part of an agent, in the manner of mountpoint-s3's `FuseSession`: prepare the
//! mountpoint (detach a stale mount a killed agent left), mount, raise the kernel's readahead,
//! run the session on its own thread, and on stop unmount and join it within a bound.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use super::{AgentError, FUSE_JOIN_TIMEOUT, MOUNT_ANSWER_TIMEOUT, TASK_STOP_TIMEOUT};
use crate::config::FuseConfig;
use crate::fs::FsCore;
use crate::fuse::CachefsFuse;
use crate::metrics::Metrics;
use crate::sys;

/// Kernel readahead for the mount (KiB), set through its BDI after mounting.
pub const READ_AHEAD_KB: u32 = 16 * 1024;

/// A mounted FUSE session and the thread that runs it.
pub struct Mount {
    mountpoint: PathBuf,
    unmounter: fuser::SessionUnmounter,
    done: oneshot::Receiver<std::io::Result<()>>,
    thread: std::thread::JoinHandle<()>,
    /// Reads the adapter runs on the runtime; waited for after the session ends.
    fuse_tasks: TaskTracker,
    ended: bool,
    notifier: fuser::Notifier,
}

impl Mount {
    /// Mount `core` at `cfg.mountpoint` (made ready by [`prepare_mountpoint`]) and return once
    /// the mount answers (or after [`MOUNT_ANSWER_TIMEOUT`], with a warning).
    pub async fn start(cfg: &FuseConfig, core: Arc<FsCore>, metrics: Arc<Metrics>) -> Result<Mount, AgentError> {
        let err = |m: String| AgentError::Mount(cfg.mountpoint.display().to_string(), m);
        let fuse_tasks = TaskTracker::new();
        let fs = CachefsFuse::new(core, metrics, tokio::runtime::Handle::current(), fuse_tasks.clone(), cfg.passthrough);
        let fcfg = session_config(cfg);
        let mp = cfg.mountpoint.clone();
        let mut session = tokio::task::spawn_blocking(move || fuser::Session::new(fs, &mp, &fcfg))
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied { " (mounting needs root or access to /dev/fuse)" } else { "" };
            err(format!("{e}{hint}"))
        })?;
        let unmounter = session.unmount_callable();
        let notifier = session.notifier();
        let (done_tx, done) = oneshot::channel();
        let thread = std::thread::Builder::new()
            .name("fuse-session".into())
            .spawn(move || {
                let _ = done_tx.send(session.run());
            })
            .map_err(|e| err(e.to_string()))?;
        set_read_ahead(&cfg.mountpoint);
        // Ready only once the mount answers (a statfs always reaches the agent).
        if !crate::systemd::mount_answers(&cfg.mountpoint, MOUNT_ANSWER_TIMEOUT).await {
            warn!(timeout = ?MOUNT_ANSWER_TIMEOUT, "the new mount did not answer a statfs in time");
        }
        Ok(Mount { mountpoint: cfg.mountpoint.clone(), unmounter, done, thread, fuse_tasks, ended: false, notifier })
    }

    /// Drops the kernel's cached pages of a file version, if `catalog` serves it now.
    pub fn invalidator(&self, catalog: Arc<crate::catalog::Catalog>) -> crate::cache::verify::Invalidate {
        let notifier = self.notifier.clone();
        Arc::new(move |obj| match catalog.ino_of(obj) {
            Some(ino) => notifier.inval_inode(fuser::INodeNo(ino), 0, 0).map(|()| true),
            None => Ok(false),
        })
    }

    /// Resolves when the session ends without being asked to (unmounted from outside).
    pub async fn ended(&mut self) {
        if self.ended {
            return;
        }
        let r = (&mut self.done).await;
        warn!(result = ?r, "FUSE session ended (unmounted from outside?)");
        self.ended = true;
    }

    /// Unmount (lazily if busy) and join the session thread within [`FUSE_JOIN_TIMEOUT`] (a file
    /// still open keeps a detached session alive). Returns the adapter's reads, closed: wait for
    /// them with [`wait_tasks`] once the agent's work is cancelled.
    pub async fn stop(mut self) -> TaskTracker {
        if let Err(e) = self.unmounter.unmount() {
            warn!(error = %e, "unmount failed; detaching lazily");
            let _ = sys::detach(&self.mountpoint);
        }
        let ended = self.ended || tokio::time::timeout(FUSE_JOIN_TIMEOUT, &mut self.done).await.is_ok();
        if ended {
            let _ = self.thread.join();
        } else {
            warn!(timeout = ?FUSE_JOIN_TIMEOUT, "FUSE session did not end in time (files still open); exiting anyway");
        }
        self.fuse_tasks.close();
        self.fuse_tasks
    }
}

/// Wait at most [`TASK_STOP_TIMEOUT`] for the closed `tasks` to end.
pub async fn wait_tasks(tasks: &TaskTracker) {
    if tokio::time::timeout(TASK_STOP_TIMEOUT, tasks.wait()).await.is_err() {
        warn!(left = tasks.len(), timeout = ?TASK_STOP_TIMEOUT, "tasks still running at shutdown; exiting anyway");
    }
}

fn session_config(cfg: &FuseConfig) -> fuser::Config {
    let mut fcfg = fuser::Config::default();
    fcfg.mount_options = vec![
        fuser::MountOption::RO,
        fuser::MountOption::FSName("cachefs".into()),
        fuser::MountOption::Subtype("cachefs".into()),
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
        fuser::MountOption::DefaultPermissions,
    ];
    fcfg.acl = if cfg.allow_other { fuser::SessionACL::All } else { fuser::SessionACL::Owner };
    fcfg.n_threads = Some(cfg.threads);
    fcfg.clone_fd = true;
    fcfg
}

/// Detach a stale FUSE mount (ENOTCONN) left by a killed agent; create a missing directory;
/// warn when the directory has files (the mount hides them). Done before anything is bound.
pub fn prepare_mountpoint(path: &Path) -> Result<(), AgentError> {
    let err = |m: String| AgentError::Mountpoint(path.display().to_string(), m);
    let enotconn = |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN);
    // statfs of a FUSE mount always asks its daemon: ENOTCONN means the daemon is gone.
    let stale = enotconn(sys::statfs(path).map(|_| ())) || (sys::is_mount_point(path) && enotconn(std::fs::metadata(path).map(|_| ())));
    if stale {
        warn!(mountpoint = %path.display(), "detaching a stale mount (transport endpoint is not connected)");
        sys::detach(path).map_err(|e| err(format!("stale mount could not be detached: {e}")))?;
    } else if sys::is_mount_point(path) {
        return Err(err("something is already mounted there (another agent?)".into()));
    }
    match std::fs::metadata(path) {
        Ok(md) if md.is_dir() => {
            if std::fs::read_dir(path).is_ok_and(|mut d| d.next().is_some()) {
                warn!(mountpoint = %path.display(), "mountpoint is not empty: its files are hidden while cachefs is mounted there");
            }
            Ok(())
        }
        Ok(_) => Err(err("it is a file, not a directory".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(path).map_err(|e| err(e.to_string()))?;
            info!(mountpoint = %path.display(), "created mountpoint");
            Ok(())
        }
        Err(e) => Err(err(e.to_string())),
    }
}

fn set_read_ahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(mountpoint) else { return };
    let dev = md.dev();
    let p = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    match std::fs::write(&p, READ_AHEAD_KB.to_string()) {
        Ok(()) => info!(read_ahead_kb = READ_AHEAD_KB, "raised kernel readahead for the mount"),
        Err(e) => warn!(path = %p, error = %e, "could not raise kernel readahead (needs root); reads stay at 128 KiB"),
    }
}
