//! A TCP proxy in front of an origin that fails on command: HTTP 503s, connections closed at
//! once, stalls, or a throttled link. Existing connections are affected too.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Fault {
    None = 0,
    /// Every request is answered `503 Service Unavailable`.
    Http503 = 1,
    /// Connections are closed as soon as they are seen.
    Reset = 2,
    /// Nothing is forwarded either way.
    Stall = 3,
}

pub struct FaultProxy {
    pub port: u16,
    fault: Arc<AtomicU8>,
    /// Bytes per second towards the client; 0 = unlimited.
    rate: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl FaultProxy {
    pub fn start(upstream: u16) -> FaultProxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let (fault, rate, stop) = (Arc::new(AtomicU8::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(false)));
        let (f, r, s) = (fault.clone(), rate.clone(), stop.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(c) = c else { continue };
                let (f, r) = (f.clone(), r.clone());
                std::thread::spawn(move || serve(c, upstream, f, r));
            }
        });
        FaultProxy { port, fault, rate, stop }
    }

    pub fn set(&self, f: Fault) {
        self.fault.store(f as u8, Ordering::SeqCst);
    }

    /// Throttle the link to `bytes_per_sec` (0: no limit).
    pub fn throttle(&self, bytes_per_sec: u64) {
        self.rate.store(bytes_per_sec, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn fault(f: &AtomicU8) -> u8 {
    f.load(Ordering::SeqCst)
}

fn serve(c: TcpStream, upstream: u16, f: Arc<AtomicU8>, rate: Arc<AtomicU64>) {
    match fault(&f) {
        1 => return answer_503(c),
        2 => return,
        _ => {}
    }
    let Ok(up) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
    let (Ok(c_in), Ok(up_out)) = (c.try_clone(), up.try_clone()) else { return };
    let f2 = f.clone();
    std::thread::spawn(move || pump(c_in, up_out, &f2, None));
    pump(up, c, &f, Some(&rate));
}

/// Copy `from` → `to` until either end closes or a fault says stop.
fn pump(mut from: TcpStream, mut to: TcpStream, f: &AtomicU8, rate: Option<&AtomicU64>) {
    let _ = from.set_read_timeout(Some(Duration::from_millis(200)));
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match fault(f) {
            0 => {}
            3 => {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            _ => break,
        }
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => continue,
            Err(_) => break,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some(r) = rate.map(|r| r.load(Ordering::SeqCst)).filter(|r| *r > 0) {
            std::thread::sleep(Duration::from_secs_f64(n as f64 / r as f64));
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

fn answer_503(mut c: TcpStream) {
    let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
    let mut head = Vec::new();
    let mut b = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match c.read(&mut b) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&b[..n]),
        }
    }
    let _ = c.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
}
