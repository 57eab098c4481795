//! The peer tier of the read path.
//!
//! # Contract (`ChunkSource`)
//! For a missing chunk, in the order of [`swarm::plan`]: (a) up to three live peers known to hold
//! it (its segment trackers and, in a small mesh, inventories), consecutive chunks starting at
//! different holders; (b) peers fetching it from the origin right now (join that fetch); (c) the
//! chunk's owner (rendezvous over live, non-draining peers and this agent), asked to fill it,
//! then its successor (who takes the chunk over when the owner leaves); (d) where this agent
//! comes in that line, or nobody could serve it, `Ok(None)`: the origin comes next. A live peer whose inventory is unknown (never
//! asked since it came up) is asked first, within the inventory timeout: unknown is not absent.
//! Every chunk received is written straight into the memory tier as it arrives and checked
//! (length, offsets, crc32c over the whole chunk) before it counts; a peer error, timeout, short
//! stream or checksum mismatch moves on to the next holder and finally falls through to the origin.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use futures::future::{BoxFuture, FutureExt};
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::inventory::{Holders, Inventories};
use super::membership::{Attempt, Membership, PeerHandle};
use super::placement;
use super::proto::{HandoffOutcome, ReadChunkRequest};
use super::{object_ref, PROTOCOL};
use crate::cache::memory::Fill;
use crate::cache::reader::Stage;
use crate::cache::verify::Verifier;
use crate::cache::{Chunk, ChunkKey, ChunkSource, MemoryTier};
use crate::catalog::ObjectVersion;
use crate::error::Error;
use crate::metrics::{Metrics, Tier};
use crate::swarm::{self, NodeId, Sources, Step};

#[derive(Debug, Clone)]
pub struct PeerTimeouts {
    /// A chunk a peer holds in memory.
    pub hit: Duration,
    /// A chunk the owner may have to fetch from origin first.
    pub fill: Duration,
    pub inventory: Duration,
    /// All the peer tier may spend on one chunk (every holder and the owner together) before
    /// the origin is asked: the rest of the read deadline is the origin's.
    pub budget: Duration,
}

impl Default for PeerTimeouts {
    fn default() -> Self {
        Self::within(Duration::from_secs(crate::config::DEFAULT_READ_TIMEOUT_SECS))
    }
}

impl PeerTimeouts {
    /// Timeouts for reads that must answer within `read_timeout`: the peer tier gets at most
    /// half of it, so a stalling peer never costs a read that the origin could answer.
    pub fn within(read_timeout: Duration) -> Self {
        let budget = read_timeout / 2;
        PeerTimeouts {
            hit: Duration::from_secs(5).min(budget),
            fill: Duration::from_secs(10).min(budget),
            inventory: Duration::from_secs(2).min(budget / 2),
            budget,
        }
    }
}

/// Where a chunk from a peer goes as it arrives: straight into the memory tier, or (no room
/// there) a buffer.
#[allow(clippy::large_enum_variant)] // one per chunk in flight
enum Sink {
    File(Fill),
    Heap(BytesMut),
}

impl Sink {
    fn written(&self) -> u64 {
        match self {
            Sink::File(f) => f.written(),
            Sink::Heap(b) => b.len() as u64,
        }
    }

    fn write(&mut self, data: &[u8]) -> Result<(), PeerFetchError> {
        match self {
            Sink::File(f) => f.write(data).map_err(|e| PeerFetchError::Local(e.to_string())),
            Sink::Heap(b) => {
                b.extend_from_slice(data);
                Ok(())
            }
        }
    }

