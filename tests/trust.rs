//! A peer mesh that can be trusted, tried as an attacker would on 127.0.0.1: a stranger that
//! speaks the peer protocol correctly and claims every chunk with correct crcs over forged bytes,
//! forged `Hello` and `Drain` messages, a peer with another chunk size or source, a configured
//! peer that turns bad (caught by the origin's whole-object checksum), the admin port, secrets.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use tonic::{Request, Response, Status};

use cachefs::peer::proto;
use cachefs::peer::proto::peer_client::PeerClient;

fn peer_addr() -> (u16, String) {
    let p = free_port();
    (p, format!("127.0.0.1:{p}"))
}

fn tier(a: &Agent, t: &str) -> f64 {
    a.metric(&format!("cachefs_read_bytes_total{{tier=\"{t}\"}}"))
}

/// The entry of `/status` peers for `addr`.
fn peer_entry(a: &Agent, addr: &str) -> Option<serde_json::Value> {
    a.status()["peers"].as_array()?.iter().find(|p| p["addr"] == addr).cloned()
}

/// A peer that claims to hold every chunk of every object it is asked about and serves bytes of
/// 0x41 with their correct crc32c: only a check against the origin can tell.
struct ForgingPeer {
    node_id: String,
    chunk: u64,
    source: String,
    /// Sizes of the objects it has been asked about, by key.
    sizes: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    served: Arc<std::sync::atomic::AtomicU64>,
    /// The object's true bytes: forge only the first chunk asked for, serve the rest honestly.
    truth: Option<Vec<u8>>,
    forged_index: Arc<std::sync::Mutex<Option<u64>>>,
}

#[tonic::async_trait]
impl proto::peer_server::Peer for ForgingPeer {
    type ReadChunkStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::ChunkData, Status>> + Send>>;

    async fn read_chunk(&self, req: Request<proto::ReadChunkRequest>) -> Result<Response<Self::ReadChunkStream>, Status> {
        let r = req.into_inner();
        let size = r.object.as_ref().map(|o| o.size).unwrap_or(0);
        let start = r.index * self.chunk;
        let len = self.chunk.min(size.saturating_sub(start)) as usize;
        let forge = {
            let mut first = self.forged_index.lock().unwrap();
            let forge = self.truth.is_none() || first.is_none_or(|i| i == r.index);
            if forge {
                *first = Some(r.index);
            }
            forge
        };
        let forged = match &self.truth {
            Some(t) if !forge => t[start as usize..start as usize + len].to_vec(),
            _ => vec![0x41u8; len],
        };
        let crc = crc32c::crc32c(&forged);
        self.served.fetch_add(len as u64, std::sync::atomic::Ordering::SeqCst);
        let msgs: Vec<_> = forged
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, d)| {
                Ok(proto::ChunkData {
                    offset: (i << 20) as u64,
                    data: d.to_vec().into(),
                    chunk_len: if i == 0 { len as u64 } else { 0 },
                    crc32c: if i == 0 { crc } else { 0 },
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(msgs))))
    }

    async fn inventory(&self, req: Request<proto::InventoryRequest>) -> Result<Response<proto::InventoryResponse>, Status> {
        let objects = req
            .into_inner()
            .objects
            .into_iter()
            .map(|o| {
                let n = o.size.div_ceil(self.chunk);
                self.sizes.lock().unwrap().insert(o.key.clone(), o.size);
                proto::ObjectInventory {
                    key: o.key,
                    etag: o.etag,
                    present: vec![0xffu8; n.div_ceil(8) as usize].into(),
                    chunks: n,
                    filling: Default::default(),
                    digests: Default::default(),
                    digests_mac: Default::default(),
                }
            })
            .collect();
        Ok(Response::new(proto::InventoryResponse { objects, draining: false }))
    }

    async fn hello(&self, _r: Request<proto::HelloRequest>) -> Result<Response<proto::HelloResponse>, Status> {
        Ok(Response::new(proto::HelloResponse {
            node_id: self.node_id.clone(),
            protocol: cachefs::peer::PROTOCOL,
            draining: false,
            chunk_size: self.chunk,
            source: self.source.clone(),
            raw_data: false,
        }))
    }

    async fn drain(&self, _r: Request<proto::DrainNotice>) -> Result<Response<proto::DrainAck>, Status> {
        Ok(Response::new(proto::DrainAck {}))
    }

    type HandoffStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::HandoffProgress, Status>> + Send>>;

    async fn lookup(
        &self,
        _r: tonic::Request<cachefs::peer::proto::LookupRequest>,
    ) -> Result<tonic::Response<cachefs::peer::proto::LookupResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("tracks nothing"))
    }

    async fn announce(
        &self,
        _r: tonic::Request<cachefs::peer::proto::AnnounceRequest>,
    ) -> Result<tonic::Response<cachefs::peer::proto::AnnounceResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("tracks nothing"))
    }

    async fn gossip(
        &self,
        _r: tonic::Request<cachefs::peer::proto::GossipMessage>,
    ) -> Result<tonic::Response<cachefs::peer::proto::GossipAck>, tonic::Status> {
        Err(tonic::Status::unimplemented("does not gossip"))
    }

    async fn handoff(&self, _r: Request<proto::HandoffRequest>) -> Result<Response<Self::HandoffStream>, Status> {
        Err(Status::unimplemented("takes no handoffs"))
    }
}

