//! What this agent serves to its peers.
//!
//! # Contract
//! - Only objects of this agent's catalog (under its source prefix) at exactly the named version
//!   are served; a key that is not a clean relative path, a chunk size other than ours or an index
//!   past the end is `INVALID_ARGUMENT`; an unknown object, another version, or a chunk not held
//!   (without `allow_fill`) is `NOT_FOUND`.
//! - Chunks held in memory are streamed from the tmpfs file's mapping, without a copy into a
//!   buffer first; with `allow_fill`, a missing chunk is fetched through this agent's own
//!   single-flight read path first, at most `MAX_PEER_FILLS` at once (beyond, after a short
//!   wait, `RESOURCE_EXHAUSTED`). Messages carry at most `MESSAGE_BYTES` of data; the first
//!   carries the chunk's length and crc32c.
//! - With tokens and without TLS, only connections that passed the handshake of
//!   [`super::auth`] reach the service; with TLS and tokens, requests without one of them in
//!   their metadata are `UNAUTHENTICATED` (constant-time compare).

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use subtle::ConstantTimeEq;
use tonic::{Request, Response, Status};
use tracing::debug;

use super::membership::Membership;
use super::proto::peer_server::Peer;
use super::proto::{
    AnnounceRequest, AnnounceResponse, DrainAck, DrainNotice, GossipAck, GossipMessage, HandoffProgress, HandoffRequest, HelloRequest,
    HelloResponse, InventoryRequest, InventoryResponse, LookupRequest, LookupResponse, ObjectInventory, ReadChunkRequest, SegmentHolding,
};
use super::streams::{ChunkStream, Streams};
use super::{bitmap, same_version, PROTOCOL, TOKEN_HEADER};
use crate::cache::chunk::{chunk_count, chunk_range};
use crate::cache::{ChunkFile, Reader};
use crate::catalog::{Catalog, ObjectVersion};
use crate::metrics::{ControlKind, Direction, Metrics};

pub struct PeerServer {
    pub catalog: Arc<Catalog>,
    pub reader: Arc<Reader>,
    pub metrics: Arc<Metrics>,
    pub membership: Arc<Membership>,
    pub node_id: String,
    pub source: String,
    pub draining: Arc<AtomicBool>,
    /// Chunk streams in progress (drain waits for them).
    pub active: Arc<AtomicUsize>,
    /// Chunks are also served on the raw data path (no TLS).
    pub raw_data: bool,
    /// Pulls chunks that a draining peer hands off (None: handoffs are refused).
    pub handoff: Option<Arc<super::PeerSource>>,
    /// gRPC chunk streams, let go of after their time limit.
    pub streams: Arc<Streams>,
    /// Origin fetches that peers' fill requests run at once.
    pub fills: FillLimit,
    /// Holder discovery: this agent's tracking state (None: lookups and announcements refused).
    pub tracking: Option<Arc<super::tracking::Tracking>>,
    /// Membership gossip (None: gossip messages refused).
    pub gossip: Option<Arc<super::gossip::Swim>>,
}

/// Chunks this agent fetches from the origin for peers at once (`allow_fill`); requests that
/// join a fetch already in flight do not count.
pub const MAX_PEER_FILLS: usize = 32;

/// How long a fill request waits for its turn before it is refused (`RESOURCE_EXHAUSTED`: the
/// caller asks the origin itself, and does not back this agent off).
const FILL_WAIT: Duration = Duration::from_secs(1);

/// Bounds the origin fetches peers can make this agent run (and the cache they fill).
pub struct FillLimit(tokio::sync::Semaphore);

impl Default for FillLimit {
    fn default() -> Self {
        FillLimit(tokio::sync::Semaphore::new(MAX_PEER_FILLS))
    }
}

