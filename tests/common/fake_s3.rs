//! A minimal S3 endpoint on 127.0.0.1 for failure injection: ListObjectsV2 of one object, and
//! GETs that fail (500), hang, wait for release, or serve the exact range, switchable while it
//! runs. Like S3, a HEAD with `x-amz-checksum-mode: ENABLED` gets the object's full-object
//! `x-amz-checksum-crc64nvme` (counted in `checksum_heads` when that header was signed).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub const FAIL: u8 = 0;
pub const HANG: u8 = 1;
pub const SERVE: u8 = 2;
/// GETs wait while the mode stays HOLD, then are answered as the new mode says.
pub const HOLD: u8 = 3;
/// GETs are answered `200` with the whole object, whatever their `Range` (some HTTP servers and
/// S3 gateways do this).
pub const IGNORE_RANGE: u8 = 4;

pub struct FakeS3 {
    pub addr: SocketAddr,
    pub mode: Arc<AtomicU8>,
    pub gets: Arc<AtomicU64>,
    /// Body bytes of GET answers the client took (written into its connection).
    pub sent: Arc<AtomicU64>,
    /// HEADs that asked for the checksum with the header bound to a presigned signature.
    pub checksum_heads: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FakeS3 {
    /// Serves `bucket` with the single object `key` holding `data`.
    pub fn start(bucket: &str, key: &str, data: Vec<u8>) -> FakeS3 {
        Self::start_listing(bucket, key, data, &[])
    }

    /// [`FakeS3::start`], listing `odd` keys too (of 1 byte, listed only), two keys per page.
    pub fn start_listing(bucket: &str, key: &str, data: Vec<u8>, odd: &[&str]) -> FakeS3 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mode = Arc::new(AtomicU8::new(SERVE));
        let gets = Arc::new(AtomicU64::new(0));
        let sent = Arc::new(AtomicU64::new(0));
        let checksum_heads = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let crc64 = crc_fast::checksum(crc_fast::CrcAlgorithm::Crc64Nvme, &data);
        let data = Arc::new(data);
        let (bucket, key) = (bucket.to_string(), key.to_string());
        let odd: Arc<Vec<String>> = Arc::new(odd.iter().map(|k| k.to_string()).collect());
        let (m, g, h, s) = (mode.clone(), Counters { gets: gets.clone(), sent: sent.clone() }, checksum_heads.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let obj = Object { data: data.clone(), bucket: bucket.clone(), key: key.clone(), crc64, odd: odd.clone() };
                let (m, g, h, s) = (m.clone(), g.clone(), h.clone(), s.clone());
                std::thread::spawn(move || handle(conn, &m, &g, &h, &s, &obj));
            }
        });
        FakeS3 { addr, mode, gets, sent, checksum_heads, stop }
    }

    pub fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }

    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The agent flags that point an `s3://` source here, then `extra`.
    pub fn agent_args(&self, extra: &[&str]) -> Vec<String> {
        let mut v = Vec::new();
        for o in [
            format!("endpoint={}", self.endpoint()),
            "allow_http=true".into(),
            "access_key_id=test".into(),
            "secret_access_key=test".into(),
            "region=us-east-1".into(),
        ] {
            v.push("--source-option".to_string());
            v.push(o);
        }
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }
}

/// `args` as the `&[&str]` that `Agent::start` takes.
pub fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

