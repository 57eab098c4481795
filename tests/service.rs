//! Running under systemd: the unit file verifies; the notify protocol (READY only once the mount
//! answers, WATCHDOG pings, STOPPING on SIGTERM) over a real datagram socket; `cachefs drain`.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn unit_file_verifies() {
    let Ok(v) = Command::new("systemd-analyze").arg("--version").output() else {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("systemd-analyze is missing (apt-get install systemd)");
        }
        eprintln!("SKIPPED unit_file_verifies: systemd-analyze is missing");
        return;
    };
    assert!(v.status.success());
    // The unit as shipped, with ExecStart pointing at the binary just built.
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string("systemd/cachefs.service").unwrap().replace("/usr/local/bin/cachefs", bin());
    let path = dir.path().join("cachefs.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    let problems: Vec<&str> = err.lines().filter(|l| l.contains("cachefs.service")).collect();
    assert!(out.status.success() && problems.is_empty(), "systemd-analyze verify:\n{err}");
}

#[test]
fn notify_ready_watchdog_stopping_and_drain() {
    if !fuse_available("notify_ready_watchdog_stopping_and_drain") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("f.bin"), 2 << 20, 171);
    let tmp = tempfile::tempdir().unwrap();
    let sock_path = tmp.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mp = tmp.path().join("mnt");
    let admin = format!("127.0.0.1:{}", free_port());
    let cache = format!("/dev/shm/cachefs-notify-{}", std::process::id());
    let log = std::fs::File::create(tmp.path().join("agent.log")).unwrap();
    // systemd sets WATCHDOG_PID to the service's pid: exec from a shell keeps $$.
    let mut child = Command::new("sh")
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", bin()])
        .args(["mount", "--source"])
        .arg(src.path())
        .arg("--mountpoint")
        .arg(&mp)
        .args(["--cache-dir", &cache, "--cache-size", "64MiB", "--admin", &admin])
        .env("NOTIFY_SOCKET", &sock_path)
        .env("WATCHDOG_USEC", "400000")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut buf = [0u8; 4096];
    let mut recv = || -> String {
        let n = sock.recv(&mut buf).expect("a notify message");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    // READY=1 comes first, and only when the mount already answers.
    let first = recv();
    assert!(first.contains("READY=1"), "{first}");
    assert!(is_mounted(&mp), "READY before the mount");
    assert_eq!(std::fs::read(mp.join("f.bin")).unwrap().len(), 2 << 20);
    assert!(first.contains("STATUS=serving"), "{first}");
    // Watchdog pings (every 200 ms).
    let mut pings = 0;
    while pings < 2 {
        if recv().contains("WATCHDOG=1") {
            pings += 1;
        }
    }

    // cachefs drain: not ready any more, drain state 2, the mount still serves local readers.
    let out = Command::new(bin()).args(["drain", "--admin", &admin]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "drained");
    let addr: std::net::SocketAddr = admin.parse().unwrap();
    assert_eq!(http_get(addr, "/readyz").unwrap().0, 503);
    let m = parse_metrics(&http_get(addr, "/metrics").unwrap().1);
    assert_eq!(m["cachefs_drain_state"], 2.0);
    let st: serde_json::Value = serde_json::from_str(&http_get(addr, "/status").unwrap().1).unwrap();
    assert_eq!(st["drain_state"], "drained");
    assert_eq!(std::fs::read(mp.join("f.bin")).unwrap().len(), 2 << 20);
    let mut saw_drain_status = false;
    for _ in 0..20 {
        let msg = recv();
        if msg.contains("STATUS=drained") {
            saw_drain_status = true;
            break;
        }
    }
    assert!(saw_drain_status);

    // SIGTERM: STOPPING=1, then a clean exit.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut stopping = false;
    for _ in 0..50 {
        if recv().contains("STOPPING=1") {
            stopping = true;
            break;
        }
    }
    assert!(stopping);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(!is_mounted(&mp));
    common::remove_cache_dir(std::path::Path::new(&cache));
}
