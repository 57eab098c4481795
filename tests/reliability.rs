//! Failure modes a fleet meets that the happy path never shows: two agents on one cache
//! directory, objects changing under open files, the memory an agent may use.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A second agent given a cache directory already in use exits with a clear error, and the first
/// keeps its cache: not one chunk is fetched again.
#[test]
fn a_second_agent_on_one_cache_dir_is_refused() {
    if !fuse_available("a_second_agent_on_one_cache_dir_is_refused") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes((12 << 20) + 77, 1301);
    fs::write(src.path().join("m.bin"), &data).unwrap();
    let source = src.path().display().to_string();
    let a = Agent::start(&source, &["--chunk-size", "1MiB"]);
    assert!(fs::read(a.path("m.bin")).unwrap() == data);
    assert!(poll_until(Duration::from_secs(10), || a.metric("cachefs_cache_bytes") >= data.len() as f64));
    let origin_before = a.metric("cachefs_origin_bytes_total");

    let work = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["mount", "--source", &source, "--chunk-size", "1MiB", "--cache-size", "1GiB"])
        .args(["--mountpoint", &work.path().join("mnt").display().to_string()])
        .args(["--cache-dir", &a.cache_dir.display().to_string()])
        .args(["--admin", &format!("127.0.0.1:{}", free_port())])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second agent started; stderr:\n{err}");
    assert!(err.contains("in use by another cachefs agent"), "stderr:\n{err}");
    assert!(err.lines().filter(|l| l.contains("in use")).count() >= 1 && !err.contains("panicked"), "stderr:\n{err}");
    assert!(!is_mounted(&work.path().join("mnt")));

    // The first agent lost nothing.
    assert!(fs::read(a.path("m.bin")).unwrap() == data);
    assert_eq!(a.metric("cachefs_origin_bytes_total"), origin_before);
    assert_eq!(a.metric("cachefs_cache_bytes"), data.len() as f64);
}

/// An object changed at the origin while a file of it is open: the open file keeps reading the
/// old version, a new open reads the new one, interleaved, through the kernel's page cache (and
/// with passthrough); each reports its own size. Two versions never mix.
#[test]
fn versions_never_mix_through_the_page_cache() {
    if !fuse_available("versions_never_mix_through_the_page_cache") {
        return;
    }
    use std::io::{Read, Seek, SeekFrom};
    for mode in ["--no-passthrough", "--passthrough-default"] {
        let src = tempfile::tempdir().unwrap();
        let (v1, v2) = (random_bytes((8 << 20) + 333, 1401), random_bytes((6 << 20) + 4444, 1402));
        let file = src.path().join("m.bin");
        fs::write(&file, &v1).unwrap();
        let mut args = vec!["--chunk-size", "1MiB", "--catalog-ttl", "1"];
        if mode == "--no-passthrough" {
            args.push(mode);
        }
        let a = Agent::start(&src.path().display().to_string(), &args);
        // All of v1 in memory: opens from now on may keep the page cache.
        assert!(fs::read(a.path("m.bin")).unwrap() == v1);
        let mut old = fs::File::open(a.path("m.bin")).unwrap();
        let mut head = vec![0u8; 4096];
        old.read_exact(&mut head).unwrap();
        assert!(head == v1[..4096]);

        let tmp = src.path().join(".m.bin.tmp");
        fs::write(&tmp, &v2).unwrap();
        fs::rename(&tmp, &file).unwrap();
        assert!(
            poll_until(Duration::from_secs(10), || fs::metadata(a.path("m.bin")).is_ok_and(|m| m.len() == v2.len() as u64)),
            "{mode}: the new version never showed"
        );

        let mut new = fs::File::open(a.path("m.bin")).unwrap();
        let read_all = |f: &mut fs::File| {
            let mut v = Vec::new();
            f.seek(SeekFrom::Start(0)).unwrap();
            f.read_to_end(&mut v).unwrap();
            v
        };
        for round in 0..2 {
            assert!(read_all(&mut new) == v2, "{mode} round {round}: the new open did not read the new version");
            assert!(read_all(&mut old) == v1, "{mode} round {round}: the open file read bytes of another version");
        }
        assert_eq!(old.metadata().unwrap().len(), v1.len() as u64, "{mode}");
        assert_eq!(new.metadata().unwrap().len(), v2.len() as u64, "{mode}");
        assert!(fs::read(a.path("m.bin")).unwrap() == v2, "{mode}");
    }
}

