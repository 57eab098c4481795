//! The Debian package, built and installed the way an operator would: `scripts/package.sh`
//! (cargo-deb) packs this build's binary; `dpkg -i` installs it on this machine; its files, unit,
//! man pages, completions and conffile are checked; `dpkg -r` removes it keeping the edited
//! config, `dpkg -P` purges that too. Then the service under a real systemd: systemd boots as
//! PID 1 of fresh pid/mount/net namespaces over a minimal Debian rootfs (debootstrap), the
//! package is installed there and the unit is driven with systemctl. Needs root, dpkg (and
//! debootstrap, unshare, nsenter for the second): skipped loudly without them, a failure under
//! `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{poll_until, run_ok, sha256_file, skip, write_random};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Root and these commands, or a loud skip (a failure under CI=true).
fn available(test: &str, commands: &[&str]) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let missing: Vec<&&str> = commands
        .iter()
        .filter(|c| Command::new("sh").args(["-c", &format!("command -v {c}")]).output().map_or(true, |o| !o.status.success()))
        .collect();
    (root && missing.is_empty()) || skip(test, &format!("needs root and {commands:?} (root={root}, missing {missing:?})"))
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "cachefs"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
}

/// The package built from this test run's binary, once for all tests here; its path.
fn build_package() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            run_ok(
                Command::new("bash")
                    .arg(root().join("scripts/package.sh"))
                    .env("CACHEFS_BIN", env!("CARGO_BIN_EXE_cachefs"))
                    .current_dir(root()),
            );
            let dir = root().join("target/debian");
            let prefix = format!("cachefs_{}", env!("CARGO_PKG_VERSION"));
            let deb = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().to_string();
                name.starts_with(&prefix) && name.ends_with(".deb")
            });
            deb.expect("scripts/package.sh made no .deb")
        })
        .clone()
}

#[test]
fn the_debian_package_installs_verifies_and_removes_cleanly() {
    if !available("the_debian_package_installs_verifies_and_removes_cleanly", &["dpkg"]) {
        return;
    }
    if installed() {
        eprintln!("a cachefs package is installed on this machine: it is replaced by this test and purged at the end");
    }
    let deb = build_package();
    run_ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(installed());

    // The files an operator expects, where Debian puts them.
    for f in [
        "/usr/bin/cachefs",
        "/lib/systemd/system/cachefs.service",
        "/etc/cachefs/cachefs.toml",
        "/usr/share/man/man1/cachefs.1.gz",
        "/usr/share/man/man1/cachefs-mount.1.gz",
        "/usr/share/man/man1/cachefs-drain.1.gz",
        "/usr/share/bash-completion/completions/cachefs",
        "/usr/share/zsh/vendor-completions/_cachefs",
        "/usr/share/fish/vendor_completions.d/cachefs.fish",
        "/usr/share/doc/cachefs/README.md",
    ] {
        assert!(Path::new(f).is_file(), "{f} missing after dpkg -i");
    }
    let version = run_ok(Command::new("/usr/bin/cachefs").arg("--version"));
    assert_eq!(version.trim(), format!("cachefs {}", env!("CARGO_PKG_VERSION")));
    let unit = std::fs::read_to_string("/lib/systemd/system/cachefs.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/cachefs mount --config /etc/cachefs/cachefs.toml"), "{unit}");
    if Command::new("systemd-analyze").arg("--version").output().is_ok() {
        let out = Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/cachefs.service"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !err.contains("cachefs.service:"), "systemd-analyze verify:\n{err}");
    }
    let man = run_ok(Command::new("sh").arg("-c").arg("gzip -dc /usr/share/man/man1/cachefs-mount.1.gz"));
    assert!(man.contains(".TH cachefs-mount 1") && man.contains("require\\-files"), "{man}");
    let conffiles = run_ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "cachefs"]));
    assert!(conffiles.contains("/etc/cachefs/cachefs.toml"), "{conffiles}");
    // The packaged example config is one the agent accepts.
    let toml = std::fs::read_to_string("/etc/cachefs/cachefs.toml").unwrap();
    cachefs::config::parse_file_config(&toml, "/etc/cachefs/cachefs.toml").unwrap_or_else(|e| panic!("{}", cachefs::error::report(&e)));

    // Remove: the program goes, the operator's edited config stays.
    std::fs::write("/etc/cachefs/cachefs.toml", format!("{toml}\n# edited by the operator\n")).unwrap();
    run_ok(Command::new("dpkg").args(["-r", "cachefs"]));
    assert!(!Path::new("/usr/bin/cachefs").exists() && !Path::new("/lib/systemd/system/cachefs.service").exists());
    assert!(std::fs::read_to_string("/etc/cachefs/cachefs.toml").unwrap().contains("edited by the operator"));
    // Purge: the config goes too, and nothing of the package is left.
    run_ok(Command::new("dpkg").args(["-P", "cachefs"]));
    assert!(!Path::new("/etc/cachefs").exists(), "/etc/cachefs left after dpkg -P");
    assert!(!installed());
}

