//! Wiring and ordered shutdown: origin → catalog → memory tier → reader → admin → mount;
//! on shutdown: not ready → unmount → stop tasks. One cancellation token, one task tracker.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::admin::{self, AdminState};
use crate::cache::verify::Verifier;
use crate::cache::{ChunkSource, MemoryTier, Reader, ReaderOptions};
use crate::catalog::{Catalog, ObjectVersion};
use crate::config::MountConfig;
use crate::fs::FsCore;
use crate::fuse::CachefsFuse;
use crate::metrics::{Metrics, Tier};
use crate::origin::Origin;
use crate::peer::client::PeerTimeouts;
use crate::peer::{Membership, PeerServer, PeerSource};
use crate::size::format_size;

/// Kernel readahead for the mount (KiB), set through its BDI after mounting.
pub const READ_AHEAD_KB: u32 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Origin(#[from] crate::origin::OriginError),
    #[error("cannot list the source {0}: {1}")]
    List(String, String),
    #[error("cannot use cache directory {0}: {1}")]
    CacheDir(String, std::io::Error),
    #[error("cannot listen on admin address {0}: {1}")]
    Admin(String, std::io::Error),
    #[error("cannot prepare mountpoint {0}: {1}")]
    Mountpoint(String, String),
    #[error("cannot mount at {0}: {1}")]
    Mount(String, String),
    #[error("peers: {0}")]
    Peers(String),
    #[error("cannot listen for peers on {0}: {1}")]
    Listen(String, std::io::Error),
}

/// List the origin and turn the listing into pinned versions.
pub async fn list_versions(origin: &Origin) -> Result<Vec<ObjectVersion>, crate::origin::OriginError> {
    let metas = origin.list().await?;
    Ok(metas
        .into_iter()
        .filter_map(|m| {
            let key = origin.relative_key(&m.location)?;
            Some(ObjectVersion::new(key, m.location, m.e_tag, m.version, m.size, m.last_modified.into()))
        })
        .collect())
}

/// Whether `path` is a mount point now (from the mount table: `stat` may be answered from the
/// kernel's attribute cache even when the FUSE daemon behind it is gone).
fn is_mount_point(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return false };
    let p = path.display().to_string();
    // The mount table escapes spaces and the like as octal.
    let escaped = p.replace('\\', "\\134").replace(' ', "\\040").replace('\t', "\\011").replace('\n', "\\012");
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(escaped.as_str()))
}

/// `statfs` of a FUSE mount always asks its daemon: ENOTCONN means the daemon is gone.
fn statfs_errno(path: &Path) -> Option<i32> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } == 0 {
        None
    } else {
        std::io::Error::last_os_error().raw_os_error()
    }
}

/// Detach a stale FUSE mount (ENOTCONN) left by a killed agent; create a missing directory.
fn prepare_mountpoint(path: &Path) -> Result<(), AgentError> {
    let err = |m: String| AgentError::Mountpoint(path.display().to_string(), m);
    let stale = statfs_errno(path) == Some(libc::ENOTCONN)
        || (is_mount_point(path) && std::fs::metadata(path).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN));
    if stale {
        warn!(mountpoint = %path.display(), "detaching a stale mount (transport endpoint is not connected)");
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| err(e.to_string()))?;
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(err(format!("stale mount could not be detached: {}", std::io::Error::last_os_error())));
        }
    } else if is_mount_point(path) {
        return Err(err("something is already mounted there (another agent?)".into()));
    }
    match std::fs::metadata(path) {
        Ok(md) if md.is_dir() => Ok(()),
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
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let p = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&p, READ_AHEAD_KB.to_string()) {
        Ok(()) => info!(read_ahead_kb = READ_AHEAD_KB, "raised kernel readahead for the mount"),
        Err(e) => warn!(path = %p, error = %e, "could not raise kernel readahead (needs root); reads stay at 128 KiB"),
    }
}

fn is_tmpfs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else { return false };
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and out-pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut s) == 0 && s.f_type == libc::TMPFS_MAGIC }
}

/// Resolves on the next SIGTERM or SIGINT (never, if signals cannot be watched).
async fn second_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {}
                _ = i.recv() => {}
            }
        }
        _ => std::future::pending().await,
    }
}

