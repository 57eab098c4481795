//! Writing one chunk into the tier as it arrives (see [`MemoryTier::begin_fill`]).

use std::io;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;

use super::file::{punch, ObjFile, Slot};
use super::MemoryTier;
use crate::cache::chunk::ChunkKey;
use crate::error::lock;
use crate::metrics::Tier;

/// A chunk being written into the tier (see [`MemoryTier::begin_fill`]): bytes are written in
/// order with [`Fill::write`]; [`Fill::commit`] makes the chunk present if the crc32c of what was
/// written matches. Dropped uncommitted, it punches what was written and gives the room back.
pub struct Fill {
    pub(super) tier: Arc<MemoryTier>,
    pub(super) file: Arc<ObjFile>,
    pub(super) key: ChunkKey,
    pub(super) chunk: Range<u64>,
    /// Bytes taken (written to the file, or staged).
    pub(super) written: u64,
    pub(super) crc: u32,
    /// The chunk's CRC-64 so far, when the tier keeps them.
    pub(super) crc64: Option<crc_fast::Digest>,
    /// The chunk's BLAKE3 so far, when it is checked by its digest (other chunks get theirs
    /// when first asked for, see [`MemoryTier::digests`]).
    pub(super) digest: Option<Box<blake3::Hasher>>,
    /// The chunk will be committed by its digest ([`Fill::commit_vouched`]): no crc32c is taken.
    pub(super) by_digest: bool,
    pub(super) reserved: bool,
    /// Small pieces (an HTTP body arrives in a few KiB at a time) gathered into larger writes.
    pub(super) staged: Vec<u8>,
    /// The chunk's last use to record once stored (None: now).
    pub(super) used: Option<std::time::Instant>,
}

/// Writes smaller than this are staged and written together.
pub(super) const STAGE_BYTES: usize = 1 << 20;

impl Fill {
    /// Bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Bytes of the chunk still to be written.
    pub fn remaining(&self) -> u64 {
        (self.chunk.end - self.chunk.start) - self.written
    }

    /// Whether this chunk is checked by its digest ([`Fill::check_by_digest`]).
    pub fn by_digest(&self) -> bool {
        self.by_digest
    }

    /// crc32c of the bytes written so far.
    pub fn crc(&self) -> u32 {
        self.crc
    }

