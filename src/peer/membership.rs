//! Who the peers are: a static list and/or a DNS name re-resolved periodically (a Kubernetes
//! headless Service gives one A record per pod). Each peer is probed with `Hello`: it gives its
//! node id (this agent's own address is recognised by its id and excluded), protocol and drain
//! state. A peer that fails is backed off exponentially and probed again later.
//!
//! # Contract
//! - Peers come from configuration. A `Hello` from an address not configured adds it only when
//!   peers authenticate (token or mutual TLS); otherwise it is ignored.
//! - A peer speaks only for itself: its node id and drain state are what its own address answers
//!   to our probe, never what a caller claims (a `Hello` or `Drain` from anyone only makes us ask
//!   the named peer again, at once).
//! - A peer whose source, chunk size or protocol differ from ours, or that answers with a node id
//!   another address already answered with, is `incompatible`: never used, logged once.
//! - A peer whose data request failed (error, stall, bad bytes) is not used for 1 s, doubling to
//!   60 s, until a data request to it succeeds or it restarts (answers with a new node id); its
//!   probes and Hellos do not end that.
//! - [`Membership::live`] lists peers that answered, are compatible, are not this agent and are
//!   not backed off. [`Membership::owner_candidates`] is `live` minus draining peers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use super::proto::peer_client::PeerClient;
use super::proto::{DrainNotice, HelloRequest};
use super::{MAX_GRPC_MESSAGE, PROTOCOL, TOKEN_HEADER};
use crate::metrics::{ControlKind, Direction};

pub const PROBE_INTERVAL: Duration = Duration::from_secs(2);
/// Peers probed in one round of the probe loop at most (each of N peers every
/// max(1, N / PROBES_PER_ROUND) intervals).
pub const PROBES_PER_ROUND: usize = 16;
/// Probes in flight at once when every peer is probed (at start).
const PROBES_AT_ONCE: usize = 64;
pub const DNS_INTERVAL: Duration = Duration::from_secs(10);
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// With gossip detecting failures, a peer known to be up is probed again only this often.
pub const KNOWN_REPROBE: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Backoff of a peer that failed a data request: from 1 s, doubling, at most this. Only a
/// data request that succeeds ends it (a peer that answers Hello may still stall on data).
const MAX_DATA_BACKOFF: Duration = Duration::from_secs(60);
/// Most peers learned from their own Hello.
const MAX_LEARNED: usize = 1024;
/// A learned peer that has answered no probe for this long is forgotten (a pod that went away);
/// its next Hello teaches it again.
pub const LEARNED_EXPIRY: Duration = Duration::from_secs(300);

/// Adds the shared token to every request (inside TLS; without it connections prove the token).
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

/// One peer as `/status` shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PeerStatus {
    pub addr: String,
    pub node_id: Option<String>,
    /// self, incompatible, distrusted, unknown, backoff, draining or live.
    pub state: String,
    pub failures: u32,
    pub data_failures: u32,
    pub last_error: Option<String>,
    /// Why the peer is incompatible, if it is.
    pub reason: Option<String>,
}

#[derive(Debug, Default, Clone)]
pub struct PeerState {
    pub node_id: Option<String>,
    pub draining: bool,
    pub is_self: bool,
    /// Probes failed in a row, and when to probe again.
    pub failures: u32,
    pub retry_at: Option<Instant>,
    /// Since when every probe has failed (`None`: the last one was answered).
    pub down_since: Option<Instant>,
    /// Data requests failed since the last that succeeded, when the last backoff began, and
    /// when to use the peer again.
    pub data_failures: u32,
    pub data_failed_at: Option<Instant>,
    pub data_retry_at: Option<Instant>,
    pub last_error: Option<String>,
    /// It serves chunks on the raw data path (and we do not use TLS).
    pub raw: bool,
    /// Its last Hello to us: it is up, whatever a probe that started earlier says.
    pub heard_at: Option<Instant>,
    /// When this agent last probed it.
    pub probed_at: Option<Instant>,
    /// Why it is never used (other source, chunk size, protocol, or a duplicate node id).
    pub incompatible: Option<String>,
    /// Not used until then: it served a file that failed the origin's checksum (neither a
    /// probe nor its Hello ends this).
    pub distrusted_until: Option<Instant>,
}

