//! The only place flags, the TOML config file and the environment are read. Produces a validated
//! [`Config`] grouped per subsystem; every validation failure is a one-line message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::{Deserialize, Serialize};

use crate::preempt::{PreemptConfig, Provider};
use crate::size::{format_size, parse_size};

pub const DEFAULT_ADMIN: &str = "127.0.0.1:7071";
pub const DEFAULT_CACHE_DIR: &str = "/dev/shm/cachefs";
pub const DEFAULT_CHUNK_SIZE: u64 = 8 << 20;
pub const MIN_CHUNK_SIZE: u64 = 1 << 20;
pub const MAX_CHUNK_SIZE: u64 = 64 << 20;
pub const DEFAULT_CATALOG_TTL_SECS: u64 = 60;
pub const DEFAULT_READ_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_ORIGIN_CONCURRENCY: usize = 16;
pub const DEFAULT_READAHEAD_BUDGET: u64 = 256 << 20;
pub const DEFAULT_FUSE_THREADS: usize = 4;
pub const DEFAULT_DRAIN_TIMEOUT_SECS: u64 = 30;

#[derive(Debug, Parser)]
#[command(
    name = "cachefs",
    version,
    about = "Node-local memory cache for model files: a read-only FUSE mount over memory, peers and object storage"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum Command {
    /// Mount the source read-only at the mountpoint and serve until SIGINT/SIGTERM.
    Mount(Settings),
    /// Show what a running agent is doing: mount, source, cache, bytes per tier, peers.
    Status {
        /// Admin address of the agent
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: String,
        /// Print the agent's JSON as is
        #[arg(long)]
        json: bool,
    },
    /// Load files (or whole directories) into the agent's memory, with a progress bar.
    Warm {
        /// Admin address of the agent
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: String,
        /// File holding the agent's admin token (its --admin-token-file)
        #[arg(long, env = "CACHEFS_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
        /// Keep warming after this command exits or is interrupted
        #[arg(long)]
        detach: bool,
        /// Paths inside the mount (absolute under the mountpoint, or relative to its root)
        #[arg(required = true)]
        paths: Vec<String>,
    },
    /// Drain the agent (planned maintenance, scale-in): readiness off, peers told, in-flight
    /// peer transfers finished; the mount keeps serving local readers. Returns when drained.
    Drain {
        /// Admin address of the agent
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: String,
        /// First hand off the chunks no other agent holds to the peers that will own them
        /// (within the drain timeout), as a preemption notice does
        #[arg(long)]
        handoff: bool,
        /// File holding the agent's admin token (its --admin-token-file)
        #[arg(long, env = "CACHEFS_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    Completions {
        /// The shell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (cachefs.1 and cachefs-COMMAND.1, roff) into a directory.
    #[command(hide = true)]
    Manpages {
        /// Directory to write them into (created if missing)
        dir: PathBuf,
    },
    /// Serve again after `cachefs drain`: readiness on, peers told. Refused while a preemption
    /// notice or a shutdown signal holds the drain.
    Resume {
        /// Admin address of the agent
        #[arg(long, default_value = DEFAULT_ADMIN)]
        admin: String,
        /// File holding the agent's admin token (its --admin-token-file)
        #[arg(long, env = "CACHEFS_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
    },
}

/// Parse an admin address given to `status` or `warm`.
pub fn admin_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("--admin {s:?} is not an address like 127.0.0.1:7071"))
}

