//! What one agent knows of other holders, segment by segment, and what it owes its trackers.
//!
//! # Contract
//! - A segment's view is what its tracker last answered. A reader asks again when there is no
//!   view, when it is older than [`VIEW_TTL`], or when it names no source of the chunk wanted
//!   and is older than [`RELOOKUP`]: at most one lookup per segment at a time.
//! - This agent's own chunks are announced per segment: the first change at once, later ones
//!   coalesced to one announcement per [`ANNOUNCE_EVERY`], a segment just completed at once,
//!   and everything held again before [`HOLDING_TTL`] ends. A tracker that answered "enough"
//!   is not told of that segment again until then.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::tracker::{Announce, Holding, HOLDING_TTL};
use super::{bit_of, chunks_of, segment_of, NodeId};

/// A segment's view is asked again after this long.
pub const VIEW_TTL: Duration = Duration::from_secs(2);
/// A reader that knows no source of a chunk asks again at most this often.
pub const RELOOKUP: Duration = Duration::from_millis(100);
/// Changes to one segment's holding are announced at most this often.
pub const ANNOUNCE_EVERY: Duration = Duration::from_millis(250);
/// Segments viewed at once (beyond, all views are dropped and asked again).
const MAX_VIEWS: usize = 1 << 14;

type SegId = (Arc<str>, u64);

/// Who may serve one chunk, by this agent's view.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Sources {
    /// Holders of the chunk, in the order this agent should try them.
    pub holders: Vec<NodeId>,
    /// Members fetching it from the origin now.
    pub fillers: Vec<NodeId>,
}

#[derive(Default)]
struct SegView {
    holders: Vec<Holding>,
    at: Option<Instant>,
    asking: bool,
}

/// This agent's own holding of a segment.
struct Mine {
    present: u64,
    filling: u64,
    full: u64,
    /// Changed since last announced.
    dirty: bool,
    sent: Option<Instant>,
}

pub struct Views {
    me: NodeId,
    segs: HashMap<SegId, SegView>,
    mine: HashMap<SegId, Mine>,
    /// Trackers that said "enough" of a segment, and until when.
    enough: HashMap<(SegId, NodeId), Instant>,
}

impl Views {
    pub fn new(me: NodeId) -> Self {
        Views { me, segs: HashMap::new(), mine: HashMap::new(), enough: HashMap::new() }
    }

    /// Sources of chunk `index` of `object` by the current view, holders in an order that
    /// spreads this agent's reads of consecutive chunks over them.
    pub fn sources(&self, object: &Arc<str>, index: u64) -> Sources {
        let Some(v) = self.segs.get(&(object.clone(), segment_of(index))) else { return Sources::default() };
        let with = |pick: fn(&Holding) -> u64| -> Vec<NodeId> {
            v.holders.iter().filter(|h| pick(h) & bit_of(index) != 0 && h.node != self.me).map(|h| h.node.clone()).collect()
        };
        let mut holders = with(|h| h.present);
        if !holders.is_empty() {
            let n = holders.len();
            holders.rotate_left((index as usize).wrapping_add(spread(&self.me)) % n);
        }
        Sources { holders, fillers: with(|h| h.filling) }
    }

    /// Whether a reader of chunk `index` should ask the segment's tracker now (and is the one to
    /// ask: the lookup is then marked as in flight).
    pub fn begin_lookup(&mut self, object: &Arc<str>, index: u64, now: Instant) -> bool {
        let known = !self.sources(object, index).holders.is_empty();
        if self.segs.len() > MAX_VIEWS {
            self.segs.clear();
        }
        let v = self.segs.entry((object.clone(), segment_of(index))).or_default();
        let age = v.at.map(|t| now.duration_since(t));
        let due = match age {
            None => true,
            Some(a) => a > VIEW_TTL || (!known && a > RELOOKUP),
        };
        if due && !v.asking {
            v.asking = true;
            return true;
        }
        false
    }

    /// Whether a lookup of chunk `index`'s segment is in flight.
    pub fn asking(&self, object: &Arc<str>, index: u64) -> bool {
        self.segs.get(&(object.clone(), segment_of(index))).is_some_and(|v| v.asking)
    }

    /// A lookup ended: `answer` is what the trackers said (None: none answered).
    pub fn end_lookup(&mut self, object: &Arc<str>, segment: u64, answer: Option<Vec<Holding>>, now: Instant) {
        let v = self.segs.entry((object.clone(), segment)).or_default();
        v.asking = false;
        v.at = Some(now);
        if let Some(h) = answer {
            v.holders = h;
        }
    }

    /// `node` could not serve from `segment`: it is no source of it until the next lookup.
    pub fn not_a_source(&mut self, object: &Arc<str>, segment: u64, node: &str) {
        if let Some(v) = self.segs.get_mut(&(object.clone(), segment)) {
            v.holders.retain(|h| &*h.node != node);
        }
    }

    /// `node` left: it is no source of anything.
    pub fn forget(&mut self, node: &str) {
        for v in self.segs.values_mut() {
            v.holders.retain(|h| &*h.node != node);
        }
    }

    /// This agent now holds (or no longer holds) chunk `index` of an object of `chunks` chunks.
    pub fn set_present(&mut self, object: &Arc<str>, index: u64, chunks: u64, on: bool) {
        self.change(object, index, chunks, |m| set(&mut m.present, bit_of(index), on));
    }