impl FillLimit {
    async fn admit(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Status> {
        match tokio::time::timeout(FILL_WAIT, self.0.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(Status::resource_exhausted(format!("this agent fills at most {MAX_PEER_FILLS} chunks for peers at once"))),
        }
    }
}

/// Counts a stream as active until dropped.
pub struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn clean_key(key: &str) -> bool {
    !key.is_empty() && !key.starts_with('/') && key.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
}

/// Each object's digests (see `MemoryTier::digests`), taken off the async threads: chunks not
/// hashed before are hashed now.
async fn digests_of(memory: Arc<crate::cache::MemoryTier>, objs: Vec<Arc<ObjectVersion>>) -> Vec<Vec<u8>> {
    let n = objs.len();
    tokio::task::spawn_blocking(move || objs.iter().map(|o| memory.digests(o)).collect()).await.unwrap_or_else(|_| vec![Vec::new(); n])
}

/// The label of an inventory's digests MAC (see `ObjectInventory.digests_mac`).
pub const DIGESTS_LABEL: &[u8] = b"cachefs-digests-v1";

/// Server-side check of the token sent as metadata (inside TLS): any of `expected`, in
/// constant time; none expected lets every request through.
pub fn check_token(expected: Arc<Vec<Vec<u8>>>) -> impl FnMut(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |req: Request<()>| {
        if expected.is_empty() {
            return Ok(req);
        }
        let got = req.metadata().get(TOKEN_HEADER).map(|v| v.as_bytes()).unwrap_or(b"");
        if expected.iter().any(|want| got.len() == want.len() && bool::from(got.ct_eq(want.as_slice()))) {
            Ok(req)
        } else {
            Err(Status::unauthenticated("missing or wrong peer token"))
        }
    }
}

type HandoffStream = Pin<Box<dyn Stream<Item = Result<HandoffProgress, Status>> + Send>>;

impl PeerServer {
    fn lookup(&self, r: Option<&super::proto::ObjectRef>) -> Result<Arc<ObjectVersion>, Status> {
        let r = r.ok_or_else(|| Status::invalid_argument("object missing"))?;
        if !clean_key(&r.key) {
            return Err(Status::invalid_argument("object key must be a relative path under the source"));
        }
        let obj = self.catalog.object_at(&r.key).map_err(|_| Status::not_found("no such object under this agent's source"))?;
        if !same_version(&obj, r) {
            return Err(Status::not_found("this agent has another version of the object"));
        }
        Ok(obj)
    }
}

impl PeerServer {
    /// This agent's tracking state and the tracker key of `object`, if a lookup or announcement
    /// of it can be answered.
    fn tracked(
        &self,
        object: Option<&super::proto::ObjectRef>,
        chunk_size: u64,
    ) -> Result<(&Arc<super::tracking::Tracking>, Arc<str>), Status> {
        let tracking = self.tracking.as_ref().ok_or_else(|| Status::unimplemented("this agent tracks no holders"))?;
        let own = self.reader.chunk_size();
        if chunk_size != own {
            return Err(Status::invalid_argument(format!("chunk size {chunk_size} differs from this agent's {own}")));
        }
        let o = object.ok_or_else(|| Status::invalid_argument("object missing"))?;
        if o.key.len() > 4096 || o.etag.len() > 1024 || o.version.len() > 1024 {
            return Err(Status::invalid_argument("object name too long"));
        }
        Ok((tracking, super::tracking::tracker_key(o)))
    }