/// Every setting of `cachefs mount`, once: the flags (clap) and the `--config` TOML file
/// (serde, same names, `cache-size` or `cache_size`) are this one struct; flags win.
#[derive(Debug, Default, Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Origin URL: file:///dir or a bare path, s3://bucket/prefix, gs://, az://, http(s)://
    #[arg(long)]
    pub source: Option<String>,
    /// Directory to mount on (created if missing).
    #[arg(long)]
    pub mountpoint: Option<PathBuf>,
    /// TOML file with the same settings; flags win.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// Where the memory tier keeps its files (should be tmpfs) [default: /dev/shm/cachefs]
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Memory budget for cached chunks, e.g. 16GiB [default: half the available memory]
    #[arg(long)]
    pub cache_size: Option<String>,
    /// Mount a tmpfs with huge pages on the cache directory when it is a missing or empty
    /// directory on a tmpfs without them, as under /dev/shm (default true; false leaves it)
    #[arg(long, value_name = "BOOL")]
    pub cache_huge_pages: Option<bool>,
    /// Chunk size, 1MiB..64MiB [default: 8MiB]
    #[arg(long)]
    pub chunk_size: Option<String>,
    /// Admin HTTP address (/healthz, /readyz, /metrics, /status) [default: 127.0.0.1:7071]
    #[arg(long)]
    pub admin: Option<String>,
    /// File holding a token that admin POSTs (/warm, /drain) must present as `Authorization: Bearer`
    #[arg(long)]
    pub admin_token_file: Option<PathBuf>,
    /// Object store option KEY=VALUE (endpoint, region, access_key_id, allow_http, ...); repeatable.
    /// In the file: a `[source_options]` table.
    #[arg(long = "source-option", value_name = "KEY=VALUE")]
    #[serde(skip)]
    pub source_option: Vec<String>,
    #[arg(skip)]
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub source_options: BTreeMap<String, String>,
    /// Refuse to start when the source lists no files (a mistyped bucket or prefix); without it an
    /// empty source is a warning.
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub require_files: bool,
    /// Let users other than the mounting one read the mount (needed for containers).
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub allow_other: bool,
    /// Seconds between re-listings of the source [default: 60]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub catalog_ttl: Option<u64>,
    /// Seconds a read may take before it fails with EIO [default: 30]
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub read_timeout: Option<u64>,
    /// Most concurrent requests to the origin [default: 16]
    #[arg(long)]
    pub origin_concurrency: Option<usize>,
    /// Most bytes of sequential readahead in flight, over all files [default: 256MiB]
    #[arg(long)]
    pub readahead_budget: Option<String>,
    /// FUSE worker threads [default: 4]
    #[arg(long)]
    pub fuse_threads: Option<usize>,
    /// Log format [default: plain]
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Serve chunks to peers on this address (gRPC), e.g. 0.0.0.0:7070 [default: off]
    #[arg(long)]
    pub listen: Option<String>,
    /// Peer agents, HOST:PORT,... (this agent's own address is recognised and skipped)
    #[arg(long, value_delimiter = ',')]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub peers: Vec<String>,
    /// A DNS name whose A/AAAA records are the peers, NAME:PORT (re-resolved every 10 s)
    #[arg(long)]
    pub peer_dns: Option<String>,
    /// File holding the fleet token peers prove they hold (a mutual challenge-response; the
    /// token never crosses the wire); while rotating, two lines: the current and the next
    #[arg(long)]
    pub peer_token_file: Option<PathBuf>,
    /// Check every chunk taken from a peer against the BLAKE3 digest another holder vouches for,
    /// before it is stored or served (default true; false trusts peers' crc32c and the
    /// whole-file check alone)
    #[arg(long, value_name = "BOOL")]
    pub verify_peer_chunks: Option<bool>,
    /// Never open files with FUSE passthrough (serve local hits through normal FUSE replies).
    /// In the file: `passthrough = false`.
    #[arg(long)]
    #[serde(skip)]
    pub no_passthrough: bool,
    #[arg(skip)]
    pub passthrough: Option<bool>,
    /// PEM certificate this agent presents to peers (mutual TLS; with --peer-tls-key and --peer-tls-ca)
    #[arg(long)]
    pub peer_tls_cert: Option<PathBuf>,
    /// PEM private key of --peer-tls-cert
    #[arg(long)]
    pub peer_tls_key: Option<PathBuf>,
    /// PEM CA that peers' certificates must chain to (both directions)
    #[arg(long)]
    pub peer_tls_ca: Option<PathBuf>,
    /// Cloud whose metadata service is watched for preemption notices [default: none]
    #[arg(long, value_enum)]
    pub preemption_provider: Option<Provider>,
    /// Base URL (scheme and host) of the metadata service, replacing the provider's own
    #[arg(long, value_name = "URL")]
    pub metadata_endpoint: Option<String>,
    /// Seconds between metadata polls, may be fractional [default: aws 2, aliyun 2, azure 1; gcp long-polls]
    #[arg(long, value_name = "SECS")]
    pub metadata_poll_interval: Option<f64>,
    /// URL that receives drain events as JSON POSTs; repeatable
    #[arg(long = "scheduler-webhook", value_name = "URL")]
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scheduler_webhook: Vec<String>,
    /// Command run with `sh -c` on each drain event, the event in CACHEFS_* environment variables
    #[arg(long, value_name = "CMD")]
    pub drain_hook: Option<String>,
    /// Seconds a drain started by `cachefs drain` or SIGTERM may wait for peer transfers [default: 30]
    #[arg(long, value_name = "SECS", value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub drain_timeout: Option<u64>,
    /// Drain on an AWS rebalance recommendation too (by default it is only reported)
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub drain_on_rebalance: bool,
    /// Acknowledge Azure scheduled events (StartRequests) once drained, so Azure proceeds early
    #[arg(long)]
    #[serde(skip_serializing_if = "is_false")]
    pub azure_acknowledge: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Settings {
    /// These settings (flags) over `file`'s: a setting given here wins, a flag that is off or
    /// empty leaves the file's value.
    fn over(self, file: Settings) -> Result<Settings, ConfigError> {
        let (config, source_option, no_passthrough) = (self.config.clone(), self.source_option.clone(), self.no_passthrough);
        let table = |s: Settings| toml::Table::try_from(s).map_err(|e| ConfigError::Invalid(format!("invalid settings: {}", one_line(&e))));
        let mut merged = table(file)?;
        merged.extend(table(self)?);
        let mut s: Settings =
            merged.try_into().map_err(|e: toml::de::Error| ConfigError::Invalid(format!("invalid settings: {}", one_line(&e))))?;
        (s.config, s.source_option, s.no_passthrough) = (config, source_option, no_passthrough);
        Ok(s)
    }
}

