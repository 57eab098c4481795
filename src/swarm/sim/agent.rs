//! One simulated agent: the real discovery and gossip state machines, chunk descriptions
//! instead of bytes, and its own links.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::{BoxFuture, FutureExt, Shared};
use futures::StreamExt;
use tokio::time::Instant;

use super::net::{transfer, Counters, Link};
use super::{Defect, Sim};
use crate::cache::ChunkKey;
use crate::swarm::gossip::{Change, Effects, Gossip, Member};
use crate::swarm::tracker::{Announce, Answer};
use crate::swarm::{load_order, plan, Discovery, NodeId, Ring, Sources, Step, Transport};

const SERVING: u8 = 0;
const DRAINING: u8 = 1;
const GONE: u8 = 2;

type Fill = Shared<BoxFuture<'static, ()>>;

pub struct SimAgent {
    pub index: usize,
    pub id: NodeId,
    pub member: Member,
    pub discovery: Discovery,
    gossip: Mutex<Gossip>,
    /// Live, non-draining members by this agent's view (itself included while serving).
    members: Mutex<Arc<Ring>>,
    held: Mutex<Vec<bool>>,
    fills: Mutex<HashMap<u64, Fill>>,
    pub up: Link,
    pub down: Link,
    pub counters: Counters,
    state: AtomicU8,
    pub done_at: Mutex<Option<Instant>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimAgent {
    pub fn new(index: usize, member: Member, size: usize, chunks: u64, link_bytes_per_s: f64) -> Self {
        let id: NodeId = Arc::from(member.id.as_str());
        SimAgent {
            index,
            discovery: Discovery::new(id.clone()),
            gossip: Mutex::new(Gossip::new(member.clone(), size, index as u64 + 1)),
            id,
            member,
            members: Mutex::new(Arc::new(Ring::default())),
            held: Mutex::new(vec![false; chunks as usize]),
            fills: Mutex::new(HashMap::new()),
            up: Link::new(link_bytes_per_s),
            down: Link::new(link_bytes_per_s),
            counters: Counters::default(),
            state: AtomicU8::new(SERVING),
            done_at: Mutex::new(None),
        }
    }

    pub fn members(&self) -> Arc<Ring> {
        lock(&self.members).clone()
    }

    pub fn gone(&self) -> bool {
        self.state.load(Ordering::SeqCst) == GONE
    }

    fn draining(&self) -> bool {
        self.state.load(Ordering::SeqCst) != SERVING
    }

    pub fn held(&self, i: u64) -> bool {
        lock(&self.held).get(i as usize).copied().unwrap_or(false)
    }

    pub fn holds_all(&self) -> bool {
        lock(&self.held).iter().all(|h| *h)
    }

    /// Store chunk `i` (from a peer or the origin) and tell discovery.
    fn store(&self, sim: &Sim, i: u64) {
        let all = {
            let mut held = lock(&self.held);
            if let Some(h) = held.get_mut(i as usize) {
                *h = true;
            }
            held.iter().all(|h| *h)
        };
        self.discovery.set_present(&sim.object, i, sim.chunks, true);
        if all {
            lock(&self.done_at).get_or_insert(Instant::now());
        }
    }

    /// Join or start this agent's fetch of chunk `i` from the origin (single-flight).
    async fn fill(self: &Arc<Self>, sim: &Arc<Sim>, i: u64) {
        if self.held(i) {
            return;
        }
        let f = {
            let mut fills = lock(&self.fills);
            let (me, sim2) = (self.clone(), sim.clone());
            fills
                .entry(i)
                .or_insert_with(|| {
                    async move {
                        me.discovery.set_filling(&sim2.object, i, sim2.chunks, true);
                        sim2.origin.get(&me.down, sim2.chunk_bytes(i)).await;
                        me.store(&sim2, i);
                        me.discovery.set_filling(&sim2.object, i, sim2.chunks, false);
                        lock(&me.fills).remove(&i);
                    }
                    .boxed()
                    .shared()
                })
                .clone()
        };
        f.await
    }

    /// Ask `from` for chunk `i` (`fill`: it may fetch it from the origin first); true once stored.
    async fn fetch_from(self: &Arc<Self>, sim: &Arc<Sim>, from: &NodeId, i: u64, fill: bool) -> bool {
        let Some(peer) = sim.agent(from) else { return false };
        let latency = sim.profile.latency;
        tokio::time::sleep(latency).await;
        if peer.gone() {
            tokio::time::sleep(latency).await;
            return false;
        }
        if !peer.held(i) && fill && !peer.draining() {
            peer.fill(sim, i).await;
        }
        if !peer.held(i) {
            // A refusal carries no data: it counts as a control message both ways.
            peer.counters.received.fetch_add(1, Ordering::Relaxed);
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(latency).await;
            return false;
        }
        transfer(&peer.up, &self.down, sim.chunk_bytes(i), latency).await;
        self.store(sim, i);
        true
    }

    /// Get chunk `i` from wherever the plan says.
    async fn fetch(self: &Arc<Self>, sim: &Arc<Sim>, i: u64) {
        let via = Via { sim, from: self.clone() };
        for _ in 0..3 {
            if self.held(i) {
                return;
            }
            let members = self.members();
            let sources = match sim.profile.defect {
                Defect::IgnoreTrackers => Sources::default(),
                Defect::None => self.discovery.sources(&via, &members, &sim.object, i).await,
            };
            let key = ChunkKey { object: sim.object.clone(), index: i };
            for step in plan(sources, &members.top(&key, 2), &self.id) {
                let c = &self.counters;
                let ok = match &step {
                    Step::Holder(h) => {
                        let ok = self.fetch_from(sim, h, i, false).await;
                        if !ok {
                            self.discovery.not_a_source(&sim.object, i, h);
                        }
                        count(&c.from_holders, ok)
                    }
                    Step::Filler(p) | Step::Owner(p) => count(&c.from_owners, self.fetch_from(sim, p, i, true).await),
                    Step::Origin => {
                        self.fill(sim, i).await;
                        count(&c.from_origin, true)
                    }
                };
                if !ok {
                    c.refused.fetch_add(1, Ordering::Relaxed);
                }
                if ok || self.held(i) {
                    return;
                }
            }
        }
    }

    /// Load the whole model in the swarm's load order: the chunks it owns (from the origin) and
    /// the others (mostly from peers) side by side, `window` chunks at a time each, so the
    /// origin's latency does not keep its link idle.
    pub async fn load(self: Arc<Self>, sim: Arc<Sim>) {
        let members = self.members();
        let owned = |i: u64| {
            let key = ChunkKey { object: sim.object.clone(), index: i };
            members.owner(&key).is_some_and(|o| *o == self.id)
        };
        let mut order = load_order(&self.id, sim.chunks, owned);
        let rest = order.split_off(order.iter().position(|&i| !owned(i)).unwrap_or(order.len()));
        let run = |chunks: Vec<u64>| {
            let (me, sim) = (self.clone(), sim.clone());
            futures::stream::iter(chunks).for_each_concurrent(sim.profile.window, move |i| {
                let (me, sim) = (me.clone(), sim.clone());
                async move {
                    if !me.draining() {
                        me.fetch(&sim, i).await
                    }
                }
            })
        };
        futures::future::join(run(order), run(rest)).await;
    }

    /// Send what discovery has due, every tick, until gone.
    pub async fn announcer(self: Arc<Self>, sim: Arc<Sim>) {
        let via = Via { sim: &sim, from: self.clone() };
        while !self.gone() {
            tokio::time::sleep(sim.profile.announce_tick).await;
            let members = self.members();
            self.discovery.announce(&via, &members).await;
        }
    }

    /// Seed the membership with every configured peer.
    pub fn join(self: &Arc<Self>, sim: &Arc<Sim>, seeds: &[Member]) {
        let e = lock(&self.gossip).join(seeds, false);
        *lock(&self.members) = Arc::new(Ring::new(seeds.iter().map(|s| NodeId::from(s.id.as_str())).collect()));
        self.apply(sim, e);
    }

    /// Carry out what the membership state machine asked for.
    fn apply(self: &Arc<Self>, sim: &Arc<Sim>, e: Effects) {
        for (to, data) in e.send {
            self.counters.sent.fetch_add(1, Ordering::Relaxed);
            let (sim2, latency) = (sim.clone(), sim.profile.latency);
            sim.tasks.spawn(async move {
                tokio::time::sleep(latency).await;
                let Some(peer) = sim2.agent_at(&to) else { return };
                if peer.gone() {
                    return;
                }
                peer.counters.received.fetch_add(1, Ordering::Relaxed);
                let got = lock(&peer.gossip).handle(&data);
                if let Ok(e) = got {
                    peer.apply(&sim2, e);
                }
            });
        }
        for (after, timer) in e.timers {
            let (me, sim2) = (self.clone(), sim.clone());
            sim.tasks.spawn(async move {
                tokio::time::sleep(after).await;
                if !me.gone() {
                    let e = lock(&me.gossip).timer(timer);
                    me.apply(&sim2, e);
                }
            });
        }
        for c in e.changes {
            self.change(c);
        }
    }

    fn change(&self, c: Change) {
        let mut m = lock(&self.members);
        match c {
            Change::Up(p) if !m.contains(&p.id) && (p.id != *self.id || !self.draining()) => {
                let mut nodes = m.nodes().to_vec();
                nodes.push(NodeId::from(p.id.as_str()));
                *m = Arc::new(Ring::new(nodes));
            }
            Change::Down(p) if m.contains(&p.id) => {
                *m = Arc::new(m.without(&p.id));
                drop(m);
                self.discovery.forget(&p.id);
            }
            _ => {}
        }
    }

    /// Preemption: leave the membership, hand tracking state and owned chunks to successors
    /// within `deadline`, then go.
    pub async fn drain(self: Arc<Self>, sim: Arc<Sim>) {
        self.state.store(DRAINING, Ordering::SeqCst);
        let before = self.members();
        let after = Arc::new(before.without(&self.id));
        *lock(&self.members) = after.clone();
        let e = lock(&self.gossip).leave();
        self.apply(&sim, e);
        let deadline = Instant::now() + sim.profile.drain;
        let _ = tokio::time::timeout_at(deadline, self.hand_off(&sim, &before, &after)).await;
        tokio::time::sleep_until(deadline).await;
        self.state.store(GONE, Ordering::SeqCst);
    }

    /// Tracking state to the new trackers, then chunks this agent owned to their new owners.
    async fn hand_off(self: &Arc<Self>, sim: &Arc<Sim>, before: &Ring, after: &Ring) {
        let via = Via { sim, from: self.clone() };
        let via = &via;
        let handed = self.discovery.handover(after).into_iter().map(|(to, batch)| async move {
            let _ = via.announce(&to, batch).await;
        });
        futures::future::join_all(handed).await;
        let sole: Vec<(u64, NodeId)> = (0..sim.chunks)
            .filter(|&i| self.held(i))
            .filter_map(|i| {
                let key = ChunkKey { object: sim.object.clone(), index: i };
                let was = before.owner(&key)?;
                let now = after.owner(&key)?;
                (*was == self.id).then(|| (i, now.clone()))
            })
            .collect();
        futures::stream::iter(sole)
            .for_each_concurrent(sim.profile.window, |(i, to)| async move {
                let Some(peer) = sim.agent(&to) else { return };
                if peer.held(i) || peer.gone() {
                    return;
                }
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
                peer.counters.received.fetch_add(1, Ordering::Relaxed);
                transfer(&self.up, &peer.down, sim.chunk_bytes(i), sim.profile.latency).await;
                peer.store(sim, i);
            })
            .await;
    }
}

fn count(c: &std::sync::atomic::AtomicU64, ok: bool) -> bool {
    if ok {
        c.fetch_add(1, Ordering::Relaxed);
    }
    ok
}

/// Discovery messages from one simulated agent.
struct Via<'a> {
    sim: &'a Arc<Sim>,
    from: Arc<SimAgent>,
}

impl Via<'_> {
    /// A control message to `to` and its answer; Err if `to` is gone.
    async fn call<R>(&self, to: &NodeId, answer: impl FnOnce(&SimAgent) -> R) -> Result<R, String> {
        let latency = self.sim.profile.latency;
        self.from.counters.sent.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(latency).await;
        let peer = self.sim.agent(to).filter(|p| !p.gone()).ok_or_else(|| format!("{to} is gone"))?;
        peer.counters.received.fetch_add(1, Ordering::Relaxed);
        let r = answer(peer);
        tokio::time::sleep(latency).await;
        Ok(r)
    }
}

impl Transport for Via<'_> {
    fn lookup<'a>(&'a self, to: &'a NodeId, object: &'a Arc<str>, segment: u64) -> BoxFuture<'a, Result<Answer, String>> {
        let asker = self.from.id.clone();
        self.call(to, move |p| p.discovery.on_lookup(object, segment, &asker)).boxed()
    }

    fn announce<'a>(&'a self, to: &'a NodeId, batch: Vec<Announce>) -> BoxFuture<'a, Result<Vec<bool>, String>> {
        self.call(to, move |p| p.discovery.on_announce(batch)).boxed()
    }
}
