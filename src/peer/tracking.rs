//! Holder discovery in the agent: `swarm::Discovery` over gRPC (`Lookup`, `Announce`).
//!
//! # Contract
//! - [`Tracking::holders`] answers the holders and fillers of a chunk that its segment's
//!   trackers know, as live, non-draining peers of this agent's membership: a node id that is
//!   not one of them is never a source.
//! - [`Tracking::run`] compares, every [`ANNOUNCE_TICK`], what this agent holds and fills of the
//!   objects read through it lately with what it last told, and announces the changes (see
//!   `swarm::view`) until `stop`.
//! - Every lookup and announcement times out after the inventory timeout; a tracker that fails
//!   costs a try of the next one, then the chunk's owner, never a wrong byte.

use std::collections::HashMap;
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use futures::future::{BoxFuture, FutureExt};
use lru::LruCache;
use tokio_util::sync::CancellationToken;

use super::inventory::Holders;
use super::membership::{Membership, PeerHandle};
use super::object_ref;
use super::proto::{AnnounceRequest, LookupRequest, ObjectRef, SegmentAnnounce};
use crate::cache::chunk::chunk_count;
use crate::cache::{MemoryTier, Reader};
use crate::catalog::ObjectVersion;
use crate::metrics::{ControlKind, Direction, Metrics};
use crate::swarm::tracker::{Announce, Answer, Holding};
use crate::swarm::{Discovery, NodeId, Ring, Transport};

/// How often this agent's holdings are compared with what it told its trackers.
pub const ANNOUNCE_TICK: Duration = Duration::from_millis(100);
/// Segments in one announcement (the server's limit).
const MAX_ANNOUNCED: usize = 1024;
/// Objects whose holdings are announced (the least recently read beyond it are not).
const RECENT_OBJECTS: usize = 256;
/// Holdings are compared only for objects read this recently: an idle cache costs no scans (what
/// was told stays announced, and a holder that lost a chunk answers NOT_FOUND).
const SYNC_WINDOW: Duration = Duration::from_secs(30);

/// The name trackers know an object version by (the same on every agent).
pub fn tracker_key(r: &ObjectRef) -> Arc<str> {
    Arc::from(format!("{}\0{}\0{}\0{}", r.key, r.etag, r.version, r.size))
}

/// The object version a tracker key names.
fn object_from_key(key: &str) -> Option<ObjectRef> {
    let mut parts = key.split('\0');
    let (k, etag, version, size) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?.parse().ok()?);
    parts.next().is_none().then(|| ObjectRef { key: k.into(), etag: etag.into(), version: version.into(), size })
}

/// An object read through this agent lately, and when.
type Recent = (Arc<ObjectVersion>, std::time::Instant);

/// What this agent last told of one object: per chunk, held and filling.
#[derive(Default)]
struct Told {
    present: Vec<bool>,
    filling: Vec<bool>,
}