    /// The verified chunk: its crc32c is the one the peer sent and, when another holder vouched
    /// for it, its BLAKE3 is that digest; committed to memory if it was written there.
    fn finish(self, crc: u32, vouched: Option<[u8; 32]>) -> Result<Chunk, PeerFetchError> {
        match self {
            Sink::File(f) if vouched.is_some() && f.digest() != vouched => Err(PeerFetchError::Digest),
            Sink::File(f) if f.by_digest() => match vouched {
                Some(d) => f
                    .commit_vouched(d, crc, Tier::peer)
                    .map(|bytes| Chunk { bytes, stored: true })
                    .map_err(|e| PeerFetchError::Local(e.to_string())),
                None => Err(PeerFetchError::Local("a chunk checked by digest has none".into())),
            },
            Sink::File(f) if f.crc() != crc => Err(PeerFetchError::Checksum),
            Sink::File(f) => {
                f.commit(crc, Tier::peer).map(|bytes| Chunk { bytes, stored: true }).map_err(|e| PeerFetchError::Local(e.to_string()))
            }
            Sink::Heap(b) if crc32c::crc32c(&b) != crc => Err(PeerFetchError::Checksum),
            Sink::Heap(b) if vouched.is_some_and(|d| *blake3::hash(&b).as_bytes() != d) => Err(PeerFetchError::Digest),
            Sink::Heap(b) => Ok(b.freeze().into()),
        }
    }
}

/// What a chunk from a peer must be: its length and, when another holder vouched for it, its
/// BLAKE3 digest.
struct Expect {
    len: u64,
    digest: Option<[u8; 32]>,
}

/// A sink on the raw path, counting what it receives.
struct Counted<'a> {
    sink: &'a mut Sink,
    metrics: &'a Metrics,
}

impl super::raw::RawDest for Counted<'_> {
    fn take(&mut self, data: &[u8]) -> Result<(), super::raw::RawError> {
        self.metrics.peer_received_bytes.inc_by(data.len() as u64);
        self.sink.write(data).map_err(|e| super::raw::RawError::Frame(e.to_string()))
    }

    fn take_from_pipe(&mut self, pipe: &crate::splice::Pipe, n: usize) -> Result<(), super::raw::RawError> {
        self.metrics.peer_received_bytes.inc_by(n as u64);
        match self.sink {
            Sink::File(f) => f.write_from_pipe(pipe, n).map_err(super::raw::RawError::Io),
            Sink::Heap(b) => {
                let at = b.len();
                b.resize(at + n, 0);
                pipe.drain_into(&mut b[at..]).map_err(super::raw::RawError::Io)
            }
        }
    }
}

pub struct PeerSource {
    membership: Arc<Membership>,
    memory: Arc<MemoryTier>,
    chunk_size: u64,
    /// This agent drains: it stops being an owner.
    draining: Arc<AtomicBool>,
    timeouts: PeerTimeouts,
    metrics: Arc<Metrics>,
    inventories: Inventories,
    /// Told of every chunk stored from a peer; says which files must come from the origin.
    verifier: Option<Arc<Verifier>>,
    /// Holder discovery by segment trackers.
    tracking: Option<Arc<super::tracking::Tracking>>,
    /// Owners are chosen among the last member list.
    rings: placement::RingCache,
    /// Digests other holders vouch for (None: chunks are not checked against them).
    vouchers: Option<super::vouch::Vouchers>,
}

/// Meshes of at most this many usable peers are also asked for inventories (at most one request
/// per peer and object a second): exact knowledge where it is cheap, trackers beyond.
pub const INVENTORY_PEERS: usize = 8;

#[derive(Debug, thiserror::Error)]
enum PeerFetchError {
    #[error("{0:?}: {1}")]
    Status(tonic::Code, String),
    #[error("timed out")]
    Timeout,
    #[error("bad stream: {0}")]
    Protocol(String),
    #[error("checksum mismatch")]
    Checksum,
    #[error("digest differs from the one another holder vouches for")]
    Digest,
    #[error("memory tier: {0}")]
    Local(String),
}

impl PeerSource {
    pub fn new(
        membership: Arc<Membership>,
        memory: Arc<MemoryTier>,
        draining: Arc<AtomicBool>,
        timeouts: PeerTimeouts,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
    ) -> Self {
        let chunk_size = memory.chunk_size();
        let inventories = Inventories::new(chunk_size, timeouts.inventory, metrics.clone(), tasks);
        let vouchers = memory
            .keeps_digests()
            .then(|| super::vouch::Vouchers::new(membership.keyring(), chunk_size, timeouts.inventory, metrics.clone()));
        PeerSource {
            membership,
            memory,
            chunk_size,
            draining,
            timeouts,
            metrics,
            inventories,
            verifier: None,
            tracking: None,
            rings: Default::default(),
            vouchers,
        }
    }

