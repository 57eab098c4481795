//! `cachefs status` and `cachefs warm` against a running agent.

mod common;

use std::process::Command;

use common::*;

#[test]
fn warm_and_status() {
    if !fuse_available("warm_and_status") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes((30 << 20) + 9, 161);
    std::fs::write(src.path().join("m.bin"), &data).unwrap();
    write_random(&src.path().join("dir/x.bin"), 5 << 20, 162);
    write_random(&src.path().join("dir/y.bin"), 3 << 20, 163);
    let a = Agent::start(&src.path().display().to_string(), &[]);
    let admin = a.admin.to_string();

    // warm a cold file by its absolute path in the mount: it lands in memory...
    let out = Command::new(bin()).args(["warm", "--admin", &admin]).arg(a.path("m.bin")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // stdout is not a terminal here: progress comes as lines (for logs and CI), not a bar.
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.lines().last().is_some_and(|l| l.starts_with("warm ") && l.ends_with("done, 30.00 MiB in memory")), "{said}");
    let origin = a.metric("cachefs_origin_bytes_total");
    assert_eq!(origin, data.len() as f64);
    assert_eq!(a.metric("cachefs_cache_bytes"), data.len() as f64, "warm returned before the file was in memory");
    // ...so the next read costs no origin bytes, and (passthrough) no FUSE reads.
    let reads = a.metric("cachefs_fuse_read_requests_total");
    assert!(std::fs::read(a.path("m.bin")).unwrap() == data);
    assert_eq!(a.metric("cachefs_origin_bytes_total"), origin);
    assert_eq!(a.metric("cachefs_fuse_read_requests_total"), reads);
    // What passthrough serves never reaches the agent; its opens are counted with their sizes.
    let opens = a.metric("cachefs_passthrough_opens_total");
    assert!(opens >= 1.0);
    assert_eq!(a.metric("cachefs_passthrough_open_bytes_total"), opens * data.len() as f64);

    // A directory, by its path relative to the mount root.
    let out = Command::new(bin()).args(["warm", "--admin", &admin, "dir"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(a.metric("cachefs_origin_bytes_total"), origin + (8 << 20) as f64);

    // A missing path: non-zero exit, one clear line.
    let out = Command::new(bin()).args(["warm", "--admin", &admin, "m.bin", "missing.bin"]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cachefs: error: warm missing.bin") && err.contains("no such file"), "{err}");

    // status --json parses and agrees with /metrics; the summary names the mount.
    let out = Command::new(bin()).args(["status", "--json", "--admin", &admin]).output().unwrap();
    assert!(out.status.success());
    let st: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(st["origin"]["bytes"].as_f64().unwrap(), a.metric("cachefs_origin_bytes_total"));
    assert_eq!(st["cache"]["used_bytes"].as_f64().unwrap(), a.metric("cachefs_cache_bytes"));
    assert_eq!(st["read_bytes"]["memory"].as_f64().unwrap(), a.metric("cachefs_read_bytes_total{tier=\"memory\"}"));
    let out = Command::new(bin()).args(["status", "--admin", &admin]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&a.mountpoint.display().to_string()) && text.contains("ready"), "{text}");

    // No agent there: a clear error.
    let out = Command::new(bin()).args(["status", "--admin", &format!("127.0.0.1:{}", free_port())]).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the agent"));
}

#[test]
fn drain_then_resume_serves_again() {
    if !fuse_available("drain_then_resume_serves_again") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("m.bin"), 3 << 20, 164);
    let a = Agent::start(&src.path().display().to_string(), &["--drain-timeout", "5"]);
    let admin = a.admin.to_string();
    let readyz = || http_get(a.admin, "/readyz").map(|(c, _)| c);
    assert_eq!(readyz(), Some(200));

    let out = Command::new(bin()).args(["drain", "--admin", &admin]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(readyz(), Some(503));
    assert_eq!(a.metric("cachefs_drain_state"), 2.0);

    let out = Command::new(bin()).args(["resume", "--admin", &admin]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "serving");
    assert_eq!(readyz(), Some(200));
    assert_eq!(a.metric("cachefs_drain_state"), 0.0);
    let st: serde_json::Value = serde_json::from_str(&http_get(a.admin, "/status").unwrap().1).unwrap();
    assert_eq!(st["drain"]["state"], "serving");
    // The mount kept serving throughout, and still does.
    assert_eq!(sha256_file(&a.path("m.bin")), sha256_file(&src.path().join("m.bin")));

    // Resuming a serving agent is a no-op that succeeds; a second drain works again.
    let out = Command::new(bin()).args(["resume", "--admin", &admin]).output().unwrap();
    assert!(out.status.success());
    let out = Command::new(bin()).args(["drain", "--admin", &admin]).output().unwrap();
    assert!(out.status.success());
    assert_eq!(readyz(), Some(503));
}
