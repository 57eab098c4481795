//! The cache core without a mount, against `object_store::memory::InMemory` behind a wrapping
//! store that counts GETs and can delay, fail, or ignore ranges like a misbehaving server.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt, PutMultipartOptions,
    PutOptions, PutPayload, PutResult,
};
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

use cachefs::cache::{MemoryTier, Reader, ReaderOptions};
use cachefs::catalog::{Catalog, ObjectVersion};
use cachefs::fs::{FsCore, OpenMode};
use cachefs::metrics::{Metrics, Tier};
use cachefs::origin::Origin;
use cachefs::Error;

#[derive(Debug, Default)]
struct Knobs {
    gets: AtomicU64,
    fail: AtomicBool,
    widen: AtomicBool,
    non_partial: AtomicBool,
    delay_ms: AtomicU64,
}

/// InMemory plus knobs.
#[derive(Debug)]
struct TestStore {
    inner: InMemory,
    k: Arc<Knobs>,
}

impl fmt::Display for TestStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TestStore")
    }
}

#[async_trait::async_trait]
impl ObjectStore for TestStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }
    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }
    async fn get_opts(&self, location: &Path, mut options: GetOptions) -> object_store::Result<GetResult> {
        self.k.gets.fetch_add(1, Ordering::SeqCst);
        let delay = self.k.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if self.k.fail.load(Ordering::SeqCst) {
            return Err(object_store::Error::Generic { store: "test", source: "injected failure".into() });
        }
        if self.k.non_partial.load(Ordering::SeqCst) && options.range.is_some() {
            // What object_store's HTTP client reports when a server answers a range with 200.
            return Err(object_store::Error::Generic { store: "S3", source: "Received non-partial response when range requested".into() });
        }
        if self.k.widen.load(Ordering::SeqCst) {
            // Answer a ranged GET with the whole object, as some servers do.
            options.range = None;
        }
        self.inner.get_opts(location, options).await
    }
    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }
    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }
    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }
    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

struct Rig {
    _dir: tempfile::TempDir,
    store: Arc<TestStore>,
    k: Arc<Knobs>,
    metrics: Arc<Metrics>,
    catalog: Arc<Catalog>,
    origin: Arc<Origin>,
    reader: Arc<Reader>,
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    r.fill(&mut v[..]);
    v
}

async fn rig(files: &[(&str, &[u8])], chunk: u64, capacity: u64, timeout: Duration) -> Rig {
    let k = Arc::new(Knobs::default());
    let store = Arc::new(TestStore { inner: InMemory::new(), k: k.clone() });
    for (name, bytes) in files {
        store.put(&Path::from(format!("models/{name}")), Bytes::copy_from_slice(bytes).into()).await.unwrap();
    }
    let metrics = Arc::new(Metrics::new());
    let origin = Arc::new(Origin::new(store.clone(), Path::from("models"), 8, metrics.clone()));
    let dir = tempfile::tempdir().unwrap();
    let memory = Arc::new(MemoryTier::new(dir.path(), chunk, capacity, metrics.clone()).unwrap());
    let storage = cachefs::agent::Storage::from_parts(origin.clone(), memory).await.unwrap();
    let opts = ReaderOptions { chunk_size: chunk, read_timeout: timeout, readahead_budget: 4 * chunk };
    let reader = storage.reader(None, None, opts, &metrics, &Default::default(), &Default::default());
    let catalog = storage.catalog.clone();
    Rig { _dir: dir, store, k, metrics, catalog, origin, reader }
}

impl Rig {
    fn obj(&self, key: &str) -> Arc<ObjectVersion> {
        self.catalog.object_at(key).unwrap()
    }
}