/// A cached minimal Debian rootfs with systemd (debootstrap once; later runs copy it).
const ROOTFS_CACHE: &str = "/var/tmp/cachefs-test-rootfs-bookworm";

fn cached_rootfs() -> PathBuf {
    let cache = PathBuf::from(ROOTFS_CACHE);
    if !cache.join("lib/systemd/systemd").is_file() {
        let new = cache.with_extension("new");
        let _ = std::fs::remove_dir_all(&new);
        run_ok(
            Command::new("debootstrap")
                .args(["--variant=minbase", "--include=systemd,systemd-sysv,dbus", "bookworm"])
                .arg(&new)
                .arg("http://deb.debian.org/debian"),
        );
        let _ = std::fs::remove_dir_all(&cache);
        std::fs::rename(&new, &cache).unwrap();
    }
    cache
}

/// systemd running as PID 1 of its own pid, mount and network namespaces, chrooted into a
/// copy of the rootfs. Dropping it kills the namespace (every process in it) and removes the copy.
struct Booted {
    unshare: std::process::Child,
    pid: u32,
    root: tempfile::TempDir,
    shm: PathBuf,
}

/// Mount what systemd needs and exec it as PID 1 (inside `unshare --pid --fork --mount`).
const BOOT: &str = r#"set -e
R=$1
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount --rbind /dev "$R/dev"
mount -t tmpfs -o mode=755 tmpfs "$R/run"
mount -t tmpfs tmpfs "$R/tmp"
exec env -i container=other PATH=/usr/sbin:/usr/bin:/sbin:/bin chroot "$R" /lib/systemd/systemd --log-target=console"#;

impl Booted {
    fn boot() -> Booted {
        let root = tempfile::Builder::new().prefix("cachefs-systemd-").tempdir_in("/var/tmp").unwrap();
        run_ok(Command::new("cp").arg("-a").arg(format!("{}/.", cached_rootfs().display())).arg(root.path()));
        let unshare = Command::new("unshare")
            .args(["--pid", "--fork", "--mount", "--net", "--propagation", "private", "sh", "-c", BOOT, "boot"])
            .arg(root.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let children = format!("/proc/{0}/task/{0}/children", unshare.id());
        let mut pid = 0;
        let found = poll_until(std::time::Duration::from_secs(10), || {
            pid =
                std::fs::read_to_string(&children).unwrap_or_default().split_whitespace().next().and_then(|p| p.parse().ok()).unwrap_or(0);
            pid != 0 && std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e.ends_with("systemd"))
        });
        let shm = PathBuf::from(format!("/dev/shm/cachefs-systemd-test-{}", std::process::id()));
        let b = Booted { unshare, pid, root, shm };
        assert!(found, "systemd did not start as PID 1 of the new namespaces");
        // Until systemd has made its bus socket, systemctl cannot connect: ask again. "degraded":
        // units of a full system that a container lacks (logind) may fail.
        let mut state = String::new();
        let up = poll_until(std::time::Duration::from_secs(60), || {
            state = b.inside(&["timeout", "60", "systemctl", "is-system-running", "--wait"]);
            state.contains("running") || state.contains("degraded")
        });
        assert!(up, "systemd state: {state}");
        b
    }

    /// Run a command inside the booted system (its namespaces, root and working directory):
    /// whether it succeeded, and its stdout and stderr.
    fn exec(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("nsenter").args(["-t", &self.pid.to_string(), "-a", "-r", "-w"]).args(args).output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }

    /// [`Booted::exec`]'s output, whatever the outcome.
    fn inside(&self, args: &[&str]) -> String {
        self.exec(args).1
    }

    /// [`Booted::exec`]'s output; a failure panics with the agent's journal.
    fn ok(&self, args: &[&str]) -> String {
        let (ok, text) = self.exec(args);
        assert!(ok, "{args:?} inside failed:\n{text}\n--- journal:\n{}", self.inside(&["journalctl", "-u", "cachefs", "--no-pager"]));
        text
    }

    fn sha256_inside(&self, path: &str) -> String {
        self.ok(&["sha256sum", path]).split_whitespace().next().unwrap_or_default().to_string()
    }

    fn show(&self, prop: &str) -> String {
        self.inside(&["systemctl", "show", "-p", prop, "--value", "cachefs"]).trim().to_string()
    }

    fn origin_bytes(&self) -> u64 {
        let st: serde_json::Value = serde_json::from_str(&self.ok(&["cachefs", "status", "--json"])).unwrap();
        st["origin"]["bytes"].as_u64().unwrap()
    }
}

