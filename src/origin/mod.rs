//! The origin tier: an `object_store` built from the source URL and options.
//!
//! # Contract
//! - [`Origin::list`] returns every object under the source prefix with its size and etag.
//! - [`Origin::get_range`] returns exactly the bytes `range` (clamped to the object's size) of the
//!   pinned object version, or an error; never other bytes. A store that answers a ranged GET
//!   with the whole object (or a wider range) is handled: the range actually returned is checked
//!   and the wanted bytes are cut from it. A changed object is [`OriginError::Changed`].
//! - Every request holds a permit of a bounded semaphore (at most `concurrency` in flight) and has
//!   a per-attempt timeout. Each kind of failure is retried by one layer only, so retries never
//!   multiply: `object_store` ([`STORE_RETRIES`]) retries failed requests and broken bodies with
//!   backoff; [`Origin::get_range`] ([`ATTEMPTS`]) retries only what the store cannot: an
//!   attempt that stalls past its timeout, a body that ends short, a body that breaks off from
//!   an object without an etag.

use std::ops::Range;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use object_store::path::Path;
use object_store::{GetOptions, GetRange, ObjectMeta, ObjectStore, ObjectStoreScheme};
use tokio::sync::Semaphore;
use tracing::warn;

use crate::catalog::ObjectVersion;
use crate::metrics::Metrics;

pub mod checksum;
pub mod locallist;
pub mod s3list;
pub mod whole;
pub use checksum::{Checksums, Crc64Kind, Lookup};

/// Longest per-attempt timeout of one origin request (lowered to the read deadline if shorter).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// Longest wait for the next entry of a listing (a page of up to 1000 keys): a prefix of any
/// size lists as long as its pages keep coming.
pub const LIST_PAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts for one ranged GET (the first try included) that stalls or ends short.
pub const ATTEMPTS: u32 = 3;
/// Retries `object_store` makes of a failed request or a broken body (with backoff, within the
/// request timeout).
pub const STORE_RETRIES: usize = 2;

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("invalid source {0:?}: {1}")]
    BadUrl(String, String),
    /// An option this kind of source does not take; the kind with its article ("an s3 source").
    #[error("unknown --source-option {0:?} for {1}")]
    UnknownOption(String, &'static str),
    #[error("--source-option {0}: {1}")]
    BadOption(String, String),
    #[error("source directory {0} does not exist or is not a directory")]
    NoDirectory(String),
    #[error("cannot configure the object store: {0}")]
    Build(String),
    #[error("object {0} not found at the origin")]
    NotFound(String),
    #[error("object {0} changed at the origin since it was listed")]
    Changed(String),
    #[error("origin request timed out after {0:?}")]
    Timeout(Duration),
    #[error("origin returned {got} bytes for a request of {want}")]
    Short { want: u64, got: u64 },
    #[error("origin request failed: {0}")]
    Request(String),
    /// The body broke off where the store could not retry it (no etag to resume against).
    #[error("the origin's response broke off: {0}")]
    Broken(String),
    /// The bytes arrived but could not be kept here (memory tier full, say): not the origin's fault.
    #[error("storing the bytes: {0}")]
    Local(String),
    /// The origin answered a ranged GET with the whole object (see [`whole`]).
    #[error("origin ignored the Range of a GET")]
    RangeIgnored,
}

impl OriginError {
    /// The source as configured cannot work (URL, options, directory): a usage error, found
    /// before anything is fetched.
    pub fn is_config(&self) -> bool {
        matches!(
            self,
            OriginError::BadUrl(..)
                | OriginError::UnknownOption(..)
                | OriginError::BadOption(..)
                | OriginError::NoDirectory(_)
                | OriginError::Build(_)
        )
    }

    /// Worth another attempt by [`Origin::get_range`]: what the store's own retries do not cover
    /// (a failed request has already been retried by the store).
    fn retryable(&self) -> bool {
        matches!(self, OriginError::Timeout(_) | OriginError::Short { .. } | OriginError::Broken(_))
    }
}

