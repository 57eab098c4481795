//! Handoff: an agent that gets a preemption notice hands the chunks no other agent holds to the
//! peers that will own them, so the replacement instance reads them from peers, not the origin.
//! Real agents on 127.0.0.1, a fake Alibaba Cloud metadata service, a webhook receiver.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use common::fake_http::{FakeHttp, Req, Resp};
use common::fault_proxy::FaultProxy;
use common::*;
use serde_json::Value;

const CHUNK: &str = "4MiB";
const MODEL: usize = 256 << 20;

/// Alibaba Cloud's metadata service: no notice (404) until `at` is set, then its time.
fn fake_aliyun(at: Arc<Mutex<Option<DateTime<Utc>>>>) -> FakeHttp {
    FakeHttp::start(move |r: &Req| {
        Some(match (r.method.as_str(), r.path()) {
            ("PUT", "/latest/api/token") => Resp::new(200, "aliyun-token-1"),
            ("GET", "/latest/meta-data/instance-id") => Resp::new(200, "i-bp1handoff0001"),
            ("GET", "/latest/meta-data/instance/spot/termination-time") => match *at.lock().unwrap() {
                None => Resp::new(404, "<html><head><title>404 - Not Found</title></head></html>"),
                Some(t) => Resp::new(200, t.to_rfc3339_opts(SecondsFormat::Secs, true)),
            },
            _ => Resp::new(404, ""),
        })
    })
}

/// The webhook events received so far, with when they came.
fn events(hook: &FakeHttp) -> Vec<(Instant, Value)> {
    hook.requests().into_iter().filter(|r| r.method == "POST").filter_map(|r| Some((r.at, serde_json::from_str(&r.body).ok()?))).collect()
}

fn wait_event(hook: &FakeHttp, kind: &str, limit: Duration) -> Option<(Instant, Value)> {
    let mut found = None;
    poll_until(limit, || {
        found = events(hook).into_iter().find(|(_, e)| e["event"] == kind);
        found.is_some()
    });
    found
}

fn handoff_bytes(a: &Agent, direction: &str) -> f64 {
    a.metric(&format!("cachefs_handoff_bytes_total{{direction=\"{direction}\"}}"))
}

/// A, watching the fake metadata service, reads the model while no peer runs: it alone holds it.
fn lone_holder(src: &std::path::Path, a_addr: &str, peers: &str, meta: &str, hook: &str) -> Agent {
    let s = src.display().to_string();
    let args = [
        "--listen",
        a_addr,
        "--peers",
        peers,
        "--chunk-size",
        CHUNK,
        "--preemption-provider",
        "aliyun",
        "--metadata-endpoint",
        meta,
        "--metadata-poll-interval",
        "0.2",
        "--scheduler-webhook",
        hook,
    ];
    let a = Agent::start(&s, &args);
    assert_eq!(sha256_file(&a.path("model.bin")), sha256_file(&src.join("model.bin")));
    assert_eq!(a.metric("cachefs_cache_bytes"), MODEL as f64, "A does not hold the whole model");
    a
}

fn peer(src: &std::path::Path, listen: &str, peers: &str) -> Agent {
    Agent::start(&src.display().to_string(), &["--listen", listen, "--peers", peers, "--chunk-size", CHUNK])
}

