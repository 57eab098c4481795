//! Control traffic and connections stay bounded, with real agent processes on 127.0.0.1: idle
//! agents check each other by gossip at a steady rate (not back to back, no Hello storm), and a flood of raw data
//! connections that stall in their preamble costs the agent nothing once they time out, while
//! honest reads go on.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn control(a: &Agent, kind: &str, direction: &str) -> f64 {
    a.metric(&format!("cachefs_control_messages_total{{kind=\"{kind}\",direction=\"{direction}\"}}"))
}

/// A Hello from a peer already known to be up must not wake the probe loop: with three agents
/// listing each other, each answered probe used to start the other side's next round at once,
/// so the agents probed back to back (thousands of Hellos a second on loopback). Now gossip
/// checks known peers (one probe per period, a little gossip) and Hello asks only about peers
/// not known to be up, or every 30 s.
#[test]
fn idle_agents_check_each_other_at_a_steady_bounded_rate() {
    if !fuse_available("idle_agents_check_each_other_at_a_steady_bounded_rate") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("model.bin"), 1 << 20, 5);
    let s = src.path().display().to_string();
    let addrs = [peer_addr(), peer_addr(), peer_addr()];
    let agents: Vec<Agent> = (0..3)
        .map(|i| {
            let others: Vec<&str> = (0..3).filter(|j| *j != i).map(|j| addrs[j].as_str()).collect();
            Agent::start(&s, &["--listen", &addrs[i], "--peers", &others.join(",")])
        })
        .collect();
    for a in &agents {
        assert!(poll_until(Duration::from_secs(15), || a.live_peers() == 2), "peers did not converge: {}", a.log_text());
    }
    let window = Duration::from_secs(10);
    let counts = |a: &Agent| ["hello", "gossip"].map(|k| (control(a, k, "sent"), control(a, k, "received")));
    let before: Vec<_> = agents.iter().map(counts).collect();
    let started = Instant::now();
    // A measuring window: the agents are left idle, nothing is waited for.
    std::thread::sleep(window);
    let secs = started.elapsed().as_secs_f64();
    // Hello: at most one probe of each of 2 peers per 2 s interval, plus a round of slack at
    // each end (in fact none: both are known up). Gossip: a probe every 1.5 s and its answer,
    // indirect probes, gossip to 2 members a second: well under 8 messages a second each way.
    let hello_bound = 2.0 * (secs / 2.0 + 2.0);
    let gossip_bound = 8.0 * secs;
    for (a, [(h_sent0, h_recv0), (g_sent0, g_recv0)]) in agents.iter().zip(before) {
        let [(h_sent, h_recv), (g_sent, g_recv)] = counts(a);
        let (h_sent, h_recv, g_sent, g_recv) = (h_sent - h_sent0, h_recv - h_recv0, g_sent - g_sent0, g_recv - g_recv0);
        assert!(g_sent >= 4.0, "an idle agent stopped checking its peers ({g_sent} gossip messages in {secs:.1} s)");
        assert!(
            h_sent <= hello_bound && h_recv <= hello_bound,
            "{h_sent} Hellos sent, {h_recv} received in {secs:.1} s by an idle agent with 2 peers (at most {hello_bound})"
        );
        assert!(
            g_sent <= gossip_bound && g_recv <= gossip_bound,
            "{g_sent} gossip messages sent, {g_recv} received in {secs:.1} s by an idle agent (at most {gossip_bound})"
        );
        eprintln!("idle agent, {secs:.1} s: hello {h_sent}/{h_recv}, gossip {g_sent}/{g_recv} (sent/received)");
    }
}

fn fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

fn rss_anon_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap_or("RssAnon: 0 kB");
    line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn target_port(addr: &str) -> u16 {
    addr.rsplit_once(':').and_then(|(_, p)| p.parse().ok()).unwrap()
}

/// Connections the agent on `port` keeps open to the flood's address (127.0.0.2), from
/// /proc/net/tcp: its side of each, ESTABLISHED.
fn flood_held_by_agent(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    let local = format!("0100007F:{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1] == local && f[2].starts_with("0200007F:") && f[3] == "01"
        })
        .count()
}

