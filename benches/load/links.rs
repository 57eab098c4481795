//! The load bench on emulated links (see `netns`): each agent and the origin in a namespace of
//! its own, rows as ratios to the same links' measured capacity, and the seed system's table.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;

use super::common::weed::Weed;
use super::common::{http_get, parse_metrics, poll_until, Agent};
use super::netns::{connect_rtt, delay_relay, in_ns, tcp_stream, Net, Node};
use super::{cpu_seconds, crc_file, median, upload_file, write_model, Bench};

/// The link profile (`--link-rtt-ms`, `--link-gbps`, `--origin-rtt-ms`, `--origin-mbps`) and the
/// seed table's sizes (`--sizes`).
#[derive(Clone, Debug)]
pub struct Profile {
    pub link_gbps: f64,
    pub link_rtt_ms: f64,
    pub origin_rtt_ms: f64,
    pub origin_mbps: f64,
    pub sizes: Vec<u64>,
}

const RELAY_PORT: u16 = 9000;
const AGENT_PORT: u16 = 7070;
const KEY: &str = "model.safetensors";

/// The emulated network of one run: origin, three holders, a reader, and a sender with an
/// unlimited uplink that measures the reader's link.
struct Links {
    net: Net,
    origin: Node,
    holders: Vec<Node>,
    reader: Node,
    probe: Node,
    /// `--source-option`s that reach the origin through its relay.
    options: Vec<String>,
    weed: Weed,
}

impl Links {
    fn build(p: &Profile) -> Result<Links, String> {
        let mut net = Net::create()?;
        let origin = net.node("origin", 1)?;
        let holders = (0..3).map(|i| net.node(&format!("h{i}"), 2 + i)).collect::<Result<Vec<_>, _>>()?;
        let reader = net.node("reader", 10)?;
        let probe = net.node("probe", 20)?;
        let link = p.link_gbps * 1e9;
        for n in holders.iter().chain([&reader]) {
            net.shape(n, link, link)?;
        }
        net.shape(&probe, link * 8.0, link * 8.0)?;
        net.shape(&origin, p.origin_mbps * 8e6, link)?;
        let weed = in_ns(&origin.ns, || Weed::start("links")).ok_or("weed (SeaweedFS) is not available")?;
        let upstream = SocketAddr::from(([127, 0, 0, 1], weed.s3_port));
        delay_relay(&origin.ns, SocketAddr::from((origin.ip, RELAY_PORT)), upstream, Duration::from_secs_f64(p.origin_rtt_ms / 1e3))?;
        let mut options = vec![];
        for (k, v) in super::common::weed::s3_options(weed.s3_port) {
            let v = if k == "endpoint" { format!("http://{}:{RELAY_PORT}", origin.ip) } else { v };
            options.extend(["--source-option".to_string(), format!("{k}={v}")]);
        }
        Ok(Links { net, origin, holders, reader, probe, options, weed })
    }

    /// Put `path` at `key` in the origin (from inside its namespace, past the link).
    fn upload(&self, key: &str, path: &Path) {
        in_ns(&self.origin.ns, || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                self.weed.put("ready", b"ok".to_vec()).await;
                upload_file(self.weed.store(), key, path).await;
            })
        })
    }

    fn agent(&self, on: &Node, peers: &[&Node], cache: u64) -> Agent {
        let mut args = vec!["--cache-size".to_string(), format!("{cache}B"), "--listen".into(), format!("{}:{AGENT_PORT}", on.ip)];
        if !peers.is_empty() {
            args.push("--peers".into());
            args.push(peers.iter().map(|p| format!("{}:{AGENT_PORT}", p.ip)).collect::<Vec<_>>().join(","));
        }
        args.extend(self.options.iter().cloned());
        let a = in_ns(&on.ns, || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            Agent::start("s3://links", &a)
        });
        if !peers.is_empty() {
            let live = || http_get(a.admin, "/status").is_some_and(|(_, s)| s.matches("\"live\"").count() >= peers.len());
            assert!(in_ns(&on.ns, || poll_until(Duration::from_secs(20), live)), "the agent never saw its peers live");
        }
        a
    }

    /// The ranged GETs the agent's readahead stands beside: `conc` at a time through the
    /// reader's link, every length checked. Seconds.
    fn ranged_gets(&self, size: u64, conc: usize) -> f64 {
        let mut b = object_store::aws::AmazonS3Builder::new().with_bucket_name("links");
        for pair in self.options.chunks(2) {
            if let Some((k, v)) = pair[1].split_once('=') {
                b = b.with_config(k.parse().expect("an S3 option"), v);
            }
        }
        let store: Arc<dyn ObjectStore> = Arc::new(b.build().expect("an S3 client"));
        in_ns(&self.reader.ns, || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            super::parallel_ranged_on(&rt, store, KEY, size, conc)
        })
    }
}

