//! Several real agent processes on 127.0.0.1 (own cache dirs, mountpoints, admin and peer
//! ports), one shared `file://` origin, talking gRPC.

mod common;

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use common::*;
use tonic::{Request, Response, Status};

use cachefs::peer::auth::{Keyring, Purpose};
use cachefs::peer::proto;
use cachefs::peer::proto::peer_client::PeerClient;

/// A keyring holding `token`, as a test client.
fn keyring(token: &str) -> Arc<Keyring> {
    Keyring::new(&[token.to_string()], "test-client".into(), Arc::new(cachefs::metrics::Metrics::new())).unwrap()
}

/// A gRPC channel to `addr` whose connections pass the handshake with `token`.
fn authed_channel(addr: &str, token: &str) -> tonic::transport::Channel {
    let connector = cachefs::peer::auth::connector(keyring(token), addr.to_string(), std::time::Duration::from_secs(5));
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect_with_connector_lazy(connector)
}

fn peer_port() -> (u16, String) {
    let p = free_port();
    (p, format!("127.0.0.1:{p}"))
}

fn origin_bytes(a: &Agent) -> f64 {
    a.metric("cachefs_origin_bytes_total")
}

fn tier(a: &Agent, t: &str) -> f64 {
    a.metric(&format!("cachefs_read_bytes_total{{tier=\"{t}\"}}"))
}

fn read_all(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

#[test]
fn remote_hit_then_three_agents_cold_at_once() {
    if !fuse_available("remote_hit_then_three_agents_cold_at_once") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("model.bin"), 256 << 20, 61);
    write_random(&src.path().join("cold.bin"), 96 << 20, 62);
    let want = sha256_file(&src.path().join("model.bin"));
    let s = src.path().display().to_string();
    // Without a token only configured peers are used: each agent lists the others, including
    // those not started yet.
    let (_, a_addr) = peer_port();
    let (_, b_addr) = peer_port();
    let (_, c_addr) = peer_port();
    let a = Agent::start(&s, &["--listen", &a_addr, "--peers", &format!("{b_addr},{c_addr}")]);
    assert_eq!(sha256_file(&a.path("model.bin")), want);
    let a_origin = origin_bytes(&a);
    assert!(a_origin >= (256 << 20) as f64);

    // B starts empty and reads what A holds: every byte from A's memory, none from the origin.
    let b = Agent::start(&s, &["--listen", &b_addr, "--peers", &format!("{a_addr},{c_addr}")]);
    assert_eq!(sha256_file(&b.path("model.bin")), want);
    assert_eq!(origin_bytes(&b), 0.0, "B fetched from origin; log:\n{}", b.log_text());
    assert_eq!(tier(&b, "peer"), (256 << 20) as f64);
    assert_eq!(a.metric("cachefs_peer_sent_bytes_total"), (256 << 20) as f64);
    assert_eq!(b.metric("cachefs_peer_received_bytes_total"), (256 << 20) as f64);
    let (_, status) = http_get(b.admin, "/status").unwrap();
    let st: serde_json::Value = serde_json::from_str(&status).unwrap();
    let a_state = st["peers"].as_array().unwrap().iter().find(|p| p["addr"] == a_addr.as_str()).map(|p| p["state"].clone());
    assert_eq!(a_state, Some("live".into()), "{st}");

    // C joins; A, B and C read a cold file at the same moment: the origin serves it about once.
    let c = Agent::start(&s, &["--listen", &c_addr, "--peers", &format!("{a_addr},{b_addr}")]);
    // A and B hear C's hello and probe it at once; wait until all see two live peers.
    for x in [&a, &b, &c] {
        let ok = poll_until(std::time::Duration::from_secs(15), || {
            let st: serde_json::Value = serde_json::from_str(&http_get(x.admin, "/status").unwrap().1).unwrap();
            st["peers"].as_array().unwrap().iter().filter(|p| p["state"] == "live").count() == 2
        });
        assert!(ok, "peers did not converge: {}", http_get(x.admin, "/status").unwrap().1);
    }
    let before: f64 = [&a, &b, &c].iter().map(|x| origin_bytes(x)).sum();
    let want_cold = sha256_file(&src.path().join("cold.bin"));
    let paths: Vec<_> = [&a, &b, &c].iter().map(|x| x.path("cold.bin")).collect();
    let readers: Vec<_> = paths.into_iter().map(|p| std::thread::spawn(move || sha256_file(&p))).collect();
    for r in readers {
        assert_eq!(r.join().unwrap(), want_cold);
    }
    let after: f64 = [&a, &b, &c].iter().map(|x| origin_bytes(x)).sum();
    let ratio = (after - before) / (96u64 << 20) as f64;
    eprintln!("three-agent cold load: origin bytes / file size = {ratio:.3}");
    assert!(ratio <= 1.1, "origin served {ratio:.3} x the file");
}

