//! The peer tier of the read path.
//!
//! # Contract (`ChunkSource`)
//! For a missing chunk: (a) if live peers are known to hold it (their inventories, refreshed
//! lazily), fetch it from one of them, spreading consecutive chunks over all holders; (b) else ask
//! the chunk's owner (rendezvous over live, non-draining peers and this agent) to fill it;
//! (c) if the owner is this agent, `Ok(None)`: the origin comes next. Every chunk received is
//! checked (length, offsets, crc32c over the whole chunk); a peer error, timeout, short stream or
//! checksum mismatch moves on to the next holder and finally falls through to the origin.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures::future::BoxFuture;
use tracing::{debug, warn};

use super::membership::{Membership, PeerHandle};
use super::placement;
use super::proto::{InventoryRequest, ReadChunkRequest};
use super::{bit, object_ref, PROTOCOL};
use crate::cache::{ChunkKey, ChunkSource};
use crate::catalog::ObjectVersion;
use crate::error::Error;
use crate::metrics::{Metrics, Tier};

/// How long a peer's inventory of one object is trusted.
pub const INVENTORY_TTL: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct PeerTimeouts {
    /// A chunk a peer holds in memory.
    pub hit: Duration,
    /// A chunk the owner may have to fetch from origin first.
    pub fill: Duration,
    pub inventory: Duration,
}

impl Default for PeerTimeouts {
    fn default() -> Self {
        PeerTimeouts { hit: Duration::from_secs(5), fill: Duration::from_secs(10), inventory: Duration::from_secs(2) }
    }
}

struct Inventory {
    at: Instant,
    /// node id → bitmap of held chunks.
    holders: HashMap<String, Bytes>,
}

pub struct PeerSource {
    membership: Arc<Membership>,
    chunk_size: u64,
    /// This agent drains: it stops being an owner.
    draining: Arc<AtomicBool>,
    timeouts: PeerTimeouts,
    metrics: Arc<Metrics>,
    inventories: Mutex<HashMap<Arc<str>, Arc<tokio::sync::Mutex<Option<Inventory>>>>>,
}

#[derive(Debug, thiserror::Error)]
enum PeerFetchError {
    #[error("{0:?}: {1}")]
    Status(tonic::Code, String),
    #[error("timed out")]
    Timeout,
    #[error("bad stream: {0}")]
    Protocol(String),
    #[error("checksum mismatch")]
    Checksum,
}

impl PeerSource {
    pub fn new(membership: Arc<Membership>, chunk_size: u64, draining: Arc<AtomicBool>, timeouts: PeerTimeouts, metrics: Arc<Metrics>) -> Self {
        PeerSource { membership, chunk_size, draining, timeouts, metrics, inventories: Mutex::new(HashMap::new()) }
    }

    /// Node ids of live peers holding chunk `index` of `obj`, sorted.
    async fn holders(&self, obj: &ObjectVersion, index: u64) -> Vec<Arc<PeerHandle>> {
        let live = self.membership.live();
        let usable: Vec<_> = live.into_iter().filter(|p| !p.state().draining).collect();
        if usable.is_empty() {
            return Vec::new();
        }
        let cell = {
            let mut map = self.inventories.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 4096 {
                map.clear();
            }
            map.entry(obj.id.clone()).or_default().clone()
        };
        // One refresh at a time per object; others wait and read its result.
        let mut inv = cell.lock().await;
        if inv.as_ref().is_none_or(|i| i.at.elapsed() > INVENTORY_TTL) {
            let fresh = self.fetch_inventory(obj, &usable).await;
            // A peer that did not answer keeps what we knew of it (a holder that lost a chunk
            // answers NOT_FOUND, which is cheap); one that answered replaces it.
            let mut holders = inv.take().map(|i| i.holders).unwrap_or_default();
            holders.extend(fresh.holders);
            *inv = Some(Inventory { at: fresh.at, holders });
        }
        let Some(inv) = inv.as_ref() else { return Vec::new() };
        let mut out: Vec<_> = usable
            .into_iter()
            .filter(|p| p.node_id().and_then(|n| inv.holders.get(&n)).is_some_and(|m| bit(m, index)))
            .collect();
        out.sort_by_key(|p| p.node_id());
        out
    }

    async fn fetch_inventory(&self, obj: &ObjectVersion, peers: &[Arc<PeerHandle>]) -> Inventory {
        let asks = peers.iter().map(|p| async move {
            let mut req = tonic::Request::new(InventoryRequest { objects: vec![object_ref(obj)], chunk_size: self.chunk_size });
            req.set_timeout(self.timeouts.inventory);
            let r = tokio::time::timeout(self.timeouts.inventory * 2, p.client().inventory(req)).await;
            match r {
                Ok(Ok(resp)) => {
                    let resp = resp.into_inner();
                    let map = resp.objects.into_iter().find(|o| o.key == obj.key).map(|o| o.present);
                    Some((p.node_id()?, map?))
                }
                // Not a reason to back the peer off: data requests decide that.
                Ok(Err(status)) => {
                    debug!(peer = %p.addr, error = %status.message(), "inventory request failed");
                    None
                }
                Err(_) => {
                    debug!(peer = %p.addr, "inventory request timed out");
                    None
                }
            }
        });
        let holders = futures::future::join_all(asks).await.into_iter().flatten().collect();
        Inventory { at: Instant::now(), holders }
    }

