//! Mutual authentication of peer connections by a shared fleet token.
//!
//! # Contract
//! - When peers use tokens and not TLS, every TCP connection to the peer port, gRPC or raw,
//!   starts with this handshake, and nothing else is read or served on it before both sides
//!   have proved they hold a token (wire format: `AuthHello` in `proto/cachefs.proto`).
//! - The token never crosses the wire. Each side sends a fresh 32-byte nonce and proves with
//!   HMAC-SHA256 over both nonces, both node ids, the address the client dialed and what the
//!   connection is for; the two sides' proofs carry different labels, so neither can be
//!   reflected back, and a recorded one is worthless on the next connection.
//! - Rotation: a keyring holds one or two tokens. The server proves with each of its tokens;
//!   the client checks them against its own in order and proves with the first one both hold;
//!   the server accepts a client proof under any of its tokens.
//! - A failure is counted in `cachefs_peer_auth_failures_total{reason}` and logged once per
//!   peer and reason; the handshake is bounded by [`HANDSHAKE`] and frames by [`MAX_FRAME`].

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use prost::Message;
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tracing::{debug, warn};

use super::proto::{AuthChallenge, AuthHello, AuthProof, AuthPurpose, AuthResult};
use crate::metrics::Metrics;

/// First bytes of an authenticated connection.
pub const MAGIC: &[u8; 4] = b"CFA1";
/// Longest wait for a whole handshake, either side.
pub const HANDSHAKE: Duration = Duration::from_secs(5);
/// Largest handshake message.
const MAX_FRAME: u32 = 4 << 10;
const NONCE: usize = 32;
/// Most (peer, reason) pairs remembered for logging once.
const MAX_LOGGED: usize = 1024;
const SERVER_LABEL: &[u8] = b"cachefs-auth-v1 server";
const CLIENT_LABEL: &[u8] = b"cachefs-auth-v1 client";

/// Why a handshake failed; [`AuthError::reason`] is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("the connection did not start with the handshake")]
    NoHandshake,
    #[error("malformed handshake: {0}")]
    Malformed(String),
    #[error("the handshake timed out")]
    Timeout,
    #[error("the client's proof matches none of our tokens")]
    ClientProof,
    #[error("the server's proof matches none of our tokens (it does not hold the fleet token)")]
    ServerProof,
    #[error("the server refused our proof: {0}")]
    Refused(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::NoHandshake => "no_handshake",
            AuthError::Malformed(_) => "malformed",
            AuthError::Timeout => "timeout",
            AuthError::ClientProof => "client_proof",
            AuthError::ServerProof => "server_proof",
            AuthError::Refused(_) => "refused",
            AuthError::Io(_) => "io",
        }
    }
}

/// What an authenticated connection carries after the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Grpc,
    Raw,
}

impl Purpose {
    fn wire(self) -> AuthPurpose {
        match self {
            Purpose::Grpc => AuthPurpose::Grpc,
            Purpose::Raw => AuthPurpose::Raw,
        }
    }
}

/// This agent's tokens and node id, and where failures are counted.
pub struct Keyring {
    tokens: Vec<Vec<u8>>,
    node: String,
    metrics: Arc<Metrics>,
    logged: Mutex<HashSet<(String, &'static str)>>,
}

/// The fields both proofs cover.
struct Transcript<'a> {
    client_nonce: &'a [u8],
    server_nonce: &'a [u8],
    client_node: &'a str,
    server_node: &'a str,
    dialed: &'a str,
    purpose: i32,
}

/// HMAC-SHA256 under `token` of `label` and `parts`, each length-prefixed.
fn mac_of(token: &[u8], label: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(token) else { return Vec::new() };
    for field in std::iter::once(label).chain(parts.iter().copied()) {
        mac.update(&(field.len() as u32).to_be_bytes());
        mac.update(field);
    }
    mac.finalize().into_bytes().to_vec()
}

