//! What a tracker knows: per segment of an object, which members hold or fill which chunks.
//!
//! # Contract
//! - [`Tracker::announce`] records a member's chunks of a segment (all zero: it holds none) and
//!   answers whether the tracker already knows [`ENOUGH_HOLDERS`] others holding the whole
//!   segment: then the announcer need not announce it again until [`HOLDING_TTL`] is near.
//! - [`Tracker::lookup`] answers at most [`ANSWER_HOLDERS`] holdings, never the asker's own,
//!   taking turns among the holders so that readers spread over them, and whether it knows
//!   enough holders already (so that the asker need not announce the segment to it).
//! - Holdings not announced again within [`HOLDING_TTL`] are dropped; a member that left is
//!   dropped at once ([`Tracker::forget`]). At most [`MAX_SEGMENTS`] segments and
//!   [`MAX_HOLDERS`] holders per segment are kept: memory is bounded whatever peers send.
//! - [`Tracker::export`] gives the holdings of the segments a successor is to track.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::NodeId;

/// Holders of one segment a lookup answers.
pub const ANSWER_HOLDERS: usize = 16;
/// Whole-segment holders after which announcing more of them is not needed.
pub const ENOUGH_HOLDERS: usize = 32;
/// How long a holding is kept without being announced again.
pub const HOLDING_TTL: Duration = Duration::from_secs(120);
/// Segments tracked at once (the least recently used beyond it are dropped).
pub const MAX_SEGMENTS: usize = 1 << 16;
/// Holders kept per segment.
pub const MAX_HOLDERS: usize = 256;

/// One member's chunks of one segment (bit `i`: chunk `segment * SEGMENT_CHUNKS + i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holding {
    pub node: NodeId,
    pub present: u64,
    pub filling: u64,
}

/// A tracker's answer to a lookup.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    pub holders: Vec<Holding>,
    /// The tracker knows enough holders of the whole segment: the asker need not announce it.
    pub enough: bool,
}

/// What a member announces of one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    pub object: Arc<str>,
    pub segment: u64,
    pub holding: Holding,
    /// It holds every chunk of the segment.
    pub complete: bool,
}

struct Held {
    present: u64,
    filling: u64,
    complete: bool,
    at: Instant,
}

#[derive(Default)]
struct Entry {
    holders: HashMap<NodeId, Held>,
    turn: usize,
    used: Option<Instant>,
}

impl Entry {
    fn expire(&mut self, now: Instant) {
        self.holders.retain(|_, h| now.duration_since(h.at) <= HOLDING_TTL);
    }
}

/// The tracking state of one agent.
#[derive(Default)]
pub struct Tracker {
    segments: HashMap<(Arc<str>, u64), Entry>,
}

impl Tracker {
    /// Record `a`; true if enough others hold the whole segment already.
    pub fn announce(&mut self, a: Announce, now: Instant) -> bool {
        self.make_room(now);
        let e = self.segments.entry((a.object, a.segment)).or_default();
        e.expire(now);
        e.used = Some(now);
        let h = a.holding;
        let enough = e.holders.iter().filter(|(n, held)| held.complete && **n != h.node).count() >= ENOUGH_HOLDERS;
        if h.present == 0 && h.filling == 0 {
            e.holders.remove(&h.node);
        } else if e.holders.len() < MAX_HOLDERS || e.holders.contains_key(&h.node) {
            e.holders.insert(h.node, Held { present: h.present, filling: h.filling, complete: a.complete, at: now });
        }
        enough
    }

