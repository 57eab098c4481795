//! Preemption: one watcher per cloud behind [`Watcher`], the drain state machine [`Drain`]
//! (`serving → draining → drained`) and its reporters (webhooks, hook command, systemd status).
//!
//! # Contract
//! - A watcher turns metadata answers into [`Signal`]s. It never reports a termination for a body
//!   it did not fully parse: malformed answers are errors, logged and retried, never a drain.
//! - Draining starts on a termination notice, on `cachefs drain`, or on SIGTERM. While draining:
//!   `/readyz` answers 503, `cachefs_drain_state` is 1, peers are told and stop choosing this
//!   agent for new chunks, streams already being served continue, and the FUSE mount keeps
//!   serving local readers. `drained` (2) when no peer transfer is in flight, or at the deadline
//!   minus a safety margin, whichever comes first.
//! - The deadline is the notice's termination time, or now + the provider's warning time.
//! - Before `drained`, chunks that no other agent holds are handed off to the peers that will
//!   own them ([`HandOff`]): always on a notice and on `cachefs drain --handoff`; on a shutdown
//!   signal only when the drain timeout leaves time for them; never past the drained-by time.
//!   `drain_ready` says how many of those bytes were handed off and how many are lost. A drain
//!   that is cancelled (notice withdrawn, `cachefs resume`) stops its handoff.
//! - Every transition is reported once: `preemption_notice`, `rebalance_recommendation`,
//!   `drain_ready`, `drain_cancelled` (a notice the provider withdrew).

pub mod aliyun;
pub mod aws;
pub mod azure;
pub mod detect;
pub mod gcp;
pub mod http;
pub mod report;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::metrics::Metrics;
use crate::peer::Membership;
use report::Reporter;

pub const SERVING: u8 = 0;
pub const DRAINING: u8 = 1;
pub const DRAINED: u8 = 2;

pub fn state_name(s: u8) -> &'static str {
    match s {
        SERVING => "serving",
        DRAINING => "draining",
        _ => "drained",
    }
}

/// Where preemption notices come from (`--preemption-provider`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    None,
    Auto,
    Aliyun,
    Aws,
    Gcp,
    Azure,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::None => "none",
            Provider::Auto => "auto",
            Provider::Aliyun => "aliyun",
            Provider::Aws => "aws",
            Provider::Gcp => "gcp",
            Provider::Azure => "azure",
        }
    }

    /// The metadata service's scheme and host.
    pub fn default_endpoint(self) -> &'static str {
        match self {
            Provider::Aliyun => "http://100.100.100.200",
            Provider::Gcp => "http://metadata.google.internal",
            _ => "http://169.254.169.254",
        }
    }

    /// How long before reclamation a notice comes, when the notice has no time of its own.
    pub fn warning(self) -> Duration {
        match self {
            Provider::Aliyun => Duration::from_secs(300),
            Provider::Aws => Duration::from_secs(120),
            _ => Duration::from_secs(30),
        }
    }

    /// Pause between polls (GCP long-polls and paces itself).
    pub fn default_poll(self) -> Duration {
        match self {
            Provider::Azure => Duration::from_secs(1),
            Provider::Gcp => Duration::ZERO,
            _ => Duration::from_secs(2),
        }
    }
}

/// Settings of the watch and of the reporters.
#[derive(Debug, Clone)]
pub struct PreemptConfig {
    pub provider: Provider,
    /// Overrides every provider's base URL (scheme and host), e.g. a fake on 127.0.0.1.
    pub metadata_endpoint: Option<String>,
    pub poll_interval: Option<Duration>,
    /// Treat an AWS rebalance recommendation as a termination notice.
    pub drain_on_rebalance: bool,
    /// Tell Azure to go ahead (`StartRequests`) once drained.
    pub azure_acknowledge: bool,
    pub webhooks: Vec<String>,
    pub drain_hook: Option<String>,
    /// Deadline of a drain started by `cachefs drain` or SIGTERM.
    pub drain_timeout: Duration,
}

impl Default for PreemptConfig {
    fn default() -> Self {
        PreemptConfig {
            provider: Provider::None,
            metadata_endpoint: None,
            poll_interval: None,
            drain_on_rebalance: false,
            azure_acknowledge: false,
            webhooks: Vec::new(),
            drain_hook: None,
            drain_timeout: Duration::from_secs(crate::config::DEFAULT_DRAIN_TIMEOUT_SECS),
        }
    }
}

