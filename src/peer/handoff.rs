//! Handing off sole copies before this agent goes away (a preemption notice, `drain --handoff`).
//!
//! # Contract
//! - [`Handoff`] (the draining side) first hands what it tracks to each segment's next trackers,
//!   then finds the chunks it holds that no live, non-draining peer holds (their inventories in a
//!   small mesh, the segments' trackers beyond; one that does not answer counts as knowing of no
//!   copy) and asks
//!   each chunk's owner among those survivors (rendezvous over the survivors only) to pull it,
//!   most recently used first, until every sole chunk is placed or `until` passes. It reports
//!   the bytes of sole copies and, of those, the bytes a survivor confirmed it holds.
//! - [`pull_all`] (the surviving side) pulls each chunk from the draining peer over the chunk
//!   stream and stores it only within its own budget, evicting only chunks used less recently
//!   than the draining peer last used it; one outcome per chunk, in order.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use futures::{Stream, StreamExt};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::client::INVENTORY_PEERS;
use super::membership::{Membership, PeerHandle};
use super::proto::{HandoffChunk, HandoffOutcome, HandoffProgress, HandoffRequest, InventoryRequest};
use super::{bit, object_ref, placement, PeerSource};
use crate::cache::chunk::{chunk_range, ChunkKey};
use crate::cache::MemoryTier;
use crate::catalog::{Catalog, ObjectVersion};
use crate::metrics::{ControlKind, Direction, Metrics};
use crate::preempt::{HandOff, HandoffPolicy, HandoffReport};
use crate::swarm::{bit_of, segment_of};

/// Chunks asked for in one `Handoff` request.
const BATCH: usize = 16;
/// Chunks a survivor pulls at once.
const PULLS: usize = 4;
/// Survivors asked for their inventories at once.
const ASKS: usize = 16;
/// Objects named in one inventory request.
const INVENTORY_OBJECTS: usize = 256;
/// The rate a plain shutdown drain assumes when it decides whether there is time to hand off.
pub const PLANNING_RATE: u64 = 200_000_000;
/// A handed-off chunk counts as last used at least this long ago on the survivor: it never
/// evicts chunks the survivor used more recently (the caller's `idle_ms` may be anything).
pub const MIN_IDLE: Duration = Duration::from_secs(30);
/// Most chunks one `Handoff` request may name.
pub const MAX_BATCH: usize = 256;

/// A chunk this agent holds: its object, index, and how long since it was used.
type Held = (Arc<ObjectVersion>, u64, Duration);

/// One sole chunk to hand off.
struct Sole {
    obj: Arc<ObjectVersion>,
    index: u64,
    len: u64,
    idle: Duration,
}

/// The draining side.
pub struct Handoff {
    pub membership: Arc<Membership>,
    pub memory: Arc<MemoryTier>,
    pub catalog: Arc<Catalog>,
    pub metrics: Arc<Metrics>,
    pub inventory_timeout: Duration,
    /// Holder discovery: its tracking state is handed over, and in a large mesh its trackers say
    /// which chunks others hold.
    pub tracking: Option<Arc<super::tracking::Tracking>>,
}

impl HandOff for Handoff {
    fn run(&self, until: Instant, policy: HandoffPolicy) -> BoxFuture<'_, HandoffReport> {
        Box::pin(self.hand_off(until, policy))
    }
}

impl Handoff {
    async fn hand_off(&self, until: Instant, policy: HandoffPolicy) -> HandoffReport {
        if let Some(t) = &self.tracking {
            t.hand_over(until).await;
        }
        let survivors = self.membership.owner_candidates();
        let sole = self.sole_copies(&survivors, until).await;
        let sole_bytes = sole.iter().map(|s| s.len).sum::<u64>();
        let left = until.saturating_duration_since(Instant::now());
        let fits = Duration::from_secs_f64(sole_bytes as f64 / PLANNING_RATE as f64) <= left;
        let send = match policy {
            HandoffPolicy::Never => false,
            HandoffPolicy::IfTime => fits,
            HandoffPolicy::Always => true,
        };
        if !send || survivors.is_empty() || sole.is_empty() {
            if sole_bytes > 0 {
                info!(sole_bytes, survivors = survivors.len(), policy = ?policy, "not handing off chunks no peer holds");
            }
            return HandoffReport { sole_bytes, handed_off_bytes: 0 };
        }
        info!(chunks = sole.len(), bytes = sole_bytes, survivors = survivors.len(), left = ?left, "handing off chunks no peer holds");
        let plan = assign(sole, &survivors);
        let sends = plan.into_iter().map(|(peer, chunks)| async move {
            let mut done = 0u64;
            if tokio::time::timeout_at(until, self.send_to(&peer, &chunks, &mut done)).await.is_err() {
                warn!(peer = %peer.addr, "handoff to this peer ran out of time");
            }
            done
        });
        let handed_off_bytes = futures::future::join_all(sends).await.into_iter().sum();
        HandoffReport { sole_bytes, handed_off_bytes }
    }

