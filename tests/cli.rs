//! Bad input: one clear line on stderr, a non-zero exit, never a panic.

mod common;

use std::process::Command;

use common::*;

fn run(args: &[&str]) -> (i32, String) {
    let out = Command::new(bin()).args(args).env("RUST_LOG", "off").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    (out.status.code().unwrap_or(-1), stderr)
}

/// `args` fail with one `cachefs: error:` line mentioning `needle`; returns the exit code.
fn assert_one_line_error(args: &[&str], needle: &str) -> i32 {
    let (code, err) = run(args);
    assert_ne!(code, 0, "{args:?} should fail");
    assert!(!err.contains("panicked"), "{args:?} panicked: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{args:?}: expected one line, got:\n{err}");
    assert!(lines[0].starts_with("cachefs: error: "), "{args:?}: {err}");
    assert!(lines[0].contains(needle), "{args:?}: {err:?} should mention {needle:?}");
    code
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
    // Usage errors (flags, config, source, options, paths of the wrong kind) exit 2.
    let check_code = |extra: &[&str], needle: &str, code: i32| {
        let v = base(extra);
        let args: Vec<&str> = v.iter().map(|s| s.as_str()).collect();
        assert_eq!(assert_one_line_error(&args, needle), code, "{args:?}: exit code");
    };
    let check = |extra: &[&str], needle: &str| check_code(extra, needle, 2);
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
    let args = ["mount", "--source", &d, "--mountpoint", &mp, "--cache-dir", &f, "--cache-size", "64MiB", "--admin", "127.0.0.1:0"];
    assert_eq!(assert_one_line_error(&args, "--cache-dir"), 2);
    assert_eq!(assert_one_line_error(&args, "is a file, not a directory"), 2);
    check(&["--source", &d, "--mountpoint", &mp, "--source-option", "region=x"], "for a local directory source");
    // An origin nobody answers: the listing fails with a clear line, in bounded time (exit 1).
    let port = free_port();
    let ep = format!("endpoint=http://127.0.0.1:{port}");
    let t = std::time::Instant::now();
    check_code(
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
        1,
    );
    assert!(t.elapsed() < std::time::Duration::from_secs(90));
    check(&["--source", "s3://bucket/x", "--mountpoint", &mp, "--source-option", "colour=blue"], "for an s3 source");
    // A scheme-less endpoint (it used to panic in object_store's request signing).
    let keys = ["--source-option", "access_key_id=k", "--source-option", "secret_access_key=s", "--source-option", "region=us-east-1"];
    for ep in ["endpoint=127.0.0.1:18333", "endpoint=localhost", "aws_endpoint=ftp://127.0.0.1:1"] {
        let mut args = vec!["--source", "s3://bucket/x", "--mountpoint", &mp, "--source-option", ep];
        args.extend(keys);
        check(&args, "must be an http:// or https:// URL");
    }
    // Booleans and regions that the store would misread are refused too.
    for (opt, why) in [("allow_http=ture", "must be true or false"), ("region=us east 1", "is not a region name")] {
        check(&["--source", "s3://bucket/x", "--mountpoint", &mp, "--source-option", opt], why);
    }
}

#[test]
fn commands_name_what_is_missing() {
    // A missing argument is named (clap's message continues on the next line).
    assert_eq!(assert_one_line_error(&["warm"], "<PATHS>"), 2);
    assert_eq!(assert_one_line_error(&["mount", "--bogus"], "--bogus"), 2);
    // A command that cannot reach its agent is a runtime failure: 1.
    let admin = format!("127.0.0.1:{}", free_port());
    for cmd in ["status", "drain", "resume"] {
        assert_eq!(assert_one_line_error(&[cmd, "--admin", &admin], "cannot reach the agent"), 1, "{cmd}");
    }
}

#[test]
fn a_bad_mountpoint_is_found_before_the_admin_port_is_bound() {
    if !fuse_available("a_bad_mountpoint_is_found_before_the_admin_port_is_bound") {
        return;
    }
    // The mountpoint is taken (another agent's mount): the error names it even though the admin
    // address is taken too, so the mountpoint was checked first.
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("f"), b"x").unwrap();
    let a = Agent::start(&src.path().display().to_string(), &[]);
    let cache = tempfile::tempdir().unwrap();
    let (mp, admin, cache) = (a.mountpoint.display().to_string(), a.admin.to_string(), cache.path().join("c").display().to_string());
    let args = ["mount", "--source", &src.path().display().to_string(), "--mountpoint", &mp, "--admin", &admin, "--cache-dir", &cache];
    let code = assert_one_line_error(&[&args[..], &["--cache-size", "16MiB"]].concat(), "already mounted there");
    assert_eq!(code, 1);
    assert_eq!(http_get(a.admin, "/readyz").map(|r| r.0), Some(200), "the first agent keeps serving");
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
