//! The only place flags, the TOML config file and the environment are read. Produces a validated
//! [`MountConfig`]; every validation failure is a one-line message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Deserialize;

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
pub enum Command {
    /// Mount the source read-only at the mountpoint and serve until SIGINT/SIGTERM.
    Mount(MountArgs),
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
        /// File holding the agent's admin token (its --admin-token-file)
        #[arg(long, env = "CACHEFS_ADMIN_TOKEN_FILE")]
        admin_token_file: Option<PathBuf>,
    },
}

/// Parse an admin address given to `status` or `warm`.
pub fn admin_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| format!("--admin {s:?} is not an address like 127.0.0.1:7071"))
}

/// Flags of `cachefs mount`. Every one may also be set in the `--config` TOML file under the
/// same name (`cache-size` or `cache_size`); flags win.
#[derive(Debug, Default, Args)]
pub struct MountArgs {
    /// Origin URL: file:///dir or a bare path, s3://bucket/prefix, gs://, az://, http(s)://
    #[arg(long)]
    pub source: Option<String>,
    /// Directory to mount on (created if missing).
    #[arg(long)]
    pub mountpoint: Option<PathBuf>,
    /// TOML file with the same settings; flags win.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Where the memory tier keeps its files (should be tmpfs) [default: /dev/shm/cachefs]
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Memory budget for cached chunks, e.g. 16GiB [default: half the available memory]
    #[arg(long)]
    pub cache_size: Option<String>,
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
    #[arg(long = "source-option", value_name = "KEY=VALUE")]
    pub source_option: Vec<String>,
    /// Let users other than the mounting one read the mount (needed for containers).
    #[arg(long)]
    pub allow_other: bool,
    /// Seconds between re-listings of the source [default: 60]
    #[arg(long)]
    pub catalog_ttl: Option<u64>,
    /// Seconds a read may take before it fails with EIO [default: 30]
    #[arg(long)]
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
    /// Log format: plain or json [default: plain]
    #[arg(long)]
    pub log_format: Option<String>,
    /// Serve chunks to peers on this address (gRPC), e.g. 0.0.0.0:7070 [default: off]
    #[arg(long)]
    pub listen: Option<String>,
    /// Peer agents, HOST:PORT,... (this agent's own address is recognised and skipped)
    #[arg(long, value_delimiter = ',')]
    pub peers: Vec<String>,
    /// A DNS name whose A/AAAA records are the peers, NAME:PORT (re-resolved every 10 s)
    #[arg(long)]
    pub peer_dns: Option<String>,
    /// File holding a shared token peers must present (sent as gRPC metadata)
    #[arg(long)]
    pub peer_token_file: Option<PathBuf>,
    /// Never open files with FUSE passthrough (serve local hits through normal FUSE replies)
    #[arg(long)]
    pub no_passthrough: bool,
    /// PEM certificate this agent presents to peers (mutual TLS; with --peer-tls-key and --peer-tls-ca)
    #[arg(long)]
    pub peer_tls_cert: Option<PathBuf>,
    /// PEM private key of --peer-tls-cert
    #[arg(long)]
    pub peer_tls_key: Option<PathBuf>,
    /// PEM CA that peers' certificates must chain to (both directions)
    #[arg(long)]
    pub peer_tls_ca: Option<PathBuf>,
    /// Cloud whose metadata service is watched for preemption notices: auto, aliyun, aws, gcp,
    /// azure or none [default: none]
    #[arg(long)]
    pub preemption_provider: Option<String>,
    /// Base URL (scheme and host) of the metadata service, replacing the provider's own
    #[arg(long, value_name = "URL")]
    pub metadata_endpoint: Option<String>,
    /// Seconds between metadata polls, may be fractional [default: aws 2, aliyun 2, azure 1; gcp long-polls]
    #[arg(long, value_name = "SECS")]
    pub metadata_poll_interval: Option<f64>,
    /// URL that receives drain events as JSON POSTs; repeatable
    #[arg(long = "scheduler-webhook", value_name = "URL")]
    pub scheduler_webhook: Vec<String>,
    /// Command run with `sh -c` on each drain event, the event in CACHEFS_* environment variables
    #[arg(long, value_name = "CMD")]
    pub drain_hook: Option<String>,
    /// Seconds a drain started by `cachefs drain` or SIGTERM may wait for peer transfers [default: 30]
    #[arg(long, value_name = "SECS")]
    pub drain_timeout: Option<u64>,
    /// Drain on an AWS rebalance recommendation too (by default it is only reported)
    #[arg(long)]
    pub drain_on_rebalance: bool,
    /// Acknowledge Azure scheduled events (StartRequests) once drained, so Azure proceeds early
    #[arg(long)]
    pub azure_acknowledge: bool,
}