    /// Held chunks of listed objects that no survivor holds, most recently used first. In a
    /// mesh of at most `INVENTORY_PEERS` survivors, each is asked for its inventory ([`ASKS`] at
    /// a time); beyond, each held segment's trackers are asked. None past `until`: a survivor
    /// or tracker that has not answered by then counts as knowing of no other copy.
    async fn sole_copies(&self, survivors: &[Arc<PeerHandle>], until: Instant) -> Vec<Sole> {
        let versions: HashMap<Arc<str>, Arc<ObjectVersion>> = self.catalog.files().into_iter().map(|o| (o.id.clone(), o)).collect();
        let held: Vec<(Arc<ObjectVersion>, u64, Duration)> =
            self.memory.held().into_iter().filter_map(|(k, _, idle)| Some((versions.get(&k.object)?.clone(), k.index, idle))).collect();
        let elsewhere = match &self.tracking {
            Some(t) if survivors.len() > INVENTORY_PEERS => self.tracked_elsewhere(t, &held, until).await,
            _ => self.inventories_elsewhere(survivors, &held, until).await,
        };
        let chunk_size = self.memory.chunk_size();
        held.into_iter()
            .filter(|(o, i, _)| !elsewhere.contains(&(o.id.clone(), *i)))
            .map(|(obj, index, idle)| {
                let r = chunk_range(index, obj.size, chunk_size);
                Sole { obj, index, len: r.end - r.start, idle }
            })
            .collect()
    }

    /// Held chunks some survivor's inventory lists.
    async fn inventories_elsewhere(&self, survivors: &[Arc<PeerHandle>], held: &[Held], until: Instant) -> HashSet<(Arc<str>, u64)> {
        let mut seen = HashSet::new();
        let objects: Vec<Arc<ObjectVersion>> =
            held.iter().filter(|(o, _, _)| seen.insert(o.id.clone())).map(|(o, _, _)| o.clone()).collect();
        let objects = &objects;
        let asks = futures::stream::iter(survivors.iter().cloned())
            .map(|p: Arc<PeerHandle>| async move {
                let answer = tokio::time::timeout_at(until, self.inventory(&p, objects)).await;
                answer.unwrap_or_else(|_| {
                    debug!(peer = %p.addr, "no inventory before the drain's deadline: it counts as holding nothing");
                    Vec::new()
                })
            })
            .buffer_unordered(ASKS);
        let mut present: HashMap<Arc<str>, Vec<Vec<u8>>> = HashMap::new();
        for (id, bits) in asks.collect::<Vec<_>>().await.into_iter().flatten() {
            present.entry(id).or_default().push(bits);
        }
        let listed = |o: &ObjectVersion, i: u64| present.get(&o.id).is_some_and(|maps| maps.iter().any(|m| bit(m, i)));
        held.iter().filter(|(o, i, _)| listed(o, *i)).map(|(o, i, _)| (o.id.clone(), *i)).collect()
    }

    /// Held chunks the trackers of their segments know another member to hold (one lookup per
    /// held segment, [`ASKS`] at a time, whatever the mesh's size).
    async fn tracked_elsewhere(&self, t: &super::tracking::Tracking, held: &[Held], until: Instant) -> HashSet<(Arc<str>, u64)> {
        let mut segments: HashMap<(Arc<str>, u64), Arc<ObjectVersion>> = HashMap::new();
        for (o, i, _) in held {
            segments.entry((o.id.clone(), segment_of(*i))).or_insert_with(|| o.clone());
        }
        let asks = futures::stream::iter(segments)
            .map(|((id, seg), o)| async move {
                let bits = tokio::time::timeout_at(until, t.held_elsewhere(&o, seg)).await.ok().flatten().unwrap_or(0);
                (id, seg, bits)
            })
            .buffer_unordered(ASKS);
        let found: Vec<(Arc<str>, u64, u64)> = asks.collect().await;
        let bits: HashMap<(Arc<str>, u64), u64> = found.into_iter().map(|(id, seg, b)| ((id, seg), b)).collect();
        let listed = |o: &ObjectVersion, i: u64| bits.get(&(o.id.clone(), segment_of(i))).is_some_and(|b| b & bit_of(i) != 0);
        held.iter().filter(|(o, i, _)| listed(o, *i)).map(|(o, i, _)| (o.id.clone(), *i)).collect()
    }

