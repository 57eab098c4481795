//! The cache core: chunk arithmetic (`chunk`), the memory tier (`memory`), and the tiered reader
//! with single-flight and readahead (`reader`).

pub mod chunk;
pub mod memory;
pub mod reader;

pub use chunk::ChunkKey;
pub use memory::MemoryTier;
pub use reader::{Chunk, ChunkSource, Reader, ReaderOptions};