#[test]
fn a_preempted_agent_hands_off_what_only_it_holds() {
    if !fuse_available("a_preempted_agent_hands_off_what_only_it_holds") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("model.bin"), MODEL, 901);
    let notice = Arc::new(Mutex::new(None));
    let meta = fake_aliyun(notice.clone());
    let hook = FakeHttp::start(|_| Some(Resp::new(200, "ok")));
    let (a_addr, b_addr, c_addr, d_addr) = (peer_addr(), peer_addr(), peer_addr(), peer_addr());
    let mut a = lone_holder(src.path(), &a_addr, &format!("{b_addr},{c_addr}"), &meta.url(), &format!("{}/events", hook.url()));
    let b = peer(src.path(), &b_addr, &format!("{a_addr},{c_addr}"));
    let c = peer(src.path(), &c_addr, &format!("{a_addr},{b_addr}"));
    for (x, name) in [(&a, "A"), (&b, "B"), (&c, "C")] {
        assert!(poll_until(Duration::from_secs(15), || x.live_peers() == 2), "{name} does not see two live peers: {}", x.status());
    }
    assert_eq!(b.metric("cachefs_cache_bytes") + c.metric("cachefs_cache_bytes"), 0.0, "a peer holds part of the model already");

    // The notice: five minutes, as Alibaba Cloud gives.
    *notice.lock().unwrap() = Some(Utc::now() + chrono::Duration::minutes(5));
    let (_, ready) =
        wait_event(&hook, "drain_ready", Duration::from_secs(60)).unwrap_or_else(|| panic!("no drain_ready; A:\n{}", a.log_text()));
    eprintln!("MEASURED drain_ready: {ready}");
    assert_eq!(ready["handed_off_bytes"], MODEL as u64, "A's log:\n{}", a.log_text());
    assert_eq!(ready["lost_bytes"], 0);
    assert_eq!(handoff_bytes(&a, "sent"), MODEL as f64);
    assert_eq!(handoff_bytes(&b, "received") + handoff_bytes(&c, "received"), MODEL as f64);
    assert_eq!(a.metric("cachefs_handoff_lost_bytes"), 0.0);
    assert_eq!(a.status()["drain"]["handed_off_bytes"], MODEL as u64);

    // The instance goes; a replacement joins the survivors and reads the model from them.
    a.kill9();
    let d = peer(src.path(), &d_addr, &format!("{b_addr},{c_addr}"));
    assert!(poll_until(Duration::from_secs(15), || d.live_peers() == 2), "D does not see B and C: {}", d.status());
    assert_eq!(sha256_file(&d.path("model.bin")), sha256_file(&src.path().join("model.bin")));
    for (x, name) in [(&b, "B"), (&c, "C"), (&d, "D")] {
        assert_eq!(x.metric("cachefs_origin_bytes_total"), 0.0, "{name} went to the origin; its log:\n{}", x.log_text());
    }
    assert_eq!(d.metric("cachefs_peer_received_bytes_total"), MODEL as f64);
}

#[test]
fn a_short_notice_reports_what_was_lost_and_drains_in_time() {
    if !fuse_available("a_short_notice_reports_what_was_lost_and_drains_in_time") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("model.bin"), MODEL, 902);
    let notice = Arc::new(Mutex::new(None));
    let meta = fake_aliyun(notice.clone());
    let hook = FakeHttp::start(|_| Some(Resp::new(200, "ok")));
    let (a_addr, b_addr) = (peer_addr(), peer_addr());
    let a = lone_holder(src.path(), &a_addr, &b_addr, &meta.url(), &format!("{}/events", hook.url()));
    // Each connection from B to A is held to 16 MB/s: the model cannot move in the 5 s given.
    let link = FaultProxy::start(a_addr.rsplit(':').next().unwrap().parse().unwrap());
    link.throttle(16_000_000);
    let b = peer(src.path(), &b_addr, &format!("127.0.0.1:{}", link.port));
    for (x, name) in [(&a, "A"), (&b, "B")] {
        assert!(poll_until(Duration::from_secs(15), || x.live_peers() == 1), "{name} does not see its peer: {}", x.status());
    }

    let termination = Utc::now() + chrono::Duration::seconds(5);
    *notice.lock().unwrap() = Some(termination);
    let seen = wait_event(&hook, "drain_ready", Duration::from_secs(30));
    let (at, ready) = seen.unwrap_or_else(|| panic!("no drain_ready; A:\n{}", a.log_text()));
    eprintln!("MEASURED short notice drain_ready: {ready}");
    let came_at = Utc::now() - chrono::Duration::from_std(at.elapsed()).unwrap();
    assert!(came_at < termination, "drain_ready came after the termination time");
    let (handed, lost) = (ready["handed_off_bytes"].as_u64().unwrap(), ready["lost_bytes"].as_u64().unwrap());
    assert_eq!(handed + lost, MODEL as u64);
    assert!(lost > 0, "a 16 MB/s link moved 256 MiB in under 5 s?");
    assert!(handed > 0, "nothing was handed off in the time there was; A:\n{}", a.log_text());
    assert_eq!(a.metric("cachefs_handoff_lost_bytes"), lost as f64);
    assert_eq!(handoff_bytes(&a, "sent"), handed as f64);
    assert!(handoff_bytes(&b, "received") >= handed as f64);
    eprintln!(
        "MEASURED short notice: {handed} handed off, {lost} lost, drain_ready {:.1} s before termination",
        (termination - came_at).as_seconds_f64()
    );
}