/// PEM material for mutual TLS between peers.
#[derive(Debug, Clone)]
pub struct PeerTls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Plain,
    Json,
}

/// The origin and how it is read and listed.
#[derive(Debug, Clone)]
pub struct SourceConfig {
    pub url: String,
    pub options: Vec<(String, String)>,
    pub concurrency: usize,
    pub catalog_ttl: Duration,
    /// An empty listing at start is an error, not a warning.
    pub require_files: bool,
}

/// The memory tier and the reader in front of it.
#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub dir: PathBuf,
    pub size: u64,
    pub chunk_size: u64,
    pub readahead_budget: u64,
    /// How long a read may take before it fails (the reader's, the peers' and the origin's budget).
    pub read_timeout: Duration,
    /// Keep a BLAKE3 digest of every chunk and check peers' chunks against other holders' ones.
    pub digests: bool,
    /// Back the cache directory with huge pages where it can be (see `cache::hugepages`).
    pub huge_pages: bool,
}

/// Serving chunks to peers and finding them.
#[derive(Debug, Clone, Default)]
pub struct PeerConfig {
    /// Address peers reach this agent on; None: not serving peers.
    pub listen: Option<SocketAddr>,
    pub peers: Vec<String>,
    pub dns: Option<String>,
    /// The fleet tokens, current first (read from `--peer-token-file`; empty: none).
    pub tokens: Vec<String>,
    pub tls: Option<PeerTls>,
}

impl PeerConfig {
    /// Whether this agent takes part in a mesh at all.
    pub fn enabled(&self) -> bool {
        self.listen.is_some() || !self.peers.is_empty() || self.dns.is_some()
    }
}