/// What one check of the metadata service found.
#[derive(Debug, Clone, PartialEq)]
pub enum Signal {
    /// The instance will be reclaimed, at `time` when the provider says.
    Termination { time: Option<DateTime<Utc>>, what: String, event_id: Option<String> },
    /// A hint that reclamation is more likely (AWS rebalance recommendation).
    Rebalance { time: Option<DateTime<Utc>> },
    /// The provider says positively that no termination is scheduled (cancels one in effect).
    Clear,
}

#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    #[error("metadata service unreachable: {0}")]
    Unreachable(String),
    #[error("metadata service answered HTTP {0}")]
    Status(u16),
    #[error("malformed metadata answer: {0}")]
    Malformed(String),
}

/// One cloud's metadata service.
pub trait Watcher: Send {
    fn provider(&self) -> Provider;
    /// Pause after a successful check (zero when `check` long-polls).
    fn interval(&self) -> Duration;
    /// This instance's id for reports; None when it cannot be read now (asked again later).
    fn instance_id(&mut self) -> impl Future<Output = Option<String>> + Send;
    /// Ask once. An empty list means no notice; errors are retried with backoff.
    fn check(&mut self) -> impl Future<Output = Result<Vec<Signal>, WatchError>> + Send;
    /// Let the platform proceed once drained (Azure `StartRequests`); others do nothing.
    fn acknowledge(&mut self, _event_id: &str) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Parse an RFC 3339 time (`2017-09-18T08:22:00Z`).
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim()).ok().map(|t| t.with_timezone(&Utc))
}

/// Poll `w` until `stop`, driving `drain`. Tracks the notice in effect so each is acted on once.
pub async fn watch<W: Watcher>(mut w: W, drain: Arc<Drain>, cfg: PreemptConfig, stop: CancellationToken) {
    let provider = w.provider();
    drain.set_provider(provider);
    let mut backoff = http::Backoff::new(Duration::from_secs(5));
    let mut instance_known = false;
    let mut seen = Seen::default();
    let mut states = drain.subscribe();
    info!(provider = provider.name(), interval = ?w.interval(), "watching for preemption notices");
    loop {
        if !instance_known {
            tokio::select! {
                _ = stop.cancelled() => return,
                id = w.instance_id() => if let Some(id) = id {
                    info!(provider = provider.name(), instance_id = %id, "instance identified");
                    drain.set_instance_id(id);
                    instance_known = true;
                },
            }
        }
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = w.check() => r,
        };
        let pause = match result {
            Ok(signals) => {
                backoff.reset();
                for s in signals {
                    seen.apply(s, provider, &drain, &cfg);
                }
                w.interval()
            }
            Err(e) => {
                drain.metrics.metadata_errors.inc();
                let d = backoff.next_delay();
                warn!(provider = provider.name(), error = %e, retry_in = ?d, "metadata check failed; no action taken");
                d
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
            _ = states.changed() => {}
        }
        if cfg.azure_acknowledge && drain.state() == DRAINED {
            if let Some(id) = seen.ack.take() {
                w.acknowledge(&id).await;
            }
        }
    }
}

/// What a watcher has acted on so far: each signal acts once.
#[derive(Default)]
struct Seen {
    notice: Option<Signal>,
    rebalance: Option<Option<DateTime<Utc>>>,
    /// The event to acknowledge once drained (Azure).
    ack: Option<String>,
}

impl Seen {
    fn apply(&mut self, s: Signal, provider: Provider, drain: &Arc<Drain>, cfg: &PreemptConfig) {
        match s {
            Signal::Termination { time, ref what, ref event_id } => {
                if self.notice.as_ref() == Some(&s) {
                    return;
                }
                info!(provider = provider.name(), what = %what, termination_time = ?time, "preemption notice");
                self.ack = event_id.clone();
                drain.notice(provider, time, what);
                self.notice = Some(s);
            }
            Signal::Rebalance { time } => {
                if self.rebalance == Some(time) {
                    return;
                }
                self.rebalance = Some(time);
                info!(provider = provider.name(), notice_time = ?time, "rebalance recommendation");
                drain.rebalance(time);
                if cfg.drain_on_rebalance && self.notice.is_none() {
                    let what = "rebalance recommendation (drain-on-rebalance)";
                    drain.notice(provider, None, what);
                    self.notice = Some(Signal::Termination { time: None, what: what.into(), event_id: None });
                }
            }
            Signal::Clear => {
                if self.notice.take().is_some() {
                    info!(provider = provider.name(), "the provider withdrew its notice");
                    self.ack = None;
                    drain.cancel();
                }
            }
        }
    }
}

/// Who asked for a drain that no cloud notice started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Asker {
    /// `cachefs drain` (`POST /drain`): `cachefs resume` can undo it.
    Operator,
    /// SIGTERM or SIGINT: the agent stops once drained.
    Signal,
}

