//! Criterion micro-benchmarks of the hot pieces: the memory tier's chunk index (lookup, insert,
//! insert that evicts), crc32c and crc64nvme of a chunk, combining 1000 chunk CRC-64s, rendezvous owner choice over 100 peers, and splitting
//! a read into chunk pieces. `cargo bench --bench micro`.

use std::sync::Arc;
use std::time::SystemTime;

use cachefs::cache::chunk::split_read;
use cachefs::cache::{ChunkKey, MemoryTier};
use cachefs::catalog::ObjectVersion;
use cachefs::metrics::{Metrics, Tier};
use cachefs::peer::placement::owner;
use criterion::{black_box, criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const CHUNK: u64 = 1 << 20;

fn object(name: &str, chunks: u64) -> ObjectVersion {
    ObjectVersion::new(name.into(), name.into(), Some("etag".into()), None, chunks * CHUNK, SystemTime::UNIX_EPOCH)
}

fn chunk_index(c: &mut Criterion) {
    let dir = tempfile::Builder::new().prefix("cachefs-micro-").tempdir_in("/dev/shm").unwrap();
    let data = vec![7u8; CHUNK as usize];
    // 64 chunks held; lookups of present and absent chunks.
    let tier = Arc::new(MemoryTier::new(dir.path(), CHUNK, 64 * CHUNK, Arc::new(Metrics::new())).unwrap());
    let obj = object("held.bin", 128);
    for i in 0..64 {
        tier.insert(&obj, i, &data, Tier::origin).unwrap();
    }
    let mut i = 0u64;
    c.bench_function("chunk index lookup (64 held, half the probes miss)", |b| {
        b.iter(|| {
            i = (i + 1) % 128;
            black_box(tier.contains(&obj, i))
        })
    });
    // Insert of a 1 MiB chunk into a full tier: index update, eviction of the LRU victim, hole punch.
    let full = object("evicting.bin", 1 << 20);
    let mut n = 0u64;
    let mut g = c.benchmark_group("chunk index");
    g.throughput(Throughput::Bytes(CHUNK));
    g.bench_function("insert 1 MiB into a full tier (evicts one)", |b| {
        b.iter(|| {
            n += 1;
            tier.insert(&full, n, &data, Tier::origin).unwrap()
        })
    });
    g.finish();
}

fn checksum(c: &mut Criterion) {
    let chunk = vec![0x5au8; 8 << 20];
    let mut g = c.benchmark_group("crc32c");
    g.throughput(Throughput::Bytes(chunk.len() as u64));
    g.bench_function("crc32c of an 8 MiB chunk", |b| b.iter(|| crc32c::crc32c(black_box(&chunk))));
    // Kept per chunk beside the crc32c when the origin publishes whole-object CRC-64s.
    g.bench_function("crc64nvme of an 8 MiB chunk", |b| {
        b.iter(|| crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, black_box(&chunk)))
    });
    g.bench_function("combine 1000 chunk crc64s", |b| {
        b.iter(|| {
            (0..1000u64).fold(0u64, |acc, i| crc_fast::checksum_combine(crc_fast::CrcAlgorithm::Crc64Nvme, acc, black_box(i), 8 << 20))
        })
    });
    g.finish();
}

fn placement(c: &mut Criterion) {
    let nodes: Vec<String> = (0..100).map(|i| format!("8c6d1f0e-0000-4000-8000-{i:012}")).collect();
    let object: Arc<str> = Arc::from("0123456789abcdef0123456789abcdef");
    let mut i = 0u64;
    c.bench_function("rendezvous owner over 100 peers", |b| {
        b.iter(|| {
            i += 1;
            black_box(owner(&ChunkKey { object: object.clone(), index: i }, &nodes))
        })
    });
}

fn splitting(c: &mut Criterion) {
    let size = 7u64 << 30;
    c.bench_function("split a 16 MiB read at an odd offset into 8 MiB chunks", |b| {
        b.iter_batched(|| (), |_| black_box(split_read(black_box(3 << 30) + 12345, 16 << 20, size, 8 << 20)), BatchSize::SmallInput)
    });
}

criterion_group!(benches, chunk_index, checksum, placement, splitting);
criterion_main!(benches);