    /// The whole chunk a peer asks for, with its crc32c, counted as an active transfer until the
    /// guard is dropped.
    pub async fn chunk(&self, r: ReadChunkRequest) -> Result<(Bytes, u32, ActiveGuard, Option<ChunkFile>), Status> {
        let chunk_size = self.reader.chunk_size();
        if r.chunk_size != chunk_size {
            return Err(Status::invalid_argument(format!("chunk size {} differs from this agent's {chunk_size}", r.chunk_size)));
        }
        let obj = self.lookup(r.object.as_ref())?;
        if r.index >= chunk_count(obj.size, chunk_size) {
            return Err(Status::invalid_argument("chunk index past the end of the object"));
        }
        self.active.fetch_add(1, Ordering::SeqCst);
        let guard = ActiveGuard(self.active.clone());
        if let Some((bytes, crc, at)) = self.reader.memory().map_chunk_in_file(&obj, r.index) {
            debug!(key = %obj.key, index = r.index, "serving chunk from memory");
            return Ok((bytes, crc, guard, Some(at)));
        }
        if !r.allow_fill {
            return Err(Status::not_found("chunk not held"));
        }
        let _turn = if self.reader.filling(&obj, r.index) { None } else { Some(self.fills.admit().await?) };
        match self.reader.fetch_chunk(&obj, r.index).await {
            Ok((bytes, crc)) => {
                let range = chunk_range(r.index, obj.size, chunk_size);
                if bytes.len() as u64 != range.end - range.start {
                    return Err(Status::internal("filled chunk has the wrong length"));
                }
                Ok((bytes, crc, guard, None))
            }
            Err(crate::Error::Stale(_)) => Err(Status::not_found("object changed at the origin")),
            Err(e) => Err(Status::unavailable(format!("could not fill the chunk: {e}"))),
        }
    }
}

impl PeerServer {
    /// Check a handoff request and turn it into the chunks to pull, from which peer. Only a
    /// known peer hands off, from one of its address's IPs, while it drains (as it answers our
    /// probe) and this agent does not.
    fn handoff_plan(&self, r: HandoffRequest, from: Option<std::net::SocketAddr>) -> Result<super::handoff::Pulls, Status> {
        let source = self.handoff.clone().ok_or_else(|| Status::unimplemented("this agent takes no handoffs"))?;
        let chunk_size = self.reader.chunk_size();
        if r.chunk_size != chunk_size {
            return Err(Status::invalid_argument(format!("chunk size {} differs from this agent's {chunk_size}", r.chunk_size)));
        }
        if r.chunks.len() > super::handoff::MAX_BATCH {
            return Err(Status::invalid_argument(format!("at most {} chunks per handoff request", super::handoff::MAX_BATCH)));
        }
        if self.draining.load(Ordering::SeqCst) {
            return Err(Status::failed_precondition("this agent is draining too"));
        }
        let peer = self
            .membership
            .all()
            .into_iter()
            .find(|p| p.node_id().as_deref() == Some(r.node_id.as_str()))
            .ok_or_else(|| Status::failed_precondition("handoff from a peer this agent does not know"))?;
        if from.is_some_and(|f| !peer.has_ip(f.ip())) {
            return Err(Status::permission_denied("a peer hands off only from its own address"));
        }
        if !peer.state().draining {
            return Err(Status::failed_precondition("a peer hands off only while it drains (as its own probe answer says)"));
        }
        let wanted = r
            .chunks
            .into_iter()
            .enumerate()
            .map(|(i, c)| {
                let obj = self.lookup(c.object.as_ref()).ok().filter(|o| c.index < chunk_count(o.size, chunk_size));
                // The caller says how cold its chunk is; it never makes room by evicting chunks
                // this agent used within the last MIN_IDLE.
                let idle = Duration::from_millis(c.idle_ms).max(super::handoff::MIN_IDLE);
                super::handoff::Wanted { position: i as u32, obj, index: c.index, idle }
            })
            .collect();
        Ok(super::handoff::Pulls { source, from: peer, wanted })
    }
}

#[tonic::async_trait]
impl Peer for PeerServer {
    type ReadChunkStream = ChunkStream;
    type HandoffStream = HandoffStream;

    async fn handoff(&self, req: Request<HandoffRequest>) -> Result<Response<HandoffStream>, Status> {
        self.metrics.add_control(ControlKind::handoff, Direction::received);
        let from = req.remote_addr();
        let r = req.into_inner();
        // Its Drain notice may not have reached us: ask the peer itself whether it drains.
        let known = self.membership.all().into_iter().find(|p| p.node_id().as_deref() == Some(r.node_id.as_str()));
        if known.is_some_and(|p| !p.state().draining) {
            self.membership.recheck(&r.node_id).await;
        }
        let plan = self.handoff_plan(r, from)?;
        let pulls = super::handoff::pull_all(plan, self.metrics.clone(), self.reader.chunk_size());
        Ok(Response::new(Box::pin(futures::StreamExt::map(pulls, Ok))))
    }

    async fn lookup(&self, req: Request<LookupRequest>) -> Result<Response<LookupResponse>, Status> {
        self.metrics.add_control(ControlKind::lookup, Direction::received);
        let r = req.into_inner();
        let (tracking, object) = self.tracked(r.object.as_ref(), r.chunk_size)?;
        let a = tracking.discovery.on_lookup(&object, r.segment, &r.node_id);
        let holders =
            a.holders.into_iter().map(|h| SegmentHolding { node_id: h.node.to_string(), present: h.present, filling: h.filling }).collect();
        Ok(Response::new(LookupResponse { holders, enough: a.enough }))
    }

