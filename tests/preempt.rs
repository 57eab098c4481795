//! Preemption: real agents watching fake metadata servers on 127.0.0.1 that speak each cloud's
//! exact format (each cloud's documented metadata paths and bodies), reporting to a webhook receiver. No test sends a packet to a
//! real metadata address: every agent gets `--metadata-endpoint`.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, SecondsFormat, Utc};
use common::fake_http::{FakeHttp, Req, Resp};
use common::fake_s3::{self, FakeS3};
use common::*;
use serde_json::Value;

/// What a fake metadata server says now.
#[derive(Clone, Debug, PartialEq)]
enum Say {
    Nothing,
    Notice,
    /// A malformed or failing answer to the notice path.
    Bad(&'static str),
}

type Shared<T> = Arc<Mutex<T>>;

fn shared<T>(v: T) -> Shared<T> {
    Arc::new(Mutex::new(v))
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// A bad answer by name, for any provider: the body or failure it stands for.
fn bad(kind: &str) -> Resp {
    match kind {
        "html" => Resp::new(200, "<html><body>Service Unavailable</body></html>").header("Content-Type", "text/html"),
        "truncated" => Resp::new(200, "{\"action\": \"terminate\", \"ti"),
        "empty" => Resp::new(200, ""),
        "500" => Resp::new(500, "internal error"),
        "timeout" => Resp::new(404, "").delayed(Duration::from_secs(3)),
        other => Resp::new(200, other.to_string()),
    }
}

// ---- fake metadata servers -------------------------------------------------------------------

fn fake_aliyun(say: Shared<Say>, at: DateTime<Utc>) -> FakeHttp {
    FakeHttp::start(move |r: &Req| {
        Some(match (r.method.as_str(), r.path()) {
            ("PUT", "/latest/api/token") => Resp::new(200, "aliyun-token-1"),
            ("GET", "/latest/meta-data/instance-id") => Resp::new(200, "i-bp1aliyun0001"),
            ("GET", "/latest/meta-data/region-id") => Resp::new(200, "cn-hangzhou"),
            ("GET", "/latest/meta-data/instance/spot/termination-time") => match &*say.lock().unwrap() {
                Say::Nothing => Resp::new(
                    404,
                    "<?xml version=\"1.0\" encoding=\"iso-8859-1\"?>\n<html><head><title>404 - Not Found</title></head></html>",
                ),
                Say::Notice => Resp::new(200, rfc3339(at)),
                Say::Bad(k) => bad(k),
            },
            _ => Resp::new(404, ""),
        })
    })
}

#[derive(Clone, Copy, PartialEq, Debug)]
enum TokenMode {
    /// IMDSv2 only: plain GETs get 401.
    Required,
    /// Tokens die after three uses (401), a new one must be fetched.
    Expiring,
    /// No token endpoint (404): IMDSv1.
    Absent,
}

struct AwsState {
    say: Say,
    rebalance: bool,
    tokens: Vec<(String, u32)>,
    unauthorized: u32,
}

fn fake_aws(state: Shared<AwsState>, mode: TokenMode, at: DateTime<Utc>) -> FakeHttp {
    FakeHttp::start(move |r: &Req| {
        let mut st = state.lock().unwrap();
        if r.method == "PUT" && r.path() == "/latest/api/token" {
            if mode == TokenMode::Absent {
                return Some(Resp::new(404, ""));
            }
            if r.header("X-aws-ec2-metadata-token-ttl-seconds").is_none() {
                return Some(Resp::new(400, ""));
            }
            let t = format!("AQAEAtoken{}==", st.tokens.len());
            st.tokens.push((t.clone(), 0));
            return Some(Resp::new(200, t));
        }
        if mode != TokenMode::Absent {
            let given = r.header("X-aws-ec2-metadata-token").map(str::to_string);
            let limit = if mode == TokenMode::Expiring { 3 } else { u32::MAX };
            let ok = match st.tokens.iter_mut().find(|(t, _)| Some(t) == given.as_ref()) {
                Some((_, uses)) if *uses < limit => {
                    *uses += 1;
                    true
                }
                _ => false,
            };
            if !ok {
                st.unauthorized += 1;
                return Some(Resp::new(401, ""));
            }
        }
        Some(match r.path() {
            "/latest/meta-data/instance-id" => Resp::new(200, "i-0123456789abcdef0"),
            "/latest/meta-data/placement/region" => Resp::new(200, "us-east-1"),
            "/latest/meta-data/spot/instance-action" => match &st.say {
                Say::Nothing => Resp::new(404, "<?xml version=\"1.0\"?><html><title>404 - Not Found</title></html>"),
                Say::Notice => Resp::new(200, format!("{{\"action\": \"terminate\", \"time\": \"{}\"}}", rfc3339(at))),
                Say::Bad(k) => bad(k),
            },
            "/latest/meta-data/events/recommendations/rebalance" if st.rebalance => {
                Resp::new(200, format!("{{\"noticeTime\": \"{}\"}}", rfc3339(at - chrono::Duration::seconds(60))))
            }
            _ => Resp::new(404, ""),
        })
    })
}

/// GCP: values with ETags; `wait_for_change=true&last_etag=E` waits while the value's ETag is E.
fn fake_gcp(say: Shared<Say>) -> FakeHttp {
    let started = Instant::now();
    FakeHttp::start(move |r: &Req| {
        if r.header("Metadata-Flavor") != Some("Google") {
            return Some(Resp::new(403, "Missing Metadata-Flavor:Google header."));
        }
        let now = say.lock().unwrap().clone();
        let (value, etag) = match r.path() {
            "/computeMetadata/v1/instance/id" => ("4520031799277581759".to_string(), "id0".to_string()),
            "/computeMetadata/v1/instance/maintenance-event" => ("NONE".to_string(), "m0".to_string()),
            "/computeMetadata/v1/instance/preempted" => match &now {
                Say::Nothing => ("FALSE".to_string(), "p0".to_string()),
                Say::Notice => ("TRUE".to_string(), "p1".to_string()),
                Say::Bad(k) => return Some(bad(k).header("Metadata-Flavor", "Google")),
            },
            _ => return Some(Resp::new(404, "")),
        };
        if r.query("wait_for_change").as_deref() == Some("true") && r.query("last_etag").as_deref() == Some(etag.as_str()) {
            let limit: u64 = r.query("timeout_sec").and_then(|t| t.parse().ok()).unwrap_or(60);
            if r.at.elapsed() < Duration::from_secs(limit) && started.elapsed() < Duration::from_secs(600) {
                return None;
            }
        }
        Some(Resp::new(200, value).header("Metadata-Flavor", "Google").header("ETag", &etag).header("Content-Type", "application/text"))
    })
}

struct AzureState {
    say: Say,
    /// The VM the scheduled event names.
    target: String,
    /// Drain state of the agent when each acknowledgement arrived.
    acks: Vec<(String, String)>,
    admin: Option<SocketAddr>,
}

fn fake_azure(state: Shared<AzureState>, at: DateTime<Utc>) -> FakeHttp {
    FakeHttp::start(move |r: &Req| {
        if r.header("Metadata") != Some("true") {
            return Some(Resp::new(400, "{\"error\": \"Bad request. Required metadata header not specified\"}"));
        }
        let mut st = state.lock().unwrap();
        Some(match (r.method.as_str(), r.path()) {
            ("GET", "/metadata/instance/compute/name") => Resp::new(200, "vm-a"),
            ("GET", "/metadata/scheduledevents") => match &st.say {
                Say::Nothing => Resp::new(200, "{\"DocumentIncarnation\": 1, \"Events\": []}"),
                Say::Notice => {
                    let nb = at.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
                    Resp::new(200, format!(
                        "{{\"DocumentIncarnation\": 2, \"Events\": [{{\"EventId\": \"602d9444-d2cd-49c7-8624-8643e7171297\", \"EventType\": \"Preempt\", \"ResourceType\": \"VirtualMachine\", \"Resources\": [\"{}\"], \"EventStatus\": \"Scheduled\", \"NotBefore\": \"{nb}\", \"Description\": \"\", \"EventSource\": \"Platform\", \"DurationInSeconds\": -1}}]}}",
                        st.target
                    ))
                }
                Say::Bad(k) => bad(k),
            },
            ("POST", "/metadata/scheduledevents") => {
                let state = st
                    .admin
                    .and_then(|a| http_get(a, "/status"))
                    .and_then(|(_, b)| serde_json::from_str::<Value>(&b).ok())
                    .map(|v| v["drain_state"].as_str().unwrap_or("").to_string())
                    .unwrap_or_default();
                st.acks.push((r.body.clone(), state));
                Resp::new(200, "")
            }
            _ => Resp::new(404, ""),
        })
    })
}

// ---- webhook receiver ------------------------------------------------------------------------

struct Hook {
    srv: FakeHttp,
}

impl Hook {
    fn start() -> Hook {
        Hook { srv: FakeHttp::start(|_| Some(Resp::new(200, "ok"))) }
    }
    fn url(&self) -> String {
        format!("{}/events", self.srv.url())
    }
    fn events(&self) -> Vec<(Instant, Value)> {
        self.srv
            .requests()
            .into_iter()
            .filter(|r| r.method == "POST")
            .map(|r| (r.at, serde_json::from_str(&r.body).expect("webhook body is JSON")))
            .collect()
    }
    fn kinds(&self) -> Vec<String> {
        self.events().iter().map(|(_, e)| e["event"].as_str().unwrap_or("").to_string()).collect()
    }
    fn wait(&self, kind: &str, limit: Duration) -> Option<(Instant, Value)> {
        let mut found = None;
        poll_until(limit, || {
            found = self.events().into_iter().find(|(_, e)| e["event"] == kind);
            found.is_some()
        });
        found
    }
}

fn source() -> (tempfile::TempDir, String) {
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("w.bin"), 1 << 20, 5);
    let s = src.path().display().to_string();
    (src, s)
}

fn ready(a: &Agent) -> u16 {
    http_get(a.admin, "/readyz").map(|(s, _)| s).unwrap_or(0)
}

fn status(a: &Agent) -> Value {
    serde_json::from_str(&http_get(a.admin, "/status").unwrap().1).unwrap()
}

fn watch_args<'a>(provider: &'a str, endpoint: &'a str, hook: &'a str) -> Vec<&'a str> {
    vec!["--preemption-provider", provider, "--metadata-endpoint", endpoint, "--scheduler-webhook", hook]
}