impl Drop for Booted {
    fn drop(&mut self) {
        // SAFETY: SIGKILL to the namespace's PID 1 ends every process in it.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        let _ = self.unshare.wait();
        let _ = std::fs::remove_dir_all(&self.shm);
        let _ = self.root.path();
    }
}

#[test]
fn the_service_runs_under_a_real_systemd() {
    if !available("the_service_runs_under_a_real_systemd", &["dpkg", "debootstrap", "unshare", "nsenter"])
        || !Path::new("/dev/fuse").exists()
    {
        assert!(std::env::var("CI").as_deref() != Ok("true") || Path::new("/dev/fuse").exists(), "CI=true needs /dev/fuse");
        return;
    }
    let deb = build_package();
    let b = Booted::boot();
    let r = b.root.path();
    std::fs::copy(&deb, r.join("root/cachefs.deb")).unwrap();
    std::fs::create_dir_all(r.join("srv/models")).unwrap();
    let model = r.join("srv/models/model.bin");
    write_random(&model, (48 << 20) + 3, 191);
    let want = sha256_file(&model);
    b.ok(&["dpkg", "-i", "/root/cachefs.deb"]);
    let config = format!(
        "source = \"/srv/models\"\nmountpoint = \"/mnt/models\"\ncache_dir = \"{}\"\ncache_size = \"256MiB\"\ndrain_timeout = 5\n",
        b.shm.display()
    );
    std::fs::write(r.join("etc/cachefs/cachefs.toml"), config).unwrap();

    // enable --now: active once the mount answers (Type=notify), STATUS= says serving.
    b.ok(&["systemctl", "enable", "--now", "cachefs"]);
    assert_eq!(b.show("ActiveState"), "active");
    assert!(b.show("StatusText").starts_with("serving /srv/models at /mnt/models"), "{}", b.show("StatusText"));
    assert_eq!(b.sha256_inside("/mnt/models/model.bin"), want);
    assert_eq!(b.origin_bytes(), (48 << 20) + 3);

    // SIGKILL: Restart=on-failure brings it back, the stale mount is replaced, the cache is warm.
    let first = b.show("MainPID");
    b.ok(&["systemctl", "kill", "-s", "SIGKILL", "cachefs"]);
    assert!(
        poll_until(std::time::Duration::from_secs(30), || b.show("NRestarts") == "1" && b.show("ActiveState") == "active"),
        "no restart after SIGKILL"
    );
    assert_ne!(b.show("MainPID"), first);
    assert_eq!(b.sha256_inside("/mnt/models/model.bin"), want);
    assert_eq!(b.origin_bytes(), 0, "the restarted agent read the origin instead of its warm cache");

    // A hung agent (SIGSTOP): the watchdog (WatchdogSec=30) kills and restarts it.
    let hung = b.show("MainPID");
    b.ok(&["systemctl", "kill", "-s", "SIGSTOP", "cachefs"]);
    let restarted = poll_until(std::time::Duration::from_secs(75), || b.show("NRestarts") == "2" && b.show("ActiveState") == "active");
    assert!(restarted, "the watchdog did not restart a stopped agent: {}", b.inside(&["systemctl", "status", "cachefs", "--no-pager"]));
    assert_ne!(b.show("MainPID"), hung);
    assert_eq!(b.sha256_inside("/mnt/models/model.bin"), want);

    // stop: drains (drain_ready reported), unmounts, exits cleanly.
    b.ok(&["systemctl", "stop", "cachefs"]);
    assert_eq!((b.show("ActiveState"), b.show("Result")), ("inactive".to_string(), "success".to_string()));
    let journal = b.inside(&["journalctl", "-u", "cachefs", "--no-pager"]);
    assert!(journal.contains("drain_ready") && journal.contains("stopped"), "{journal}");
    assert!(!b.ok(&["cat", "/proc/mounts"]).contains("/mnt/models"), "still mounted after stop");

    // dpkg -r of a running service: prerm stops it (drained, unmounted) before its files go.
    b.ok(&["systemctl", "start", "cachefs"]);
    assert_eq!(b.show("ActiveState"), "active");
    b.ok(&["dpkg", "-r", "cachefs"]);
    assert!(!b.ok(&["cat", "/proc/mounts"]).contains("/mnt/models"), "still mounted after dpkg -r");
    let comms = b.ok(&["sh", "-c", "cat /proc/[0-9]*/comm 2>/dev/null || true"]);
    assert!(!comms.lines().any(|c| c.trim() == "cachefs"), "an agent still runs after dpkg -r:\n{comms}");
    assert!(!r.join("usr/bin/cachefs").exists());
}
