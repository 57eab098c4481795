//! What operators install beside the binary, checked with the tools they would use: Kubernetes
//! manifests (`kubernetes-validate` for the supported versions, `yamllint`), Prometheus rules
//! (`promtool check rules`, `promtool test rules`), a live agent's `/metrics` (`promtool check
//! metrics`), and the Grafana dashboard and alerts naming only metrics an agent exports.
//! The tools are installed by `scripts/test.sh`; without them a test skips loudly, and under
//! `CI=true` fails.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

/// Kubernetes versions the manifests are validated against: upstream's supported releases
/// (1.35 to 1.37 in December 2026) and two more that clouds still run in extended support.
const K8S_VERSIONS: &[&str] = &["1.33.0", "1.34.0", "1.35.0", "1.36.0", "1.37.0"];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `name` on PATH or in Python's scripts directory; None (a loud skip, a failure under CI=true)
/// if missing.
fn tool(name: &str, test: &str) -> Option<PathBuf> {
    let scripts = Command::new("python3").args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"]).output().ok();
    let scripts = scripts.map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).chain(scripts).map(|d| d.join(name)).find(|p| p.is_file());
    if found.is_none() {
        skip(test, &format!("{name} not found (bash scripts/test.sh installs it)"));
    }
    found
}

fn manifests() -> Vec<PathBuf> {
    let dir = root().join("deploy/kubernetes");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).collect();
    v.retain(|p| p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml"));
    v.sort();
    v
}

#[test]
fn kubernetes_manifests_validate() {
    let (Some(lint), Some(validate)) =
        (tool("yamllint", "kubernetes_manifests_validate"), tool("kubernetes-validate", "kubernetes_manifests_validate"))
    else {
        return;
    };
    run_ok(Command::new(lint).arg("-c").arg(root().join("deploy/.yamllint.yaml")).arg("--strict").arg(root().join("deploy")));
    for v in K8S_VERSIONS {
        run_ok(Command::new(&validate).args(["--strict", "--quiet", "-k", v]).args(manifests()));
    }
    // The kustomization names every manifest, and only files that exist.
    let k = std::fs::read_to_string(root().join("deploy/kubernetes/kustomization.yaml")).unwrap();
    let listed: BTreeSet<String> =
        k.lines().filter_map(|l| l.trim().strip_prefix("- ")).filter(|l| l.ends_with(".yaml")).map(|l| l.trim().to_string()).collect();
    let present: BTreeSet<String> = manifests().iter().map(|p| p.file_name().unwrap().to_string_lossy().to_string()).collect();
    assert_eq!(listed, present, "kustomization.yaml resources vs the manifests in deploy/kubernetes");
}

/// The text of the `cachefs.toml` key of the ConfigMap (a YAML block scalar).
fn config_map_toml() -> String {
    let text = std::fs::read_to_string(root().join("deploy/kubernetes/configmap.yaml")).unwrap();
    let mut lines = text.lines().skip_while(|l| l.trim() != "cachefs.toml: |").skip(1);
    let first = lines.next().expect("cachefs.toml has a body");
    let indent = first.len() - first.trim_start().len();
    let body = std::iter::once(first).chain(lines.take_while(|l| l.trim().is_empty() || l.len() - l.trim_start().len() >= indent));
    body.map(|l| l.get(indent..).unwrap_or("")).collect::<Vec<_>>().join("\n")
}