/// A plain HTTP client for the requests made beside the store (checksum HEADs, listing pages).
fn http_client(timeout: Duration) -> Result<reqwest::Client, OriginError> {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(5))
        .no_proxy()
        .build()
        .map_err(|e| OriginError::Build(e.to_string()))
}

use crate::error::one_line;

/// What `object_store` says (its error type is private) when a ranged GET got `200`.
const NOT_PARTIAL: &str = "Received non-partial response when range requested";

fn map_err(path: &str, e: object_store::Error) -> OriginError {
    match e {
        object_store::Error::NotFound { .. } => OriginError::NotFound(path.to_string()),
        object_store::Error::Precondition { .. } => OriginError::Changed(path.to_string()),
        object_store::Error::Generic { source, .. } if source.to_string() == NOT_PARTIAL => OriginError::RangeIgnored,
        other => OriginError::Request(one_line(other)),
    }
}

/// The object store behind the cache, with limits.
pub struct Origin {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    limit: Semaphore,
    metrics: Arc<Metrics>,
    description: String,
    request_timeout: Duration,
    /// Whole-object checksums (S3-compatible origins only).
    checksums: Option<Checksums>,
    /// Our own listing, key by key (S3-compatible origins only; others list through the store).
    lister: Option<s3list::S3Lister>,
    /// Keys skipped by the last listing (warned about when it changes).
    skipped: std::sync::atomic::AtomicUsize,
    /// The directory of a local origin (its files' modes are shown in the mount).
    local_root: Option<std::path::PathBuf>,
}