/// Twenty survivors, ten of which answer their probes but never another request: asking them
/// what they hold, telling them of the drain and handing off to them must all end by the
/// drain's deadline (they were asked one after another, each for up to twice the inventory
/// timeout: about 40 s past a 6 s notice), and the report says what was not handed off.
#[test]
fn a_handoff_to_stuck_survivors_ends_at_the_drain_deadline() {
    if !fuse_available("a_handoff_to_stuck_survivors_ends_at_the_drain_deadline") {
        return;
    }
    use common::fake_peer::{FakePeer, Misbehave};
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("model.bin"), MODEL, 903);
    let notice = Arc::new(Mutex::new(None));
    let meta = fake_aliyun(notice.clone());
    let hook = FakeHttp::start(|_| Some(Resp::new(200, "ok")));
    let survivors: Vec<String> = (0..20).map(|_| peer_addr()).collect();
    let a = lone_holder(src.path(), &peer_addr(), &survivors.join(","), &meta.url(), &format!("{}/events", hook.url()));
    let source = src.path().display().to_string();
    let chunk = 4 << 20;
    let _fakes: Vec<FakePeer> = survivors
        .iter()
        .enumerate()
        .map(|(i, addr)| FakePeer::start_on(addr, &source, chunk, if i % 2 == 0 { Misbehave::Empty } else { Misbehave::Unresponsive }))
        .collect();
    assert!(poll_until(Duration::from_secs(30), || a.live_peers() == 20), "A does not see 20 live survivors: {}", a.status());

    let termination = Utc::now() + chrono::Duration::seconds(6);
    *notice.lock().unwrap() = Some(termination);
    let (at, ready) =
        wait_event(&hook, "drain_ready", Duration::from_secs(60)).unwrap_or_else(|| panic!("no drain_ready; A:\n{}", a.log_text()));
    let late = Utc::now().signed_duration_since(termination) - chrono::Duration::from_std(at.elapsed()).unwrap();
    eprintln!("MEASURED drain_ready {:.1} s before the termination time: {ready}", -late.as_seconds_f64());
    assert!(late < chrono::Duration::zero(), "drain_ready came {late} after the termination time; A:\n{}", a.log_text());
    assert_eq!(ready["handed_off_bytes"], 0, "no survivor took a chunk, yet some were reported handed off");
    assert_eq!(ready["lost_bytes"], MODEL as u64, "what could not be handed off was not reported");
}

/// A handoff makes the survivor evict its own colder chunks, so only a peer that really drains
/// may ask for one: a request naming a live peer that is serving (here from its own IP, as a
/// rogue process on that host could) is refused, whatever it says.
#[test]
fn a_handoff_from_a_peer_that_is_not_draining_is_refused() {
    if !fuse_available("a_handoff_from_a_peer_that_is_not_draining_is_refused") {
        return;
    }
    use cachefs::peer::proto;
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("model.bin"), 8 << 20, 904);
    let (a_addr, b_addr) = (peer_addr(), peer_addr());
    let a = peer(src.path(), &a_addr, &b_addr);
    let b = peer(src.path(), &b_addr, &a_addr);
    assert!(poll_until(Duration::from_secs(15), || a.live_peers() == 1), "A does not see B: {}", a.status());
    let b_id = b.status()["node_id"].as_str().unwrap().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let code = rt.block_on(async {
        let mut c = proto::peer_client::PeerClient::connect(format!("http://{a_addr}")).await.expect("connect");
        let chunk =
            proto::HandoffChunk { object: Some(proto::ObjectRef { key: "model.bin".into(), ..Default::default() }), index: 0, idle_ms: 0 };
        let req = proto::HandoffRequest { node_id: b_id, chunk_size: 4 << 20, chunks: vec![chunk] };
        match c.handoff(req).await {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        }
    });
    assert_eq!(code, tonic::Code::FailedPrecondition, "a handoff in the name of a serving peer was taken");
    assert_eq!(handoff_bytes(&a, "received"), 0.0);
}