impl Transcript<'_> {
    fn proof(&self, token: &[u8], label: &[u8]) -> Vec<u8> {
        let purpose = self.purpose.to_be_bytes();
        let parts = [
            self.client_nonce,
            self.server_nonce,
            self.client_node.as_bytes(),
            self.server_node.as_bytes(),
            self.dialed.as_bytes(),
            &purpose,
        ];
        mac_of(token, label, &parts)
    }

    /// The index of the first of `tokens` under which `proof` is right (constant time each).
    fn check(&self, tokens: &[Vec<u8>], label: &[u8], proof: &[u8]) -> Option<usize> {
        tokens.iter().position(|t| bool::from(subtle::ConstantTimeEq::ct_eq(self.proof(t, label).as_slice(), proof)))
    }
}

impl Keyring {
    /// `tokens` in order of preference (the current one first); empty tokens are dropped.
    pub fn new(tokens: &[String], node: String, metrics: Arc<Metrics>) -> Option<Arc<Self>> {
        let tokens: Vec<Vec<u8>> = tokens.iter().map(|t| t.trim().as_bytes().to_vec()).filter(|t| !t.is_empty()).collect();
        if tokens.is_empty() {
            return None;
        }
        Some(Arc::new(Keyring { tokens, node, metrics, logged: Mutex::new(HashSet::new()) }))
    }

    /// HMAC-SHA256 under the current token of `parts` (each length-prefixed) with `label`.
    pub fn sign(&self, label: &[u8], parts: &[&[u8]]) -> Vec<u8> {
        self.tokens.first().map(|t| mac_of(t, label, parts)).unwrap_or_default()
    }

    /// Whether `mac` is [`Keyring::sign`]'s under any of our tokens (constant time each).
    pub fn verify(&self, label: &[u8], parts: &[&[u8]], mac: &[u8]) -> bool {
        self.tokens.iter().any(|t| bool::from(subtle::ConstantTimeEq::ct_eq(mac_of(t, label, parts).as_slice(), mac)))
    }

    /// Count a failed handshake with `peer` and log it (a warning the first time per reason).
    pub fn failed(&self, peer: &str, e: &AuthError) {
        let reason = e.reason();
        self.metrics.peer_auth_failure(reason);
        let mut logged = self.logged.lock().unwrap_or_else(|p| p.into_inner());
        if logged.len() < MAX_LOGGED && logged.insert((peer.to_string(), reason)) {
            warn!(peer, reason, error = %e, "peer authentication failed; the connection is not used");
        } else {
            debug!(peer, reason, error = %e, "peer authentication failed");
        }
    }

    /// Client side: connect to `dialed`, prove ourselves and check the server's proof, all
    /// within [`HANDSHAKE`] (and `connect_timeout` for the connection). Returns the stream,
    /// ready for `purpose`, and the node id the server proved.
    pub async fn dial(&self, dialed: &str, purpose: Purpose, connect_timeout: Duration) -> Result<(TcpStream, String), AuthError> {
        let s = tokio::time::timeout(connect_timeout, TcpStream::connect(dialed))
            .await
            .map_err(|_| AuthError::Io(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))??;
        s.set_nodelay(true)?;
        let r = tokio::time::timeout(HANDSHAKE, self.client(s, dialed, purpose)).await.unwrap_or(Err(AuthError::Timeout));
        if let Err(e) = &r {
            self.failed(dialed, e);
        }
        r
    }