fn metrics_in(ns: &str, a: &Agent) -> std::collections::HashMap<String, f64> {
    in_ns(ns, || parse_metrics(&http_get(a.admin, "/metrics").expect("metrics").1))
}

/// Read the model through `a`'s mount: (seconds, agent CPU seconds); bytes checked when `check`.
fn timed_read(a: &Agent, size: u64, crc: Option<u32>, key: &str) -> (f64, f64) {
    let c0 = cpu_seconds(a.pid());
    let (n, s) = super::read_file(&a.path(key));
    let cpu = cpu_seconds(a.pid()) - c0;
    assert_eq!(n, size, "{key}: short read");
    if let Some(c) = crc {
        assert_eq!(crc_file(&a.path(key)), c, "{key}: bytes differ from the origin's");
    }
    (s, cpu)
}

/// Rounds of each row: the first (fresh memory: this VM reports freed pages to its host, so
/// the first touch after an agent's exit is slow again) is a warm-up, the median is of the rest.
fn rounds(b: &Bench) -> usize {
    b.opts.runs + 1
}

pub fn warm_up(i: usize) -> &'static str {
    if i == 0 {
        " (warm-up, not counted)"
    } else {
        ""
    }
}

/// Tag the last row with its profile and its ratio to `link_gbs`.
fn tag(b: &mut Bench, p: &Profile, link_gbs: f64) {
    if let Some(r) = b.rows.last_mut() {
        let gbs = r["gb_per_s"].as_f64().unwrap_or(0.0);
        r["vs_link"] = serde_json::json!(gbs / link_gbs);
        r["section"] = serde_json::json!("links");
        r["profile"] = serde_json::json!({
            "link_gbps": p.link_gbps, "link_rtt_ms": p.link_rtt_ms,
            "origin_rtt_ms": p.origin_rtt_ms, "origin_mbps": p.origin_mbps,
        });
    }
}

/// The emulated-link rows and the seed table. Skipped, loudly, where namespaces can't be made.
pub fn run(b: &mut Bench, p: &Profile, model: &Path, src_crc: u32, work: &Path) {
    eprintln!("emulated links: {p:?} ...");
    let l = match Links::build(p) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("\n!!!!!!!! emulated-link rows SKIPPED: {e} (needs root, `ip` and `tc`) !!!!!!!!\n");
            return;
        }
    };
    let size = b.size;
    l.upload(KEY, model);
    let rtt = connect_rtt(&l.reader, &l.holders[0]);
    let origin_rtt = connect_rtt(&l.reader, &l.origin);
    eprintln!("  measured connect time: peer link {rtt:?}, origin link {origin_rtt:?} (the relay adds the origin's RTT to requests)");
    let runs = b.opts.runs;
    let peer_ref = median((0..runs).map(|_| tcp_stream(&l.holders[0], &l.reader, size)).collect());
    let reader_ref = median((0..runs).map(|_| tcp_stream(&l.probe, &l.reader, size)).collect());
    let origin_bytes = (size / 4).max(64 << 20);
    let origin_ref = median((0..runs).map(|_| tcp_stream(&l.origin, &l.reader, origin_bytes)).collect());
    let (peer_gbs, reader_gbs, origin_gbs) =
        (size as f64 / peer_ref / 1e9, size as f64 / reader_ref / 1e9, origin_bytes as f64 / origin_ref / 1e9);
    let rtt_note = format!("veth round trip {:.3} ms (no netem here: --link-rtt-ms {} not added)", rtt.as_secs_f64() * 1e3, p.link_rtt_ms);
    b.row("link reference: one TCP stream, holder to reader", vec![peer_ref], size, rtt_note.clone());
    tag(b, p, peer_gbs);
    b.row("link reference: one TCP stream to the reader, unlimited sender", vec![reader_ref], size, String::new());
    tag(b, p, reader_gbs);
    b.row("link reference: one TCP stream from the origin", vec![origin_ref], origin_bytes, format!("{} MB/s", p.origin_mbps));
    tag(b, p, origin_gbs);
    let ranged = (0..runs).map(|_| l.ranged_gets(size, 16)).collect();
    b.row("origin link: parallel ranged GETs (8 MiB x 16) through the relay", ranged, size, format!("RTT {} ms", p.origin_rtt_ms));
    tag(b, p, origin_gbs);
    let ranged_gbs = b.rows.last().and_then(|r| r["gb_per_s"].as_f64()).unwrap_or(f64::NAN);

    let holder = cold_row(b, p, &l, size, src_crc, (origin_gbs, ranged_gbs));
    remote_row(b, p, &l, &holder, size, src_crc, peer_gbs);
    striped_row(b, p, &l, holder, size, src_crc, reader_gbs);
    seed_table(b, &l, p, work);
}

