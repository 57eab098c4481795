//! Rendezvous (highest random weight) hashing: every agent that sees the same live peers picks
//! the same owner for a chunk, and a peer joining or leaving moves only its own share.

use sha2::{Digest, Sha256};

use crate::cache::ChunkKey;

/// A stable 64-bit digest (the first 8 bytes of SHA-256).
fn digest(parts: &[&[u8]]) -> u64 {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    let d = h.finalize();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// A node's half of its weights.
pub fn node_hash(node: &str) -> u64 {
    digest(&[node.as_bytes(), &[0u8]])
}

/// A key's half of its weights.
pub fn key_hash(key: &ChunkKey) -> u64 {
    digest(&[key.object.as_bytes(), &[0u8], &key.index.to_le_bytes()])
}

/// The weight of a node for a key from their halves (splitmix64's finaliser of their xor).
fn mix(node: u64, key: u64) -> u64 {
    let mut z = node ^ key;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Weight of `node` for `key`: stable across agents, builds and platforms.
pub fn weight(node: &str, key: &ChunkKey) -> u64 {
    mix(node_hash(node), key_hash(key))
}

/// Index of the owner of `key` among `nodes` (ties broken by the node name), None if empty.
pub fn owner<S: AsRef<str>>(key: &ChunkKey, nodes: &[S]) -> Option<usize> {
    top(key, nodes, 1).first().copied()
}

/// Indices of the `k` owners of `key` among `nodes`, best first (fewer if there are fewer nodes).
pub fn top<S: AsRef<str>>(key: &ChunkKey, nodes: &[S], k: usize) -> Vec<usize> {
    let hashes: Vec<u64> = nodes.iter().map(|n| node_hash(n.as_ref())).collect();
    best(key_hash(key), &hashes, |i| nodes[i].as_ref(), k)
}

/// The `k` best of `hashes` for `key`, by weight then name.
fn best<'a>(key: u64, hashes: &[u64], name: impl Fn(usize) -> &'a str, k: usize) -> Vec<usize> {
    let mut top: Vec<(u64, usize)> = Vec::with_capacity(k + 1);
    for (i, &h) in hashes.iter().enumerate() {
        let w = mix(h, key);
        let better = |a: &(u64, usize)| (w, name(i)) > (a.0, name(a.1));
        if top.len() < k || top.last().is_some_and(better) {
            let at = top.iter().position(better).unwrap_or(top.len());
            top.insert(at, (w, i));
            top.truncate(k);
        }
    }
    top.into_iter().map(|(_, i)| i).collect()
}

/// Members with their hashes computed once: owners of many keys among the same members cost
/// one mix per member and key.
#[derive(Debug, Clone, Default)]
pub struct Ring {
    nodes: Vec<std::sync::Arc<str>>,
    hashes: Vec<u64>,
}

impl Ring {
    /// The members `nodes`, sorted and without duplicates.
    pub fn new(mut nodes: Vec<std::sync::Arc<str>>) -> Self {
        nodes.sort();
        nodes.dedup();
        let hashes = nodes.iter().map(|n| node_hash(n)).collect();
        Ring { nodes, hashes }
    }

    pub fn nodes(&self) -> &[std::sync::Arc<str>] {
        &self.nodes
    }

    pub fn contains(&self, node: &str) -> bool {
        self.nodes.binary_search_by(|n| (**n).cmp(node)).is_ok()
    }

    /// The owner of `key`.
    pub fn owner(&self, key: &ChunkKey) -> Option<&std::sync::Arc<str>> {
        self.top(key, 1).into_iter().next()
    }

    /// The `k` owners of `key`, best first.
    pub fn top(&self, key: &ChunkKey, k: usize) -> Vec<&std::sync::Arc<str>> {
        best(key_hash(key), &self.hashes, |i| &self.nodes[i], k).into_iter().map(|i| &self.nodes[i]).collect()
    }

    /// Whether this ring's members are exactly `sorted` (sorted, without duplicates).
    fn has_members(&self, sorted: &[std::sync::Arc<str>]) -> bool {
        self.nodes == sorted
    }

    /// The same members without `node`.
    pub fn without(&self, node: &str) -> Ring {
        Ring::new(self.nodes.iter().filter(|n| &***n != node).cloned().collect())
    }
}

/// The ring of the member list asked for last, rebuilt only when the list changes (a fetch
/// among 1000 members then costs no hashing of member names).
#[derive(Default)]
pub struct RingCache(std::sync::Mutex<std::sync::Arc<Ring>>);

impl RingCache {
    /// The ring of `nodes`.
    pub fn of(&self, mut nodes: Vec<std::sync::Arc<str>>) -> std::sync::Arc<Ring> {
        nodes.sort();
        nodes.dedup();
        let mut last = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !last.has_members(&nodes) {
            *last = std::sync::Arc::new(Ring::new(nodes));
        }
        last.clone()
    }

    /// The ring of `peers` (those whose id is known) and `me`, when given (an agent that drains
    /// leaves itself out).
    pub fn of_members(&self, peers: &[std::sync::Arc<super::membership::PeerHandle>], me: Option<&str>) -> std::sync::Arc<Ring> {
        let mut nodes: Vec<std::sync::Arc<str>> = peers.iter().filter_map(|p| p.node_id()).map(std::sync::Arc::from).collect();
        nodes.extend(me.map(std::sync::Arc::from));
        self.of(nodes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn key(i: u64) -> ChunkKey {
        ChunkKey { object: Arc::from("obj"), index: i }
    }

    #[test]
    fn spread_and_stability() {
        let nodes: Vec<String> = (0..5).map(|i| format!("node-{i}")).collect();
        let mut counts = [0usize; 5];
        for i in 0..5000 {
            counts[owner(&key(i), &nodes).unwrap()] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800 && c < 1200), "{counts:?}");
        // Removing one node moves only the chunks it owned.
        let fewer: Vec<String> = nodes.iter().filter(|n| *n != "node-2").cloned().collect();
        for i in 0..2000 {
            let before = &nodes[owner(&key(i), &nodes).unwrap()];
            let after = &fewer[owner(&key(i), &fewer).unwrap()];
            if before != "node-2" {
                assert_eq!(before, after);
            }
        }
        assert_eq!(owner::<String>(&key(1), &[]), None);
        // The first of the top k is the owner; the top k are distinct.
        for i in 0..200 {
            let t = top(&key(i), &nodes, 3);
            assert_eq!(t.len(), 3);
            assert_eq!(t[0], owner(&key(i), &nodes).unwrap());
            assert!(t[0] != t[1] && t[1] != t[2] && t[0] != t[2]);
        }
        assert_eq!(top(&key(1), &nodes[..2], 3).len(), 2);
        // A ring answers as the functions do.
        let ring = Ring::new(nodes.iter().map(|n| std::sync::Arc::from(n.as_str())).collect());
        for i in 0..100 {
            let t: Vec<&str> = ring.top(&key(i), 3).into_iter().map(|n| &**n).collect();
            let f: Vec<&str> = top(&key(i), &nodes, 3).into_iter().map(|j| nodes[j].as_str()).collect();
            assert_eq!(t, f);
        }
        assert!(ring.contains("node-3") && !ring.without("node-3").contains("node-3"));
        // Order of the list does not matter.
        let mut rev = nodes.clone();
        rev.reverse();
        for i in 0..100 {
            assert_eq!(nodes[owner(&key(i), &nodes).unwrap()], rev[owner(&key(i), &rev).unwrap()]);
        }
    }
}