/// The `--config` file: same names as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    source: Option<String>,
    mountpoint: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    cache_size: Option<String>,
    chunk_size: Option<String>,
    admin: Option<String>,
    admin_token_file: Option<PathBuf>,
    source_options: Option<BTreeMap<String, String>>,
    allow_other: Option<bool>,
    catalog_ttl: Option<u64>,
    read_timeout: Option<u64>,
    origin_concurrency: Option<usize>,
    readahead_budget: Option<String>,
    fuse_threads: Option<usize>,
    log_format: Option<String>,
    listen: Option<String>,
    peers: Option<Vec<String>>,
    peer_dns: Option<String>,
    peer_token_file: Option<PathBuf>,
    peer_tls_cert: Option<PathBuf>,
    peer_tls_key: Option<PathBuf>,
    peer_tls_ca: Option<PathBuf>,
    passthrough: Option<bool>,
    preemption_provider: Option<String>,
    metadata_endpoint: Option<String>,
    metadata_poll_interval: Option<f64>,
    scheduler_webhook: Option<Vec<String>>,
    drain_hook: Option<String>,
    drain_timeout: Option<u64>,
    drain_on_rebalance: Option<bool>,
    azure_acknowledge: Option<bool>,
}

/// PEM material for mutual TLS between peers.
#[derive(Debug, Clone)]
pub struct PeerTls {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

/// A validated mount configuration.
#[derive(Debug, Clone)]
pub struct MountConfig {
    pub source: String,
    pub mountpoint: PathBuf,
    pub cache_dir: PathBuf,
    pub cache_size: u64,
    pub chunk_size: u64,
    pub admin: SocketAddr,
    /// The token admin POSTs must present (read from `--admin-token-file`).
    pub admin_token: Option<String>,
    pub source_options: Vec<(String, String)>,
    pub allow_other: bool,
    pub catalog_ttl: Duration,
    pub read_timeout: Duration,
    pub origin_concurrency: usize,
    pub readahead_budget: u64,
    pub fuse_threads: usize,
    pub log_format: LogFormat,
    /// gRPC address peers reach this agent on; None: peers disabled for serving.
    pub listen: Option<SocketAddr>,
    pub peers: Vec<String>,
    pub peer_dns: Option<String>,
    /// The shared peer token (read from `--peer-token-file`).
    pub peer_token: Option<String>,
    pub peer_tls: Option<PeerTls>,
    /// Open files whose chunks are all in memory with FUSE passthrough to their tmpfs file.
    pub passthrough: bool,
    /// Preemption watch, drain deadline and reporters.
    pub preempt: PreemptConfig,
}

impl MountConfig {
    /// The source as it may be shown (logs, `/status`, peers): credentials redacted.
    pub fn shown_source(&self) -> String {
        crate::redact::source(&self.source)
    }

    /// A configuration with defaults for everything but source, mountpoint, cache dir and size.
    pub fn new(source: &str, mountpoint: PathBuf, cache_dir: PathBuf, cache_size: u64) -> Self {
        MountConfig {
            source: source.to_string(),
            mountpoint,
            cache_dir,
            cache_size,
            chunk_size: DEFAULT_CHUNK_SIZE,
            admin: DEFAULT_ADMIN.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 7071))),
            admin_token: None,
            source_options: Vec::new(),
            allow_other: false,
            catalog_ttl: Duration::from_secs(DEFAULT_CATALOG_TTL_SECS),
            read_timeout: Duration::from_secs(DEFAULT_READ_TIMEOUT_SECS),
            origin_concurrency: DEFAULT_ORIGIN_CONCURRENCY,
            readahead_budget: DEFAULT_READAHEAD_BUDGET,
            fuse_threads: DEFAULT_FUSE_THREADS,
            log_format: LogFormat::Plain,
            listen: None,
            peers: Vec::new(),
            peer_dns: None,
            peer_token: None,
            peer_tls: None,
            passthrough: true,
            preempt: PreemptConfig::default(),
        }
    }
}

fn read_file_config(path: &std::path::Path) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read config {}: {e}", path.display()))?;
    file_config(&text, path)
}

