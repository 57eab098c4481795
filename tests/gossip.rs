//! Membership gossip between real agents: a member one agent was never told about is learned by
//! gossip when peers authenticate (and never when they do not), a killed member is reported down
//! without waiting for a probe, and gossip is taken only from callers that may send it.

mod common;

use std::time::Duration;

use common::*;

use cachefs::peer::proto;
use cachefs::peer::proto::peer_client::PeerClient;

/// The state `a`'s /status gives the peer at `addr` (None: not a peer of `a`).
fn state_of(a: &Agent, addr: &str) -> Option<String> {
    let (_, body) = http_get(a.admin, "/status")?;
    let st: serde_json::Value = serde_json::from_str(&body).ok()?;
    let peers = st["peers"].as_array()?.clone();
    peers.iter().find(|p| p["addr"] == addr).and_then(|p| p["state"].as_str().map(String::from))
}

fn start(src: &str, listen: &str, peer: &str, extra: &[&str]) -> Agent {
    let mut args = vec!["--listen", listen, "--peers", peer, "--chunk-size", "1MiB"];
    args.extend_from_slice(extra);
    Agent::start(src, &args)
}

/// A knows only B, C knows only B: with a token, A learns C through B's gossip, and when C is
/// killed A stops using it within seconds, though gossip leaves known peers unprobed for 30 s.
#[test]
fn authenticated_members_are_learned_by_gossip_and_a_killed_one_goes_down() {
    if !fuse_available("authenticated_members_are_learned_by_gossip_and_a_killed_one_goes_down") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("g.bin"), 1 << 20, 5);
    let s = src.path().display().to_string();
    let tok = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tok.path(), "gossip-token\n").unwrap();
    let t = tok.path().display().to_string();
    let auth = ["--peer-token-file", t.as_str()];
    let (a_addr, b_addr, c_addr) = (peer_addr(), peer_addr(), peer_addr());
    let b = start(&s, &b_addr, &a_addr, &auth);
    let a = start(&s, &a_addr, &b_addr, &auth);
    let mut c = start(&s, &c_addr, &b_addr, &auth);
    let learned = poll_until(Duration::from_secs(20), || state_of(&a, &c_addr).as_deref() == Some("live"));
    assert!(learned, "A never learned C; A's log:\n{}\nB's log:\n{}\nC's log:\n{}", a.log_text(), b.log_text(), c.log_text());
    for x in [&a, &b, &c] {
        for d in ["sent", "received"] {
            let name = format!("cachefs_control_messages_total{{kind=\"gossip\",direction=\"{d}\"}}");
            assert!(poll_until(Duration::from_secs(5), || x.metric(&name) > 0.0), "no gossip {d}: {}", x.log_text());
        }
    }
    c.kill9();
    let down = poll_until(Duration::from_secs(15), || state_of(&a, &c_addr).as_deref() != Some("live"));
    assert!(down, "A still uses the killed C; A's log:\n{}", a.log_text());
    assert_eq!(state_of(&a, &b_addr).as_deref(), Some("live"), "B was taken down with C");
    drop(b);
}

/// Without authentication the same mesh never teaches A about C (only configured peers are
/// members), and a gossip message from an address that is no configured peer is refused.
#[test]
fn unauthenticated_gossip_teaches_no_members_and_strangers_are_refused() {
    if !fuse_available("unauthenticated_gossip_teaches_no_members_and_strangers_are_refused") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("g.bin"), 1 << 20, 6);
    let s = src.path().display().to_string();
    let (a_addr, b_addr, c_addr) = (peer_addr(), peer_addr(), peer_addr());
    let b_peers = format!("{a_addr},{c_addr}");
    let b = start(&s, &b_addr, &b_peers, &[]);
    let a = start(&s, &a_addr, &b_addr, &[]);
    let c = start(&s, &c_addr, &b_addr, &[]);
    // B knows both and gossips about them: wait until A has heard B's gossip for a while.
    let heard = || a.metric("cachefs_control_messages_total{kind=\"gossip\",direction=\"received\"}");
    assert!(poll_until(Duration::from_secs(20), || heard() >= 5.0), "A heard no gossip; A's log:\n{}", a.log_text());
    assert_eq!(state_of(&a, &c_addr), None, "an unconfigured member was taken from gossip without authentication");
    assert!(a.log_text().contains("naming an address that is not a configured peer"), "{}", a.log_text());

    // A stranger (127.0.0.1 is no peer of this agent's) may not gossip to it.
    let lone_addr = peer_addr();
    let lone = start(&s, &lone_addr, "127.0.0.2:9", &[]);
    let code = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut client = PeerClient::connect(format!("http://{lone_addr}")).await.unwrap();
        let msg = proto::GossipMessage { data: vec![0u8; 16].into() };
        client.gossip(msg).await.map(|_| ()).map_err(|s| s.code())
    });
    assert_eq!(code, Err(tonic::Code::PermissionDenied));
    drop((b, c, lone));
}

/// Garbage from a caller that may gossip is refused as such and changes nothing.
#[test]
fn a_bad_gossip_message_is_an_error_not_a_crash() {
    if !fuse_available("a_bad_gossip_message_is_an_error_not_a_crash") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("g.bin"), 1 << 20, 7);
    let s = src.path().display().to_string();
    let (a_addr, b_addr) = (peer_addr(), peer_addr());
    let a = start(&s, &a_addr, &b_addr, &[]);
    let b = start(&s, &b_addr, &a_addr, &[]);
    assert!(poll_until(Duration::from_secs(20), || state_of(&a, &b_addr).as_deref() == Some("live")));
    // Gossip starts within a second of the first peer answering.
    assert!(poll_until(Duration::from_secs(10), || a.log_text().contains("membership gossip started")));
    let rt = tokio::runtime::Runtime::new().unwrap();
    for data in [vec![0xffu8; 64], vec![], vec![1u8; 100 << 10]] {
        let code = rt.block_on(async {
            let mut client = PeerClient::connect(format!("http://{a_addr}")).await.unwrap();
            client.gossip(proto::GossipMessage { data: data.into() }).await.map(|_| ()).map_err(|s| s.code())
        });
        assert_eq!(code, Err(tonic::Code::InvalidArgument));
    }
    assert_eq!(state_of(&a, &b_addr).as_deref(), Some("live"));
    assert_eq!(sha256_file(&a.path("g.bin")), sha256_file(&src.path().join("g.bin")));
    drop(b);
}
