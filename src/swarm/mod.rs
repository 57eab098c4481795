//! Fleet-scale coordination that does not depend on the transport: who tracks which chunks,
//! what a reader knows of their holders, the order a whole-model load takes, and membership by
//! gossip. The agent drives these over gRPC; the scale simulation (`sim`) drives the same code
//! over an emulated network, so its figures are those of the agent's logic.
//!
//! # Contract
//! - Chunks are tracked in **segments** of [`SEGMENT_CHUNKS`] consecutive chunks. A segment's
//!   trackers are its top [`TRACKERS`] rendezvous owners among the live members: every agent
//!   that sees the same members asks the same few agents, whatever the fleet's size.
//! - Holders announce what they hold of a segment to its trackers (coalesced, see `view`); a
//!   reader asks one tracker per segment and at most once per [`view::RELOOKUP`] while it lacks
//!   a source: control traffic per agent depends on the segments it reads, not on N.
//! - A tracker that is wrong or gone costs a retry or a fill by the chunk's owner, never a wrong
//!   byte: what a tracker says is a hint, the chunk's checksum decides.

pub mod discovery;
pub mod gossip;
pub mod sim;
pub mod tracker;
pub mod view;

pub use discovery::{Discovery, Transport};
pub use view::Sources;

use std::ops::Range;
use std::sync::Arc;

use crate::cache::ChunkKey;
use crate::peer::placement;
pub use crate::peer::placement::Ring;

/// Chunks tracked together (at most 64: a segment's chunks fit one `u64` bitmap).
pub const SEGMENT_CHUNKS: u64 = 32;

/// Trackers of one segment.
pub const TRACKERS: usize = 3;

const _: () = assert!(SEGMENT_CHUNKS <= 64);

/// A node's id as members know it.
pub type NodeId = Arc<str>;

/// Segment of chunk `index`.
pub fn segment_of(index: u64) -> u64 {
    index / SEGMENT_CHUNKS
}

/// Chunks of `segment` of an object of `chunks` chunks.
pub fn chunks_of(segment: u64, chunks: u64) -> Range<u64> {
    let start = segment.saturating_mul(SEGMENT_CHUNKS).min(chunks);
    start..start.saturating_add(SEGMENT_CHUNKS).min(chunks)
}

/// Bit of chunk `index` in its segment's bitmap.
pub fn bit_of(index: u64) -> u64 {
    1 << (index % SEGMENT_CHUNKS)
}

/// The trackers of `segment` of `object` among `members`, first choice first.
pub fn trackers(object: &str, segment: u64, members: &Ring) -> Vec<NodeId> {
    let key = ChunkKey { object: Arc::from(format!("{object}\0segment")), index: segment };
    members.top(&key, TRACKERS).into_iter().cloned().collect()
}

/// The order in which `me` loads a whole object of `chunks` chunks when every member loads it
/// at once: first the chunks it owns (`owned(index)`; it fetches those from the origin), then
/// the other segments starting at one of its own (a rotation by its id), each segment in
/// order. Loaders in lock-step would all want the same chunk of the same owner at once; in
/// this order each owner is asked by few at a time and every agent serves while it loads.
pub fn load_order(me: &str, chunks: u64, owned: impl Fn(u64) -> bool) -> Vec<u64> {
    let mut order: Vec<u64> = (0..chunks).filter(|&i| owned(i)).collect();
    let segments = chunks.div_ceil(SEGMENT_CHUNKS).max(1);
    let start = placement::weight(me, &ChunkKey { object: Arc::from("load-order"), index: 0 }) % segments;
    for s in (0..segments).map(|k| (start + k) % segments) {
        order.extend(chunks_of(s, chunks).filter(|&i| !owned(i)));
    }
    order
}

/// Holders tried for one chunk before the fillers and the owner.
pub const HOLDER_TRIES: usize = 3;

/// One place to ask for a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A member that holds it.
    Holder(NodeId),
    /// A member fetching it from the origin now: join that fetch.
    Filler(NodeId),
    /// The chunk's owner, asked to fill it.
    Owner(NodeId),
    /// The origin (this agent owns the chunk, or nobody else could serve it).
    Origin,
}

/// Where to ask for a chunk, in order: up to [`HOLDER_TRIES`] holders, the fillers, the owner,
/// then its successor (the next rendezvous owner: who takes the chunk over, handed off, when the
/// owner leaves), stopping at `me` in that line, then the origin. `owners` is the top two.
pub fn plan(s: Sources, owners: &[&NodeId], me: &NodeId) -> Vec<Step> {
    let mut steps: Vec<Step> = s.holders.into_iter().take(HOLDER_TRIES).map(Step::Holder).collect();
    steps.extend(s.fillers.into_iter().filter(|f| f != me).map(Step::Filler));
    for o in owners.iter().take(2).take_while(|o| **o != me) {
        if !steps.iter().any(|st| matches!(st, Step::Filler(f) if f == *o)) {
            steps.push(Step::Owner((*o).clone()));
        }
    }
    steps.push(Step::Origin);
    steps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_and_trackers() {
        assert_eq!(segment_of(SEGMENT_CHUNKS + 1), 1);
        assert_eq!(chunks_of(1, SEGMENT_CHUNKS + 3), SEGMENT_CHUNKS..SEGMENT_CHUNKS + 3);
        assert_eq!(chunks_of(9, 10), 10..10);
        assert_eq!(bit_of(SEGMENT_CHUNKS + 2), 4);
        let members: Vec<NodeId> = (0..50).map(|i| NodeId::from(format!("n{i}"))).collect();
        let t = trackers("obj", 3, &Ring::new(members.clone()));
        assert_eq!(t.len(), TRACKERS);
        let mut shuffled = members.clone();
        shuffled.reverse();
        assert_eq!(t, trackers("obj", 3, &Ring::new(shuffled)));
        assert_ne!(t, trackers("obj", 4, &Ring::new(members)));
    }

    #[test]
    fn the_plan_asks_holders_then_the_owner_then_its_successor() {
        let (me, a, b, h): (NodeId, NodeId, NodeId, NodeId) = ("me".into(), "a".into(), "b".into(), "h".into());
        let s = Sources { holders: vec![h.clone()], fillers: vec![] };
        let p = plan(s.clone(), &[&a, &b], &me);
        assert_eq!(p, vec![Step::Holder(h.clone()), Step::Owner(a.clone()), Step::Owner(b.clone()), Step::Origin]);
        // This agent is the successor: it fills the chunk itself if the owner cannot.
        assert_eq!(plan(s.clone(), &[&a, &me], &me), vec![Step::Holder(h.clone()), Step::Owner(a.clone()), Step::Origin]);
        assert_eq!(plan(s, &[&me, &a], &me), vec![Step::Holder(h), Step::Origin]);
    }

    #[test]
    fn a_load_order_covers_every_chunk_once_owned_first() {
        let owned = |i: u64| i % 7 == 3;
        let order = load_order("node-a", 200, owned);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..200).collect::<Vec<_>>());
        let first_other = order.iter().position(|&i| !owned(i)).unwrap();
        assert!(order[..first_other].iter().all(|&i| owned(i)) && order[first_other..].iter().all(|&i| !owned(i)));
        // Two agents start the rest at different segments (for most pairs).
        let starts: std::collections::HashSet<u64> =
            (0..20).map(|n| segment_of(load_order(&format!("node-{n}"), 200, |_| false)[0])).collect();
        assert!(starts.len() > 3, "{starts:?}");
    }
}