    async fn client(&self, mut s: TcpStream, dialed: &str, purpose: Purpose) -> Result<(TcpStream, String), AuthError> {
        let client_nonce = nonce()?;
        let hello = AuthHello {
            client_nonce: client_nonce.to_vec().into(),
            client_node: self.node.clone(),
            dialed: dialed.to_string(),
            purpose: purpose.wire() as i32,
        };
        let mut out = MAGIC.to_vec();
        frame_into(&mut out, &hello);
        s.write_all(&out).await?;
        let ch: AuthChallenge = read(&mut s).await?;
        let t = Transcript {
            client_nonce: &client_nonce,
            server_nonce: &ch.server_nonce,
            client_node: &self.node,
            server_node: &ch.server_node,
            dialed,
            purpose: hello.purpose,
        };
        // The first of our tokens that the server proved it holds.
        let token =
            self.tokens.iter().find(|mine| ch.proofs.iter().any(|p| t.check(std::slice::from_ref(*mine), SERVER_LABEL, p).is_some()));
        let Some(token) = token else { return Err(AuthError::ServerProof) };
        write(&mut s, &AuthProof { proof: t.proof(token, CLIENT_LABEL).into() }).await?;
        let result: AuthResult = read(&mut s).await?;
        if !result.ok {
            return Err(AuthError::Refused(result.message));
        }
        Ok((s, ch.server_node))
    }

    /// Server side, on a connection that starts with [`MAGIC`]: check the client's proof and
    /// prove ourselves, by `by`. Returns what the connection is for and the client's node id.
    pub async fn accept(&self, s: &mut TcpStream, from: &str, by: tokio::time::Instant) -> Result<(Purpose, String), AuthError> {
        let r = tokio::time::timeout_at(by, self.server(s)).await.unwrap_or(Err(AuthError::Timeout));
        if let Err(e) = &r {
            self.failed(from, e);
        }
        r
    }

    async fn server(&self, s: &mut TcpStream) -> Result<(Purpose, String), AuthError> {
        let mut magic = [0u8; 4];
        s.read_exact(&mut magic).await?;
        if &magic != MAGIC {
            return Err(AuthError::NoHandshake);
        }
        let hello: AuthHello = read(s).await?;
        let purpose = match AuthPurpose::try_from(hello.purpose) {
            Ok(AuthPurpose::Grpc) => Purpose::Grpc,
            Ok(AuthPurpose::Raw) => Purpose::Raw,
            _ => return Err(AuthError::Malformed(format!("purpose {}", hello.purpose))),
        };
        if hello.client_nonce.len() != NONCE {
            return Err(AuthError::Malformed("nonce length".into()));
        }
        let server_nonce = nonce()?;
        let t = Transcript {
            client_nonce: &hello.client_nonce,
            server_nonce: &server_nonce,
            client_node: &hello.client_node,
            server_node: &self.node,
            dialed: &hello.dialed,
            purpose: hello.purpose,
        };
        let proofs = self.tokens.iter().map(|k| t.proof(k, SERVER_LABEL).into()).collect();
        write(s, &AuthChallenge { server_nonce: server_nonce.to_vec().into(), server_node: self.node.clone(), proofs }).await?;
        let proof: AuthProof = match read(s).await {
            // A client that found none of its tokens among our proofs hangs up here.
            Err(AuthError::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Err(AuthError::Refused("the client closed after our challenge (it holds none of our tokens)".into()));
            }
            r => r?,
        };
        let ok = t.check(&self.tokens, CLIENT_LABEL, &proof.proof).is_some();
        let message = if ok { String::new() } else { "wrong peer token".to_string() };
        write(s, &AuthResult { ok, message }).await?;
        if !ok {
            return Err(AuthError::ClientProof);
        }
        Ok((purpose, hello.client_node))
    }
}

/// A connector for a tonic endpoint: each connection to `addr` passes the handshake first.
pub fn connector(
    keyring: Arc<Keyring>,
    addr: String,
    connect_timeout: Duration,
) -> impl tower::Service<
    tonic::transport::Uri,
    Response = hyper_util::rt::TokioIo<TcpStream>,
    Error = std::io::Error,
    Future = impl std::future::Future<Output = std::io::Result<hyper_util::rt::TokioIo<TcpStream>>> + Send,
