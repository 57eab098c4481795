//! How the peer mesh behaves while it forms and changes, with real agent processes on 127.0.0.1:
//! agents started in either order or together, a remote hit right after the first read, several
//! agents cold-loading one file at once, and a peer restarted while another reads from it.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

const CHUNK: &str = "4MiB";

fn peer_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

fn origin_bytes(a: &Agent) -> f64 {
    a.metric("cachefs_origin_bytes_total")
}

fn tier(a: &Agent, t: &str) -> f64 {
    a.metric(&format!("cachefs_read_bytes_total{{tier=\"{t}\"}}"))
}

fn start(src: &Path, listen: &str, peers: &[&str]) -> Agent {
    let peers = peers.join(",");
    let mut args = vec!["--listen", listen, "--chunk-size", CHUNK];
    if !peers.is_empty() {
        args.extend(["--peers", &peers]);
    }
    Agent::start(&src.display().to_string(), &args)
}

/// Start agents at the same moment (one thread each); returned in the order given.
fn start_together(src: &Path, specs: Vec<(String, Vec<String>)>) -> Vec<Agent> {
    let threads: Vec<_> = specs
        .into_iter()
        .map(|(listen, peers)| {
            let src = src.to_path_buf();
            std::thread::spawn(move || {
                let p: Vec<&str> = peers.iter().map(String::as_str).collect();
                start(&src, &listen, &p)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().expect("agent start")).collect()
}

/// Files of the remote-hit trials: large and small, a last chunk of one byte, an empty file.
fn files() -> Vec<(&'static str, usize)> {
    vec![("model.safetensors", 64 << 20), ("config.json", 3_000), ("tokenizer.bin", (4 << 20) + 1), ("empty", 0)]
}

#[derive(Debug, Clone, Copy)]
enum Order {
    AFirst,
    BFirst,
    Together,
}

/// A and B each list the other; A reads every file, then B does at once: B's bytes are right
/// and every one came from A's memory, none from the origin.
fn remote_hit_trial(src: &Path, order: Order, trial: usize) {
    let (a_addr, b_addr) = (peer_addr(), peer_addr());
    let (a, b) = match order {
        Order::AFirst => {
            let a = start(src, &a_addr, &[&b_addr]);
            (a, start(src, &b_addr, &[&a_addr]))
        }
        Order::BFirst => {
            let b = start(src, &b_addr, &[&a_addr]);
            (start(src, &a_addr, &[&b_addr]), b)
        }
        Order::Together => {
            let mut v = start_together(src, vec![(a_addr.clone(), vec![b_addr.clone()]), (b_addr.clone(), vec![a_addr.clone()])]);
            let b = v.pop().unwrap();
            (v.pop().unwrap(), b)
        }
    };
    let mut total = 0usize;
    for (name, size) in files() {
        assert_eq!(sha256_file(&a.path(name)), sha256_file(&src.join(name)), "{order:?} trial {trial}: A read wrong bytes of {name}");
        total += size;
    }
    // While A read, B owned some chunks and filled them for A from the origin: those it holds.
    let filled_for_a = origin_bytes(&b);
    assert_eq!(origin_bytes(&a) + filled_for_a, total as f64, "{order:?} trial {trial}: the origin served each byte once");
    for (name, _) in files() {
        assert_eq!(sha256_file(&b.path(name)), sha256_file(&src.join(name)), "{order:?} trial {trial}: B read wrong bytes of {name}");
    }
    let leaked = origin_bytes(&b) - filled_for_a;
    assert_eq!(leaked, 0.0, "{order:?} trial {trial}: B fetched {leaked} bytes from the origin; B's log:\n{}", b.log_text());
    assert_eq!(tier(&b, "peer"), total as f64 - filled_for_a, "{order:?} trial {trial}: bytes credited to the peer tier");
    // B's own chunks are memory hits (files wholly its own are read through passthrough, unseen).
    assert!(tier(&b, "memory") <= filled_for_a, "{order:?} trial {trial}: memory hits beyond B's own chunks");
    assert_eq!(tier(&b, "origin"), 0.0, "{order:?} trial {trial}: no byte of B's read came from the origin");
}

fn remote_hit_trials(order: Order, name: &str) {
    if !fuse_available(name) {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    for (i, (f, size)) in files().into_iter().enumerate() {
        write_random(&src.path().join(f), size, 100 + i as u64);
    }
    for trial in 0..20 {
        remote_hit_trial(src.path(), order, trial);
    }
}

#[test]
fn remote_hit_every_time_when_a_starts_first() {
    remote_hit_trials(Order::AFirst, "remote_hit_every_time_when_a_starts_first");
}

#[test]
fn remote_hit_every_time_when_b_starts_first() {
    remote_hit_trials(Order::BFirst, "remote_hit_every_time_when_b_starts_first");
}

#[test]
fn remote_hit_every_time_when_started_together() {
    remote_hit_trials(Order::Together, "remote_hit_every_time_when_started_together");
}

/// `n` agents, each listing all others, started together, cold-read one 256 MiB file at the
/// same moment: the origin serves it about once.
fn cold_at_once(n: usize, runs: usize, name: &str) {
    if !fuse_available(name) {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let size = 256usize << 20;
    for run in 0..runs {
        let file = format!("cold-{run}.bin");
        write_random(&src.path().join(&file), size, 200 + run as u64);
        let want = sha256_file(&src.path().join(&file));
        let addrs: Vec<String> = (0..n).map(|_| peer_addr()).collect();
        let specs = (0..n).map(|i| (addrs[i].clone(), addrs.iter().filter(|a| **a != addrs[i]).cloned().collect())).collect();
        let agents = start_together(src.path(), specs);
        let readers: Vec<_> = agents
            .iter()
            .map(|a| {
                let p = a.path(&file);
                std::thread::spawn(move || sha256_file(&p))
            })
            .collect();
        for r in readers {
            assert_eq!(r.join().unwrap(), want, "{n} agents, run {run}: wrong bytes");
        }
        let fetched: f64 = agents.iter().map(origin_bytes).sum();
        let ratio = fetched / size as f64;
        eprintln!("{n} agents cold at once, run {run}: origin bytes / file size = {ratio:.3}");
        assert!(ratio <= 1.02, "{n} agents, run {run}: the origin served {ratio:.3} x the file");
        std::fs::remove_file(src.path().join(&file)).unwrap();
    }
}

#[test]
fn three_agents_cold_load_at_once() {
    cold_at_once(3, 10, "three_agents_cold_load_at_once");
}

#[test]
fn four_agents_cold_load_at_once() {
    cold_at_once(4, 10, "four_agents_cold_load_at_once");
}

/// A holds the file; B reads it while A is killed and restarted (same address, same cache):
/// B's bytes are right and no read waits past the deadline. The restarted A is then a peer
/// again at once: B's remote hit of a file A read after its restart costs the origin nothing.
#[test]
fn peer_killed_and_restarted_while_b_reads() {
    if !fuse_available("peer_killed_and_restarted_while_b_reads") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes(128 << 20, 301);
    std::fs::write(src.path().join("m.bin"), &data).unwrap();
    write_random(&src.path().join("after.bin"), 32 << 20, 302);
    let s = src.path().display().to_string();
    let (a_addr, b_addr) = (peer_addr(), peer_addr());
    let a_args = ["--listen", &a_addr, "--peers", &b_addr, "--chunk-size", CHUNK];
    let work = tempfile::tempdir().unwrap();
    let a_cache = std::path::PathBuf::from(format!("/dev/shm/cachefs-mesh-{}", std::process::id()));
    let start_a = || Agent::start_with(&s, &a_args, work.path().join("mnt"), a_cache.clone(), tempfile::tempdir().unwrap());
    let mut a = start_a();
    assert!(std::fs::read(a.path("m.bin")).unwrap() == data);
    let b = start(src.path(), &b_addr, &[&a_addr]);

    let mut f = std::fs::File::open(b.path("m.bin")).unwrap();
    let (mut got, mut buf) = (Vec::with_capacity(data.len()), vec![0u8; 1 << 20]);
    let mut slowest = Duration::ZERO;
    let mut restarted = None;
    loop {
        let t = Instant::now();
        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("B's read failed: {e}; log:\n{}", b.log_text()));
        slowest = slowest.max(t.elapsed());
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if restarted.is_none() && got.len() >= 32 << 20 {
            a.kill9();
            if is_mounted(&a.mountpoint) {
                lazy_unmount(&a.mountpoint);
            }
            std::mem::forget(a);
            a = start_a();
            restarted = Some(());
        }
    }
    assert!(restarted.is_some());
    assert!(got == data, "B's bytes differ after A was restarted");
    assert!(slowest < Duration::from_secs(30), "a read took {slowest:?}, past the read deadline");

    // The restarted A (a new node id at the old address) serves again.
    assert_eq!(sha256_file(&a.path("after.bin")), sha256_file(&src.path().join("after.bin")));
    let before = origin_bytes(&b);
    assert_eq!(sha256_file(&b.path("after.bin")), sha256_file(&src.path().join("after.bin")));
    assert_eq!(origin_bytes(&b), before, "B went to the origin for a file the restarted A holds; log:\n{}", b.log_text());
}