fn clamp(src: &[u8], off: u64, len: u64) -> &[u8] {
    let s = (off as usize).min(src.len());
    let e = (off.saturating_add(len) as usize).min(src.len());
    &src[s..e]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    #[test]
    fn random_reads_equal_source(size in 0usize..50_000, reads in proptest::collection::vec((0u64..60_000, 0u64..20_000), 1..12), cap_chunks in 1u64..6) {
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let src = data(size, size as u64);
            let r = rig(&[("f.bin", &src)], 4096, cap_chunks * 4096, Duration::from_secs(10)).await;
            let o = r.obj("f.bin");
            for (off, len) in reads {
                let got = r.reader.read(&o, off, len).await.unwrap();
                prop_assert_eq!(&got[..], clamp(&src, off, len));
                if let Some(c) = r.reader.read_cached(&o, off, len) {
                    prop_assert_eq!(&c[..], clamp(&src, off, len));
                }
                prop_assert!(r.reader.memory().used() <= cap_chunks * 4096);
            }
            Ok(())
        })?;
    }
}

#[tokio::test]
async fn budget_holds_under_random_access() {
    let src = data(3 << 20, 7);
    let r = rig(&[("big", &src)], 64 << 10, 5 * (64 << 10), Duration::from_secs(10)).await;
    let o = r.obj("big");
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for _ in 0..400 {
        let off = rng.gen_range(0..src.len() as u64);
        let len = rng.gen_range(1..300_000);
        let got = r.reader.read(&o, off, len).await.unwrap();
        assert_eq!(&got[..], clamp(&src, off, len));
        assert!(r.reader.memory().used() <= 5 * (64 << 10));
    }
    // Chunks are stored just after they are served: wait for the last writes to land.
    let evicted = async {
        while r.metrics.evictions.get() == 0 {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), evicted).await.expect("evictions happen");
    assert!(r.reader.memory().used() <= 5 * (64 << 10));
}

#[tokio::test]
async fn concurrent_cold_reads_make_one_get() {
    let src = data(1 << 20, 3);
    let r = rig(&[("one", &src)], 1 << 20, 64 << 20, Duration::from_secs(10)).await;
    r.k.delay_ms.store(200, Ordering::SeqCst);
    let o = r.obj("one");
    let before = r.k.gets.load(Ordering::SeqCst);
    let reads = (0..16u64).map(|i| {
        let (reader, o) = (r.reader.clone(), o.clone());
        tokio::spawn(async move { reader.read(&o, i * 4096, 4096).await })
    });
    for (i, h) in futures::future::join_all(reads).await.into_iter().enumerate() {
        let got = h.unwrap().unwrap();
        assert_eq!(&got[..], &src[i * 4096..(i + 1) * 4096]);
    }
    assert_eq!(r.k.gets.load(Ordering::SeqCst) - before, 1, "16 readers of one cold chunk → one GET");
    // The chunk is written to memory after the readers got their bytes.
    let stored = async {
        while !r.reader.memory().contains(&o, 0) {
            tokio::task::yield_now().await;
        }
    };
    tokio::time::timeout(Duration::from_secs(5), stored).await.expect("chunk stored");
    // Warm: no more GETs; bytes credited: the first pass to origin, the rest to memory.
    let got = r.reader.read(&o, 0, 1 << 20).await.unwrap();
    assert_eq!(&got[..], &src[..]);
    assert_eq!(r.k.gets.load(Ordering::SeqCst) - before, 1);
    assert_eq!(r.metrics.read_bytes_of(Tier::origin) + r.metrics.read_bytes_of(Tier::memory), 16 * 4096 + (1 << 20));
    assert_eq!(r.metrics.read_bytes_of(Tier::origin), 1 << 20);
}

