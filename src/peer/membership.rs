//! Who the peers are: a static list and/or a DNS name re-resolved periodically (a Kubernetes
//! headless Service gives one A record per pod). Each peer is probed with `Hello`: it gives its
//! node id (this agent's own address is recognised by its id and excluded), protocol and drain
//! state. A peer that fails is backed off exponentially and probed again later.
//!
//! # Contract
//! - [`Membership::live`] lists peers that answered, are not this agent and are not backed off.
//! - [`Membership::owner_candidates`] is `live` minus draining peers: only those own chunks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::{info, warn};

use super::proto::peer_client::PeerClient;
use super::proto::{DrainNotice, HelloRequest};
use super::{MAX_GRPC_MESSAGE, PROTOCOL, TOKEN_HEADER};

pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
pub const DNS_INTERVAL: Duration = Duration::from_secs(10);
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Most peers learned from their own Hello.
const MAX_LEARNED: usize = 1024;

/// Adds the shared token to every request.
#[derive(Clone)]
pub struct Auth(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert(TOKEN_HEADER, t.clone());
        }
        Ok(req)
    }
}

pub type Client = PeerClient<InterceptedService<Channel, Auth>>;

#[derive(Debug, Default, Clone)]
pub struct PeerState {
    pub node_id: Option<String>,
    pub draining: bool,
    pub is_self: bool,
    pub failures: u32,
    pub retry_at: Option<Instant>,
    pub last_error: Option<String>,
    /// It serves chunks on the raw data path (and we do not use TLS).
    pub raw: bool,
    /// Its last Hello to us: it is up, whatever a probe that started earlier says.
    pub heard_at: Option<Instant>,
}

/// One peer address and its client.
pub struct PeerHandle {
    pub addr: String,
    client: Client,
    /// Connections of the raw data path (used when `state.raw`).
    pub raw: super::raw::Pool,
    state: Mutex<PeerState>,
}

impl PeerHandle {
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn state(&self) -> PeerState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn node_id(&self) -> Option<String> {
        self.state().node_id
    }

