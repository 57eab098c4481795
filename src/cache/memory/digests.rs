//! The BLAKE3 digests this agent vouches for (see `peer::vouch`).
//!
//! # Contract
//! - [`MemoryTier::digests`] answers, for every chunk of an object held now, the BLAKE3 of the
//!   bytes it holds (and serves); zeros for chunks not held.
//! - A digest is taken when first asked for, from the stored bytes (a chunk that was checked by
//!   a digest as it landed keeps that one): receiving a chunk costs no BLAKE3 unless it is
//!   checked by one, and most held chunks are never asked about. Once taken it is kept with the
//!   chunk. Callers of one object take turns, so its chunks are hashed once.
//! - Hashing reads the mapping outside the slot lock, holding the chunk as a reader (it cannot
//!   be punched meanwhile). Costs about 0.15 s of CPU per GiB not yet hashed: call it off the
//!   async threads.

use super::{chunk_range, MemoryTier};
use crate::catalog::ObjectVersion;
use crate::error::lock;

impl MemoryTier {
    /// The BLAKE3 digests of the chunks of `obj` held now (zeros for the others), 32 bytes each.
    pub fn digests(&self, obj: &ObjectVersion) -> Vec<u8> {
        let Some(f) = self.existing(obj) else { return Vec::new() };
        let _turn = lock(&f.hashing);
        let missing: Vec<u64> =
            f.slots().iter().enumerate().filter(|(_, s)| s.present && s.digest.is_none()).map(|(i, _)| i as u64).collect();
        for index in missing {
            let chunk = chunk_range(index, obj.size, self.chunk_size);
            let Some((bytes, held)) = f.view(index, chunk.clone(), 0..chunk.end - chunk.start) else { continue };
            let digest = *blake3::hash(&bytes).as_bytes();
            if let Some(s) = f.slots().get_mut(index as usize) {
                // Still the same bytes (a chunk is only refilled after it was dropped).
                if s.present && s.crc == held.crc && s.digest.is_none() {
                    s.digest = Some(digest);
                }
            }
            drop(bytes);
        }
        let out = f.slots().iter().flat_map(|s| if s.present { s.digest.unwrap_or_default() } else { [0; 32] }).collect();
        out
    }
}