/// The FUSE mount.
#[derive(Debug, Clone)]
pub struct FuseConfig {
    pub mountpoint: PathBuf,
    pub allow_other: bool,
    pub threads: usize,
    /// Open files whose chunks are all in memory with FUSE passthrough to their tmpfs file.
    pub passthrough: bool,
}

/// The admin HTTP endpoint.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub addr: SocketAddr,
    /// The token admin POSTs must present (read from `--admin-token-file`).
    pub token: Option<String>,
}

/// A validated configuration of `cachefs mount`, grouped per subsystem.
#[derive(Debug, Clone)]
pub struct Config {
    pub source: SourceConfig,
    pub cache: CacheConfig,
    pub peers: PeerConfig,
    pub fuse: FuseConfig,
    /// Preemption watch, drain deadline and reporters.
    pub preempt: PreemptConfig,
    pub admin: AdminConfig,
    pub log_format: LogFormat,
}

impl Config {
    /// The source as it may be shown (logs, `/status`, peers): credentials redacted.
    pub fn shown_source(&self) -> String {
        crate::redact::source(&self.source.url)
    }

    /// A configuration with defaults for everything but source, mountpoint, cache dir and size.
    pub fn new(source: &str, mountpoint: PathBuf, cache_dir: PathBuf, cache_size: u64) -> Self {
        Config {
            source: SourceConfig {
                url: source.to_string(),
                options: Vec::new(),
                concurrency: DEFAULT_ORIGIN_CONCURRENCY,
                catalog_ttl: Duration::from_secs(DEFAULT_CATALOG_TTL_SECS),
                require_files: false,
            },
            cache: CacheConfig {
                dir: cache_dir,
                size: cache_size,
                chunk_size: DEFAULT_CHUNK_SIZE,
                readahead_budget: DEFAULT_READAHEAD_BUDGET,
                read_timeout: Duration::from_secs(DEFAULT_READ_TIMEOUT_SECS),
                digests: true,
                huge_pages: true,
            },
            peers: PeerConfig::default(),
            fuse: FuseConfig { mountpoint, allow_other: false, threads: DEFAULT_FUSE_THREADS, passthrough: true },
            preempt: PreemptConfig::default(),
            admin: AdminConfig { addr: DEFAULT_ADMIN.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7071))), token: None },
            log_format: LogFormat::Plain,
        }
    }
}

fn read_file_config(path: &std::path::Path) -> Result<Settings, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { what: "config".into(), path: path.into(), source })?;
    file_config(&text, path)
}

/// Check the text of a config file named `name`: a one-line reason if it is not valid.
pub fn parse_file_config(text: &str, name: &str) -> Result<(), ConfigError> {
    file_config(text, std::path::Path::new(name)).map(|_| ())
}

fn file_config(text: &str, path: &std::path::Path) -> Result<Settings, ConfigError> {
    let syntax = |source| ConfigError::Syntax { path: path.into(), source };
    let table: toml::Table = toml::from_str(text).map_err(syntax)?;
    // Accept the flag spelling (`cache-size`) as well as `cache_size`.
    let normalized: toml::Table = table.into_iter().map(|(k, v)| (k.replace('-', "_"), v)).collect();
    normalized.try_into().map_err(syntax)
}

fn check_host_port(flag: &str, v: &str) -> Result<(), ConfigError> {
    match v.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        _ => Err(ConfigError::Invalid(format!("{flag} {v:?} must be HOST:PORT"))),
    }
}

/// Whether `v` is an http(s) URL with a host (webhooks, metadata and store endpoints).
pub fn is_http_url(v: &str) -> bool {
    url::Url::parse(v).is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host().is_some())
}

fn check_url(flag: &str, v: &str) -> Result<String, ConfigError> {
    match is_http_url(v) {
        true => Ok(v.to_string()),
        false => Err(ConfigError::Invalid(format!("{flag} {v:?} must be an http:// or https:// URL"))),
    }
}

use crate::error::one_line;

