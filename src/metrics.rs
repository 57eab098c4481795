//! Every metric the agent exports, by its contract name (docs/ARCHITECTURE.md). Counters are cheap atomics
//! shared by all modules; `encode` renders the Prometheus text format for `/metrics`.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Which tier supplied bytes to a read.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
pub enum Tier {
    memory,
    peer,
    origin,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TierLabel {
    pub tier: Tier,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FuseErrorLabel {
    pub op: &'static str,
    pub errno: i32,
}

/// Which way handed-off bytes went.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Direction {
    sent,
    received,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: Direction,
}

/// A peer message that carries no chunk bytes.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ControlKind {
    hello,
    inventory,
    drain,
    handoff,
    lookup,
    announce,
    gossip,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ControlLabel {
    pub kind: ControlKind,
    pub direction: Direction,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PeerLabel {
    pub peer: String,
}

/// Contract names as exported (prometheus-client appends `_total` to counters).
pub mod names {
    pub const READ_BYTES: &str = "cachefs_read_bytes_total";
    pub const ORIGIN_BYTES: &str = "cachefs_origin_bytes_total";
    pub const ORIGIN_REQUESTS: &str = "cachefs_origin_requests_total";
    pub const ORIGIN_ERRORS: &str = "cachefs_origin_errors_total";
    pub const PEER_SENT_BYTES: &str = "cachefs_peer_sent_bytes_total";
    pub const PEER_RECEIVED_BYTES: &str = "cachefs_peer_received_bytes_total";
    pub const CACHE_BYTES: &str = "cachefs_cache_bytes";
    pub const CACHE_CAPACITY_BYTES: &str = "cachefs_cache_capacity_bytes";
    pub const EVICTIONS: &str = "cachefs_evictions_total";
    pub const DRAIN_STATE: &str = "cachefs_drain_state";
    pub const READY: &str = "cachefs_ready";
    pub const FUSE_READ_REQUESTS: &str = "cachefs_fuse_read_requests_total";
    pub const READ_ERRORS: &str = "cachefs_read_errors_total";
    pub const FUSE_ERRORS: &str = "cachefs_fuse_errors_total";
    pub const PASSTHROUGH_OPENS: &str = "cachefs_passthrough_opens_total";
    pub const PASSTHROUGH_OPEN_BYTES: &str = "cachefs_passthrough_open_bytes_total";
    pub const PEER_ERRORS: &str = "cachefs_peer_errors_total";
    pub const PEER_CHECKSUM_ERRORS: &str = "cachefs_peer_checksum_errors_total";
    pub const VERIFY_FAILURES: &str = "cachefs_verify_failures_total";
    pub const UNVERIFIED_FILES: &str = "cachefs_unverified_files_total";
    pub const PREEMPTION_NOTICES: &str = "cachefs_preemption_notices_total";
    pub const METADATA_ERRORS: &str = "cachefs_metadata_errors_total";
    pub const WEBHOOK_DELIVERIES: &str = "cachefs_webhook_deliveries_total";
    pub const WEBHOOK_FAILURES: &str = "cachefs_webhook_failures_total";
    pub const HANDOFF_BYTES: &str = "cachefs_handoff_bytes_total";
    pub const HANDOFF_LOST_BYTES: &str = "cachefs_handoff_lost_bytes";
    pub const CONTROL_MESSAGES: &str = "cachefs_control_messages_total";
    pub const PEER_AUTH_FAILURES: &str = "cachefs_peer_auth_failures_total";
    pub const PAGE_INVALIDATIONS: &str = "cachefs_page_invalidations_total";
    pub const PEER_UNVOUCHED_CHUNKS: &str = "cachefs_peer_unvouched_chunks_total";
    pub const PEER_DIGEST_MISMATCHES: &str = "cachefs_peer_digest_mismatches_total";
}

/// The agent's metrics. Clone-free: share it behind an `Arc`.
pub struct Metrics {
    registry: Registry,
    pub read_bytes: Family<TierLabel, Counter>,
    pub origin_bytes: Counter,
    pub origin_requests: Counter,
    pub origin_errors: Counter,
    pub peer_sent_bytes: Counter,
    pub peer_received_bytes: Counter,
    pub cache_bytes: Gauge,
    pub cache_capacity_bytes: Gauge,
    pub evictions: Counter,
    /// 1 when `/readyz` answers 200 (set as `/metrics` is read).
    pub ready: Gauge,
    pub drain_state: Gauge,
    pub fuse_read_requests: Counter,
    pub read_errors: Counter,
    pub fuse_errors: Family<FuseErrorLabel, Counter>,
    pub peer_errors: Family<PeerLabel, Counter>,
    pub peer_checksum_errors: Counter,
    pub verify_failures: Counter,
    /// Files with peer bytes served that no whole-file check can cover.
    pub unverified_files: Counter,
    pub passthrough_opens: Counter,
    /// Sizes of the files opened with passthrough (their reads never reach the agent).
    pub passthrough_open_bytes: Counter,
    pub preemption_notices: Counter,
    pub metadata_errors: Counter,
    pub webhook_deliveries: Counter,
    pub webhook_failures: Counter,
    pub handoff_bytes: Family<DirectionLabel, Counter>,
    pub handoff_lost_bytes: Gauge,
    /// Peer requests without chunk bytes (Hello, Inventory, Drain, Handoff), sent or answered.
    pub control_messages: Family<ControlLabel, Counter>,
    /// Peer handshakes that failed, either side, by reason.
    pub peer_auth_failures: Family<ReasonLabel, Counter>,
    /// Files whose kernel-cached pages were dropped because bytes served from them failed a check.
    pub page_invalidations: Counter,
    /// Chunks taken from a peer with no other holder's digest to check them against.
    pub peer_unvouched_chunks: Counter,
    /// Chunks from a peer whose BLAKE3 differs from the digest another holder vouches for.
    pub peer_digest_mismatches: Counter,
}

/// The metrics of peer authentication and verification (a part of [`Metrics::new`]).
fn register_trust(registry: &mut Registry, m: &Metrics) {
    use names::*;
    registry.register(
        base(PEER_AUTH_FAILURES),
        "Peer connection handshakes that failed (a peer without the fleet token, or none offered), by reason",
        m.peer_auth_failures.clone(),
    );
    registry.register(
        base(PAGE_INVALIDATIONS),
        "Files whose pages in the kernel's cache were dropped because bytes served from them failed verification",
        m.page_invalidations.clone(),
    );
    registry.register(
        base(PEER_UNVOUCHED_CHUNKS),
        "Chunks taken from a peer that no other holder's digest could check before use",
        m.peer_unvouched_chunks.clone(),
    );
    registry.register(
        base(PEER_DIGEST_MISMATCHES),
        "Chunks from a peer whose BLAKE3 differs from the digest another holder vouches for (dropped before use)",
        m.peer_digest_mismatches.clone(),
    );
}

/// Every label value known up front is exported from the start, at 0.
fn seed_labels(m: &Metrics) {
    for direction in [Direction::sent, Direction::received] {
        let _ = m.handoff_bytes.get_or_create(&DirectionLabel { direction });
        for kind in [
            ControlKind::hello,
            ControlKind::inventory,
            ControlKind::drain,
            ControlKind::handoff,
            ControlKind::lookup,
            ControlKind::announce,
            ControlKind::gossip,
        ] {
            let _ = m.control_messages.get_or_create(&ControlLabel { kind, direction });
        }
    }
    for tier in [Tier::memory, Tier::peer, Tier::origin] {
        let _ = m.read_bytes.get_or_create(&TierLabel { tier });
    }
}

fn base(name: &str) -> &str {
    name.trim_start_matches("cachefs_").trim_end_matches("_total")
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric at zero, none registered yet.
    fn unregistered() -> Self {
        Metrics {
            read_bytes: Family::default(),
            origin_bytes: Counter::default(),
            origin_requests: Counter::default(),
            origin_errors: Counter::default(),
            peer_sent_bytes: Counter::default(),
            peer_received_bytes: Counter::default(),
            cache_bytes: Gauge::default(),
            cache_capacity_bytes: Gauge::default(),
            evictions: Counter::default(),
            ready: Gauge::default(),
            drain_state: Gauge::default(),
            fuse_read_requests: Counter::default(),
            read_errors: Counter::default(),
            fuse_errors: Family::default(),
            peer_errors: Family::default(),
            peer_checksum_errors: Counter::default(),
            verify_failures: Counter::default(),
            unverified_files: Counter::default(),
            passthrough_opens: Counter::default(),
            passthrough_open_bytes: Counter::default(),
            preemption_notices: Counter::default(),
            metadata_errors: Counter::default(),
            webhook_deliveries: Counter::default(),
            webhook_failures: Counter::default(),
            handoff_bytes: Family::default(),
            handoff_lost_bytes: Gauge::default(),
            control_messages: Family::default(),
            peer_auth_failures: Family::default(),
            page_invalidations: Counter::default(),
            peer_unvouched_chunks: Counter::default(),
            peer_digest_mismatches: Counter::default(),
            registry: Registry::default(),
        }
    }

    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("cachefs");
        let m = Self::unregistered();
        use names::*;
        registry.register(base(READ_BYTES), "Bytes returned to FUSE reads, by the tier that supplied them", m.read_bytes.clone());
        registry.register(base(ORIGIN_BYTES), "Bytes fetched from the origin, including fills for peers", m.origin_bytes.clone());
        registry.register(base(ORIGIN_REQUESTS), "Requests sent to the origin", m.origin_requests.clone());
        registry.register(base(ORIGIN_ERRORS), "Origin requests that failed after retries", m.origin_errors.clone());
        registry.register(base(PEER_SENT_BYTES), "Chunk bytes sent to peers", m.peer_sent_bytes.clone());
        registry.register(base(PEER_RECEIVED_BYTES), "Chunk bytes received from peers", m.peer_received_bytes.clone());
        registry.register(base(CACHE_BYTES), "Bytes of chunks held in the memory tier", m.cache_bytes.clone());
        registry.register(base(CACHE_CAPACITY_BYTES), "Memory tier budget", m.cache_capacity_bytes.clone());
        registry.register(base(EVICTIONS), "Chunks evicted from the memory tier", m.evictions.clone());
        registry.register(base(DRAIN_STATE), "0 serving, 1 draining, 2 drained", m.drain_state.clone());
        registry.register(base(READY), "1 when mounted, serving and not draining (what /readyz answers 200 for)", m.ready.clone());
        registry.register(base(FUSE_READ_REQUESTS), "FUSE read requests answered by the agent", m.fuse_read_requests.clone());
        registry.register(base(READ_ERRORS), "FUSE reads answered with an error", m.read_errors.clone());
        registry.register(base(FUSE_ERRORS), "FUSE operations answered with an error, by operation and errno", m.fuse_errors.clone());
        registry.register(base(PASSTHROUGH_OPENS), "Opens answered with FUSE passthrough to the tmpfs file", m.passthrough_opens.clone());
        registry.register(
            base(PASSTHROUGH_OPEN_BYTES),
            "Sizes of the files opened with FUSE passthrough (the kernel reads them without the agent)",
            m.passthrough_open_bytes.clone(),
        );
        registry.register(base(PEER_ERRORS), "Failed requests to a peer, by peer address", m.peer_errors.clone());
        registry.register(base(PEER_CHECKSUM_ERRORS), "Chunks from peers rejected by their checksum", m.peer_checksum_errors.clone());
        registry.register(
            base(VERIFY_FAILURES),
            "Files assembled from peers that failed the origin's whole-object checksum",
            m.verify_failures.clone(),
        );
        registry.register(
            base(UNVERIFIED_FILES),
            "Files with bytes from peers served that cannot be checked against the origin's whole-object checksum",
            m.unverified_files.clone(),
        );
        registry.register(
            base(PREEMPTION_NOTICES),
            "Termination notices seen from the instance metadata service",
            m.preemption_notices.clone(),
        );
        registry.register(base(METADATA_ERRORS), "Metadata requests that failed or answered a malformed body", m.metadata_errors.clone());
        registry.register(base(WEBHOOK_DELIVERIES), "Scheduler webhook events delivered (2xx)", m.webhook_deliveries.clone());
        registry.register(base(WEBHOOK_FAILURES), "Scheduler webhook events given up on at their deadline", m.webhook_failures.clone());
        registry.register(base(HANDOFF_BYTES), "Chunk bytes handed off before a preemption, sent or received", m.handoff_bytes.clone());
        registry.register(
            base(HANDOFF_LOST_BYTES),
            "Bytes held by no other agent that the last drain could not hand off",
            m.handoff_lost_bytes.clone(),
        );
        registry.register(
            base(CONTROL_MESSAGES),
            "Peer requests that carry no chunk bytes, by kind, sent or received",
            m.control_messages.clone(),
        );
        register_trust(&mut registry, &m);
        seed_labels(&m);
        Metrics { registry, ..m }
    }

    pub fn add_read(&self, tier: Tier, bytes: u64) {
        self.read_bytes.get_or_create(&TierLabel { tier }).inc_by(bytes);
    }

    pub fn add_fuse_error(&self, op: &'static str, errno: i32) {
        self.fuse_errors.get_or_create(&FuseErrorLabel { op, errno }).inc();
    }

    pub fn add_handoff(&self, direction: Direction, bytes: u64) {
        self.handoff_bytes.get_or_create(&DirectionLabel { direction }).inc_by(bytes);
    }

    /// One control message of `kind` went `direction`.
    pub fn add_control(&self, kind: ControlKind, direction: Direction) {
        self.control_messages.get_or_create(&ControlLabel { kind, direction }).inc();
    }

    /// A peer handshake failed for `reason`.
    pub fn peer_auth_failure(&self, reason: &'static str) {
        self.peer_auth_failures.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub fn read_bytes_of(&self, tier: Tier) -> u64 {
        self.read_bytes.get_or_create(&TierLabel { tier }).get()
    }

    /// OpenMetrics text exposition (what Prometheus asks for).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// The Prometheus text format 0.0.4, for clients that do not ask for OpenMetrics (curl,
    /// `promtool check metrics`, older scrapers).
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }
}

/// Content type of [`Metrics::encode`].
pub const OPENMETRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Content type of [`Metrics::encode_text`].
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics text as Prometheus text 0.0.4: a counter family's `# HELP`/`# TYPE` name gains
/// the `_total` its samples carry, `unknown` becomes `untyped`, and `# EOF` goes.
pub fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> =
        om.lines().filter_map(|l| l.strip_prefix("# TYPE ")).filter_map(|l| l.strip_suffix(" counter")).collect();
    let mut out = String::with_capacity(om.len());
    for line in om.lines().filter(|l| *l != "# EOF") {
        let meta = ["# HELP ", "# TYPE ", "# UNIT "].iter().find_map(|p| line.strip_prefix(p).map(|rest| (*p, rest)));
        match meta {
            Some(("# UNIT ", _)) => continue,
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) { format!("{name}_total") } else { name.to_string() };
                let tail = if prefix == "# TYPE " && tail == "unknown" { "untyped" } else { tail };
                out.push_str(&format!("{prefix}{name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn text_format_names_counters_with_their_total() {
        let m = super::Metrics::new();
        m.origin_bytes.inc_by(7);
        let text = m.encode_text();
        assert!(text.contains("# TYPE cachefs_origin_bytes_total counter\n"), "{text}");
        assert!(text.contains("# HELP cachefs_origin_bytes_total "), "{text}");
        assert!(text.contains("cachefs_origin_bytes_total 7\n"), "{text}");
        assert!(text.contains("# TYPE cachefs_cache_bytes gauge\n"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn names_match_contract() {
        let m = super::Metrics::new();
        m.add_read(super::Tier::origin, 5);
        m.origin_bytes.inc_by(7);
        let text = m.encode();
        assert!(text.contains("cachefs_read_bytes_total{tier=\"origin\"} 5"), "{text}");
        assert!(text.contains("cachefs_origin_bytes_total 7"), "{text}");
        assert!(text.contains("cachefs_cache_capacity_bytes 0"), "{text}");
        assert!(text.contains("cachefs_drain_state 0"), "{text}");
        assert!(text.contains("cachefs_handoff_bytes_total{direction=\"sent\"} 0"), "{text}");
        assert!(text.contains("cachefs_handoff_lost_bytes 0"), "{text}");
        m.add_control(super::ControlKind::hello, super::Direction::sent);
        let text = m.encode();
        assert!(text.contains("cachefs_control_messages_total{kind=\"hello\",direction=\"sent\"} 1"), "{text}");
        assert!(text.contains("cachefs_control_messages_total{kind=\"inventory\",direction=\"received\"} 0"), "{text}");
    }
}