    /// Holdings of `segment` of `object` for `asker` (see the contract).
    pub fn lookup(&mut self, object: &Arc<str>, segment: u64, asker: &str, now: Instant) -> Answer {
        let Some(e) = self.segments.get_mut(&(object.clone(), segment)) else { return Answer::default() };
        e.expire(now);
        e.used = Some(now);
        let mut all: Vec<Holding> = e
            .holders
            .iter()
            .filter(|(n, _)| &***n != asker)
            .map(|(n, h)| Holding { node: n.clone(), present: h.present, filling: h.filling })
            .collect();
        all.sort_unstable_by(|a, b| a.node.cmp(&b.node));
        if all.len() > ANSWER_HOLDERS {
            e.turn = e.turn.wrapping_add(ANSWER_HOLDERS);
            let n = all.len();
            all.rotate_left(e.turn % n);
            all.truncate(ANSWER_HOLDERS);
        }
        let enough = e.holders.iter().filter(|(n, h)| h.complete && &***n != asker).count() >= ENOUGH_HOLDERS;
        Answer { holders: all, enough }
    }

    /// Drop every holding of `node` (it left the membership).
    pub fn forget(&mut self, node: &str) {
        for e in self.segments.values_mut() {
            e.holders.remove(node);
        }
    }

    /// Holdings of the segments `keep(object, segment)` selects, as announcements.
    pub fn export(&self, keep: impl Fn(&str, u64) -> bool) -> Vec<Announce> {
        let mut out = Vec::new();
        for ((object, segment), e) in &self.segments {
            if !keep(object, *segment) {
                continue;
            }
            out.extend(e.holders.iter().map(|(n, h)| Announce {
                object: object.clone(),
                segment: *segment,
                holding: Holding { node: n.clone(), present: h.present, filling: h.filling },
                complete: h.complete,
            }));
        }
        out
    }

    /// Segments tracked now.
    pub fn len(&self) -> usize {
        self.segments.len()
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }

    fn make_room(&mut self, now: Instant) {
        if self.segments.len() < MAX_SEGMENTS {
            return;
        }
        self.segments.retain(|_, e| {
            e.expire(now);
            !e.holders.is_empty()
        });
        while self.segments.len() >= MAX_SEGMENTS {
            let Some(oldest) = self.segments.iter().min_by_key(|(_, e)| e.used).map(|(k, _)| k.clone()) else { break };
            self.segments.remove(&oldest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(node: &str, present: u64, complete: bool) -> Announce {
        Announce { object: Arc::from("obj"), segment: 2, holding: Holding { node: Arc::from(node), present, filling: 0 }, complete }
    }

    #[tokio::test(start_paused = true)]
    async fn holders_are_answered_in_turns_and_expire() {
        let mut t = Tracker::default();
        let obj: Arc<str> = Arc::from("obj");
        let now = Instant::now();
        for i in 0..40 {
            assert_eq!(t.announce(ann(&format!("n{i:02}"), 1, true), now), i >= ENOUGH_HOLDERS);
        }
        assert!(t.announce(ann("late", 1, true), now), "enough holders are known");
        let a = t.lookup(&obj, 2, "n00", now);
        assert!(a.enough);
        let (a, b) = (a.holders, t.lookup(&obj, 2, "n00", now).holders);
        assert_eq!(a.len(), ANSWER_HOLDERS);
        assert_ne!(a, b, "lookups take turns");
        assert!(a.iter().chain(&b).all(|h| &*h.node != "n00"), "never the asker itself");
        assert_eq!(t.lookup(&obj, 3, "x", now), Answer::default());
        // A member that holds nothing any more, or left, is dropped.
        t.announce(ann("n01", 0, false), now);
        t.forget("n02");
        let names: Vec<_> = t.export(|_, _| true).into_iter().map(|a| a.holding.node).collect();
        assert!(!names.iter().any(|n| &**n == "n01" || &**n == "n02"));
        assert_eq!(names.len(), 39);
        tokio::time::advance(HOLDING_TTL + Duration::from_secs(1)).await;
        assert!(t.lookup(&obj, 2, "x", Instant::now()).holders.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn memory_is_bounded() {
        let mut t = Tracker::default();
        let now = Instant::now();
        for i in 0..MAX_HOLDERS + 10 {
            t.announce(ann(&format!("n{i}"), 1, false), now);
        }
        assert_eq!(t.export(|_, _| true).len(), MAX_HOLDERS);
    }
}
