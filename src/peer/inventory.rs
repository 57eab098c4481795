//! What this agent knows of the chunks its peers hold or are filling, per object.
//!
//! # Contract
//! [`Inventories::holders`] answers from what is known, at once. Answers older than
//! [`INVENTORY_TTL`] are refreshed by one tracked background task per object (never two at once),
//! so a slow or stuck peer delays no reader. Only a reader that knows nothing of some live peer
//! (never asked since it came up, or asked and not answered yet) waits for the refresh, at most twice the inventory timeout:
//! unknown is not absent. A peer that does not answer keeps its last answer and is asked again
//! after the TTL; `forget` makes the next reader refresh (a holder said NOT_FOUND).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::membership::PeerHandle;
use super::proto::InventoryRequest;
use super::{bit, object_ref};
use crate::catalog::ObjectVersion;
use crate::metrics::{ControlKind, Direction, Metrics};

/// How long a peer's inventory of one object is trusted.
pub const INVENTORY_TTL: Duration = Duration::from_secs(1);

/// Objects whose inventories are kept; beyond it all are dropped (they are refreshed lazily).
const MAX_OBJECTS: usize = 4096;

/// Holders and fillers of one chunk, each sorted by node id.
pub type Holders = (Vec<Arc<PeerHandle>>, Vec<Arc<PeerHandle>>);

/// One peer's answer about one object.
struct Answer {
    present: Bytes,
    filling: Bytes,
}

#[derive(Default)]
struct Inventory {
    /// A refresh of this object is in flight.
    refreshing: bool,
    /// Last time every usable peer was asked.
    at: Option<Instant>,
    /// node id → its last answer.
    answers: HashMap<String, Answer>,
    /// node id → when it last failed to answer.
    failed: HashMap<String, Instant>,
}

impl Inventory {
    fn failed_lately(&self, id: &str) -> bool {
        self.failed.get(id).is_some_and(|t| t.elapsed() <= INVENTORY_TTL)
    }

    /// Peers to ask now: all if the answers are older than the TTL, else those never asked.
    fn to_ask(&self, usable: &[Arc<PeerHandle>]) -> Vec<Arc<PeerHandle>> {
        let stale = self.at.is_none_or(|t| t.elapsed() > INVENTORY_TTL);
        let fresh = |id: &str| self.answers.contains_key(id) || self.failed_lately(id);
        usable.iter().filter(|p| p.node_id().is_some_and(|id| stale || !fresh(&id))).cloned().collect()
    }

    /// Whether nothing is known of some of `ask`: never asked, or asked and not answered yet.
    /// (One that did not answer is known not to: readers wait for it no more.)
    fn unknown(&self, ask: &[Arc<PeerHandle>]) -> bool {
        ask.iter().any(|p| p.node_id().is_some_and(|id| !self.answers.contains_key(&id) && !self.failed.contains_key(&id)))
    }

    /// Merge answers (None: the peer did not answer, and keeps what we knew of it; a holder
    /// that lost a chunk answers NOT_FOUND, which is cheap); one that answered replaces it.
    fn merge(&mut self, got: Vec<(String, Option<Answer>)>, everyone: bool) {
        for (id, answer) in got {
            match answer {
                Some(a) => {
                    self.failed.remove(&id);
                    self.answers.insert(id, a);
                }
                None => {
                    self.failed.insert(id, Instant::now());
                }
            }
        }
        if everyone {
            self.at = Some(Instant::now());
        }
    }

    fn of_chunk(&self, usable: &[Arc<PeerHandle>], index: u64) -> Holders {
        (self.with_bit(usable, index, |a| &a.present), self.with_bit(usable, index, |a| &a.filling))
    }

    /// Usable peers whose answer has bit `index` set in `pick(answer)`, sorted by node id.
    fn with_bit(&self, usable: &[Arc<PeerHandle>], index: u64, pick: impl Fn(&Answer) -> &Bytes) -> Vec<Arc<PeerHandle>> {
        let mut out: Vec<_> = usable
            .iter()
            .filter(|p| p.node_id().and_then(|n| self.answers.get(&n)).is_some_and(|a| bit(pick(a), index)))
            .cloned()
            .collect();
        out.sort_by_key(|p| p.node_id());
        out
    }
}

/// One object's inventory, and a signal bumped each time a refresh of it ends.
#[derive(Default)]
struct Cell {
    inv: Mutex<Inventory>,
    refreshed: watch::Sender<u64>,
}