    /// Find holders through segment trackers too (see `peer::tracking`).
    pub fn with_tracking(mut self, t: Arc<super::tracking::Tracking>) -> Self {
        self.tracking = Some(t);
        self
    }

    /// Check files assembled from peers with `v` (see `cache::verify`).
    pub fn with_verifier(mut self, v: Arc<Verifier>) -> Self {
        self.verifier = Some(v);
        self
    }

    /// Live, non-draining peers that hold chunk `index` of `obj`, and those fetching it from the
    /// origin now: what the chunk's trackers know and, in a small mesh, every peer's inventory
    /// (peers not asked since they came up are asked first).
    async fn holders(&self, obj: &Arc<ObjectVersion>, index: u64) -> Holders {
        let usable: Vec<_> = self.membership.live().into_iter().filter(|p| !p.state().draining).collect();
        if usable.is_empty() {
            return (Vec::new(), Vec::new());
        }
        let (mut holders, mut fillers) = match &self.tracking {
            Some(t) => t.holders(obj, index).await,
            None => (Vec::new(), Vec::new()),
        };
        if usable.len() <= INVENTORY_PEERS || self.tracking.is_none() {
            let (h, f) = self.inventories.holders(obj, &usable, index).await;
            holders.extend(h);
            fillers.extend(f);
        }
        for v in [&mut holders, &mut fillers] {
            v.sort_by_key(|p| p.node_id());
            v.dedup_by(|a, b| a.addr == b.addr);
        }
        (holders, fillers)
    }

    /// Where chunk `index` of `obj` goes as it arrives: the memory tier, or (no room) a buffer.
    /// With a digest `vouched` for it, the chunk is checked by that alone (no crc32c taken).
    fn sink(&self, obj: &ObjectVersion, index: u64, want: u64, vouched: bool) -> Sink {
        match self.memory.begin_fill(obj, index) {
            Ok(Some(mut f)) => {
                if vouched {
                    f.check_by_digest();
                }
                Sink::File(f)
            }
            _ => Sink::Heap(BytesMut::with_capacity(want as usize)),
        }
    }

    /// A chunk `from` hands off before it goes away (see `peer::handoff`): pulled and stored
    /// only if room can be made by evicting chunks used longer than `idle` ago.
    pub async fn take_handoff(&self, from: &PeerHandle, obj: &Arc<ObjectVersion>, index: u64, idle: Duration) -> HandoffOutcome {
        let want = crate::cache::chunk::chunk_range(index, obj.size, self.chunk_size);
        let fill = match self.memory.begin_fill_colder(obj, index, idle) {
            Ok(Some(f)) => f,
            // Present already, or being written by another fill here.
            Ok(None) if self.memory.contains(obj, index) => return HandoffOutcome::HandoffHeld,
            Ok(None) => return HandoffOutcome::HandoffNoRoom,
            Err(e) => {
                debug!(key = %obj.key, index, error = %e, "cannot store a handed-off chunk");
                return HandoffOutcome::HandoffFailed;
            }
        };
        match self.read_into(from, obj, index, Expect { len: want.end - want.start, digest: None }, false, Sink::File(fill)).await {
            Ok(_) => HandoffOutcome::HandoffStored,
            Err(_) => HandoffOutcome::HandoffFailed,
        }
    }