#[test]
fn sigkill_of_a_peer_mid_read_still_gives_correct_bytes() {
    if !fuse_available("sigkill_of_a_peer_mid_read_still_gives_correct_bytes") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes(128 << 20, 71);
    std::fs::write(src.path().join("m.bin"), &data).unwrap();
    let s = src.path().display().to_string();
    let (_, a_addr) = peer_port();
    let (_, b_addr) = peer_port();
    let mut a = Agent::start(&s, &["--listen", &a_addr]);
    assert_eq!(read_all(&a.path("m.bin")).len(), data.len());
    let b = Agent::start(&s, &["--listen", &b_addr, "--peers", &a_addr]);
    assert_eq!(read_all(&b.path("m.bin")), data);
    let (_, c_addr) = peer_port();
    let c = Agent::start(&s, &["--listen", &c_addr, "--peers", &format!("{a_addr},{b_addr}"), "--chunk-size", "8MiB"]);
    let mut f = std::fs::File::open(c.path("m.bin")).unwrap();
    let mut got = Vec::with_capacity(data.len());
    let mut buf = vec![0u8; 1 << 20];
    let mut killed = false;
    loop {
        let n = f.read(&mut buf).unwrap_or_else(|e| panic!("read after kill: {e}; log:\n{}", c.log_text()));
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        if !killed && got.len() >= 40 << 20 {
            a.kill9();
            killed = true;
        }
    }
    assert!(killed);
    assert!(got == data, "C's bytes differ after A was killed");
    assert!(tier(&c, "peer") > 0.0);
}

/// A peer that claims to hold every chunk and serves each with one byte flipped (and the true crc).
struct CorruptPeer {
    data: Arc<Vec<u8>>,
    key: String,
    chunk: u64,
    /// The source it claims (the agent's own, so that it is used).
    source: String,
}

#[tonic::async_trait]
impl proto::peer_server::Peer for CorruptPeer {
    type ReadChunkStream = std::pin::Pin<Box<dyn futures::Stream<Item = Result<proto::ChunkData, Status>> + Send>>;

    async fn read_chunk(&self, req: Request<proto::ReadChunkRequest>) -> Result<Response<Self::ReadChunkStream>, Status> {
        let r = req.into_inner();
        let start = (r.index * self.chunk) as usize;
        let end = (start + self.chunk as usize).min(self.data.len());
        let good = &self.data[start..end];
        let crc = crc32c::crc32c(good);
        let mut bad = good.to_vec();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        // In messages of at most 1 MiB, as agents send them.
        let msgs: Vec<_> = bad
            .chunks(1 << 20)
            .enumerate()
            .map(|(i, d)| {
                let first = i == 0;
                Ok(proto::ChunkData {
                    offset: (i << 20) as u64,
                    data: d.to_vec().into(),
                    chunk_len: if first { (end - start) as u64 } else { 0 },
                    crc32c: if first { crc } else { 0 },
                })
            })
            .collect();
        Ok(Response::new(Box::pin(futures::stream::iter(msgs))))
    }

    async fn inventory(&self, req: Request<proto::InventoryRequest>) -> Result<Response<proto::InventoryResponse>, Status> {
        let n = (self.data.len() as u64).div_ceil(self.chunk);
        let objects = req
            .into_inner()
            .objects
            .into_iter()
            .filter(|o| o.key == self.key)
            .map(|o| proto::ObjectInventory {
                key: o.key,
                etag: o.etag,
                present: vec![0xffu8; n.div_ceil(8) as usize].into(),
                chunks: n,
                filling: Default::default(),
                digests: Default::default(),
                digests_mac: Default::default(),
            })
            .collect();
        Ok(Response::new(proto::InventoryResponse { objects, draining: false }))
    }