/// The agent reports the notice `flip` makes the fake give; returns seconds from flip to webhook.
#[allow(clippy::too_many_arguments)]
fn notice_is_reported(
    a: &Agent,
    hook: &Hook,
    checks: impl Fn() -> usize,
    flip: impl FnOnce(),
    provider: &str,
    instance: &str,
    termination: Option<DateTime<Utc>>,
    interval: f64,
) -> f64 {
    // The watcher is polling and found nothing: still serving, nothing reported.
    assert!(poll_until(Duration::from_secs(15), || checks() >= 2), "the watcher never asked; log:\n{}", a.log_text());
    assert_eq!(ready(a), 200);
    assert!(hook.events().is_empty(), "{:?}", hook.kinds());
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    flip();
    let (t, ev) =
        hook.wait("preemption_notice", Duration::from_secs(15)).unwrap_or_else(|| panic!("no preemption_notice; log:\n{}", a.log_text()));
    let latency = (t - t0).as_secs_f64();
    eprintln!("MEASURED {provider}: notice -> webhook {latency:.3} s (poll interval {interval} s)");
    assert!(latency < interval + 2.5, "{provider}: the notice took {latency:.3} s to reach the webhook");
    assert_eq!(ev["provider"], provider, "{ev}");
    assert_eq!(ev["instance_id"], instance, "{ev}");
    assert!(ev["node"].as_str().is_some_and(|n| !n.is_empty()), "{ev}");
    assert!(ev["notice_time"].is_string(), "{ev}");
    match termination {
        Some(t) => assert_eq!(ev["termination_time"], rfc3339(t), "{ev}"),
        None => assert!(ev["termination_time"].is_null(), "{ev}"),
    }
    assert_eq!(ready(a), 503, "/readyz must fail once draining");
    let (_, done) = hook.wait("drain_ready", Duration::from_secs(10)).expect("drain_ready");
    assert_eq!(done["provider"], provider);
    assert_eq!(a.metric("cachefs_drain_state"), 2.0);
    assert_eq!(a.metric("cachefs_preemption_notices_total"), 1.0);
    let st = status(a);
    assert_eq!(st["drain"]["state"], "drained", "{st}");
    assert_eq!(st["drain"]["provider"], provider, "{st}");
    // The mount keeps serving local readers.
    assert_eq!(std::fs::read(a.path("w.bin")).unwrap().len(), 1 << 20);
    let kinds = hook.kinds();
    assert_eq!(kinds, ["preemption_notice", "drain_ready"], "each event once, in order");
    latency
}