impl Drop for FakeS3 {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

#[derive(Clone)]
struct Counters {
    gets: Arc<AtomicU64>,
    sent: Arc<AtomicU64>,
}

/// Write a body in pieces, counting what the client took; false once the client went away.
fn send_body(w: &mut TcpStream, body: &[u8], sent: &AtomicU64) -> bool {
    for piece in body.chunks(256 << 10) {
        if w.write_all(piece).is_err() {
            return false;
        }
        sent.fetch_add(piece.len() as u64, Ordering::SeqCst);
    }
    true
}

struct Object {
    data: Arc<Vec<u8>>,
    bucket: String,
    key: String,
    crc64: u64,
    odd: Arc<Vec<String>>,
}

/// A ListObjectsV2 answer: the object and the odd keys, two per page when there are odd keys,
/// percent-encoded when asked for.
fn listing(obj: &Object, query: &str) -> String {
    let mut keys = vec![(obj.key.clone(), obj.data.len())];
    keys.extend(obj.odd.iter().map(|k| (k.clone(), 1)));
    let per_page = if obj.odd.is_empty() { 1000 } else { 2 };
    let param = |name: &str| query.split('&').find_map(|kv| kv.strip_prefix(name).and_then(|v| v.strip_prefix('='))).map(str::to_string);
    let start: usize = param("continuation-token").and_then(|t| t.parse().ok()).unwrap_or(0);
    let url = param("encoding-type").is_some_and(|e| e == "url");
    let page = &keys[start.min(keys.len())..(start + per_page).min(keys.len())];
    let more = start + per_page < keys.len();
    let mut body = format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Name>{}</Name><KeyCount>{}</KeyCount><MaxKeys>1000</MaxKeys><IsTruncated>{more}</IsTruncated>", obj.bucket, page.len());
    if url {
        body.push_str("<EncodingType>url</EncodingType>");
    }
    if more {
        body.push_str(&format!("<NextContinuationToken>{}</NextContinuationToken>", start + per_page));
    }
    for (k, size) in page {
        let k = if url {
            k.bytes()
                .map(|b| if b.is_ascii_alphanumeric() || b"/-_.".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
                .collect()
        } else {
            k.clone()
        };
        body.push_str(&format!("<Contents><Key>{k}</Key><LastModified>2024-01-01T00:00:00.000Z</LastModified><ETag>&quot;0123456789abcdef&quot;</ETag><Size>{size}</Size><StorageClass>STANDARD</StorageClass></Contents>"));
    }
    body + "</ListBucketResult>"
}

/// The answer to a HEAD of the object: its checksum when asked for, 412 on another etag.
fn head(w: &mut TcpStream, obj: &Object, checksum_mode: bool, if_match: Option<&str>, query: &str, heads: &AtomicU64) {
    use base64::Engine;
    if if_match.is_some_and(|e| e.trim_matches('"') != "0123456789abcdef") {
        let _ = write!(w, "HTTP/1.1 412 Precondition Failed\r\nContent-Length: 0\r\n\r\n");
        return;
    }
    let mut extra = String::new();
    if checksum_mode {
        if query.contains("x-amz-checksum-mode") {
            heads.fetch_add(1, Ordering::SeqCst);
        }
        let b64 = base64::engine::general_purpose::STANDARD.encode(obj.crc64.to_be_bytes());
        extra = format!("x-amz-checksum-crc64nvme: {b64}\r\nx-amz-checksum-type: FULL_OBJECT\r\n");
    }
    let _ = write!(w, "HTTP/1.1 200 OK\r\nETag: \"0123456789abcdef\"\r\nLast-Modified: Mon, 01 Jan 2024 00:00:00 GMT\r\n{extra}Content-Length: {}\r\n\r\n", obj.data.len());
}

fn handle(conn: TcpStream, mode: &AtomicU8, counters: &Counters, heads: &AtomicU64, stop: &AtomicBool, obj: &Object) {
    let (data, bucket, key) = (&obj.data[..], obj.bucket.as_str(), obj.key.as_str());
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let mut range: Option<(u64, u64)> = None;
        let (mut checksum_mode, mut if_match) = (false, None);
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((name, value)) = h.split_once(':') {
                if name.eq_ignore_ascii_case("x-amz-checksum-mode") {
                    checksum_mode = value.trim().eq_ignore_ascii_case("enabled");
                }
                if name.eq_ignore_ascii_case("if-match") {
                    if_match = Some(value.trim().to_string());
                }
                if name.eq_ignore_ascii_case("range") {
                    let v = value.trim().trim_start_matches("bytes=");
                    if let Some((a, b)) = v.split_once('-') {
                        range = Some((a.parse().unwrap_or(0), b.parse().unwrap_or(u64::MAX)));
                    }
                }
            }
        }
        let (path, query) = target.split_once('?').unwrap_or((&target, ""));
        let obj_path = format!("/{bucket}/{key}");
        if method == "GET" && path.trim_end_matches('/') == format!("/{bucket}") && query.contains("list-type=2") {
            let body = listing(obj, query);
            let _ = write!(w, "HTTP/1.1 200 OK\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        } else if method == "HEAD" && path == obj_path {
            head(&mut w, obj, checksum_mode, if_match.as_deref(), &query.to_ascii_lowercase(), heads);
        } else if method == "GET" && path == obj_path {
            counters.gets.fetch_add(1, Ordering::SeqCst);
            while mode.load(Ordering::SeqCst) == HOLD && !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
            match mode.load(Ordering::SeqCst) {
                FAIL => {
                    let body = "<Error><Code>InternalError</Code><Message>injected</Message></Error>";
                    let _ = write!(w, "HTTP/1.1 500 Internal Server Error\r\nContent-Length: {}\r\n\r\n{body}", body.len());
                }
                HANG => {
                    for _ in 0..600 {
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    return;
                }
                IGNORE_RANGE => {
                    let _ = write!(
                        w,
                        "HTTP/1.1 200 OK\r\nETag: \"0123456789abcdef\"\r\nLast-Modified: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-Length: {}\r\n\r\n",
                        data.len()
                    );
                    if !send_body(&mut w, data, &counters.sent) {
                        return;
                    }
                }
                _ => {
                    let len = data.len() as u64;
                    let (a, b) = range.unwrap_or((0, len.saturating_sub(1)));
                    let b = b.min(len.saturating_sub(1));
                    let body = &data[a as usize..=b as usize];
                    let _ = write!(
                        w,
                        "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{len}\r\nETag: \"0123456789abcdef\"\r\nLast-Modified: Mon, 01 Jan 2024 00:00:00 GMT\r\nContent-Length: {}\r\n\r\n",
                        body.len()
                    );
                    if !send_body(&mut w, body, &counters.sent) {
                        return;
                    }
                }
            }
        } else {
            let _ = write!(w, "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
        }
        let _ = w.flush();
    }
}
