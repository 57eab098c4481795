//! The `/status` document: one serde struct that the agent writes and `cachefs status` reads.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::cache::verify::Verifier;
use crate::cache::MemoryTier;
use crate::catalog::Catalog;
use crate::fs::FsCore;
use crate::metrics::{Metrics, Tier};
use crate::peer::membership::PeerStatus;
use crate::peer::Membership;
use crate::preempt::{Drain, DrainStatus};

/// What a running agent is doing (`GET /status`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    /// The source with credentials redacted.
    pub source: String,
    pub mountpoint: String,
    /// Mounted, serving and not draining (what `/readyz` answers).
    pub ready: bool,
    /// serving, draining or drained.
    pub drain_state: String,
    pub drain: DrainStatus,
    pub node_id: String,
    /// The peer address this agent serves on, if any.
    pub listen: Option<String>,
    pub peers: Vec<PeerStatus>,
    /// Whole-file checks of what peers sent (absent without peers).
    pub verification: Option<serde_json::Value>,
    pub files: usize,
    pub open_handles: usize,
    pub cache: CacheStatus,
    pub read_bytes: TierBytes,
    pub origin: OriginStatus,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CacheStatus {
    pub used_bytes: u64,
    pub capacity_bytes: u64,
    pub chunk_size: u64,
}

/// Bytes read through the mount, by the tier that answered.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TierBytes {
    pub memory: u64,
    pub peer: u64,
    pub origin: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct OriginStatus {
    pub bytes: u64,
    pub requests: u64,
    pub errors: u64,
}

/// The parts `/status` reads, held by the admin endpoint.
pub struct StatusParts {
    pub source: String,
    pub mountpoint: String,
    pub node_id: String,
    pub listen: Option<String>,
    pub ready: Arc<AtomicBool>,
    pub drain: Arc<Drain>,
    pub membership: Option<Arc<Membership>>,
    pub verifier: Option<Arc<Verifier>>,
    pub catalog: Arc<Catalog>,
    pub core: Arc<FsCore>,
    pub memory: Arc<MemoryTier>,
    pub metrics: Arc<Metrics>,
}

impl StatusParts {
    pub fn status(&self) -> Status {
        let (m, memory) = (&self.metrics, &self.memory);
        Status {
            version: env!("CARGO_PKG_VERSION").to_string(),
            source: self.source.clone(),
            mountpoint: self.mountpoint.clone(),
            ready: self.ready.load(Ordering::SeqCst),
            drain_state: crate::preempt::state_name(self.drain.state()).to_string(),
            drain: self.drain.status(),
            node_id: self.node_id.clone(),
            listen: self.listen.clone(),
            peers: self.membership.as_ref().map(|m| m.status()).unwrap_or_default(),
            verification: self.verifier.as_ref().map(|v| v.status()),
            files: self.catalog.files().len(),
            open_handles: self.core.open_handles(),
            cache: CacheStatus { used_bytes: memory.used(), capacity_bytes: memory.capacity(), chunk_size: memory.chunk_size() },
            read_bytes: TierBytes {
                memory: m.read_bytes_of(Tier::memory),
                peer: m.read_bytes_of(Tier::peer),
                origin: m.read_bytes_of(Tier::origin),
            },
            origin: OriginStatus { bytes: m.origin_bytes.get(), requests: m.origin_requests.get(), errors: m.origin_errors.get() },
        }
    }
}