impl Asker {
    fn reason(self) -> &'static str {
        match self {
            Asker::Operator => "manual drain (cachefs drain)",
            Asker::Signal => "shutdown signal (SIGTERM/SIGINT)",
        }
    }
}

/// When a drain hands off the chunks that no other agent holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub enum HandoffPolicy {
    /// Count them (reported as lost), send none.
    #[default]
    Never,
    /// Send them if the time left looks enough for all of them (a shutdown signal).
    IfTime,
    /// Send as many as the time allows (a preemption notice, `drain --handoff`).
    Always,
}

/// What a handoff did: bytes of chunks no other agent held, and of those the bytes that
/// another agent holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandoffReport {
    pub sole_bytes: u64,
    pub handed_off_bytes: u64,
}

impl HandoffReport {
    pub fn lost_bytes(&self) -> u64 {
        self.sole_bytes.saturating_sub(self.handed_off_bytes)
    }
}

/// The peer side of a handoff (see `peer::handoff`).
pub trait HandOff: Send + Sync {
    /// Find the sole copies and, as `policy` says, hand them off until `until`.
    fn run(&self, until: Instant, policy: HandoffPolicy) -> futures::future::BoxFuture<'_, HandoffReport>;
}

/// Why and until when a drain runs; shown by `/status`, sent in reports.
#[derive(Debug, Clone, Default)]
struct DrainInfo {
    provider: Option<Provider>,
    instance_id: Option<String>,
    reason: Option<String>,
    /// A cloud notice (can be withdrawn) asked for this drain.
    from_notice: bool,
    /// `cachefs drain` or SIGTERM asked for it too: a withdrawn notice does not end it.
    manual: bool,
    /// A shutdown signal asked for it: the process is stopping, `resume` cannot undo it.
    from_signal: bool,
    notice_time: Option<DateTime<Utc>>,
    termination_time: Option<DateTime<Utc>>,
    deadline: Option<DateTime<Utc>>,
    /// When `drained` is declared at the latest (deadline minus the safety margin).
    drained_by: Option<Instant>,
    drained_time: Option<DateTime<Utc>>,
    /// Bumped by each start and cancel: a finisher of an older drain stops.
    generation: u64,
    /// The strongest handoff any start of this drain asked for.
    handoff: HandoffPolicy,
    /// What the handoff did, once it ran.
    handed: Option<HandoffReport>,
}

/// What the drain machine acts on.
pub struct DrainParts {
    /// Shared with `/readyz`.
    pub ready: Arc<AtomicBool>,
    /// Shared with the peer tier and server (not an owner, says so in Hello).
    pub draining: Arc<AtomicBool>,
    /// Chunk streams this agent is serving to peers.
    pub peer_streams: Arc<AtomicUsize>,
    pub membership: Option<Arc<Membership>>,
    pub metrics: Arc<Metrics>,
    pub node_id: String,
    pub peer_addr: Option<String>,
    pub cached_bytes: Arc<dyn Fn() -> u64 + Send + Sync>,
    /// Hands off sole copies (None without peers).
    pub handoff: Option<Arc<dyn HandOff>>,
}

pub struct Drain {
    state: watch::Sender<u8>,
    info: Mutex<DrainInfo>,
    parts: DrainParts,
    pub metrics: Arc<Metrics>,
    reporter: Reporter,
    tasks: TaskTracker,
}

