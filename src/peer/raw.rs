//! The raw data path: `ReadChunk` over a plain TCP connection on the peer port, for bulk
//! transfers between agents that do not use TLS. gRPC stays for everything else.
//!
//! # Contract
//! - Wire format: see `RawChunkHeader` in `proto/cachefs.proto`. A connection starts with the
//!   magic and the peer token; a wrong token is answered with UNAUTHENTICATED and closed.
//! - The server answers exactly what the gRPC `ReadChunk` would (same checks, same crc32c);
//!   the chunk bytes go from the tmpfs mapping to the socket without a copy in user space.
//! - The client receives a chunk straight into its sink (the memory tier) through one reused
//!   buffer per connection; idle connections are kept for reuse, a failed one is dropped.
//! - Every read and write is bounded by a timeout; connections end when the agent stops.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::debug;

use super::proto::{RawChunkHeader, ReadChunkRequest};
use super::server::PeerServer;

/// First bytes of a raw data connection.
pub const MAGIC: &[u8; 4] = b"CFS1";
/// Largest request or header accepted (they are small protobufs).
const MAX_FRAME: u32 = 64 << 10;
/// An idle server connection is closed after this long.
const IDLE: Duration = Duration::from_secs(60);
/// Longest wait for the first bytes of a connection (to tell raw from gRPC).
const SNIFF: Duration = Duration::from_secs(10);
/// Bytes received per read into a connection's buffer.
const RECV_BUFFER: usize = 1 << 20;
/// Idle client connections kept per peer.
const POOL: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum RawError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0:?}: {1}")]
    Status(tonic::Code, String),
    #[error("bad frame: {0}")]
    Frame(String),
}

async fn read_frame<M: Message + Default>(s: &mut TcpStream) -> Result<M, RawError> {
    let len = s.read_u32().await?;
    if len > MAX_FRAME {
        return Err(RawError::Frame(format!("frame of {len} bytes")));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await?;
    M::decode(buf.as_slice()).map_err(|e| RawError::Frame(e.to_string()))
}

async fn write_frame(s: &mut TcpStream, m: &impl Message) -> std::io::Result<()> {
    let body = m.encode_to_vec();
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    s.write_all(&out).await
}

/// Accept on `listener`: raw data connections are served here, every other connection is
/// handed to gRPC through the returned stream. Tasks are tracked and end with `stop`.
pub fn split(
    listener: tokio::net::TcpListener,
    server: Arc<PeerServer>,
    token: Option<Arc<Vec<u8>>>,
    tasks: TaskTracker,
    stop: CancellationToken,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TcpStream>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let accept_tasks = tasks.clone();
    tasks.spawn(async move {
        loop {
            let conn = tokio::select! {
                _ = stop.cancelled() => return,
                c = listener.accept() => c,
            };
            let (conn, tx, server, token, stop) = (conn.map(|(c, _)| c), tx.clone(), server.clone(), token.clone(), stop.clone());
            accept_tasks.spawn(async move {
                let conn = match conn {
                    Ok(c) => c,
                    Err(e) => return drop(tx.send(Err(e)).await),
                };
                let _ = conn.set_nodelay(true);
                let mut first = [0u8; 4];
                let raw = matches!(tokio::time::timeout(SNIFF, conn.peek(&mut first)).await, Ok(Ok(4))) && &first == MAGIC;
                if !raw {
                    let _ = tx.send(Ok(conn)).await;
                    return;
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    r = serve_conn(conn, &server, token.as_deref()) => if let Err(e) = r { debug!(error = %e, "raw data connection ended") },
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// One raw connection: the preamble, then requests until the client closes or idles out.
async fn serve_conn(mut s: TcpStream, server: &PeerServer, token: Option<&Vec<u8>>) -> Result<(), RawError> {
    let mut magic = [0u8; 4];
    s.read_exact(&mut magic).await?;
    let len = s.read_u32().await?;
    if len > MAX_FRAME {
        return Err(RawError::Frame("token too long".into()));
    }
    let mut got = vec![0u8; len as usize];
    s.read_exact(&mut got).await?;
    if let Some(want) = token {
        if !(got.len() == want.len() && bool::from(got.as_slice().ct_eq(want.as_slice()))) {
            let h = RawChunkHeader {
                code: tonic::Code::Unauthenticated as u32,
                message: "missing or wrong peer token".into(),
                ..Default::default()
            };
            write_frame(&mut s, &h).await?;
            return Ok(());
        }
    }
    loop {
        let req: ReadChunkRequest = match tokio::time::timeout(IDLE, read_frame(&mut s)).await {
            Ok(Ok(r)) => r,
            Ok(Err(RawError::Io(e))) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        let answer = tokio::time::timeout(IDLE, async {
            match server.chunk(req).await {
                Ok((bytes, crc, _guard)) => {
                    let h = RawChunkHeader { code: 0, message: String::new(), chunk_len: bytes.len() as u64, crc32c: crc };
                    write_frame(&mut s, &h).await?;
                    s.write_all(&bytes).await?;
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

/// A client connection with its receive buffer.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Raw connections to one peer.
pub struct Pool {
    addr: String,
    token: Vec<u8>,
    idle: Mutex<Vec<Conn>>,
}

impl Pool {
    pub fn new(addr: &str, token: Option<&str>) -> Self {
        Pool { addr: addr.to_string(), token: token.unwrap_or("").as_bytes().to_vec(), idle: Mutex::new(Vec::new()) }
    }

    /// A pooled connection (`true`) or a new one.
    async fn take(&self, connect_timeout: Duration) -> Result<(Conn, bool), RawError> {
        if let Some(c) = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop() {
            return Ok((c, true));
        }
        let stream = tokio::time::timeout(connect_timeout, TcpStream::connect(&self.addr))
            .await
            .map_err(|_| RawError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))??;
        stream.set_nodelay(true)?;
        let mut c = Conn { stream, buf: Vec::new() };
        let mut pre = MAGIC.to_vec();
        pre.extend_from_slice(&(self.token.len() as u32).to_be_bytes());
        pre.extend_from_slice(&self.token);
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
                Err(RawError::Io(_)) if reused => self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear(),
                Err(e) => return Err(e),
            }
        }
    }

    fn put_back(&self, c: Conn) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < POOL {
            idle.push(c);
        }
    }

    /// Ask for one chunk of `want` bytes; `on_data` gets them in order. Returns the crc32c the
    /// peer sent once all were delivered; the caller bounds the whole call with a timeout (a
    /// connection abandoned mid-answer is dropped, never reused).
    pub async fn read_chunk(
        &self,
        req: &ReadChunkRequest,
        want: u64,
        connect_timeout: Duration,
        mut on_data: impl FnMut(&[u8]) -> Result<(), RawError>,
    ) -> Result<u32, RawError> {
        let (mut c, h) = self.ask(req, connect_timeout).await?;
        if h.code != 0 {
            self.put_back(c);
            return Err(RawError::Status(tonic::Code::from_i32(h.code as i32), h.message));
        }
        if h.chunk_len != want {
            return Err(RawError::Frame(format!("chunk length {} != {want}", h.chunk_len)));
        }
        if c.buf.len() < RECV_BUFFER {
            c.buf = vec![0u8; RECV_BUFFER];
        }
        let mut left = h.chunk_len;
        while left > 0 {
            let n = (left as usize).min(c.buf.len());
            c.stream.read_exact(&mut c.buf[..n]).await?;
            on_data(&c.buf[..n])?;
            left -= n as u64;
        }
        self.put_back(c);
        Ok(h.crc32c)
    }
}