    /// Stream chunk `index` from `peer` into `sink` and verify it; the outcome is reported to
    /// the membership.
    async fn read_into(
        &self,
        peer: &PeerHandle,
        obj: &Arc<ObjectVersion>,
        index: u64,
        expect: Expect,
        allow_fill: bool,
        mut sink: Sink,
    ) -> Result<Chunk, PeerFetchError> {
        let Expect { len: want, digest: vouched } = expect;
        let attempt = peer.attempt();
        let limit = if allow_fill { self.timeouts.fill } else { self.timeouts.hit };
        let req = ReadChunkRequest { object: Some(object_ref(obj)), index, chunk_size: self.chunk_size, allow_fill, protocol: PROTOCOL };
        let chunk = async {
            let received = if peer.state().raw {
                self.receive_raw(peer, req, want, &mut sink).boxed()
            } else {
                self.receive_grpc(peer, req, limit, want, &mut sink).boxed()
            };
            let crc = tokio::time::timeout(limit, received).await.map_err(|_| PeerFetchError::Timeout)??;
            let have = sink.written();
            if have != want {
                return Err(PeerFetchError::Protocol(format!("short stream: {have} of {want} bytes")));
            }
            sink.finish(crc, vouched).map(|c| (c, crc))
        }
        .await;
        match (&chunk, &self.verifier) {
            (Err(e), _) => self.failed(peer, &attempt, obj, index, e),
            (Ok((c, crc)), Some(v)) if c.stored => v.from_peer(obj, index, *crc, &peer.addr),
            (Ok(_), Some(v)) => v.unkept(obj, index, &peer.addr),
            _ => {}
        }
        if chunk.is_ok() {
            self.membership.report_success(peer);
        }
        chunk.map(|(c, _)| c)
    }

    /// The chunk over gRPC into `sink`; returns the crc32c the peer sent.
    async fn receive_grpc(
        &self,
        peer: &PeerHandle,
        req: ReadChunkRequest,
        limit: Duration,
        want: u64,
        sink: &mut Sink,
    ) -> Result<u32, PeerFetchError> {
        let mut req = tonic::Request::new(req);
        req.set_timeout(limit);
        let status = |s: tonic::Status| PeerFetchError::Status(s.code(), s.message().to_string());
        let mut stream = peer.client().read_chunk(req).await.map_err(status)?.into_inner();
        let mut crc = None;
        while let Some(msg) = stream.message().await.map_err(status)? {
            if crc.is_none() {
                if msg.chunk_len != want {
                    return Err(PeerFetchError::Protocol(format!("chunk length {} != {want}", msg.chunk_len)));
                }
                crc = Some(msg.crc32c);
            }
            let have = sink.written();
            if msg.offset != have || have + msg.data.len() as u64 > want {
                return Err(PeerFetchError::Protocol(format!("data at offset {} (have {have} of {want})", msg.offset)));
            }
            sink.write(&msg.data)?;
            self.metrics.peer_received_bytes.inc_by(msg.data.len() as u64);
        }
        crc.ok_or_else(|| PeerFetchError::Protocol("empty stream".into()))
    }

    /// The chunk over the raw data path into `sink`; returns the crc32c the peer sent.
    async fn receive_raw(&self, peer: &PeerHandle, req: ReadChunkRequest, want: u64, sink: &mut Sink) -> Result<u32, PeerFetchError> {
        use super::raw::RawError;
        let mut dest = Counted { sink, metrics: &self.metrics };
        match peer.raw.read_chunk(&req, want, self.timeouts.inventory, &mut dest).await {
            Ok(crc) => Ok(crc),
            Err(RawError::Status(code, msg)) => Err(PeerFetchError::Status(code, msg)),
            Err(e) => Err(PeerFetchError::Protocol(format!("raw data path: {e}"))),
        }
    }

    /// What a failed request tells about `peer`: NOT_FOUND only that our view of it is stale.
    fn failed(&self, peer: &PeerHandle, attempt: &Attempt, obj: &ObjectVersion, index: u64, e: &PeerFetchError) {
        debug!(peer = %peer.addr, key = %obj.key, index, error = %e, "peer could not serve the chunk");
        match e {
            PeerFetchError::Status(tonic::Code::NotFound, _) => {
                self.inventories.forget(obj);
                if let Some(t) = &self.tracking {
                    t.not_a_source(obj, index, peer);
                }
            }
            // Busy filling for others: healthy, and the origin is asked instead.
            PeerFetchError::Status(tonic::Code::ResourceExhausted, _) | PeerFetchError::Local(_) => {}
            _ => {
                if matches!(e, PeerFetchError::Checksum) {
                    self.metrics.peer_checksum_errors.inc();
                    warn!(peer = %peer.addr, key = %obj.key, index, "peer sent a chunk that fails its checksum; fetching elsewhere");
                }
                if matches!(e, PeerFetchError::Digest) {
                    self.metrics.peer_digest_mismatches.inc();
                    warn!(peer = %peer.addr, key = %obj.key, index, "peer sent a chunk whose digest differs from the one another holder vouches for; dropped unread, fetching elsewhere");
                }
                self.membership.report_failure(peer, attempt, &e.to_string());
            }
        }
    }

