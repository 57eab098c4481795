//! Holder discovery between real agents: what one agent reads, it announces to the segment's
//! trackers, a tracker answers lookups with it, and only members may announce; a draining
//! tracker hands its state to the next trackers, and beyond the inventory mesh a draining agent
//! finds its sole copies by asking trackers.

mod common;

use std::time::Duration;

use common::*;

use cachefs::peer::proto;
use cachefs::peer::proto::peer_client::PeerClient;

fn announced(a: &Agent) -> f64 {
    a.metric("cachefs_control_messages_total{kind=\"announce\",direction=\"received\"}")
}

#[test]
fn what_an_agent_reads_its_trackers_answer_and_only_members_announce() {
    if !fuse_available("what_an_agent_reads_its_trackers_answer_and_only_members_announce") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let size = 40u64 << 20;
    write_random(&src.path().join("t.bin"), size as usize, 77);
    let s = src.path().display().to_string();
    let (a_addr, b_addr) = (peer_addr(), peer_addr());
    let args = |listen: &str, peer: &str| {
        vec!["--listen".to_string(), listen.into(), "--peers".into(), peer.into(), "--chunk-size".into(), "4MiB".into()]
    };
    let a_args = args(&a_addr, &b_addr);
    let b_args = args(&b_addr, &a_addr);
    let a = Agent::start(&s, &a_args.iter().map(String::as_str).collect::<Vec<_>>());
    let b = Agent::start(&s, &b_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(poll_until(Duration::from_secs(10), || a.log_text().contains("peer membership ready")));
    assert_eq!(sha256_file(&a.path("t.bin")), sha256_file(&src.path().join("t.bin")));
    // With two agents both track every segment: B hears what A holds.
    assert!(poll_until(Duration::from_secs(10), || announced(&b) >= 1.0), "B was told nothing; A's log:\n{}", a.log_text());

    let etag = tokio::runtime::Runtime::new().unwrap().block_on(async {
        use object_store::ObjectStoreExt;
        let store = object_store::local::LocalFileSystem::new_with_prefix(src.path()).unwrap();
        store.head(&"t.bin".into()).await.unwrap().e_tag.unwrap_or_default()
    });
    let object = proto::ObjectRef { key: "t.bin".into(), etag, version: String::new(), size };
    let (_, st) = http_get(a.admin, "/status").unwrap();
    let st: serde_json::Value = serde_json::from_str(&st).unwrap();
    let a_id = st["node_id"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = PeerClient::connect(format!("http://{b_addr}")).await.unwrap();
        let lookup =
            |segment: u64| proto::LookupRequest { object: Some(object.clone()), segment, chunk_size: 4 << 20, node_id: "asker".into() };
        // 40 MiB in 4 MiB chunks: 10 chunks, all in segment 0, all held by A (its own reads).
        let mut held = 0;
        for _ in 0..50 {
            let r = c.lookup(lookup(0)).await.unwrap().into_inner();
            held = r.holders.iter().find(|h| h.node_id == a_id).map_or(0, |h| h.present);
            if held == (1 << 10) - 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(held, (1 << 10) - 1, "B's tracker does not know A holds every chunk");
        assert!(c.lookup(lookup(1)).await.unwrap().into_inner().holders.is_empty(), "nothing past the object's end");
        // Someone who is not a member (here: a node id B never probed) may not announce.
        let forged = proto::AnnounceRequest {
            node_id: "intruder".into(),
            chunk_size: 4 << 20,
            segments: vec![proto::SegmentAnnounce {
                object: Some(object.clone()),
                segment: 0,
                present: u64::MAX,
                filling: 0,
                complete: true,
                holder: String::new(),
            }],
        };
        let e = c.announce(forged).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let r = c.lookup(lookup(0)).await.unwrap().into_inner();
        assert!(r.holders.iter().all(|h| h.node_id != "intruder"));
        // A wrong chunk size is refused with a clear message.
        let e = c.lookup(proto::LookupRequest { chunk_size: 1 << 20, ..lookup(0) }).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    });
    let sent = a.metric("cachefs_control_messages_total{kind=\"announce\",direction=\"sent\"}");
    assert!((1.0..=20.0).contains(&sent), "A announced {sent} times for one 40 MiB file");
}

/// `n` agents on `src`, each given all the others, with 1 MiB chunks and `extra` flags.
fn mesh(src: &str, n: usize, extra: &[&str]) -> (Vec<Agent>, Vec<String>) {
    let addrs: Vec<String> = (0..n).map(|_| peer_addr()).collect();
    let agents = (0..n)
        .map(|i| {
            let others: Vec<&str> = (0..n).filter(|j| *j != i).map(|j| addrs[j].as_str()).collect();
            let others = others.join(",");
            let mut args = vec!["--listen", addrs[i].as_str(), "--peers", others.as_str(), "--chunk-size", "1MiB"];
            args.extend_from_slice(extra);
            Agent::start(src, &args)
        })
        .collect();
    (agents, addrs)
}

fn post(addr: std::net::SocketAddr, path: &str, body: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(s, "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len())
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

fn object_of(dir: &std::path::Path, key: &str) -> proto::ObjectRef {
    let (etag, size) = tokio::runtime::Runtime::new().unwrap().block_on(async {
        use object_store::ObjectStoreExt;
        let store = object_store::local::LocalFileSystem::new_with_prefix(dir).unwrap();
        let m = store.head(&key.into()).await.unwrap();
        (m.e_tag.unwrap_or_default(), m.size)
    });
    proto::ObjectRef { key: key.into(), etag, version: String::new(), size }
}

/// What the tracker at `addr` answers for segment 0 of `object`: holder id -> present bits.
fn tracked(rt: &tokio::runtime::Runtime, addr: &str, object: &proto::ObjectRef) -> std::collections::HashMap<String, u64> {
    rt.block_on(async {
        let mut c = PeerClient::connect(format!("http://{addr}")).await.unwrap();
        let req = proto::LookupRequest { object: Some(object.clone()), segment: 0, chunk_size: 1 << 20, node_id: "test".into() };
        c.lookup(req).await.unwrap().into_inner().holders.into_iter().map(|h| (h.node_id, h.present)).collect()
    })
}

/// Five agents; R reads a file whose one segment three of them track. When tracker D drains,
/// it hands what it tracks to the segment's next tracker E at once (R would tell E only at its
/// next refresh, two minutes later); a handover from a member that is not draining is refused.
#[test]
fn a_draining_tracker_hands_its_tracking_over() {
    if !fuse_available("a_draining_tracker_hands_its_tracking_over") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("h.bin"), 8 << 20, 31);
    let (agents, addrs) = mesh(&src.path().display().to_string(), 5, &[]);
    for a in &agents {
        assert!(poll_until(Duration::from_secs(20), || a.live_peers() == 4), "peers did not converge: {}", a.status());
    }
    let ids: Vec<String> = agents.iter().map(|a| a.status()["node_id"].as_str().unwrap().to_string()).collect();
    let object = object_of(src.path(), "h.bin");
    let key = cachefs::peer::tracking::tracker_key(&object);
    let ring = cachefs::swarm::Ring::new(ids.iter().map(|i| std::sync::Arc::from(i.as_str())).collect());
    let before = cachefs::swarm::trackers(&key, 0, &ring);
    let d = ids.iter().position(|i| **i == *before[0]).unwrap();
    let after = cachefs::swarm::trackers(&key, 0, &ring.without(&ids[d]));
    let e = ids.iter().position(|i| after.iter().any(|t| **t == **i) && !before.iter().any(|t| **t == **i)).unwrap();
    let r = (0..5).find(|i| !before.iter().chain(&after).any(|t| **t == *ids[*i])).unwrap();

    let reader = &agents[r];
    assert_eq!(sha256_file(&reader.path("h.bin")), sha256_file(&src.path().join("h.bin")));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let knows = |i: usize| tracked(&rt, &addrs[i], &object).get(&ids[r]).copied().unwrap_or(0) == 0xff;
    assert!(poll_until(Duration::from_secs(10), || knows(d)), "tracker D never learned what R holds");
    assert!(!knows(e), "E knew of R's chunks before any handover: the test shows nothing");

    // R is a member at its own address, but it is not draining: it may not speak for others.
    let forged = proto::AnnounceRequest {
        node_id: ids[r].clone(),
        chunk_size: 1 << 20,
        segments: vec![proto::SegmentAnnounce {
            object: Some(object.clone()),
            segment: 0,
            present: 0xff,
            filling: 0,
            complete: true,
            holder: "someone-else".into(),
        }],
    };
    let refused = rt.block_on(async {
        let mut c = PeerClient::connect(format!("http://{}", addrs[e])).await.unwrap();
        c.announce(forged).await.map(|_| ()).map_err(|s| s.code())
    });
    assert_eq!(refused, Err(tonic::Code::PermissionDenied));

    let answer = post(agents[d].admin, "/drain", "");
    assert!(answer.contains("drained"), "{answer}");
    assert!(poll_until(Duration::from_secs(5), || knows(e)), "E was not handed R's holding; D's log:\n{}", agents[d].log_text());
    assert!(agents[d].log_text().contains("handed what this agent tracks to the next trackers"));
}

/// Ten agents: a draining agent's nine survivors are beyond the inventory mesh, so its sole
/// copies are found by asking each held segment's trackers, not every survivor; exactly the
/// chunks nobody else holds are handed off.
#[test]
fn beyond_the_inventory_mesh_sole_copies_are_found_by_trackers() {
    if !fuse_available("beyond_the_inventory_mesh_sole_copies_are_found_by_trackers") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("shared.bin"), 4 << 20, 41);
    write_random(&src.path().join("only-x.bin"), 3 << 20, 42);
    let (agents, addrs) = mesh(&src.path().display().to_string(), 10, &[]);
    for a in &agents {
        assert!(poll_until(Duration::from_secs(30), || a.live_peers() == 9), "peers did not converge: {}", a.status());
    }
    let ids: Vec<String> = agents.iter().map(|a| a.status()["node_id"].as_str().unwrap().to_string()).collect();
    let (x, y) = (&agents[0], &agents[1]);
    for f in ["shared.bin", "only-x.bin"] {
        assert_eq!(sha256_file(&x.path(f)), sha256_file(&src.path().join(f)));
    }
    assert_eq!(sha256_file(&y.path("shared.bin")), sha256_file(&src.path().join("shared.bin")));
    // Wait until the trackers of shared.bin know Y holds it all.
    let object = object_of(src.path(), "shared.bin");
    let key = cachefs::peer::tracking::tracker_key(&object);
    let ring = cachefs::swarm::Ring::new(ids.iter().map(|i| std::sync::Arc::from(i.as_str())).collect());
    let trackers = cachefs::swarm::trackers(&key, 0, &ring);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let everywhere = || {
        trackers.iter().all(|t| {
            let i = ids.iter().position(|id| **id == **t).unwrap();
            tracked(&rt, &addrs[i], &object).get(&ids[1]).copied().unwrap_or(0) == 0x0f
        })
    };
    assert!(poll_until(Duration::from_secs(10), everywhere), "the trackers never learned what Y holds");
    let inventories = || x.metric("cachefs_control_messages_total{kind=\"inventory\",direction=\"sent\"}");
    let asked_before = inventories();
    let answer: serde_json::Value = serde_json::from_str(&post(x.admin, "/drain", r#"{"handoff":true}"#)).unwrap();
    assert_eq!(answer["handed_off_bytes"], 3u64 << 20, "{answer}; X's log:\n{}", x.log_text());
    assert_eq!(answer["lost_bytes"], 0);
    assert_eq!(inventories(), asked_before, "the drain asked survivors for inventories");
}