/// Why the flags and config file cannot run an agent; shown to the operator as one line
/// ([`crate::error::report`]).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {what} {}", path.display())]
    Read { what: String, path: PathBuf, source: std::io::Error },
    #[error("invalid config {}", path.display())]
    Syntax { path: PathBuf, source: toml::de::Error },
    #[error("missing {0}")]
    Missing(&'static str),
    #[error(transparent)]
    TooLarge(#[from] crate::memlimit::TooLarge),
    #[error("{0}")]
    Invalid(String),
}

/// A token file (`--peer-token-file`, `--admin-token-file`): one line of printable ASCII.
pub fn read_token(flag: &str, p: &std::path::Path) -> Result<String, ConfigError> {
    let t = std::fs::read_to_string(p).map_err(|source| ConfigError::Read { what: flag.into(), path: p.into(), source })?;
    let t = t.trim().to_string();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::Invalid(format!("{flag} {}: the token must be one line of printable ASCII", p.display())));
    }
    Ok(t)
}

/// `--peer-token-file`: one token a line, the current one first; two while a fleet rotates.
pub fn read_peer_tokens(p: &std::path::Path) -> Result<Vec<String>, ConfigError> {
    const FLAG: &str = "--peer-token-file";
    let t = std::fs::read_to_string(p).map_err(|source| ConfigError::Read { what: FLAG.into(), path: p.into(), source })?;
    let tokens: Vec<String> = t.lines().map(str::trim).filter(|l| !l.is_empty()).map(String::from).collect();
    if tokens.is_empty() || tokens.len() > 2 || tokens.iter().any(|t| !t.bytes().all(|b| b.is_ascii_graphic())) {
        return Err(ConfigError::Invalid(format!(
            "{FLAG} {}: one or two tokens (current, next), one a line, each printable ASCII",
            p.display()
        )));
    }
    Ok(tokens)
}

/// Bytes the kernel reports as available (`MemAvailable`), if it can be read.
pub fn available_memory() -> Option<u64> {
    crate::memlimit::host_available(std::path::Path::new("/proc/meminfo"))
}

/// Merge flags over the config file over defaults, and validate.
pub fn resolve_mount(flags: Settings) -> Result<Config, ConfigError> {
    let s = match flags.config.clone() {
        Some(p) => flags.over(read_file_config(&p)?)?,
        None => flags,
    };
    let cache = resolve_cache(&s)?;
    let cfg = Config {
        source: resolve_source(&s)?,
        peers: resolve_peers(&s)?,
        fuse: resolve_fuse(&s)?,
        preempt: resolve_preempt(&s)?,
        admin: resolve_admin(&s)?,
        log_format: s.log_format.unwrap_or_default(),
        cache,
    };
    Ok(cfg)
}

fn positive(name: &str, v: u64) -> Result<u64, ConfigError> {
    if v == 0 {
        Err(ConfigError::Invalid(format!("--{name} must be at least 1")))
    } else {
        Ok(v)
    }
}

fn size_setting(name: &str, v: &Option<String>, default: u64) -> Result<u64, ConfigError> {
    match v {
        Some(v) => parse_size(v).map_err(|e| ConfigError::Invalid(format!("--{name}: {e}"))),
        None => Ok(default),
    }
}

fn resolve_source(s: &Settings) -> Result<SourceConfig, ConfigError> {
    let url = s.source.clone().ok_or(ConfigError::Missing("--source (the origin URL or directory)"))?;
    let mut options: Vec<(String, String)> = s.source_options.clone().into_iter().collect();
    for kv in &s.source_option {
        let (k, v) = kv.split_once('=').ok_or_else(|| ConfigError::Invalid(format!("--source-option {kv:?} must be KEY=VALUE")))?;
        options.retain(|(ek, _)| ek != k);
        options.push((k.trim().to_string(), v.to_string()));
    }
    let concurrency = positive("origin-concurrency", s.origin_concurrency.unwrap_or(DEFAULT_ORIGIN_CONCURRENCY) as u64)? as usize;
    let catalog_ttl = Duration::from_secs(positive("catalog-ttl", s.catalog_ttl.unwrap_or(DEFAULT_CATALOG_TTL_SECS))?);
    Ok(SourceConfig { url, options, concurrency, catalog_ttl, require_files: s.require_files })
}