/// The status entry of the peer at `addr`.
fn peer_status(a: &Agent, addr: &str) -> serde_json::Value {
    let (_, body) = http_get(a.admin, "/status").expect("status");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["peers"].as_array().and_then(|ps| ps.iter().find(|p| p["addr"] == addr).cloned()).unwrap_or_default()
}

/// A peer that answers Hello and claims every chunk but stalls mid-stream: reads still answer
/// with the right bytes within the read deadline (the peers' share of it runs out, the healthy
/// origin answers), and the peer's Hellos do not put it back in use.
#[test]
fn a_stalling_peer_costs_no_read_while_the_origin_is_healthy() {
    if !fuse_available("a_stalling_peer_costs_no_read_while_the_origin_is_healthy") {
        return;
    }
    use common::fake_peer::{FakePeer, Misbehave};
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes((6 << 20) + 999, 1501);
    fs::write(src.path().join("m.bin"), &data).unwrap();
    let source = src.path().display().to_string();
    let fake = FakePeer::start(&source, 1 << 20, Misbehave::Stall);
    let a = Agent::start(&source, &["--chunk-size", "1MiB", "--read-timeout", "4", "--peers", &fake.addr]);
    assert_eq!(peer_status(&a, &fake.addr)["state"], "live", "the fake peer was not taken into use");

    assert!(fs::read(a.path("m.bin")).unwrap() == data, "the read failed or returned wrong bytes; log:\n{}", a.log_text());
    assert!(fake.reads.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the stalling peer was never asked");
    assert_eq!(a.metric("cachefs_read_errors_total"), 0.0);
    assert_eq!(a.metric("cachefs_origin_bytes_total"), data.len() as f64);

    // Probes (every 2 s) answer; the data failure stands.
    let hellos = fake.hellos.load(std::sync::atomic::Ordering::SeqCst);
    assert!(poll_until(Duration::from_secs(10), || fake.hellos.load(std::sync::atomic::Ordering::SeqCst) >= hellos + 2));
    let st = peer_status(&a, &fake.addr);
    assert!(st["data_failures"].as_u64().unwrap_or(0) >= 1, "a Hello cleared the data failure: {st}");
}

/// A peer that answers probes but never an inventory request delays no read but the first:
/// answers older than a second are refreshed in the background while readers use what is
/// known (the refresh used to hold the object's lock across the wait, and the reader that
/// triggered it waited too: every read a second apart stalled the inventory timeout, 2 s).
#[test]
fn a_stuck_peer_does_not_stall_the_reads_of_an_object() {
    if !fuse_available("a_stuck_peer_does_not_stall_the_reads_of_an_object") {
        return;
    }
    use common::fake_peer::{FakePeer, Misbehave};
    use std::os::unix::fs::FileExt;
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes(32 << 20, 1503);
    fs::write(src.path().join("m.bin"), &data).unwrap();
    let source = src.path().display().to_string();
    let fake = FakePeer::start(&source, 1 << 20, Misbehave::Unresponsive);
    let h_listen = format!("127.0.0.1:{}", free_port());
    let h = Agent::start(&source, &["--chunk-size", "1MiB", "--listen", &h_listen]);
    assert!(fs::read(h.path("m.bin")).unwrap() == data, "the holder read wrong bytes");
    let peers = format!("{h_listen},{}", fake.addr);
    let r = Agent::start(&source, &["--chunk-size", "1MiB", "--read-timeout", "30", "--peers", &peers]);
    assert_eq!(peer_status(&r, &fake.addr)["state"], "live", "the stuck peer was not taken into use");

    // One small read in each of ten chunks, far apart (no readahead), 1.2 s apart (stale answers).
    let f = fs::File::open(r.path("m.bin")).unwrap();
    let mut took = Vec::new();
    for i in 0..10u64 {
        let at = (i * 3 + 1) << 20;
        let mut buf = [0u8; 4096];
        let t = std::time::Instant::now();
        f.read_exact_at(&mut buf, at).unwrap();
        took.push(t.elapsed());
        assert!(buf[..] == data[at as usize..at as usize + 4096], "wrong bytes at {at}");
        std::thread::sleep(Duration::from_millis(1200));
    }
    eprintln!("MEASURED read times with a stuck peer: {took:?}");
    let stalled = took[1..].iter().filter(|t| **t >= Duration::from_millis(1500)).count();
    assert!(stalled <= 1, "{stalled} of 9 reads waited for the stuck peer: {took:?}; log:\n{}", r.log_text());
    assert_eq!(r.metric("cachefs_origin_bytes_total"), 0.0, "the holder was not used");
    assert!(fake.hellos.load(std::sync::atomic::Ordering::SeqCst) >= 1);
}

/// A chunk a peer asks this agent to fill is fetched from the origin, never forwarded to
/// another peer (no chains, no cycles), even when another peer claims to hold it.
#[test]
fn a_fill_asked_for_by_a_peer_is_never_forwarded() {
    if !fuse_available("a_fill_asked_for_by_a_peer_is_never_forwarded") {
        return;
    }
    use cachefs::peer::proto::{peer_client::PeerClient, ReadChunkRequest};
    use common::fake_peer::{FakePeer, Misbehave};
    use std::sync::atomic::Ordering::SeqCst;
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes((8 << 20) + 5, 1502);
    fs::write(src.path().join("m.bin"), &data).unwrap();
    let source = src.path().display().to_string();
    let fake = FakePeer::start(&source, 1 << 20, Misbehave::Refuse);
    let listen = format!("127.0.0.1:{}", free_port());
    let a = Agent::start(&source, &["--chunk-size", "1MiB", "--listen", &listen, "--peers", &fake.addr]);
    // A local read: the agent asks the fake's inventory (and is refused the chunk).
    let mut f = fs::File::open(a.path("m.bin")).unwrap();
    let mut head = [0u8; 100];
    std::io::Read::read_exact(&mut f, &mut head).unwrap();
    assert!(head[..] == data[..100]);
    let object = fake.seen.lock().unwrap().clone().expect("the agent never asked the fake peer's inventory");
    // Readahead settles first (its fetches must not count for the fill below).
    let mut last = -1.0;
    assert!(poll_until(Duration::from_secs(10), || {
        std::thread::sleep(Duration::from_millis(300));
        let now = a.metric("cachefs_origin_bytes_total");
        std::mem::replace(&mut last, now) == now
    }));
    let reads_before = fake.reads.load(SeqCst);
    let origin_before = a.metric("cachefs_origin_bytes_total");

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let got = rt.block_on(async {
        let mut c = PeerClient::connect(format!("http://{listen}")).await.unwrap();
        let req =
            ReadChunkRequest { object: Some(object), index: 6, chunk_size: 1 << 20, allow_fill: true, protocol: cachefs::peer::PROTOCOL };
        let mut s = c.read_chunk(req).await.expect("fill refused").into_inner();
        let mut got = Vec::new();
        while let Some(m) = s.message().await.unwrap() {
            got.extend_from_slice(&m.data);
        }
        got
    });
    assert!(got[..] == data[6 << 20..7 << 20], "wrong bytes for the filled chunk");
    assert_eq!(fake.reads.load(SeqCst), reads_before, "the fill was forwarded to another peer");
    assert_eq!(a.metric("cachefs_origin_bytes_total") - origin_before, (1 << 20) as f64, "the fill did not come from the origin");
}

/// Fill requests make this agent fetch from the origin (and fill its cache) for any caller, so
/// at most 32 run at once: with the origin holding every GET, 64 fill requests for distinct
/// chunks get 32 RESOURCE_EXHAUSTED within about a second (before, all 64 waited on the origin),
/// and the 32 admitted ones answer the right bytes once it answers.
#[test]
fn fills_for_peers_are_bounded() {
    if !fuse_available("fills_for_peers_are_bounded") {
        return;
    }
    use cachefs::peer::proto::{peer_client::PeerClient, ReadChunkRequest};
    use common::fake_peer::{FakePeer, Misbehave};
    use common::fake_s3::{self, FakeS3};
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
    let data = std::sync::Arc::new(random_bytes(96 << 20, 1504));
    let s3 = FakeS3::start("bkt", "p/m.bin", data.to_vec());
    s3.set(fake_s3::SERVE);
    let fake = FakePeer::start("s3://bkt/p", 1 << 20, Misbehave::Empty);
    let listen = format!("127.0.0.1:{}", free_port());
    let args = s3.agent_args(&["--chunk-size", "1MiB", "--listen", &listen, "--peers", &fake.addr]);
    let a = Agent::start("s3://bkt/p", &fake_s3::strs(&args));
    let mut head = [0u8; 100];
    std::io::Read::read_exact(&mut fs::File::open(a.path("m.bin")).unwrap(), &mut head).unwrap();
    let object = fake.seen.lock().unwrap().clone().expect("the agent never asked the fake peer's inventory");
    s3.set(fake_s3::HOLD);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let refused = std::sync::Arc::new(AtomicU64::new(0));
    let (early, results) = rt.block_on(async {
        let client = PeerClient::connect(format!("http://{listen}")).await.unwrap();
        let asks: Vec<_> = (24..88u64)
            .map(|index| {
                let (mut c, object, refused) = (client.clone(), object.clone(), refused.clone());
                tokio::spawn(async move {
                    let req = ReadChunkRequest {
                        object: Some(object),
                        index,
                        chunk_size: 1 << 20,
                        allow_fill: true,
                        protocol: cachefs::peer::PROTOCOL,
                    };
                    let mut s = match c.read_chunk(req).await {
                        Ok(r) => r.into_inner(),
                        Err(st) => {
                            refused.fetch_add((st.code() == tonic::Code::ResourceExhausted) as u64, SeqCst);
                            return (index, Err(st.code()));
                        }
                    };
                    let mut got = Vec::new();
                    while let Ok(Some(m)) = s.message().await {
                        got.extend_from_slice(&m.data);
                    }
                    (index, Ok(got))
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_secs(4)).await;
        let early = refused.load(SeqCst);
        s3.set(fake_s3::SERVE);
        (early, futures::future::join_all(asks).await)
    });
    eprintln!("MEASURED {early} of 64 fill requests refused while the origin held");
    assert_eq!(early, 32, "fills for peers are not bounded to 32 at once");
    let mut served = 0;
    for r in results {
        let (index, r) = r.unwrap();
        match r {
            Ok(got) => {
                let at = (index << 20) as usize;
                assert!(got[..] == data[at..at + (1 << 20)], "wrong bytes for chunk {index}");
                served += 1;
            }
            Err(code) => assert_eq!(code, tonic::Code::ResourceExhausted, "chunk {index}"),
        }
    }
    assert_eq!(served, 32, "the admitted fills did not all answer");
}

/// A small tmpfs mounted for one test (Docker's `/dev/shm` is 64 MiB), unmounted on drop.
struct SmallTmpfs(tempfile::TempDir);

impl SmallTmpfs {
    fn new(size: &str) -> SmallTmpfs {
        let d = tempfile::tempdir().unwrap();
        let ok =
            Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"]).arg(d.path()).status().unwrap().success();
        assert!(ok, "cannot mount a tmpfs");
        SmallTmpfs(d)
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        lazy_unmount(self.0.path());
    }
}

/// The default cache size fits the cache directory's filesystem, an explicit size it cannot hold
/// is refused at start, and a filesystem that fills up under the agent lowers the budget: reads
/// stay correct, chunks are evicted, nothing fails.
#[test]
fn the_cache_fits_a_small_tmpfs() {
    if !fuse_available("the_cache_fits_a_small_tmpfs") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes((40 << 20) + 12345, 1601);
    fs::write(src.path().join("m.bin"), &data).unwrap();
    let source = src.path().display().to_string();

    // Default size: within the 16 MiB tmpfs.
    let shm = SmallTmpfs::new("16m");
    let dir = shm.0.path().join("cache");
    let a = Agent::start_with(
        &source,
        &["--chunk-size", "1MiB", "--cache-size", "auto"],
        tempfile::tempdir().unwrap().path().join("mnt"),
        dir.clone(),
        tempfile::tempdir().unwrap(),
    );
    let cap = a.metric("cachefs_cache_capacity_bytes");
    assert!(cap > 0.0 && cap <= (16 << 20) as f64, "default cache size {cap} does not fit the 16 MiB tmpfs");
    assert!(fs::read(a.path("m.bin")).unwrap() == data);
    assert!(a.metric("cachefs_evictions_total") > 0.0);
    assert_eq!(a.metric("cachefs_read_errors_total"), 0.0);
    drop(a);

    // An explicit size the tmpfs cannot hold: a clear error at start.
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["mount", "--source", &source, "--cache-size", "1GiB"])
        .args(["--mountpoint", &work.path().join("mnt").display().to_string()])
        .args(["--cache-dir", &dir.display().to_string(), "--admin", &format!("127.0.0.1:{}", free_port())])
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("free space of the cache directory's filesystem"), "stderr:\n{err}");

    // The tmpfs fills up under a running agent: the budget comes down, reads stay right.
    let a = Agent::start_with(
        &source,
        &["--chunk-size", "1MiB", "--cache-size", "12MiB"],
        work.path().join("mnt"),
        dir.clone(),
        tempfile::tempdir().unwrap(),
    );
    fs::write(shm.0.path().join("someone-else.bin"), vec![7u8; 10 << 20]).unwrap();
    for _ in 0..2 {
        assert!(fs::read(a.path("m.bin")).unwrap() == data, "log:\n{}", a.log_text());
    }
    assert_eq!(a.metric("cachefs_read_errors_total"), 0.0);
    let cap = a.metric("cachefs_cache_capacity_bytes");
    assert!(cap < (12 << 20) as f64, "the budget was not lowered: {cap}");
    assert!(a.metric("cachefs_cache_bytes") <= cap);
    assert!(a.log_text().contains("filesystem is full"), "log:\n{}", a.log_text());
}

/// An origin that answers every ranged GET with the whole object: a file read whole costs about
/// its size in egress (one stream fills every chunk it passes), not its size times its chunk
/// count; random reads afterwards come from memory; the bytes are right.
#[test]
fn an_origin_ignoring_range_is_streamed_once() {
    use common::fake_s3::{self, FakeS3};
    use std::os::unix::fs::FileExt;
    if !fuse_available("an_origin_ignoring_range_is_streamed_once") {
        return;
    }
    let data = random_bytes((48 << 20) + 4321, 1309);
    let s3 = FakeS3::start("bkt", "p/m.bin", data.clone());
    s3.set(fake_s3::IGNORE_RANGE);
    let args = s3.agent_args(&["--chunk-size", "2MiB", "--no-passthrough"]);
    let a = Agent::start("s3://bkt/p", &fake_s3::strs(&args));
    let got = fs::read(a.path("m.bin")).unwrap_or_else(|e| panic!("{e}; log:\n{}", a.log_text()));
    assert!(got == data, "wrong bytes; log:\n{}", a.log_text());
    let sent = s3.sent.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("origin sent {sent} bytes for a {} byte file in {} GETs", data.len(), s3.gets.load(std::sync::atomic::Ordering::SeqCst));
    // Reading chunk k from byte 0 each time would be about 12.5x the size (25 chunks).
    assert!(
        sent < 2 * data.len() as u64,
        "origin sent {sent} bytes for a {} byte file; gets {}",
        data.len(),
        s3.gets.load(std::sync::atomic::Ordering::SeqCst)
    );
    assert!(poll_until(Duration::from_secs(10), || a.metric("cachefs_cache_bytes") >= data.len() as f64), "not all chunks stored");
    let before = s3.sent.load(std::sync::atomic::Ordering::SeqCst);
    let f = fs::File::open(a.path("m.bin")).unwrap();
    // SAFETY: a valid open descriptor; the kernel forgets its cached pages of the file.
    unsafe { libc::posix_fadvise(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut buf = vec![0u8; 300_000];
    for i in 0..40u64 {
        let off = (i * 7_919_113) % (data.len() as u64 - buf.len() as u64);
        f.read_exact_at(&mut buf, off).unwrap();
        assert!(buf[..] == data[off as usize..off as usize + buf.len()], "wrong bytes at {off}");
    }
    assert_eq!(s3.sent.load(std::sync::atomic::Ordering::SeqCst), before, "random reads went to the origin");
}

/// Keys that cannot be file paths here (`a//b`, `.` and `..` segments, control characters) are
/// skipped with one warning; the rest of the listing, over several pages, is served.
#[test]
fn odd_keys_do_not_take_the_listing_down() {
    use common::fake_s3::{self, FakeS3};
    if !fuse_available("odd_keys_do_not_take_the_listing_down") {
        return;
    }
    let data = random_bytes((3 << 20) + 5, 1311);
    let odd = ["p/a//b.bin", "p/./x.bin", "p/c/../d.bin", "p/ctl\u{1}.bin", "p/e/./f.bin"];
    let s3 = FakeS3::start_listing("bkt", "p/m.bin", data.clone(), &odd);
    let args = s3.agent_args(&["--chunk-size", "1MiB"]);
    let a = Agent::start("s3://bkt/p", &fake_s3::strs(&args));
    assert!(fs::read(a.path("m.bin")).unwrap() == data);
    let names: Vec<String> = fs::read_dir(&a.mountpoint).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["m.bin".to_string()], "the mount shows {names:?}");
    let log = a.log_text();
    let warnings: Vec<&str> = log.lines().filter(|l| l.contains("skipped object keys")).collect();
    assert_eq!(warnings.len(), 1, "log:\n{log}");
    assert!(warnings[0].contains("count=5") && warnings[0].contains("a//b.bin"), "{}", warnings[0]);
}
