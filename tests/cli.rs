//! Bad input: one clear line on stderr, a non-zero exit, never a panic.

mod common;

use std::process::Command;

use common::*;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin()).args(args).env("RUST_LOG", "off").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), stderr)
}

fn assert_one_line_error(args: &[&str], needle: &str) {
    let (code, err) = run(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(lines[0].starts_with("cachefs: error: "), "{args:?}: {err}");
    assert!(lines[0].contains(needle), "{args:?}: {err:?} should mention {needle:?}");
}

#[test]
fn bad_input_gives_one_clear_line() {
    let src = tempfile::tempdir().unwrap();
    let d = src.path().display().to_string();
    let mp = src.path().join("mnt").display().to_string();
    let file = src.path().join("afile");
    std::fs::write(&file, b"x").unwrap();
    let f = file.display().to_string();
    let cache = src.path().join("cache").display().to_string();
    let base = |extra: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = ["mount", "--cache-dir", &cache, "--admin", "127.0.0.1:0"].iter().map(|s| s.to_string()).collect();
        if !extra.contains(&"--cache-size") {
            v.extend(["--cache-size".to_string(), "64MiB".to_string()]);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let check = |extra: &[&str], needle: &str| {
        let v = base(extra);
        let args: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        assert_one_line_error(&args, needle);
    };
    check(&["--source", "ftp://host/x", "--mountpoint", &mp], "unknown scheme");
    check(&["--source", "/no/such/dir/anywhere", "--mountpoint", &mp], "does not exist");
    check(&["--source", &d, "--mountpoint", &f], "is a file");
    check(&["--source", &d, "--mountpoint", &mp, "--chunk-size", "128MiB"], "out of range");
    check(&["--source", &d, "--mountpoint", &mp, "--chunk-size", "12 furlongs"], "chunk-size");
    check(&["--source", &d, "--mountpoint", &mp, "--cache-size", "900TiB"], "available memory");
    check(&["--source", &d, "--mountpoint", &mp, "--config", "/no/such/config.toml"], "cannot read config");
    check(&["--source", &d, "--mountpoint", &mp, "--source-option", "novalue"], "KEY=VALUE");
    check(&["--source", &d, "--mountpoint", &mp, "--admin", "not-an-addr"], "--admin");
    check(&["--source", &d, "--mountpoint", &mp, "--bogus-flag"], "--bogus-flag");
    check(&["--mountpoint", &mp], "--source");
    let bad_toml = src.path().join("bad.toml");
    std::fs::write(&bad_toml, "cache_size = [1, 2\n").unwrap();
    check(&["--source", &d, "--mountpoint", &mp, "--config", &bad_toml.display().to_string()], "invalid config");
    // An origin nobody answers: the listing fails with a clear line, in bounded time.
    let port = free_port();
    let ep = format!("endpoint=http://127.0.0.1:{port}");
    let t = std::time::Instant::now();
    check(
        &[
            "--source",
            "s3://bucket/x",
            "--mountpoint",
            &mp,
            "--source-option",
            &ep,
            "--source-option",
            "allow_http=true",
            "--source-option",
            "access_key_id=k",
            "--source-option",
            "secret_access_key=s",
            "--source-option",
            "region=us-east-1",
        ],
        "cannot list the source",
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(90));
    check(&["--source", "s3://bucket/x", "--mountpoint", &mp, "--source-option", "colour=blue"], "unknown --source-option");
    // A scheme-less endpoint (it used to panic in object_store's request signing).
    let keys = ["--source-option", "access_key_id=k", "--source-option", "secret_access_key=s", "--source-option", "region=us-east-1"];
    for ep in ["endpoint=127.0.0.1:18333", "endpoint=localhost", "aws_endpoint=ftp://127.0.0.1:1"] {
        let mut args = vec!["--source", "s3://bucket/x", "--mountpoint", &mp, "--source-option", ep];
        args.extend(keys);
        check(&args, "must be an http:// or https:// URL");
    }
}

#[test]
fn no_permission_to_mount_is_a_clear_error() {
    // Run as nobody: opening /dev/fuse is refused.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || Command::new("setpriv").arg("--version").output().is_err() {
        eprintln!("SKIPPED no_permission_to_mount_is_a_clear_error: needs root and setpriv");
        return;
    }
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f"), b"x").unwrap();
    let mut perm = std::fs::metadata(src.path()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(src.path(), perm).unwrap();
    let work = tempfile::Builder::new().prefix("cachefs-nobody").tempdir_in("/tmp").unwrap();
    let mut perm = std::fs::metadata(work.path()).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o777);
    std::fs::set_permissions(work.path(), perm).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", bin(), "mount", "--source"])
        .arg(src.path())
        .arg("--mountpoint")
        .arg(work.path().join("mnt"))
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .args(["--cache-size", "16MiB", "--admin", "127.0.0.1:0"])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("cachefs: error: cannot mount"), "{err}");
}