    /// Append `data` to the chunk (never past its end).
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if data.len() as u64 > self.remaining() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "more bytes than the chunk holds"));
        }
        self.checksum(data);
        self.written += data.len() as u64;
        if self.staged.is_empty() && data.len() >= STAGE_BYTES {
            let r = self.file.write_at(data, self.chunk.start + self.written - data.len() as u64);
            return self.full(r);
        }
        if self.staged.capacity() == 0 {
            self.staged.reserve_exact(STAGE_BYTES);
        }
        self.staged.extend_from_slice(data);
        if self.staged.len() >= STAGE_BYTES {
            self.flush()?;
        }
        Ok(())
    }

    /// Append the next `n` bytes waiting in `pipe` (see [`crate::splice`]): they go into the
    /// file without a copy in user space, and the checksums are taken from the file's mapping,
    /// so they are of exactly the bytes that will be served.
    pub fn write_from_pipe(&mut self, pipe: &crate::splice::Pipe, n: usize) -> io::Result<()> {
        if n as u64 > self.remaining() {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "more bytes than the chunk holds"));
        }
        self.flush()?;
        let at = self.chunk.start + self.written;
        let r = {
            let _one = lock(&self.file.write);
            pipe.drain_to(std::os::fd::AsRawFd::as_raw_fd(&self.file.file), at, n)
        };
        self.full(r)?;
        let file = self.file.clone();
        let map = file.mapping().ok_or_else(|| io::Error::other("cannot map the cache file"))?;
        let landed = map.get(at as usize..at as usize + n).ok_or_else(|| io::Error::other("the cache file is shorter than its object"))?;
        self.checksum(landed);
        self.written += n as u64;
        Ok(())
    }

    /// Every checksum the chunk keeps, over its next bytes.
    fn checksum(&mut self, data: &[u8]) {
        if !self.by_digest {
            self.crc = crc32c::crc32c_append(self.crc, data);
        }
        if let Some(d) = &mut self.crc64 {
            d.update(data);
        }
        if let Some(h) = &mut self.digest {
            h.update(data);
        }
    }

    /// BLAKE3 of the bytes written so far (None: the chunk is not checked by its digest).
    pub fn digest(&self) -> Option<[u8; 32]> {
        self.digest.as_ref().map(|h| *h.finalize().as_bytes())
    }

    /// Write what is staged.
    pub(super) fn flush(&mut self) -> io::Result<()> {
        if !self.staged.is_empty() {
            let at = self.chunk.start + self.written - self.staged.len() as u64;
            let r = self.file.write_at(&self.staged, at);
            self.full(r)?;
            self.staged.clear();
        }
        Ok(())
    }

    /// A write that found the filesystem full lowers the tier's budget (see `out_of_space`).
    pub(super) fn full(&self, r: io::Result<()>) -> io::Result<()> {
        if let Err(e) = &r {
            if e.raw_os_error() == Some(libc::ENOSPC) && self.reserved {
                self.tier.out_of_space(self.chunk.end - self.chunk.start);
            }
        }
        r
    }

    /// Start the chunk over (a source retries from its start).
    pub fn restart(&mut self) {
        self.written = 0;
        self.crc = 0;
        if let Some(d) = &mut self.crc64 {
            d.reset();
        }
        if let Some(h) = &mut self.digest {
            h.reset();
        }
        self.staged.clear();
    }

    /// This chunk will be checked by its BLAKE3 digest ([`Fill::commit_vouched`]), so no
    /// crc32c is taken as it is written. False when the tier keeps no digests.
    pub fn check_by_digest(&mut self) -> bool {
        self.by_digest = self.tier.digests && self.written == 0;
        if self.by_digest && self.digest.is_none() {
            self.digest = Some(Box::new(blake3::Hasher::new()));
        }
        self.by_digest
    }

    /// Make the chunk present if it is whole and its BLAKE3 is `digest`; `crc` (the sender's)
    /// is then the crc32c of these very bytes and is recorded as theirs.
    pub fn commit_vouched(mut self, digest: [u8; 32], crc: u32, source: Tier) -> io::Result<Bytes> {
        if self.digest() != Some(digest) {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "digest mismatch"));
        }
        self.crc = crc;
        self.by_digest = false;
        self.commit(crc, source)
    }

    /// Make the chunk present if it is whole and its crc32c is `crc`; its bytes count for
    /// `source` on their first local read. Returns them (a view of the mapping).
    pub fn commit(mut self, crc: u32, source: Tier) -> io::Result<Bytes> {
        self.flush()?;
        if self.remaining() != 0 || self.by_digest || self.crc != crc {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk incomplete or checksum mismatch"));
        }
        let (index, len) = (self.key.index, self.chunk.end - self.chunk.start);
        let crc64 = self.crc64.as_ref().map(|d| d.finalize()).unwrap_or(0);
        let digest = self.digest();
        // Present and handed out in one step, so it cannot be evicted before the caller has it.
        let present = |s: &mut Slot| {
            *s = Slot {
                present: true,
                writing: false,
                crc,
                crc64,
                digest,
                source: Some(source),
                readers: s.readers,
                punch_when_read: false,
            };
            Some(())
        };
        let view = self.file.view_with(index, self.chunk.clone(), 0..len, present);
        let Some((bytes, _)) = view else { return Err(io::Error::other("cannot map the cache file")) };
        self.file.journal(&format!("+{index} {crc}\n"));
        {
            let mut idx = lock(&self.tier.index);
            let used = self.used.unwrap_or_else(std::time::Instant::now);
            idx.lru.put(self.key.clone(), super::budget::Held { len, used });
            self.tier.metrics.cache_bytes.set(idx.used as i64);
        }
        self.reserved = false;
        Ok(bytes)
    }
}

impl Drop for Fill {
    fn drop(&mut self) {
        if !self.reserved {
            // Committed (or never given room): only a failed commit may leave `writing` set.
            if let Some(s) = self.file.slots().get_mut(self.key.index as usize) {
                s.writing = false;
            }
            return;
        }
        let len = self.chunk.end - self.chunk.start;
        punch(&self.file.file, self.chunk.start, len);
        if let Some(s) = self.file.slots().get_mut(self.key.index as usize) {
            s.writing = false;
        }
        let mut idx = lock(&self.tier.index);
        idx.used -= len;
        self.tier.metrics.cache_bytes.set(idx.used as i64);
    }
}
