//! The byte budget: an LRU index of present chunks, pins, reservation and eviction.
//!
//! # Contract
//! - The bytes held (present chunks plus reservations) never exceed the budget, even briefly.
//! - Eviction takes least recently used chunks, never one that is pinned or has a live view;
//!   when the budget cannot be met without those, nothing is evicted. A fill that may evict
//!   only colder chunks (a chunk handed off by a peer, with its own last use) evicts nothing
//!   used after that time.
//! - A pinned version keeps every chunk until its last pin is released.

use std::time::{Duration, Instant};

use lru::LruCache;
use tracing::warn;

use super::file::punch;
use super::MemoryTier;
use crate::cache::chunk::ChunkKey;
use crate::catalog::ObjectVersion;
use crate::error::lock;

pub(super) struct Index {
    pub(super) lru: LruCache<ChunkKey, Held>,
    pub(super) used: u64,
}

/// A present chunk in the index: its length and when it was last used.
#[derive(Debug, Clone, Copy)]
pub(super) struct Held {
    pub(super) len: u64,
    pub(super) used: Instant,
}

impl Index {
    /// Mark `key` just used (most recent).
    pub(super) fn touch(&mut self, key: &ChunkKey) {
        if let Some(h) = self.lru.get_mut(key) {
            h.used = Instant::now();
        }
    }
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
            self.choose_victims(&mut idx, None)
        };
        let kept = self.evict(victims);
        put_back(&mut lock(&self.index), kept);
    }

    /// Every present chunk with its length and how long ago it was last used, most recently
    /// used first.
    pub fn held(&self) -> Vec<(ChunkKey, u64, Duration)> {
        let idx = lock(&self.index);
        idx.lru.iter().map(|(k, h)| (k.clone(), h.len, h.used.elapsed())).collect()
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

    /// Make room for `len` more bytes, evicting least recently used chunks (with `colder_than`,
    /// only chunks last used before it). Pinned and read chunks are passed over; false (nothing
    /// reserved) if room cannot be made: the budget is a hard limit, and the tmpfs files never
    /// hold more than it, even briefly.
    pub(super) fn reserve(&self, len: u64, colder_than: Option<Instant>) -> bool {
        let (victims, fits) = {
            let mut idx = lock(&self.index);
            idx.used += len;
            let victims = self.choose_victims(&mut idx, colder_than);
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
    /// pinned ones (in use through an open file) and, with `colder_than`, stopping at the first
    /// chunk used since then. If the budget cannot be met so, nothing is taken: evicting
    /// everything else would still not make room. The caller punches the holes with
    /// [`MemoryTier::evict`], outside the index lock.
    pub(super) fn choose_victims(&self, idx: &mut Index, colder_than: Option<Instant>) -> Vec<(ChunkKey, Held)> {
        let over = idx.used.saturating_sub(self.capacity());
        if over == 0 {
            return Vec::new();
        }
        let pins = lock(&self.pins);
        let mut chosen = Vec::new();
        let mut freed = 0;
        for (k, h) in idx.lru.iter().rev() {
            if freed >= over || colder_than.is_some_and(|t| h.used >= t) {
                break;
            }
            if !pins.contains_key(&k.object) {
                chosen.push(k.clone());
                freed += h.len;
            }
        }
        if freed < over {
            return Vec::new();
        }
        let victims: Vec<(ChunkKey, Held)> = chosen.into_iter().filter_map(|k| idx.lru.pop_entry(&k)).collect();
        idx.used -= victims.iter().map(|(_, h)| h.len).sum::<u64>();
        victims
    }

    /// Punch the victims' holes; returns those that could not go (pinned, or read since they
    /// were chosen), for the caller to put back.
    pub(super) fn evict(&self, victims: Vec<(ChunkKey, Held)>) -> Vec<(ChunkKey, Held)> {
        let mut kept = Vec::new();
        for (key, held) in victims {
            let Some(f) = lock(&self.files).get(&key.object).cloned() else { continue };
            // The pins lock is held until the hole is punched, so `pin_if_complete` never sees a
            // chunk that is about to go; the slot lock, so no reader view starts meanwhile.
            let pins = lock(&self.pins);
            let mut slots = f.slots();
            let Some(s) = slots.get_mut(key.index as usize) else { continue };
            if pins.contains_key(&key.object) || s.readers > 0 {
                kept.push((key, held));
                continue;
            }
            s.present = false;
            // The hole is punched under the slot lock so a refill cannot start before it.
            let start = key.index * self.chunk_size;
            punch(&f.file, start, self.chunk_size);
            drop((slots, pins));
            f.journal(&format!("-{}\n", key.index));
            self.metrics.evictions.inc();
            if let Some(hook) = self.evicted.get() {
                hook(&key);
            }
        }
        kept
    }
}

/// Return chunks that could not be evicted to the index.
pub(super) fn put_back(idx: &mut Index, kept: Vec<(ChunkKey, Held)>) {
    for (k, h) in kept {
        idx.used += h.len;
        idx.lru.put(k, h);
    }
}
