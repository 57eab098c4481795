//! Digests that another holder vouches for: a chunk taken from one peer is checked, before it
//! is stored or served, against the BLAKE3 digest a different peer holds for it.
//!
//! # Contract
//! - [`Vouchers::digest`] answers the digest of chunk `index` that some holder other than the
//!   serving peer keeps (asked with an inventory `with_digests`, within the inventory timeout),
//!   or None when no other holder has one: then only the serving peer's checksum and the
//!   whole-file check stand behind the chunk (counted in `cachefs_peer_unvouched_chunks_total`).
//! - Where peers use tokens, digests are believed only with a valid MAC under the fleet token
//!   (`ObjectInventory.digests_mac`).
//! - Answers are kept per object and peer for [`KEEP`]; a digest of a version never changes, so
//!   only "not held" answers are asked again sooner ([`RETRY_MISSING`]). At most [`MAX_KEPT`]
//!   answers are kept.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tracing::debug;

use super::membership::PeerHandle;
use super::object_ref;
use super::proto::InventoryRequest;
use crate::catalog::ObjectVersion;
use crate::metrics::{ControlKind, Direction, Metrics};

/// How long one peer's digests of one object are kept.
pub const KEEP: Duration = Duration::from_secs(60);
/// A chunk the peer did not hold is asked about again after this long.
pub const RETRY_MISSING: Duration = Duration::from_secs(1);
/// Answers kept; beyond it all are dropped (and asked again when needed).
const MAX_KEPT: usize = 1024;
/// Other holders asked for one chunk at most.
const ASK_AT_MOST: usize = 2;

/// (object id, peer address) → when asked, its digests (32 bytes per chunk).
type Kept = HashMap<(Arc<str>, String), (Instant, Bytes)>;

pub struct Vouchers {
    /// Digests must carry a MAC under the fleet token (peers use tokens).
    keyring: Option<Arc<super::auth::Keyring>>,
    chunk_size: u64,
    timeout: Duration,
    metrics: Arc<Metrics>,
    kept: Mutex<Kept>,
}

impl Vouchers {
    pub fn new(keyring: Option<Arc<super::auth::Keyring>>, chunk_size: u64, timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Vouchers { keyring, chunk_size, timeout, metrics, kept: Mutex::new(HashMap::new()) }
    }

    /// The digest of chunk `index` of `obj` that a peer in `holders` other than `server` keeps.
    pub async fn digest(&self, obj: &ObjectVersion, index: u64, server: &PeerHandle, holders: &[Arc<PeerHandle>]) -> Option<[u8; 32]> {
        let others = holders.iter().filter(|p| p.addr != server.addr).take(ASK_AT_MOST);
        for p in others {
            if let Some(d) = self.of(obj, index, p).await {
                return Some(d);
            }
        }
        self.metrics.peer_unvouched_chunks.inc();
        None
    }

    /// Chunk `index`'s digest at `p`, from what it answered lately or by asking it now.
    async fn of(&self, obj: &ObjectVersion, index: u64, p: &PeerHandle) -> Option<[u8; 32]> {
        let key = (obj.id.clone(), p.addr.clone());
        let kept = self.lock().get(&key).cloned();
        if let Some((at, digests)) = kept {
            let d = at_index(&digests, index);
            if at.elapsed() < KEEP && (d.is_some() || at.elapsed() < RETRY_MISSING) {
                return d;
            }
        }
        let digests = self.ask(obj, p).await?;
        let d = at_index(&digests, index);
        let mut kept = self.lock();
        if kept.len() >= MAX_KEPT {
            kept.clear();
        }
        kept.insert(key, (Instant::now(), digests));
        d
    }

    /// `p`'s digests of `obj`, within the timeout.
    async fn ask(&self, obj: &ObjectVersion, p: &PeerHandle) -> Option<Bytes> {
        let req = InventoryRequest { objects: vec![object_ref(obj)], chunk_size: self.chunk_size, with_digests: true };
        let mut req = tonic::Request::new(req);
        req.set_timeout(self.timeout);
        self.metrics.add_control(ControlKind::inventory, Direction::sent);
        match tokio::time::timeout(self.timeout, p.client().inventory(req)).await {
            Ok(Ok(r)) => {
                let o = r.into_inner().objects.into_iter().find(|o| o.key == obj.key)?;
                let signed = |k: &super::auth::Keyring| {
                    k.verify(super::server::DIGESTS_LABEL, &[o.key.as_bytes(), o.etag.as_bytes(), &o.digests], &o.digests_mac)
                };
                if o.digests.is_empty() || self.keyring.as_deref().is_none_or(signed) {
                    return Some(o.digests);
                }
                self.metrics.peer_auth_failure("digests");
                debug!(peer = %p.addr, "the peer's digests carry no valid MAC: not believed");
                None
            }
            Ok(Err(e)) => {
                debug!(peer = %p.addr, error = %e, "no digests from the peer");
                None
            }
            Err(_) => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The digest of chunk `index` in an inventory's `digests` (None: absent or zeros).
fn at_index(digests: &[u8], index: u64) -> Option<[u8; 32]> {
    let start = usize::try_from(index).ok()?.checked_mul(32)?;
    let d: [u8; 32] = digests.get(start..start.checked_add(32)?)?.try_into().ok()?;
    (d != [0; 32]).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_read_at_their_index_and_zeros_are_none() {
        let mut d = vec![0u8; 96];
        d[32..64].copy_from_slice(&[7; 32]);
        assert_eq!(at_index(&d, 0), None);
        assert_eq!(at_index(&d, 1), Some([7; 32]));
        assert_eq!(at_index(&d, 3), None);
        assert_eq!(at_index(&d, u64::MAX), None);
    }
}