#[tokio::test]
async fn server_ignoring_ranges_still_gives_exact_bytes() {
    let (src, other) = (data(200_000, 9), data(300_001, 10));
    let r = rig(&[("w", &src), ("n", &other)], 32 << 10, 1 << 20, Duration::from_secs(10)).await;
    r.k.widen.store(true, Ordering::SeqCst);
    let o = r.obj("w");
    for (off, len) in [(0u64, 10u64), (40_000, 70_000), (199_990, 100)] {
        let got = r.reader.read(&o, off, len).await.unwrap();
        assert_eq!(&got[..], clamp(&src, off, len));
    }
    // Directly, too: the origin cuts the wanted bytes out of the whole object.
    let b = r.origin.get_range(&o, 5..17).await.unwrap();
    assert_eq!(&b[..], &src[5..17]);
    // The HTTP stores refuse such an answer with an error, which the origin names...
    r.k.widen.store(false, Ordering::SeqCst);
    r.k.non_partial.store(true, Ordering::SeqCst);
    let e = r.origin.get_range(&o, 150_000..150_100).await.unwrap_err();
    assert!(matches!(e, cachefs::origin::OriginError::RangeIgnored), "{e:?}");
    // ...and the reader then streams the whole object once, filling every chunk it passes.
    let n = r.obj("n");
    let before = r.k.gets.load(Ordering::SeqCst);
    let got = r.reader.read(&n, 100_000, 10).await.unwrap();
    assert_eq!(&got[..], clamp(&other, 100_000, 10));
    for i in 0..=3 {
        assert!(r.reader.memory().contains(&n, i), "chunk {i} passed by the stream is not stored");
    }
    for (off, len) in [(0u64, 300_001u64), (299_000, 5_000), (7, 70_000)] {
        let got = r.reader.read(&n, off, len).await.unwrap();
        assert_eq!(&got[..], clamp(&other, off, len));
    }
    assert!(r.reader.memory().is_complete(&n));
    let gets = r.k.gets.load(Ordering::SeqCst) - before;
    assert!(gets <= 3, "{gets} GETs for one object of 10 chunks");
}

#[tokio::test]
async fn failing_origin_gives_an_error_in_bounded_time_and_the_next_read_retries() {
    let src = data(100_000, 5);
    let r = rig(&[("f", &src)], 64 << 10, 1 << 20, Duration::from_secs(3)).await;
    let o = r.obj("f");
    r.k.fail.store(true, Ordering::SeqCst);
    let t = std::time::Instant::now();
    let e = r.reader.read(&o, 0, 100).await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_) | Error::TimedOut(_)), "{e:?}");
    assert!(t.elapsed() < Duration::from_secs(5));
    // A hanging origin: the read deadline answers.
    r.k.fail.store(false, Ordering::SeqCst);
    r.k.delay_ms.store(60_000, Ordering::SeqCst);
    let e = r.reader.read(&o, 70_000, 100).await.unwrap_err();
    assert!(matches!(e, Error::TimedOut(_)), "{e:?}");
    r.k.delay_ms.store(0, Ordering::SeqCst);
    let got = r.reader.read(&o, 0, 100).await.unwrap();
    assert_eq!(&got[..], &src[..100]);
}