/// Cold reads from the far origin by fresh agents on holder 0; returns the last (it then holds
/// the file).
fn cold_row(b: &mut Bench, p: &Profile, l: &Links, size: u64, crc: u32, (origin_gbs, ranged_gbs): (f64, f64)) -> Agent {
    let (mut secs, mut cpu, mut keep) = (vec![], vec![], None);
    for i in 0..rounds(b) {
        // The last run's agent leaves the port first.
        drop(keep.take());
        let a = l.agent(&l.holders[0], &[], size + (512 << 20));
        let (s, c) = timed_read(&a, size, (i == 0).then_some(crc), KEY);
        eprintln!("    cold run {i}: {s:.3} s, {c:.2} CPU s{}", warm_up(i));
        if i > 0 {
            secs.push(s);
            cpu.push(c);
        }
        keep = Some(a);
    }
    let a = keep.expect("at least one run");
    let ob = metrics_in(&l.holders[0].ns, &a).get("cachefs_origin_bytes_total").copied().unwrap_or(0.0);
    let gbs = size as f64 / median(secs.clone()) / 1e9;
    let note = format!(
        "origin {} ms, {} MB/s; {:.2}x the ranged GETs; origin bytes/file {:.3}",
        p.origin_rtt_ms,
        p.origin_mbps,
        gbs / ranged_gbs,
        ob / size as f64
    );
    b.miss_row("cold over the origin link: first read through a mount", secs, cpu, size, note);
    tag(b, p, origin_gbs);
    if let Some(r) = b.rows.last_mut() {
        r["vs_ranged_gets"] = serde_json::json!(gbs / ranged_gbs);
    }
    a
}

/// Fresh agents on the reader read from the one holder over one link.
fn remote_row(b: &mut Bench, p: &Profile, l: &Links, holder: &Agent, size: u64, crc: u32, peer_gbs: f64) {
    let _ = holder;
    let (mut secs, mut cpu) = (vec![], vec![]);
    let mut note = String::new();
    for i in 0..rounds(b) {
        let r = l.agent(&l.reader, &[&l.holders[0]], size + (512 << 20));
        let (s, c) = timed_read(&r, size, (i == 0).then_some(crc), KEY);
        let m = metrics_in(&l.reader.ns, &r);
        let (ob, pb) = (
            m.get("cachefs_origin_bytes_total").copied().unwrap_or(0.0),
            m.get("cachefs_peer_received_bytes_total").copied().unwrap_or(0.0),
        );
        eprintln!("    remote run {i}: {s:.3} s, {c:.2} CPU s, origin bytes {ob}, peer bytes {pb}{}", warm_up(i));
        assert_eq!(ob, 0.0, "a remote hit over the link went to the origin");
        note = format!("{} Gbit/s link; origin bytes 0; peer bytes/file {:.3}", p.link_gbps, pb / size as f64);
        if i > 0 {
            secs.push(s);
            cpu.push(c);
        }
    }
    b.miss_row("remote hit over one link: a reader takes the file from one holder", secs, cpu, size, note);
    tag(b, p, peer_gbs);
}

/// Two more holders load from the first; then each holder's uplink is a third of the reader's
/// link and fresh readers take the file from all three.
fn striped_row(b: &mut Bench, p: &Profile, l: &Links, first: Agent, size: u64, crc: u32, reader_gbs: f64) {
    let cache = size + (512 << 20);
    let others: Vec<Agent> = l.holders[1..].iter().map(|h| l.agent(h, &[&l.holders[0]], cache)).collect();
    for (h, a) in l.holders[1..].iter().zip(&others) {
        let _ = timed_read(a, size, None, KEY);
        let ob = metrics_in(&h.ns, a).get("cachefs_origin_bytes_total").copied().unwrap_or(0.0);
        eprintln!("    holder {} loaded (origin bytes {ob})", h.ns);
    }
    let link = p.link_gbps * 1e9;
    for h in &l.holders {
        l.net.shape(h, link / 3.0, link).expect("reshape a holder's uplink");
    }
    let holders: Vec<&Node> = l.holders.iter().collect();
    let (mut secs, mut cpu, mut shares) = (vec![], vec![], String::new());
    for i in 0..rounds(b) {
        let before: Vec<f64> = l.holders.iter().zip([&first].into_iter().chain(&others)).map(|(h, a)| sent(h, a)).collect();
        let r = l.agent(&l.reader, &holders, cache);
        let (s, c) = timed_read(&r, size, (i == 0).then_some(crc), KEY);
        let got: Vec<String> = l
            .holders
            .iter()
            .zip([&first].into_iter().chain(&others))
            .zip(&before)
            .map(|((h, a), b0)| format!("{:.2}", (sent(h, a) - b0) / size as f64))
            .collect();
        eprintln!("    striped run {i}: {s:.3} s, {c:.2} CPU s, share per holder {got:?}{}", warm_up(i));
        shares = format!(
            "3 holders at {:.2} Gbit/s up each, reader {} Gbit/s; share per holder {}",
            p.link_gbps / 3.0,
            p.link_gbps,
            got.join("/")
        );
        if i > 0 {
            secs.push(s);
            cpu.push(c);
        }
    }
    for h in &l.holders {
        l.net.shape(h, link, link).expect("restore a holder's uplink");
    }
    b.miss_row("striped remote hit: a reader takes the file from 3 holders", secs, cpu, size, shares);
    tag(b, p, reader_gbs);
}

