//! Control traffic and connections stay bounded, with real agent processes on 127.0.0.1: idle
//! agents probe each other once per probe interval (not back to back), and a flood of raw data
//! connections that stall in their preamble costs the agent nothing once they time out, while
//! honest reads go on.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn peer_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

fn hellos(a: &Agent, direction: &str) -> f64 {
    a.metric(&format!("cachefs_control_messages_total{{kind=\"hello\",direction=\"{direction}\"}}"))
}

fn live_peers(a: &Agent) -> usize {
    let st: serde_json::Value = serde_json::from_str(&http_get(a.admin, "/status").unwrap().1).unwrap();
    st["peers"].as_array().unwrap().iter().filter(|p| p["state"] == "live").count()
}

/// A Hello from a peer already known to be up must not wake the probe loop: with three agents
/// listing each other, each answered probe used to start the other side's next round at once,
/// so the agents probed back to back (thousands of Hellos a second on loopback).
#[test]
fn idle_agents_probe_each_other_once_per_interval() {
    if !fuse_available("idle_agents_probe_each_other_once_per_interval") {
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
        assert!(poll_until(Duration::from_secs(15), || live_peers(a) == 2), "peers did not converge: {}", a.log_text());
    }
    let window = Duration::from_secs(10);
    let before: Vec<(f64, f64)> = agents.iter().map(|a| (hellos(a, "sent"), hellos(a, "received"))).collect();
    let started = Instant::now();
    // A measuring window: the agents are left idle, nothing is waited for.
    std::thread::sleep(window);
    let secs = started.elapsed().as_secs_f64();
    // One probe of each of 2 peers per 2 s interval, plus a round of slack at each end.
    let bound = 2.0 * (secs / 2.0 + 2.0);
    for (a, (sent0, received0)) in agents.iter().zip(before) {
        let (sent, received) = (hellos(a, "sent") - sent0, hellos(a, "received") - received0);
        assert!(sent >= 2.0, "an idle agent stopped probing its peers ({sent} Hellos in {secs:.1} s)");
        assert!(
            sent <= bound && received <= bound,
            "{sent} Hellos sent, {received} received in {secs:.1} s by an idle agent with 2 peers (at most {bound})"
        );
    }
}