pub struct Tracking {
    pub discovery: Discovery,
    membership: Arc<Membership>,
    memory: Arc<MemoryTier>,
    metrics: Arc<Metrics>,
    timeout: Duration,
    chunk_size: u64,
    draining: Arc<AtomicBool>,
    /// Tracker key → the object and when it was last read through this agent.
    recent: Mutex<LruCache<Arc<str>, Recent>>,
    told: Mutex<HashMap<Arc<str>, Told>>,
    rings: crate::peer::placement::RingCache,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Tracking {
    pub fn new(
        membership: Arc<Membership>,
        memory: Arc<MemoryTier>,
        metrics: Arc<Metrics>,
        timeout: Duration,
        draining: Arc<AtomicBool>,
    ) -> Self {
        let me: NodeId = Arc::from(membership.self_id());
        let cap = NonZeroUsize::new(RECENT_OBJECTS).unwrap_or(NonZeroUsize::MIN);
        Tracking {
            discovery: Discovery::new(me),
            chunk_size: memory.chunk_size(),
            membership,
            memory,
            metrics,
            timeout,
            draining,
            recent: Mutex::new(LruCache::new(cap)),
            told: Mutex::new(HashMap::new()),
            rings: Default::default(),
        }
    }

    /// Live, non-draining peers.
    fn usable(&self) -> Vec<Arc<PeerHandle>> {
        self.membership.live().into_iter().filter(|p| !p.state().draining && p.node_id().is_some()).collect()
    }

    /// The members trackers are chosen among: usable peers and this agent unless it drains.
    fn ring(&self, usable: &[Arc<PeerHandle>]) -> Arc<Ring> {
        let me = (!self.draining.load(Ordering::SeqCst)).then(|| &**self.discovery.me());
        self.rings.of_members(usable, me)
    }

    /// `obj` is read through this agent: its holdings are announced.
    pub fn touched(&self, obj: &Arc<ObjectVersion>) {
        lock(&self.recent).put(tracker_key(&object_ref(obj)), (obj.clone(), std::time::Instant::now()));
    }

    /// Holders and fillers of chunk `index` of `obj` that its trackers know (see the contract).
    pub async fn holders(&self, obj: &Arc<ObjectVersion>, index: u64) -> Holders {
        self.touched(obj);
        let usable = self.usable();
        let ring = self.ring(&usable);
        let s = self.discovery.sources(&Grpc(self), &ring, &tracker_key(&object_ref(obj)), index).await;
        let handle = |id: &NodeId| usable.iter().find(|p| p.node_id().as_deref() == Some(&**id)).cloned();
        (s.holders.iter().filter_map(handle).collect(), s.fillers.iter().filter_map(handle).collect())
    }

    /// `peer` could not serve chunk `index` of `obj`.
    pub fn not_a_source(&self, obj: &ObjectVersion, index: u64, peer: &PeerHandle) {
        if let Some(id) = peer.node_id() {
            self.discovery.not_a_source(&tracker_key(&object_ref(obj)), index, &id);
        }
    }

    /// Announce changes of this agent's holdings every tick until `stop`.
    pub async fn run(self: Arc<Self>, reader: Arc<Reader>, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(ANNOUNCE_TICK) => {}
            }
            self.sync(&reader);
            let usable = self.usable();
            let ring = self.ring(&usable);
            let via = Grpc(&self);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = self.discovery.announce(&via, &ring) => {}
            }
        }
    }

    /// Tell discovery what changed in this agent's holdings of the recent objects.
    fn sync(&self, reader: &Reader) {
        let (all, recent): (Vec<_>, Vec<_>) = {
            let r = lock(&self.recent);
            let all: Vec<Arc<str>> = r.iter().map(|(k, _)| k.clone()).collect();
            let recent = r.iter().filter(|(_, (_, at))| at.elapsed() <= SYNC_WINDOW).map(|(k, (o, _))| (k.clone(), o.clone())).collect();
            (all, recent)
        };
        let mut told = lock(&self.told);
        told.retain(|k, _| all.contains(k));
        for (key, obj) in recent {
            let n = chunk_count(obj.size, self.chunk_size);
            let t = told.entry(key.clone()).or_insert_with(|| Told { present: vec![false; n as usize], filling: vec![false; n as usize] });
            for i in 0..n {
                let (p, f) = (self.memory.contains(&obj, i), reader.filling(&obj, i));
                if t.present.get(i as usize).is_some_and(|&was| was != p) {
                    t.present[i as usize] = p;
                    self.discovery.set_present(&key, i, n, p);
                }
                if t.filling.get(i as usize).is_some_and(|&was| was != f) {
                    t.filling[i as usize] = f;
                    self.discovery.set_filling(&key, i, n, f);
                }
            }
        }
    }

    /// The peer named `id`, if usable.
    fn peer(&self, id: &str) -> Result<Arc<PeerHandle>, String> {
        self.usable().into_iter().find(|p| p.node_id().as_deref() == Some(id)).ok_or_else(|| format!("{id} is not a live peer"))
    }

    /// The object a tracker key names.
    fn object_of(&self, key: &Arc<str>) -> Option<ObjectRef> {
        lock(&self.recent).peek(key).map(|(o, _)| object_ref(o)).or_else(|| object_from_key(key))
    }

    /// This agent drains: what it tracks goes to each segment's next trackers (bounded by
    /// `until`), so lookups keep finding holders without waiting for their next announcements.
    pub async fn hand_over(&self, until: tokio::time::Instant) {
        let ring = self.ring(&self.usable());
        let per = self.discovery.handover(&ring);
        let segments: usize = per.values().map(Vec::len).sum();
        if segments == 0 {
            return;
        }
        let trackers = per.len();
        let via = Grpc(self);
        let via = &via;
        let sends = per.into_iter().map(|(to, batch)| async move {
            for part in batch.chunks(MAX_ANNOUNCED) {
                if let Err(e) = via.announce(&to, part.to_vec()).await {
                    tracing::debug!(tracker = %to, error = %e, "handing tracking over failed");
                }
            }
        });
        let done = tokio::time::timeout_at(until, futures::future::join_all(sends)).await.is_ok();
        tracing::info!(segments, trackers, done, "handed what this agent tracks to the next trackers");
    }

    /// Chunks of `segment` of `obj` (bit i: chunk i of the segment) that its trackers know a
    /// member other than this agent to hold; None if no tracker answered.
    pub async fn held_elsewhere(&self, obj: &Arc<ObjectVersion>, segment: u64) -> Option<u64> {
        let ring = self.ring(&self.usable());
        let key = tracker_key(&object_ref(obj));
        let holders = self.discovery.holders_of(&Grpc(self), &ring, &key, segment).await?;
        Some(holders.iter().filter(|h| h.node != *self.discovery.me()).fold(0, |m, h| m | h.present))
    }
}

