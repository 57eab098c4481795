//! Local hits at memory speed: files wholly in memory are opened with FUSE passthrough to their
//! tmpfs file (no FUSE read requests), pinned against eviction while open.

mod common;

use std::fs;
use std::os::unix::fs::FileExt;

use common::*;

fn reads(a: &Agent) -> f64 {
    a.metric("cachefs_fuse_read_requests_total")
}

/// Open `rel` once it is answered with passthrough (the last chunks are stored just after the
/// read that fetched them returns).
fn open_passthrough(a: &Agent, rel: &str) -> fs::File {
    let mut file = None;
    let ok = poll_until(std::time::Duration::from_secs(10), || {
        let before = a.metric("cachefs_passthrough_opens_total");
        let f = fs::File::open(a.path(rel)).unwrap();
        if a.metric("cachefs_passthrough_opens_total") > before {
            file = Some(f);
            true
        } else {
            false
        }
    });
    assert!(ok, "{rel} never opened with passthrough; log:\n{}", a.log_text());
    file.unwrap()
}

#[test]
fn complete_file_reopens_with_passthrough_and_zero_fuse_reads() {
    if !fuse_available("complete_file_reopens_with_passthrough_and_zero_fuse_reads") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes((40 << 20) + 77, 111);
    fs::write(src.path().join("w.bin"), &data).unwrap();
    let a = Agent::start(&src.path().display().to_string(), &[]);
    if !a.log_text().contains("FUSE passthrough enabled") {
        panic!("this kernel should offer passthrough; log:\n{}", a.log_text());
    }
    // A full sequential read completes the file in memory.
    assert!(fs::read(a.path("w.bin")).unwrap() == data);
    let before = reads(&a);
    assert!(before > 0.0);
    // Reopened: read and mapped straight from tmpfs, no FUSE read requests.
    let mut f = open_passthrough(&a, "w.bin");
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut got).unwrap();
    assert!(got == data);
    let f = open_passthrough(&a, "w.bin");
    // SAFETY: read-only mapping of a file nobody writes.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    assert!(map[..] == data[..]);
    assert_eq!(reads(&a), before, "passthrough opens must not send FUSE reads");
    assert!(a.metric("cachefs_passthrough_opens_total") >= 2.0);
}

#[test]
fn eviction_pressure_never_punches_holes_under_an_open_passthrough_file() {
    if !fuse_available("eviction_pressure_never_punches_holes_under_an_open_passthrough_file") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let a_data = random_bytes(16 << 20, 121);
    fs::write(src.path().join("a.bin"), &a_data).unwrap();
    write_random(&src.path().join("b.bin"), 64 << 20, 122);
    let want_b = sha256_file(&src.path().join("b.bin"));
    let ag = Agent::start(&src.path().display().to_string(), &["--cache-size", "24MiB", "--chunk-size", "4MiB"]);
    assert!(fs::read(ag.path("a.bin")).unwrap() == a_data);
    let held = open_passthrough(&ag, "a.bin");
    // Pressure: a file four times the remaining budget streams through.
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    assert_eq!(sha256_file(&ag.path("b.bin")), want_b);
    assert!(ag.metric("cachefs_evictions_total") > 0.0);
    // The open passthrough file still reads its bytes (no holes, no zeros).
    let mut buf = vec![0u8; a_data.len()];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == a_data, "passthrough file lost bytes under eviction");
    drop(held);
    // Once closed, its chunks can go: more pressure evicts them and reads stay correct.
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    assert_eq!(sha256_file(&ag.path("b.bin")), want_b);
    assert!(fs::read(ag.path("a.bin")).unwrap() == a_data);
}

#[test]
fn without_passthrough_the_normal_path_gives_the_same_bytes() {
    if !fuse_available("without_passthrough_the_normal_path_gives_the_same_bytes") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes(20 << 20, 131);
    fs::write(src.path().join("n.bin"), &data).unwrap();
    let a = Agent::start(&src.path().display().to_string(), &["--no-passthrough"]);
    assert!(fs::read(a.path("n.bin")).unwrap() == data);
    let before = reads(&a);
    let origin = a.metric("cachefs_origin_bytes_total");
    let _ = fs::write("/proc/sys/vm/drop_caches", "3");
    let f = fs::File::open(a.path("n.bin")).unwrap();
    // SAFETY: read-only mapping of a file nobody writes.
    let map = unsafe { memmap2::Mmap::map(&f) }.unwrap();
    assert!(map[..] == data[..]);
    assert!(reads(&a) > before, "the normal path answers FUSE reads");
    assert_eq!(a.metric("cachefs_origin_bytes_total"), origin);
    assert_eq!(a.metric("cachefs_passthrough_opens_total"), 0.0);
}

/// A loader that mapped a file while it was still arriving keeps it open; a second process
/// opens it once it is whole. The kernel keeps one I/O mode per inode, so that open must not
/// be answered with passthrough (it failed with EIO): it opens and reads the right bytes, and
/// passthrough comes back once the first handle is closed.
#[test]
fn a_file_mapped_while_incomplete_still_opens_once_whole() {
    if !fuse_available("a_file_mapped_while_incomplete_still_opens_once_whole") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes((24 << 20) + 5, 113);
    fs::write(src.path().join("m.bin"), &data).unwrap();
    let a = Agent::start(&src.path().display().to_string(), &["--chunk-size", "4MiB"]);
    let first = fs::File::open(a.path("m.bin")).unwrap();
    // SAFETY: read-only mapping of a file nobody writes.
    let map = unsafe { memmap2::Mmap::map(&first) }.unwrap();
    assert!(map[..] == data[..], "the mapping's bytes differ");
    let opens = a.metric("cachefs_passthrough_opens_total");
    for _ in 0..3 {
        let again = fs::read(a.path("m.bin")).unwrap_or_else(|e| panic!("open beside a mapped handle: {e}; log:\n{}", a.log_text()));
        assert!(again == data);
    }
    assert_eq!(a.metric("cachefs_passthrough_opens_total"), opens, "passthrough beside a handle without it");
    drop(map);
    drop(first);
    let f = open_passthrough(&a, "m.bin");
    let mut got = Vec::new();
    std::io::Read::read_to_end(&mut { f }, &mut got).unwrap();
    assert!(got == data);
}