/// A running forging peer: its address, how many forged bytes it served.
struct Forger {
    addr: String,
    port: u16,
    served: Arc<std::sync::atomic::AtomicU64>,
    /// The one chunk forged, when it forges one only.
    forged_index: Arc<std::sync::Mutex<Option<u64>>>,
    rt: tokio::runtime::Runtime,
}

fn start_forger(source: &str, chunk: u64) -> Forger {
    start_forger_of(source, chunk, None)
}

/// A forger that knows the object's bytes (`truth`): one chunk forged, the rest honest.
fn start_forger_of(source: &str, chunk: u64, truth: Option<Vec<u8>>) -> Forger {
    start_forger_full(source, chunk, truth, None)
}

/// A forger; with `token`, it holds the fleet token and passes the handshake as a server.
fn start_forger_full(source: &str, chunk: u64, truth: Option<Vec<u8>>, token: Option<&str>) -> Forger {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _in_rt = rt.enter();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let local = listener.local_addr().unwrap();
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let forged_index = Arc::new(std::sync::Mutex::new(None));
    let peer = ForgingPeer {
        node_id: "forger".into(),
        chunk,
        source: source.into(),
        sizes: Default::default(),
        served: served.clone(),
        truth,
        forged_index: forged_index.clone(),
    };
    let svc = proto::peer_server::PeerServer::new(peer);
    let server = tonic::transport::Server::builder().add_service(svc);
    match token {
        None => rt.spawn(server.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))),
        Some(t) => rt.spawn(server.serve_with_incoming(authenticated(listener, t))),
    };
    Forger { addr: local.to_string(), port: local.port(), served, forged_index, rt }
}