/// Check the text of a config file named `name`: a one-line reason if it is not valid.
pub fn parse_file_config(text: &str, name: &str) -> Result<(), String> {
    file_config(text, std::path::Path::new(name)).map(|_| ())
}

fn file_config(text: &str, path: &std::path::Path) -> Result<FileConfig, String> {
    let table: toml::Table =
        toml::from_str(text).map_err(|e| format!("invalid config {}: {}", path.display(), one_line(&e.to_string())))?;
    // Accept the flag spelling (`cache-size`) as well as `cache_size`.
    let normalized: toml::Table = table.into_iter().map(|(k, v)| (k.replace('-', "_"), v)).collect();
    normalized.try_into().map_err(|e: toml::de::Error| format!("invalid config {}: {}", path.display(), one_line(&e.to_string())))
}

fn check_host_port(flag: &str, v: &str) -> Result<(), String> {
    match v.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0) => Ok(()),
        _ => Err(format!("{flag} {v:?} must be HOST:PORT")),
    }
}

/// An http(s) URL with a host.
fn check_url(flag: &str, v: &str) -> Result<String, String> {
    match url::Url::parse(v) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(v.to_string()),
        _ => Err(format!("{flag} {v:?} must be an http:// or https:// URL")),
    }
}

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A token file (`--peer-token-file`, `--admin-token-file`): one line of printable ASCII.
pub fn read_token(flag: &str, p: &std::path::Path) -> Result<String, String> {
    let t = std::fs::read_to_string(p).map_err(|e| format!("cannot read {flag} {}: {e}", p.display()))?;
    let t = t.trim().to_string();
    if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("{flag} {}: the token must be one line of printable ASCII", p.display()));
    }
    Ok(t)
}

/// Bytes the kernel reports as available (`MemAvailable`), if it can be read.
pub fn available_memory() -> Option<u64> {
    crate::memlimit::host_available(std::path::Path::new("/proc/meminfo"))
}