fn resolve_cache(s: &Settings) -> Result<CacheConfig, ConfigError> {
    let dir = s.cache_dir.clone().unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR));
    if dir.exists() && !dir.is_dir() {
        return Err(ConfigError::Invalid(format!("--cache-dir {} is a file, not a directory", dir.display())));
    }
    let limits = crate::memlimit::Limits::gather(&dir);
    let size = match s.cache_size.as_deref().filter(|v| v.trim() != "auto") {
        Some(v) => {
            let size = parse_size(v).map_err(|e| ConfigError::Invalid(format!("--cache-size: {e}")))?;
            limits.check(size)?;
            size
        }
        None => limits
            .default_cache_size()
            .ok_or_else(|| ConfigError::Invalid("cannot read MemAvailable from /proc/meminfo: set --cache-size".into()))?,
    };
    let chunk_size = size_setting("chunk-size", &s.chunk_size, DEFAULT_CHUNK_SIZE)?;
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(ConfigError::Invalid(format!(
            "--chunk-size {} is out of range: it must be between 1MiB and 64MiB",
            format_size(chunk_size)
        )));
    }
    let readahead_budget = size_setting("readahead-budget", &s.readahead_budget, DEFAULT_READAHEAD_BUDGET)?;
    let read_timeout = Duration::from_secs(positive("read-timeout", s.read_timeout.unwrap_or(DEFAULT_READ_TIMEOUT_SECS))?);
    let (digests, huge_pages) = (s.verify_peer_chunks.unwrap_or(true), s.cache_huge_pages.unwrap_or(true));
    Ok(CacheConfig { dir, size, chunk_size, readahead_budget, read_timeout, digests, huge_pages })
}

fn resolve_peers(s: &Settings) -> Result<PeerConfig, ConfigError> {
    let listen = match &s.listen {
        Some(l) => {
            Some(l.parse::<SocketAddr>().map_err(|_| ConfigError::Invalid(format!("--listen {l:?} is not an address like 0.0.0.0:7070")))?)
        }
        None => None,
    };
    let peers: Vec<String> = s.peers.iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect();
    for p in &peers {
        check_host_port("--peers", p)?;
    }
    if let Some(d) = &s.peer_dns {
        check_host_port("--peer-dns", d)?;
    }
    let tokens = s.peer_token_file.as_deref().map(read_peer_tokens).transpose()?.unwrap_or_default();
    let tls = match (&s.peer_tls_cert, &s.peer_tls_key, &s.peer_tls_ca) {
        (None, None, None) => None,
        (Some(c), Some(k), Some(a)) => {
            Some(PeerTls { cert: read_pem("--peer-tls-cert", c)?, key: read_pem("--peer-tls-key", k)?, ca: read_pem("--peer-tls-ca", a)? })
        }
        _ => return Err(ConfigError::Invalid("peer TLS needs all of --peer-tls-cert, --peer-tls-key and --peer-tls-ca".into())),
    };
    Ok(PeerConfig { listen, peers, dns: s.peer_dns.clone(), tokens, tls })
}

fn read_pem(flag: &str, p: &std::path::Path) -> Result<Vec<u8>, ConfigError> {
    let b = std::fs::read(p).map_err(|source| ConfigError::Read { what: flag.into(), path: p.into(), source })?;
    if !String::from_utf8_lossy(&b).contains("-----BEGIN") {
        return Err(ConfigError::Invalid(format!("{flag} {} is not a PEM file", p.display())));
    }
    Ok(b)
}