/// Time kept between `drained` and the deadline: a tenth of the window, 1 to 10 s.
fn safety_margin(window: Duration) -> Duration {
    (window / 10).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

impl Drain {
    pub fn new(parts: DrainParts, reporter: Reporter, tasks: TaskTracker) -> Arc<Drain> {
        Arc::new(Drain {
            state: watch::Sender::new(SERVING),
            info: Mutex::default(),
            metrics: parts.metrics.clone(),
            parts,
            reporter,
            tasks,
        })
    }

    pub fn state(&self) -> u8 {
        *self.state.borrow()
    }

    pub fn subscribe(&self) -> watch::Receiver<u8> {
        self.state.subscribe()
    }

    fn info(&self) -> std::sync::MutexGuard<'_, DrainInfo> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_provider(&self, p: Provider) {
        self.info().provider = Some(p);
    }

    pub fn set_instance_id(&self, id: String) {
        self.info().instance_id = Some(id);
    }

    /// The JSON webhook event (docs/ARCHITECTURE.md, Contracts).
    fn event(&self, kind: &str, info: &DrainInfo) -> serde_json::Value {
        let t = |t: &Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        serde_json::json!({
            "event": kind,
            "provider": info.provider.map(|p| p.name()).unwrap_or("none"),
            "instance_id": info.instance_id,
            "node": self.parts.node_id,
            "notice_time": t(&info.notice_time),
            "termination_time": t(&info.termination_time),
            "deadline": t(&info.deadline),
            "reason": info.reason,
            "peer_addr": self.parts.peer_addr,
            "cached_bytes": (self.parts.cached_bytes)(),
            "handed_off_bytes": info.handed.map(|h| h.handed_off_bytes),
            "lost_bytes": info.handed.map(|h| h.lost_bytes()),
        })
    }

    fn report(&self, kind: &str, info: &DrainInfo) {
        let deadline = info.drained_by.map(|d| d + Duration::from_secs(10)).unwrap_or_else(|| Instant::now() + Duration::from_secs(30));
        self.reporter.send(self.event(kind, info), deadline);
    }

    /// A termination notice from the cloud: report it and drain (or shorten a running drain).
    pub fn notice(self: &Arc<Self>, provider: Provider, time: Option<DateTime<Utc>>, what: &str) {
        self.metrics.preemption_notices.inc();
        let now = Utc::now();
        let deadline = time.unwrap_or(now + provider.warning());
        self.start(format!("{}: {what}", provider.name()), HandoffPolicy::Always, Some(now), time, deadline);
    }

    /// A hint only: reported, no drain.
    pub fn rebalance(&self, time: Option<DateTime<Utc>>) {
        let mut info = self.info().clone();
        info.notice_time = time.or(Some(Utc::now()));
        self.report("rebalance_recommendation", &info);
    }

    /// `cachefs drain` or SIGTERM (`by`): drain with `timeout` as the deadline, handing off as
    /// `handoff` says. False if one is already running (its deadline is shortened when this one
    /// is earlier).
    pub fn begin(self: &Arc<Self>, by: Asker, timeout: Duration, handoff: HandoffPolicy) -> bool {
        let deadline = Utc::now() + timeout;
        if by == Asker::Signal {
            self.info().from_signal = true;
        }
        self.start(by.reason().to_string(), handoff, None, None, deadline)
    }

    fn start(
        self: &Arc<Self>,
        reason: String,
        handoff: HandoffPolicy,
        notice_time: Option<DateTime<Utc>>,
        termination_time: Option<DateTime<Utc>>,
        deadline: DateTime<Utc>,
    ) -> bool {
        let window = (deadline - Utc::now()).to_std().unwrap_or(Duration::ZERO);
        let drained_by = Instant::now() + window.saturating_sub(safety_margin(window));
        let from_notice = notice_time.is_some();
        let mut info = self.info();
        info.handoff = info.handoff.max(handoff);
        if from_notice {
            info.from_notice = true;
            info.notice_time = notice_time;
            info.termination_time = termination_time;
        } else {
            info.manual = true;
        }
        if self.state() != SERVING {
            if info.drained_by.is_none_or(|d| drained_by < d) {
                info.drained_by = Some(drained_by);
                info.deadline = Some(deadline);
            }
            if from_notice {
                info.reason = Some(reason);
                self.report("preemption_notice", &info);
            }
            return false;
        }
        info.reason = Some(reason.clone());
        info.deadline = Some(deadline);
        info.drained_by = Some(drained_by);
        info.drained_time = None;
        info.handed = None;
        info.generation += 1;
        let generation = info.generation;
        info!(reason = %reason, deadline = %deadline.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "draining: readiness off, peers told; local readers keep being served");
        self.parts.ready.store(false, Ordering::SeqCst);
        self.parts.draining.store(true, Ordering::SeqCst);
        self.metrics.drain_state.set(DRAINING as i64);
        self.state.send_replace(DRAINING);
        crate::systemd::status(&format!("draining: {reason}"));
        if from_notice {
            self.report("preemption_notice", &info);
        }
        drop(info);
        let me = self.clone();
        self.tasks.spawn(async move { me.finish(generation).await });
        true
    }

    /// Tell peers, hand off sole copies, wait for in-flight peer transfers (all at most until
    /// `drained_by`), declare drained.
    async fn finish(self: Arc<Self>, generation: u64) {
        if let Some(m) = &self.parts.membership {
            let by = self.info().drained_by.unwrap_or_else(Instant::now);
            if tokio::time::timeout_at(by, m.announce_drain(true)).await.is_err() {
                warn!("telling peers about the drain ran out of time");
            }
        }
        self.hand_off(generation).await;
        loop {
            let by = {
                let info = self.info();
                if info.generation != generation {
                    return;
                }
                info.drained_by
            };
            let idle = self.parts.peer_streams.load(Ordering::SeqCst) == 0;
            if idle || by.is_some_and(|b| Instant::now() >= b) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut info = self.info();
        if info.generation != generation || self.state() != DRAINING {
            return;
        }
        let in_flight = self.parts.peer_streams.load(Ordering::SeqCst);
        info.drained_time = Some(Utc::now());
        self.metrics.drain_state.set(DRAINED as i64);
        self.state.send_replace(DRAINED);
        crate::systemd::status("drained: ready to be stopped");
        if in_flight > 0 {
            warn!(in_flight, "drain deadline reached with peer transfers still in flight");
        }
        info!(in_flight, "drain_ready");
        self.report("drain_ready", &info);
    }

    /// Hand off what no other agent holds, as the drain's policy says, until `drained_by`.
    async fn hand_off(&self, generation: u64) {
        let Some(h) = &self.parts.handoff else { return };
        let (policy, by) = {
            let info = self.info();
            (info.handoff, info.drained_by.unwrap_or_else(Instant::now))
        };
        // A drain cancelled or resumed meanwhile stops its handoff (its requests are dropped).
        let mut state = self.subscribe();
        let report = tokio::select! {
            r = h.run(by, policy) => r,
            _ = state.wait_for(|s| *s == SERVING) => {
                info!("drain cancelled: handoff stopped");
                return;
            }
        };
        self.metrics.handoff_lost_bytes.set(report.lost_bytes() as i64);
        info!(sole_bytes = report.sole_bytes, handed_off = report.handed_off_bytes, lost = report.lost_bytes(), "handoff done");
        let mut info = self.info();
        if info.generation == generation {
            info.handed = Some(report);
        }
    }

    /// The provider withdrew its notice: serve again, unless an operator or a signal asked for
    /// the drain too (then it goes on, without the notice's times).
    pub fn cancel(self: &Arc<Self>) {
        let mut info = self.info();
        if self.state() == SERVING || !info.from_notice {
            return;
        }
        if info.manual {
            info!("the provider withdrew its notice; still draining, as an operator or a shutdown signal asked for it too");
            (info.from_notice, info.notice_time, info.termination_time) = (false, None, None);
            return;
        }
        self.serve_again(info, "serving (preemption notice withdrawn)");
    }

    /// `cachefs resume`: serve again after a drain an operator asked for. Refused (with the
    /// reason) while a preemption notice or a shutdown signal holds the drain; nothing to do
    /// when serving.
    pub fn resume(self: &Arc<Self>) -> Result<(), String> {
        let info = self.info();
        if self.state() == SERVING {
            return Ok(());
        }
        if info.from_notice {
            let why = info.reason.as_deref().unwrap_or("a cloud notice");
            return Err(format!("a preemption notice holds this drain ({why}); it ends only if the provider withdraws it"));
        }
        if info.from_signal {
            return Err("the agent is shutting down (SIGTERM/SIGINT); it cannot resume".into());
        }
        self.serve_again(info, "serving (resumed by an operator)");
        Ok(())
    }

    /// Readiness back on, peers told, `drain_cancelled` reported; a running finisher stops.
    fn serve_again(self: &Arc<Self>, mut info: std::sync::MutexGuard<'_, DrainInfo>, why: &str) {
        info.generation += 1;
        self.parts.draining.store(false, Ordering::SeqCst);
        self.parts.ready.store(true, Ordering::SeqCst);
        self.metrics.drain_state.set(SERVING as i64);
        self.state.send_replace(SERVING);
        crate::systemd::status(why);
        info!(why, "drain cancelled: serving again");
        self.report("drain_cancelled", &info);
        *info =
            DrainInfo { provider: info.provider, instance_id: info.instance_id.clone(), generation: info.generation, ..Default::default() };
        drop(info);
        if let Some(m) = self.parts.membership.clone() {
            self.tasks.spawn(async move { m.announce_drain(false).await });
        }
    }

    /// Wait until the drain in progress ends (drained or cancelled), at most `limit`.
    pub async fn wait(&self, limit: Duration) {
        let mut rx = self.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| *s != DRAINING)).await;
    }

    /// Wait until queued reports are delivered or given up, at most `limit`.
    pub async fn flush_reports(&self, limit: Duration) {
        self.reporter.flush(limit).await;
    }

    /// For `/status`.
    pub fn status(&self) -> DrainStatus {
        let info = self.info().clone();
        let t = |t: &Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true));
        DrainStatus {
            state: state_name(self.state()).to_string(),
            provider: info.provider.map(|p| p.name()).unwrap_or("none").to_string(),
            instance_id: info.instance_id.clone(),
            reason: info.reason.clone(),
            notice_time: t(&info.notice_time),
            termination_time: t(&info.termination_time),
            deadline: t(&info.deadline),
            drained_time: t(&info.drained_time),
            peer_streams: self.parts.peer_streams.load(Ordering::SeqCst),
            handed_off_bytes: info.handed.map(|h| h.handed_off_bytes),
            lost_bytes: info.handed.map(|h| h.lost_bytes()),
        }
    }
}

