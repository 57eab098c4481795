//! The byte budget: an LRU index of present chunks, pins, reservation and eviction.
//!
//! # Contract
//! - The bytes held (present chunks plus reservations) never exceed the budget, even briefly.
//! - Eviction takes least recently used chunks, never one that is pinned or has a live view;
//!   when the budget cannot be met without those, nothing is evicted.
//! - A pinned version keeps every chunk until its last pin is released.

use lru::LruCache;
use tracing::warn;

use super::file::punch;
use super::MemoryTier;
use crate::cache::chunk::ChunkKey;
use crate::catalog::ObjectVersion;
use crate::error::lock;

pub(super) struct Index {
    pub(super) lru: LruCache<ChunkKey, u64>,
    pub(super) used: u64,
}

impl MemoryTier {
    pub fn capacity(&self) -> u64 {
        self.capacity.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The cache filesystem is full (ENOSPC) while a chunk of `len` reserved bytes was being
    /// written: the budget becomes what is held without it (the filesystem is smaller than the
    /// budget, or shared), and chunks are evicted to stay within it.
    pub(super) fn out_of_space(&self, len: u64) {
        let victims = {
            let mut idx = lock(&self.index);
            let was = self.capacity();
            let now = idx.used.saturating_sub(len).min(was);
            self.capacity.store(now, std::sync::atomic::Ordering::Relaxed);
            self.metrics.cache_capacity_bytes.set(now as i64);
            warn!(dir = %self.dir.display(), was = %crate::size::format_size(was), now = %crate::size::format_size(now), "the cache directory's filesystem is full: cache budget lowered (free space there, or give it a bigger tmpfs, and restart to raise it)");
            self.choose_victims(&mut idx)
        };
        let kept = self.evict(victims);
        put_back(&mut lock(&self.index), kept);
    }

    /// Bytes of chunks held now.
    pub fn used(&self) -> u64 {
        lock(&self.index).used
    }

    /// Pin `obj` if every chunk of it is present: until [`MemoryTier::unpin`], none is evicted.
    pub fn pin_if_complete(&self, obj: &ObjectVersion) -> bool {
        let mut pins = lock(&self.pins);
        if obj.size == 0 || !self.is_complete(obj) {
            return false;
        }
        *pins.entry(obj.id.clone()).or_default() += 1;
        true
    }

    pub fn unpin(&self, obj: &ObjectVersion) {
        let mut pins = lock(&self.pins);
        if let Some(n) = pins.get_mut(&obj.id) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&obj.id);
            }
        }
    }

    /// Whether `obj` is pinned now.
    pub fn is_pinned(&self, obj: &ObjectVersion) -> bool {
        lock(&self.pins).contains_key(&obj.id)
    }

    /// Make room for `len` more bytes, evicting least recently used chunks. Pinned and read
    /// chunks are passed over; false (nothing reserved) if room cannot be made: the budget is a
    /// hard limit, and the tmpfs files never hold more than it, even briefly.
    pub(super) fn reserve(&self, len: u64) -> bool {
        let (victims, fits) = {
            let mut idx = lock(&self.index);
            idx.used += len;
            let victims = self.choose_victims(&mut idx);
            let fits = idx.used <= self.capacity();
            if !fits {
                idx.used -= len;
            }
            self.metrics.cache_bytes.set(idx.used as i64);
            (victims, fits)
        };
        let kept = self.evict(victims);
        // Victims that could not go come back, and the reservation is kept only if it still
        // fits: in one step, so the bytes held are never over the budget, even briefly.
        let mut idx = lock(&self.index);
        put_back(&mut idx, kept);
        // `fits` false: the reservation was already given back above.
        if fits && idx.used > self.capacity() {
            idx.used -= len;
            self.metrics.cache_bytes.set(idx.used as i64);
            return false;
        }
        self.metrics.cache_bytes.set(idx.used as i64);
        fits
    }

    /// Take least recently used chunks out of the index until the budget holds, passing over
    /// pinned ones (in use through an open file). If the budget cannot be met without them,
    /// nothing is taken: evicting everything else would still not make room. The caller punches
    /// the holes with [`MemoryTier::evict`], outside the index lock.
    pub(super) fn choose_victims(&self, idx: &mut Index) -> Vec<(ChunkKey, u64)> {
        let over = idx.used.saturating_sub(self.capacity());
        if over == 0 {
            return Vec::new();
        }
        let pins = lock(&self.pins);
        let mut chosen = Vec::new();
        let mut freed = 0;
        for (k, l) in idx.lru.iter().rev() {
            if freed >= over {
                break;
            }
            if !pins.contains_key(&k.object) {
                chosen.push(k.clone());
                freed += l;
            }
        }
        if freed < over {
            return Vec::new();
        }
        let victims: Vec<(ChunkKey, u64)> = chosen.into_iter().filter_map(|k| idx.lru.pop_entry(&k)).collect();
        idx.used -= victims.iter().map(|(_, l)| l).sum::<u64>();
        victims
    }

    /// Punch the victims' holes; returns those that could not go (pinned, or read since they
    /// were chosen), for the caller to put back.
    pub(super) fn evict(&self, victims: Vec<(ChunkKey, u64)>) -> Vec<(ChunkKey, u64)> {
        let mut kept = Vec::new();
        for (key, len) in victims {
            let Some(f) = lock(&self.files).get(&key.object).cloned() else { continue };
            // The pins lock is held until the hole is punched, so `pin_if_complete` never sees a
            // chunk that is about to go; the slot lock, so no reader view starts meanwhile.
            let pins = lock(&self.pins);
            let mut slots = f.slots();
            let Some(s) = slots.get_mut(key.index as usize) else { continue };
            if pins.contains_key(&key.object) || s.readers > 0 {
                kept.push((key, len));
                continue;
            }
            s.present = false;
            // The hole is punched under the slot lock so a refill cannot start before it.
            let start = key.index * self.chunk_size;
            punch(&f.file, start, self.chunk_size);
            drop((slots, pins));
            f.journal(&format!("-{}\n", key.index));
            self.metrics.evictions.inc();
        }
        kept
    }
}

/// Return chunks that could not be evicted to the index.
pub(super) fn put_back(idx: &mut Index, kept: Vec<(ChunkKey, u64)>) {
    for (k, l) in kept {
        idx.used += l;
        idx.lru.put(k, l);
    }
}