    async fn announce(&self, req: Request<AnnounceRequest>) -> Result<Response<AnnounceResponse>, Status> {
        self.metrics.add_control(ControlKind::announce, Direction::received);
        let from = req.remote_addr();
        let r = req.into_inner();
        if r.segments.len() > 1024 {
            return Err(Status::invalid_argument("at most 1024 segments per announcement"));
        }
        // Only a member may say what it holds, and only from its own address.
        let known = self.membership.all().into_iter().find(|p| p.node_id().as_deref() == Some(r.node_id.as_str()));
        let known = known.filter(|p| from.is_some_and(|f| p.has_ip(f.ip())));
        if known.is_none() {
            return Err(Status::permission_denied("announcements are taken only from a member, at its own address"));
        }
        let node: crate::swarm::NodeId = Arc::from(r.node_id.as_str());
        let handing_over = known.as_ref().is_some_and(|p| p.state().draining);
        let mut batch = Vec::with_capacity(r.segments.len());
        for a in &r.segments {
            let (tracking, object) = self.tracked(a.object.as_ref(), r.chunk_size)?;
            let node = match a.holder.as_str() {
                "" => node.clone(),
                h if h == r.node_id => node.clone(),
                _ if !handing_over => return Err(Status::permission_denied("only a draining tracker hands over what others hold")),
                h => Arc::from(h),
            };
            let holding = crate::swarm::tracker::Holding { node, present: a.present, filling: a.filling };
            batch.push((tracking, crate::swarm::tracker::Announce { object, segment: a.segment, holding, complete: a.complete }));
        }
        let enough = batch.into_iter().map(|(t, a)| t.discovery.on_announce(vec![a]).first().copied().unwrap_or(false)).collect();
        Ok(Response::new(AnnounceResponse { enough }))
    }

    async fn read_chunk(&self, req: Request<ReadChunkRequest>) -> Result<Response<ChunkStream>, Status> {
        let (bytes, crc, guard, _) = self.chunk(req.into_inner()).await?;
        Ok(Response::new(self.streams.stream(bytes, crc, guard, self.metrics.clone())))
    }

    async fn inventory(&self, req: Request<InventoryRequest>) -> Result<Response<InventoryResponse>, Status> {
        self.metrics.add_control(ControlKind::inventory, Direction::received);
        let r = req.into_inner();
        let chunk_size = self.reader.chunk_size();
        if r.chunk_size != chunk_size {
            return Err(Status::invalid_argument(format!("chunk size {} differs from this agent's {chunk_size}", r.chunk_size)));
        }
        if r.objects.len() > 1024 || (r.with_digests && r.objects.len() > 16) {
            return Err(Status::invalid_argument("at most 1024 objects per inventory request, 16 with digests"));
        }
        let memory = self.reader.memory();
        let keyring = self.membership.keyring();
        let found: Vec<_> = r.objects.iter().filter_map(|o| Some((o, self.lookup(Some(o)).ok()?))).collect();
        let mut digests = match r.with_digests {
            true => digests_of(memory.clone(), found.iter().map(|(_, obj)| obj.clone()).collect()).await,
            false => Vec::new(),
        }
        .into_iter();
        let objects = found
            .into_iter()
            .map(|(o, obj)| {
                let n = chunk_count(obj.size, chunk_size);
                let digests = digests.next().unwrap_or_default();
                ObjectInventory {
                    key: obj.key.clone(),
                    etag: o.etag.clone(),
                    present: bitmap(n, |i| memory.contains(&obj, i)).into(),
                    chunks: n,
                    filling: bitmap(n, |i| self.reader.filling(&obj, i)).into(),
                    digests_mac: match (&keyring, digests.is_empty()) {
                        (Some(k), false) => k.sign(DIGESTS_LABEL, &[obj.key.as_bytes(), o.etag.as_bytes(), &digests]).into(),
                        _ => Default::default(),
                    },
                    digests: digests.into(),
                }
            })
            .collect();
        Ok(Response::new(InventoryResponse { objects, draining: self.draining.load(Ordering::SeqCst) }))
    }

    async fn hello(&self, req: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        self.metrics.add_control(ControlKind::hello, Direction::received);
        let from = req.remote_addr();
        let h = req.into_inner();
        if let (Some(from), Ok(port)) = (from, u16::try_from(h.listen_port)) {
            if port != 0 && !h.node_id.is_empty() && h.node_id != self.node_id {
                self.membership.heard_from(std::net::SocketAddr::new(from.ip(), port), &h.node_id);
            }
        }
        Ok(Response::new(HelloResponse {
            node_id: self.node_id.clone(),
            protocol: PROTOCOL,
            draining: self.draining.load(Ordering::SeqCst),
            chunk_size: self.reader.chunk_size(),
            source: self.source.clone(),
            raw_data: self.raw_data,
        }))
    }

