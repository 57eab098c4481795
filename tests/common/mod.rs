//! Shared helpers for integration tests: real agent processes, admin HTTP, data files.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

/// FUSE tests need root and /dev/fuse. Without them: a loud skip, or a failure under CI=true.
pub fn fuse_available(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let dev = Path::new("/dev/fuse").exists();
    if root && dev {
        return true;
    }
    skip(test, &format!("FUSE tests need root and /dev/fuse (root={root}, /dev/fuse={dev})"))
}

/// A test that cannot run here (`why`): a loud skip (false), or a failure under CI=true.
pub fn skip(test: &str, why: &str) -> bool {
    let msg = format!("SKIPPED {test}: {why}");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg}; CI=true requires it");
    }
    eprintln!("\n!!!!!!!! {msg} !!!!!!!!\n");
    false
}

/// Run `cmd`; its stdout and stderr, or a panic with them if it fails.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// Poll `cond` every 50 ms until it holds or `limit` passes.
pub fn poll_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A port free now and never handed out before in this process (tests run in parallel, and a
/// port released by one `free_port` could otherwise be handed to two agents).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let p = TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&p) {
            given.push(p);
            return p;
        }
    }
}

/// A free address on 127.0.0.1 for an agent's peer port.
pub fn peer_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// A plain HTTP/1.0 GET: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}

pub fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

pub fn sha256_file(p: &Path) -> String {
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    hex::encode(h.finalize())
}

pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    r.fill(&mut v[..]);
    v
}

pub fn write_random(p: &Path, len: usize, seed: u64) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, random_bytes(len, seed)).unwrap();
}