impl Cell {
    fn inv(&self) -> MutexGuard<'_, Inventory> {
        self.inv.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Ends a refresh when dropped, whether it finished or was cancelled.
struct Refreshing(Arc<Cell>);

impl Drop for Refreshing {
    fn drop(&mut self) {
        self.0.inv().refreshing = false;
        self.0.refreshed.send_modify(|n| *n += 1);
    }
}

/// How peers are asked for an inventory.
#[derive(Clone)]
struct Asker {
    chunk_size: u64,
    timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Asker {
    /// Ask `peers` what they hold of `obj`: (node id, answer or None if it did not answer).
    async fn ask(&self, obj: &ObjectVersion, peers: &[Arc<PeerHandle>]) -> Vec<(String, Option<Answer>)> {
        let asks = peers.iter().map(|p| async move {
            let id = p.node_id()?;
            let mut req =
                tonic::Request::new(InventoryRequest { objects: vec![object_ref(obj)], chunk_size: self.chunk_size, with_digests: false });
            req.set_timeout(self.timeout);
            self.metrics.add_control(ControlKind::inventory, Direction::sent);
            let answer = match tokio::time::timeout(self.timeout * 2, p.client().inventory(req)).await {
                Ok(Ok(resp)) => {
                    // Not listed: the peer has another version (or none): it holds nothing of ours.
                    let o = resp.into_inner().objects.into_iter().find(|o| o.key == obj.key);
                    Some(o.map_or(Answer { present: Bytes::new(), filling: Bytes::new() }, |o| Answer {
                        present: o.present,
                        filling: o.filling,
                    }))
                }
                // Not a reason to back the peer off: data requests decide that.
                Ok(Err(status)) => {
                    debug!(peer = %p.addr, error = %status.message(), "inventory request failed");
                    None
                }
                Err(_) => {
                    debug!(peer = %p.addr, "inventory request timed out");
                    None
                }
            };
            Some((id, answer))
        });
        futures::future::join_all(asks).await.into_iter().flatten().collect()
    }
}

/// The inventories of every object read through peers lately.
pub struct Inventories {
    cells: Mutex<HashMap<Arc<str>, Arc<Cell>>>,
    asker: Asker,
    tasks: TaskTracker,
}

impl Inventories {
    /// Inventories asked for in `chunk_size` chunks, each peer within `timeout`; refreshes run
    /// on `tasks`.
    pub fn new(chunk_size: u64, timeout: Duration, metrics: Arc<Metrics>, tasks: TaskTracker) -> Self {
        Inventories { cells: Mutex::new(HashMap::new()), asker: Asker { chunk_size, timeout, metrics }, tasks }
    }

    fn cell(&self, obj: &ObjectVersion) -> Arc<Cell> {
        let mut map = self.cells.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() > MAX_OBJECTS {
            map.clear();
        }
        map.entry(obj.id.clone()).or_default().clone()
    }

    /// Holders and fillers of chunk `index` of `obj` among `usable` (see the contract).
    pub async fn holders(&self, obj: &Arc<ObjectVersion>, usable: &[Arc<PeerHandle>], index: u64) -> Holders {
        let cell = self.cell(obj);
        let mut rx = {
            let mut inv = cell.inv();
            let ask = inv.to_ask(usable);
            if ask.is_empty() {
                return inv.of_chunk(usable, index);
            }
            if !inv.refreshing {
                inv.refreshing = true;
                self.refresh(obj.clone(), cell.clone(), ask.clone(), ask.len() == usable.len());
            }
            if !inv.unknown(&ask) {
                return inv.of_chunk(usable, index);
            }
            cell.refreshed.subscribe()
        };
        let _ = tokio::time::timeout(self.asker.timeout * 2, rx.changed()).await;
        let known = cell.inv().of_chunk(usable, index);
        known
    }

    /// Ask `ask` in the background and merge their answers into `cell`.
    fn refresh(&self, obj: Arc<ObjectVersion>, cell: Arc<Cell>, ask: Vec<Arc<PeerHandle>>, everyone: bool) {
        let asker = self.asker.clone();
        self.tasks.spawn(async move {
            let refreshing = Refreshing(cell);
            let got = asker.ask(&obj, &ask).await;
            refreshing.0.inv().merge(got, everyone);
        });
    }

    /// Make the next reader of `obj` ask again (a holder said NOT_FOUND).
    pub fn forget(&self, obj: &ObjectVersion) {
        if let Some(cell) = self.cells.lock().unwrap_or_else(|p| p.into_inner()).get(&obj.id) {
            cell.inv().at = None;
        }
    }
}