impl Origin {
    /// Wrap an already built store (tests use `InMemory`).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: Path, concurrency: usize, metrics: Arc<Metrics>) -> Self {
        let limit = Semaphore::new(concurrency.max(1));
        Origin {
            description: format!("{store}/{prefix}"),
            store,
            prefix,
            limit,
            metrics,
            request_timeout: REQUEST_TIMEOUT,
            checksums: None,
            lister: None,
            skipped: Default::default(),
            local_root: None,
        }
    }

    /// Build from a source URL (`file://`, a bare path, `s3://`, `gs://`, `az://`, `http(s)://`)
    /// and `--source-option` pairs; `AWS_*`, `GOOGLE_*`, `AZURE_*` variables are read too.
    pub fn from_url(source: &str, options: &[(String, String)], concurrency: usize, metrics: Arc<Metrics>) -> Result<Self, OriginError> {
        Self::with_request_timeout(source, options, concurrency, metrics, REQUEST_TIMEOUT)
    }

    /// Per-attempt timeout no longer than `limit` (the read deadline), at most [`REQUEST_TIMEOUT`].
    pub fn with_request_timeout(
        source: &str,
        options: &[(String, String)],
        concurrency: usize,
        metrics: Arc<Metrics>,
        limit: Duration,
    ) -> Result<Self, OriginError> {
        let t = limit.min(REQUEST_TIMEOUT).max(Duration::from_secs(1));
        let built = build_store(source, options, t)?;
        let mut o = Origin::new(built.store, built.prefix, concurrency, metrics);
        o.checksums = built.checksums;
        o.lister = built.lister;
        o.local_root = built.local_root;
        o.description = crate::redact::source(source);
        o.request_timeout = t;
        Ok(o)
    }

    pub fn description(&self) -> &str {
        &self.description
    }

    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The CRC-64 this origin publishes for whole objects, if it publishes one.
    pub fn crc64_kind(&self) -> Option<Crc64Kind> {
        self.checksums.as_ref().map(|c| c.kind)
    }

    /// The whole-object checksum of `obj` as the origin publishes it (one request, bounded).
    pub async fn published_checksum(&self, obj: &ObjectVersion) -> Result<Lookup, OriginError> {
        let Some(c) = &self.checksums else {
            return Ok(Lookup::Unavailable("this kind of origin publishes no whole-object checksum".into()));
        };
        let _permit = self.limit.acquire().await.map_err(|_| OriginError::Request("shutting down".into()))?;
        self.metrics.origin_requests.inc();
        c.lookup(obj).await
    }

    /// Every object under the prefix (keys that cannot be paths here, and local files whose names
    /// cannot be keys, are skipped, with a warning).
    pub async fn list(&self) -> Result<Vec<ObjectMeta>, OriginError> {
        let _permit = self.limit.acquire().await.map_err(|_| OriginError::Request("shutting down".into()))?;
        self.metrics.origin_requests.inc();
        if let Some(lister) = &self.lister {
            let listing = lister.list(&self.prefix).await?;
            self.warn_skipped(&listing.skipped);
            return Ok(listing.objects);
        }
        if let Some(root) = &self.local_root {
            let listing = locallist::list(self.store.as_ref(), root.clone(), &self.prefix).await?;
            self.warn_skipped(&listing.skipped);
            return Ok(listing.objects);
        }
        let prefix = if self.prefix.as_ref().is_empty() { None } else { Some(&self.prefix) };
        let mut out = Vec::new();
        let mut stream = self.store.list(prefix);
        loop {
            let next = tokio::time::timeout(LIST_PAGE_TIMEOUT, stream.next()).await.map_err(|_| OriginError::Timeout(LIST_PAGE_TIMEOUT))?;
            match next {
                Some(item) => out.push(item.map_err(|e| map_err(self.prefix.as_ref(), e))?),
                None => return Ok(out),
            }
        }
    }

    fn warn_skipped(&self, skipped: &[String]) {
        let before = self.skipped.swap(skipped.len(), std::sync::atomic::Ordering::Relaxed);
        if !skipped.is_empty() && skipped.len() != before {
            let first: Vec<&String> = skipped.iter().take(5).collect();
            warn!(count = skipped.len(), first = ?first, "skipped object keys that cannot be file paths (empty, '.' or '..' segments, control characters; for a local directory: names that cannot be object keys)");
        }
    }

    /// Permission bits of the object at `location`, where the origin has them (a local directory).
    pub fn mode_of(&self, location: &Path) -> Option<u32> {
        use std::os::unix::fs::PermissionsExt;
        let root = self.local_root.as_ref()?;
        let md = std::fs::metadata(root.join(location.as_ref())).ok()?;
        Some(md.permissions().mode() & 0o7777)
    }

    /// The key of `meta` relative to the prefix, `/`-separated.
    pub fn relative_key(&self, location: &Path) -> Option<String> {
        let parts: Vec<String> = location.prefix_match(&self.prefix)?.map(|p| p.as_ref().to_string()).collect();
        if parts.is_empty() {
            None
        } else {
            Some(parts.join("/"))
        }
    }

    /// Exactly the bytes `range` of `obj`, with retries.
    pub async fn get_range(&self, obj: &ObjectVersion, range: Range<u64>) -> Result<Bytes, OriginError> {
        let mut buf = BytesMut::new();
        self.get_range_into(obj, range, &mut buf).await?;
        Ok(buf.freeze())
    }

    /// [`Origin::get_range`], putting the bytes into `sink` as they arrive (restarted on a retry).
    pub async fn get_range_into(&self, obj: &ObjectVersion, range: Range<u64>, sink: &mut dyn Sink) -> Result<(), OriginError> {
        let range = range.start.min(obj.size)..range.end.min(obj.size);
        if range.is_empty() {
            return Ok(());
        }
        let mut delay = Duration::from_millis(100);
        let mut attempt = 1;
        loop {
            sink.restart();
            let result = {
                let _permit = self.limit.acquire().await.map_err(|_| OriginError::Request("shutting down".into()))?;
                self.metrics.origin_requests.inc();
                match tokio::time::timeout(self.request_timeout, self.get_once(obj, range.clone(), sink)).await {
                    Ok(r) => r,
                    Err(_) => Err(OriginError::Timeout(self.request_timeout)),
                }
            };
            match result {
                Ok(()) => {
                    self.metrics.origin_bytes.inc_by(range.end - range.start);
                    return Ok(());
                }
                Err(e) if e.retryable() && attempt < ATTEMPTS => {
                    warn!(key = %obj.key, ?range, attempt, error = %e, "origin read failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 4;
                    attempt += 1;
                }
                Err(e) => {
                    self.metrics.origin_errors.inc();
                    return Err(e);
                }
            }
        }
    }

    /// One ranged GET into `sink`. A store that answers with the whole object is
    /// [`OriginError::RangeIgnored`]; one that answers a wider range has the wanted bytes cut out.
    async fn get_once(&self, obj: &ObjectVersion, range: Range<u64>, sink: &mut dyn Sink) -> Result<(), OriginError> {
        let opts = GetOptions {
            if_match: obj.etag.clone(),
            version: obj.version.clone(),
            range: Some(GetRange::Bounded(range.clone())),
            ..Default::default()
        };
        let res = self.store.get_opts(&obj.location, opts).await.map_err(|e| map_err(&obj.key, e))?;
        let got = res.range.clone();
        if got.start > range.start || got.end < range.end {
            return Err(OriginError::Request(format!("origin returned range {got:?}, wanted {range:?}")));
        }
        let want = range.end - range.start;
        let put = |s: &mut dyn Sink, d: &[u8]| s.put(d).map_err(|e| OriginError::Local(e.to_string()));
        match res.payload {
            // A local file: one read of exactly the range.
            object_store::GetResultPayload::File(..) => {
                let body = res.bytes().await.map_err(|e| map_err(&obj.key, e))?;
                let from = (range.start - got.start) as usize;
                let piece = body.get(from..from + want as usize).ok_or(OriginError::Short { want, got: body.len() as u64 })?;
                put(sink, piece)?;
            }
            object_store::GetResultPayload::Stream(mut stream) => {
                let mut pos = got.start;
                while sink.len() < want {
                    let Some(piece) = stream.next().await else { break };
                    let piece = piece.map_err(|e| match obj.etag {
                        None => OriginError::Broken(one_line(e)),
                        Some(_) => map_err(&obj.key, e),
                    })?;
                    let (start, end) = (pos, pos + piece.len() as u64);
                    pos = end;
                    if end <= range.start {
                        continue;
                    }
                    let from = range.start.saturating_sub(start) as usize;
                    let to = (range.end.min(end) - start) as usize;
                    put(sink, &piece[from..to])?;
                }
            }
        }
        if sink.len() != want {
            return Err(OriginError::Short { want, got: sink.len() });
        }
        Ok(())
    }
}

