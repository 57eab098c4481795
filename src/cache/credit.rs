//! Which tier a read's bytes count for (`cachefs_read_bytes_total{tier}`).
//!
//! # Contract
//! - A chunk fetched for a local reader (the read itself or its readahead) counts for the tier
//!   that stored it until its length has been read once; after that, and for chunks filled
//!   for nobody local (a peer's fill, `warm`, chunks a source stored ahead of any request),
//!   reads count as memory hits. Bytes served without being stored count for their tier.
//! - It remembers at most a bounded number of chunks not yet read once; the oldest are
//!   forgotten (their bytes then count as memory hits), so it never grows with the cache.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;

use super::chunk::ChunkKey;
use crate::error::lock;
use crate::metrics::{Metrics, Tier};

/// Chunks being fetched, or fetched, for local readers whose bytes have not all been read yet.
pub struct Credits {
    fresh: Mutex<LruCache<ChunkKey, u64>>,
}

impl Credits {
    /// Remembers at most `chunks` chunks (at least one).
    pub fn new(chunks: usize) -> Self {
        Credits { fresh: Mutex::new(LruCache::new(NonZeroUsize::new(chunks).unwrap_or(NonZeroUsize::MIN))) }
    }

    /// Chunk `key` (`len` bytes) is being fetched for a local reader. Called before the fetch
    /// can store it, so no read of the stored chunk is missed.
    pub fn fetching(&self, key: ChunkKey, len: u64) {
        lock(&self.fresh).put(key, len);
    }

    /// Chunk `key` was stored for nobody local, or not stored: reads of it are memory hits.
    pub fn settled(&self, key: &ChunkKey) {
        lock(&self.fresh).pop(key);
    }

    /// `n` bytes of chunk `key`, which `filler` stored, were read from the memory tier.
    pub fn record_hit(&self, metrics: &Metrics, key: &ChunkKey, filler: Tier, n: u64) {
        let first = {
            let mut fresh = lock(&self.fresh);
            match fresh.get_mut(key) {
                None => 0,
                Some(left) => {
                    let take = (*left).min(n);
                    *left -= take;
                    if *left == 0 {
                        fresh.pop(key);
                    }
                    take
                }
            }
        };
        metrics.add_read(filler, first);
        metrics.add_read(Tier::memory, n - first);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u64) -> ChunkKey {
        ChunkKey { object: "o".into(), index: i }
    }

    fn read_bytes(m: &Metrics, t: Tier) -> u64 {
        m.read_bytes_of(t)
    }

    #[test]
    fn first_pass_counts_for_the_filler_then_memory() {
        let m = Metrics::new();
        let c = Credits::new(2);
        c.fetching(key(0), 10);
        for _ in 0..3 {
            c.record_hit(&m, &key(0), Tier::peer, 6);
        }
        assert_eq!((read_bytes(&m, Tier::peer), read_bytes(&m, Tier::memory)), (10, 8));
        // Settled, never announced, or pushed out by newer fetches: memory hits.
        c.fetching(key(1), 4);
        c.settled(&key(1));
        for i in 2..5 {
            c.fetching(key(i), 4);
        }
        for i in [1, 2, 4, 9] {
            c.record_hit(&m, &key(i), Tier::origin, 4);
        }
        assert_eq!((read_bytes(&m, Tier::origin), read_bytes(&m, Tier::memory)), (4, 20));
    }
}