    /// Forget what we believed `peer` holds of `obj` (it said NOT_FOUND).
    fn forget(&self, obj: &ObjectVersion) {
        if let Some(cell) = self.inventories.lock().unwrap_or_else(|p| p.into_inner()).get(&obj.id) {
            if let Ok(mut inv) = cell.try_lock() {
                *inv = None;
            }
        }
    }

    /// Stream chunk `index` from `peer` and verify it.
    async fn read_from(&self, peer: &PeerHandle, obj: &ObjectVersion, index: u64, want: u64, allow_fill: bool) -> Result<Bytes, PeerFetchError> {
        let limit = if allow_fill { self.timeouts.fill } else { self.timeouts.hit };
        let fut = async {
            let mut req = tonic::Request::new(ReadChunkRequest {
                object: Some(object_ref(obj)),
                index,
                chunk_size: self.chunk_size,
                allow_fill,
                protocol: PROTOCOL,
            });
            req.set_timeout(limit);
            let mut stream = peer
                .client()
                .read_chunk(req)
                .await
                .map_err(|s| PeerFetchError::Status(s.code(), s.message().to_string()))?
                .into_inner();
            let mut buf = BytesMut::with_capacity(want as usize);
            let mut crc = None;
            while let Some(msg) = stream.message().await.map_err(|s| PeerFetchError::Status(s.code(), s.message().to_string()))? {
                if crc.is_none() {
                    if msg.chunk_len != want {
                        return Err(PeerFetchError::Protocol(format!("chunk length {} != {want}", msg.chunk_len)));
                    }
                    crc = Some(msg.crc32c);
                }
                if msg.offset != buf.len() as u64 || buf.len() as u64 + msg.data.len() as u64 > want {
                    return Err(PeerFetchError::Protocol(format!("data at offset {} (have {} of {want})", msg.offset, buf.len())));
                }
                buf.extend_from_slice(&msg.data);
                self.metrics.peer_received_bytes.inc_by(msg.data.len() as u64);
            }
            if buf.len() as u64 != want {
                return Err(PeerFetchError::Protocol(format!("short stream: {} of {want} bytes", buf.len())));
            }
            if crc != Some(crc32c::crc32c(&buf)) {
                self.metrics.peer_checksum_errors.inc();
                return Err(PeerFetchError::Checksum);
            }
            Ok(buf.freeze())
        };
        tokio::time::timeout(limit, fut).await.map_err(|_| PeerFetchError::Timeout)?
    }

    async fn fetch_chunk(&self, obj: &Arc<ObjectVersion>, index: u64, range: Range<u64>) -> Result<Option<Bytes>, Error> {
        let want = range.end - range.start;
        // (a) holders, striped by chunk index, then the others in turn.
        let holders = self.holders(obj, index).await;
        let n = holders.len();
        for k in 0..n {
            let p = &holders[(index as usize + k) % n];
            match self.read_from(p, obj, index, want, false).await {
                Ok(b) => return Ok(Some(b)),
                Err(e) => {
                    debug!(peer = %p.addr, key = %obj.key, index, error = %e, "holder could not serve the chunk");
                    if matches!(e, PeerFetchError::Status(tonic::Code::NotFound, _)) {
                        self.forget(obj);
                    } else {
                        if matches!(e, PeerFetchError::Checksum) {
                            warn!(peer = %p.addr, key = %obj.key, index, "peer sent a chunk that fails its checksum; fetching elsewhere");
                        }
                        self.membership.report_failure(p, &e.to_string());
                    }
                }
            }
        }
        // (b) the owner fills it, so the origin sees each chunk about once.
        let candidates = self.membership.owner_candidates();
        let mut names: Vec<String> = candidates.iter().filter_map(|p| p.node_id()).collect();
        let me = !self.draining.load(Ordering::SeqCst);
        if me {
            names.push(self.membership.self_id().to_string());
        }
        let key = ChunkKey { object: obj.id.clone(), index };
        let Some(i) = placement::owner(&key, &names) else { return Ok(None) };
        let owner_id = &names[i];
        if owner_id == self.membership.self_id() {
            return Ok(None);
        }
        let Some(owner) = candidates.iter().find(|p| p.node_id().as_deref() == Some(owner_id.as_str())) else { return Ok(None) };
        match self.read_from(owner, obj, index, want, true).await {
            Ok(b) => Ok(Some(b)),
            Err(e) => {
                debug!(peer = %owner.addr, key = %obj.key, index, error = %e, "owner could not fill the chunk");
                if matches!(e, PeerFetchError::Checksum) {
                    warn!(peer = %owner.addr, key = %obj.key, index, "owner sent a chunk that fails its checksum; using the origin");
                }
                if !matches!(e, PeerFetchError::Status(tonic::Code::NotFound, _)) {
                    self.membership.report_failure(owner, &e.to_string());
                }
                Err(Error::unavailable(format!("peer {}: {e}", owner.addr)))
            }
        }
    }
}

impl ChunkSource for PeerSource {
    fn tier(&self) -> Tier {
        Tier::peer
    }

    fn fetch<'a>(&'a self, obj: &'a Arc<ObjectVersion>, index: u64, range: Range<u64>) -> BoxFuture<'a, Result<Option<Bytes>, Error>> {
        Box::pin(self.fetch_chunk(obj, index, range))
    }
}