// ---- one notice per provider -----------------------------------------------------------------

#[test]
fn aliyun_notice_drains_and_reports() {
    if !fuse_available("aliyun_notice_drains_and_reports") {
        return;
    }
    let (_src, s) = source();
    let at = Utc::now() + chrono::Duration::minutes(5);
    let say = shared(Say::Nothing);
    let meta = fake_aliyun(say.clone(), at);
    let hook = Hook::start();
    let (ep, url) = (meta.url(), hook.url());
    let a = Agent::start(&s, &watch_args("aliyun", &ep, &url));
    let checks = || meta.count("/latest/meta-data/instance/spot/termination-time");
    notice_is_reported(&a, &hook, checks, || *say.lock().unwrap() = Say::Notice, "aliyun", "i-bp1aliyun0001", Some(at), 2.0);
    // The token was fetched and used.
    assert!(meta.requests().iter().any(|r| r.header("X-aliyun-ecs-metadata-token") == Some("aliyun-token-1")));
}

#[test]
fn aws_notice_drains_and_reports() {
    if !fuse_available("aws_notice_drains_and_reports") {
        return;
    }
    let (_src, s) = source();
    let at = Utc::now() + chrono::Duration::minutes(2);
    let st = shared(AwsState { say: Say::Nothing, rebalance: false, tokens: vec![], unauthorized: 0 });
    let meta = fake_aws(st.clone(), TokenMode::Required, at);
    let hook = Hook::start();
    let (ep, url) = (meta.url(), hook.url());
    let a = Agent::start(&s, &watch_args("aws", &ep, &url));
    let checks = || meta.count("/latest/meta-data/spot/instance-action");
    notice_is_reported(&a, &hook, checks, || st.lock().unwrap().say = Say::Notice, "aws", "i-0123456789abcdef0", Some(at), 2.0);
    // IMDSv2 only: every GET carried a token, so none was refused.
    assert_eq!(st.lock().unwrap().unauthorized, 0);
    assert!(meta.requests().iter().filter(|r| r.method == "GET").all(|r| r.header("X-aws-ec2-metadata-token").is_some()));
}