    async fn fetch_chunk(&self, obj: &Arc<ObjectVersion>, index: u64, range: Range<u64>, stage: &Stage) -> Result<Option<Chunk>, Error> {
        let want = range.end - range.start;
        if self.verifier.as_ref().is_some_and(|v| v.origin_only(obj)) {
            return Ok(None);
        }
        let (mut holders, fillers) = self.holders(obj, index).await;
        stage.waiting_on_peer(!holders.is_empty() || !fillers.is_empty());
        // Consecutive chunks start at different holders, so a read stripes over all of them.
        if !holders.is_empty() {
            let n = holders.len();
            holders.rotate_left(index as usize % n);
        }
        let candidates = self.membership.owner_candidates();
        let ring = self.owner_ring(&candidates);
        let key = ChunkKey { object: obj.id.clone(), index };
        let me = NodeId::from(self.membership.self_id());
        let ids = |v: &[Arc<PeerHandle>]| v.iter().filter_map(|p| p.node_id()).map(NodeId::from).collect::<Vec<_>>();
        let sources = Sources { holders: ids(&holders), fillers: ids(&fillers) };
        let peer = |id: &NodeId| candidates.iter().chain(&holders).chain(&fillers).find(|p| p.node_id().as_deref() == Some(&**id)).cloned();
        for step in swarm::plan(sources, &ring.top(&key, 2), &me) {
            let (id, allow_fill) = match &step {
                Step::Holder(id) => (id, false),
                Step::Filler(id) | Step::Owner(id) => (id, true),
                Step::Origin => break,
            };
            let Some(p) = peer(id) else { continue };
            if matches!(step, Step::Owner(_)) {
                stage.waiting_on_peer(true);
            }
            let vouched = match &self.vouchers {
                Some(v) => v.digest(obj, index, &p, &holders).await,
                None => None,
            };
            let sink = self.sink(obj, index, want, vouched.is_some());
            if let Ok(c) = self.read_into(&p, obj, index, Expect { len: want, digest: vouched }, allow_fill, sink).await {
                return Ok(Some(c));
            }
        }
        // This agent owns the chunk, or no peer could serve it: the origin comes next.
        Ok(None)
    }

    /// The members owners are chosen among: live, non-draining peers and this agent unless it
    /// drains.
    fn owner_ring(&self, candidates: &[Arc<PeerHandle>]) -> Arc<swarm::Ring> {
        let me = (!self.draining.load(Ordering::SeqCst)).then(|| self.membership.self_id());
        self.rings.of_members(candidates, me)
    }
}

impl ChunkSource for PeerSource {
    fn tier(&self) -> Tier {
        Tier::peer
    }

    fn fetch<'a>(
        &'a self,
        obj: &'a Arc<ObjectVersion>,
        index: u64,
        range: Range<u64>,
        stage: &'a Stage,
    ) -> BoxFuture<'a, Result<Option<Chunk>, Error>> {
        Box::pin(async move {
            let r = match tokio::time::timeout(self.timeouts.budget, self.fetch_chunk(obj, index, range, stage)).await {
                Ok(r) => r,
                Err(_) => {
                    debug!(key = %obj.key, index, budget = ?self.timeouts.budget, "peers used up their share of the read deadline; asking the origin");
                    Ok(None)
                }
            };
            stage.waiting_on_peer(false);
            r
        })
    }
}
