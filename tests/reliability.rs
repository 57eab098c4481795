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
