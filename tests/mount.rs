//! Real FUSE mounts of real agent processes over a `file://` origin (and a fake S3 endpoint for
//! failure injection). Needs root and /dev/fuse: skipped loudly without them, failed under CI=true.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::fake_s3::{self, FakeS3};
use common::*;

/// The generated origin: nested dirs, a 0-byte file, odd sizes, a 210 MiB file, a safetensors file.
fn make_source(dir: &Path, huge: bool) {
    write_random(&dir.join("a/b/c/deep.bin"), (3 << 20) + 17, 1);
    write_random(&dir.join("a/odd.bin"), (16 << 20) + 12_345, 2);
    fs::write(dir.join("empty"), b"").unwrap();
    fs::write(dir.join("top.txt"), b"hello cachefs\n").unwrap();
    if huge {
        write_random(&dir.join("big/huge.bin"), 210 << 20, 3);
    }
    fs::create_dir_all(dir.join("models")).unwrap();
    write_safetensors(&dir.join("models/model.safetensors"), 4);
}

fn walk(root: &Path, rel: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in fs::read_dir(root.join(rel)).unwrap() {
        let e = e.unwrap();
        let r = rel.join(e.file_name());
        out.push(r.clone());
        if e.file_type().unwrap().is_dir() {
            walk(root, &r, out);
        }
    }
}

fn errno_of<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    r.expect_err("operation should fail").raw_os_error().unwrap_or(-1)
}

fn drop_page_cache() {
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
}

#[test]
fn mounted_tree_bytes_errors_and_sigterm() {
    if !fuse_available("mounted_tree_bytes_errors_and_sigterm") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_source(src.path(), true);
    let mut a = Agent::start(&src.path().display().to_string(), &[]);

    // readdir and stat match, recursively.
    let (mut want, mut got) = (Vec::new(), Vec::new());
    walk(src.path(), Path::new(""), &mut want);
    walk(&a.mountpoint, Path::new(""), &mut got);
    want.sort();
    got.sort();
    assert_eq!(want, got, "same tree");
    for rel in &want {
        let (s, m) = (fs::metadata(src.path().join(rel)).unwrap(), fs::metadata(a.mountpoint.join(rel)).unwrap());
        assert_eq!(s.is_dir(), m.is_dir(), "{rel:?}");
        if s.is_file() {
            assert_eq!(s.len(), m.len(), "size of {rel:?}");
            assert_eq!(sha256_file(&src.path().join(rel)), sha256_file(&a.mountpoint.join(rel)), "bytes of {rel:?}");
        }
    }
    let names: BTreeSet<String> = fs::read_dir(a.path("a")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert_eq!(names, BTreeSet::from(["b".to_string(), "odd.bin".to_string()]));

    // Errors.
    assert_eq!(errno_of(fs::metadata(a.path("nope"))), libc::ENOENT);
    assert_eq!(errno_of(fs::metadata(a.path("a/nope/x"))), libc::ENOENT);
    assert_eq!(errno_of(fs::File::create(a.path("new.txt"))), libc::EROFS);
    assert_eq!(errno_of(fs::OpenOptions::new().write(true).open(a.path("top.txt"))), libc::EROFS);
    assert_eq!(errno_of(fs::remove_file(a.path("top.txt"))), libc::EROFS);
    assert_eq!(errno_of(fs::create_dir(a.path("d"))), libc::EROFS);
    assert_eq!(errno_of(fs::rename(a.path("top.txt"), a.path("t2"))), libc::EROFS);

    // mmap of a mounted file.
    let f = fs::File::open(a.path("a/odd.bin")).unwrap();
    // SAFETY: the file is read-only and not modified while mapped.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    assert_eq!(&map[..], &fs::read(src.path().join("a/odd.bin")).unwrap()[..]);
    drop(map);

    // A second full read comes from memory: no origin bytes.
    let origin_before = a.metric("cachefs_origin_bytes_total");
    let mem_before = a.metric("cachefs_read_bytes_total{tier=\"memory\"}");
    let pt_before = a.metric("cachefs_passthrough_opens_total");
    assert!(origin_before >= (210 << 20) as f64);
    drop_page_cache();
    assert_eq!(sha256_file(&src.path().join("big/huge.bin")), sha256_file(&a.path("big/huge.bin")));
    assert_eq!(a.metric("cachefs_origin_bytes_total"), origin_before, "second read fetched from origin");
    // Served from memory: through passthrough (no FUSE reads), or through FUSE reads of memory.
    let by_memory = a.metric("cachefs_read_bytes_total{tier=\"memory\"}") >= mem_before + (200 << 20) as f64;
    let by_passthrough = a.metric("cachefs_passthrough_opens_total") > pt_before;
    assert!(by_memory || by_passthrough);

    // /status is JSON with the same numbers.
    let (code, body) = http_get(a.admin, "/status").unwrap();
    assert_eq!(code, 200);
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["origin"]["bytes"].as_f64().unwrap(), origin_before);
    assert_eq!(http_get(a.admin, "/healthz").unwrap().0, 200);

    // SIGTERM: clean unmount, exit 0.
    let mp = a.mountpoint.clone();
    assert_eq!(a.stop(), Some(0), "log:\n{}", a.log_text());
    assert!(!is_mounted(&mp), "still mounted after SIGTERM");
}

