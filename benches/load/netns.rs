//! Emulated links for the load bench: one network namespace per node, each joined by a veth pair
//! to a bridge in a namespace of its own, with a tbf rate limit on each direction of each link.
//! Only the private 10.77.0.0/24 addresses of these namespaces are used; nothing is routed off the
//! machine and the host's own namespace is not touched. Everything is removed on drop.
//!
//! Delay: this kernel has no netem, so the origin's round trip is emulated by a relay in the
//! origin's namespace that holds every request byte for the RTT before passing it on (responses
//! flow straight, through the link's rate limit). Peer links keep the veth's own round trip.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The namespaces of one bench run.
pub struct Net {
    prefix: String,
    bridge: String,
    nodes: Vec<String>,
}

/// One emulated machine: its namespace, address, and the two ends of its link.
pub struct Node {
    pub ns: String,
    pub ip: Ipv4Addr,
    bridge_dev: String,
}

fn run(args: &[&str]) -> Result<(), String> {
    let out = Command::new(args[0]).args(&args[1..]).output().map_err(|e| format!("{}: {e}", args[0]))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("`{}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

impl Net {
    /// The bridge namespace; an error (to print and skip on) without root, `ip` or `tc`.
    pub fn create() -> Result<Net, String> {
        let prefix = format!("cfsbench{}", std::process::id());
        let bridge = format!("{prefix}-br");
        run(&["ip", "netns", "add", &bridge])?;
        let net = Net { prefix, bridge, nodes: vec![] };
        run(&["ip", "-n", &net.bridge, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &net.bridge, "link", "set", "br0", "up"])?;
        run(&["tc", "-V"])?;
        Ok(net)
    }

    /// A new node `name` at 10.77.0.`host`, linked to the bridge, not yet rate-limited.
    pub fn node(&mut self, name: &str, host: u8) -> Result<Node, String> {
        let ns = format!("{}-{name}", self.prefix);
        run(&["ip", "netns", "add", &ns])?;
        self.nodes.push(ns.clone());
        let bridge_dev = format!("p{host}");
        run(&["ip", "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &bridge_dev, "netns", &self.bridge])?;
        run(&["ip", "-n", &self.bridge, "link", "set", &bridge_dev, "master", "br0", "up"])?;
        let ip = Ipv4Addr::new(10, 77, 0, host);
        run(&["ip", "-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", "eth0"])?;
        run(&["ip", "-n", &ns, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", &ns, "link", "set", "lo", "up"])?;
        Ok(Node { ns, ip, bridge_dev })
    }

    /// Limit what `node` sends (`up`) and receives (`down`), bits per second.
    pub fn shape(&self, node: &Node, up_bps: f64, down_bps: f64) -> Result<(), String> {
        tbf(&node.ns, "eth0", up_bps)?;
        tbf(&self.bridge, &node.bridge_dev, down_bps)
    }
}

/// A token bucket on `dev`'s egress: `bps` bits/s, a burst of 1 ms (at least 256 KiB, so a
/// segmentation-offloaded packet passes whole), queueing up to 50 ms.
fn tbf(ns: &str, dev: &str, bps: f64) -> Result<(), String> {
    let rate = format!("{}bit", bps.round() as u64);
    let burst = format!("{}b", ((bps / 8.0 / 1000.0) as u64).max(256 << 10));
    run(&["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", "tbf", "rate", &rate, "burst", &burst, "latency", "50ms"])
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.nodes.iter().chain(std::iter::once(&self.bridge)) {
            let _ = run(&["ip", "netns", "del", ns]);
        }
    }
}

/// Move the calling thread into namespace `ns` (sockets it makes, processes it spawns, threads
/// it starts all live there).
fn enter(ns: &str) -> Result<(), String> {
    let f = std::fs::File::open(format!("/run/netns/{ns}")).map_err(|e| format!("namespace {ns}: {e}"))?;
    // SAFETY: a valid namespace fd; only this thread's network namespace changes.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {ns}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Run `f` on a thread inside namespace `ns`.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns).unwrap_or_else(|e| panic!("{e}"));
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// A relay in `ns` listening on `listen` that passes each connection to `upstream`, holding every
/// byte sent toward `upstream` for `rtt` (the round trip a request waits for on a far link).
pub fn delay_relay(ns: &str, listen: SocketAddr, upstream: SocketAddr, rtt: Duration) -> Result<(), String> {
    let l = in_ns(ns, || TcpListener::bind(listen)).map_err(|e| format!("relay on {listen}: {e}"))?;
    let ns = ns.to_string();
    std::thread::spawn(move || {
        if enter(&ns).is_err() {
            return;
        }
        for c in l.incoming() {
            let Ok(client) = c else { continue };
            let Ok(up) = TcpStream::connect(upstream) else { continue };
            let _ = (client.set_nodelay(true), up.set_nodelay(true));
            relay_one(client, up, rtt);
        }
    });
    Ok(())
}

fn relay_one(client: TcpStream, up: TcpStream, rtt: Duration) {
    let (Ok(mut c_r), Ok(mut u_w), Ok(mut u_r), mut c_w) = (client.try_clone(), up.try_clone(), up.try_clone(), client) else { return };
    let (tx, rx) = mpsc::channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(n @ 1..) = c_r.read(&mut buf) {
            if tx.send((Instant::now() + rtt, buf[..n].to_vec())).is_err() {
                break;
            }
        }
    });
    std::thread::spawn(move || {
        for (due, bytes) in rx {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            if u_w.write_all(&bytes).is_err() {
                break;
            }
        }
        let _ = u_w.shutdown(std::net::Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut u_r, &mut c_w);
        let _ = c_w.shutdown(std::net::Shutdown::Both);
    });
}

/// One TCP stream of `bytes` from `from` to `to` (the link's own capacity): seconds.
pub fn tcp_stream(from: &Node, to: &Node, bytes: u64) -> f64 {
    let l = in_ns(&to.ns, || TcpListener::bind((to.ip, 0))).expect("bind the reference listener");
    let addr = l.local_addr().expect("listener address");
    let recv = std::thread::spawn(move || {
        let (mut s, _) = l.accept().expect("accept the reference stream");
        let mut buf = vec![0u8; 4 << 20];
        let t = Instant::now();
        let mut n = 0u64;
        while n < bytes {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        assert_eq!(n, bytes, "the reference stream ended early");
        t.elapsed().as_secs_f64()
    });
    in_ns(&from.ns, || {
        let mut s = TcpStream::connect(addr).expect("connect the reference stream");
        let buf = vec![0x5au8; 4 << 20];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(buf.len() as u64) as usize;
            s.write_all(&buf[..n]).expect("send the reference stream");
            left -= n as u64;
        }
    });
    recv.join().expect("reference receiver")
}

/// Median time of a TCP connect from `from` to a listener at `to` (the link's round trip).
pub fn connect_rtt(from: &Node, to: &Node) -> Duration {
    let l = in_ns(&to.ns, || TcpListener::bind((to.ip, 0))).expect("bind");
    let addr = l.local_addr().expect("listener address");
    let mut v: Vec<Duration> = in_ns(&from.ns, || {
        (0..21)
            .map(|_| {
                let t = Instant::now();
                let s = TcpStream::connect(addr).expect("connect");
                let took = t.elapsed();
                drop(s);
                took
            })
            .collect()
    });
    v.sort();
    v[v.len() / 2]
}
