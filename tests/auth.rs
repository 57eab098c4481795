//! Peers that prove who they are, both ways, with real agents on 127.0.0.1: a server at a
//! configured address that does not hold the fleet token, and a fleet rotating its token.

mod common;

use std::time::Duration;

use common::fake_s3::strs;
use common::*;

fn tier(a: &Agent, t: &str) -> f64 {
    a.metric(&format!("cachefs_read_bytes_total{{tier=\"{t}\"}}"))
}

fn auth_failures(a: &Agent, reason: &str) -> f64 {
    a.metric(&format!("cachefs_peer_auth_failures_total{{reason=\"{reason}\"}}"))
}

fn sent(a: &Agent) -> f64 {
    a.metric("cachefs_peer_sent_bytes_total")
}

/// The `/status` state of the peer at `addr`.
fn peer_state(a: &Agent, addr: &str) -> Option<String> {
    let st = a.status();
    let p = st["peers"].as_array()?.iter().find(|p| p["addr"] == addr)?.clone();
    p["state"].as_str().map(String::from)
}

/// A token file holding `lines`.
fn token_file(lines: &str) -> tempfile::NamedTempFile {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), lines).unwrap();
    f
}

/// An agent at a configured peer address that holds the bytes but not the token (a hijacked
/// address, a rogue pod): the reader never takes a byte from it, its bytes come from the real
/// peer, and the failure is counted on the reader.
#[test]
fn a_server_without_the_token_is_never_used() {
    if !fuse_available("a_server_without_the_token_is_never_used") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("m.bin"), 48 << 20, 3001);
    let want = sha256_file(&src.path().join("m.bin"));
    let s = src.path().display().to_string();
    let (fleet, other) = (token_file("fleet-token\n"), token_file("not-the-fleet-token\n"));
    let (fleet, other) = (fleet.path().display().to_string(), other.path().display().to_string());
    let (a_addr, rogue_addr, c_addr) = (peer_addr(), peer_addr(), peer_addr());
    let a = Agent::start(&s, &["--listen", &a_addr, "--peer-token-file", &fleet, "--chunk-size", "4MiB"]);
    let rogue = Agent::start(&s, &["--listen", &rogue_addr, "--peer-token-file", &other, "--chunk-size", "4MiB"]);
    assert_eq!(sha256_file(&a.path("m.bin")), want);
    assert_eq!(sha256_file(&rogue.path("m.bin")), want);
    let peers = format!("{rogue_addr},{a_addr}");
    let c = Agent::start(&s, &["--listen", &c_addr, "--peers", &peers, "--peer-token-file", &fleet, "--chunk-size", "4MiB"]);
    assert!(poll_until(Duration::from_secs(15), || peer_state(&c, &a_addr).as_deref() == Some("live")), "{}", c.status());
    assert_eq!(sha256_file(&c.path("m.bin")), want);
    assert_eq!(sent(&rogue), 0.0, "the server without the token served bytes");
    assert_eq!(tier(&c, "peer"), (48 << 20) as f64, "C's bytes come from the real peer: {}", c.log_text());
    assert_eq!(c.metric("cachefs_origin_bytes_total"), 0.0);
    assert!(auth_failures(&c, "server_proof") >= 1.0, "{}", format!("{:?}", c.metrics()));
    assert_ne!(peer_state(&c, &rogue_addr).as_deref(), Some("live"), "{}", c.status());
    assert!(c.log_text().contains("peer authentication failed"), "logged once: {}", c.log_text());
}

/// Rotation without a flag day: agents on the old token and agents on old+new share bytes;
/// once the fleet is on the new token, an agent still on the old one is refused both ways (its
/// reads go to the origin, correctly).
#[test]
fn a_fleet_rotates_its_token_without_a_flag_day() {
    if !fuse_available("a_fleet_rotates_its_token_without_a_flag_day") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("r.bin"), 24 << 20, 3002);
    let want = sha256_file(&src.path().join("r.bin"));
    let s = src.path().display().to_string();
    let (old, both, new) = (token_file("old-token\n"), token_file("old-token\nnew-token\n"), token_file("new-token\nold-token\n"));
    let (old, both, new) = (old.path().display().to_string(), both.path().display().to_string(), new.path().display().to_string());
    let new_only = token_file("new-token\n");
    let new_only = new_only.path().display().to_string();
    let (a_addr, b_addr, c_addr, d_addr) = (peer_addr(), peer_addr(), peer_addr(), peer_addr());
    let chunk = ["--chunk-size", "4MiB"];
    let args = |listen: &str, peers: &str, tokens: &str| -> Vec<String> {
        ["--listen", listen, "--peers", peers, "--peer-token-file", tokens, chunk[0], chunk[1]].iter().map(|a| a.to_string()).collect()
    };
    // Step 1: A on the old token holds the file; B on old+new takes it from A.
    let a = Agent::start(&s, &strs(&args(&a_addr, &b_addr, &old)));
    assert_eq!(sha256_file(&a.path("r.bin")), want);
    let b = Agent::start(&s, &strs(&args(&b_addr, &a_addr, &both)));
    assert!(poll_until(Duration::from_secs(15), || peer_state(&b, &a_addr).as_deref() == Some("live")), "{}", b.status());
    assert_eq!(sha256_file(&b.path("r.bin")), want);
    assert_eq!(tier(&b, "peer"), (24 << 20) as f64, "old and old+new share bytes: {}", b.log_text());
    // Step 2: C on new (+old, to be dropped) takes it from B; the old token still opens B.
    let c = Agent::start(&s, &strs(&args(&c_addr, &b_addr, &new)));
    assert!(poll_until(Duration::from_secs(15), || peer_state(&c, &b_addr).as_deref() == Some("live")), "{}", c.status());
    assert_eq!(sha256_file(&c.path("r.bin")), want);
    assert_eq!(tier(&c, "peer"), (24 << 20) as f64, "{}", c.log_text());
    // Step 3: the fleet moves to the new token only (E; A, B and C leave); D, still on the old
    // one, is refused by E.
    drop(a);
    let e_addr = peer_addr();
    let e = Agent::start(&s, &strs(&args(&e_addr, &c_addr, &new_only)));
    assert!(
        poll_until(Duration::from_secs(15), || peer_state(&e, &c_addr).as_deref() == Some("live")),
        "new-only agents interoperate: {}",
        e.status()
    );
    assert_eq!(sha256_file(&e.path("r.bin")), want);
    assert_eq!(tier(&e, "peer"), (24 << 20) as f64, "{}", e.log_text());
    drop((b, c));
    let d = Agent::start(&s, &strs(&args(&d_addr, &e_addr, &old)));
    assert!(poll_until(Duration::from_secs(15), || auth_failures(&d, "server_proof") >= 1.0), "{}", format!("{:?}", d.metrics()));
    assert_eq!(sha256_file(&d.path("r.bin")), want);
    assert_eq!(tier(&d, "peer"), 0.0, "an old-only agent got bytes from the new fleet");
    assert_eq!(d.live_peers(), 0, "{}", d.status());
    assert_eq!(sent(&e), 0.0, "E served the old-only agent");
}