/// Let this process (and the agents it starts) hold as many descriptors as the hard limit
/// allows; returns that number.
fn raise_fd_limit() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit with a valid struct.
    let rc = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim)
    };
    assert_eq!(rc, 0, "cannot raise RLIMIT_NOFILE: {}", std::io::Error::last_os_error());
    lim.rlim_cur
}

/// 10,000 connections from one address that send the raw path's magic and a token length,
/// then stall. Each used to hold a task and a descriptor forever (no deadline on the preamble,
/// no cap on connections). Now at most a per-source cap get in, they are closed at the
/// preamble deadline, and another agent's reads through the raw path go on meanwhile.
#[test]
fn stalled_raw_preambles_cost_nothing_once_they_time_out() {
    if !fuse_available("stalled_raw_preambles_cost_nothing_once_they_time_out") {
        return;
    }
    // 10,000 where the descriptor limit allows it (this test holds them all).
    let limit = raise_fd_limit();
    assert!(limit >= 4096, "RLIMIT_NOFILE is {limit}: too low for a flood test");
    let flood_n = 10_000.min(limit as usize - 2000);
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("model.bin"), 64 << 20, 7);
    write_random(&src.path().join("second.bin"), 64 << 20, 8);
    let want = sha256_file(&src.path().join("model.bin"));
    let want2 = sha256_file(&src.path().join("second.bin"));
    let s = src.path().display().to_string();
    let (a_addr, b_addr) = (peer_addr(), peer_addr());
    let a = Agent::start(&s, &["--listen", &a_addr, "--peers", &b_addr, "--chunk-size", "4MiB"]);
    assert_eq!(sha256_file(&a.path("model.bin")), want);
    assert_eq!(sha256_file(&a.path("second.bin")), want2);
    let b = Agent::start(&s, &["--listen", &b_addr, "--peers", &a_addr, "--chunk-size", "4MiB"]);
    assert!(poll_until(Duration::from_secs(15), || b.live_peers() == 1), "B does not see A: {}", b.log_text());
    // B's first read opens its connections to A: the baseline has them.
    assert_eq!(sha256_file(&b.path("model.bin")), want);
    let (fds0, rss0) = (fds(a.pid()), rss_anon_kib(a.pid()));
    let port = target_port(&a_addr);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let target: std::net::SocketAddr = a_addr.parse().unwrap();
    let started = Instant::now();
    let flood: Vec<tokio::net::TcpStream> = rt.block_on(async {
        let mut held = Vec::with_capacity(flood_n);
        for _ in 0..flood_n {
            let sock = tokio::net::TcpSocket::new_v4().unwrap();
            // Another loopback address than the agents use: the cap is per source.
            sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            let Ok(Ok(mut c)) = tokio::time::timeout(Duration::from_secs(2), sock.connect(target)).await else { continue };
            let _ = tokio::io::AsyncWriteExt::write_all(&mut c, b"CFS1\0\0\0\x10").await;
            held.push(c);
        }
        held
    });
    eprintln!("MEASURED {} stalled connections opened in {:.1} s", flood.len(), started.elapsed().as_secs_f64());
    let during = fds(a.pid());
    eprintln!("MEASURED agent descriptors: {fds0} before, {during} during the flood");
    assert!(during < fds0 + 200, "the agent holds {during} descriptors during the flood (was {fds0})");

    // Connections the kernel queued for accept count as established until the agent takes (and
    // closes) them: under load that takes a moment.
    let capped = poll_until(Duration::from_secs(3), || flood_held_by_agent(port) <= 64);
    assert!(capped, "{} stalled connections got in", flood_held_by_agent(port));
    // Honest reads through the raw path go on while the flood stalls.
    assert_eq!(sha256_file(&b.path("second.bin")), want2);
    assert_eq!(b.metric("cachefs_origin_bytes_total"), 0.0, "B read from the origin: {}", b.log_text());

    // The preamble deadline (5 s) closes what got in; the flood's sockets are still open.
    let settled = poll_until(Duration::from_secs(15), || flood_held_by_agent(port) == 0 && fds(a.pid()) <= fds0 + 8);
    let (fds1, rss1) = (fds(a.pid()), rss_anon_kib(a.pid()));
    eprintln!("MEASURED after the deadline: {fds1} descriptors, RssAnon {rss0} -> {rss1} KiB");
    assert!(settled, "descriptors did not return to baseline: {fds0} before, {fds1} after the preamble deadline");
    assert!(rss1 < rss0 + 32 * 1024, "RssAnon grew from {rss0} to {rss1} KiB");
    assert_eq!(http_get(a.admin, "/healthz").map(|r| r.0), Some(200));
    drop(flood);
}

