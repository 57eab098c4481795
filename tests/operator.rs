//! An operator's first hour: what a new user meets that is not the data path — who can read the
//! cache, what an empty source says, what a non-empty mountpoint says, quiet ioctls, and what
//! `/metrics` can count once files are warm.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o7777
}

fn set_mode(p: &std::path::Path, m: u32) {
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap();
}

#[test]
fn cache_files_are_private_and_the_mount_shows_the_origins_modes() {
    if !fuse_available("cache_files_are_private_and_the_mount_shows_the_origins_modes") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    set_mode(src.path(), 0o755);
    write_random(&src.path().join("secret.bin"), (3 << 20) + 5, 171);
    write_random(&src.path().join("public.bin"), 1 << 20, 172);
    write_random(&src.path().join("run.sh"), 100, 173);
    set_mode(&src.path().join("secret.bin"), 0o600);
    set_mode(&src.path().join("public.bin"), 0o644);
    set_mode(&src.path().join("run.sh"), 0o755);
    // A cache directory an earlier version left open to everyone, with a readable lock file.
    let work = tempfile::tempdir().unwrap();
    set_mode(work.path(), 0o755);
    let cache_dir = std::path::PathBuf::from(format!("/dev/shm/cachefs-test-modes-{}", std::process::id()));
    std::fs::create_dir_all(&cache_dir).unwrap();
    set_mode(&cache_dir, 0o755);
    std::fs::write(cache_dir.join(".lock"), b"").unwrap();
    set_mode(&cache_dir.join(".lock"), 0o644);
    let tmp = tempfile::tempdir().unwrap();
    let a = Agent::start_with(&src.path().display().to_string(), &["--allow-other"], work.path().join("mnt"), cache_dir.clone(), tmp);
    assert!(a.log_text().contains("made it 0700"), "{}", a.log_text());

    // Bytes pass through the cache...
    assert_eq!(sha256_file(&a.path("secret.bin")), sha256_file(&src.path().join("secret.bin")));
    assert_eq!(sha256_file(&a.path("public.bin")), sha256_file(&src.path().join("public.bin")));
    // ...and every file the cache holds is the agent's alone.
    assert_eq!(mode(&cache_dir), 0o700);
    let files: Vec<_> = std::fs::read_dir(&cache_dir).unwrap().flatten().map(|e| e.path()).collect();
    assert!(files.len() >= 3, "data files, journals and the lock: {files:?}");
    for f in &files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }

    // The mount shows the origin's modes without write bits; directories 0555.
    assert_eq!(mode(&a.path("secret.bin")), 0o400);
    assert_eq!(mode(&a.path("public.bin")), 0o444);
    assert_eq!(mode(&a.path("run.sh")), 0o555);
    assert_eq!(mode(&a.mountpoint), 0o555);
    // And the kernel enforces them for other users (allow_other, default_permissions).
    if Command::new("setpriv").arg("--version").output().is_ok() {
        let cat = |name: &str| {
            Command::new("setpriv").args(["--reuid=65534", "--regid=65534", "--clear-groups", "cat"]).arg(a.path(name)).output().unwrap()
        };
        let out = cat("secret.bin");
        assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
        let out = cat("public.bin");
        assert!(out.status.success(), "{out:?}");
        assert_eq!(out.stdout, std::fs::read(src.path().join("public.bin")).unwrap());
    }
}

#[test]
fn an_empty_source_warns_and_require_files_refuses_it() {
    if !fuse_available("an_empty_source_warns_and_require_files_refuses_it") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let a = Agent::start(&src.path().display().to_string(), &[]);
    let log = a.log_text();
    assert!(log.contains("WARN") && log.contains("the source lists no files"), "{log}");
    let st: serde_json::Value = serde_json::from_str(&http_get(a.admin, "/status").unwrap().1).unwrap();
    assert_eq!(st["files"], 0);
    drop(a);

    // With --require-files an empty source is a start-up error: one line, exit 1.
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(bin())
        .args(["mount", "--require-files", "--cache-size", "16MiB", "--source"])
        .arg(src.path())
        .arg("--mountpoint")
        .arg(work.path().join("mnt"))
        .arg("--cache-dir")
        .arg(work.path().join("cache"))
        .args(["--admin", &format!("127.0.0.1:{}", free_port())])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("cachefs: error: the source") && err.contains("lists no files"), "{err}");
    assert!(!is_mounted(&work.path().join("mnt")));
}

#[test]
fn a_non_empty_mountpoint_is_a_warning_and_ioctls_are_quiet() {
    if !fuse_available("a_non_empty_mountpoint_is_a_warning_and_ioctls_are_quiet") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("m.bin"), 2 << 20, 174);
    let tmp = tempfile::tempdir().unwrap();
    let mp = tmp.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    std::fs::write(mp.join("hidden.txt"), b"under the mount").unwrap();
    let cache = std::path::PathBuf::from(format!("/dev/shm/cachefs-test-nonempty-{}", std::process::id()));
    let a = Agent::start_with(&src.path().display().to_string(), &[], mp.clone(), cache, tmp);
    assert!(a.log_text().contains("mountpoint is not empty"), "{}", a.log_text());
    assert!(!a.path("hidden.txt").exists(), "the mount hides what was there");

    // isatty (an ioctl Python makes on open) is answered ENOTTY, without a warning or an error count.
    let f = std::fs::File::open(a.path("m.bin")).unwrap();
    // SAFETY: isatty on an open fd.
    let tty = unsafe { libc::isatty(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    assert_eq!((tty, errno), (0, Some(libc::ENOTTY)));
    drop(f);
    let log = a.log_text();
    assert!(!log.contains("Not Implemented") && !log.contains("ioctl"), "{log}");
    assert!(!a.metrics().keys().any(|k| k.starts_with("cachefs_fuse_errors_total{op=\"ioctl\"")));
}