    /// What `peer` holds of `objects`: object id → present bitmap (nothing if it does not answer).
    async fn inventory(&self, peer: &PeerHandle, objects: &[Arc<ObjectVersion>]) -> Vec<(Arc<str>, Vec<u8>)> {
        let mut out = Vec::new();
        for group in objects.chunks(INVENTORY_OBJECTS) {
            let req = InventoryRequest {
                objects: group.iter().map(|o| object_ref(o)).collect(),
                chunk_size: self.memory.chunk_size(),
                with_digests: false,
            };
            let mut req = tonic::Request::new(req);
            req.set_timeout(self.inventory_timeout);
            self.metrics.add_control(ControlKind::inventory, Direction::sent);
            match tokio::time::timeout(self.inventory_timeout * 2, peer.client().inventory(req)).await {
                Ok(Ok(r)) => {
                    for inv in r.into_inner().objects {
                        if let Some(o) = group.iter().find(|o| o.key == inv.key) {
                            out.push((o.id.clone(), inv.present.to_vec()));
                        }
                    }
                }
                _ => debug!(peer = %peer.addr, "no inventory for the handoff: it counts as holding nothing"),
            }
        }
        out
    }

    /// Ask `peer` to pull `chunks`, a batch at a time; `done` counts the bytes it holds now.
    async fn send_to(&self, peer: &PeerHandle, chunks: &[Sole], done: &mut u64) {
        for batch in chunks.chunks(BATCH) {
            let req = HandoffRequest {
                node_id: self.membership.self_id().to_string(),
                chunk_size: self.memory.chunk_size(),
                chunks: batch
                    .iter()
                    .map(|s| HandoffChunk { object: Some(object_ref(&s.obj)), index: s.index, idle_ms: s.idle.as_millis() as u64 })
                    .collect(),
            };
            self.metrics.add_control(ControlKind::handoff, Direction::sent);
            let mut stream = match peer.client().handoff(req).await {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    warn!(peer = %peer.addr, error = %status.message(), "peer refused the handoff");
                    return;
                }
            };
            while let Ok(Some(p)) = stream.message().await {
                let Some(s) = batch.get(p.position as usize) else { continue };
                match p.outcome() {
                    HandoffOutcome::HandoffStored => {
                        self.metrics.add_handoff(Direction::sent, s.len);
                        *done += s.len;
                    }
                    HandoffOutcome::HandoffHeld => *done += s.len,
                    other => debug!(peer = %peer.addr, key = %s.obj.key, index = s.index, outcome = ?other, "chunk not handed off"),
                }
            }
        }
    }
}

/// Each sole chunk with the survivor that will own it once this agent is gone.
fn assign(sole: Vec<Sole>, survivors: &[Arc<PeerHandle>]) -> Vec<(Arc<PeerHandle>, Vec<Sole>)> {
    let named: Vec<(String, Arc<PeerHandle>)> = survivors.iter().filter_map(|p| Some((p.node_id()?, p.clone()))).collect();
    let names: Vec<String> = named.iter().map(|(n, _)| n.clone()).collect();
    let mut plan: Vec<(Arc<PeerHandle>, Vec<Sole>)> = named.iter().map(|(_, p)| (p.clone(), Vec::new())).collect();
    for s in sole {
        let key = ChunkKey { object: s.obj.id.clone(), index: s.index };
        if let Some(i) = placement::owner(&key, &names) {
            plan[i].1.push(s);
        }
    }
    plan.retain(|(_, c)| !c.is_empty());
    plan
}

/// One chunk a survivor was asked to pull: its object here (None: unknown or another version).
pub struct Wanted {
    pub position: u32,
    pub obj: Option<Arc<ObjectVersion>>,
    pub index: u64,
    pub idle: Duration,
}

/// What a survivor was asked: pull `wanted` from `from` into `source`'s memory tier.
pub struct Pulls {
    pub source: Arc<PeerSource>,
    pub from: Arc<PeerHandle>,
    pub wanted: Vec<Wanted>,
}

/// The surviving side: pull the chunks, a few at a time, one outcome each, in order.
pub fn pull_all(pulls: Pulls, metrics: Arc<Metrics>, chunk_size: u64) -> impl Stream<Item = HandoffProgress> + Send {
    let Pulls { source, from, wanted } = pulls;
    futures::stream::iter(wanted)
        .map(move |w| {
            let (source, from, metrics) = (source.clone(), from.clone(), metrics.clone());
            async move {
                let Some(obj) = w.obj else {
                    return HandoffProgress { position: w.position, outcome: HandoffOutcome::HandoffFailed as i32, bytes: 0 };
                };
                let r = chunk_range(w.index, obj.size, chunk_size);
                let outcome = source.take_handoff(&from, &obj, w.index, w.idle).await;
                if outcome == HandoffOutcome::HandoffStored {
                    metrics.add_handoff(Direction::received, r.end - r.start);
                }
                HandoffProgress { position: w.position, outcome: outcome as i32, bytes: r.end - r.start }
            }
        })
        .buffered(PULLS)
}
