//! A warm cache that survives restarts: chunks in tmpfs are reused after SIGTERM or SIGKILL,
//! each re-verified; a chunk corrupted while the agent was down is dropped and fetched again.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::*;

/// An origin with one file, read fully by a first agent whose chunks all reached memory, and
/// that agent stopped (SIGTERM, or SIGKILL when `kill`), its cache dir and mountpoint kept.
struct Stopped {
    _src: tempfile::TempDir,
    _work: tempfile::TempDir,
    source: String,
    mountpoint: std::path::PathBuf,
    cache: std::path::PathBuf,
    data: Vec<u8>,
}

const ARGS: [&str; 2] = ["--chunk-size", "4MiB"];

fn read_then_stop(name: &str, size: usize, seed: u64, kill: bool) -> Stopped {
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes(size, seed);
    fs::write(src.path().join(name), &data).unwrap();
    let work = tempfile::tempdir().unwrap();
    let cache = std::path::PathBuf::from(format!("/dev/shm/cachefs-restart-{}-{seed}", std::process::id()));
    common::remove_cache_dir(&cache);
    let st = Stopped { source: src.path().display().to_string(), mountpoint: work.path().join("mnt"), cache, data, _src: src, _work: work };
    let mut a = st.start();
    assert!(fs::read(a.path(name)).unwrap() == st.data);
    // Chunks are stored just after the read: wait until all of them are.
    assert!(poll_until(std::time::Duration::from_secs(10), || a.metric("cachefs_cache_bytes") >= st.data.len() as f64));
    if kill {
        a.kill9();
    } else {
        assert_eq!(a.stop(), Some(0));
    }
    std::mem::forget(a); // keep the cache dir for the next agent (Drop would remove it)
    st
}

impl Stopped {
    /// An agent on the same mountpoint and cache dir.
    fn start(&self) -> Agent {
        Agent::start_with(&self.source, &ARGS, self.mountpoint.clone(), self.cache.clone(), tempfile::tempdir().unwrap())
    }
}

fn restart_keeps_the_cache(kill: bool) {
    let st = read_then_stop("r.bin", (48 << 20) + 1234, 141 + kill as u64, kill);
    let b = st.start();
    assert!(b.log_text().contains("reused the warm cache"), "log:\n{}", b.log_text());
    assert_eq!(b.metric("cachefs_cache_bytes"), st.data.len() as f64);
    assert!(fs::read(b.path("r.bin")).unwrap() == st.data);
    assert_eq!(b.metric("cachefs_origin_bytes_total"), 0.0, "a restarted agent fetched again; log:\n{}", b.log_text());
    // The first agent backed its cache directory (under /dev/shm) with huge pages; the mount
    // outlived it, and the second found its warm cache there.
    let opts = mount_options(&st.cache).unwrap_or_default();
    assert!(opts.contains("huge=within_size"), "the cache dir is not a huge-page tmpfs: {opts:?}");
    assert!(b.log_text().contains("on a tmpfs with huge pages"), "log:\n{}", b.log_text());
    let huge = fs::read_to_string("/proc/meminfo").unwrap().lines().find_map(|l| l.strip_prefix("ShmemHugePages:").map(str::to_string));
    let kib: u64 = huge.and_then(|h| h.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0);
    assert!(kib >= 40 << 10, "the cached chunks are not in huge pages: ShmemHugePages {kib} kB");
}

/// The options of the mount at `p` (None: nothing is mounted there).
fn mount_options(p: &std::path::Path) -> Option<String> {
    let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
    let p = p.display().to_string();
    mounts.lines().rfind(|l| l.split(' ').nth(1) == Some(p.as_str())).and_then(|l| l.split(' ').nth(3)).map(str::to_string)
}

/// `--cache-huge-pages false` leaves the cache directory a plain directory of /dev/shm.
#[test]
fn huge_pages_can_be_turned_off() {
    if !fuse_available("huge_pages_can_be_turned_off") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    fs::write(src.path().join("s.bin"), random_bytes(4 << 20, 77)).unwrap();
    let a = Agent::start(&src.path().display().to_string(), &["--cache-huge-pages", "false"]);
    assert!(fs::read(a.path("s.bin")).unwrap() == random_bytes(4 << 20, 77));
    assert_eq!(mount_options(&a.cache_dir), None, "a tmpfs was mounted on the cache dir");
    assert!(!a.log_text().contains("mounted a tmpfs"), "log:\n{}", a.log_text());
    let b = Agent::start(&src.path().display().to_string(), &[]);
    assert!(mount_options(&b.cache_dir).is_some_and(|o| o.contains("huge=within_size")), "log:\n{}", b.log_text());
}

#[test]
fn sigterm_restart_reuses_cached_chunks() {
    if !fuse_available("sigterm_restart_reuses_cached_chunks") {
        return;
    }
    restart_keeps_the_cache(false);
}

#[test]
fn sigkill_restart_reuses_cached_chunks() {
    if !fuse_available("sigkill_restart_reuses_cached_chunks") {
        return;
    }
    restart_keeps_the_cache(true);
}

#[test]
fn chunk_corrupted_while_down_is_dropped_and_refetched() {
    if !fuse_available("chunk_corrupted_while_down_is_dropped_and_refetched") {
        return;
    }
    let st = read_then_stop("c.bin", 20 << 20, 151, false);

    // Flip a byte of chunk 2 in the tmpfs data file while no agent runs.
    let file = fs::read_dir(&st.cache).unwrap().map(|e| e.unwrap().path()).find(|p| p.to_string_lossy().ends_with(".chunks")).unwrap();
    let f = fs::OpenOptions::new().read(true).write(true).open(&file).unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, (8 << 20) + 100).unwrap();
    f.write_all_at(&[b[0] ^ 0x5a], (8 << 20) + 100).unwrap();
    drop(f);

    let b = st.start();
    assert!(b.log_text().contains("does not match its checksum"), "log:\n{}", b.log_text());
    assert!(fs::read(b.path("c.bin")).unwrap() == st.data, "a corrupted cached chunk was served");
    assert_eq!(b.metric("cachefs_origin_bytes_total"), (4 << 20) as f64, "exactly the bad chunk is fetched again");
}