/// A valid safetensors file: a JSON header of F32/F16/I64 tensors, then their data.
pub fn write_safetensors(p: &Path, seed: u64) {
    let tensors: Vec<(String, &str, Vec<usize>)> = (0..6)
        .flat_map(|l| {
            vec![
                (format!("model.layers.{l}.self_attn.q_proj.weight"), "F32", vec![256, 256]),
                (format!("model.layers.{l}.mlp.up_proj.weight"), "F16", vec![512, 256]),
                (format!("model.layers.{l}.input_layernorm.weight"), "F32", vec![256]),
            ]
        })
        .chain(std::iter::once(("model.embed_positions".to_string(), "I64", vec![1024])))
        .collect();
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0usize;
    for (name, dt, shape) in &tensors {
        let size = match *dt {
            "F32" => 4,
            "F16" => 2,
            _ => 8,
        } * shape.iter().product::<usize>();
        header.insert(name.clone(), serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + size]}));
        off += size;
    }
    let mut h = serde_json::to_vec(&header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    // F16/F32 payloads: finite values only (random bits could be NaN, which never compares equal).
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = Vec::with_capacity(off);
    for (_, dt, shape) in &tensors {
        let n: usize = shape.iter().product();
        for _ in 0..n {
            match *dt {
                "F32" => data.extend_from_slice(&(r.gen_range(-1.0f32..1.0)).to_le_bytes()),
                "F16" => data.extend_from_slice(&(r.gen_range(0x0000u16..0x7800)).to_le_bytes()),
                _ => data.extend_from_slice(&r.gen::<i64>().to_le_bytes()),
            }
        }
    }
    let mut f = std::fs::File::create(p).unwrap();
    f.write_all(&(h.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&h).unwrap();
    f.write_all(&data).unwrap();
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// One real agent process with its own mountpoint, cache dir and admin port.
pub struct Agent {
    pub child: Option<Child>,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub admin: SocketAddr,
    pub log: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_cachefs")
}

impl Agent {
    /// Start `cachefs mount --source SOURCE` plus `extra` flags; waits until /readyz is 200.
    pub fn start(source: &str, extra: &[&str]) -> Agent {
        Self::start_env(source, extra, &[])
    }

    /// [`Agent::start`] with extra environment variables for the agent process.
    pub fn start_env(source: &str, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let tmp = tempfile::tempdir().unwrap();
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let cache_dir = PathBuf::from(format!("/dev/shm/cachefs-test-{}-{n}", std::process::id()));
        Self::start_full(source, extra, tmp.path().join("mnt"), cache_dir, tmp, env)
    }

    pub fn start_with(source: &str, extra: &[&str], mountpoint: PathBuf, cache_dir: PathBuf, tmp: tempfile::TempDir) -> Agent {
        Self::start_full(source, extra, mountpoint, cache_dir, tmp, &[])
    }

    fn start_full(
        source: &str,
        extra: &[&str],
        mountpoint: PathBuf,
        cache_dir: PathBuf,
        tmp: tempfile::TempDir,
        env: &[(&str, &str)],
    ) -> Agent {
        // The admin port was free when picked; another process (an outgoing connection of an
        // agent, say) can take it before the agent binds it: then start again on another.
        let mut tries = 0;
        loop {
            match Self::try_start(source, extra, mountpoint.clone(), cache_dir.clone(), &tmp, env) {
                Ok(mut a) => {
                    a._tmp = Some(tmp);
                    return a;
                }
                Err(log) if tries < 3 && log.contains("cannot listen on admin address") => tries += 1,
                Err(log) => panic!("agent did not become ready; log:\n{log}"),
            }
        }
    }

    fn try_start(
        source: &str,
        extra: &[&str],
        mountpoint: PathBuf,
        cache_dir: PathBuf,
        tmp: &tempfile::TempDir,
        env: &[(&str, &str)],
    ) -> Result<Agent, String> {
        let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let log = tmp.path().join(format!("agent-{}.log", admin.port()));
        let logf = std::fs::File::create(&log).unwrap();
        let mut args: Vec<String> = vec![
            "mount".into(),
            "--source".into(),
            source.into(),
            "--mountpoint".into(),
            mountpoint.display().to_string(),
            "--cache-dir".into(),
            cache_dir.display().to_string(),
            "--admin".into(),
            admin.to_string(),
        ];
        if !extra.contains(&"--cache-size") {
            args.extend(["--cache-size".into(), "1GiB".into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let child = Command::new(bin())
            .args(&args)
            .env("RUST_LOG", std::env::var("CACHEFS_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("spawn cachefs");
        let mut a = Agent { child: Some(child), mountpoint, cache_dir, admin, log, _tmp: None };
        let ok = poll_until(Duration::from_secs(30), || {
            if let Some(Ok(Some(_))) = a.child.as_mut().map(|c| c.try_wait()) {
                return true;
            }
            matches!(http_get(a.admin, "/readyz"), Some((200, _)))
        });
        let exited = a.child.as_mut().map(|c| c.try_wait()).and_then(|r| r.ok()).flatten();
        if !ok || exited.is_some() {
            let text = format!("(exit {exited:?})\n{}", a.log_text());
            a.kill9();
            // Not dropped: that would remove the cache directory the next try may reuse.
            std::mem::forget(a);
            return Err(text);
        }
        Ok(a)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn metrics(&self) -> HashMap<String, f64> {
        let (status, body) = http_get(self.admin, "/metrics").expect("metrics");
        assert_eq!(status, 200);
        parse_metrics(&body)
    }

    pub fn metric(&self, name: &str) -> f64 {
        *self.metrics().get(name).unwrap_or_else(|| panic!("metric {name} missing"))
    }

    /// The agent's `/status` document (Null when it does not answer).
    pub fn status(&self) -> serde_json::Value {
        http_get(self.admin, "/status").and_then(|(_, b)| serde_json::from_str(&b).ok()).unwrap_or_default()
    }

    /// Peers the agent's `/status` calls live.
    pub fn live_peers(&self) -> usize {
        self.status()["peers"].as_array().map(|p| p.iter().filter(|p| p["state"] == "live").count()).unwrap_or(0)
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.mountpoint.join(rel)
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// SIGTERM and wait; returns the exit status code.
    pub fn stop(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let mut code = None;
        poll_until(Duration::from_secs(20), || match child.try_wait() {
            Ok(Some(s)) => {
                code = s.code();
                true
            }
            _ => false,
        });
        if code.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        code
    }

    /// SIGKILL: leaves a stale mount behind.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn is_mounted(p: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let p = p.display().to_string();
    mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(p.as_str()))
}

pub fn lazy_unmount(p: &Path) {
    if let Ok(c) = std::ffi::CString::new(p.display().to_string()) {
        // SAFETY: valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// Remove an agent's cache directory, with the huge-page tmpfs the agent may have mounted on it.
pub fn remove_cache_dir(dir: &Path) {
    if is_mounted(dir) {
        lazy_unmount(dir);
    }
    let _ = std::fs::remove_dir_all(dir);
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if is_mounted(&self.mountpoint) {
            lazy_unmount(&self.mountpoint);
        }
        remove_cache_dir(&self.cache_dir);
    }
}
pub mod fake_http;
pub mod fake_peer;
pub mod fake_s3;
pub mod fault_proxy;
pub mod weed;