/// A data request as it began: which process of the peer it went to, and when.
#[derive(Debug, Clone)]
pub struct Attempt {
    node_id: Option<String>,
    started: Instant,
}

/// One peer address and its client.
pub struct PeerHandle {
    pub addr: String,
    client: Client,
    /// Connections of the raw data path (used when `state.raw`).
    pub raw: super::raw::Pool,
    state: Mutex<PeerState>,
    /// The IPs `addr` names: itself if it is an IP and port, else its last DNS answer.
    ips: Mutex<Vec<std::net::IpAddr>>,
}

impl PeerHandle {
    /// Whether `addr` names a host (not an IP literal), so its IPs come from DNS.
    fn is_hostname(&self) -> bool {
        self.addr.parse::<std::net::SocketAddr>().is_err()
    }

    /// Whether a caller at `ip` may be this peer (for a hostname, one of its last resolved IPs).
    pub fn has_ip(&self, ip: std::net::IpAddr) -> bool {
        self.ips.lock().unwrap_or_else(|p| p.into_inner()).contains(&ip)
    }

    /// Whether `a` (an IP and port, as a Hello names its sender) is this peer's address.
    pub fn answers_at(&self, a: std::net::SocketAddr) -> bool {
        self.addr == a.to_string() || (self.port() == Some(a.port()) && self.has_ip(a.ip()))
    }

