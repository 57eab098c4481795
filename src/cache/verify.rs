//! End-to-end checks of files assembled from peers, against the origin's whole-object checksum.
//!
//! # Contract
//! - Once every chunk of a file version is in memory and at least one came from a peer, its
//!   CRC-64 (combined from the chunks' CRC-64s, kept as they were stored: nothing is read again)
//!   is compared with the checksum the origin publishes for that version.
//! - Equal: `verified`. Different: every chunk of the file is dropped, the file is loaded again
//!   from the origin alone (peers are not asked for it again), each peer that supplied chunks of
//!   it is distrusted for [`DISTRUST`] and named in a warning, and
//!   `cachefs_verify_failures_total` counts the file. The origin publishes none: `unverified`,
//!   with its reason. [`Verifier::status`] lists every such file for `/status`.
//! - Checks and reloads are tracked tasks; they stop at shutdown.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use super::{MemoryTier, Reader};
use crate::catalog::ObjectVersion;
use crate::metrics::Metrics;
use crate::origin::{Lookup, Origin};
use crate::peer::Membership;

/// How long a peer that served a file failing the origin's checksum is not used.
pub const DISTRUST: Duration = Duration::from_secs(600);
/// Most files whose check results are kept (for `/status`).
const MAX_FILES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    /// Chunks from peers are arriving; checked once the file is whole.
    Pending,
    Checking,
    Verified,
    /// Failed; being loaded again from the origin alone.
    Refetching,
    Unverified {
        reason: String,
    },
}

impl Check {
    /// Its name in `/status`, and why (for `unverified`).
    fn describe(&self) -> (&'static str, Option<&str>) {
        match self {
            Check::Pending => ("pending", None),
            Check::Checking => ("checking", None),
            Check::Verified => ("verified", None),
            Check::Refetching => ("refetching", None),
            Check::Unverified { reason } => ("unverified", Some(reason)),
        }
    }
}

struct FileState {
    key: String,
    /// Peers (addresses) that supplied chunks since the last check.
    suppliers: BTreeSet<String>,
    check: Check,
    /// Failed once: read from the origin only.
    origin_only: bool,
    failures: u32,
}

pub struct Verifier {
    origin: Arc<Origin>,
    memory: Arc<MemoryTier>,
    membership: Arc<Membership>,
    metrics: Arc<Metrics>,
    reader: OnceLock<Weak<Reader>>,
    files: Mutex<HashMap<Arc<str>, FileState>>,
    tasks: TaskTracker,
    stop: CancellationToken,
}

impl Verifier {
    pub fn new(
        origin: Arc<Origin>,
        memory: Arc<MemoryTier>,
        membership: Arc<Membership>,
        metrics: Arc<Metrics>,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(Verifier { origin, memory, membership, metrics, reader: OnceLock::new(), files: Mutex::new(HashMap::new()), tasks, stop })
    }

    /// The reader that loads a failed file again (set once it exists).
    pub fn set_reader(&self, reader: &Arc<Reader>) {
        let _ = self.reader.set(Arc::downgrade(reader));
    }