/// Where the bytes of a ranged GET go, in order, as they arrive.
pub trait Sink: Send {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()>;
    /// Forget what was put so far: the request starts over.
    fn restart(&mut self);
    /// Bytes put so far.
    fn len(&self) -> u64;
    /// Nothing put so far.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl Sink for BytesMut {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.extend_from_slice(data);
        Ok(())
    }

    fn restart(&mut self) {
        self.clear();
    }

    fn len(&self) -> u64 {
        BytesMut::len(self) as u64
    }
}

impl Sink for crate::cache::memory::Fill {
    fn put(&mut self, data: &[u8]) -> std::io::Result<()> {
        self.write(data)
    }

    fn restart(&mut self) {
        crate::cache::memory::Fill::restart(self)
    }

    fn len(&self) -> u64 {
        self.written()
    }
}

/// A store built from a source URL, with what only some kinds of store have.
struct Built {
    store: Arc<dyn ObjectStore>,
    prefix: Path,
    checksums: Option<Checksums>,
    lister: Option<s3list::S3Lister>,
    /// The directory of a local origin.
    local_root: Option<std::path::PathBuf>,
}

/// The source as a URL: a bare path is a `file://` directory.
fn source_url(source: &str) -> Result<url::Url, OriginError> {
    let bad = |m: &str| OriginError::BadUrl(crate::redact::source(source), m.to_string());
    if source.contains("://") {
        url::Url::parse(source).map_err(|e| bad(&e.to_string()))
    } else {
        let abs = std::path::absolute(source).map_err(|e| bad(&e.to_string()))?;
        url::Url::from_directory_path(&abs).map_err(|_| bad("not an absolute directory path"))
    }
}

