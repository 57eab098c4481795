//! Chunk keys and arithmetic. A chunk is a fixed-size range of one object version; the last
//! chunk is shorter. Every range here is clamped to the object's size.

use std::ops::Range;
use std::sync::Arc;

/// `(object version id, chunk index)`: a chunk is never shared between versions.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChunkKey {
    pub object: Arc<str>,
    pub index: u64,
}

/// Number of chunks of an object of `size` bytes.
pub fn chunk_count(size: u64, chunk_size: u64) -> u64 {
    size.div_ceil(chunk_size)
}

/// The object byte range of chunk `index` (empty past the end).
pub fn chunk_range(index: u64, size: u64, chunk_size: u64) -> Range<u64> {
    let start = index.saturating_mul(chunk_size).min(size);
    let end = start.saturating_add(chunk_size).min(size);
    start..end
}

/// One chunk's share of a read: bytes `within` (offsets inside the chunk) of chunk `index`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    pub index: u64,
    pub within: Range<u64>,
}

/// The pieces that make up the read `[offset, offset + len)`, clamped to `size`, in order.
pub fn split_read(offset: u64, len: u64, size: u64, chunk_size: u64) -> Vec<Piece> {
    let end = offset.saturating_add(len).min(size);
    let mut pieces = Vec::new();
    let mut pos = offset;
    while pos < end {
        let index = pos / chunk_size;
        let chunk_start = index * chunk_size;
        let chunk_end = (chunk_start + chunk_size).min(end);
        pieces.push(Piece { index, within: (pos - chunk_start)..(chunk_end - chunk_start) });
        pos = chunk_end;
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn boundaries() {
        let cs = 8;
        assert_eq!(chunk_count(0, cs), 0);
        assert_eq!(chunk_count(8, cs), 1);
        assert_eq!(chunk_count(9, cs), 2);
        assert_eq!(chunk_range(1, 9, cs), 8..9);
        assert_eq!(chunk_range(2, 9, cs), 9..9);
        assert_eq!(split_read(0, 0, 9, cs), vec![]);
        assert_eq!(split_read(9, 5, 9, cs), vec![]);
        assert_eq!(split_read(100, 5, 9, cs), vec![]);
        assert_eq!(split_read(7, 2, 9, cs), vec![Piece { index: 0, within: 7..8 }, Piece { index: 1, within: 0..1 }]);
        assert_eq!(split_read(8, 100, 9, cs), vec![Piece { index: 1, within: 0..1 }]);
        assert_eq!(split_read(0, 16, 16, cs), vec![Piece { index: 0, within: 0..8 }, Piece { index: 1, within: 0..8 }]);
        assert_eq!(split_read(u64::MAX - 1, u64::MAX, 9, cs), vec![]);
    }

    proptest! {
        #[test]
        fn pieces_cover_exactly(offset in 0u64..300, len in 0u64..300, size in 0u64..300, cs in 1u64..40) {
            let pieces = split_read(offset, len, size, cs);
            let want = offset.min(size)..(offset.saturating_add(len)).min(size).max(offset.min(size));
            let mut pos = want.start;
            for p in &pieces {
                let r = chunk_range(p.index, size, cs);
                prop_assert_eq!(r.start + p.within.start, pos);
                prop_assert!(r.start + p.within.end <= r.end);
                prop_assert!(!p.within.is_empty());
                pos = r.start + p.within.end;
            }
            prop_assert_eq!(pos, want.end);
        }
    }
}