    fn port(&self) -> Option<u16> {
        self.addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok())
    }

    /// The IP and port this peer is reached at (a hostname's first resolved IP).
    pub fn socket_addr(&self) -> Option<std::net::SocketAddr> {
        if let Ok(a) = self.addr.parse() {
            return Some(a);
        }
        let ip = *self.ips.lock().unwrap_or_else(|p| p.into_inner()).first()?;
        Some(std::net::SocketAddr::new(ip, self.port()?))
    }

    /// Look the hostname up again (bounded by the probe timeout); an IP literal stays as it is.
    async fn resolve(&self) {
        if !self.is_hostname() {
            return;
        }
        match tokio::time::timeout(PROBE_TIMEOUT * 2, tokio::net::lookup_host(self.addr.as_str())).await {
            Ok(Ok(found)) => *self.ips.lock().unwrap_or_else(|p| p.into_inner()) = found.map(|a| a.ip()).collect(),
            Ok(Err(e)) => debug!(peer = %self.addr, error = %e, "cannot resolve the peer's name; keeping its previous addresses"),
            Err(_) => debug!(peer = %self.addr, "resolving the peer's name timed out; keeping its previous addresses"),
        }
    }

    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn state(&self) -> PeerState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn node_id(&self) -> Option<String> {
        self.state().node_id
    }

    /// What a data request to this peer starts with, so its outcome is charged to the right
    /// process (see `Membership::report_failure`).
    pub fn attempt(&self) -> Attempt {
        Attempt { node_id: self.node_id(), started: Instant::now() }
    }

    fn update(&self, f: impl FnOnce(&mut PeerState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn usable(&self) -> bool {
        let s = self.state();
        let now = Instant::now();
        let passed = |t: Option<Instant>| t.is_none_or(|t| now >= t);
        s.node_id.is_some()
            && s.down_since.is_none()
            && !s.is_self
            && s.incompatible.is_none()
            && passed(s.retry_at)
            && passed(s.data_retry_at)
            && passed(s.distrusted_until)
    }
}

/// What a peer must share with us to be used.
#[derive(Debug, Clone)]
pub struct Compat {
    pub chunk_size: u64,
    /// The source as shown to peers (credentials redacted).
    pub source: String,
}

impl Compat {
    /// Why a peer that answered `r` cannot be used, if it cannot.
    fn mismatch(&self, r: &super::proto::HelloResponse) -> Option<String> {
        if r.protocol != PROTOCOL {
            Some(format!("peer protocol {} differs from ours ({PROTOCOL})", r.protocol))
        } else if r.chunk_size != self.chunk_size {
            Some(format!("peer chunk size {} differs from ours ({})", r.chunk_size, self.chunk_size))
        } else if r.source != self.source {
            Some(format!("peer source {:?} differs from ours ({:?})", r.source, self.source))
        } else {
            None
        }
    }
}

pub struct Membership {
    self_id: String,
    compat: Compat,
    /// Our peer port, told to peers in Hello so they add us.
    listen_port: u16,
    static_peers: Vec<String>,
    /// Peers that introduced themselves with a Hello.
    learned: Mutex<std::collections::BTreeSet<String>>,
    /// Last DNS answer.
    resolved: Mutex<Vec<String>>,
    dns: Option<String>,
    /// The token sent as request metadata, inside TLS only (the first of the tokens).
    token: Option<AsciiMetadataValue>,
    tls: Option<tonic::transport::ClientTlsConfig>,
    /// Without TLS, every connection proves both sides hold a token (None: no tokens).
    keyring: Option<Arc<super::auth::Keyring>>,
    /// Callers are authenticated (token or mutual TLS): a Hello may add its caller.
    authenticated: bool,
    /// Unconfigured callers already told they are ignored (logged once each, bounded).
    ignored: Mutex<std::collections::BTreeSet<String>>,
    peers: RwLock<Vec<Arc<PeerHandle>>>,
    metrics: Arc<crate::metrics::Metrics>,
    /// Wakes the probe loop at once (a peer said Hello: probe it now, not in two seconds).
    wake: tokio::sync::Notify,
    /// Gossip detects failures: peers known to be up are probed only every [`KNOWN_REPROBE`].
    gossiping: std::sync::atomic::AtomicBool,
}

/// Why the peer stack cannot be set up from its settings.
#[derive(Debug, thiserror::Error)]
pub enum PeerSetupError {
    #[error("the peer token must be printable ASCII")]
    Token,
    #[error("invalid peer address {addr:?}")]
    Address { addr: String, source: tonic::transport::Error },
    #[error("peer TLS (client side)")]
    ClientTls(#[source] tonic::transport::Error),
    #[error("invalid peer TLS certificate or key")]
    ServerTls(#[source] tonic::transport::Error),
}

impl Membership {
    /// Membership of this agent (`self_id`) in the mesh `cfg` describes.
    pub fn new(
        self_id: String,
        compat: Compat,
        cfg: &crate::config::PeerConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Self, PeerSetupError> {
        let listen_port = cfg.listen.map(|l| l.port()).unwrap_or(0);
        let (static_peers, dns) = (cfg.peers.clone(), cfg.dns.clone());
        let tls = cfg.tls.as_ref().map(|t| {
            use tonic::transport::{Certificate, ClientTlsConfig, Identity};
            ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&t.ca)).identity(Identity::from_pem(&t.cert, &t.key))
        });
        let token = match (cfg.tokens.first(), &tls) {
            (Some(t), Some(_)) => Some(AsciiMetadataValue::try_from(t.trim()).map_err(|_| PeerSetupError::Token)?),
            _ => None,
        };
        let keyring = if tls.is_some() { None } else { super::auth::Keyring::new(&cfg.tokens, self_id.clone(), metrics.clone()) };
        let m = Membership {
            authenticated: keyring.is_some() || tls.is_some(),
            keyring,
            self_id,
            compat,
            ignored: Mutex::new(Default::default()),
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
            gossiping: Default::default(),
        };
        m.refresh_addresses()?;
        Ok(m)
    }

    pub fn self_id(&self) -> &str {
        &self.self_id
    }

    fn handle(&self, addr: &str) -> Result<PeerHandle, PeerSetupError> {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
            .map_err(|source| PeerSetupError::Address { addr: addr.to_string(), source })?;
        if let Some(tls) = &self.tls {
            endpoint = endpoint.tls_config(tls.clone()).map_err(PeerSetupError::ClientTls)?;
        }
        let endpoint = endpoint
            .connect_timeout(PROBE_TIMEOUT)
            .tcp_nodelay(true)
            .initial_stream_window_size(super::STREAM_WINDOW)
            .initial_connection_window_size(super::CONNECTION_WINDOW);
        let channel = match &self.keyring {
            Some(k) => endpoint.connect_with_connector_lazy(super::auth::connector(k.clone(), addr.to_string(), PROBE_TIMEOUT)),
            None => endpoint.connect_lazy(),
        };
        let client = PeerClient::with_interceptor(channel, Auth(self.token.clone()))
            .max_decoding_message_size(MAX_GRPC_MESSAGE)
            .max_encoding_message_size(MAX_GRPC_MESSAGE);
        let raw = super::raw::Pool::new(addr, self.keyring.clone());
        let ips = addr.parse::<std::net::SocketAddr>().map(|a| vec![a.ip()]).unwrap_or_default();
        Ok(PeerHandle { addr: addr.to_string(), client, raw, state: Mutex::new(PeerState::default()), ips: Mutex::new(ips) })
    }

    /// The peer set: static list ∪ last DNS answer ∪ peers that introduced themselves.
    fn refresh_addresses(&self) -> Result<(), PeerSetupError> {
        let mut addrs = self.static_peers.clone();
        addrs.extend(self.resolved.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        addrs.extend(self.learned.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned());
        self.set_addresses(addrs)
    }

    /// A caller said Hello from `addr` (its peer port) as `node_id`: it may be up now. A known
    /// address ends its backoff and, if it was not known to be up as that node, is probed at
    /// once (the probe, not the caller, says who is there); a peer already up waits for its
    /// next probe. An unknown address is added only when callers are authenticated.
    pub fn heard_from(&self, addr: std::net::SocketAddr, node_id: &str) {
        match self.all().into_iter().find(|p| p.answers_at(addr)) {
            Some(p) => {
                let mut news = false;
                p.update(|s| {
                    // Probing a peer we know to be up because it probed us would feed a storm:
                    // each probe answered wakes the other side's probe loop in turn.
                    news = s.node_id.as_deref() != Some(node_id) || s.failures > 0 || s.retry_at.is_some() || s.down_since.is_some();
                    s.heard_at = Some(Instant::now());
                    s.failures = 0;
                    s.retry_at = None;
                    if news {
                        // Ask at once, whatever the gossip-time schedule of known peers says.
                        s.probed_at = None;
                    }
                });
                if !news {
                    return;
                }
            }
            None if !self.stranger(addr, node_id) => return,
            None => {}
        }
        self.wake.notify_one();
    }

    /// Gossip says member `node_id` at `addr` is up: a hint, never a reset of what this agent
    /// saw itself. A known address not known up as that node is probed at once; an unknown one
    /// is taken as for a Hello.
    pub fn gossip_up(&self, addr: std::net::SocketAddr, node_id: &str) {
        let wake = match self.all().into_iter().find(|p| p.answers_at(addr)) {
            Some(p) => {
                let s = p.state();
                let news = s.node_id.as_deref() != Some(node_id) || s.down_since.is_some();
                if news {
                    p.update(|s| (s.retry_at, s.probed_at) = (None, None));
                }
                news
            }
            None => self.stranger(addr, node_id),
        };
        if wake {
            self.wake.notify_one();
        }
    }

    /// `node_id` at the unknown address `addr` (a Hello or gossip): learned when callers are
    /// authenticated (true), else ignored with a warning once.
    fn stranger(&self, addr: std::net::SocketAddr, node_id: &str) -> bool {
        let a = addr.to_string();
        if self.authenticated {
            self.learn(&a);
            return true;
        }
        let mut ignored = self.ignored.lock().unwrap_or_else(|p| p.into_inner());
        if ignored.len() < MAX_LEARNED && ignored.insert(a.clone()) {
            warn!(peer = %a, node = %node_id, "ignoring a hello or gossip naming an address that is not a configured peer (peers are unauthenticated; set --peer-token-file or mutual TLS to let peers join)");
        }
        false
    }

    /// Whether a caller at `ip` may gossip: any caller when peers authenticate (the token or TLS
    /// was checked), else only a configured peer.
    pub fn admits(&self, ip: std::net::IpAddr) -> bool {
        self.authenticated || self.all().iter().any(|p| p.has_ip(ip))
    }

    /// Whether peers authenticate (token or mutual TLS).
    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// The tokens every connection proves (peers with tokens and without TLS).
    pub fn keyring(&self) -> Option<Arc<super::auth::Keyring>> {
        self.keyring.clone()
    }

    /// Gossip says member `node_id` at `addr` is down: it is not used until it answers a probe
    /// (or says Hello). A report about another process at that address changes nothing.
    pub fn gossip_down(&self, addr: std::net::SocketAddr, node_id: &str) {
        for p in self.all().into_iter().filter(|p| p.answers_at(addr) && p.node_id().as_deref() == Some(node_id)) {
            info!(peer = %p.addr, node = %node_id, "gossip reports the peer down; not used until it answers again");
            p.update(|s| {
                s.down_since.get_or_insert_with(Instant::now);
                s.failures = s.failures.max(1);
                s.retry_at = Some(Instant::now() + PROBE_INTERVAL);
                s.last_error = Some("reported down by gossip".into());
            });
        }
    }

    /// Peers that answered as compatible members and are not down, as gossip members: node id
    /// and the address they are reached at.
    pub fn gossip_members(&self) -> Vec<(String, std::net::SocketAddr)> {
        self.all()
            .iter()
            .filter_map(|p| {
                let s = p.state();
                let ok = !s.is_self && s.incompatible.is_none() && s.down_since.is_none();
                Some((s.node_id.filter(|_| ok)?, p.socket_addr()?))
            })
            .collect()
    }

    /// From now on gossip detects failures (see [`KNOWN_REPROBE`]).
    pub fn set_gossiping(&self) {
        self.gossiping.store(true, std::sync::atomic::Ordering::SeqCst);
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

    /// Forget learned peers that have answered no probe for `after`.
    fn expire_learned(&self, after: Duration) {
        let gone: Vec<String> = {
            let mut learned = self.learned.lock().unwrap_or_else(|p| p.into_inner());
            let down = |p: &PeerHandle| p.state().down_since.is_some_and(|t| t.elapsed() >= after);
            let gone: Vec<String> = self.all().iter().filter(|p| learned.contains(&p.addr) && down(p)).map(|p| p.addr.clone()).collect();
            learned.retain(|a| !gone.contains(a));
            gone
        };
        if gone.is_empty() {
            return;
        }
        info!(peers = ?gone, after = ?after, "forgot learned peers that stopped answering");
        if let Err(e) = self.refresh_addresses() {
            warn!(error = %e, "bad peer address");
        }
    }

    /// Keep handles for addresses still present, add new ones, drop vanished ones.
    fn set_addresses(&self, mut addrs: Vec<String>) -> Result<(), PeerSetupError> {
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

    /// Re-resolve the peers named by hostname, and the DNS name (if any), merged with the
    /// static list.
    pub async fn resolve(&self) {
        futures::future::join_all(self.all().iter().map(|p| p.resolve())).await;
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

    /// A data request to `peer` failed (error, stall, bad bytes): it is not used for a while,
    /// whatever its probes and Hellos say, until a data request succeeds again. One failure
    /// steps the backoff: requests that were already in flight when it began, or that went
    /// to an earlier process at that address (it restarted since), do not step it again.
    pub fn report_failure(&self, peer: &PeerHandle, attempt: &Attempt, error: &str) {
        self.metrics.peer_errors.get_or_create(&crate::metrics::PeerLabel { peer: peer.addr.clone() }).inc();
        peer.update(|s| {
            if s.node_id != attempt.node_id {
                debug!(peer = %peer.addr, error, "a request to the peer's previous process failed; not held against the new one");
                return;
            }
            s.last_error = Some(error.to_string());
            if s.data_failed_at.is_some_and(|at| attempt.started < at) {
                return;
            }
            s.data_failures += 1;
            let backoff = (Duration::from_secs(1) * 2u32.saturating_pow(s.data_failures.min(8) - 1)).min(MAX_DATA_BACKOFF);
            let now = Instant::now();
            s.data_failed_at = Some(now);
            s.data_retry_at = Some(now + backoff);
        });
    }

    /// A data request to `peer` succeeded.
    pub fn report_success(&self, peer: &PeerHandle) {
        if peer.state().data_failures > 0 {
            peer.update(|s| {
                (s.data_failures, s.data_failed_at, s.data_retry_at) = (0, None, None);
            });
        }
    }

    /// A probe of `peer` failed.
    fn probe_failed(&self, peer: &PeerHandle, error: &str) {
        self.metrics.peer_errors.get_or_create(&crate::metrics::PeerLabel { peer: peer.addr.clone() }).inc();
        peer.update(|s| {
            s.down_since.get_or_insert_with(Instant::now);
            s.failures += 1;
            let backoff = (Duration::from_millis(250) * 2u32.saturating_pow(s.failures.min(8))).min(MAX_BACKOFF);
            s.retry_at = Some(Instant::now() + backoff);
            s.last_error = Some(error.to_string());
        });
    }

    /// Stop using the peer at `addr` for `how_long`: it served bytes the origin disowns.
    pub fn distrust(&self, addr: &str, why: &str, how_long: Duration) {
        self.metrics.peer_errors.get_or_create(&crate::metrics::PeerLabel { peer: addr.to_string() }).inc();
        for p in self.all().into_iter().filter(|p| p.addr == addr) {
            p.update(|s| {
                s.distrusted_until = Some(Instant::now() + how_long);
                s.last_error = Some(why.to_string());
            });
        }
    }

    /// Probe one peer with Hello.
    async fn probe(&self, p: &Arc<PeerHandle>) {
        let mut req =
            tonic::Request::new(HelloRequest { node_id: self.self_id.clone(), protocol: PROTOCOL, listen_port: self.listen_port as u32 });
        req.set_timeout(PROBE_TIMEOUT);
        let started = Instant::now();
        p.update(|s| s.probed_at = Some(started));
        self.metrics.add_control(ControlKind::hello, Direction::sent);
        let failed = |msg: &str| {
            // Its own Hello arrived while we probed: it is up (a connection refused a moment ago
            // can still be reported). Probe it again at once instead of backing off.
            if p.state().heard_at.is_some_and(|h| h >= started) {
                self.wake.notify_one();
                return;
            }
            self.probe_failed(p, msg);
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
                let incompatible = if is_self { None } else { self.compat.mismatch(&r).or_else(|| self.duplicate(p, &r.node_id)) };
                if incompatible.is_some() && was.incompatible != incompatible {
                    warn!(peer = %p.addr, node = %r.node_id, reason = incompatible.as_deref().unwrap_or(""), "peer is incompatible; it will not be used");
                }
                // Another node id: another process (restarted), whose data path has not failed yet.
                let restarted = was.node_id.as_deref() != Some(r.node_id.as_str());
                p.update(|s| {
                    s.incompatible = incompatible;
                    s.node_id = Some(r.node_id);
                    s.is_self = is_self;
                    s.draining = r.draining;
                    s.raw = raw;
                    s.failures = 0;
                    s.retry_at = None;
                    s.down_since = None;
                    if restarted {
                        (s.data_failures, s.data_failed_at, s.data_retry_at) = (0, None, None);
                    }
                    if s.data_failures == 0 {
                        s.last_error = None;
                    }
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

    /// Another address already answered with `node_id` (first come keeps it).
    fn duplicate(&self, p: &PeerHandle, node_id: &str) -> Option<String> {
        let other = self
            .all()
            .into_iter()
            .find(|o| o.addr != p.addr && o.state().incompatible.is_none() && o.node_id().as_deref() == Some(node_id))?;
        Some(format!("node id {node_id} already answers at {}", other.addr))
    }

    /// Peers whose backoff has passed; with gossip, not those known to be up and probed within
    /// [`KNOWN_REPROBE`].
    fn due(&self) -> Vec<Arc<PeerHandle>> {
        let now = Instant::now();
        let gossiping = self.gossiping.load(std::sync::atomic::Ordering::SeqCst);
        let quiet = |s: &PeerState| {
            gossiping && s.node_id.is_some() && s.failures == 0 && s.probed_at.is_some_and(|t| now.duration_since(t) < KNOWN_REPROBE)
        };
        self.all()
            .into_iter()
            .filter(|p| {
                let s = p.state();
                s.retry_at.is_none_or(|t| now >= t) && !quiet(&s)
            })
            .collect()
    }

    /// Probe every peer whose backoff has passed, [`PROBES_AT_ONCE`] at a time (at start).
    pub async fn probe_all(&self) {
        use futures::StreamExt;
        futures::stream::iter(self.due()).for_each_concurrent(PROBES_AT_ONCE, |p| async move { self.probe(&p).await }).await;
    }

    /// One round of the probe loop: at most [`PROBES_PER_ROUND`] peers, those never answered
    /// first, then those probed longest ago; a large fleet's peers are each probed less often,
    /// so probes per agent do not grow with the fleet (data requests that fail back a peer off
    /// at once, and drains are announced, whatever the probe schedule).
    async fn probe_round(&self) {
        let mut due = self.due();
        if due.len() > PROBES_PER_ROUND {
            due.sort_by_key(|p| {
                let s = p.state();
                (s.node_id.is_some() && s.failures == 0, s.probed_at)
            });
            due.truncate(PROBES_PER_ROUND);
        }
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
            self.probe_round().await;
            self.expire_learned(LEARNED_EXPIRY);
            for p in self.all() {
                p.raw.trim();
            }
        }
    }

    /// A caller says `node_id` changed its drain state: ask that peer itself (the caller's word
    /// is never taken). Returns once the peer answered or its probe failed.
    pub async fn recheck(&self, node_id: &str) {
        let named: Vec<_> = self.all().into_iter().filter(|p| p.node_id().as_deref() == Some(node_id)).collect();
        for p in &named {
            let was = p.state().draining;
            self.probe(p).await;
            let now = p.state().draining;
            if now != was {
                info!(peer = %p.addr, draining = now, "peer drain state changed");
            }
        }
    }

    /// Tell every live peer this agent's drain state (bounded by the probe timeout).
    pub async fn announce_drain(&self, draining: bool) {
        let peers = self.live();
        futures::future::join_all(peers.iter().map(|p| async move {
            let mut req = tonic::Request::new(DrainNotice { node_id: self.self_id.clone(), draining });
            self.metrics.add_control(ControlKind::drain, Direction::sent);
            // The peer confirms by probing us before it answers.
            req.set_timeout(PROBE_TIMEOUT * 3);
            if let Err(e) = p.client().drain(req).await {
                warn!(peer = %p.addr, error = %e.message(), "could not tell peer about draining");
            }
        }))
        .await;
    }

    /// For `/status`.
    pub fn status(&self) -> Vec<PeerStatus> {
        self.all()
            .iter()
            .map(|p| {
                let s = p.state();
                let state = if s.is_self {
                    "self"
                } else if s.incompatible.is_some() {
                    "incompatible"
                } else if s.distrusted_until.is_some_and(|t| Instant::now() < t) {
                    "distrusted"
                } else if s.node_id.is_none() {
                    "unknown"
                } else if !p.usable() {
                    "backoff"
                } else if s.draining {
                    "draining"
                } else {
                    "live"
                };
                let (failures, data_failures) = (s.failures, s.data_failures);
                PeerStatus {
                    addr: p.addr.clone(),
                    node_id: s.node_id,
                    state: state.into(),
                    failures,
                    data_failures,
                    last_error: s.last_error,
                    reason: s.incompatible,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A round of the probe loop probes a bounded number of peers however many there are; at
    /// start every peer is probed.
    #[tokio::test]
    async fn probe_rounds_are_bounded_whatever_the_fleet() {
        let compat = Compat { chunk_size: 1 << 20, source: "file:///m".into() };
        let hellos = |m: &crate::metrics::Metrics| {
            let t = m.encode_text();
            let line = t.lines().find(|l| l.starts_with("cachefs_control_messages_total{kind=\"hello\",direction=\"sent\"}")).unwrap_or("");
            line.rsplit(' ').next().and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        };
        // Nothing listens on the discard port of loopback: every probe fails at once.
        let peers: Vec<String> = (1..=40).map(|i| format!("127.0.0.{i}:9")).collect();
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let cfg = crate::config::PeerConfig { peers: peers.clone(), ..Default::default() };
        let m = Membership::new("self".into(), compat.clone(), &cfg, metrics.clone()).unwrap();
        m.probe_round().await;
        assert_eq!(hellos(&metrics), PROBES_PER_ROUND as u64);
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let m = Membership::new("self".into(), compat, &cfg, metrics.clone()).unwrap();
        m.probe_all().await;
        assert_eq!(hellos(&metrics), 40);
    }

    /// An agent of the previous protocol (no trackers) is incompatible, with the reason.
    #[test]
    fn a_protocol_1_agent_is_incompatible() {
        let compat = Compat { chunk_size: 1 << 20, source: "file:///m".into() };
        let hello = |protocol| super::super::proto::HelloResponse {
            node_id: "old".into(),
            protocol,
            chunk_size: 1 << 20,
            source: "file:///m".into(),
            ..Default::default()
        };
        assert_eq!(compat.mismatch(&hello(1)).as_deref(), Some("peer protocol 1 differs from ours (2)"));
        assert_eq!(compat.mismatch(&hello(PROTOCOL)), None);
    }

    /// A learned peer that stops answering is forgotten after the expiry, not kept forever.
    #[tokio::test]
    async fn a_learned_peer_that_went_away_is_forgotten() {
        let compat = Compat { chunk_size: 1 << 20, source: "s3://b/p".into() };
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let m = Membership::new(
            "self".into(),
            compat,
            &crate::config::PeerConfig { listen: Some(([127, 0, 0, 1], 1).into()), tokens: vec!["secret".into()], ..Default::default() },
            metrics,
        )
        .unwrap();
        // Nothing listens on the discard port of loopback: every probe fails.
        let gone: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        m.heard_from(gone, "pod-1");
        assert_eq!(m.all().len(), 1);
        m.probe_all().await;
        assert!(m.all()[0].state().down_since.is_some());
        m.expire_learned(LEARNED_EXPIRY);
        assert_eq!(m.all().len(), 1, "forgotten before the expiry");
        m.expire_learned(Duration::ZERO);
        assert!(m.all().is_empty(), "a learned peer that went away is kept");
        // Its next Hello teaches it again.
        m.heard_from(gone, "pod-1");
        assert_eq!(m.all().len(), 1);
    }

    /// Failed requests step the data backoff once per round, and never across a restart: the
    /// requests in flight when a peer died must not back off the process that replaced it.
    #[tokio::test]
    async fn failures_in_flight_and_from_a_previous_process_step_no_backoff() {
        let compat = Compat { chunk_size: 1 << 20, source: "file:///m".into() };
        let peers = crate::config::PeerConfig { peers: vec!["127.0.0.1:9".into()], ..Default::default() };
        let m = Membership::new("self".into(), compat, &peers, Arc::new(crate::metrics::Metrics::new())).unwrap();
        let p = m.all()[0].clone();
        p.update(|s| s.node_id = Some("old".into()));
        let (first, second) = (p.attempt(), p.attempt());
        m.report_failure(&p, &first, "reset");
        m.report_failure(&p, &second, "reset");
        assert_eq!(p.state().data_failures, 1, "two requests in flight together stepped the backoff twice");
        let later = p.attempt();
        m.report_failure(&p, &later, "reset");
        assert_eq!(p.state().data_failures, 2, "a request sent after the backoff began did not step it");
        // The address now answers as another process; the old requests fail late.
        p.update(|s| (s.node_id, s.data_failures, s.data_failed_at, s.data_retry_at) = (Some("new".into()), 0, None, None));
        m.report_failure(&p, &later, "early eof");
        assert_eq!(p.state().data_failures, 0, "a failure of the previous process backed off the new one");
        assert!(p.usable());
    }

    /// A peer configured by hostname says Hello from its IP and port: that is the configured
    /// peer (it was taken for a stranger and ignored, or learned twice), and a handoff from that
    /// IP passes the source check.
    #[tokio::test]
    async fn a_hostname_peer_is_recognised_by_its_ip() {
        let compat = Compat { chunk_size: 1 << 20, source: "file:///m".into() };
        let peers = crate::config::PeerConfig { peers: vec!["localhost:9".into()], ..Default::default() };
        let m = Membership::new("self".into(), compat, &peers, Arc::new(crate::metrics::Metrics::new())).unwrap();
        m.resolve().await;
        let p = m.all()[0].clone();
        assert!(p.has_ip([127, 0, 0, 1].into()), "localhost did not resolve to 127.0.0.1");
        m.heard_from("127.0.0.1:9".parse().unwrap(), "pod-1");
        assert!(p.state().heard_at.is_some(), "the hostname peer's Hello was not matched to it");
        assert_eq!(m.all().len(), 1);
        assert!(!p.answers_at("127.0.0.1:10".parse().unwrap()), "another port matched");
    }
}
