//! A small HTTP/1.1 server on 127.0.0.1 for fake metadata services and webhook receivers: every
//! request is recorded; a handler answers it, or answers `None` ("not yet", asked again every
//! 20 ms, for long polls) until it has something to say.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    /// Path and query.
    pub target: String,
    /// Lower-case names.
    pub headers: HashMap<String, String>,
    pub body: String,
    pub at: Instant,
    pub wall: SystemTime,
}

impl Req {
    pub fn path(&self) -> &str {
        self.target.split_once('?').map(|(p, _)| p).unwrap_or(&self.target)
    }
    pub fn query(&self, name: &str) -> Option<String> {
        let q = self.target.split_once('?')?.1;
        q.split('&').find_map(|kv| kv.split_once('=').filter(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(&name.to_ascii_lowercase()).map(String::as_str)
    }
}

#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
    /// Wait this long before answering (a metadata service that times out).
    pub delay: Duration,
}

impl Resp {
    pub fn new(status: u16, body: impl Into<String>) -> Resp {
        Resp { status, headers: Vec::new(), body: body.into(), delay: Duration::ZERO }
    }
    pub fn header(mut self, k: &str, v: &str) -> Resp {
        self.headers.push((k.into(), v.into()));
        self
    }
    pub fn delayed(mut self, d: Duration) -> Resp {
        self.delay = d;
        self
    }
}

pub type Handler = Arc<dyn Fn(&Req) -> Option<Resp> + Send + Sync>;

pub struct FakeHttp {
    pub addr: SocketAddr,
    pub log: Arc<Mutex<Vec<Req>>>,
    stop: Arc<AtomicBool>,
}

impl FakeHttp {
    pub fn start(handler: impl Fn(&Req) -> Option<Resp> + Send + Sync + 'static) -> FakeHttp {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let handler: Handler = Arc::new(handler);
        let (l, s) = (log.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let (l, s, h) = (l.clone(), s.clone(), handler.clone());
                std::thread::spawn(move || serve(conn, &l, &s, &h));
            }
        });
        FakeHttp { addr, log, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<Req> {
        self.log.lock().unwrap().clone()
    }

    /// Requests whose path is `path`.
    pub fn count(&self, path: &str) -> usize {
        self.requests().iter().filter(|r| r.path() == path).count()
    }
}

impl Drop for FakeHttp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn serve(conn: TcpStream, log: &Mutex<Vec<Req>>, stop: &AtomicBool, handler: &Handler) {
    let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut w = conn;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
        let mut headers = HashMap::new();
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
            }
        }
        let len: usize = headers.get("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let req =
            Req { method, target, headers, body: String::from_utf8_lossy(&body).into_owned(), at: Instant::now(), wall: SystemTime::now() };
        log.lock().unwrap().push(req.clone());
        let end = Instant::now() + Duration::from_secs(90);
        let resp = loop {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            if let Some(r) = handler(&req) {
                break r;
            }
            if Instant::now() > end {
                break Resp::new(504, "");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if !resp.delay.is_zero() {
            std::thread::sleep(resp.delay);
        }
        let mut head = format!("HTTP/1.1 {} X\r\nContent-Length: {}\r\n", resp.status, resp.body.len());
        for (k, v) in &resp.headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        if w.write_all(head.as_bytes()).and_then(|_| w.write_all(resp.body.as_bytes())).and_then(|_| w.flush()).is_err() {
            return;
        }
    }
}