/// Connections on `listener` that passed the handshake with `token` (the forger holds it).
fn authenticated(
    listener: tokio::net::TcpListener,
    token: &str,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<tokio::net::TcpStream>> {
    let keyring =
        cachefs::peer::auth::Keyring::new(&[token.to_string()], "forger".into(), Arc::new(cachefs::metrics::Metrics::new())).unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok((mut s, from)) = listener.accept().await {
            let (k, tx) = (keyring.clone(), tx.clone());
            tokio::spawn(async move {
                let by = tokio::time::Instant::now() + Duration::from_secs(5);
                if k.accept(&mut s, &from.to_string(), by).await.is_ok() {
                    let _ = tx.send(Ok(s)).await;
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Say Hello to `to` as `node_id` with peer port `port`; the answer's status code.
fn say_hello(rt: &tokio::runtime::Runtime, to: &str, node_id: &str, port: u16) -> tonic::Code {
    rt.block_on(async {
        let mut c = PeerClient::connect(format!("http://{to}")).await.expect("connect");
        match c.hello(proto::HelloRequest { node_id: node_id.into(), protocol: 1, listen_port: port as u32 }).await {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        }
    })
}

#[test]
fn a_stranger_cannot_join_without_or_with_a_token() {
    if !fuse_available("a_stranger_cannot_join_without_or_with_a_token") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("m.bin"), 64 << 20, 1201);
    write_random(&src.path().join("small.json"), 3000, 1202);
    let s = src.path().display().to_string();
    let forger = start_forger(&s, 8 << 20);

    // No authentication: the stranger's Hello is ignored, it is never asked for anything.
    let (_, a_addr) = peer_addr();
    let a = Agent::start(&s, &["--listen", &a_addr]);
    assert_eq!(say_hello(&forger.rt, &a_addr, "forger", forger.port), tonic::Code::Ok);
    std::thread::sleep(Duration::from_millis(300));
    for f in ["m.bin", "small.json"] {
        assert_eq!(sha256_file(&a.path(f)), sha256_file(&src.path().join(f)), "forged bytes reached A's mount");
    }
    assert_eq!(peer_entry(&a, &forger.addr), None, "the stranger joined: {}", a.status());
    assert_eq!(forger.served.load(std::sync::atomic::Ordering::SeqCst), 0);
    assert_eq!(tier(&a, "peer"), 0.0);
    assert!(a.log_text().contains("naming an address that is not a configured peer"), "{}", a.log_text());

    // With a token: the stranger's connection is closed before any gRPC byte is read.
    let tok = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tok.path(), "trust-token\n").unwrap();
    let (_, b_addr) = peer_addr();
    let b = Agent::start(&s, &["--listen", &b_addr, "--peer-token-file", &tok.path().display().to_string()]);
    assert_ne!(say_hello(&forger.rt, &b_addr, "forger", forger.port), tonic::Code::Ok);
    assert!(b.metric("cachefs_peer_auth_failures_total{reason=\"no_handshake\"}") >= 1.0);
    assert_eq!(sha256_file(&b.path("m.bin")), sha256_file(&src.path().join("m.bin")));
    assert_eq!(peer_entry(&b, &forger.addr), None);
    assert_eq!(forger.served.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn forged_hello_and_drain_for_another_node_change_nothing() {
    if !fuse_available("forged_hello_and_drain_for_another_node_change_nothing") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("d.bin"), 16 << 20, 1211);
    let s = src.path().display().to_string();
    let ((_, a_addr), (b_port, b_addr)) = (peer_addr(), peer_addr());
    let a = Agent::start(&s, &["--listen", &a_addr, "--peers", &b_addr]);
    let b = Agent::start(&s, &["--listen", &b_addr, "--peers", &a_addr]);
    let b_id = b.status()["node_id"].as_str().unwrap().to_string();
    assert!(poll_until(Duration::from_secs(10), || peer_entry(&a, &b_addr).is_some_and(|p| p["state"] == "live")), "{}", a.status());

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut c = PeerClient::connect(format!("http://{a_addr}")).await.unwrap();
        // "I am B and I am draining", from someone who is not B.
        c.drain(proto::DrainNotice { node_id: b_id.clone(), draining: true }).await.unwrap();
        // "I am node evil at B's port".
        c.hello(proto::HelloRequest { node_id: "evil".into(), protocol: 1, listen_port: b_port as u32 }).await.unwrap();
    });
    std::thread::sleep(Duration::from_millis(500));
    let entry = peer_entry(&a, &b_addr).unwrap();
    assert_eq!(entry["state"], "live", "a forged Drain changed B's state at A: {entry}");
    assert_eq!(entry["node_id"], b_id.as_str(), "a forged Hello changed B's node id at A: {entry}");

    // B really drains: A learns it from B itself.
    let st = std::process::Command::new(bin()).args(["drain", "--admin", &b.admin.to_string()]).status().unwrap();
    assert!(st.success());
    assert!(poll_until(Duration::from_secs(5), || peer_entry(&a, &b_addr).is_some_and(|p| p["state"] == "draining")), "{}", a.status());
}

#[test]
fn peers_with_another_chunk_size_or_source_are_incompatible_and_never_asked() {
    if !fuse_available("peers_with_another_chunk_size_or_source_are_incompatible_and_never_asked") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("i.bin"), 24 << 20, 1221);
    let other = tempfile::tempdir().unwrap();
    std::fs::copy(src.path().join("i.bin"), other.path().join("i.bin")).unwrap();
    let s = src.path().display().to_string();
    let want = sha256_file(&src.path().join("i.bin"));
    let ((_, a_addr), (_, c_addr), (_, d_addr)) = (peer_addr(), peer_addr(), peer_addr());
    let a = Agent::start(&s, &["--listen", &a_addr, "--chunk-size", "4MiB", "--peers", &format!("{c_addr},{d_addr}")]);
    assert_eq!(sha256_file(&a.path("i.bin")), want);

    let c = Agent::start(&s, &["--listen", &c_addr, "--chunk-size", "8MiB", "--peers", &a_addr]);
    let d = Agent::start(&other.path().display().to_string(), &["--listen", &d_addr, "--chunk-size", "4MiB", "--peers", &a_addr]);
    for (x, why) in [(&c, "chunk size"), (&d, "source")] {
        let e = peer_entry(x, &a_addr).unwrap();
        assert_eq!(e["state"], "incompatible", "{e}");
        assert!(e["reason"].as_str().unwrap_or("").contains(why), "{e}");
        assert_eq!(sha256_file(&x.path("i.bin")), want);
        assert_eq!(tier(x, "peer"), 0.0);
        assert_eq!(x.log_text().matches("peer is incompatible").count(), 1, "{}", x.log_text());
    }
    assert_eq!(a.metric("cachefs_peer_sent_bytes_total"), 0.0);
    // A sees them the same way.
    assert!(poll_until(Duration::from_secs(5), || peer_entry(&a, &c_addr).is_some_and(|p| p["state"] == "incompatible")), "{}", a.status());
}

/// One raw HTTP/1.0 request with `headers`; the status code and body.
fn http_raw(addr: std::net::SocketAddr, request_line: &str, headers: &[&str], body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut req = format!("{request_line}\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str(&format!("Content-Length: {}\r\n\r\n{body}", body.len()));
    s.write_all(req.as_bytes()).unwrap();
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (code, buf.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

fn s3_opts(endpoint: &str) -> Vec<String> {
    let mut v = Vec::new();
    for o in [
        format!("endpoint={endpoint}"),
        "allow_http=true".into(),
        "access_key_id=AKIATESTKEY".into(),
        "secret_access_key=test-secret-value-77".into(),
        "region=us-east-1".into(),
    ] {
        v.push("--source-option".to_string());
        v.push(o);
    }
    v
}

#[test]
fn admin_posts_need_the_token_a_good_host_and_no_cross_site_marks() {
    if !fuse_available("admin_posts_need_the_token_a_good_host_and_no_cross_site_marks") {
        return;
    }
    use common::fake_s3::{self, FakeS3};
    let data = random_bytes(24 << 20, 1231);
    let s3 = FakeS3::start("bkt", "p/w.bin", data.clone());
    let tok = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tok.path(), "admin-token-1\n").unwrap();
    let tok_path = tok.path().display().to_string();
    let mut args = s3_opts(&s3.endpoint());
    args.extend(["--admin-token-file".to_string(), tok_path.clone(), "--chunk-size".into(), "1MiB".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let a = Agent::start("s3://bkt/p", &args);
    let host = format!("Host: {}", a.admin);
    let json = "Content-Type: application/json";
    let bearer = "Authorization: Bearer admin-token-1";

    // A page in a browser: no token, its Origin, a form body.
    let (code, _) = http_raw(a.admin, "POST /drain HTTP/1.0", &[&host, "Origin: https://evil.example", "Content-Type: text/plain"], "");
    assert_eq!(code, 403);
    assert_eq!(http_raw(a.admin, "POST /drain HTTP/1.0", &[&host, json], "{}").0, 401);
    assert_eq!(http_raw(a.admin, "POST /drain HTTP/1.0", &[&host, json, "Authorization: Bearer wrong"], "{}").0, 401);
    assert_eq!(http_raw(a.admin, "POST /drain HTTP/1.0", &["Host: rebind.example:7071", json, bearer], "{}").0, 403);
    assert_eq!(http_raw(a.admin, "GET /status HTTP/1.0", &["Host: rebind.example:7071"], "").0, 403);
    assert_eq!(http_raw(a.admin, "GET /metrics HTTP/1.0", &["Host: 10.1.2.3:7071"], "").0, 200);
    assert_eq!(http_get(a.admin, "/readyz").map(|r| r.0), Some(200), "a refused POST drained the agent");

    // One warm job per path; a client that goes away cancels its job.
    s3.set(fake_s3::HOLD);
    let warm = r#"{"path": "w.bin"}"#;
    let first = {
        use std::io::{BufRead, Write};
        let mut s = std::net::TcpStream::connect(a.admin).unwrap();
        write!(s, "POST /warm HTTP/1.0\r\n{host}\r\n{json}\r\n{bearer}\r\nContent-Length: {}\r\n\r\n{warm}", warm.len()).unwrap();
        let mut line = String::new();
        std::io::BufReader::new(s.try_clone().unwrap()).read_line(&mut line).unwrap();
        assert!(line.contains("200"), "{line}");
        s
    };
    let (code, body) = http_raw(a.admin, "POST /warm HTTP/1.0", &[&host, json, bearer], warm);
    assert_eq!(code, 409, "{body}");
    drop(first);
    assert!(poll_until(Duration::from_secs(10), || a.log_text().contains("warm cancelled: the client went away")), "{}", a.log_text());
    s3.set(fake_s3::SERVE);

    // The command line with the token file works; without it, it is refused with a clear line.
    let out = std::process::Command::new(bin()).args(["warm", "--admin", &a.admin.to_string(), "w.bin"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("admin token"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(bin())
        .args(["warm", "--admin", &a.admin.to_string(), "--admin-token-file", &tok_path, "w.bin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = std::process::Command::new(bin()).args(["drain", "--admin", &a.admin.to_string()]).output().unwrap();
    assert!(!out.status.success());
    let st = std::process::Command::new(bin())
        .args(["drain", "--admin", &a.admin.to_string(), "--admin-token-file", &tok_path])
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(http_get(a.admin, "/readyz").map(|r| r.0), Some(503));
}

#[test]
fn no_secret_in_logs_status_or_peer_messages() {
    if !fuse_available("no_secret_in_logs_status_or_peer_messages") {
        return;
    }
    use common::fake_s3::FakeS3;
    let data = random_bytes(4 << 20, 1241);
    let s3 = FakeS3::start("bkt", "p/s.bin", data.clone());
    let secret = "url-secret-9931";
    let (_, a_addr) = peer_addr();
    let mut args = s3_opts(&s3.endpoint());
    args.extend(["--listen".to_string(), a_addr.clone()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let source = format!("s3://AKIAURLUSER:{secret}@bkt/p");
    let a = Agent::start_env(&source, &args, &[("AWS_SECRET_ACCESS_KEY", "env-secret-4417")]);
    assert!(std::fs::read(a.path("s.bin")).unwrap() == data);
    let hello = tokio::runtime::Runtime::new().unwrap().block_on(async {
        let mut c = PeerClient::connect(format!("http://{a_addr}")).await.unwrap();
        c.hello(proto::HelloRequest { node_id: "probe".into(), protocol: 1, listen_port: 0 }).await.unwrap().into_inner()
    });
    let st = http_get(a.admin, "/status").unwrap().1;
    let metrics = http_get(a.admin, "/metrics").unwrap().1;
    for text in [a.log_text(), st.clone(), format!("{hello:?}"), metrics] {
        for s in [secret, "env-secret-4417", "test-secret-value-77"] {
            assert!(!text.contains(s), "{s} leaked in: {text}");
        }
    }
    assert_eq!(hello.source, "s3://bkt/p");
    assert!(st.contains("s3://bkt/p"), "{st}");
}

/// The `/status` verification entry of `key`.
fn check_of(a: &Agent, key: &str) -> Option<serde_json::Value> {
    a.status()["verification"]["files"].as_array()?.iter().find(|f| f["key"] == key).cloned()
}

#[test]
fn a_configured_peer_that_forges_bytes_is_caught_by_the_origin_checksum() {
    if !fuse_available("a_configured_peer_that_forges_bytes_is_caught_by_the_origin_checksum") {
        return;
    }
    use common::fake_s3::FakeS3;
    let data = random_bytes((12 << 20) + 4321, 1251);
    let s3 = FakeS3::start("bkt", "p/v.bin", data.clone());
    let forger = start_forger("s3://bkt/p", 1 << 20);
    let mut args = s3_opts(&s3.endpoint());
    args.extend(["--chunk-size", "1MiB", "--peers", &forger.addr].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let c = Agent::start("s3://bkt/p", &args);
    assert!(poll_until(Duration::from_secs(10), || peer_entry(&c, &forger.addr).is_some_and(|p| p["state"] == "live")), "{}", c.status());

    // The first read is served from the forger as it streams in (here through a mapping, as
    // safetensors reads: the forged bytes land in the kernel's page cache); once the file is
    // whole it is checked against the origin's CRC64NVME, dropped, and loaded from the origin alone.
    let file = std::fs::File::open(c.path("v.bin")).unwrap();
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let first: Vec<u8> = map.to_vec();
    assert!(first != data, "the forger's bytes did not reach the mapping: the test proves nothing");
    let forged = forger.served.load(std::sync::atomic::Ordering::SeqCst);
    assert!(forged > 0, "the forger was never asked: the test proves nothing");
    assert!(
        poll_until(Duration::from_secs(20), || check_of(&c, "v.bin").is_some_and(|f| f["check"] == "verified")),
        "{}\n{}",
        c.status(),
        c.log_text()
    );
    assert_eq!(c.metric("cachefs_verify_failures_total"), 1.0);
    assert!(s3.checksum_heads.load(std::sync::atomic::Ordering::SeqCst) >= 1, "the checksum was not asked for with a signed header");
    let f = check_of(&c, "v.bin").unwrap();
    assert_eq!(f["origin_only"], true, "{f}");
    assert_eq!(peer_entry(&c, &forger.addr).unwrap()["state"], "distrusted");
    assert!(c.log_text().contains("fails the origin's checksum"), "{}", c.log_text());
    // The kernel's cached pages of the file were dropped: the same mapping now faults in the
    // origin's bytes.
    assert_eq!(c.metric("cachefs_page_invalidations_total"), 1.0);
    assert!(map[..] == data[..], "the mapping still shows forged bytes after the check failed");

    // Every later read has the origin's bytes, and the forger is not asked again.
    let want = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&data))
    };
    assert_eq!(sha256_file(&c.path("v.bin")), want);
    assert_eq!(forger.served.load(std::sync::atomic::Ordering::SeqCst), forged);
}

#[test]
fn files_assembled_from_honest_peers_are_verified() {
    if !fuse_available("files_assembled_from_honest_peers_are_verified") {
        return;
    }
    use common::fake_s3::FakeS3;
    let data = random_bytes((9 << 20) + 7, 1261);
    let s3 = FakeS3::start("bkt", "p/h.bin", data.clone());
    let ((_, a_addr), (_, b_addr)) = (peer_addr(), peer_addr());
    let opts = |listen: &str, peer: &str| {
        let mut v = s3_opts(&s3.endpoint());
        v.extend(["--chunk-size", "1MiB", "--listen", listen, "--peers", peer].map(String::from));
        v
    };
    let a_args = opts(&a_addr, &b_addr);
    let a = Agent::start("s3://bkt/p", &a_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(std::fs::read(a.path("h.bin")).unwrap() == data);
    let b_args = opts(&b_addr, &a_addr);
    let b = Agent::start("s3://bkt/p", &b_args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(std::fs::read(b.path("h.bin")).unwrap() == data);
    assert!(tier(&b, "peer") > 0.0, "B read nothing from A: the test proves nothing");
    assert!(poll_until(Duration::from_secs(10), || check_of(&b, "h.bin").is_some_and(|f| f["check"] == "verified")), "{}", b.status());
    assert_eq!(b.metric("cachefs_verify_failures_total"), 0.0);
    assert_eq!(b.status()["verification"]["checksum"], "crc64nvme");

    // A local directory publishes no checksum: /status says so.
    let src = tempfile::tempdir().unwrap();
    std::fs::write(src.path().join("h.bin"), &data).unwrap();
    let (_, d_addr) = peer_addr();
    let d = Agent::start(&src.path().display().to_string(), &["--listen", &d_addr]);
    assert!(d.status()["verification"]["note"].as_str().unwrap_or("").contains("publishes no whole-object checksum"), "{}", d.status());
}

/// Three holders striped over by one reader, one of which forges a single chunk (valid
/// crc32c): the file fails the origin's checksum, is loaded again from the origin, and only the
/// forger is distrusted; the two honest holders stay live (every supplier was distrusted
/// before, sending the reader, and a fleet of readers, to the origin for ten minutes).
#[test]
fn only_the_peer_that_forged_a_chunk_is_distrusted() {
    if !fuse_available("only_the_peer_that_forged_a_chunk_is_distrusted") {
        return;
    }
    use common::fake_s3::FakeS3;
    let data = random_bytes((12 << 20) + 4321, 1271);
    let s3 = FakeS3::start("bkt", "p/s.bin", data.clone());
    let forger = start_forger_of("s3://bkt/p", 1 << 20, Some(data.clone()));
    let ((_, a_addr), (_, b_addr), (_, c_addr)) = (peer_addr(), peer_addr(), peer_addr());
    let start = |listen: &str, peers: &[&str]| {
        let mut v = s3_opts(&s3.endpoint());
        v.extend(["--chunk-size", "1MiB", "--listen", listen, "--peers", &peers.join(",")].map(String::from));
        Agent::start("s3://bkt/p", &v.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let a = start(&a_addr, &[&b_addr, &c_addr]);
    assert!(std::fs::read(a.path("s.bin")).unwrap() == data);
    let b = start(&b_addr, &[&a_addr, &c_addr]);
    assert!(std::fs::read(b.path("s.bin")).unwrap() == data);
    // C does not check chunks against other holders' digests (that would catch the forged one
    // before use, see `a_forger_with_the_token_gets_no_byte_to_a_reader`): the whole-file check
    // behind it is what this test is about.
    let c = {
        let mut v = s3_opts(&s3.endpoint());
        let peers = [a_addr.as_str(), &b_addr, &forger.addr].join(",");
        v.extend(["--chunk-size", "1MiB", "--listen", &c_addr, "--peers", &peers, "--verify-peer-chunks", "false"].map(String::from));
        Agent::start("s3://bkt/p", &v.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let live = |x: &Agent, addr: &str| peer_entry(x, addr).is_some_and(|p| p["state"] == "live");
    assert!(poll_until(Duration::from_secs(15), || [&a_addr, &b_addr, &forger.addr].iter().all(|p| live(&c, p))), "{}", c.status());

    let _ = std::fs::read(c.path("s.bin")).unwrap();
    assert!(forger.forged_index.lock().unwrap().is_some(), "the forger was never asked: the test proves nothing");
    assert!(
        poll_until(Duration::from_secs(20), || check_of(&c, "s.bin").is_some_and(|f| f["check"] == "verified")),
        "{}\n{}",
        c.status(),
        c.log_text()
    );
    assert_eq!(c.metric("cachefs_verify_failures_total"), 1.0);
    assert_eq!(peer_entry(&c, &forger.addr).unwrap()["state"], "distrusted", "{}", c.status());
    for honest in [&a_addr, &b_addr] {
        assert_eq!(peer_entry(&c, honest).unwrap()["state"], "live", "an honest holder was distrusted: {}", c.status());
    }
    assert!(std::fs::read(c.path("s.bin")).unwrap() == data, "the file is wrong after the reload");
}

/// A file larger than the reader's cache is never whole in its memory, so the whole-file check
/// can never run on the bytes peers served: /status and a metric must say so (they said
/// nothing: the file stayed "pending" for ever).
#[test]
fn peer_bytes_that_cannot_be_checked_are_reported() {
    if !fuse_available("peer_bytes_that_cannot_be_checked_are_reported") {
        return;
    }
    use common::fake_s3::FakeS3;
    let data = random_bytes((12 << 20) + 99, 1281);
    let s3 = FakeS3::start("bkt", "p/big.bin", data.clone());
    let ((_, a_addr), (_, b_addr)) = (peer_addr(), peer_addr());
    let start = |listen: &str, peer: &str, cache: &str| {
        let mut v = s3_opts(&s3.endpoint());
        v.extend(["--chunk-size", "1MiB", "--cache-size", cache, "--listen", listen, "--peers", peer].map(String::from));
        Agent::start("s3://bkt/p", &v.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let a = start(&a_addr, &b_addr, "64MiB");
    assert!(std::fs::read(a.path("big.bin")).unwrap() == data);
    let b = start(&b_addr, &a_addr, "4MiB");
    assert!(poll_until(Duration::from_secs(15), || peer_entry(&b, &a_addr).is_some_and(|p| p["state"] == "live")), "{}", b.status());
    assert!(std::fs::read(b.path("big.bin")).unwrap() == data);
    assert!(tier(&b, "peer") > 0.0, "B read nothing from A: the test proves nothing");
    assert_eq!(b.metric("cachefs_unverified_files_total"), 1.0, "{}", b.status());
    let f = check_of(&b, "big.bin").unwrap_or_default();
    assert_eq!(f["served_unverified"], true, "{f}");
    assert!(b.log_text().contains("cannot be checked against the origin"), "{}", b.log_text());
}

/// A peer that holds the token, claims every chunk in its inventory and serves forged bytes
/// with their correct crc32c: each chunk it serves is checked, before it is stored or served,
/// against the digest the honest holder vouches for, so no forged byte reaches any read
/// (before this, they reached readers until the whole-file check).
#[test]
fn a_forger_with_the_token_gets_no_byte_to_a_reader() {
    if !fuse_available("a_forger_with_the_token_gets_no_byte_to_a_reader") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes((24 << 20) + 999, 1271);
    std::fs::write(src.path().join("f.bin"), &data).unwrap();
    let s = src.path().display().to_string();
    let tok = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tok.path(), "fleet-token\n").unwrap();
    let tok = tok.path().display().to_string();
    let (_, a_addr) = peer_addr();
    let a = Agent::start(&s, &["--listen", &a_addr, "--peer-token-file", &tok, "--chunk-size", "4MiB"]);
    assert!(std::fs::read(a.path("f.bin")).unwrap() == data);
    let forger = start_forger_full(&s, 4 << 20, None, Some("fleet-token"));
    let peers = format!("{},{a_addr}", forger.addr);
    let c = Agent::start(&s, &["--peers", &peers, "--peer-token-file", &tok, "--chunk-size", "4MiB"]);
    let live = |addr: &str| peer_entry(&c, addr).is_some_and(|p| p["state"] == "live");
    assert!(poll_until(Duration::from_secs(10), || live(&forger.addr) && live(&a_addr)), "{}", c.status());
    // Through a mapping (as safetensors reads) and through read(): every byte is the origin's.
    let file = std::fs::File::open(c.path("f.bin")).unwrap();
    let map = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    assert!(map[..] == data[..], "forged bytes reached a mapping");
    assert!(std::fs::read(c.path("f.bin")).unwrap() == data, "forged bytes reached a read");
    assert!(forger.served.load(std::sync::atomic::Ordering::SeqCst) > 0, "the forger was never asked: the test proves nothing");
    assert!(c.metric("cachefs_peer_digest_mismatches_total") >= 1.0, "{}", c.log_text());
    assert_eq!(c.metric("cachefs_verify_failures_total"), 0.0, "caught only after the fact");
    assert_eq!(c.metric("cachefs_page_invalidations_total"), 0.0);
}