/// A value a store would choke on later (a scheme-less endpoint panics in request signing) is
/// a clear error now: options naming an endpoint or URL must be http(s) URLs with a host.
/// Options whose value is a boolean (any prefix: `aws_allow_http`, `allow_http`).
const BOOLEAN_OPTIONS: &[&str] = &[
    "allow_http",
    "allow_invalid_certificates",
    "virtual_hosted_style_request",
    "skip_signature",
    "unsigned_payload",
    "imdsv1_fallback",
    "s3_express",
    "disable_tagging",
    "request_payer",
    "use_emulator",
    "use_fabric_endpoint",
    "use_azure_cli",
    "http1_only",
    "http2_only",
];

/// An option value the store could choke on, or silently misread, is refused before the store
/// is built: endpoints and URLs must be http(s) URLs with a scheme, booleans must say true or
/// false (the store reads any other word as false), regions must look like one.
fn check_option(key: &str, value: &str) -> Result<(), OriginError> {
    let k = key.to_ascii_lowercase();
    let bad = |why: &str| Err(OriginError::BadOption(key.to_string(), format!("{value:?} {why}")));
    if k.contains("endpoint") || k.ends_with("url") {
        if !crate::config::is_http_url(value) {
            return bad("must be an http:// or https:// URL (scheme included)");
        }
    } else if BOOLEAN_OPTIONS.iter().any(|b| k.ends_with(b)) {
        let v = value.trim().to_ascii_lowercase();
        if !matches!(v.as_str(), "true" | "false" | "1" | "0" | "yes" | "no" | "on" | "off") {
            return bad("must be true or false");
        }
    } else if k.ends_with("region") {
        let ok = !value.is_empty() && value.len() <= 64 && value.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !ok {
            return bad("is not a region name (like us-east-1 or cn-shanghai)");
        }
    }
    Ok(())
}

fn build_store(source: &str, options: &[(String, String)], request_timeout: Duration) -> Result<Built, OriginError> {
    use object_store::client::ClientConfigKey;
    use object_store::RetryConfig;

    let bad = |m: &str| OriginError::BadUrl(crate::redact::source(source), m.to_string());
    let url = source_url(source)?;
    let (scheme, path) =
        ObjectStoreScheme::parse(&url).map_err(|_| bad("unknown scheme: use file://, a path, s3://, gs://, az://, http:// or https://"))?;
    let retry = RetryConfig { max_retries: STORE_RETRIES, retry_timeout: request_timeout, ..Default::default() };
    let timeout = format!("{}s", request_timeout.as_secs());
    let build = |e: object_store::Error| OriginError::Build(one_line(e));

    macro_rules! with_options {
        ($builder:expr, $key:ty, $kind:expr) => {{
            let mut b = $builder;
            for (k, v) in options {
                let key = <$key>::from_str(&k.to_ascii_lowercase()).map_err(|_| OriginError::UnknownOption(k.clone(), $kind))?;
                check_option(k, v)?;
                b = b.with_config(key, v.clone());
            }
            b
        }};
    }

    let (mut checksums, mut lister) = (None, None);
    let store: Arc<dyn ObjectStore> = match scheme {
        ObjectStoreScheme::Local => {
            if !options.is_empty() {
                return Err(OriginError::UnknownOption(options[0].0.clone(), "a local directory source"));
            }
            let dir = url.to_file_path().map_err(|_| bad("not a local path"))?;
            if !dir.is_dir() {
                return Err(OriginError::NoDirectory(dir.display().to_string()));
            }
            let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir).map_err(build)?;
            return Ok(Built { store: Arc::new(fs), prefix: Path::default(), checksums: None, lister: None, local_root: Some(dir) });
        }
        ObjectStoreScheme::AmazonS3 => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
            let b = AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .with_retry(retry)
                .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), timeout)
                .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout), "5s");
            let b = with_options!(b, AmazonS3ConfigKey, "an s3 source");
            let endpoint = b.get_config_value(&AmazonS3ConfigKey::Endpoint);
            // From the options or the environment (AWS_ENDPOINT): checked either way.
            endpoint.as_deref().map(|e| check_option("endpoint", e)).transpose()?;
            let s3 = Arc::new(b.build().map_err(build)?);
            checksums = Some(Checksums::new(s3.clone(), endpoint.as_deref())?);
            lister = Some(s3list::S3Lister::new(s3.clone())?);
            s3
        }
        ObjectStoreScheme::GoogleCloudStorage => {
            use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
            let b = GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry)
                .with_config(GoogleConfigKey::Client(ClientConfigKey::Timeout), timeout);
            Arc::new(with_options!(b, GoogleConfigKey, "a gcs source").build().map_err(build)?)
        }
        ObjectStoreScheme::MicrosoftAzure => {
            use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
            let b = MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .with_retry(retry)
                .with_config(AzureConfigKey::Client(ClientConfigKey::Timeout), timeout);
            Arc::new(with_options!(b, AzureConfigKey, "an azure source").build().map_err(build)?)
        }
        ObjectStoreScheme::Http => {
            let base = &url[..url::Position::BeforePath];
            let b = object_store::http::HttpBuilder::new().with_url(base).with_retry(retry).with_config(ClientConfigKey::Timeout, timeout);
            Arc::new(with_options!(b, ClientConfigKey, "an http source").build().map_err(build)?)
        }
        _ => return Err(bad("unsupported scheme")),
    };
    let prefix = Path::parse(path.as_ref()).map_err(|e| bad(&e.to_string()))?;
    Ok(Built { store, prefix, checksums, lister, local_root: None })
}