fn sent(h: &Node, a: &Agent) -> f64 {
    metrics_in(&h.ns, a).get("cachefs_peer_sent_bytes_total").copied().unwrap_or(0.0)
}

/// The seed system's table: per size, a cold read from the far origin and a remote hit.
fn seed_table(b: &mut Bench, l: &Links, p: &Profile, work: &Path) {
    for (i, &target) in p.sizes.iter().enumerate() {
        let path = work.join(format!("seed-{i}.safetensors"));
        let (size, _) = write_model(&path, target);
        let crc = crc_file(&path);
        let key = format!("seed-{i}.safetensors");
        l.upload(&key, &path);
        let _ = std::fs::remove_file(&path);
        let cache = size + (512 << 20);
        let (mut cold, mut remote) = (vec![], vec![]);
        for run in 0..rounds(b) {
            let h = l.agent(&l.holders[0], &[], cache);
            let c = timed_read(&h, size, (run == 0).then_some(crc), &key).0;
            // The holder took the memory freed last round; the reader's is older (see pretouch).
            super::pretouch(2 * size);
            let r = l.agent(&l.reader, &[&l.holders[0]], cache);
            let rs = timed_read(&r, size, (run == 0).then_some(crc), &key).0;
            eprintln!("    seed {}: cold {c:.2} s, remote {rs:.2} s{}", cachefs::size::format_size(size), warm_up(run));
            if run > 0 {
                cold.push(c);
                remote.push(rs);
            }
        }
        let (c, r) = (median(cold), median(remote));
        b.seed_table.push(serde_json::json!({"size_bytes": size, "cold_seconds": c, "remote_seconds": r, "remote_vs_cold": c / r}));
    }
    let _ = p;
}

/// The markdown of the link rows and the seed table.
pub fn report(b: &Bench, p: &Profile) -> String {
    let mut t = format!(
        "Emulated links: peer links {} Gbit/s each way, origin {} ms RTT and {} MB/s (the origin's whole uplink); rows as a ratio to the same link's one TCP stream.\n\n",
        p.link_gbps, p.origin_rtt_ms, p.origin_mbps
    );
    t.push_str("| row | time (s) | GB/s | vs link | agent CPU s/GiB | notes |\n|---|---:|---:|---:|---:|---|\n");
    for r in b.rows.iter().filter(|r| r["section"] == "links") {
        let cpu = r["cpu_seconds_per_gib"].as_f64().map(|c| format!("{c:.2}")).unwrap_or_default();
        t.push_str(&format!(
            "| {} | {:.2} | {:.3} | {:.2}x | {cpu} | {} |\n",
            r["row"].as_str().unwrap_or(""),
            r["seconds"].as_f64().unwrap_or(f64::NAN),
            r["gb_per_s"].as_f64().unwrap_or(f64::NAN),
            r["vs_link"].as_f64().unwrap_or(f64::NAN),
            r["note"].as_str().unwrap_or("")
        ));
    }
    if !b.seed_table.is_empty() {
        t.push_str(&format!(
            "\nThe seed system's table (origin {} MB/s, {} ms away; the seed published 5.9x on 7.2 GB):\n\n",
            p.origin_mbps, p.origin_rtt_ms
        ));
        t.push_str("| model | cold (s) | remote hit (s) | remote vs cold |\n|---|---:|---:|---:|\n");
        for s in &b.seed_table {
            t.push_str(&format!(
                "| {:.1} GB | {:.1} | {:.2} | {:.1}x |\n",
                s["size_bytes"].as_f64().unwrap_or(0.0) / 1e9,
                s["cold_seconds"].as_f64().unwrap_or(f64::NAN),
                s["remote_seconds"].as_f64().unwrap_or(f64::NAN),
                s["remote_vs_cold"].as_f64().unwrap_or(f64::NAN)
            ));
        }
    }
    t
}