#[test]
fn gcp_notice_drains_and_reports() {
    if !fuse_available("gcp_notice_drains_and_reports") {
        return;
    }
    let (_src, s) = source();
    let say = shared(Say::Nothing);
    let meta = fake_gcp(say.clone());
    let hook = Hook::start();
    let (ep, url) = (meta.url(), hook.url());
    let a = Agent::start(&s, &watch_args("gcp", &ep, &url));
    // Long-polling: after the first plain read, requests wait for a change.
    let long = || {
        meta.requests().iter().filter(|r| r.path().ends_with("/preempted") && r.query("wait_for_change").as_deref() == Some("true")).count()
    };
    let t0 = Instant::now();
    notice_is_reported(&a, &hook, || 1 + long(), || *say.lock().unwrap() = Say::Notice, "gcp", "4520031799277581759", None, 0.0);
    // Promptly means by the long poll, not by a stream of polls.
    let polls = meta.count("/computeMetadata/v1/instance/preempted");
    assert!(polls <= 6, "{polls} requests in {:?}: not long-polling", t0.elapsed());
    assert!(meta.requests().iter().all(|r| r.header("Metadata-Flavor") == Some("Google")));
}

#[test]
fn azure_notice_for_this_vm_only_and_acknowledged_after_drain() {
    if !fuse_available("azure_notice_for_this_vm_only_and_acknowledged_after_drain") {
        return;
    }
    let (_src, s) = source();
    let at = Utc::now() + chrono::Duration::seconds(30);
    let st = shared(AzureState { say: Say::Notice, target: "vm-b".into(), acks: vec![], admin: None });
    let meta = fake_azure(st.clone(), at);
    let hook = Hook::start();
    let (ep, url) = (meta.url(), hook.url());
    let mut args = watch_args("azure", &ep, &url);
    args.push("--azure-acknowledge");
    let a = Agent::start(&s, &args);
    st.lock().unwrap().admin = Some(a.admin);
    // An event for another VM of the availability set is ignored for several polls.
    let checks = || meta.count("/metadata/scheduledevents");
    assert!(poll_until(Duration::from_secs(15), || checks() >= 4));
    assert_eq!(ready(&a), 200);
    assert!(hook.events().is_empty());
    let at_s = at.format("%a, %d %b %Y %H:%M:%S GMT").to_string();
    let expect = DateTime::parse_from_rfc2822(&at_s).unwrap().with_timezone(&Utc);
    notice_is_reported(&a, &hook, checks, || st.lock().unwrap().target = "vm-a".into(), "azure", "vm-a", Some(expect), 1.0);
    assert!(poll_until(Duration::from_secs(5), || !st.lock().unwrap().acks.is_empty()), "no StartRequests; log:\n{}", a.log_text());
    let acks = st.lock().unwrap().acks.clone();
    assert_eq!(acks.len(), 1, "{acks:?}");
    let body: Value = serde_json::from_str(&acks[0].0).unwrap();
    assert_eq!(body, serde_json::json!({"StartRequests": [{"EventId": "602d9444-d2cd-49c7-8624-8643e7171297"}]}));
    assert_eq!(acks[0].1, "drained", "acknowledged before the drain finished");
}

#[test]
fn azure_without_acknowledge_sends_none() {
    if !fuse_available("azure_without_acknowledge_sends_none") {
        return;
    }
    let (_src, s) = source();
    let at = Utc::now() + chrono::Duration::seconds(30);
    let st = shared(AzureState { say: Say::Nothing, target: "vm-a".into(), acks: vec![], admin: None });
    let meta = fake_azure(st.clone(), at);
    let hook = Hook::start();
    let (ep, url) = (meta.url(), hook.url());
    let a = Agent::start(&s, &watch_args("azure", &ep, &url));
    let checks = || meta.count("/metadata/scheduledevents");
    assert!(poll_until(Duration::from_secs(15), || checks() >= 2));
    st.lock().unwrap().say = Say::Notice;
    hook.wait("drain_ready", Duration::from_secs(10)).expect("drain_ready");
    // Not acknowledged while the watcher keeps looking (no --azure-acknowledge).
    let seen = checks();
    assert!(poll_until(Duration::from_secs(15), || checks() >= seen + 2));
    assert!(st.lock().unwrap().acks.is_empty());
    // Withdrawn by Azure: serving again, reported.
    st.lock().unwrap().say = Say::Nothing;
    hook.wait("drain_cancelled", Duration::from_secs(10)).expect("drain_cancelled");
    assert!(poll_until(Duration::from_secs(5), || ready(&a) == 200));
    assert_eq!(a.metric("cachefs_drain_state"), 0.0);
}