    async fn gossip(&self, req: Request<GossipMessage>) -> Result<Response<GossipAck>, Status> {
        let swim = self.gossip.as_ref().ok_or_else(|| Status::unimplemented("this agent does not gossip"))?;
        if !req.remote_addr().is_some_and(|a| self.membership.admits(a.ip())) {
            return Err(Status::permission_denied("gossip is taken only from configured peers (peers are unauthenticated)"));
        }
        swim.receive(&req.into_inner().data).map_err(Status::invalid_argument)?;
        Ok(Response::new(GossipAck {}))
    }

    async fn drain(&self, req: Request<DrainNotice>) -> Result<Response<DrainAck>, Status> {
        self.metrics.add_control(ControlKind::drain, Direction::received);
        // Not taken on the caller's word: the named peer is asked.
        let n = req.into_inner();
        self.membership.recheck(&n.node_id).await;
        Ok(Response::new(DrainAck {}))
    }
}

/// Check the server side of mutual TLS at start-up, so bad PEM is a clear error, not a late one.
pub fn check_tls(t: &crate::config::PeerTls) -> Result<(), super::membership::PeerSetupError> {
    use tonic::transport::{Certificate, Identity, ServerTlsConfig};
    tonic::transport::Server::builder()
        .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(&t.cert, &t.key)).client_ca_root(Certificate::from_pem(&t.ca)))
        .map(|_| ())
        .map_err(super::membership::PeerSetupError::ServerTls)
}

/// How often an idle peer connection is pinged.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// Serve on `listener` until `stop`, with per-connection stream limits and a request deadline.
pub async fn serve(
    server: PeerServer,
    listener: tokio::net::TcpListener,
    tokens: Vec<String>,
    tls: Option<crate::config::PeerTls>,
    tasks: tokio_util::task::TaskTracker,
    stop: tokio_util::sync::CancellationToken,
) -> Result<(), tonic::transport::Error> {
    // Inside TLS the token travels as metadata; without TLS every connection proves it instead.
    let metadata_tokens = if tls.is_some() { tokens.iter().map(|t| t.trim().as_bytes().to_vec()).collect() } else { Vec::new() };
    let keyring = if tls.is_none() { server.membership.keyring() } else { None };
    let server = Arc::new(server);
    let raw_data = server.raw_data && tls.is_none();
    let svc = super::proto::peer_server::PeerServer::from_arc(server.clone())
        .max_decoding_message_size(super::MAX_GRPC_MESSAGE)
        .max_encoding_message_size(super::MAX_GRPC_MESSAGE);
    let svc = tonic_intercept(svc, check_token(Arc::new(metadata_tokens)));
    tasks.spawn(server.streams.clone().run(stop.clone()));
    let incoming: std::pin::Pin<Box<dyn Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send>> = if raw_data || keyring.is_some() {
        Box::pin(super::raw::split(listener, server, keyring, tasks, stop.clone()))
    } else {
        Box::pin(tokio_stream::wrappers::TcpListenerStream::new(listener))
    };
    let mut builder = tonic::transport::Server::builder();
    if let Some(t) = tls {
        use tonic::transport::{Certificate, Identity, ServerTlsConfig};
        // Mutual TLS: peers must present a certificate that chains to the CA.
        builder = builder.tls_config(
            ServerTlsConfig::new().identity(Identity::from_pem(&t.cert, &t.key)).client_ca_root(Certificate::from_pem(&t.ca)),
        )?;
    }
    builder
        .concurrency_limit_per_connection(64)
        .timeout(Duration::from_secs(60))
        // A client gone without a close (a preempted host) is noticed and its streams ended.
        .http2_keepalive_interval(Some(KEEPALIVE))
        .http2_keepalive_timeout(Some(KEEPALIVE * 2))
        .tcp_nodelay(true)
        .initial_stream_window_size(super::STREAM_WINDOW)
        .initial_connection_window_size(super::CONNECTION_WINDOW)
        .max_frame_size(super::FRAME_SIZE)
        .add_service(svc)
        .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
        .await
}

fn tonic_intercept<S, F>(svc: S, f: F) -> tonic::service::interceptor::InterceptedService<S, F>
where
    F: tonic::service::Interceptor,
{
    tonic::service::interceptor::InterceptedService::new(svc, f)
}
