//! Holder discovery as one agent runs it, over any [`Transport`]: the agent's is gRPC, the
//! scale simulation's an emulated network.
//!
//! # Contract
//! - [`Discovery::sources`] answers who may serve a chunk: from the view if it is fresh, else
//!   after one lookup of the segment at its trackers (first tracker first, the next on error;
//!   this agent's own tracking state if it is one). Readers of a segment being looked up wait
//!   for that lookup, not for a new one.
//! - [`Discovery::announce`] sends what is due (see `view`) to each segment's trackers, one
//!   message per tracker, all trackers at once.
//! - The server side ([`Discovery::on_lookup`], [`Discovery::on_announce`]) answers from this
//!   agent's tracking state; nothing a peer sends can grow it beyond its bounds.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use futures::future::BoxFuture;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::tracker::{Announce, Answer, Holding, Tracker};
use super::view::{Sources, Views};
use super::{segment_of, trackers, NodeId, Ring};

/// How the discovery messages reach other members. Each call has its own timeout.
pub trait Transport: Send + Sync {
    /// Ask `to` what it tracks of `segment` of `object`.
    fn lookup<'a>(&'a self, to: &'a NodeId, object: &'a Arc<str>, segment: u64) -> BoxFuture<'a, Result<Answer, String>>;
    /// Tell `to` of `batch`; answers, per announcement, whether `to` knows enough holders.
    fn announce<'a>(&'a self, to: &'a NodeId, batch: Vec<Announce>) -> BoxFuture<'a, Result<Vec<bool>, String>>;
}

/// One agent's discovery state: its views of others, its own announcements, its tracking.
pub struct Discovery {
    me: NodeId,
    views: Mutex<Views>,
    tracker: Mutex<Tracker>,
    looked_up: Notify,
}

impl Discovery {
    pub fn new(me: NodeId) -> Self {
        Discovery { views: Mutex::new(Views::new(me.clone())), me, tracker: Mutex::default(), looked_up: Notify::new() }
    }

    pub fn me(&self) -> &NodeId {
        &self.me
    }

    fn views(&self) -> MutexGuard<'_, Views> {
        self.views.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn tracker(&self) -> MutexGuard<'_, Tracker> {
        self.tracker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Who may serve chunk `index` of `object`; `members` are the live members (self included).
    pub async fn sources<T: Transport>(&self, t: &T, members: &Ring, object: &Arc<str>, index: u64) -> Sources {
        loop {
            let notified = self.looked_up.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let start = self.views().begin_lookup(object, index, Instant::now());
            if start {
                let answer = self.lookup(t, members, object, segment_of(index)).await;
                self.views().end_lookup(object, segment_of(index), answer, Instant::now());
                self.looked_up.notify_waiters();
            } else if self.views().asking(object, index) {
                notified.await;
                continue;
            }
            return self.views().sources(object, index);
        }
    }

    /// Who the trackers of `segment` know to hold or fill it (no view kept); None if no
    /// tracker answered.
    pub async fn holders_of<T: Transport>(&self, t: &T, members: &Ring, object: &Arc<str>, segment: u64) -> Option<Vec<Holding>> {
        self.lookup(t, members, object, segment).await
    }

    /// Ask the trackers of `segment` in turn, starting at one of this agent's own (so that
    /// lookups spread over them); None if none could answer.
    async fn lookup<T: Transport>(&self, t: &T, members: &Ring, object: &Arc<str>, segment: u64) -> Option<Vec<Holding>> {
        let mut order = trackers(object, segment, members);
        if let Some(mine) = order.iter().position(|n| *n == self.me) {
            order.rotate_left(mine);
        } else if !order.is_empty() {
            let n = order.len();
            order.rotate_left((crate::peer::placement::node_hash(&self.me) % n as u64) as usize);
        }
        for to in &order {
            let answer = if *to == self.me { Ok(self.on_lookup(object, segment, &self.me)) } else { t.lookup(to, object, segment).await };
            match answer {
                Ok(a) => {
                    if a.enough {
                        self.views().enough(object, segment, to, Instant::now());
                    }
                    return Some(a.holders);
                }
                Err(e) => tracing::debug!(tracker = %to, error = %e, "lookup failed; asking the next tracker"),
            }
        }
        None
    }

    /// Send the announcements due now to their trackers.
    pub async fn announce<T: Transport>(&self, t: &T, members: &Ring) {
        let now = Instant::now();
        let due = self.views().due(now);
        if due.is_empty() {
            return;
        }
        let mut per: HashMap<NodeId, Vec<Announce>> = HashMap::new();
        {
            let views = self.views();
            for a in due {
                for to in trackers(&a.object, a.segment, members) {
                    if views.tell(&to, &a, now) {
                        per.entry(to.clone()).or_default().push(a.clone());
                    }
                }
            }
        }
        if let Some(own) = per.remove(&self.me) {
            self.on_announce(own);
        }
        let sends = per.into_iter().map(|(to, batch)| async move {
            let keys: Vec<(Arc<str>, u64)> = batch.iter().map(|a| (a.object.clone(), a.segment)).collect();
            if let Ok(enough) = t.announce(&to, batch).await {
                let mut views = self.views();
                for ((object, segment), e) in keys.iter().zip(enough) {
                    if e {
                        views.enough(object, *segment, &to, Instant::now());
                    }
                }
            }
        });
        futures::future::join_all(sends).await;
    }

    /// A member asks what this agent tracks of `segment` of `object`.
    pub fn on_lookup(&self, object: &Arc<str>, segment: u64, asker: &str) -> Answer {
        self.tracker().lookup(object, segment, asker, Instant::now())
    }

    /// A member announces `batch`.
    pub fn on_announce(&self, batch: Vec<Announce>) -> Vec<bool> {
        let now = Instant::now();
        let mut t = self.tracker();
        batch.into_iter().map(|a| t.announce(a, now)).collect()
    }

    /// This agent holds, or no longer holds, chunk `index` of `object` (`chunks` chunks).
    pub fn set_present(&self, object: &Arc<str>, index: u64, chunks: u64, on: bool) {
        self.views().set_present(object, index, chunks, on);
    }

    /// This agent fetches, or stopped fetching, chunk `index` from the origin.
    pub fn set_filling(&self, object: &Arc<str>, index: u64, chunks: u64, on: bool) {
        self.views().set_filling(object, index, chunks, on);
    }

    /// `node` could not serve chunk `index`: not a source of its segment until the next lookup.
    pub fn not_a_source(&self, object: &Arc<str>, index: u64, node: &str) {
        self.views().not_a_source(object, segment_of(index), node);
    }

    /// `node` left the membership.
    pub fn forget(&self, node: &str) {
        self.views().forget(node);
        self.tracker().forget(node);
    }

    /// This agent's tracking state, by the members that track each segment among `members`
    /// (this agent no longer one of them): what a draining tracker hands to its successors.
    pub fn handover(&self, members: &Ring) -> HashMap<NodeId, Vec<Announce>> {
        let mut per: HashMap<NodeId, Vec<Announce>> = HashMap::new();
        let mut successors: HashMap<(Arc<str>, u64), Vec<NodeId>> = HashMap::new();
        for a in self.tracker().export(|_, _| true) {
            let to = successors.entry((a.object.clone(), a.segment)).or_insert_with(|| trackers(&a.object, a.segment, members));
            for t in to.iter() {
                per.entry(t.clone()).or_default().push(a.clone());
            }
        }
        per
    }
}