/// The version of `key` under `dir` as the agent names it (its file:// origin's listing).
fn object_ref(dir: &std::path::Path, key: &str) -> cachefs::peer::proto::ObjectRef {
    use object_store::ObjectStoreExt;
    let store = object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let meta = rt.block_on(store.head(&object_store::path::Path::from(key))).unwrap();
    cachefs::peer::proto::ObjectRef {
        key: key.into(),
        etag: meta.e_tag.unwrap_or_default(),
        version: meta.version.unwrap_or_default(),
        size: meta.size,
    }
}

fn peer_streams(a: &Agent) -> u64 {
    let st: serde_json::Value = serde_json::from_str(&http_get(a.admin, "/status").unwrap().1).unwrap();
    st["drain"]["peer_streams"].as_u64().unwrap_or(u64::MAX)
}

/// A gRPC client that asks for a chunk and stops reading (HTTP/2 flow control holds the rest)
/// used to keep the stream, its chunk's mapping and its place among the transfers a drain waits
/// for, as long as its connection lived (keepalive pings are answered by any live client). The
/// stream now lets go of them after its time limit and ends with DEADLINE_EXCEEDED.
#[test]
fn a_chunk_stream_whose_client_stops_reading_is_let_go() {
    if !fuse_available("a_chunk_stream_whose_client_stops_reading_is_let_go") {
        return;
    }
    use cachefs::peer::proto::{peer_client::PeerClient, ReadChunkRequest};
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("model.bin"), 16 << 20, 6);
    let listen = peer_addr();
    let a = Agent::start(&src.path().display().to_string(), &["--chunk-size", "4MiB", "--listen", &listen]);
    let _ = std::fs::read(a.path("model.bin")).unwrap();
    let object = object_ref(src.path(), "model.bin");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let mut stream = rt.block_on(async {
        let ch = tonic::transport::Endpoint::from_shared(format!("http://{listen}"))
            .unwrap()
            .initial_stream_window_size(65_535)
            .initial_connection_window_size(65_535)
            .connect()
            .await
            .expect("connect");
        let req =
            ReadChunkRequest { object: Some(object), index: 1, chunk_size: 4 << 20, allow_fill: false, protocol: cachefs::peer::PROTOCOL };
        PeerClient::new(ch).read_chunk(req).await.expect("the chunk was refused").into_inner()
    });
    assert!(poll_until(Duration::from_secs(5), || peer_streams(&a) == 1), "the stream is not counted: {}", peer_streams(&a));
    let t = Instant::now();
    let let_go = poll_until(Duration::from_secs(40), || peer_streams(&a) == 0);
    eprintln!("MEASURED a stalled stream let go after {:.1} s", t.elapsed().as_secs_f64());
    assert!(let_go, "a stream whose client stopped reading is still held after 40 s");
    let end = rt.block_on(async {
        loop {
            match tokio::time::timeout(Duration::from_secs(10), stream.message()).await {
                Ok(Ok(Some(_))) => continue,
                Ok(Ok(None)) => return Ok(()),
                Ok(Err(s)) => return Err(s.code()),
                Err(_) => return Err(tonic::Code::Unknown),
            }
        }
    });
    assert_eq!(end, Err(tonic::Code::DeadlineExceeded), "the cut-off stream did not end with DEADLINE_EXCEEDED");
}