/// The origin as the last tier of the read path: chunks are written into the memory tier as
/// they arrive when it has room for them, else returned in a buffer. From an origin that ignores
/// `Range`, chunks come from one whole-object stream per object ([`whole`]).
pub struct OriginSource {
    origin: Arc<Origin>,
    memory: Arc<crate::cache::MemoryTier>,
    /// Told of every chunk stored, so a file assembled from peers is checked once whole.
    verifier: Option<Arc<crate::cache::verify::Verifier>>,
    whole: Arc<whole::WholeStreams>,
}

impl OriginSource {
    /// Whole-object streams run on `tasks` and stop on `stop`.
    pub fn new(
        origin: Arc<Origin>,
        memory: Arc<crate::cache::MemoryTier>,
        verifier: Option<Arc<crate::cache::verify::Verifier>>,
        tasks: tokio_util::task::TaskTracker,
        stop: tokio_util::sync::CancellationToken,
    ) -> Self {
        let whole = Arc::new(whole::WholeStreams::new(origin.clone(), memory.clone(), verifier.clone(), tasks, stop));
        OriginSource { origin, memory, verifier, whole }
    }

    async fn fetch_chunk(&self, obj: &Arc<ObjectVersion>, index: u64, range: Range<u64>) -> Result<crate::cache::Chunk, OriginError> {
        if let Some(rx) = self.whole.join(obj, index) {
            return rx.await.unwrap_or_else(|_| Err(OriginError::Request("the whole-object stream ended".into())));
        }
        let result = self.ranged(obj, index, range).await;
        match result {
            Err(OriginError::RangeIgnored) => self.whole.chunk(obj, index).await,
            other => other,
        }
    }

