//! End-to-end checks of files assembled from peers, against the origin's whole-object checksum.
//!
//! # Contract
//! - Once every chunk of a file version is in memory and at least one came from a peer, its
//!   CRC-64 (combined from the chunks' CRC-64s, kept as they were stored: nothing is read again)
//!   is compared with the checksum the origin publishes for that version.
//! - Equal: `verified`. Different: every chunk of the file is dropped, the file is loaded again
//!   from the origin alone (peers are not asked for it again), and `cachefs_verify_failures_total`
//!   counts the file. Each chunk a peer supplied is then compared (crc32c) with the origin's:
//!   only the peers whose chunks differ (or could not be compared) are distrusted for
//!   [`DISTRUST`] and named in a warning, so one forger does not cost every honest holder.
//!   The origin publishes none: `unverified`, with its reason.
//! - A file some of whose peer bytes cannot be checked whole is `unverified` with the reason,
//!   and counted once in `cachefs_unverified_files_total`: a chunk from a peer that found no
//!   room in memory (served from a buffer), or one evicted before the file was whole.
//!   [`Verifier::status`] lists every such file for `/status`.
//! - Checks and reloads are tracked tasks; they stop at shutdown.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use super::{ChunkKey, MemoryTier, Reader};
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
    /// Chunks peers supplied since the last check: index -> (peer address, crc32c it sent).
    supplied: HashMap<u64, (String, u32)>,
    check: Check,
    /// Failed once: read from the origin only.
    origin_only: bool,
    failures: u32,
    /// Counted in `cachefs_unverified_files_total` already.
    counted_unverified: bool,
}

impl FileState {
    fn new(key: &str) -> Self {
        FileState {
            key: key.to_string(),
            supplied: HashMap::new(),
            check: Check::Pending,
            origin_only: false,
            failures: 0,
            counted_unverified: false,
        }
    }
}

/// Drops the kernel's cached pages of a file; whether the file is mounted (an inode to drop).
pub type Invalidate = Arc<dyn Fn(&ObjectVersion) -> std::io::Result<bool> + Send + Sync>;