/// Discovery's messages as gRPC calls.
struct Grpc<'a>(&'a Tracking);

impl Transport for Grpc<'_> {
    fn lookup<'a>(&'a self, to: &'a NodeId, object: &'a Arc<str>, segment: u64) -> BoxFuture<'a, Result<Answer, String>> {
        async move {
            let t = self.0;
            let peer = t.peer(to)?;
            let obj = t.object_of(object).ok_or("object not read here lately")?;
            let mut req = tonic::Request::new(LookupRequest {
                object: Some(obj),
                segment,
                chunk_size: t.chunk_size,
                node_id: t.discovery.me().to_string(),
            });
            req.set_timeout(t.timeout);
            t.metrics.add_control(ControlKind::lookup, Direction::sent);
            let r = tokio::time::timeout(t.timeout * 2, peer.client().lookup(req))
                .await
                .map_err(|_| format!("lookup at {} timed out", peer.addr))?
                .map_err(|s| format!("lookup at {}: {}", peer.addr, s.message()))?
                .into_inner();
            let holders = r
                .holders
                .into_iter()
                .take(crate::swarm::tracker::ANSWER_HOLDERS)
                .map(|h| Holding { node: NodeId::from(h.node_id), present: h.present, filling: h.filling })
                .collect();
            Ok(Answer { holders, enough: r.enough })
        }
        .boxed()
    }

    fn announce<'a>(&'a self, to: &'a NodeId, batch: Vec<Announce>) -> BoxFuture<'a, Result<Vec<bool>, String>> {
        async move {
            let t = self.0;
            let peer = t.peer(to)?;
            let segments: Vec<SegmentAnnounce> = batch
                .iter()
                .filter_map(|a| {
                    Some(SegmentAnnounce {
                        object: Some(t.object_of(&a.object)?),
                        segment: a.segment,
                        present: a.holding.present,
                        filling: a.holding.filling,
                        complete: a.complete,
                        holder: if a.holding.node == *t.discovery.me() { String::new() } else { a.holding.node.to_string() },
                    })
                })
                .collect();
            if segments.len() != batch.len() {
                return Err("an announced object is no longer recent".into());
            }
            let mut req =
                tonic::Request::new(AnnounceRequest { node_id: t.discovery.me().to_string(), chunk_size: t.chunk_size, segments });
            req.set_timeout(t.timeout);
            t.metrics.add_control(ControlKind::announce, Direction::sent);
            let r = tokio::time::timeout(t.timeout * 2, peer.client().announce(req))
                .await
                .map_err(|_| format!("announce to {} timed out", peer.addr))?
                .map_err(|s| format!("announce to {}: {}", peer.addr, s.message()))?;
            Ok(r.into_inner().enough)
        }
        .boxed()
    }
}