/// Merge flags over the config file over defaults, and validate.
pub fn resolve_mount(args: MountArgs) -> Result<MountConfig, String> {
    let file = match &args.config {
        Some(p) => read_file_config(p)?,
        None => FileConfig::default(),
    };
    let source = args.source.or(file.source).ok_or("missing --source (the origin URL or directory)")?;
    let mountpoint = args.mountpoint.or(file.mountpoint).ok_or("missing --mountpoint")?;
    let cache_dir = args.cache_dir.or(file.cache_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_CACHE_DIR));

    let limits = crate::memlimit::Limits::gather(&cache_dir);
    let cache_size = match args.cache_size.or(file.cache_size).filter(|s| s.trim() != "auto") {
        Some(s) => {
            let size = parse_size(&s).map_err(|e| format!("--cache-size: {e}"))?;
            limits.check(size)?;
            size
        }
        None => limits.default_cache_size().ok_or("cannot read MemAvailable from /proc/meminfo: set --cache-size")?,
    };
    let chunk_size = match args.chunk_size.or(file.chunk_size) {
        Some(s) => parse_size(&s).map_err(|e| format!("--chunk-size: {e}"))?,
        None => DEFAULT_CHUNK_SIZE,
    };
    if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(format!("--chunk-size {} is out of range: it must be between 1MiB and 64MiB", format_size(chunk_size)));
    }
    let admin_s = args.admin.or(file.admin).unwrap_or_else(|| DEFAULT_ADMIN.to_string());
    let admin: SocketAddr = admin_s.parse().map_err(|_| format!("--admin {admin_s:?} is not an address like 127.0.0.1:7071"))?;

    let mut source_options: Vec<(String, String)> = file.source_options.unwrap_or_default().into_iter().collect();
    for kv in &args.source_option {
        let (k, v) = kv.split_once('=').ok_or_else(|| format!("--source-option {kv:?} must be KEY=VALUE"))?;
        source_options.retain(|(ek, _)| ek != k);
        source_options.push((k.trim().to_string(), v.to_string()));
    }
    let readahead_budget = match args.readahead_budget.or(file.readahead_budget) {
        Some(s) => parse_size(&s).map_err(|e| format!("--readahead-budget: {e}"))?,
        None => DEFAULT_READAHEAD_BUDGET,
    };
    let log_format = match args.log_format.or(file.log_format).as_deref() {
        None | Some("plain") => LogFormat::Plain,
        Some("json") => LogFormat::Json,
        Some(other) => return Err(format!("--log-format {other:?}: use plain or json")),
    };
    let listen = match args.listen.or(file.listen) {
        Some(l) => Some(l.parse::<SocketAddr>().map_err(|_| format!("--listen {l:?} is not an address like 0.0.0.0:7070"))?),
        None => None,
    };
    let peers: Vec<String> = if args.peers.is_empty() { file.peers.unwrap_or_default() } else { args.peers };
    let peers: Vec<String> = peers.into_iter().map(|p| p.trim().to_string()).filter(|p| !p.is_empty()).collect();
    for p in &peers {
        check_host_port("--peers", p)?;
    }
    let peer_dns = args.peer_dns.or(file.peer_dns);
    if let Some(d) = &peer_dns {
        check_host_port("--peer-dns", d)?;
    }
    let peer_token = args.peer_token_file.or(file.peer_token_file).map(|p| read_token("--peer-token-file", &p)).transpose()?;
    let admin_token = args.admin_token_file.or(file.admin_token_file).map(|p| read_token("--admin-token-file", &p)).transpose()?;
    let peer_tls =
        match (args.peer_tls_cert.or(file.peer_tls_cert), args.peer_tls_key.or(file.peer_tls_key), args.peer_tls_ca.or(file.peer_tls_ca)) {
            (None, None, None) => None,
            (Some(c), Some(k), Some(a)) => {
                let read = |flag: &str, p: &PathBuf| -> Result<Vec<u8>, String> {
                    let b = std::fs::read(p).map_err(|e| format!("cannot read {flag} {}: {e}", p.display()))?;
                    if !String::from_utf8_lossy(&b).contains("-----BEGIN") {
                        return Err(format!("{flag} {} is not a PEM file", p.display()));
                    }
                    Ok(b)
                };
                Some(PeerTls { cert: read("--peer-tls-cert", &c)?, key: read("--peer-tls-key", &k)?, ca: read("--peer-tls-ca", &a)? })
            }
            _ => return Err("peer TLS needs all of --peer-tls-cert, --peer-tls-key and --peer-tls-ca".into()),
        };
    let provider = Provider::parse(args.preemption_provider.or(file.preemption_provider).as_deref().unwrap_or("none"))?;
    let metadata_endpoint = match args.metadata_endpoint.or(file.metadata_endpoint) {
        Some(e) => Some(check_url("--metadata-endpoint", &e)?),
        None => None,
    };
    let poll_interval = match args.metadata_poll_interval.or(file.metadata_poll_interval) {
        Some(s) if s.is_finite() && s > 0.0 && s <= 3600.0 => Some(Duration::from_secs_f64(s)),
        Some(s) => return Err(format!("--metadata-poll-interval {s}: give seconds between 0 and 3600")),
        None => None,
    };
    let webhooks = if args.scheduler_webhook.is_empty() { file.scheduler_webhook.unwrap_or_default() } else { args.scheduler_webhook };
    let webhooks = webhooks.iter().map(|w| check_url("--scheduler-webhook", w)).collect::<Result<Vec<_>, _>>()?;
    let drain_hook = args.drain_hook.or(file.drain_hook).filter(|h| !h.trim().is_empty());
    let drain_timeout = args.drain_timeout.or(file.drain_timeout).unwrap_or(30);
    if drain_timeout == 0 || drain_timeout > 3600 {
        return Err(format!("--drain-timeout {drain_timeout}: give seconds between 1 and 3600"));
    }
    let preempt = PreemptConfig {
        provider,
        metadata_endpoint,
        poll_interval,
        drain_on_rebalance: args.drain_on_rebalance || file.drain_on_rebalance.unwrap_or(false),
        azure_acknowledge: args.azure_acknowledge || file.azure_acknowledge.unwrap_or(false),
        webhooks,
        drain_hook,
        drain_timeout: Duration::from_secs(drain_timeout),
    };
    let positive = |name: &str, v: u64| if v == 0 { Err(format!("--{name} must be at least 1")) } else { Ok(v) };
    let cfg = MountConfig {
        source,
        mountpoint,
        cache_dir,
        cache_size,
        chunk_size,
        admin,
        admin_token,
        source_options,
        allow_other: args.allow_other || file.allow_other.unwrap_or(false),
        catalog_ttl: Duration::from_secs(positive(
            "catalog-ttl",
            args.catalog_ttl.or(file.catalog_ttl).unwrap_or(DEFAULT_CATALOG_TTL_SECS),
        )?),
        read_timeout: Duration::from_secs(positive(
            "read-timeout",
            args.read_timeout.or(file.read_timeout).unwrap_or(DEFAULT_READ_TIMEOUT_SECS),
        )?),
        origin_concurrency: positive(
            "origin-concurrency",
            args.origin_concurrency.or(file.origin_concurrency).unwrap_or(DEFAULT_ORIGIN_CONCURRENCY) as u64,
        )? as usize,
        readahead_budget,
        fuse_threads: positive("fuse-threads", args.fuse_threads.or(file.fuse_threads).unwrap_or(DEFAULT_FUSE_THREADS) as u64)? as usize,
        log_format,
        listen,
        peers,
        peer_dns,
        peer_token,
        peer_tls,
        passthrough: !args.no_passthrough && file.passthrough.unwrap_or(true),
        preempt,
    };
    if cfg.mountpoint.is_file() {
        return Err(format!("--mountpoint {} is a file, not a directory", cfg.mountpoint.display()));
    }
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(src: &str) -> MountArgs {
        MountArgs {
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
        a.preemption_provider = Some("aws".into());
        a.metadata_endpoint = Some("http://127.0.0.1:9".into());
        a.metadata_poll_interval = Some(0.5);
        a.scheduler_webhook = vec!["http://127.0.0.1:8/a".into(), "https://x.example/b".into()];
        let c = resolve_mount(a).unwrap();
        assert_eq!(c.preempt.provider, Provider::Aws);
        assert_eq!(c.preempt.poll_interval, Some(Duration::from_millis(500)));
        assert_eq!(c.preempt.webhooks.len(), 2);
        for (f, v) in [("provider", "ibm"), ("endpoint", "169.254.169.254"), ("webhook", "ftp://x/y"), ("interval", "0")] {
            let mut a = args("/tmp");
            match f {
                "provider" => a.preemption_provider = Some(v.into()),
                "endpoint" => a.metadata_endpoint = Some(v.into()),
                "webhook" => a.scheduler_webhook = vec![v.into()],
                _ => a.metadata_poll_interval = Some(0.0),
            }
            let e = resolve_mount(a).unwrap_err();
            assert!(!e.contains('\n') && e.starts_with("--"), "{e}");
        }
    }

    #[test]
    fn chunk_size_range() {
        let mut a = args("/tmp");
        a.chunk_size = Some("512KiB".into());
        assert!(resolve_mount(a).unwrap_err().contains("out of range"));
        let mut a = args("/tmp");
        a.chunk_size = Some("16MiB".into());
        assert_eq!(resolve_mount(a).unwrap().chunk_size, 16 << 20);
    }

    #[test]
    fn file_config_and_flags_win() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "source = \"/data\"\nmountpoint = \"/mnt/m\"\ncache-size = \"32MiB\"\nchunk_size = \"4MiB\"\n[source_options]\nregion = \"x\"\n").unwrap();
        let a = MountArgs { config: Some(p.clone()), chunk_size: Some("2MiB".into()), ..Default::default() };
        let c = resolve_mount(a).unwrap();
        assert_eq!(c.source, "/data");
        assert_eq!(c.cache_size, 32 << 20);
        assert_eq!(c.chunk_size, 2 << 20);
        assert_eq!(c.source_options, vec![("region".to_string(), "x".to_string())]);
        std::fs::write(&p, "sauce = 1\n").unwrap();
        let e = resolve_mount(MountArgs { config: Some(p), ..Default::default() }).unwrap_err();
        assert!(e.contains("unknown field") && !e.contains('\n'), "{e}");
    }

    #[test]
    fn rejects_huge_cache() {
        let mut a = args("/tmp");
        a.cache_size = Some("100TiB".into());
        assert!(resolve_mount(a).unwrap_err().contains("available memory"));
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
        let c = resolve_mount(MountArgs { config: Some(p), cache_size: Some("64MiB".into()), ..Default::default() }).unwrap();
        assert_eq!(c.source, "s3://my-models/llama-3-8b");
        assert_eq!(c.chunk_size, 8 << 20);
        assert!(c.allow_other);
        assert_eq!(c.readahead_budget, 256 << 20);
        assert!(c.passthrough);
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
        let parsed: Result<FileConfig, _> = table.try_into();
        assert!(parsed.is_ok(), "{parsed:?}");
    }
}