/// Run the agent until `shutdown` resolves (or the mount goes away), then unmount and stop.
pub async fn run(cfg: MountConfig, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let metrics = Arc::new(Metrics::new());
    let stop = CancellationToken::new();
    let tasks = TaskTracker::new();

    let origin = Arc::new(Origin::with_request_timeout(
        &cfg.source,
        &cfg.source_options,
        cfg.origin_concurrency,
        metrics.clone(),
        cfg.read_timeout,
    )?);
    let versions = list_versions(&origin).await.map_err(|e| AgentError::List(cfg.shown_source(), e.to_string()))?;
    let catalog = Arc::new(Catalog::new());
    let total: u64 = versions.iter().map(|v| v.size).sum();
    let n = versions.len();
    catalog.apply(versions);
    info!(source = %cfg.shown_source(), files = n, bytes = %format_size(total), "listed source");

    // Each chunk's CRC-64 is kept when the origin publishes whole-object CRC-64s to check with.
    let memory = Arc::new(
        MemoryTier::new(&cfg.cache_dir, cfg.chunk_size, cfg.cache_size, metrics.clone())
            .map_err(|e| AgentError::CacheDir(cfg.cache_dir.display().to_string(), e))?
            .with_crc64(origin.crc64_kind().map(|k| k.algorithm())),
    );
    // A restarted agent reuses the chunks an earlier run left in tmpfs (each re-verified).
    let rec = memory.recover(&catalog.files()).map_err(|e| AgentError::CacheDir(cfg.cache_dir.display().to_string(), e))?;
    if rec != Default::default() {
        info!(
            objects = rec.objects,
            chunks = rec.chunks,
            bytes = %format_size(rec.bytes),
            dropped = rec.dropped,
            removed_files = rec.removed_files,
            "reused the warm cache of an earlier run"
        );
    }
    if !is_tmpfs(&cfg.cache_dir) {
        warn!(cache_dir = %cfg.cache_dir.display(), "cache directory is not on tmpfs: cached chunks will use disk and page cache");
    }
    info!(cache_dir = %cfg.cache_dir.display(), cache_size = %format_size(cfg.cache_size), chunk_size = %format_size(cfg.chunk_size), "memory tier ready");

    // Peers: membership, the peer tier ahead of the origin, and the server.
    let node_id = uuid::Uuid::new_v4().to_string();
    let draining = Arc::new(AtomicBool::new(false));
    let peers_on = cfg.listen.is_some() || !cfg.peers.is_empty() || cfg.peer_dns.is_some();
    let membership = if peers_on {
        let m = Arc::new(
            Membership::new(
                node_id.clone(),
                crate::peer::membership::Compat { chunk_size: cfg.chunk_size, source: cfg.shown_source() },
                cfg.listen.map(|l| l.port()).unwrap_or(0),
                cfg.peers.clone(),
                cfg.peer_dns.clone(),
                cfg.peer_token.clone(),
                cfg.peer_tls.as_ref(),
                metrics.clone(),
            )
            .map_err(AgentError::Peers)?,
        );
        if let Some(t) = &cfg.peer_tls {
            crate::peer::server::check_tls(t).map_err(AgentError::Peers)?;
            info!("peer traffic uses mutual TLS");
        } else if cfg.peer_token.is_none() {
            warn!("peers are unauthenticated: only configured peers (--peers, --peer-dns) are used, but any host that reaches the peer port can read cached chunks (set --peer-token-file or mutual TLS)");
        }
        Some(m)
    } else {
        None
    };
    let verifier =
        membership.as_ref().map(|m| Verifier::new(origin.clone(), memory.clone(), m.clone(), metrics.clone(), tasks.clone(), stop.clone()));
    let mut sources: Vec<Arc<dyn ChunkSource>> = Vec::new();
    if let (Some(m), Some(v)) = (&membership, &verifier) {
        let peers = PeerSource::new(m.clone(), memory.clone(), draining.clone(), PeerTimeouts::within(cfg.read_timeout), metrics.clone())
            .with_verifier(v.clone());
        sources.push(Arc::new(peers));
    }
    sources.push(Arc::new(crate::origin::OriginSource::new(origin.clone(), memory.clone(), verifier.clone(), tasks.clone(), stop.clone())));
    let reader = Reader::new(
        memory.clone(),
        sources,
        ReaderOptions { chunk_size: cfg.chunk_size, read_timeout: cfg.read_timeout, readahead_budget: cfg.readahead_budget },
        metrics.clone(),
    );
    if let Some(v) = &verifier {
        v.set_reader(&reader);
    }
    let core = Arc::new(FsCore::new(catalog.clone(), reader.clone()));
    let peer_streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    if let (Some(m), Some(listen)) = (&membership, cfg.listen) {
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| AgentError::Listen(listen.to_string(), e))?;
        let server = PeerServer {
            catalog: catalog.clone(),
            reader: reader.clone(),
            metrics: metrics.clone(),
            membership: m.clone(),
            node_id: node_id.clone(),
            source: cfg.shown_source(),
            draining: draining.clone(),
            active: peer_streams.clone(),
            raw_data: cfg.peer_tls.is_none(),
        };
        info!(listen = %listen, node = %node_id, "serving chunks to peers");
        let (token, tls, stop, raw_tasks) = (cfg.peer_token.clone(), cfg.peer_tls.clone(), stop.clone(), tasks.clone());
        tasks.spawn(
            async move {
                if let Err(e) = crate::peer::server::serve(server, listener, token, tls, raw_tasks, stop).await {
                    warn!(error = %e, "peer server stopped");
                }
            }
            .instrument(tracing::info_span!("peer_server")),
        );
    }
    if let Some(m) = &membership {
        m.resolve().await;
        m.probe_all().await;
        info!(peers = m.all().len(), live = m.live().len(), "peer membership ready");
        tasks.spawn(m.clone().run(stop.clone()).instrument(tracing::info_span!("membership")));
    }

    // Admin endpoint.
    let ready = Arc::new(AtomicBool::new(false));
    let reporter = crate::preempt::report::Reporter::start(
        &cfg.preempt.webhooks,
        cfg.preempt.drain_hook.as_deref(),
        metrics.clone(),
        &tasks,
        stop.clone(),
    )
    .map_err(AgentError::Peers)?;
    let drain = crate::preempt::Drain::new(
        crate::preempt::DrainParts {
            ready: ready.clone(),
            draining: draining.clone(),
            peer_streams: peer_streams.clone(),
            membership: membership.clone(),
            metrics: metrics.clone(),
            node_id: node_id.clone(),
            peer_addr: cfg.listen.map(|l| l.to_string()),
            cached_bytes: {
                let m = memory.clone();
                Arc::new(move || m.used())
            },
        },
        reporter,
        tasks.clone(),
    );
    let listener = tokio::net::TcpListener::bind(cfg.admin).await.map_err(|e| AgentError::Admin(cfg.admin.to_string(), e))?;
    let status = {
        let (metrics, memory, catalog, core, ready) = (metrics.clone(), memory.clone(), catalog.clone(), core.clone(), ready.clone());
        let (membership, node_id, listen, drain, verifier) =
            (membership.clone(), node_id.clone(), cfg.listen, drain.clone(), verifier.clone());
        let (source, mountpoint) = (cfg.shown_source(), cfg.mountpoint.display().to_string());
        Arc::new(move || {
            serde_json::json!({
                "version": env!("CARGO_PKG_VERSION"),
                "source": source,
                "mountpoint": mountpoint,
                "ready": ready.load(Ordering::SeqCst),
                "drain_state": crate::preempt::state_name(drain.state()),
                "drain": drain.status(),
                "node_id": node_id,
                "listen": listen.map(|l| l.to_string()),
                "peers": membership.as_ref().map(|m| m.status()).unwrap_or(serde_json::Value::Array(vec![])),
                "verification": verifier.as_ref().map(|v| v.status()),
                "files": catalog.files().len(),
                "open_handles": core.open_handles(),
                "cache": { "used_bytes": memory.used(), "capacity_bytes": memory.capacity(), "chunk_size": memory.chunk_size() },
                "read_bytes": {
                    "memory": metrics.read_bytes_of(Tier::memory),
                    "peer": metrics.read_bytes_of(Tier::peer),
                    "origin": metrics.read_bytes_of(Tier::origin),
                },
                "origin": { "bytes": metrics.origin_bytes.get(), "requests": metrics.origin_requests.get(), "errors": metrics.origin_errors.get() },
            })
        })
    };
    let admin_state = AdminState {
        metrics: metrics.clone(),
        ready: ready.clone(),
        status,
        catalog: catalog.clone(),
        reader: reader.clone(),
        tasks: tasks.clone(),
        drain: drain.clone(),
        drain_timeout: cfg.preempt.drain_timeout,
        warm_jobs: Default::default(),
        stop: stop.clone(),
        guard: admin::guard::Guard::new(cfg.admin, cfg.admin_token.clone()),
    };
    info!(admin = %cfg.admin, "admin endpoint listening");
    tasks.spawn(admin::serve(listener, admin_state, stop.clone()).instrument(tracing::info_span!("admin")));

    // Mount.
    prepare_mountpoint(&cfg.mountpoint)?;
    let fuse_tasks = TaskTracker::new();
    let fs = CachefsFuse::new(core.clone(), metrics.clone(), tokio::runtime::Handle::current(), fuse_tasks.clone(), cfg.passthrough);
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
    fcfg.n_threads = Some(cfg.fuse_threads);
    fcfg.clone_fd = true;
    let mp = cfg.mountpoint.clone();
    let mut session = tokio::task::spawn_blocking(move || fuser::Session::new(fs, &mp, &fcfg))
        .await
        .map_err(|e| AgentError::Mount(cfg.mountpoint.display().to_string(), e.to_string()))?
        .map_err(|e| {
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied { " (mounting needs root or access to /dev/fuse)" } else { "" };
            AgentError::Mount(cfg.mountpoint.display().to_string(), format!("{e}{hint}"))
        })?;
    let mut unmounter = session.unmount_callable();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    let fuse_thread = std::thread::Builder::new()
        .name("fuse-session".into())
        .spawn(move || {
            let r = session.run();
            let _ = done_tx.send(r);
        })
        .map_err(|e| AgentError::Mount(cfg.mountpoint.display().to_string(), e.to_string()))?;
    set_read_ahead(&cfg.mountpoint);
    // Ready only once the mount answers (a statfs always reaches the agent).
    if !crate::systemd::mount_answers(&cfg.mountpoint, Duration::from_secs(10)).await {
        warn!("the new mount did not answer a statfs within 10 s");
    }
    ready.store(true, Ordering::SeqCst);
    crate::systemd::ready(&format!("serving {} at {}", cfg.shown_source(), cfg.mountpoint.display()));
    info!(mountpoint = %cfg.mountpoint.display(), "mounted; serving");
    if let Some(interval) = crate::systemd::watchdog_interval() {
        info!(?interval, "systemd watchdog enabled");
        tasks.spawn(crate::systemd::watchdog(cfg.mountpoint.clone(), interval, stop.clone()).instrument(tracing::info_span!("watchdog")));
    }

    // Preemption watch (off unless configured).
    crate::preempt::start_watch(&cfg.preempt, drain.clone(), &tasks, stop.clone());

    // Catalog refresh.
    {
        let (origin, catalog, stop, core) = (origin.clone(), catalog.clone(), stop.clone(), core.clone());
        let ttl = cfg.catalog_ttl;
        tasks.spawn(
            async move {
                let mut tick = tokio::time::interval(ttl);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    match list_versions(&origin).await {
                        Ok(v) => {
                            let ch = catalog.apply(v);
                            if ch.added + ch.changed + ch.removed > 0 {
                                info!(added = ch.added, changed = ch.changed, removed = ch.removed, "catalog refreshed");
                            }
                            core.retire(&ch.retired);
                        }
                        Err(e) => warn!(error = %e, "catalog refresh failed; keeping the previous listing"),
                    }
                }
            }
            .instrument(tracing::info_span!("catalog")),
        );
    }

    let mut done_rx = done_rx;
    let mut ended_outside = false;
    tokio::select! {
        _ = shutdown => {
            // Drain first: readiness off, peers told, their transfers finished; the mount keeps
            // serving until then. A second signal stops at once.
            info!(timeout = ?cfg.preempt.drain_timeout, "shutting down: draining first");
            drain.begin("shutdown signal (SIGTERM/SIGINT)", cfg.preempt.drain_timeout);
            tokio::select! {
                _ = drain.wait(cfg.preempt.drain_timeout + Duration::from_secs(1)) => {}
                _ = second_signal() => warn!("second signal: stopping without waiting for the drain"),
                r = &mut done_rx => {
                    warn!(result = ?r, "FUSE session ended (unmounted from outside?)");
                    ended_outside = true;
                }
            }
            drain.flush_reports(Duration::from_secs(5)).await;
        }
        r = &mut done_rx => {
            warn!(result = ?r, "FUSE session ended (unmounted from outside?)");
            ended_outside = true;
        }
    }

    // Ordered shutdown.
    crate::systemd::stopping();
    ready.store(false, Ordering::SeqCst);
    if let Err(e) = unmounter.unmount() {
        warn!(error = %e, "unmount failed; detaching lazily");
        if let Ok(c) = std::ffi::CString::new(cfg.mountpoint.as_os_str().as_encoded_bytes()) {
            // SAFETY: c is a valid NUL-terminated path.
            unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        }
    }
    // A file still open keeps a lazily detached session alive; do not wait for it forever.
    let ended = ended_outside || tokio::time::timeout(Duration::from_secs(5), &mut done_rx).await.is_ok();
    match ended {
        true => {
            let _ = fuse_thread.join();
        }
        false => warn!("FUSE session did not end within 5 s (files still open); exiting anyway"),
    }
    stop.cancel();
    reader.shutdown().await;
    fuse_tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), fuse_tasks.wait()).await;
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await;
    info!("stopped");
    Ok(())
}
