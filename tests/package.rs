//! The Debian package, built and installed the way an operator would: `scripts/package.sh`
//! (cargo-deb) packs this build's binary; `dpkg -i` installs it on this machine; its files, unit,
//! man pages, completions and conffile are checked; `dpkg -r` removes it keeping the edited
//! config, `dpkg -P` purges that too. Needs root and dpkg: skipped loudly without them, a
//! failure under `CI=true`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dpkg = Command::new("dpkg").arg("--version").output().is_ok_and(|o| o.status.success());
    if root && dpkg {
        return true;
    }
    let msg = format!("SKIPPED {test}: needs root and dpkg (root={root}, dpkg={dpkg})");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{msg}; CI=true requires them");
    eprintln!("\n!!!!!!!! {msg} !!!!!!!!\n");
    false
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn installed() -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", "cachefs"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
}

/// Build the package from this test run's binary; its path.
fn build_package() -> PathBuf {
    run(Command::new("bash").arg(root().join("scripts/package.sh")).env("CACHEFS_BIN", env!("CARGO_BIN_EXE_cachefs")).current_dir(root()));
    let dir = root().join("target/debian");
    let version = env!("CARGO_PKG_VERSION");
    let deb = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).find(|p| {
        let name = p.file_name().unwrap().to_string_lossy().to_string();
        name.starts_with(&format!("cachefs_{version}")) && name.ends_with(".deb")
    });
    deb.expect("scripts/package.sh made no .deb")
}

#[test]
fn the_debian_package_installs_verifies_and_removes_cleanly() {
    if !available("the_debian_package_installs_verifies_and_removes_cleanly") {
        return;
    }
    if installed() {
        eprintln!("a cachefs package is installed on this machine: it is replaced by this test and purged at the end");
    }
    let deb = build_package();
    run(Command::new("dpkg").arg("-i").arg(&deb));
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
    let version = run(Command::new("/usr/bin/cachefs").arg("--version"));
    assert_eq!(version.trim(), format!("cachefs {}", env!("CARGO_PKG_VERSION")));
    let unit = std::fs::read_to_string("/lib/systemd/system/cachefs.service").unwrap();
    assert!(unit.contains("ExecStart=/usr/bin/cachefs mount --config /etc/cachefs/cachefs.toml"), "{unit}");
    if Command::new("systemd-analyze").arg("--version").output().is_ok() {
        let out = Command::new("systemd-analyze").args(["verify", "/lib/systemd/system/cachefs.service"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !err.contains("cachefs.service:"), "systemd-analyze verify:\n{err}");
    }
    let man = run(Command::new("sh").arg("-c").arg("gzip -dc /usr/share/man/man1/cachefs-mount.1.gz"));
    assert!(man.contains(".TH cachefs-mount 1") && man.contains("require\\-files"), "{man}");
    let conffiles = run(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "cachefs"]));
    assert!(conffiles.contains("/etc/cachefs/cachefs.toml"), "{conffiles}");
    // The packaged example config is one the agent accepts.
    let toml = std::fs::read_to_string("/etc/cachefs/cachefs.toml").unwrap();
    cachefs::config::parse_file_config(&toml, "/etc/cachefs/cachefs.toml").unwrap_or_else(|e| panic!("{}", cachefs::error::report(&e)));

    // Remove: the program goes, the operator's edited config stays.
    std::fs::write("/etc/cachefs/cachefs.toml", format!("{toml}\n# edited by the operator\n")).unwrap();
    run(Command::new("dpkg").args(["-r", "cachefs"]));
    assert!(!Path::new("/usr/bin/cachefs").exists() && !Path::new("/lib/systemd/system/cachefs.service").exists());
    assert!(std::fs::read_to_string("/etc/cachefs/cachefs.toml").unwrap().contains("edited by the operator"));
    // Purge: the config goes too, and nothing of the package is left.
    run(Command::new("dpkg").args(["-P", "cachefs"]));
    assert!(!Path::new("/etc/cachefs").exists(), "/etc/cachefs left after dpkg -P");
    assert!(!installed());
}
