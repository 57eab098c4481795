//! Rendezvous (highest random weight) hashing: every agent that sees the same live peers picks
//! the same owner for a chunk, and a peer joining or leaving moves only its own share.

use sha2::{Digest, Sha256};

use crate::cache::ChunkKey;

/// Weight of `node` for `key`: stable across agents, builds and platforms.
pub fn weight(node: &str, key: &ChunkKey) -> u64 {
    let mut h = Sha256::new();
    h.update(node.as_bytes());
    h.update([0u8]);
    h.update(key.object.as_bytes());
    h.update(key.index.to_le_bytes());
    let d = h.finalize();
    u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// Index of the owner of `key` among `nodes` (ties broken by the node name), None if empty.
pub fn owner<S: AsRef<str>>(key: &ChunkKey, nodes: &[S]) -> Option<usize> {
    nodes
        .iter()
        .enumerate()
        .max_by(|(_, a), (_, b)| (weight(a.as_ref(), key), a.as_ref()).cmp(&(weight(b.as_ref(), key), b.as_ref())))
        .map(|(i, _)| i)
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
        // Order of the list does not matter.
        let mut rev = nodes.clone();
        rev.reverse();
        for i in 0..100 {
            assert_eq!(nodes[owner(&key(i), &nodes).unwrap()], rev[owner(&key(i), &rev).unwrap()]);
        }
    }
}