> + Clone
       + Send {
    tower::service_fn(move |_: tonic::transport::Uri| {
        let (k, addr) = (keyring.clone(), addr.clone());
        async move {
            let (s, _node) = k.dial(&addr, Purpose::Grpc, connect_timeout).await.map_err(|e| match e {
                AuthError::Io(e) => e,
                e => std::io::Error::new(std::io::ErrorKind::PermissionDenied, e.to_string()),
            })?;
            Ok(hyper_util::rt::TokioIo::new(s))
        }
    })
}

fn nonce() -> Result<[u8; NONCE], AuthError> {
    let mut n = [0u8; NONCE];
    getrandom::fill(&mut n).map_err(|e| AuthError::Io(std::io::Error::other(e.to_string())))?;
    Ok(n)
}

fn frame_into(out: &mut Vec<u8>, m: &impl Message) {
    let body = m.encode_to_vec();
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
}

async fn write(s: &mut TcpStream, m: &impl Message) -> Result<(), AuthError> {
    let mut out = Vec::new();
    frame_into(&mut out, m);
    Ok(s.write_all(&out).await?)
}

async fn read<M: Message + Default>(s: &mut TcpStream) -> Result<M, AuthError> {
    let len = s.read_u32().await?;
    if len > MAX_FRAME {
        return Err(AuthError::Malformed(format!("message of {len} bytes")));
    }
    let mut buf = vec![0u8; len as usize];
    s.read_exact(&mut buf).await?;
    M::decode(buf.as_slice()).map_err(|e| AuthError::Malformed(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(tokens: &[&str], node: &str) -> Arc<Keyring> {
        let tokens: Vec<String> = tokens.iter().map(|t| t.to_string()).collect();
        Keyring::new(&tokens, node.into(), Arc::new(Metrics::new())).unwrap()
    }

    /// Serve one handshake with `server` on a fresh port; the client's result.
    async fn shake(server: Arc<Keyring>, client: Arc<Keyring>) -> (Result<String, String>, Result<String, String>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let srv = tokio::spawn(async move {
            let (mut s, from) = l.accept().await.unwrap();
            let by = tokio::time::Instant::now() + HANDSHAKE;
            server.accept(&mut s, &from.to_string(), by).await.map(|(_, n)| n).map_err(|e| e.reason().to_string())
        });
        let c = client.dial(&addr, Purpose::Raw, HANDSHAKE).await.map(|(_, n)| n).map_err(|e| e.reason().to_string());
        (c, srv.await.unwrap())
    }

    #[tokio::test]
    async fn both_sides_learn_who_proved_and_rotation_overlaps() {
        let (c, s) = shake(ring(&["old", "new"], "srv"), ring(&["old"], "cli")).await;
        assert_eq!((c, s), (Ok("srv".to_string()), Ok("cli".to_string())));
        let (c, s) = shake(ring(&["new"], "srv"), ring(&["old", "new"], "cli")).await;
        assert_eq!((c, s), (Ok("srv".to_string()), Ok("cli".to_string())));
        // A server without the token is found out by the client, before any request.
        let (c, _) = shake(ring(&["new"], "srv"), ring(&["old"], "cli")).await;
        assert_eq!(c, Err("server_proof".to_string()));
    }

    #[test]
    fn proofs_bind_every_field_and_side() {
        let t = Transcript {
            client_nonce: &[1; 32],
            server_nonce: &[2; 32],
            client_node: "a",
            server_node: "b",
            dialed: "127.0.0.1:1",
            purpose: 1,
        };
        let p = t.proof(b"k", CLIENT_LABEL);
        assert_eq!(t.check(&[b"x".to_vec(), b"k".to_vec()], CLIENT_LABEL, &p), Some(1));
        assert_eq!(t.check(&[b"k".to_vec()], SERVER_LABEL, &p), None, "a client proof is not a server proof");
        let other = Transcript { dialed: "127.0.0.1:2", ..t };
        assert_eq!(other.check(&[b"k".to_vec()], CLIENT_LABEL, &p), None, "bound to the dialed address");
    }
}