    async fn ranged(&self, obj: &Arc<ObjectVersion>, index: u64, range: Range<u64>) -> Result<crate::cache::Chunk, OriginError> {
        let Ok(Some(mut fill)) = self.memory.begin_fill(obj, index) else {
            return self.origin.get_range(obj, range).await.map(Into::into);
        };
        match self.origin.get_range_into(obj, range.clone(), &mut fill).await {
            Ok(()) => {}
            // No room to keep it after all (the cache filesystem filled up): the reader still
            // gets its bytes.
            Err(OriginError::Local(e)) => {
                warn!(key = %obj.key, index, error = %e, "cannot keep the chunk in the memory tier; serving it from a buffer");
                drop(fill);
                return self.origin.get_range(obj, range).await.map(Into::into);
            }
            Err(e) => return Err(e),
        }
        let crc = fill.crc();
        match fill.commit(crc, crate::metrics::Tier::origin) {
            Ok(bytes) => {
                if let Some(v) = &self.verifier {
                    v.stored(obj);
                }
                Ok(crate::cache::Chunk { bytes, stored: true })
            }
            Err(e) => Err(OriginError::Request(format!("storing the chunk: {e}"))),
        }
    }
}

impl crate::cache::ChunkSource for OriginSource {
    fn tier(&self) -> crate::metrics::Tier {
        crate::metrics::Tier::origin
    }

    fn fetch<'a>(
        &'a self,
        obj: &'a Arc<ObjectVersion>,
        index: u64,
        range: Range<u64>,
        _stage: &'a crate::cache::reader::Stage,
    ) -> futures::future::BoxFuture<'a, Result<Option<crate::cache::Chunk>, crate::Error>> {
        Box::pin(async move {
            match self.fetch_chunk(obj, index, range).await {
                Ok(c) => Ok(Some(c)),
                Err(OriginError::Changed(k)) | Err(OriginError::NotFound(k)) => Err(crate::Error::Stale(k)),
                Err(e) => Err(crate::Error::unavailable(e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m() -> Arc<Metrics> {
        Arc::new(Metrics::new())
    }

    /// A local file whose name object_store cannot represent failed the whole listing (the agent
    /// exited "cannot list the source"); it is skipped and the rest listed.
    #[tokio::test]
    async fn a_local_file_with_an_unrepresentable_name_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("good.bin"), b"ok").unwrap();
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        std::fs::write(dir.path().join("sub").join("also-good.bin"), b"ok").unwrap();
        std::fs::write(dir.path().join("bad\u{1}name.bin"), b"no").unwrap();
        let o = Origin::from_url(&dir.path().display().to_string(), &[], 4, m()).unwrap();
        let listed = o.list().await.expect("one bad name failed the whole listing");
        let mut keys: Vec<String> = listed.iter().filter_map(|meta| o.relative_key(&meta.location)).collect();
        keys.sort();
        assert_eq!(keys, ["good.bin", "sub/also-good.bin"]);
        assert_eq!(o.skipped.load(std::sync::atomic::Ordering::Relaxed), 1);
    }

    #[test]
    fn url_errors_are_clear() {
        let e = Origin::from_url("ftp://x/y", &[], 4, m()).err().unwrap().to_string();
        assert!(e.contains("unknown scheme"), "{e}");
        let e = Origin::from_url("/definitely/not/here", &[], 4, m()).err().unwrap().to_string();
        assert!(e.contains("does not exist"), "{e}");
        let opts = vec![("colour".to_string(), "blue".to_string())];
        let e = Origin::from_url("s3://b/p", &opts, 4, m()).err().unwrap().to_string();
        assert!(e.contains("unknown --source-option \"colour\""), "{e}");
    }

    #[test]
    fn s3_prefix_and_options() {
        let opts = vec![
            ("endpoint".to_string(), "http://127.0.0.1:1".to_string()),
            ("allow_http".to_string(), "true".to_string()),
            ("access_key_id".to_string(), "k".to_string()),
            ("secret_access_key".to_string(), "s".to_string()),
            ("region".to_string(), "us-east-1".to_string()),
        ];
        let o = Origin::from_url("s3://bucket/models/llama", &opts, 4, m()).unwrap();
        assert_eq!(o.prefix().as_ref(), "models/llama");
        assert_eq!(o.relative_key(&Path::from("models/llama/a/b.bin")).as_deref(), Some("a/b.bin"));
        assert_eq!(o.relative_key(&Path::from("other/x")), None);
    }
}