    /// This agent fetches (or stopped fetching) chunk `index` from the origin.
    pub fn set_filling(&mut self, object: &Arc<str>, index: u64, chunks: u64, on: bool) {
        self.change(object, index, chunks, |m| set(&mut m.filling, bit_of(index), on));
    }

    fn change(&mut self, object: &Arc<str>, index: u64, chunks: u64, f: impl FnOnce(&mut Mine)) {
        let seg = segment_of(index);
        let full = chunks_of(seg, chunks).fold(0, |m, i| m | bit_of(i));
        let m = self.mine.entry((object.clone(), seg)).or_insert(Mine { present: 0, filling: 0, full, dirty: false, sent: None });
        let before = (m.present, m.filling);
        f(m);
        m.dirty |= before != (m.present, m.filling);
    }

    /// Announcements due now (see the contract), marked as sent.
    pub fn due(&mut self, now: Instant) -> Vec<Announce> {
        let mut out = Vec::new();
        self.mine.retain(|(object, segment), m| {
            let complete = m.present == m.full;
            let since = m.sent.map(|t| now.duration_since(t));
            let due = match since {
                None => m.dirty,
                Some(s) => (m.dirty && (complete || s >= ANNOUNCE_EVERY)) || s >= HOLDING_TTL / 2,
            };
            if due {
                m.dirty = false;
                m.sent = Some(now);
                let holding = Holding { node: self.me.clone(), present: m.present, filling: m.filling };
                out.push(Announce { object: object.clone(), segment: *segment, holding, complete });
            }
            // Nothing held or filled, and trackers told so: forget the segment.
            m.present != 0 || m.filling != 0 || m.dirty
        });
        out
    }

    /// Whether `tracker` is to be told `a` (it did not say "enough" of that segment lately).
    pub fn tell(&self, tracker: &NodeId, a: &Announce, now: Instant) -> bool {
        let gone = a.holding.present == 0 && a.holding.filling == 0;
        gone || self.enough.get(&((a.object.clone(), a.segment), tracker.clone())).is_none_or(|until| now >= *until)
    }

    /// `tracker` knows enough holders of `segment`: spare it announcements for a while.
    pub fn enough(&mut self, object: &Arc<str>, segment: u64, tracker: &NodeId, now: Instant) {
        if self.enough.len() > MAX_VIEWS {
            self.enough.retain(|_, until| *until > now);
        }
        self.enough.insert(((object.clone(), segment), tracker.clone()), now + HOLDING_TTL / 2);
    }
}

fn set(bits: &mut u64, bit: u64, on: bool) {
    if on {
        *bits |= bit
    } else {
        *bits &= !bit
    }
}

/// A per-agent offset, so that agents reading the same chunk start at different holders.
fn spread(me: &str) -> usize {
    me.bytes().fold(0usize, |h, b| h.wrapping_mul(31).wrapping_add(b as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj() -> Arc<str> {
        Arc::from("obj")
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_are_single_flight_and_asked_again_when_no_source_is_known() {
        let mut v = Views::new(Arc::from("me"));
        let t0 = Instant::now();
        assert!(v.begin_lookup(&obj(), 5, t0));
        assert!(!v.begin_lookup(&obj(), 6, t0), "one lookup per segment at a time");
        let h = Holding { node: Arc::from("a"), present: bit_of(5), filling: bit_of(6) };
        v.end_lookup(&obj(), 0, Some(vec![h]), t0);
        assert_eq!(v.sources(&obj(), 5).holders, vec![NodeId::from("a")]);
        assert_eq!(v.sources(&obj(), 6).fillers, vec![NodeId::from("a")]);
        tokio::time::advance(RELOOKUP * 2).await;
        let now = Instant::now();
        assert!(!v.begin_lookup(&obj(), 5, now), "a known source: the view is fresh enough");
        assert!(v.begin_lookup(&obj(), 6, now), "no holder of 6 known");
        v.end_lookup(&obj(), 0, None, now);
        assert_eq!(v.sources(&obj(), 5).holders.len(), 1, "a failed lookup keeps what was known");
        v.not_a_source(&obj(), 0, "a");
        assert!(v.sources(&obj(), 5).holders.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn announcements_are_coalesced() {
        let mut v = Views::new(Arc::from("me"));
        let chunks = SEGMENT_CHUNKS_FOR_TEST;
        v.set_present(&obj(), 0, chunks, true);
        let first = v.due(Instant::now());
        assert_eq!(first.len(), 1, "the first change at once");
        v.set_present(&obj(), 1, chunks, true);
        v.set_present(&obj(), 2, chunks, true);
        assert!(v.due(Instant::now()).is_empty(), "later ones wait");
        tokio::time::advance(ANNOUNCE_EVERY).await;
        let next = v.due(Instant::now());
        assert_eq!(next[0].holding.present, 0b111);
        v.set_present(&obj(), 3, chunks, true);
        let done = v.due(Instant::now());
        assert!(done[0].complete, "a completed segment at once");
        let tracker: NodeId = Arc::from("t");
        v.enough(&obj(), 0, &tracker, Instant::now());
        assert!(!v.tell(&tracker, &done[0], Instant::now()) && v.tell(&NodeId::from("u"), &done[0], Instant::now()));
        tokio::time::advance(HOLDING_TTL / 2).await;
        assert_eq!(v.due(Instant::now()).len(), 1, "held chunks are announced again before the TTL");
    }

    const SEGMENT_CHUNKS_FOR_TEST: u64 = 4;
}