/// The drain as `/status` shows it (times in RFC 3339, seconds).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct DrainStatus {
    /// serving, draining or drained.
    pub state: String,
    /// The watched cloud, or none.
    pub provider: String,
    pub instance_id: Option<String>,
    /// Why the drain began; None while serving.
    pub reason: Option<String>,
    pub notice_time: Option<String>,
    pub termination_time: Option<String>,
    pub deadline: Option<String>,
    pub drained_time: Option<String>,
    /// Chunk streams to peers in flight.
    pub peer_streams: usize,
    /// Of the chunks no other agent held: bytes handed off, and bytes lost (once handed off).
    #[serde(default)]
    pub handed_off_bytes: Option<u64>,
    #[serde(default)]
    pub lost_bytes: Option<u64>,
}

/// Start the configured watcher as a tracked task. `auto` detects the cloud inside that task
/// (a few tries over about 20 s: a metadata service can be slow at boot), so startup never waits.
pub fn start_watch(cfg: &PreemptConfig, drain: Arc<Drain>, tasks: &TaskTracker, stop: CancellationToken) {
    use tracing::Instrument;
    if cfg.provider == Provider::None {
        info!("preemption watch off (--preemption-provider none)");
        return;
    }
    let cfg = cfg.clone();
    tasks.spawn(
        async move {
            let provider = match cfg.provider {
                Provider::Auto => {
                    let mut found = None;
                    for pause in [0u64, 5, 15] {
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(pause)) => {}
                        }
                        found = tokio::select! {
                            _ = stop.cancelled() => return,
                            p = detect::detect(cfg.metadata_endpoint.as_deref()) => p,
                        };
                        if found.is_some() {
                            break;
                        }
                    }
                    match found {
                        Some(p) => {
                            info!(provider = p.name(), "cloud detected");
                            p
                        }
                        None => {
                            warn!("--preemption-provider auto: no cloud metadata service answered; preemption watch off");
                            return;
                        }
                    }
                }
                p => p,
            };
            drain.set_provider(provider);
            let endpoint = cfg.metadata_endpoint.clone().unwrap_or_else(|| provider.default_endpoint().to_string());
            let interval = cfg.poll_interval.unwrap_or(provider.default_poll());
            // One watcher type per provider; each is run the same way.
            macro_rules! run {
                ($w:expr) => {
                    match $w {
                        Ok(w) => watch(w, drain, cfg, stop).await,
                        Err(e) => warn!(error = %crate::error::report(&e), "cannot build the metadata client: preemption watch off"),
                    }
                };
            }
            match provider {
                Provider::Aliyun => run!(aliyun::Aliyun::new(&endpoint, interval)),
                Provider::Aws => run!(aws::Aws::new(&endpoint, interval)),
                Provider::Gcp => run!(gcp::Gcp::new(&endpoint, interval)),
                Provider::Azure => run!(azure::Azure::new(&endpoint, interval)),
                Provider::None | Provider::Auto => {}
            }
        }
        .instrument(tracing::info_span!("preempt")),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Option<DateTime<Utc>> {
        parse_time(s)
    }

    #[test]
    fn aliyun_answers() {
        assert_eq!(aliyun::interpret(404, "<html>not found</html>").unwrap(), vec![]);
        assert_eq!(aliyun::interpret(200, "").unwrap(), vec![]);
        let s = aliyun::interpret(200, "2015-01-05T18:02:00Z").unwrap();
        assert!(matches!(&s[..], [Signal::Termination { time, .. }] if *time == t("2015-01-05T18:02:00Z")));
        for bad in ["<html>", "2015-01-05 18:02", "tomorrow"] {
            assert!(matches!(aliyun::interpret(200, bad), Err(WatchError::Malformed(_))), "{bad}");
        }
        assert!(matches!(aliyun::interpret(500, ""), Err(WatchError::Status(500))));
    }

    #[test]
    fn aws_answers() {
        assert_eq!(
            aws::interpret_action(404, "{\"action\": \"terminate\", \"time\": \"2017-09-18T08:22:00Z\"}").unwrap(),
            None,
            "status, not body"
        );
        let s = aws::interpret_action(200, r#"{"action": "terminate", "time": "2017-09-18T08:22:00Z"}"#).unwrap();
        assert!(matches!(s, Some(Signal::Termination { time, .. }) if time == t("2017-09-18T08:22:00Z")));
        for bad in [
            r#"{"action": "terminate", "time": "2017-09-18T08:22"#,
            "<html></html>",
            "",
            r#"{"action": "explode", "time": "2017-09-18T08:22:00Z"}"#,
            r#"{"action": "stop", "time": "18/09/2017"}"#,
        ] {
            assert!(matches!(aws::interpret_action(200, bad), Err(WatchError::Malformed(_))), "{bad}");
        }
        let r = aws::interpret_rebalance(200, r#"{"noticeTime": "2020-10-27T08:22:00Z"}"#).unwrap();
        assert_eq!(r, Some(Signal::Rebalance { time: t("2020-10-27T08:22:00Z") }));
        assert_eq!(aws::interpret_rebalance(404, "").unwrap(), None);
    }

    #[test]
    fn azure_answers() {
        let none = r#"{"DocumentIncarnation": 1, "Events": []}"#;
        assert_eq!(azure::interpret(200, none, "vm-a").unwrap(), vec![Signal::Clear]);
        let ev = |ty: &str, res: &str, nb: &str| {
            format!(
                r#"{{"DocumentIncarnation": 2, "Events": [{{"EventId": "E1", "EventType": "{ty}", "ResourceType": "VirtualMachine", "Resources": ["{res}"], "EventStatus": "Scheduled", "NotBefore": "{nb}", "Description": "", "EventSource": "Platform", "DurationInSeconds": -1}}]}}"#
            )
        };
        let s = azure::interpret(200, &ev("Preempt", "vm-a", "Mon, 19 Sep 2016 18:29:47 GMT"), "vm-a").unwrap();
        assert!(
            matches!(&s[..], [Signal::Termination { time, event_id: Some(id), .. }] if *time == t("2016-09-19T18:29:47Z") && id == "E1")
        );
        assert_eq!(
            azure::interpret(200, &ev("Preempt", "vm-b", "Mon, 19 Sep 2016 18:29:47 GMT"), "vm-a").unwrap(),
            vec![Signal::Clear],
            "another VM's event"
        );
        assert_eq!(azure::interpret(200, &ev("Reboot", "vm-a", ""), "vm-a").unwrap(), vec![Signal::Clear]);
        let started = azure::interpret(200, &ev("Terminate", "vm-a", ""), "vm-a").unwrap();
        assert!(matches!(&started[..], [Signal::Termination { time: None, .. }]));
        assert!(matches!(azure::interpret(200, &ev("Preempt", "vm-a", "2016-09-19"), "vm-a"), Err(WatchError::Malformed(_))));
        assert!(matches!(azure::interpret(200, "{\"Events\": [", "vm-a"), Err(WatchError::Malformed(_))));
        assert!(matches!(azure::interpret(400, "", "vm-a"), Err(WatchError::Status(400))));
    }

    #[tokio::test]
    async fn auto_finds_nothing_where_nothing_answers() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert_eq!(detect::detect(Some(&format!("http://127.0.0.1:{port}"))).await, None);
    }

    #[test]
    fn margin_is_bounded() {
        assert_eq!(safety_margin(Duration::from_secs(120)), Duration::from_secs(10));
        assert_eq!(safety_margin(Duration::from_secs(30)), Duration::from_secs(3));
        assert_eq!(safety_margin(Duration::from_secs(2)), Duration::from_secs(1));
        assert_eq!(safety_margin(Duration::from_secs(3000)), Duration::from_secs(10));
    }

    fn drain() -> (Arc<Drain>, Arc<AtomicUsize>, Arc<AtomicBool>) {
        drain_with(None)
    }

    fn drain_with(handoff: Option<Arc<dyn HandOff>>) -> (Arc<Drain>, Arc<AtomicUsize>, Arc<AtomicBool>) {
        let streams = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(true));
        let parts = DrainParts {
            ready: ready.clone(),
            draining: Arc::new(AtomicBool::new(false)),
            peer_streams: streams.clone(),
            membership: None,
            metrics: Arc::new(Metrics::new()),
            node_id: "n".into(),
            peer_addr: None,
            cached_bytes: Arc::new(|| 7),
            handoff,
        };
        (Drain::new(parts, Reporter::none(), TaskTracker::new()), streams, ready)
    }

    #[tokio::test]
    async fn drained_after_streams_end_and_cancel_serves_again() {
        let (d, streams, ready) = drain();
        streams.store(1, Ordering::SeqCst);
        d.notice(Provider::Aws, Some(Utc::now() + chrono::Duration::seconds(120)), "test");
        assert_eq!(d.state(), DRAINING);
        assert!(!ready.load(Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(d.state(), DRAINING, "a stream is still in flight");
        streams.store(0, Ordering::SeqCst);
        d.wait(Duration::from_secs(2)).await;
        assert_eq!(d.state(), DRAINED);
        assert_eq!(d.metrics.drain_state.get(), 2);
        d.cancel();
        assert_eq!(d.state(), SERVING);
        assert!(ready.load(Ordering::SeqCst));
        // A manual drain is not withdrawn by the provider.
        assert!(d.begin(Asker::Operator, Duration::from_secs(5), HandoffPolicy::Never));
        d.cancel();
        assert_ne!(d.state(), SERVING);
    }

    #[tokio::test]
    async fn a_withdrawn_notice_does_not_cancel_an_operator_drain() {
        let (d, _, ready) = drain();
        assert!(d.begin(Asker::Signal, Duration::from_secs(30), HandoffPolicy::IfTime));
        d.notice(Provider::Aws, Some(Utc::now() + chrono::Duration::seconds(120)), "spot interruption");
        d.cancel();
        assert_ne!(d.state(), SERVING, "SIGTERM asked for this drain: the notice's withdrawal does not end it");
        assert!(!ready.load(Ordering::SeqCst));
        // A notice alone is still withdrawn.
        let (d, _, ready) = drain();
        d.notice(Provider::Aws, None, "spot interruption");
        d.cancel();
        assert_eq!(d.state(), SERVING);
        assert!(ready.load(Ordering::SeqCst));
    }

    /// A handoff that runs until its deadline and says when it is dropped.
    struct SlowHandoff(Arc<AtomicBool>);

    struct SetOnDrop(Arc<AtomicBool>);

    impl Drop for SetOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    impl HandOff for SlowHandoff {
        fn run(&self, until: Instant, _: HandoffPolicy) -> futures::future::BoxFuture<'_, HandoffReport> {
            let guard = SetOnDrop(self.0.clone());
            Box::pin(async move {
                tokio::time::sleep_until(until).await;
                drop(guard);
                HandoffReport::default()
            })
        }
    }

    #[tokio::test]
    async fn resume_stops_a_handoff_in_progress() {
        let dropped = Arc::new(AtomicBool::new(false));
        let (d, _, _) = drain_with(Some(Arc::new(SlowHandoff(dropped.clone()))));
        d.begin(Asker::Operator, Duration::from_secs(60), HandoffPolicy::Always);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!dropped.load(Ordering::SeqCst), "the handoff runs while draining");
        assert_eq!(d.resume(), Ok(()));
        let mut stopped = false;
        for _ in 0..50 {
            stopped |= dropped.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(stopped, "resume left the handoff running");
        assert_eq!(d.state(), SERVING);
    }

    #[tokio::test]
    async fn resume_undoes_only_an_operator_drain() {
        let (d, _, ready) = drain();
        assert_eq!(d.resume(), Ok(()), "serving: nothing to undo");
        assert!(d.begin(Asker::Operator, Duration::from_secs(5), HandoffPolicy::Never));
        d.wait(Duration::from_secs(2)).await;
        assert_eq!(d.state(), DRAINED);
        assert_eq!(d.resume(), Ok(()));
        assert_eq!((d.state(), ready.load(Ordering::SeqCst), d.metrics.drain_state.get()), (SERVING, true, 0));
        // Draining (not yet drained) resumes too, and its finisher never declares drained.
        d.begin(Asker::Operator, Duration::from_secs(5), HandoffPolicy::Never);
        assert_eq!(d.resume(), Ok(()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(d.state(), SERVING);
        // A notice or a signal holds the drain.
        d.begin(Asker::Operator, Duration::from_secs(5), HandoffPolicy::Never);
        d.notice(Provider::Aliyun, None, "spot termination");
        assert!(d.resume().unwrap_err().contains("aliyun"));
        let (d, _, _) = drain();
        d.begin(Asker::Signal, Duration::from_secs(5), HandoffPolicy::Never);
        assert!(d.resume().unwrap_err().contains("shutting down"));
        assert_ne!(d.state(), SERVING);
    }

    #[tokio::test]
    async fn deadline_bounds_the_wait() {
        let (d, streams, _) = drain();
        streams.store(1, Ordering::SeqCst);
        // A 2 s window with a 1 s margin: drained after about 1 s although a stream stays open.
        d.begin(Asker::Signal, Duration::from_secs(2), HandoffPolicy::IfTime);
        let t0 = std::time::Instant::now();
        d.wait(Duration::from_secs(5)).await;
        assert_eq!(d.state(), DRAINED);
        assert!(t0.elapsed() < Duration::from_secs(3));
    }
}