#[tokio::test]
async fn changed_object_new_opens_see_new_bytes_old_handles_never_mix() {
    let v1 = data(300_000, 1);
    let v2 = data(310_000, 2);
    let r = rig(&[("m.bin", &v1)], 64 << 10, 8 << 20, Duration::from_secs(5)).await;
    let core = FsCore::new(r.catalog.clone(), r.reader.clone());
    let ino = r.catalog.lookup(cachefs::catalog::ROOT_INO, "m.bin").unwrap().ino;
    let old = core.open(ino, false).unwrap();
    let h_old = core.handle(old.fh).unwrap();
    // The first chunk of the old version is cached; then the object changes at the origin.
    assert_eq!(&core.read(&h_old, 0, 1000).await.unwrap()[..], &v1[..1000]);
    r.store.put(&Path::from("models/m.bin"), Bytes::from(v2.clone()).into()).await.unwrap();
    let changes = r.catalog.apply(cachefs::agent::storage::list_versions(&r.origin).await.unwrap());
    assert_eq!(changes.changed, 1);
    assert_eq!(changes.retired.len(), 1);
    core.retire(&changes.retired);
    // The name now leads to a new inode; the old one is stale for opens, but still answers
    // getattr with its own version's size while a handle of it is open.
    assert!(matches!(core.open(ino, false), Err(Error::Stale(_))));
    let new_ino = core.lookup(cachefs::catalog::ROOT_INO, "m.bin").unwrap().ino;
    assert_ne!(new_ino, ino);
    let new = core.open(new_ino, false).unwrap();
    let h_new = core.handle(new.fh).unwrap();
    assert_eq!(core.getattr(new_ino, None).unwrap().size, v2.len() as u64);
    assert_eq!(core.getattr(ino, None).unwrap().size, v1.len() as u64);
    assert_eq!(&core.read(&h_new, 0, 310_000).await.unwrap()[..], &v2[..]);
    // Old handle: its cached chunk is still the old bytes; an uncached part is ESTALE, never v2.
    assert_eq!(&core.read(&h_old, 0, 1000).await.unwrap()[..], &v1[..1000]);
    match core.read(&h_old, 200_000, 1000).await {
        Err(Error::Stale(_)) => {}
        other => panic!("old handle must not see new bytes: {other:?}"),
    }
    assert!(matches!(core.open(new_ino, true), Err(Error::ReadOnly)));
    let memory = r.reader.memory();
    let old_file = memory.file_path(&h_old.obj);
    assert!(old_file.exists() && memory.open_files() == 2, "the old version is forgotten while a handle reads it");
    core.release(old.fh);
    assert!(matches!(core.getattr(ino, None), Err(Error::Stale(_))), "no handle left: the old inode is gone");
    // Its last reader gone, the old version leaves nothing behind: no file, no mapping, no chunk.
    assert_eq!(memory.open_files(), 1);
    assert!(!old_file.exists());
    assert!(!memory.contains(&h_old.obj, 0));
    assert_eq!(memory.used(), v2.len() as u64, "only the new version is held");
    // A version removed while nobody has it open is forgotten at once.
    r.store.delete(&Path::from("models/m.bin")).await.unwrap();
    let changes = r.catalog.apply(cachefs::agent::storage::list_versions(&r.origin).await.unwrap());
    core.release(new.fh);
    core.retire(&changes.retired);
    assert_eq!((memory.open_files(), memory.used()), (0, 0));
}

/// The core decides how a handle is served: not all in memory → uncached; all in memory →
/// cached, or (once the kernel agreed to passthrough) passthrough to the version's tmpfs file,
/// pinned until the handle is released or the adapter refuses it.
#[tokio::test]
async fn open_mode_and_pins() {
    let v = data(300_000, 7);
    let r = rig(&[("m.bin", &v)], 65536, 8 << 20, Duration::from_secs(5)).await;
    let core = FsCore::new(r.catalog.clone(), r.reader.clone());
    let ino = r.catalog.lookup(cachefs::catalog::ROOT_INO, "m.bin").unwrap().ino;
    let memory = r.reader.memory().clone();
    let cold = core.open(ino, false).unwrap();
    assert_eq!(cold.mode, OpenMode::Uncached);
    let h = core.handle(cold.fh).unwrap();
    // Reads run readahead whichever way they are answered; the whole file lands in memory.
    assert_eq!(&core.read(&h, 0, 300_000).await.unwrap()[..], &v[..]);
    let cached = core.open(ino, false).unwrap();
    assert_eq!(cached.mode, OpenMode::Cached, "no passthrough until the kernel agrees");
    core.enable_passthrough();
    // The kernel keeps one I/O mode per inode: no passthrough while other handles are open
    // without it (a passthrough open would fail with EIO).
    let beside = core.open(ino, false).unwrap();
    assert_eq!(beside.mode, OpenMode::Cached, "passthrough beside handles without it");
    assert!(!memory.is_pinned(&h.obj));
    // The handle's own version answers getattr through its handle.
    assert_eq!(core.getattr(ino, Some(cold.fh)).unwrap().size, 300_000);
    for fh in [cached.fh, beside.fh, cold.fh] {
        core.release(fh);
    }
    let pt = core.open(ino, false).unwrap();
    assert_eq!(pt.mode, OpenMode::Passthrough(memory.file_path(&h.obj)));
    assert!(memory.is_pinned(&h.obj));
    let refused = core.open(ino, false).unwrap();
    core.passthrough_refused(refused.fh);
    core.release(pt.fh);
    assert!(!memory.is_pinned(&h.obj), "released and refused handles hold no pin");
    core.release(refused.fh);
    let again = core.open(ino, false).unwrap();
    assert!(memory.is_pinned(&h.obj));
    core.release(again.fh);
    assert!(!memory.is_pinned(&h.obj));
}

