//! The raw data path: `ReadChunk` over a plain TCP connection on the peer port, for bulk
//! transfers between agents that do not use TLS. gRPC stays for everything else.
//!
//! # Contract
//! - Wire format: see `RawChunkHeader` in `proto/cachefs.proto`. Where peers use tokens a
//!   connection starts with the mutual handshake of [`super::auth`] (a connection without it
//!   gets only a close); without tokens, with the magic and an empty token.
//! - The server answers exactly what the gRPC `ReadChunk` would (same checks, same crc32c);
//!   the chunk bytes go from the tmpfs mapping to the socket without a copy in user space.
//! - The server is bounded whatever callers do: the first bytes and the whole preamble must
//!   arrive within [`PREAMBLE`]; nothing is allocated for a token before its length is checked;
//!   at most [`MAX_CONNS`] connections are told apart or served at once, [`MAX_CONNS_PER_SOURCE`]
//!   from one address (more are closed at once); an idle connection is closed after [`IDLE`].
//! - The client moves a chunk from the socket into its destination through a pipe per
//!   connection (`splice`): into a cache file with no copy in user space, or drained into a
//!   buffer; through one reused buffer per connection where no pipe can be made. Idle
//!   connections are kept for reuse for at most [`CLIENT_IDLE`]
//!   (shorter than the server's), [`POOL`] per peer and [`MAX_IDLE`] in all; one the server has
//!   closed is never reused, a failed one is dropped.
//! - Every read and write is bounded by a timeout; connections end when the agent stops.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::auth::{Keyring, Purpose};
use super::proto::{RawChunkHeader, ReadChunkRequest};
use super::server::PeerServer;

/// First bytes of a raw data connection.
pub const MAGIC: &[u8; 4] = b"CFS1";
/// Largest request or header accepted (they are small protobufs).
const MAX_FRAME: u32 = 64 << 10;
/// Longest peer token accepted in a preamble.
const MAX_TOKEN: u32 = 4 << 10;
/// An idle server connection is closed after this long.
pub const IDLE: Duration = Duration::from_secs(60);
/// Longest wait from accepting a connection to the end of its preamble (the first bytes, which
/// tell raw from gRPC, then the handshake or the magic and the token).
pub const PREAMBLE: Duration = Duration::from_secs(5);
/// Connections being told apart or served on the raw path at once, in all and from one address.
pub const MAX_CONNS: usize = 4096;
pub const MAX_CONNS_PER_SOURCE: usize = 64;
/// Bytes received per read into a connection's buffer.
const RECV_BUFFER: usize = 1 << 20;
/// Idle client connections kept per peer, and in all (each holds a receive buffer).
pub const POOL: usize = 16;
pub const MAX_IDLE: usize = 64;
/// An idle client connection is not reused after this long (the server closes its side later).
pub const CLIENT_IDLE: Duration = Duration::from_secs(20);

/// Idle client connections of every pool.
static IDLE_CONNS: AtomicUsize = AtomicUsize::new(0);

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0:?}: {1}")]
    Status(tonic::Code, String),
    #[error("bad frame: {0}")]
    Frame(String),
    #[error("peer authentication: {0}")]
    Auth(String),
}

async fn read_frame<M: Message + Default>(s: &mut TcpStream) -> Result<M, RawError> {
    let len = s.read_u32().await?;
    if len > MAX_FRAME {
        return Err(RawError::Frame(format!("frame of {len} bytes")));
    }
    // Grows only as bytes arrive.
    let mut buf = Vec::new();
    (&mut *s).take(len as u64).read_to_end(&mut buf).await?;
    if buf.len() != len as usize {
        return Err(RawError::Io(std::io::ErrorKind::UnexpectedEof.into()));
    }
    M::decode(buf.as_slice()).map_err(|e| RawError::Frame(e.to_string()))
}

async fn write_frame(s: &mut TcpStream, m: &impl Message) -> std::io::Result<()> {
    let body = m.encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    s.write_all(&out).await
}

/// Connections admitted on the peer port and not yet handed to gRPC, in all and per source.
#[derive(Default)]
struct Admission {
    counts: Mutex<(usize, HashMap<IpAddr, usize>)>,
}

/// A connection's place in [`Admission`], given back when dropped.
struct Admitted {
    adm: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<Admitted> {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        let from = c.1.get(&ip).copied().unwrap_or(0);
        if c.0 >= MAX_CONNS || from >= MAX_CONNS_PER_SOURCE {
            return None;
        }
        c.0 += 1;
        c.1.insert(ip, from + 1);
        Some(Admitted { adm: self.clone(), ip })
    }
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut c = self.adm.counts.lock().unwrap_or_else(|p| p.into_inner());
        c.0 = c.0.saturating_sub(1);
        if let Some(n) = c.1.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                c.1.remove(&self.ip);
            }
        }
    }
}

