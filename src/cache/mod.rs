//! The cache core: chunk arithmetic (`chunk`), the memory tier (`memory`), the tiered reader
//! with single-flight and readahead (`reader`) and its read attribution (`credit`), and the
//! end-to-end check of files assembled from peers against the origin (`verify`).

pub mod chunk;
pub mod credit;
pub mod hugepages;
pub mod memory;
pub mod reader;
pub mod verify;

pub use chunk::ChunkKey;
pub use memory::{ChunkFile, MemoryTier};
pub use reader::{Chunk, ChunkSource, Reader, ReaderOptions};