    fn files(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, FileState>> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `obj` must come from the origin alone (it failed its check).
    pub fn origin_only(&self, obj: &ObjectVersion) -> bool {
        self.files().get(&obj.id).is_some_and(|f| f.origin_only)
    }

    /// A chunk of `obj` from the peer at `addr` was stored.
    pub fn from_peer(self: &Arc<Self>, obj: &Arc<ObjectVersion>, addr: &str) {
        {
            let mut files = self.files();
            if files.len() >= MAX_FILES && !files.contains_key(&obj.id) {
                files.retain(|_, f| f.check == Check::Pending || f.check == Check::Checking || f.origin_only);
            }
            let f = files.entry(obj.id.clone()).or_insert_with(|| FileState {
                key: obj.key.clone(),
                suppliers: BTreeSet::new(),
                check: Check::Pending,
                origin_only: false,
                failures: 0,
            });
            f.suppliers.insert(addr.to_string());
            if f.check != Check::Checking && f.check != Check::Refetching {
                f.check = Check::Pending;
            }
        }
        self.stored(obj);
    }

    /// A chunk of `obj` was stored (from any tier): check the file if it is now whole.
    pub fn stored(self: &Arc<Self>, obj: &Arc<ObjectVersion>) {
        {
            let mut files = self.files();
            let Some(f) = files.get_mut(&obj.id) else { return };
            if f.check != Check::Pending || !self.memory.is_complete(obj) {
                return;
            }
            f.check = Check::Checking;
        }
        let (this, obj2) = (self.clone(), obj.clone());
        let span = tracing::info_span!("verify", key = %obj.key);
        self.tasks.spawn(
            async move {
                tokio::select! {
                    _ = this.check(&obj2) => {}
                    _ = this.stop.cancelled() => {}
                }
            }
            .instrument(span),
        );
    }

    fn set(&self, obj: &ObjectVersion, check: Check) {
        if let Some(f) = self.files().get_mut(&obj.id) {
            f.check = check;
        }
    }

    async fn check(self: &Arc<Self>, obj: &Arc<ObjectVersion>) {
        let published = self.origin.published_checksum(obj).await;
        let Some((ours, _)) = self.whole_crc64(obj).await else {
            // Evicted meanwhile, or this tier keeps no CRC-64s.
            let reason = if self.origin.crc64_kind().is_none() {
                "this kind of origin publishes no whole-object checksum"
            } else {
                "the file left memory before it could be checked"
            };
            return self.set(obj, Check::Unverified { reason: reason.into() });
        };
        match published {
            Ok(Lookup::Found(_, theirs)) if theirs == ours => {
                info!(key = %obj.key, "file assembled from peers matches the origin's checksum");
                self.set(obj, Check::Verified);
            }
            Ok(Lookup::Found(kind, theirs)) => self.failed(obj, kind.name(), theirs, ours).await,
            Ok(Lookup::Unavailable(reason)) => self.set(obj, Check::Unverified { reason }),
            Err(e) => self.set(obj, Check::Unverified { reason: format!("checksum lookup failed: {e}") }),
        }
    }

    /// [`MemoryTier::whole_crc64`] on a blocking thread (it takes CPU time in proportion to the
    /// number of chunks).
    async fn whole_crc64(&self, obj: &Arc<ObjectVersion>) -> Option<(u64, bool)> {
        let (memory, obj) = (self.memory.clone(), obj.clone());
        tokio::task::spawn_blocking(move || memory.whole_crc64(&obj)).await.ok().flatten()
    }

    /// The file does not match: drop it, distrust its suppliers, load it from the origin alone.
    async fn failed(self: &Arc<Self>, obj: &Arc<ObjectVersion>, kind: &str, theirs: u64, ours: u64) {
        self.metrics.verify_failures.inc();
        let suppliers: Vec<String> = {
            let mut files = self.files();
            let Some(f) = files.get_mut(&obj.id) else { return };
            f.origin_only = true;
            f.failures += 1;
            f.check = Check::Refetching;
            std::mem::take(&mut f.suppliers).into_iter().collect()
        };
        warn!(key = %obj.key, peers = ?suppliers, kind, origin = format!("{theirs:016x}"), assembled = format!("{ours:016x}"), "file assembled from peers fails the origin's checksum; dropping it, distrusting those peers and loading it from the origin");
        for p in &suppliers {
            self.membership.distrust(p, &format!("served {} that failed the origin's {kind}", obj.key), DISTRUST);
        }
        let freed = self.memory.drop_object(obj);
        info!(key = %obj.key, bytes = freed, "dropped the file's chunks");
        let Some(reader) = self.reader.get().and_then(Weak::upgrade) else { return };
        match reader.load_all(obj, |_| {}).await {
            Ok(()) => match self.whole_crc64(obj).await {
                Some((again, _)) if again == theirs => self.set(obj, Check::Verified),
                Some(_) => self.set(obj, Check::Unverified { reason: "the origin's own bytes differ from its checksum".into() }),
                None => self.set(obj, Check::Unverified { reason: "reloaded from the origin, but it did not stay in memory".into() }),
            },
            Err(e) => self.set(obj, Check::Unverified { reason: format!("reload from the origin failed: {e}") }),
        }
    }

    /// For `/status`: the checksum kept and every file checked or being checked.
    pub fn status(&self) -> serde_json::Value {
        let mut files: Vec<_> = self
            .files()
            .values()
            .map(|f| {
                let (check, reason) = f.check.describe();
                serde_json::json!({ "key": f.key, "check": check, "reason": reason, "origin_only": f.origin_only, "failures": f.failures })
            })
            .collect();
        files.sort_by(|a, b| a["key"].as_str().cmp(&b["key"].as_str()));
        let kind = self.origin.crc64_kind().map(|k| k.name());
        let note = if kind.is_none() {
            Some("this origin publishes no whole-object checksum: files assembled from peers are checked chunk by chunk only")
        } else {
            None
        };
        serde_json::json!({ "checksum": kind, "note": note, "files": files })
    }
}
