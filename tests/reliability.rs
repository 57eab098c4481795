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
        assert!(poll_until(Duration::from_secs(10), || fs::metadata(a.path("m.bin")).is_ok_and(|m| m.len() == v2.len() as u64)), "{mode}: the new version never showed");

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