fn resolve_fuse(s: &Settings) -> Result<FuseConfig, ConfigError> {
    let mountpoint = s.mountpoint.clone().ok_or(ConfigError::Missing("--mountpoint"))?;
    if mountpoint.is_file() {
        return Err(ConfigError::Invalid(format!("--mountpoint {} is a file, not a directory", mountpoint.display())));
    }
    let threads = positive("fuse-threads", s.fuse_threads.unwrap_or(DEFAULT_FUSE_THREADS) as u64)? as usize;
    Ok(FuseConfig { mountpoint, allow_other: s.allow_other, threads, passthrough: !s.no_passthrough && s.passthrough.unwrap_or(true) })
}

fn resolve_admin(s: &Settings) -> Result<AdminConfig, ConfigError> {
    let a = s.admin.as_deref().unwrap_or(DEFAULT_ADMIN);
    let addr = admin_addr(a).map_err(ConfigError::Invalid)?;
    let token = s.admin_token_file.as_deref().map(|p| read_token("--admin-token-file", p)).transpose()?;
    Ok(AdminConfig { addr, token })
}

fn resolve_preempt(s: &Settings) -> Result<PreemptConfig, ConfigError> {
    let metadata_endpoint = s.metadata_endpoint.as_deref().map(|e| check_url("--metadata-endpoint", e)).transpose()?;
    let poll_interval = match s.metadata_poll_interval {
        Some(v) if v.is_finite() && v > 0.0 && v <= 3600.0 => Some(Duration::from_secs_f64(v)),
        Some(v) => return Err(ConfigError::Invalid(format!("--metadata-poll-interval {v}: give seconds between 0 and 3600"))),
        None => None,
    };
    let webhooks = s.scheduler_webhook.iter().map(|w| check_url("--scheduler-webhook", w)).collect::<Result<Vec<_>, _>>()?;
    let drain_timeout = s.drain_timeout.unwrap_or(DEFAULT_DRAIN_TIMEOUT_SECS);
    if drain_timeout == 0 || drain_timeout > 3600 {
        return Err(ConfigError::Invalid(format!("--drain-timeout {drain_timeout}: give seconds between 1 and 3600")));
    }
    Ok(PreemptConfig {
        provider: s.preemption_provider.unwrap_or(Provider::None),
        metadata_endpoint,
        poll_interval,
        drain_on_rebalance: s.drain_on_rebalance,
        azure_acknowledge: s.azure_acknowledge,
        webhooks,
        drain_hook: s.drain_hook.clone().filter(|h| !h.trim().is_empty()),
        drain_timeout: Duration::from_secs(drain_timeout),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(src: &str) -> Settings {
        Settings {
            source: Some(src.into()),
            mountpoint: Some("/tmp/x-cachefs-test".into()),
            cache_size: Some("64MiB".into()),
            ..Default::default()
        }
    }

    #[test]
    fn preemption_settings() {
        let c = resolve_mount(args("/tmp")).unwrap();
        assert_eq!(c.preempt.provider, Provider::None, "the default must never probe metadata addresses");
        let mut a = args("/tmp");
        a.preemption_provider = Some(Provider::Aws);
        a.metadata_endpoint = Some("http://127.0.0.1:9".into());
        a.metadata_poll_interval = Some(0.5);
        a.scheduler_webhook = vec!["http://127.0.0.1:8/a".into(), "https://x.example/b".into()];
        let c = resolve_mount(a).unwrap();
        assert_eq!(c.preempt.provider, Provider::Aws);
        assert_eq!(c.preempt.poll_interval, Some(Duration::from_millis(500)));
        assert_eq!(c.preempt.webhooks.len(), 2);
        for (f, v) in [("endpoint", "169.254.169.254"), ("webhook", "ftp://x/y"), ("interval", "0")] {
            let mut a = args("/tmp");
            match f {
                "endpoint" => a.metadata_endpoint = Some(v.into()),
                "webhook" => a.scheduler_webhook = vec![v.into()],
                _ => a.metadata_poll_interval = Some(0.0),
            }
            let e = crate::error::report(&resolve_mount(a).unwrap_err());
            assert!(!e.contains('\n') && e.starts_with("--"), "{e}");
        }
    }

    #[test]
    fn chunk_size_range() {
        let mut a = args("/tmp");
        a.chunk_size = Some("512KiB".into());
        assert!(resolve_mount(a).unwrap_err().to_string().contains("out of range"));
        let mut a = args("/tmp");
        a.chunk_size = Some("16MiB".into());
        assert_eq!(resolve_mount(a).unwrap().cache.chunk_size, 16 << 20);
    }

    #[test]
    fn file_config_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "source = \"/data\"\nmountpoint = \"/mnt/m\"\ncache-size = \"32MiB\"\nchunk_size = \"4MiB\"\n[source_options]\nregion = \"x\"\n").unwrap();
        let a = Settings { config: Some(p.clone()), chunk_size: Some("2MiB".into()), ..Default::default() };
        let c = resolve_mount(a).unwrap();
        assert_eq!(c.source.url, "/data");
        assert_eq!(c.cache.size, 32 << 20);
        assert_eq!(c.cache.chunk_size, 2 << 20);
        assert_eq!(c.source.options, vec![("region".to_string(), "x".to_string())]);
        std::fs::write(&p, "sauce = 1\n").unwrap();
        let e = crate::error::report(&resolve_mount(Settings { config: Some(p), ..Default::default() }).unwrap_err());
        assert!(e.contains("unknown field") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn rejects_huge_cache() {
        let mut a = args("/tmp");
        a.cache_size = Some("100TiB".into());
        assert!(resolve_mount(a).unwrap_err().to_string().contains("available memory"));
    }
}

#[cfg(test)]
mod example_config {
    use super::*;

    /// `systemd/cachefs.toml` parses and every key in it is a real setting.
    #[test]
    fn example_config_parses() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("cachefs.toml");
        let text = include_str!("../systemd/cachefs.toml").replace("/mnt/models", &dir.path().join("mnt").display().to_string());
        std::fs::write(&p, text).unwrap();
        let c = resolve_mount(Settings { config: Some(p), cache_size: Some("64MiB".into()), ..Default::default() }).unwrap();
        assert_eq!(c.source.url, "s3://my-models/llama-3-8b");
        assert_eq!(c.cache.chunk_size, 8 << 20);
        assert!(c.fuse.allow_other);
        assert_eq!(c.cache.readahead_budget, 256 << 20);
        assert!(c.fuse.passthrough);
        assert_eq!(c.preempt.provider, Provider::Auto);
        // The commented-out settings are real settings too.
        let uncommented: String = include_str!("../systemd/cachefs.toml")
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if rest.split_once(" = ").is_some_and(|(k, _)| !k.contains(' ')) => rest,
                _ => l,
            })
            .collect::<Vec<_>>()
            .join("\n")
            .replace("/mnt/models", &dir.path().join("mnt").display().to_string());
        let table: toml::Table = toml::from_str(&uncommented).unwrap();
        // deny_unknown_fields: every key, commented out or not, is a real setting.
        let parsed: Result<Settings, _> = table.try_into();
        assert!(parsed.is_ok(), "{parsed:?}");
    }
}

#[cfg(test)]
mod peer_tokens {
    use super::*;

    /// One or two tokens (current, next); blank lines are nothing; three, or a space, is an error.
    #[test]
    fn a_token_file_holds_one_or_two_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let read = |text: &str| {
            let p = dir.path().join("t");
            std::fs::write(&p, text).unwrap();
            read_peer_tokens(&p).map_err(|e| e.to_string())
        };
        assert_eq!(read("cur\n").unwrap(), vec!["cur"]);
        assert_eq!(read("cur\n\nnext\n").unwrap(), vec!["cur", "next"]);
        for bad in ["", "\n\n", "a\nb\nc\n", "two words\n"] {
            let e = read(bad).unwrap_err();
            assert!(e.contains("one or two tokens") && !e.contains('\n'), "{bad:?}: {e}");
        }
    }
}