#[test]
fn eight_threads_random_ranges() {
    if !fuse_available("eight_threads_random_ranges") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let data = std::sync::Arc::new(random_bytes((64 << 20) + 999, 11));
    fs::write(src.path().join("r.bin"), &data[..]).unwrap();
    let a = Agent::start(&src.path().display().to_string(), &["--chunk-size", "1MiB"]);
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let (p, data) = (a.path("r.bin"), data.clone());
            std::thread::spawn(move || {
                use rand::{Rng, SeedableRng};
                let f = fs::File::open(&p).unwrap();
                let mut rng = rand::rngs::StdRng::seed_from_u64(t);
                for _ in 0..150 {
                    let off = rng.gen_range(0..data.len() as u64 + 100);
                    let len = rng.gen_range(1..(3 << 20));
                    let mut buf = vec![0u8; len];
                    let mut n = 0;
                    while n < len {
                        let k = f.read_at(&mut buf[n..], off + n as u64).unwrap();
                        if k == 0 {
                            break;
                        }
                        n += k;
                    }
                    let s = (off as usize).min(data.len());
                    let e = (off as usize + len).min(data.len());
                    assert_eq!(n, e - s, "short read at {off}+{len}");
                    assert!(buf[..n] == data[s..e], "wrong bytes at {off}+{len}");
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(a.metric("cachefs_read_errors_total"), 0.0);
}

#[test]
fn cache_smaller_than_file_still_reads_correctly() {
    if !fuse_available("cache_smaller_than_file_still_reads_correctly") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("f.bin"), 100 << 20, 21);
    let a = Agent::start(&src.path().display().to_string(), &["--cache-size", "24MiB", "--chunk-size", "4MiB"]);
    let want = sha256_file(&src.path().join("f.bin"));
    for _ in 0..2 {
        drop_page_cache();
        assert_eq!(sha256_file(&a.path("f.bin")), want);
        assert!(a.metric("cachefs_cache_bytes") <= (24 << 20) as f64);
    }
    assert!(a.metric("cachefs_evictions_total") > 0.0);
    assert_eq!(a.metric("cachefs_cache_capacity_bytes"), (24 << 20) as f64);
    // The tmpfs file really gave memory back: its allocated blocks stay within the budget.
    let used: u64 =
        fs::read_dir(&a.cache_dir).unwrap().map(|e| std::os::unix::fs::MetadataExt::blocks(&e.unwrap().metadata().unwrap()) * 512).sum();
    assert!(used <= (24 << 20) + (4 << 20), "cache dir holds {used} bytes");
}

#[test]
fn failing_origin_gives_eio_in_bounded_time_then_retries() {
    if !fuse_available("failing_origin_gives_eio_in_bounded_time_then_retries") {
        return;
    }
    let data = random_bytes(3 << 20, 31);
    let s3 = FakeS3::start("bkt", "p/f.bin", data.clone());
    s3.set(fake_s3::FAIL);
    let args = s3.agent_args(&["--read-timeout", "4", "--chunk-size", "1MiB"]);
    let a = Agent::start("s3://bkt/p", &fake_s3::strs(&args));
    let f = fs::File::open(a.path("f.bin")).unwrap();
    let mut buf = vec![0u8; 4096];
    // 500s: EIO after bounded retries.
    let t = Instant::now();
    assert_eq!(errno_of(f.read_at(&mut buf, 0)), libc::EIO);
    assert!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
    // One retry layer: each chunk's GET is tried 1 + 2 times (the store's retries), not 3 x 3.
    let gets = || s3.gets.load(std::sync::atomic::Ordering::SeqCst);
    let mut last = gets();
    while {
        std::thread::sleep(Duration::from_millis(1500));
        std::mem::replace(&mut last, gets()) != last
    } {}
    assert!((3..=3 * 3).contains(&last), "{last} GETs for a 3-chunk file; log:\n{}", a.log_text());
    // A server that never answers: EIO at the read deadline, not a hang.
    s3.set(fake_s3::HANG);
    let t = Instant::now();
    assert_eq!(errno_of(f.read_at(&mut buf, 1 << 20)), libc::EIO);
    assert!(t.elapsed() < Duration::from_secs(15), "took {:?}", t.elapsed());
    // The origin recovers: the next read retries and gets the right bytes.
    s3.set(fake_s3::SERVE);
    let f = fs::File::open(a.path("f.bin")).unwrap();
    let n = f.read_at(&mut buf, 2 << 20).unwrap_or_else(|e| panic!("{e}; log:\n{}", a.log_text()));
    assert_eq!(&buf[..n], &data[2 << 20..(2 << 20) + n]);
    assert!(a.metric("cachefs_read_errors_total") >= 2.0);
}

#[test]
fn stale_mount_from_a_killed_agent_is_detached() {
    if !fuse_available("stale_mount_from_a_killed_agent_is_detached") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_source(src.path(), false);
    let tmp = tempfile::tempdir().unwrap();
    let mp = tmp.path().join("mnt");
    let mut a = Agent::start_with(&src.path().display().to_string(), &[], mp.clone(), tmp.path().join("c1"), tempfile::tempdir().unwrap());
    assert_eq!(fs::read(a.path("top.txt")).unwrap(), b"hello cachefs\n");
    a.kill9();
    // The kernel may answer from its attribute cache for up to the TTL.
    assert!(poll_until(Duration::from_secs(5), || fs::metadata(&mp).err().and_then(|e| e.raw_os_error()) == Some(libc::ENOTCONN)));
    let b = Agent::start_with(&src.path().display().to_string(), &[], mp.clone(), tmp.path().join("c2"), tempfile::tempdir().unwrap());
    assert!(b.log_text().contains("stale mount"), "log:\n{}", b.log_text());
    assert_eq!(fs::read(b.path("top.txt")).unwrap(), b"hello cachefs\n");
}

#[test]
fn python_safetensors_load_through_mount() {
    if !fuse_available("python_safetensors_load_through_mount") {
        return;
    }
    let ok = std::process::Command::new("python3")
        .args(["-c", "import safetensors.numpy, numpy"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        let msg = "python3 with safetensors and numpy is missing (pip install safetensors numpy)";
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{msg}");
        }
        eprintln!("\n!!!!!!!! SKIPPED python_safetensors_load_through_mount: {msg} !!!!!!!!\n");
        return;
    }
    let src = tempfile::tempdir().unwrap();
    make_source(src.path(), false);
    let a = Agent::start(&src.path().display().to_string(), &["--chunk-size", "1MiB"]);
    let script = r#"
import sys, numpy as np
from safetensors.numpy import load_file
want = load_file(sys.argv[1]); got = load_file(sys.argv[2])
assert want.keys() == got.keys() and len(want) == 19, (len(want), len(got))
for k in want:
    assert want[k].dtype == got[k].dtype and want[k].shape == got[k].shape, k
    assert np.array_equal(want[k], got[k]), k
print("OK", len(got))
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &src.path().join("models/model.safetensors").display().to_string(),
            &a.path("models/model.safetensors").display().to_string(),
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "python: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "OK 19");
}