#[test]
fn auto_detects_each_cloud_from_its_answers() {
    if !fuse_available("auto_detects_each_cloud_from_its_answers") {
        return;
    }
    let (_src, s) = source();
    let at = Utc::now() + chrono::Duration::minutes(2);
    let say = shared(Say::Nothing);
    let gcp = fake_gcp(say.clone());
    let aws_st = shared(AwsState { say: Say::Nothing, rebalance: false, tokens: vec![], unauthorized: 0 });
    let aws = fake_aws(aws_st.clone(), TokenMode::Required, at);
    let ali = fake_aliyun(shared(Say::Nothing), at);
    let az = fake_azure(shared(AzureState { say: Say::Nothing, target: "vm-a".into(), acks: vec![], admin: None }), at);
    let hook = Hook::start();
    let url = hook.url();
    let mut agents = Vec::new();
    for (name, ep) in [("gcp", gcp.url()), ("aws", aws.url()), ("aliyun", ali.url()), ("azure", az.url())] {
        let a = Agent::start(&s, &watch_args("auto", &ep, &url));
        assert!(
            poll_until(Duration::from_secs(10), || status(&a)["drain"]["provider"] == name),
            "auto on a {name} endpoint: {}\n{}",
            status(&a),
            a.log_text()
        );
        assert!(a.log_text().contains("cloud detected"), "{}", a.log_text());
        agents.push(a);
    }
    // And it watches: the GCP agent reports a notice.
    *say.lock().unwrap() = Say::Notice;
    let (_, ev) = hook.wait("preemption_notice", Duration::from_secs(10)).expect("notice via auto");
    assert_eq!(ev["provider"], "gcp");
}

// ---- AWS token flows ------------------------------------------------------------------------

#[test]
fn aws_token_expiry_and_imdsv1_fallback() {
    if !fuse_available("aws_token_expiry_and_imdsv1_fallback") {
        return;
    }
    let (_src, s) = source();
    let at = Utc::now() + chrono::Duration::minutes(2);
    for mode in [TokenMode::Expiring, TokenMode::Absent] {
        let st = shared(AwsState { say: Say::Nothing, rebalance: false, tokens: vec![], unauthorized: 0 });
        let meta = fake_aws(st.clone(), mode, at);
        let hook = Hook::start();
        let (ep, url) = (meta.url(), hook.url());
        let a = Agent::start(&s, &watch_args("aws", &ep, &url));
        let checks = || meta.count("/latest/meta-data/spot/instance-action");
        assert!(poll_until(Duration::from_secs(15), || checks() >= 4), "{mode:?}: {}", a.log_text());
        st.lock().unwrap().say = Say::Notice;
        let (_, ev) = hook
            .wait("preemption_notice", Duration::from_secs(10))
            .unwrap_or_else(|| panic!("{mode:?}: no notice; log:\n{}", a.log_text()));
        assert_eq!(ev["termination_time"], rfc3339(at));
        let st = st.lock().unwrap();
        match mode {
            TokenMode::Expiring => {
                assert!(st.unauthorized >= 1, "the fake never refused a token");
                assert!(st.tokens.len() >= 2, "no new token after a 401");
            }
            TokenMode::Absent => {
                assert!(a.log_text().contains("falling back to plain requests"), "{}", a.log_text());
                assert!(meta.requests().iter().filter(|r| r.method == "GET").all(|r| r.header("X-aws-ec2-metadata-token").is_none()));
            }
            TokenMode::Required => {}
        }
    }
}

#[test]
fn aws_rebalance_is_reported_without_draining() {
    if !fuse_available("aws_rebalance_is_reported_without_draining") {
        return;
    }
    let (_src, s) = source();
    let at = Utc::now() + chrono::Duration::minutes(2);
    let st = shared(AwsState { say: Say::Nothing, rebalance: true, tokens: vec![], unauthorized: 0 });
    let meta = fake_aws(st.clone(), TokenMode::Required, at);
    let hook = Hook::start();
    let (ep, url) = (meta.url(), hook.url());
    let a = Agent::start(&s, &watch_args("aws", &ep, &url));
    let (_, ev) = hook.wait("rebalance_recommendation", Duration::from_secs(10)).expect("rebalance_recommendation");
    assert_eq!(ev["notice_time"], rfc3339(at - chrono::Duration::seconds(60)));
    // The watcher looks again (twice) and still does not drain on a hint.
    let looks = || meta.count("/latest/meta-data/events/recommendations/rebalance");
    let seen = looks();
    assert!(poll_until(Duration::from_secs(15), || looks() >= seen + 2), "the watcher stopped looking; log:\n{}", a.log_text());
    assert_eq!(ready(&a), 200, "a hint must not drain");
    assert_eq!(hook.kinds(), ["rebalance_recommendation"], "reported once");
}

