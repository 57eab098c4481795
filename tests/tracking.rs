//! Holder discovery between real agents: what one agent reads, it announces to the segment's
//! trackers, a tracker answers lookups with it, and only members may announce.

mod common;

use std::time::Duration;

use common::*;

use cachefs::peer::proto;
use cachefs::peer::proto::peer_client::PeerClient;

fn peer_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

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