#[tokio::test]
async fn zero_byte_file_and_reads_past_end() {
    let r = rig(&[("empty", b""), ("small", b"hello")], 4096, 1 << 20, Duration::from_secs(5)).await;
    assert!(r.reader.read(&r.obj("empty"), 0, 4096).await.unwrap().is_empty());
    assert_eq!(&r.reader.read(&r.obj("small"), 3, 4096).await.unwrap()[..], b"lo");
    assert!(r.reader.read(&r.obj("small"), 5, 4096).await.unwrap().is_empty());
    assert!(r.reader.read(&r.obj("small"), u64::MAX - 2, 4096).await.unwrap().is_empty());
}

/// A large directory is listed once per `opendir` and paged from that snapshot: a refresh that
/// removes half of it meanwhile does not shift the pages of a listing in progress.
#[tokio::test]
async fn an_open_directory_pages_through_one_snapshot() {
    let files: Vec<(String, Vec<u8>)> = (0..3000).map(|i| (format!("d/f{i:05}"), vec![1u8])).collect();
    let refs: Vec<(&str, &[u8])> = files.iter().map(|(k, v)| (k.as_str(), v.as_slice())).collect();
    let r = rig(&refs, 4096, 1 << 20, Duration::from_secs(5)).await;
    let core = FsCore::new(r.catalog.clone(), r.reader.clone());
    let d = core.lookup(cachefs::catalog::ROOT_INO, "d").unwrap().ino;
    let fh = core.opendir(d).unwrap();
    let first = core.readdir(d, fh).unwrap();
    assert_eq!(first.len(), 3002);
    // Half the files go away at the origin.
    for i in (0..3000).step_by(2) {
        r.store.delete(&Path::from(format!("models/d/f{i:05}"))).await.unwrap();
    }
    let changes = r.catalog.apply(cachefs::agent::storage::list_versions(&r.origin).await.unwrap());
    assert_eq!(changes.removed, 1500);
    let later = core.readdir(d, fh).unwrap();
    assert!(Arc::ptr_eq(&first, &later), "a listing in progress changed under its reader");
    core.releasedir(fh);
    let fh = core.opendir(d).unwrap();
    assert_eq!(core.readdir(d, fh).unwrap().len(), 1502, "a new opendir sees the refresh");
}

/// The kernel keeps several reads of one file in flight, so a sequential reader's requests may
/// arrive out of order; a read inside the window already fetched keeps readahead going.
#[tokio::test]
async fn reads_out_of_order_inside_the_window_keep_readahead() {
    let cs = 65536u64;
    let v = data(16 * cs as usize, 11);
    let r = rig(&[("m.bin", &v)], cs, 8 << 20, Duration::from_secs(5)).await;
    let core = FsCore::new(r.catalog.clone(), r.reader.clone());
    let ino = r.catalog.lookup(cachefs::catalog::ROOT_INO, "m.bin").unwrap().ino;
    let h = core.handle(core.open(ino, false).unwrap().fh).unwrap();
    for chunk in [0u64, 1, 2, 3, 6, 4, 5, 7] {
        let got = core.read(&h, chunk * cs, cs as u32).await.unwrap();
        assert_eq!(&got[..], clamp(&v, chunk * cs, cs));
    }
    // Chunk 11 is only fetched if the window survived the reads of chunks 6, 4 and 5.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.reader.read_cached(&h.obj, 11 * cs, cs).is_none() {
        assert!(std::time::Instant::now() < deadline, "readahead was reset by reads inside its window");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
