//! A running agent, built from parts that each own one concern: [`storage`] (origin, catalog,
//! memory tier, refresh), [`peers`] (membership, peer source, peer server), [`mount`] (the FUSE
//! session), the admin endpoint and the preemption watch. [`Agent::start`] builds them in that
//! order; [`RunningAgent::shutdown`] stops them: not ready → unmount → stop every task. One
//! cancellation token and one task tracker cover every spawned task.

pub mod mount;
pub mod peers;
pub mod status;
pub mod storage;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::admin::{self, AdminState};
use crate::cache::{Reader, ReaderOptions};
use crate::config::Config;
use crate::fs::FsCore;
use crate::metrics::Metrics;
use crate::preempt::{Drain, DrainParts};

pub use mount::{Mount, READ_AHEAD_KB};
pub use peers::Peers;
pub use storage::{list_versions, Storage};

/// How long a new mount may take to answer its first `statfs` before the agent reports ready anyway.
pub const MOUNT_ANSWER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long queued drain reports (webhooks, hook) may take to go out at shutdown.
pub const REPORT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the FUSE session thread may take to end after the unmount.
pub const FUSE_JOIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How long spawned tasks (and the reader's fills) may take to stop once cancelled.
pub const TASK_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// Waited beyond the drain's own deadline for it to end before stopping anyway.
pub const DRAIN_GRACE: Duration = Duration::from_secs(1);
/// How long blocking work left on the runtime (a FUSE thread kept by an open file) may hold the exit.
pub const RUNTIME_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Origin(#[from] crate::origin::OriginError),
    #[error("cannot list the source {0}: {1}")]
    List(String, String),
    #[error("the source {0} lists no files (check the bucket and prefix; --require-files is set)")]
    Empty(String),
    #[error("cannot use cache directory {0}: {1}")]
    CacheDir(String, std::io::Error),
    #[error("cannot listen on admin address {0}: {1}")]
    Admin(String, std::io::Error),
    #[error("cannot prepare mountpoint {0}: {1}")]
    Mountpoint(String, String),
    #[error("cannot mount at {0}: {1}")]
    Mount(String, String),
    #[error("peers: {0}")]
    Peers(#[from] crate::peer::membership::PeerSetupError),
    #[error("drain reports: {0}")]
    Reports(#[from] crate::preempt::report::ReportError),
    #[error("cannot listen for peers on {0}: {1}")]
    Listen(String, std::io::Error),
}

impl AgentError {
    /// The exit code of `cachefs mount` for this error (README, Exit codes): 2 for a source the
    /// configuration names wrongly, 1 for what went wrong at run time.
    pub fn exit_code(&self) -> u8 {
        match self {
            AgentError::Origin(e) if e.is_config() => crate::EXIT_USAGE,
            _ => crate::EXIT_RUNTIME,
        }
    }
}

/// What every part of a running agent shares: metrics, the one task tracker and cancellation
/// token, its identity in the mesh, and the flags the drain turns.
#[derive(Clone)]
pub struct Shared {
    pub metrics: Arc<Metrics>,
    pub tasks: TaskTracker,
    pub stop: CancellationToken,
    pub node_id: String,
    /// Mounted, serving and not draining (`/readyz`).
    pub ready: Arc<AtomicBool>,
    /// Draining: peers are told, new peer work is refused.
    pub draining: Arc<AtomicBool>,
    /// Chunk streams to peers in flight (a drain waits for them).
    pub peer_streams: Arc<AtomicUsize>,
}

impl Shared {
    fn new() -> Self {
        Shared {
            metrics: Arc::new(Metrics::new()),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            node_id: uuid::Uuid::new_v4().to_string(),
            ready: Default::default(),
            draining: Default::default(),
            peer_streams: Default::default(),
        }
    }
}

/// Builds a running agent.
pub struct Agent;

/// The one owner of a running agent: its parts and its shutdown.
pub struct RunningAgent {
    cfg: Config,
    shared: Shared,
    reader: Arc<Reader>,
    drain: Arc<Drain>,
    mount: Mount,
    /// Told at shutdown that this agent leaves.
    gossip: Option<Arc<crate::peer::gossip::Swim>>,
}

impl Agent {
    /// Build every part in order and mount; returns once the mount serves and readiness is on.
    pub async fn start(cfg: Config) -> Result<RunningAgent, AgentError> {
        mount::prepare_mountpoint(&cfg.fuse.mountpoint)?;
        let shared = Shared::new();
        let storage = Storage::open(&cfg.source, &cfg.cache, &cfg.shown_source(), &shared.metrics).await?;
        let peers = Peers::build(&cfg.peers, cfg.shown_source(), cfg.cache.read_timeout, &storage, &shared)?;
        let opts = ReaderOptions {
            chunk_size: cfg.cache.chunk_size,
            read_timeout: cfg.cache.read_timeout,
            readahead_budget: cfg.cache.readahead_budget,
        };
        let peer_source = peers.as_ref().map(|p| p.source(&storage, cfg.cache.read_timeout, &shared));
        let verifier = peers.as_ref().map(|p| p.verifier.clone());
        let tier = peer_source.clone().map(|s| s as Arc<dyn crate::cache::ChunkSource>);
        let reader = storage.reader(tier, verifier, opts, &shared.metrics, &shared.tasks, &shared.stop);
        let core = Arc::new(FsCore::new(storage.catalog.clone(), reader.clone()));
        if let (Some(p), Some(source)) = (&peers, peer_source) {
            p.serve(&cfg.peers, cfg.shown_source(), &storage, &reader, source, &shared).await?;
            p.join(&shared).await;
        }
        let handoff = peers.as_ref().map(|p| p.handoff(&storage, cfg.cache.read_timeout, &shared));
        let drain = start_drain(&cfg, &storage, peers.as_ref(), handoff, &shared)?;
        start_admin(&cfg, &storage, peers.as_ref(), &core, &reader, &drain, &shared).await?;
        let mount = Mount::start(&cfg.fuse, core.clone(), shared.metrics.clone()).await?;
        if let Some(p) = &peers {
            p.verifier.set_invalidate(mount.invalidator(storage.catalog.clone()));
        }
        shared.ready.store(true, Ordering::SeqCst);
        crate::systemd::ready(&format!("serving {} at {}", cfg.shown_source(), cfg.fuse.mountpoint.display()));
        info!(mountpoint = %cfg.fuse.mountpoint.display(), "mounted; serving");
        if let Some(interval) = crate::systemd::watchdog_interval() {
            info!(?interval, "systemd watchdog enabled");
            let dog = crate::systemd::watchdog(cfg.fuse.mountpoint.clone(), interval, shared.stop.clone());
            shared.tasks.spawn(dog.instrument(tracing::info_span!("watchdog")));
        }
        crate::preempt::start_watch(&cfg.preempt, drain.clone(), &shared.tasks, shared.stop.clone());
        storage.spawn_refresh(core, cfg.source.catalog_ttl, &shared.tasks, shared.stop.clone());
        let gossip = peers.as_ref().and_then(|p| p.gossip.clone());
        Ok(RunningAgent { cfg, shared, reader, drain, mount, gossip })
    }
}

fn start_drain(
    cfg: &Config,
    storage: &Storage,
    peers: Option<&Peers>,
    handoff: Option<Arc<dyn crate::preempt::HandOff>>,
    shared: &Shared,
) -> Result<Arc<Drain>, AgentError> {
    let p = &cfg.preempt;
    let reporter = crate::preempt::report::Reporter::start(
        &p.webhooks,
        p.drain_hook.as_deref(),
        shared.metrics.clone(),
        &shared.tasks,
        shared.stop.clone(),
    )
    .map_err(AgentError::Reports)?;
    let memory = storage.memory.clone();
    let parts = DrainParts {
        ready: shared.ready.clone(),
        draining: shared.draining.clone(),
        peer_streams: shared.peer_streams.clone(),
        membership: peers.map(|p| p.membership.clone()),
        metrics: shared.metrics.clone(),
        node_id: shared.node_id.clone(),
        peer_addr: cfg.peers.listen.map(|l| l.to_string()),
        cached_bytes: Arc::new(move || memory.used()),
        handoff,
    };
    Ok(Drain::new(parts, reporter, shared.tasks.clone()))
}

async fn start_admin(
    cfg: &Config,
    storage: &Storage,
    peers: Option<&Peers>,
    core: &Arc<FsCore>,
    reader: &Arc<Reader>,
    drain: &Arc<Drain>,
    shared: &Shared,
) -> Result<(), AgentError> {
    let addr = cfg.admin.addr;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| AgentError::Admin(addr.to_string(), e))?;
    let status = status::StatusParts {
        source: cfg.shown_source(),
        mountpoint: cfg.fuse.mountpoint.display().to_string(),
        node_id: shared.node_id.clone(),
        listen: cfg.peers.listen.map(|l| l.to_string()),
        ready: shared.ready.clone(),
        drain: drain.clone(),
        membership: peers.map(|p| p.membership.clone()),
        verifier: peers.map(|p| p.verifier.clone()),
        catalog: storage.catalog.clone(),
        core: core.clone(),
        memory: storage.memory.clone(),
        metrics: shared.metrics.clone(),
    };
    let state = AdminState {
        metrics: shared.metrics.clone(),
        ready: shared.ready.clone(),
        status: Arc::new(status),
        catalog: storage.catalog.clone(),
        reader: reader.clone(),
        tasks: shared.tasks.clone(),
        drain: drain.clone(),
        drain_timeout: cfg.preempt.drain_timeout,
        warm_jobs: Default::default(),
        stop: shared.stop.clone(),
        guard: admin::guard::Guard::new(addr, cfg.admin.token.clone()),
    };
    if state.guard.open_to_other_hosts() {
        warn!(admin = %addr, "the admin endpoint listens beyond loopback without a token: other hosts may read /metrics and /healthz, but its POSTs (/drain, /warm, /resume) are taken from this host only (set --admin-token-file to allow them)");
    }
    info!(admin = %addr, "admin endpoint listening");
    shared.tasks.spawn(admin::serve(listener, state, shared.stop.clone()).instrument(tracing::info_span!("admin")));
    Ok(())
}

impl RunningAgent {
    /// Serve until `shutdown` resolves (then drain first) or the mount goes away; then stop.
    pub async fn run_until(mut self, shutdown: impl Future<Output = ()>) {
        tokio::select! {
            _ = shutdown => self.drain_for_shutdown().await,
            _ = self.mount.ended() => {}
        }
        self.shutdown().await;
    }

    /// Drain first: readiness off, peers told, their transfers finished; the mount keeps
    /// serving until then. A second signal, or the mount going away, stops at once.
    async fn drain_for_shutdown(&mut self) {
        let timeout = self.cfg.preempt.drain_timeout;
        info!(?timeout, "shutting down: draining first");
        self.drain.begin(crate::preempt::Asker::Signal, timeout, crate::preempt::HandoffPolicy::IfTime);
        tokio::select! {
            _ = self.drain.wait(timeout + DRAIN_GRACE) => {}
            _ = shutdown_signal() => warn!("second signal: stopping without waiting for the drain"),
            _ = self.mount.ended() => {}
        }
        self.drain.flush_reports(REPORT_FLUSH_TIMEOUT).await;
    }

    /// Ordered stop: not ready → unmount and join the session → cancel and wait for every task.
    pub async fn shutdown(self) {
        crate::systemd::stopping();
        self.shared.ready.store(false, Ordering::SeqCst);
        let fuse_tasks = self.mount.stop().await;
        if let Some(g) = &self.gossip {
            g.leave().await;
        }
        self.shared.stop.cancel();
        self.reader.shutdown(TASK_STOP_TIMEOUT).await;
        mount::wait_tasks(&fuse_tasks).await;
        self.shared.tasks.close();
        mount::wait_tasks(&self.shared.tasks).await;
        info!("stopped");
    }
}

/// Start the agent and serve until `shutdown` resolves (or the mount goes away), then stop.
pub async fn run(cfg: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    Agent::start(cfg).await?.run_until(shutdown).await;
    Ok(())
}

/// Resolves on the next SIGTERM or SIGINT (never, if signals cannot be watched).
pub async fn shutdown_signal() {
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