// ---- malformed answers ----------------------------------------------------------------------

/// Cycle the fake through `bads` (each answered at least once), then a real notice.
fn malformed_never_drains(a: &Agent, hook: &Hook, say: &dyn Fn(Say), checks: &dyn Fn() -> usize, bads: &[&'static str]) {
    assert!(poll_until(Duration::from_secs(15), || checks() >= 1));
    for b in bads {
        let n = checks();
        say(Say::Bad(b));
        assert!(poll_until(Duration::from_secs(15), || checks() >= n + 2), "{b}: not asked again; log:\n{}", a.log_text());
        assert_eq!(ready(a), 200, "{b}: drained on a bad answer");
    }
    assert!(hook.events().is_empty(), "{:?}", hook.kinds());
    assert!(a.metric("cachefs_metadata_errors_total") >= bads.len() as f64);
    assert_eq!(a.metric("cachefs_drain_state"), 0.0);
    let log = a.log_text();
    assert!(log.contains("WARN") && log.contains("no action taken"), "{log}");
    // Still watching: a real notice after all that is acted on.
    say(Say::Notice);
    hook.wait("preemption_notice", Duration::from_secs(15)).unwrap_or_else(|| panic!("watcher died; log:\n{}", a.log_text()));
}

#[test]
fn malformed_aws_answers_never_drain() {
    if !fuse_available("malformed_aws_answers_never_drain") {
        return;
    }
    let (_src, s) = source();
    let at = Utc::now() + chrono::Duration::minutes(2);
    let st = shared(AwsState { say: Say::Nothing, rebalance: false, tokens: vec![], unauthorized: 0 });
    let meta = fake_aws(st.clone(), TokenMode::Required, at);
    let hook = Hook::start();
    let (ep, url) = (meta.url(), hook.url());
    let a = Agent::start(&s, &watch_args("aws", &ep, &url));
    let bads = ["html", "truncated", "{\"action\": \"terminate\", \"time\": \"18/09/2017 08:22\"}", "empty", "500", "timeout"];
    malformed_never_drains(&a, &hook, &|v| st.lock().unwrap().say = v, &|| meta.count("/latest/meta-data/spot/instance-action"), &bads);
}

#[test]
fn malformed_aliyun_answers_never_drain() {
    if !fuse_available("malformed_aliyun_answers_never_drain") {
        return;
    }
    let (_src, s) = source();
    let (hook, say) = (Hook::start(), shared(Say::Nothing));
    let meta = fake_aliyun(say.clone(), Utc::now() + chrono::Duration::minutes(5));
    let a = Agent::start(&s, &watch_args("aliyun", &meta.url(), &hook.url()));
    let bads = ["html", "2026-11-22 10:00:00", "500", "timeout"];
    malformed_never_drains(
        &a,
        &hook,
        &|v| *say.lock().unwrap() = v,
        &|| meta.count("/latest/meta-data/instance/spot/termination-time"),
        &bads,
    );
}

#[test]
fn malformed_gcp_answers_never_drain() {
    if !fuse_available("malformed_gcp_answers_never_drain") {
        return;
    }
    let (_src, s) = source();
    let (hook, say) = (Hook::start(), shared(Say::Nothing));
    let meta = fake_gcp(say.clone());
    let a = Agent::start(&s, &watch_args("gcp", &meta.url(), &hook.url()));
    let bads = ["maybe", "empty", "html", "500"];
    malformed_never_drains(&a, &hook, &|v| *say.lock().unwrap() = v, &|| meta.count("/computeMetadata/v1/instance/preempted"), &bads);
}

#[test]
fn malformed_azure_answers_never_drain() {
    if !fuse_available("malformed_azure_answers_never_drain") {
        return;
    }
    let (_src, s) = source();
    let hook = Hook::start();
    let st = shared(AzureState { say: Say::Nothing, target: "vm-a".into(), acks: vec![], admin: None });
    let meta = fake_azure(st.clone(), Utc::now() + chrono::Duration::seconds(30));
    let a = Agent::start(&s, &watch_args("azure", &meta.url(), &hook.url()));
    let bads = ["truncated", "html", "empty", "{\"DocumentIncarnation\": 3, \"Events\": [{\"EventId\": \"x\", \"EventType\": \"Preempt\", \"Resources\": [\"vm-a\"], \"NotBefore\": \"2016-09-19 18:29\"}]}", "500", "timeout"];
    malformed_never_drains(&a, &hook, &|v| st.lock().unwrap().say = v, &|| meta.count("/metadata/scheduledevents"), &bads);
}

// ---- cachefs drain and SIGTERM --------------------------------------------------------------

#[test]
fn drain_command_and_sigterm_drive_the_same_machine() {
    if !fuse_available("drain_command_and_sigterm_drive_the_same_machine") {
        return;
    }
    let (_src, s) = source();
    let hook = Hook::start();
    let url = hook.url();
    let a = Agent::start(&s, &["--scheduler-webhook", &url]);
    let out = std::process::Command::new(bin()).args(["drain", "--admin", &a.admin.to_string()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "drained");
    assert_eq!(ready(&a), 503);
    let (_, ev) = hook.wait("drain_ready", Duration::from_secs(5)).expect("drain_ready after cachefs drain");
    assert!(ev["reason"].as_str().unwrap().contains("cachefs drain"), "{ev}");
    assert_eq!(ev["provider"], "none");
    assert_eq!(hook.kinds(), ["drain_ready"], "no preemption_notice without a notice");
    let out = std::process::Command::new(bin()).args(["status", "--admin", &a.admin.to_string()]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("state       drained") && text.contains("drain       manual drain (cachefs drain)"), "{text}");
    assert!(text.contains("preemption  not watched"), "{text}");

    let hook2 = Hook::start();
    let url2 = hook2.url();
    let mut b = Agent::start(&s, &["--scheduler-webhook", &url2]);
    let code = b.stop();
    assert_eq!(code, Some(0), "log:\n{}", b.log_text());
    // Reported before the process exited (the receiver already has it).
    let ev = hook2
        .events()
        .into_iter()
        .find(|(_, e)| e["event"] == "drain_ready")
        .map(|(_, e)| e)
        .unwrap_or_else(|| panic!("no drain_ready on SIGTERM; log:\n{}", b.log_text()));
    assert!(ev["reason"].as_str().unwrap().contains("shutdown signal"), "{ev}");
    let log = b.log_text();
    assert!(log.contains("draining") && log.contains("drain_ready"), "{log}");
}

#[test]
fn drain_hook_gets_the_event_in_its_environment() {
    if !fuse_available("drain_hook_gets_the_event_in_its_environment") {
        return;
    }
    let (_src, s) = source();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hook.out");
    let cmd = format!(
        "echo \"$CACHEFS_EVENT|$CACHEFS_PROVIDER|$CACHEFS_REASON|$CACHEFS_CACHED_BYTES|$AWS_SECRET_ACCESS_KEY\" >> {}",
        out.display()
    );
    // The hook gets the event and PATH, not the agent's credentials.
    let a = Agent::start_env(&s, &["--drain-hook", &cmd], &[("AWS_SECRET_ACCESS_KEY", "hook-must-not-see-this")]);
    let st = std::process::Command::new(bin()).args(["drain", "--admin", &a.admin.to_string()]).status().unwrap();
    assert!(st.success());
    assert!(poll_until(Duration::from_secs(5), || std::fs::read_to_string(&out).is_ok_and(|t| t.contains("drain_ready"))));
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text.trim(), "drain_ready|none|manual drain (cachefs drain)|0|");
}

// ---- two agents ------------------------------------------------------------------------------

#[test]
fn draining_agent_finishes_its_transfer_and_gets_no_new_ones() {
    if !fuse_available("draining_agent_finishes_its_transfer_and_gets_no_new_ones") {
        return;
    }
    // One object, two origins with the same bytes: A's can hold requests, B's serves at once.
    let data = random_bytes(16 << 20, 77);
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&data))
    };
    let s3a = FakeS3::start("bkt", "p/f.bin", data.clone());
    let s3b = FakeS3::start("bkt", "p/f.bin", data.clone());
    let at = Utc::now() + chrono::Duration::minutes(2);
    let meta_st = shared(AwsState { say: Say::Nothing, rebalance: false, tokens: vec![], unauthorized: 0 });
    let meta = fake_aws(meta_st.clone(), TokenMode::Required, at);
    let hook = Hook::start();
    let (a_port, b_port) = (free_port(), free_port());
    let (a_addr, b_addr) = (format!("127.0.0.1:{a_port}"), format!("127.0.0.1:{b_port}"));
    let mut a_args = s3a.agent_args(&["--chunk-size", "1MiB"]);
    a_args.extend(
        [
            "--listen",
            &a_addr,
            "--peers",
            &b_addr,
            "--preemption-provider",
            "aws",
            "--metadata-endpoint",
            &meta.url(),
            "--scheduler-webhook",
            &hook.url(),
        ]
        .map(String::from),
    );
    let a_args: Vec<&str> = a_args.iter().map(String::as_str).collect();
    let a = Agent::start("s3://bkt/p", &a_args);
    let mut b_args = s3b.agent_args(&["--chunk-size", "1MiB"]);
    b_args.extend(["--listen", &b_addr, "--peers", &a_addr].map(String::from));
    let b_args: Vec<&str> = b_args.iter().map(String::as_str).collect();
    let b = Agent::start("s3://bkt/p", &b_args);
    for (x, name) in [(&a, "A"), (&b, "B")] {
        let live =
            poll_until(Duration::from_secs(15), || status(x)["peers"].as_array().is_some_and(|p| p.iter().any(|p| p["state"] == "live")));
        assert!(live, "{name} sees no live peer: {}", status(x));
    }

    // B reads the first half: the chunks A owns are filled by A, whose origin holds them.
    s3a.set(fake_s3::HOLD);
    let path = b.path("f.bin");
    let reader = std::thread::spawn(move || {
        use std::io::Read;
        let mut buf = vec![0u8; 8 << 20];
        std::fs::File::open(&path).unwrap().read_exact(&mut buf).unwrap();
        (buf, Instant::now())
    });
    assert!(
        poll_until(Duration::from_secs(8), || status(&a)["drain"]["peer_streams"].as_u64().unwrap_or(0) > 0),
        "no transfer from A in flight: {}\nA:\n{}",
        status(&a),
        a.log_text()
    );

    // The notice: A drains but waits for the transfer it is serving.
    meta_st.lock().unwrap().say = Say::Notice;
    hook.wait("preemption_notice", Duration::from_secs(10)).expect("preemption_notice");
    assert_eq!(ready(&a), 503);
    assert!(
        poll_until(Duration::from_secs(5), || status(&b)["peers"].as_array().unwrap().iter().any(|p| p["state"] == "draining")),
        "B was not told: {}",
        status(&b)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(status(&a)["drain"]["state"], "draining", "drained with a transfer in flight");
    assert!(!hook.kinds().contains(&"drain_ready".to_string()));
    let released = Instant::now();
    s3a.set(fake_s3::SERVE);
    let (first, _done) = reader.join().unwrap();
    assert_eq!(&first[..], &data[..8 << 20]);
    let (t_ready, _) = hook.wait("drain_ready", Duration::from_secs(10)).expect("drain_ready after the transfer");
    assert!(t_ready > released);
    let sent = a.metric("cachefs_peer_sent_bytes_total");
    assert!(sent > 0.0, "the in-flight transfer from A did not complete");

    // New cold reads on B do not go through A.
    let a_requests = a.metric("cachefs_origin_requests_total");
    assert_eq!(sha256_file(&b.path("f.bin")), want);
    assert_eq!(a.metric("cachefs_peer_sent_bytes_total"), sent, "B routed new reads through draining A");
    assert_eq!(a.metric("cachefs_origin_requests_total"), a_requests, "A filled chunks for B while draining");
    // A's mount still serves its own readers.
    assert_eq!(sha256_file(&a.path("f.bin")), want);
}