pub struct Verifier {
    origin: Arc<Origin>,
    memory: Arc<MemoryTier>,
    membership: Arc<Membership>,
    metrics: Arc<Metrics>,
    reader: OnceLock<Weak<Reader>>,
    /// Drops the kernel's cached pages of a file (set once the mount exists).
    invalidate: OnceLock<Invalidate>,
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
        let v = Arc::new(Verifier {
            origin,
            memory: memory.clone(),
            membership,
            metrics,
            reader: OnceLock::new(),
            invalidate: OnceLock::new(),
            files: Mutex::new(HashMap::new()),
            tasks,
            stop,
        });
        let weak = Arc::downgrade(&v);
        memory.on_evict(Box::new(move |key| {
            if let Some(v) = weak.upgrade() {
                v.evicted(key);
            }
        }));
        v
    }

    /// How to drop the kernel's cached pages of a file that served bytes failing its check.
    pub fn set_invalidate(&self, f: Invalidate) {
        let _ = self.invalidate.set(f);
    }

    /// Drop the kernel's cached pages of `obj` (bytes served from them may be forged).
    async fn invalidate_pages(&self, obj: &Arc<ObjectVersion>) {
        let Some(f) = self.invalidate.get().cloned() else { return };
        let o = obj.clone();
        // The kernel may wait for reads of those pages in flight: off the runtime's threads.
        match tokio::task::spawn_blocking(move || f(&o)).await {
            Ok(Ok(true)) => {
                self.metrics.page_invalidations.inc();
                warn!(key = %obj.key, "dropped the kernel's cached pages of the file: later reads and page faults get the origin's bytes");
            }
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(key = %obj.key, error = %e, "could not drop the kernel's cached pages of the file"),
            Err(e) => warn!(key = %obj.key, error = %e, "could not drop the kernel's cached pages of the file"),
        }
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

    /// The state of `obj`, made if new (room is made by forgetting settled files).
    fn entry<'a>(files: &'a mut HashMap<Arc<str>, FileState>, obj: &ObjectVersion) -> &'a mut FileState {
        if files.len() >= MAX_FILES && !files.contains_key(&obj.id) {
            files.retain(|_, f| f.check == Check::Pending || f.check == Check::Checking || f.origin_only);
        }
        files.entry(obj.id.clone()).or_insert_with(|| FileState::new(&obj.key))
    }

    /// Chunk `index` of `obj`, with crc32c `crc`, from the peer at `addr` was stored.
    pub fn from_peer(self: &Arc<Self>, obj: &Arc<ObjectVersion>, index: u64, crc: u32, addr: &str) {
        {
            let mut files = self.files();
            let f = Self::entry(&mut files, obj);
            f.supplied.insert(index, (addr.to_string(), crc));
            if !matches!(f.check, Check::Checking | Check::Refetching) {
                f.check = Check::Pending;
            }
        }
        self.stored(obj);
    }

    /// Chunk `index` of `obj` from the peer at `addr` was served without being kept (no room
    /// in memory): the file cannot be checked whole.
    pub fn unkept(&self, obj: &ObjectVersion, index: u64, addr: &str) {
        let mut files = self.files();
        let f = Self::entry(&mut files, obj);
        f.supplied.insert(index, (addr.to_string(), 0));
        self.cannot_check(f, "a chunk from a peer was served without room to keep it in memory: the file cannot be checked whole");
    }

    /// The memory tier evicted `key`: a file waiting to be whole loses a peer chunk's record.
    fn evicted(&self, key: &ChunkKey) {
        let mut files = self.files();
        let Some(f) = files.get_mut(&key.object) else { return };
        if f.check == Check::Pending && f.supplied.contains_key(&key.index) {
            self.cannot_check(f, "a chunk from a peer left memory before the file was whole: the file cannot be checked");
        }
    }

    /// `f` has peer bytes that no whole-file check will cover.
    fn cannot_check(&self, f: &mut FileState, reason: &str) {
        if matches!(f.check, Check::Checking | Check::Refetching) {
            return;
        }
        f.check = Check::Unverified { reason: reason.into() };
        if !f.counted_unverified {
            f.counted_unverified = true;
            self.metrics.unverified_files.inc();
            warn!(key = %f.key, reason, "bytes from peers were served that cannot be checked against the origin");
        }
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

    /// The file does not match: drop it, load it from the origin alone, then distrust the
    /// peers whose chunks differ from the origin's.
    async fn failed(self: &Arc<Self>, obj: &Arc<ObjectVersion>, kind: &str, theirs: u64, ours: u64) {
        self.metrics.verify_failures.inc();
        let supplied = {
            let mut files = self.files();
            let Some(f) = files.get_mut(&obj.id) else { return };
            f.origin_only = true;
            f.failures += 1;
            f.check = Check::Refetching;
            std::mem::take(&mut f.supplied)
        };
        warn!(key = %obj.key, kind, origin = format!("{theirs:016x}"), assembled = format!("{ours:016x}"), "file assembled from peers fails the origin's checksum; dropping it and loading it from the origin to find the peers that sent bad chunks");
        let freed = self.memory.drop_object(obj);
        info!(key = %obj.key, bytes = freed, "dropped the file's chunks");
        self.invalidate_pages(obj).await;
        let Some(reader) = self.reader.get().and_then(Weak::upgrade) else { return };
        let reloaded = reader.load_all(obj, |_| {}).await;
        self.blame(obj, kind, &supplied);
        let check = match reloaded {
            Ok(()) => match self.whole_crc64(obj).await {
                Some((again, _)) if again == theirs => Check::Verified,
                Some(_) => Check::Unverified { reason: "the origin's own bytes differ from its checksum".into() },
                None => Check::Unverified { reason: "reloaded from the origin, but it did not stay in memory".into() },
            },
            Err(e) => Check::Unverified { reason: format!("reload from the origin failed: {e}") },
        };
        self.set(obj, check);
    }

    /// Distrust each peer that supplied a chunk of `obj` whose crc32c differs from the one the
    /// origin's bytes (now in memory) have; a chunk that cannot be compared counts against its
    /// supplier too.
    fn blame(&self, obj: &ObjectVersion, kind: &str, supplied: &HashMap<u64, (String, u32)>) {
        let mut bad: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
        for (index, (addr, crc)) in supplied {
            if self.memory.crc(obj, *index) != Some(*crc) {
                bad.entry(addr.as_str()).or_default().push(*index);
            }
        }
        let honest = supplied
            .values()
            .filter(|(a, _)| !bad.contains_key(a.as_str()))
            .map(|(a, _)| a.as_str())
            .collect::<std::collections::BTreeSet<_>>();
        for (addr, mut chunks) in bad {
            chunks.sort_unstable();
            warn!(key = %obj.key, peer = addr, chunks = ?chunks, "this peer sent chunks that differ from the origin's; distrusting it");
            self.membership.distrust(addr, &format!("served chunks of {} that failed the origin's {kind}", obj.key), DISTRUST);
        }
        if !honest.is_empty() {
            info!(key = %obj.key, peers = ?honest, "these peers' chunks of the file match the origin's");
        }
    }

    /// For `/status`: the checksum kept and every file checked or being checked.
    pub fn status(&self) -> serde_json::Value {
        let mut files: Vec<_> = self
            .files()
            .values()
            .map(|f| {
                let (check, reason) = f.check.describe();
                serde_json::json!({ "key": f.key, "check": check, "reason": reason, "origin_only": f.origin_only, "failures": f.failures, "served_unverified": f.counted_unverified })
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