#[test]
fn the_config_map_is_an_agent_config() {
    let toml = config_map_toml();
    assert!(toml.contains("peer_dns = \"cachefs-peers.cachefs.svc.cluster.local:7070\""), "{toml}");
    cachefs::config::parse_file_config(&toml, "configmap.yaml cachefs.toml").unwrap_or_else(|e| panic!("{}", cachefs::error::report(&e)));
    // The DaemonSet's drain, probes and token paths match what the config says.
    let ds = std::fs::read_to_string(root().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    for (config, daemonset) in [
        ("admin = \"0.0.0.0:7071\"", "containerPort: 7071"),
        ("listen = \"0.0.0.0:7070\"", "containerPort: 7070"),
        ("mountpoint = \"/mnt/models\"", "mountPath: /mnt/models"),
        ("cache_dir = \"/dev/shm/cachefs\"", "mountPath: /dev/shm/cachefs"),
        ("admin_token_file = \"/etc/cachefs/tokens/admin-token\"", "value: /etc/cachefs/tokens/admin-token"),
    ] {
        assert!(toml.contains(config) && ds.contains(daemonset), "{config} / {daemonset}");
    }
}

#[test]
fn alert_rules_pass_promtool() {
    let Some(promtool) = tool("promtool", "alert_rules_pass_promtool") else { return };
    let dir = root().join("deploy/prometheus");
    run_ok(Command::new(&promtool).args(["check", "rules", "alerts.yml"]).current_dir(&dir));
    let out = run_ok(Command::new(&promtool).args(["test", "rules", "alerts_test.yml"]).current_dir(&dir));
    assert!(out.contains("SUCCESS"), "{out}");
}

/// Every `cachefs_*` name in `text`.
fn metric_names_in(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("cachefs_") {
        let tail = &rest[i..];
        let end = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
        names.insert(tail[..end].to_string());
        rest = &tail[end..];
    }
    names
}

/// The sample names a live `/metrics` (text format) can carry: every family it describes
/// (families with no series yet still have their `# TYPE` line).
fn exported_names(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for l in metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut parts = l.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        names.insert(name.to_string());
        assert!(kind != "counter" || name.ends_with("_total"), "counter {name} without _total in the text format");
    }
    names
}

#[test]
fn live_metrics_pass_promtool_and_cover_the_dashboard_and_alerts() {
    if !fuse_available("live_metrics_pass_promtool_and_cover_the_dashboard_and_alerts") {
        return;
    }
    let Some(promtool) = tool("promtool", "live_metrics_pass_promtool_and_cover_the_dashboard_and_alerts") else { return };
    let src = tempfile::tempdir().unwrap();
    write_random(&src.path().join("m.bin"), 1 << 20, 181);
    let port = free_port().to_string();
    let a = Agent::start(&src.path().display().to_string(), &["--listen", &format!("127.0.0.1:{port}")]);
    assert_eq!(sha256_file(&a.path("m.bin")), sha256_file(&src.path().join("m.bin")));
    let (code, body) = http_get(a.admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    check_metrics_with_promtool(&promtool, &body);
    // Prometheus asks for OpenMetrics and gets it.
    let om = get_openmetrics(a.admin);
    assert!(om.contains("# TYPE cachefs_origin_bytes counter") && om.trim_end().ends_with("# EOF"), "{om}");

    let exported = exported_names(&body);
    let dashboard = std::fs::read_to_string(root().join("deploy/grafana/cachefs.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("the dashboard is JSON");
    let exprs: Vec<String> = json["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(String::from))
        .collect();
    assert!(exprs.len() >= 10, "{exprs:?}");
    let alerts = std::fs::read_to_string(root().join("deploy/prometheus/alerts.yml")).unwrap();
    for (what, used) in [("dashboard", metric_names_in(&exprs.join("\n"))), ("alerts.yml", metric_names_in(&alerts))] {
        let unknown: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
        assert!(unknown.is_empty(), "{what} uses metrics the agent does not export: {unknown:?}\nexported: {exported:?}");
    }
    // The dashboard shows the essentials the issue asks for.
    for needed in ["cachefs_read_bytes_total", "cachefs_origin_bytes_total", "cachefs_peer_sent_bytes_total", "cachefs_cache_bytes"] {
        assert!(exprs.iter().any(|e| e.contains(needed)), "dashboard lacks {needed}");
    }
    for needed in ["cachefs_evictions_total", "cachefs_drain_state", "cachefs_origin_errors_total"] {
        assert!(exprs.iter().any(|e| e.contains(needed)), "dashboard lacks {needed}");
    }
}

/// `GET /metrics` as Prometheus sends it (OpenMetrics first in Accept): the body.
fn get_openmetrics(admin: std::net::SocketAddr) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(admin).unwrap();
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
    write!(s, "GET /metrics HTTP/1.0\r\nHost: {admin}\r\nAccept: {accept}\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    assert!(text.to_ascii_lowercase().contains("content-type: application/openmetrics-text"), "{text}");
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

fn check_metrics_with_promtool(promtool: &Path, body: &str) {
    use std::io::Write;
    let mut child = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check metrics:\n{text}\n--- /metrics:\n{body}");
}