    async fn hello(&self, _r: Request<proto::HelloRequest>) -> Result<Response<proto::HelloResponse>, Status> {
        Ok(Response::new(proto::HelloResponse {
            node_id: "corrupt-peer".into(),
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

#[test]
fn corrupted_chunk_from_a_peer_is_caught_and_fetched_elsewhere() {
    if !fuse_available("corrupted_chunk_from_a_peer_is_caught_and_fetched_elsewhere") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    let data = Arc::new(random_bytes((24 << 20) + 5, 81));
    std::fs::write(src.path().join("c.bin"), &data[..]).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let fake_addr = listener.local_addr().unwrap().to_string();
    let svc = proto::peer_server::PeerServer::new(CorruptPeer {
        data: data.clone(),
        key: "c.bin".into(),
        chunk: 8 << 20,
        source: src.path().display().to_string(),
    });
    rt.spawn(
        tonic::transport::Server::builder().add_service(svc).serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let c = Agent::start(&src.path().display().to_string(), &["--peers", &fake_addr]);
    let got = read_all(&c.path("c.bin"));
    assert!(got == *data, "corrupted bytes reached the reader");
    assert!(c.metric("cachefs_peer_checksum_errors_total") >= 1.0, "log:\n{}", c.log_text());
    assert_eq!(tier(&c, "peer"), 0.0);
    assert_eq!(tier(&c, "origin"), data.len() as f64);
}

#[test]
fn token_etag_and_prefix_are_enforced_and_dns_discovery_works() {
    if !fuse_available("token_etag_and_prefix_are_enforced_and_dns_discovery_works") {
        return;
    }
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("t.bin"), 20 << 20, 91);
    let tok = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tok.path(), "s3cret-token\n").unwrap();
    let tok_path = tok.path().display().to_string();
    let s = src.path().display().to_string();
    let (a_port, a_addr) = peer_port();
    let a = Agent::start(&s, &["--listen", &a_addr, "--peer-token-file", &tok_path]);
    let want = sha256_file(&a.path("t.bin"));
    let meta = std::fs::metadata(src.path().join("t.bin")).unwrap();

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        // A plain gRPC client (no handshake) gets a closed connection, and the token itself
        // in metadata opens nothing: it never travels in the clear.
        let plain = tonic::transport::Endpoint::from_shared(format!("http://{a_addr}")).unwrap().connect_lazy();
        let mut no_token = PeerClient::with_interceptor(plain, |mut r: Request<()>| {
            r.metadata_mut().insert(cachefs::peer::TOKEN_HEADER, "s3cret-token".parse().unwrap());
            Ok(r)
        });
        assert!(no_token.hello(proto::HelloRequest { node_id: "x".into(), protocol: 1, listen_port: 0 }).await.is_err());
        assert!(a.metric("cachefs_peer_auth_failures_total{reason=\"no_handshake\"}") >= 1.0);
        let mut client = PeerClient::new(authed_channel(&a_addr, "s3cret-token"));
        let hello = client.hello(proto::HelloRequest { node_id: "x".into(), protocol: 1, listen_port: 0 }).await.unwrap().into_inner();
        assert_eq!(hello.chunk_size, 8 << 20);
        let (_, status) = http_get(a.admin, "/status").unwrap();
        let st: serde_json::Value = serde_json::from_str(&status).unwrap();
        assert_eq!(st["node_id"], hello.node_id.as_str());

        // The agent's own listing gives the etag it serves; ask with it and with others.
        let req = |key: &str, etag: &str| proto::ReadChunkRequest {
            object: Some(proto::ObjectRef { key: key.into(), etag: etag.into(), version: String::new(), size: meta.len() }),
            index: 0,
            chunk_size: 8 << 20,
            allow_fill: false,
            protocol: 1,
        };
        let e = client.read_chunk(req("../etc/passwd", "x")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = client.read_chunk(req("/t.bin", "x")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        let e = client.read_chunk(req("t.bin", "wrong-etag")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let e = client.read_chunk(req("nope.bin", "x")).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound);
        let mut bad_size = req("t.bin", "x");
        bad_size.chunk_size = 1 << 20;
        assert_eq!(client.read_chunk(bad_size).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    });

    // B finds A through DNS (`localhost` resolves to 127.0.0.1) and presents the token: remote hit.
    let (_, b_addr) = peer_port();
    let dns = format!("localhost:{a_port}");
    let b = Agent::start(&s, &["--listen", &b_addr, "--peer-dns", &dns, "--peer-token-file", &tok_path]);
    assert_eq!(sha256_file(&b.path("t.bin")), want);
    assert_eq!(origin_bytes(&b), 0.0, "log:\n{}", b.log_text());
    assert_eq!(tier(&b, "peer"), (20 << 20) as f64);

    // Without the token, C's requests are refused and it falls back to the origin, correctly.
    let c = Agent::start(&s, &["--peers", &a_addr]);
    assert_eq!(sha256_file(&c.path("t.bin")), want);
    assert_eq!(tier(&c, "peer"), 0.0);
    assert!(c.log_text().contains("peers are unauthenticated"));
}

/// A CA and two leaf certificates for 127.0.0.1, made with the openssl CLI.
fn make_certs(dir: &Path) {
    let run = |args: &[&str]| {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=cachefs-test-ca",
    ]);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth\n").unwrap();
    for n in ["a", "b"] {
        run(&[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{n}.key"),
            "-out",
            &format!("{n}.csr"),
            "-subj",
            &format!("/CN=agent-{n}"),
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            &format!("{n}.csr"),
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &format!("{n}.crt"),
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ]);
    }
}

#[test]
fn mutual_tls_between_peers() {
    if !fuse_available("mutual_tls_between_peers") {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    make_certs(certs.path());
    let p = |f: &str| certs.path().join(f).display().to_string();
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("x.bin"), 24 << 20, 101);
    let want = sha256_file(&src.path().join("x.bin"));
    let s = src.path().display().to_string();
    let (_, a_addr) = peer_port();
    let (ac, ak, ca) = (p("a.crt"), p("a.key"), p("ca.crt"));
    let a = Agent::start(&s, &["--listen", &a_addr, "--peer-tls-cert", &ac, "--peer-tls-key", &ak, "--peer-tls-ca", &ca]);
    assert_eq!(sha256_file(&a.path("x.bin")), want);
    assert!(a.log_text().contains("mutual TLS"));

    let (_, b_addr) = peer_port();
    let (bc, bk) = (p("b.crt"), p("b.key"));
    let b =
        Agent::start(&s, &["--listen", &b_addr, "--peers", &a_addr, "--peer-tls-cert", &bc, "--peer-tls-key", &bk, "--peer-tls-ca", &ca]);
    assert_eq!(sha256_file(&b.path("x.bin")), want);
    assert_eq!(origin_bytes(&b), 0.0, "log:\n{}", b.log_text());
    assert_eq!(tier(&b, "peer"), (24 << 20) as f64);

    // A plaintext agent cannot talk to A: it reads from the origin instead, correctly.
    let c = Agent::start(&s, &["--peers", &a_addr]);
    assert_eq!(sha256_file(&c.path("x.bin")), want);
    assert_eq!(tier(&c, "peer"), 0.0);

    // Half a TLS configuration, or a file that is not PEM, is a one-line start-up error.
    let out = std::process::Command::new(bin())
        .args(["mount", "--source", &s, "--mountpoint", "/tmp/cachefs-never", "--cache-size", "16MiB", "--peer-tls-cert", &ac])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs all of --peer-tls-cert"));
    let out = std::process::Command::new(bin())
        .args([
            "mount",
            "--source",
            &s,
            "--mountpoint",
            "/tmp/cachefs-never",
            "--cache-size",
            "16MiB",
            "--peer-tls-cert",
            &ac,
            "--peer-tls-key",
            &ak,
            "--peer-tls-ca",
            &s,
        ])
        .output()
        .unwrap();
    assert_ne!(out.status.code(), Some(0));
}

/// Write one raw-path frame: a big-endian u32 length and the bytes.
fn raw_frame(s: &mut std::net::TcpStream, body: &[u8]) {
    use std::io::Write;
    s.write_all(&(body.len() as u32).to_be_bytes()).unwrap();
    s.write_all(body).unwrap();
}

fn raw_header(s: &mut std::net::TcpStream) -> Option<proto::RawChunkHeader> {
    use prost::Message;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).ok()?;
    proto::RawChunkHeader::decode(body.as_slice()).ok()
}

/// The raw data path on the peer port: a connection without the handshake gets only a close, a
/// wrong token is refused, a hostile frame length closes
/// only that connection, a bad request gets its status, a good one the exact chunk with its
/// crc32c; the agent keeps serving throughout.
#[test]
fn raw_data_path_refuses_bad_tokens_and_frames() {
    if !fuse_available("raw_data_path_refuses_bad_tokens_and_frames") {
        return;
    }
    use prost::Message;
    let src = tempfile::tempdir().unwrap();
    let data = random_bytes(12 << 20, 95);
    std::fs::write(src.path().join("r.bin"), &data).unwrap();
    let tok = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tok.path(), "raw-token\n").unwrap();
    let (_, a_addr) = peer_port();
    let a = Agent::start(
        &src.path().display().to_string(),
        &["--listen", &a_addr, "--peer-token-file", &tok.path().display().to_string(), "--chunk-size", "4MiB"],
    );
    assert!(read_all(&a.path("r.bin")) == data);
    // A plain TCP client with the old preamble and even the right token: nothing but a close.
    let mut plain = std::net::TcpStream::connect(&a_addr).unwrap();
    plain.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
    let mut preamble = b"CFS1".to_vec();
    preamble.extend_from_slice(&9u32.to_be_bytes());
    preamble.extend_from_slice(b"raw-token");
    // The agent may close before it all arrives (it needs only the first bytes to refuse).
    let _ = std::io::Write::write_all(&mut plain, &preamble);
    // Unread bytes make the close a reset; either way not one byte comes back.
    let got = plain.read(&mut [0u8; 64]);
    assert!(
        matches!(&got, Ok(0)) || matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "a connection without a session proof must get only a close: {got:?}"
    );
    assert!(a.metric("cachefs_peer_auth_failures_total{reason=\"no_handshake\"}") >= 1.0);
    // A client proving the wrong token is refused.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let wrong = rt.block_on(keyring("nope").dial(&a_addr, Purpose::Raw, std::time::Duration::from_secs(5)));
    assert_eq!(wrong.err().map(|e| e.reason()), Some("server_proof"), "a server that does not hold our token is found out");
    let connect = || {
        let (s, _) = rt.block_on(keyring("raw-token").dial(&a_addr, Purpose::Raw, std::time::Duration::from_secs(5))).unwrap();
        let s = s.into_std().unwrap();
        s.set_nonblocking(false).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(10))).unwrap();
        s
    };
    // A frame length far past the limit: this connection closes, nothing else happens.
    let mut s = connect();
    std::io::Write::write_all(&mut s, &u32::MAX.to_be_bytes()).unwrap();
    assert!(raw_header(&mut s).is_none(), "a hostile frame length must close the connection");
    // A good request, then a bad one (another chunk size), on one connection.
    let etag = rt.block_on(async {
        use object_store::ObjectStoreExt;
        let store = object_store::local::LocalFileSystem::new_with_prefix(src.path()).unwrap();
        store.head(&"r.bin".into()).await.unwrap().e_tag.unwrap_or_default()
    });
    let object = proto::ObjectRef { key: "r.bin".into(), etag, version: String::new(), size: data.len() as u64 };
    let req = proto::ReadChunkRequest { object: Some(object), index: 1, chunk_size: 4 << 20, allow_fill: false, protocol: 1 };
    let mut s = connect();
    raw_frame(&mut s, &req.encode_to_vec());
    let h = raw_header(&mut s).expect("header");
    assert_eq!((h.code, h.chunk_len), (0, 4 << 20), "{h:?}");
    let mut chunk = vec![0u8; 4 << 20];
    s.read_exact(&mut chunk).unwrap();
    assert!(chunk[..] == data[4 << 20..8 << 20]);
    assert_eq!(h.crc32c, crc32c::crc32c(&chunk));
    raw_frame(&mut s, &proto::ReadChunkRequest { chunk_size: 1 << 20, ..req }.encode_to_vec());
    assert_eq!(raw_header(&mut s).map(|h| h.code), Some(tonic::Code::InvalidArgument as u32));
    assert_eq!(http_get(a.admin, "/healthz").map(|r| r.0), Some(200));
    assert!(read_all(&a.path("r.bin")) == data);
}