    fn update(&self, f: impl FnOnce(&mut PeerState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn usable(&self) -> bool {
        let s = self.state();
        s.node_id.is_some() && !s.is_self && s.retry_at.is_none_or(|t| Instant::now() >= t)
    }
}

pub struct Membership {
    self_id: String,
    /// Our peer port, told to peers in Hello so they add us.
    listen_port: u16,
    static_peers: Vec<String>,
    /// Peers that introduced themselves with a Hello.
    learned: Mutex<std::collections::BTreeSet<String>>,
    /// Last DNS answer.
    resolved: Mutex<Vec<String>>,
    dns: Option<String>,
    token: Option<AsciiMetadataValue>,
    tls: Option<tonic::transport::ClientTlsConfig>,
    peers: RwLock<Vec<Arc<PeerHandle>>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Wakes the probe loop at once (a peer said Hello: probe it now, not in two seconds).
    wake: tokio::sync::Notify,
}

impl Membership {
    pub fn new(
        self_id: String,
        listen_port: u16,
        static_peers: Vec<String>,
        dns: Option<String>,
        token: Option<String>,
        tls: Option<&crate::config::PeerTls>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Self, String> {
        let tls = tls.map(|t| {
            use tonic::transport::{Certificate, ClientTlsConfig, Identity};
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&t.ca)).identity(Identity::from_pem(&t.cert, &t.key))
        });
        let token = match token {
            Some(t) => Some(AsciiMetadataValue::try_from(t.trim()).map_err(|_| "the peer token must be printable ASCII".to_string())?),
            None => None,
        };
        let m = Membership {
            self_id,
            listen_port,
            static_peers,
            learned: Mutex::new(Default::default()),
            resolved: Mutex::new(Vec::new()),
            dns,
            token,
            tls,
            peers: RwLock::new(Vec::new()),
            metrics,
            wake: tokio::sync::Notify::new(),
        };
        m.refresh_addresses()?;
        Ok(m)
    }

    pub fn self_id(&self) -> &str {
        &self.self_id
    }

    fn handle(&self, addr: &str) -> Result<PeerHandle, String> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}")).map_err(|e| format!("invalid peer address {addr:?}: {e}"))?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(|e| format!("peer TLS: {e}"))?;
        }
        let endpoint = endpoint
            .connect_timeout(PROBE_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW);
        let channel = endpoint.connect_lazy();
        let client = PeerClient::with_interceptor(channel, Auth(self.token.clone()))
            .max_decoding_message_size(MAX_GRPC_MESSAGE)
            .max_encoding_message_size(MAX_GRPC_MESSAGE);
        let raw = super::raw::Pool::new(addr, self.token.as_ref().and_then(|t| t.to_str().ok()));
        Ok(PeerHandle { addr: addr.to_string(), client, raw, state: Mutex::new(PeerState::default()) })
    }

    /// The peer set: static list ∪ last DNS answer ∪ peers that introduced themselves.
    fn refresh_addresses(&self) -> Result<(), String> {
        let mut addrs = self.static_peers.clone();
        addrs.extend(self.resolved.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        addrs.extend(self.learned.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        self.set_addresses(addrs)
    }

    /// A peer said Hello from `addr` (its peer port) as `node_id`: it is up now. A known address
    /// becomes live at once, ending any backoff, and takes the new node id if the peer restarted;
    /// an unknown one is added. Either way it is probed at once for its full state.
    pub fn heard_from(&self, addr: std::net::SocketAddr, node_id: &str) {
        let a = addr.to_string();
        match self.all().into_iter().find(|p| p.addr == a) {
            Some(p) => {
                let was = p.state();
                if was.node_id.as_deref() != Some(node_id) || was.retry_at.is_some() {
                    info!(peer = %a, node = %node_id, "peer is up (it said hello)");
                }
                p.update(|s| {
                    s.node_id = Some(node_id.to_string());
                    s.heard_at = Some(Instant::now());
                    s.is_self = false;
                    s.failures = 0;
                    s.retry_at = None;
                    s.last_error = None;
                });
            }
            None => self.learn(&a),
        }
        self.wake.notify_one();
    }

    /// Add a peer that introduced itself, if there is room.
    fn learn(&self, a: &str) {
        {
            let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
            if learned.len() >= MAX_LEARNED {
                return;
            }
            learned.insert(a.to_string());
        }
        info!(peer = %a, "learned a peer from its hello");
        if let Err(e) = self.refresh_addresses() {
            warn!(error = %e, "bad learned peer address");
        }
    }

    /// Keep handles for addresses still present, add new ones, drop vanished ones.
    fn set_addresses(&self, mut addrs: Vec<String>) -> Result<(), String> {
        addrs.sort();
        addrs.dedup();
        let mut peers = self.peers.write().unwrap_or_else(|p| p.into_inner());
        let mut old: HashMap<String, Arc<PeerHandle>> = peers.drain(..).map(|p| (p.addr.clone(), p)).collect();
        for a in addrs {
            match old.remove(&a) {
                Some(h) => peers.push(h),
                None => peers.push(Arc::new(self.handle(&a)?)),
            }
        }
        for gone in old.keys() {
            info!(peer = %gone, "peer is no longer listed");
        }
        Ok(())
    }

    /// Re-resolve the DNS name (if any) and merge with the static list.
    pub async fn resolve(&self) {
        let Some(name) = &self.dns else { return };
        match tokio::time::timeout(PROBE_TIMEOUT * 2, tokio::net::lookup_host(name.as_str())).await {
            Ok(Ok(found)) => {
                *self.resolved.lock().unwrap_or_else(|p| p.into_inner()) = found.map(|a| a.to_string()).collect();
                if let Err(e) = self.refresh_addresses() {
                    warn!(error = %e, "bad peer address");
                }
            }
            Ok(Err(e)) => warn!(name = %name, error = %e, "peer DNS lookup failed; keeping the previous peers"),
            Err(_) => warn!(name = %name, "peer DNS lookup timed out; keeping the previous peers"),
        }
    }

    pub fn all(&self) -> Vec<Arc<PeerHandle>> {
        self.peers.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn live(&self) -> Vec<Arc<PeerHandle>> {
        self.all().into_iter().filter(|p| p.usable()).collect()
    }

    pub fn owner_candidates(&self) -> Vec<Arc<PeerHandle>> {
        self.live().into_iter().filter(|p| !p.state().draining).collect()
    }

    pub fn report_failure(&self, peer: &PeerHandle, error: &str) {
        self.metrics.peer_errors.get_or_create(&crate::metrics::PeerLabel { peer: peer.addr.clone() }).inc();
        peer.update(|s| {
            s.failures += 1;
            let backoff = (Duration::from_millis(250) * 2u32.saturating_pow(s.failures.min(8))).min(MAX_BACKOFF);
            s.retry_at = Some(Instant::now() + backoff);
            s.last_error = Some(error.to_string());
        });
    }

    /// Probe one peer with Hello.
    async fn probe(&self, p: &Arc<PeerHandle>) {
        let mut req = tonic::Request::new(HelloRequest { node_id: self.self_id.clone(), protocol: PROTOCOL, listen_port: self.listen_port as u32 });
        req.set_timeout(PROBE_TIMEOUT);
        let started = Instant::now();
        let failed = |msg: &str| {
            // Its own Hello arrived while we probed: it is up (a connection refused a moment ago
            // can still be reported). Probe it again at once instead of backing off.
            if p.state().heard_at.is_some_and(|h| h >= started) {
                self.wake.notify_one();
                return;
            }
            self.report_failure(p, msg);
        };
        match tokio::time::timeout(PROBE_TIMEOUT * 2, p.client().hello(req)).await {
            Ok(Ok(r)) => {
                let r = r.into_inner();
                let is_self = r.node_id == self.self_id;
                let was = p.state();
                if was.node_id.as_deref() != Some(r.node_id.as_str()) && !is_self {
                    info!(peer = %p.addr, node = %r.node_id, draining = r.draining, "peer is up");
                }
                let raw = r.raw_data && self.tls.is_none();
                p.update(|s| {
                    s.node_id = Some(r.node_id);
                    s.is_self = is_self;
                    s.draining = r.draining;
                    s.raw = raw;
                    s.failures = 0;
                    s.retry_at = None;
                    s.last_error = None;
                });
            }
            Ok(Err(status)) => {
                let msg = format!("{}: {}", status.code(), status.message());
                if p.state().failures == 0 {
                    warn!(peer = %p.addr, error = %msg, "peer refused the probe");
                }
                failed(&msg);
            }
            Err(_) => failed("probe timed out"),
        }
    }

    /// Probe every peer whose backoff has passed.
    pub async fn probe_all(&self) {
        let due: Vec<_> = self.all().into_iter().filter(|p| p.state().retry_at.is_none_or(|t| Instant::now() >= t)).collect();
        futures::future::join_all(due.iter().map(|p| self.probe(p))).await;
    }

    /// Resolve and probe until `stop`.
    pub async fn run(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut last_dns = Instant::now();
        loop {
            // Next probe: the interval, or sooner when a backoff ends.
            let now = Instant::now();
            let next = self.all().iter().filter_map(|p| p.state().retry_at).map(|t| t.saturating_duration_since(now)).min();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(next.unwrap_or(PROBE_INTERVAL).min(PROBE_INTERVAL)) => {}
                _ = self.wake.notified() => {}
            }
            if last_dns.elapsed() >= DNS_INTERVAL {
                self.resolve().await;
                last_dns = Instant::now();
            }
            self.probe_all().await;
        }
    }

    /// A peer said it is (or is no longer) draining.
    pub fn mark_draining(&self, node_id: &str, draining: bool) {
        for p in self.all() {
            if p.node_id().as_deref() == Some(node_id) {
                p.update(|s| s.draining = draining);
                info!(peer = %p.addr, draining, "peer drain state changed");
            }
        }
    }

    /// Tell every live peer this agent's drain state (bounded by the probe timeout).
    pub async fn announce_drain(&self, draining: bool) {
        let peers = self.live();
        futures::future::join_all(peers.iter().map(|p| async move {
            let mut req = tonic::Request::new(DrainNotice { node_id: self.self_id.clone(), draining });
            req.set_timeout(PROBE_TIMEOUT);
            if let Err(e) = p.client().drain(req).await {
                warn!(peer = %p.addr, error = %e.message(), "could not tell peer about draining");
            }
        }))
        .await;
    }

    /// For `/status`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::Value::Array(
            self.all()
                .iter()
                .map(|p| {
                    let s = p.state();
                    let state = if s.is_self {
                        "self"
                    } else if s.node_id.is_none() {
                        "unknown"
                    } else if !p.usable() {
                        "backoff"
                    } else if s.draining {
                        "draining"
                    } else {
                        "live"
                    };
                    serde_json::json!({ "addr": p.addr, "node_id": s.node_id, "state": state, "failures": s.failures, "last_error": s.last_error })
                })
                .collect(),
        )
    }
}