#[test]
fn webhook_retries_and_unreachable_metadata_is_retried() {
    if !fuse_available("webhook_retries_and_unreachable_metadata_is_retried") {
        return;
    }
    let (_src, s) = source();
    // A receiver that refuses the first two attempts.
    let tries = Arc::new(Mutex::new(0u32));
    let t = tries.clone();
    let hook = FakeHttp::start(move |r: &Req| {
        let mut n = t.lock().unwrap();
        *n += 1;
        Some(if *n <= 2 && r.method == "POST" { Resp::new(503, "busy") } else { Resp::new(200, "ok") })
    });
    // Nothing listens on the metadata port: every check fails, none drains.
    let dead = format!("http://127.0.0.1:{}", free_port());
    let url = format!("{}/events", hook.url());
    let a = Agent::start(&s, &watch_args("aws", &dead, &url));
    assert!(poll_until(Duration::from_secs(10), || a.metric("cachefs_metadata_errors_total") >= 3.0), "{}", a.log_text());
    assert_eq!(ready(&a), 200);
    assert!(a.log_text().contains("unreachable"), "{}", a.log_text());
    let st = std::process::Command::new(bin()).args(["drain", "--admin", &a.admin.to_string()]).status().unwrap();
    assert!(st.success());
    assert!(poll_until(Duration::from_secs(10), || a.metric("cachefs_webhook_deliveries_total") == 1.0), "{}", a.log_text());
    let posts: Vec<_> = hook.requests().into_iter().filter(|r| r.method == "POST").collect();
    assert_eq!(posts.len(), 3, "two refusals, then delivered");
    assert!(posts.iter().all(|p| p.body == posts[0].body), "the same event each time");
    assert_eq!(a.metric("cachefs_webhook_failures_total"), 0.0);
}
