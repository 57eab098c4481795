//! The storage part of an agent: the origin, the catalog listed from it, the memory tier with
//! the warm cache an earlier run left, and the loop that re-lists the origin. The tiered reader
//! is built over it here, so the agent and the tests wire the core the same way.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use super::AgentError;
use crate::cache::verify::Verifier;
use crate::cache::{ChunkSource, MemoryTier, Reader, ReaderOptions};
use crate::catalog::{Catalog, ObjectVersion};
use crate::config::{CacheConfig, SourceConfig};
use crate::fs::FsCore;
use crate::metrics::Metrics;
use crate::origin::{Origin, OriginError, OriginSource};
use crate::size::format_size;

/// List the origin and turn the listing into pinned versions.
pub async fn list_versions(origin: &Origin) -> Result<Vec<ObjectVersion>, OriginError> {
    let metas = origin.list().await?;
    Ok(metas
        .into_iter()
        .filter_map(|m| {
            let key = origin.relative_key(&m.location)?;
            let mode = origin.mode_of(&m.location);
            let mut v = ObjectVersion::new(key, m.location, m.e_tag, m.version, m.size, m.last_modified.into());
            v.mode = mode;
            Some(v)
        })
        .collect())
}

/// The bucket (or host, or directory) and the prefix a source URL names, for messages.
fn bucket_and_prefix(source: &str) -> (String, String) {
    let parts = url::Url::parse(source).ok().and_then(|u| Some((u.host_str()?.to_string(), u.path().trim_start_matches('/').to_string())));
    parts.unwrap_or_else(|| (source.to_string(), String::new()))
}

/// Origin, catalog and memory tier of one agent.
pub struct Storage {
    pub origin: Arc<Origin>,
    pub catalog: Arc<Catalog>,
    pub memory: Arc<MemoryTier>,
}

impl Storage {
    /// Open the configured origin and cache directory, list the origin, and reuse the chunks an
    /// earlier run left in the cache directory (each re-verified).
    pub async fn open(source: &SourceConfig, cache: &CacheConfig, shown_source: &str, metrics: &Arc<Metrics>) -> Result<Self, AgentError> {
        let origin =
            Arc::new(Origin::with_request_timeout(&source.url, &source.options, source.concurrency, metrics.clone(), cache.read_timeout)?);
        let dir_err = |e| AgentError::CacheDir(cache.dir.display().to_string(), e);
        if cache.huge_pages {
            huge_pages(cache);
        }
        // Each chunk's CRC-64 is kept when the origin publishes whole-object CRC-64s to check with.
        let memory = MemoryTier::new(&cache.dir, cache.chunk_size, cache.size, metrics.clone()).map_err(dir_err)?;
        let memory = Arc::new(memory.with_crc64(origin.crc64_kind().map(|k| k.algorithm())).with_digests(cache.digests));
        let storage = Storage::from_parts(origin, memory).await.map_err(|e| AgentError::List(shown_source.to_string(), e.to_string()))?;
        let files = storage.catalog.files();
        let total: u64 = files.iter().map(|v| v.size).sum();
        info!(source = %shown_source, files = files.len(), bytes = %format_size(total), "listed source");
        if files.is_empty() {
            if source.require_files {
                return Err(AgentError::Empty(shown_source.to_string()));
            }
            let (bucket, prefix) = bucket_and_prefix(shown_source);
            warn!(source = %shown_source, %bucket, %prefix, "the source lists no files: the mount is empty (a mistyped bucket or prefix?)");
        }
        let rec = storage.memory.recover(&files).map_err(dir_err)?;
        if rec != Default::default() {
            let (objects, chunks, bytes, dropped, removed_files) =
                (rec.objects, rec.chunks, format_size(rec.bytes), rec.dropped, rec.removed_files);
            info!(objects, chunks, %bytes, dropped, removed_files, "reused the warm cache of an earlier run");
        }
        if !crate::sys::is_tmpfs(&cache.dir) {
            warn!(cache_dir = %cache.dir.display(), "cache directory is not on tmpfs: cached chunks will use disk and page cache");
        }
        let (cache_size, chunk_size) = (format_size(cache.size), format_size(cache.chunk_size));
        info!(cache_dir = %cache.dir.display(), %cache_size, %chunk_size, "memory tier ready");
        Ok(storage)
    }

    /// Storage over parts already built (tests use an `InMemory` origin): lists the origin once.
    pub async fn from_parts(origin: Arc<Origin>, memory: Arc<MemoryTier>) -> Result<Self, OriginError> {
        let catalog = Arc::new(Catalog::new());
        catalog.apply(list_versions(&origin).await?);
        Ok(Storage { origin, catalog, memory })
    }

    /// The tiered reader: memory, then `peers` if any, then the origin. Whole-object streams
    /// from the origin run on `tasks` and stop on `stop`.
    pub fn reader(
        &self,
        peers: Option<Arc<dyn ChunkSource>>,
        verifier: Option<Arc<Verifier>>,
        opts: ReaderOptions,
        metrics: &Arc<Metrics>,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Arc<Reader> {
        let origin = OriginSource::new(self.origin.clone(), self.memory.clone(), verifier.clone(), tasks.clone(), stop.clone());
        let sources: Vec<Arc<dyn ChunkSource>> = peers.into_iter().chain([Arc::new(origin) as Arc<dyn ChunkSource>]).collect();
        let reader = Reader::new(self.memory.clone(), sources, opts, metrics.clone());
        if let Some(v) = &verifier {
            v.set_reader(&reader);
        }
        reader
    }

    /// Re-list the origin every `ttl` until `stop`; versions no longer listed are retired in `core`.
    pub fn spawn_refresh(&self, core: Arc<FsCore>, ttl: Duration, tasks: &TaskTracker, stop: CancellationToken) {
        let (origin, catalog) = (self.origin.clone(), self.catalog.clone());
        tasks.spawn(
            async move {
                let mut tick = tokio::time::interval(ttl);
                tick.tick().await;
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    refresh_once(&origin, &catalog, &core).await;
                }
            }
            .instrument(tracing::info_span!("catalog")),
        );
    }
}

/// Back the cache directory with huge pages where the contract of `cache::hugepages` allows.
fn huge_pages(cache: &CacheConfig) {
    use crate::cache::hugepages::{prepare, HugePages};
    let dir = cache.dir.display();
    match prepare(&cache.dir, cache.chunk_size) {
        HugePages::Mounted => info!(cache_dir = %dir, "mounted a tmpfs with huge pages (huge=within_size) on the cache directory"),
        HugePages::Already => info!(cache_dir = %dir, "the cache directory is on a tmpfs with huge pages"),
        HugePages::Skipped(why) => {
            info!(cache_dir = %dir, %why, "the cache directory stays as it is (no huge pages): storing chunks costs more CPU")
        }
    }
}

async fn refresh_once(origin: &Origin, catalog: &Catalog, core: &FsCore) {
    match list_versions(origin).await {
        Ok(v) => {
            let ch = catalog.apply(v);
            if ch.added + ch.changed + ch.removed > 0 {
                info!(added = ch.added, changed = ch.changed, removed = ch.removed, "catalog refreshed");
            }
            core.retire(&ch.retired);
        }
        Err(e) => warn!(error = %e, "catalog refresh failed; keeping the previous listing"),
    }
}