/// Accept on `listener`: raw data connections are served here, every other connection is
/// handed to gRPC through the returned stream. With a keyring every connection must first pass
/// its handshake ([`super::auth`]); without one, raw connections start with the preamble.
/// Tasks are tracked and end with `stop`.
pub fn split(
    listener: tokio::net::TcpListener,
    server: Arc<PeerServer>,
    keyring: Option<Arc<Keyring>>,
    tasks: TaskTracker,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TcpStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let accept_tasks = tasks.clone();
    let admission = Arc::new(Admission::default());
    tasks.spawn(async move {
        let mut refused = 0u64;
        loop {
            let (conn, from) = tokio::select! {
                _ = stop.cancelled() => return,
                c = listener.accept() => match c {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors, say: accepting again at once would spin.
                        debug!(error = %e, "accepting a peer connection failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                },
            };
            let Some(slot) = admission.admit(from.ip()) else {
                refused += 1;
                if refused.is_power_of_two() {
                    warn!(from = %from, refused, "too many connections on the peer port (in all or from this address): closing new ones");
                }
                continue;
            };
            let route = Route { tx: tx.clone(), server: server.clone(), keyring: keyring.clone(), from, slot };
            let stop = stop.clone();
            accept_tasks.spawn(async move {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    r = route.run(conn) => if let Err(e) = r { debug!(error = %e, "raw data connection ended") },
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Where one accepted connection goes: through its handshake or preamble, to gRPC or the raw path.
struct Route {
    tx: tokio::sync::mpsc::Sender<std::io::Result<TcpStream>>,
    server: Arc<PeerServer>,
    keyring: Option<Arc<Keyring>>,
    from: std::net::SocketAddr,
    /// Held while the connection is told apart or served raw.
    slot: Admitted,
}

impl Route {
    async fn run(self, mut conn: TcpStream) -> Result<(), RawError> {
        let _ = conn.set_nodelay(true);
        let by = tokio::time::Instant::now() + PREAMBLE;
        let mut first = [0u8; 4];
        let peeked = matches!(tokio::time::timeout_at(by, conn.peek(&mut first)).await, Ok(Ok(4)));
        let purpose = match &self.keyring {
            Some(k) if !(peeked && &first == super::auth::MAGIC) => {
                // A plain client (gRPC or raw) where peers must prove themselves: only a close.
                // Logged once per source IP (a client's port changes with every connection).
                k.failed(&self.from.ip().to_string(), &super::auth::AuthError::NoHandshake);
                return Ok(());
            }
            Some(k) => match k.accept(&mut conn, &self.from.ip().to_string(), by).await {
                Ok((purpose, _client)) => purpose,
                Err(_) => return Ok(()),
            },
            None if peeked && &first == MAGIC => {
                preamble(&mut conn, by).await?;
                Purpose::Raw
            }
            None => Purpose::Grpc,
        };
        match purpose {
            Purpose::Grpc => {
                drop(self.slot);
                let _ = self.tx.send(Ok(conn)).await;
                Ok(())
            }
            Purpose::Raw if self.server.raw_data => serve_requests(conn, &self.server).await,
            Purpose::Raw => Ok(()),
        }
    }
}

/// Read the magic and the (empty, unchecked: peers without tokens) token, all before `by`.
async fn preamble(s: &mut TcpStream, by: tokio::time::Instant) -> Result<(), RawError> {
    let read = async {
        let mut magic = [0u8; 4];
        s.read_exact(&mut magic).await?;
        let len = s.read_u32().await?;
        if len > MAX_TOKEN {
            return Err(RawError::Frame("token too long".into()));
        }
        // Grows only as bytes arrive.
        let mut got = Vec::new();
        (&mut *s).take(len as u64).read_to_end(&mut got).await?;
        if got.len() != len as usize {
            return Err(RawError::Frame("preamble cut short".into()));
        }
        Ok(())
    };
    tokio::time::timeout_at(by, read).await.map_err(|_| RawError::Frame("preamble timed out".into()))?
}

/// Requests on one raw connection until the client closes or idles out.
async fn serve_requests(mut s: TcpStream, server: &PeerServer) -> Result<(), RawError> {
    loop {
        let req: ReadChunkRequest = match tokio::time::timeout(IDLE, read_frame(&mut s)).await {
            Ok(Ok(r)) => r,
            Ok(Err(RawError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let answer = tokio::time::timeout(IDLE, async {
            match server.chunk(req).await {
                Ok((bytes, crc, _guard, in_file)) => {
                    let h = RawChunkHeader { code: 0, message: String::new(), chunk_len: bytes.len() as u64, crc32c: crc };
                    write_frame(&mut s, &h).await?;
                    match in_file {
                        // The view `bytes` keeps these bytes in the file while they are sent.
                        Some(f) => send_file(&s, &f, f.offset, bytes.len()).await?,
                        None => s.write_all(&bytes).await?,
                    }
                    server.metrics.peer_sent_bytes.inc_by(bytes.len() as u64);
                    Ok::<_, std::io::Error>(())
                }
                Err(st) => {
                    write_frame(&mut s, &RawChunkHeader { code: st.code() as u32, message: st.message().to_string(), ..Default::default() })
                        .await
                }
            }
        });
        match answer.await {
            Ok(r) => r?,
            Err(_) => return Err(RawError::Frame("answer timed out".into())),
        }
    }
}

/// `len` bytes of `file` from `offset` onto the socket with `sendfile(2)`: the file's pages
/// go to the socket without a copy through user space.
async fn send_file(s: &TcpStream, file: &impl std::os::fd::AsRawFd, offset: u64, len: usize) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut off = offset as libc::off_t;
    let mut left = len;
    while left > 0 {
        let n = s
            .async_io(tokio::io::Interest::WRITABLE, || {
                // SAFETY: sendfile between two open fds, with a valid offset pointer.
                let rc = unsafe { libc::sendfile(s.as_raw_fd(), file.as_raw_fd(), &mut off, left) };
                if rc < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(rc as usize)
                }
            })
            .await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        left -= n;
    }
    Ok(())
}

/// A client connection with its receive buffer and pipe (each made on first use).
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    pipe: Option<crate::splice::Pipe>,
}

/// Where the bytes of a chunk go on the client.
pub trait RawDest {
    /// Take the next bytes, in order.
    fn take(&mut self, data: &[u8]) -> Result<(), RawError>;
    /// Take the next `n` bytes, waiting in `pipe`: all of them, or an error.
    fn take_from_pipe(&mut self, pipe: &crate::splice::Pipe, n: usize) -> Result<(), RawError>;
}

impl Conn {
    /// Whether the server may still answer on it: nothing arrived unasked (a close, a reset).
    fn open(&self) -> bool {
        let mut probe = [0u8; 1];
        matches!(self.stream.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

/// A pooled connection, counted in [`IDLE_CONNS`] until taken or dropped.
struct Idle {
    conn: Conn,
    since: Instant,
    _counted: Counted,
}

/// One count in [`IDLE_CONNS`], given back when dropped.
struct Counted;

impl Drop for Counted {
    fn drop(&mut self) {
        IDLE_CONNS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Raw connections to one peer.
pub struct Pool {
    addr: String,
    /// Peers prove themselves on every connection (None: the plain preamble).
    keyring: Option<Arc<Keyring>>,
    idle: Mutex<Vec<Idle>>,
}

impl Pool {
    pub fn new(addr: &str, keyring: Option<Arc<Keyring>>) -> Self {
        Pool { addr: addr.to_string(), keyring, idle: Mutex::new(Vec::new()) }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Close idle connections older than [`CLIENT_IDLE`] (called periodically).
    pub fn trim(&self) {
        self.idle().retain(|i| i.since.elapsed() < CLIENT_IDLE);
    }

    /// Idle connections kept now.
    pub fn idle_count(&self) -> usize {
        self.idle().len()
    }

    /// The newest pooled connection still fresh and open.
    fn pooled(&self) -> Option<Conn> {
        let mut idle = self.idle();
        while let Some(i) = idle.pop() {
            if i.since.elapsed() < CLIENT_IDLE && i.conn.open() {
                return Some(i.conn);
            }
        }
        None
    }

    /// A pooled connection (`true`) or a new one.
    async fn take(&self, connect_timeout: Duration) -> Result<(Conn, bool), RawError> {
        if let Some(c) = self.pooled() {
            return Ok((c, true));
        }
        if let Some(k) = &self.keyring {
            let (stream, _node) = k.dial(&self.addr, Purpose::Raw, connect_timeout).await.map_err(|e| RawError::Auth(e.to_string()))?;
            return Ok((Conn { stream, buf: Vec::new(), pipe: None }, false));
        }
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| RawError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))??;
        stream.set_nodelay(true)?;
        let mut c = Conn { stream, buf: Vec::new(), pipe: None };
        let mut pre = MAGIC.to_vec();
        pre.extend_from_slice(&0u32.to_be_bytes());
        c.stream.write_all(&pre).await?;
        Ok((c, false))
    }

    /// Send `req` and read the answer's header. A pooled connection that fails here was closed
    /// by the peer while idle (a restart, an idle timeout): the pool is emptied and the request
    /// sent once more on a new connection.
    async fn ask(&self, req: &ReadChunkRequest, connect_timeout: Duration) -> Result<(Conn, RawChunkHeader), RawError> {
        loop {
            let (mut c, reused) = self.take(connect_timeout).await?;
            let answer = async {
                write_frame(&mut c.stream, req).await?;
                read_frame::<RawChunkHeader>(&mut c.stream).await
            };
            match answer.await {
                Ok(h) => return Ok((c, h)),
                Err(RawError::Io(_)) if reused => self.idle().clear(),
                Err(e) => return Err(e),
            }
        }
    }

    /// Keep `c` for reuse, if this pool and all pools together have room.
    fn put_back(&self, c: Conn) {
        let mut idle = self.idle();
        if idle.len() >= POOL {
            return;
        }
        let counted = Counted;
        if IDLE_CONNS.fetch_add(1, Ordering::Relaxed) >= MAX_IDLE {
            return;
        }
        idle.push(Idle { conn: c, since: Instant::now(), _counted: counted });
    }

    /// Ask for one chunk of `want` bytes; `dest` gets them in order. Returns the crc32c the
    /// peer sent once all were delivered; the caller bounds the whole call with a timeout (a
    /// connection abandoned mid-answer is dropped, never reused).
    pub async fn read_chunk(
        &self,
        req: &ReadChunkRequest,
        want: u64,
        connect_timeout: Duration,
        dest: &mut (dyn RawDest + Send),
    ) -> Result<u32, RawError> {
        let (mut c, h) = self.ask(req, connect_timeout).await?;
        if h.code != 0 {
            self.put_back(c);
            return Err(RawError::Status(tonic::Code::from_i32(h.code as i32), h.message));
        }
        if h.chunk_len != want {
            return Err(RawError::Frame(format!("chunk length {} != {want}", h.chunk_len)));
        }
        if c.pipe.is_none() {
            c.pipe = crate::splice::Pipe::new().map_err(|e| debug!(error = %e, "no pipe: receiving through a buffer")).ok();
        }
        match &c.pipe {
            Some(pipe) => splice_body(&c.stream, pipe, h.chunk_len, dest).await?,
            _ => buffer_body(&mut c, h.chunk_len, dest).await?,
        }
        self.put_back(c);
        Ok(h.crc32c)
    }
}

/// `len` bytes from the socket into `dest` through `pipe`.
async fn splice_body(stream: &TcpStream, pipe: &crate::splice::Pipe, len: u64, dest: &mut (dyn RawDest + Send)) -> Result<(), RawError> {
    use std::os::fd::AsRawFd;
    let fd = stream.as_raw_fd();
    let mut left = len;
    while left > 0 {
        let want = usize::try_from(left).unwrap_or(usize::MAX);
        let n = stream.async_io(tokio::io::Interest::READABLE, || pipe.fill_from(fd, want)).await?;
        if n == 0 {
            return Err(RawError::Io(std::io::ErrorKind::UnexpectedEof.into()));
        }
        dest.take_from_pipe(pipe, n)?;
        left -= n as u64;
    }
    Ok(())
}

/// `len` bytes from the socket into `dest` through the connection's buffer.
async fn buffer_body(c: &mut Conn, len: u64, dest: &mut (dyn RawDest + Send)) -> Result<(), RawError> {
    if c.buf.len() < RECV_BUFFER {
        c.buf = vec![0u8; RECV_BUFFER];
    }
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(c.buf.len());
        c.stream.read_exact(&mut c.buf[..n]).await?;
        dest.take(&c.buf[..n])?;
        left -= n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pooled connection that the server closed, or that idled past [`CLIENT_IDLE`], is
    /// never handed out again.
    #[tokio::test]
    async fn the_pool_drops_closed_and_stale_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let pool = Pool::new(&listener.local_addr().unwrap().to_string(), None);
        let (c, reused) = pool.take(Duration::from_secs(1)).await.unwrap();
        assert!(!reused);
        let (server_side, _) = listener.accept().await.unwrap();
        pool.put_back(c);
        assert_eq!(pool.idle_count(), 1);
        drop(server_side);
        // The close reaches the client side's socket.
        for _ in 0..100 {
            if !pool.idle()[0].conn.open() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(pool.pooled().is_none(), "a connection the server closed was reused");

        let (c, _) = pool.take(Duration::from_secs(1)).await.unwrap();
        let (_kept_open, _) = listener.accept().await.unwrap();
        pool.put_back(c);
        assert!(pool.idle()[0].conn.open());
        if let Some(old) = Instant::now().checked_sub(CLIENT_IDLE) {
            pool.idle()[0].since = old;
        }
        pool.trim();
        assert_eq!(pool.idle_count(), 0, "a stale idle connection was kept");
    }
}
