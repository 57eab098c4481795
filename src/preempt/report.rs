//! Reporters of drain events: each `--scheduler-webhook` gets every event as a JSON `POST`, in
//! order, retried with backoff until the event's deadline; `--drain-hook` runs `sh -c CMD` per
//! event with the event in `CACHEFS_*` environment variables. Nothing here blocks the drain.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::metrics::Metrics;

type Queued = (serde_json::Value, Instant);

/// Fans events out to the webhooks and the hook; cheap to call from anywhere.
pub struct Reporter {
    queues: Vec<mpsc::UnboundedSender<Queued>>,
    pending: Arc<AtomicUsize>,
}

/// One attempt gets at most this long.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why drain reporting cannot start.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot build the webhook client")]
    Client(#[source] reqwest::Error),
}

impl Reporter {
    /// A reporter with no destinations (events are only logged).
    pub fn none() -> Reporter {
        Reporter { queues: Vec::new(), pending: Arc::new(AtomicUsize::new(0)) }
    }

    pub fn start(
        webhooks: &[String],
        hook: Option<&str>,
        metrics: Arc<Metrics>,
        tasks: &TaskTracker,
        stop: CancellationToken,
    ) -> Result<Reporter, ReportError> {
        let pending = Arc::new(AtomicUsize::new(0));
        let mut queues = Vec::new();
        if !webhooks.is_empty() {
            let client = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .timeout(ATTEMPT_TIMEOUT)
                .user_agent(concat!("cachefs/", env!("CARGO_PKG_VERSION")))
                .build()
                .map_err(ReportError::Client)?;
            for url in webhooks {
                let (tx, rx) = mpsc::unbounded_channel();
                queues.push(tx);
                let (client, url2, metrics, pending, stop) = (client.clone(), url.clone(), metrics.clone(), pending.clone(), stop.clone());
                tasks.spawn(
                    deliver_webhooks(client, url2, rx, metrics, pending, stop).instrument(tracing::info_span!("webhook", url = %url)),
                );
            }
        }
        if let Some(cmd) = hook {
            let (tx, rx) = mpsc::unbounded_channel();
            queues.push(tx);
            tasks.spawn(run_hooks(cmd.to_string(), rx, pending.clone(), stop).instrument(tracing::info_span!("drain_hook")));
        }
        Ok(Reporter { queues, pending })
    }

    /// Queue `event` for every destination; each gives up at `deadline`.
    pub fn send(&self, event: serde_json::Value, deadline: Instant) {
        info!(event = %event, "drain event");
        for q in &self.queues {
            self.pending.fetch_add(1, Ordering::SeqCst);
            if q.send((event.clone(), deadline)).is_err() {
                self.pending.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Wait until every queued event is delivered or given up, at most `limit`.
    pub async fn flush(&self, limit: Duration) {
        let end = Instant::now() + limit;
        while self.pending.load(Ordering::SeqCst) > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn deliver_webhooks(
    client: reqwest::Client,
    url: String,
    mut rx: mpsc::UnboundedReceiver<Queued>,
    metrics: Arc<Metrics>,
    pending: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    loop {
        let (event, deadline) = tokio::select! {
            _ = stop.cancelled() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        let kind = event["event"].as_str().unwrap_or("?").to_string();
        let body = event.to_string();
        let mut backoff = super::http::Backoff::new(Duration::from_secs(5));
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            let r = client
                .post(&url)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .timeout(ATTEMPT_TIMEOUT.min(left.max(Duration::from_millis(200))))
                .body(body.clone())
                .send()
                .await;
            let why = match r {
                Ok(resp) if resp.status().is_success() => {
                    metrics.webhook_deliveries.inc();
                    info!(event = %kind, attempts, "webhook delivered");
                    break;
                }
                Ok(resp) => format!("HTTP {}", resp.status().as_u16()),
                Err(e) => super::http::error_chain(&e),
            };
            let wait = backoff.next_delay();
            if Instant::now() + wait >= deadline {
                metrics.webhook_failures.inc();
                warn!(event = %kind, attempts, error = %why, "webhook not delivered before the deadline; giving up");
                break;
            }
            warn!(event = %kind, attempts, error = %why, retry_in = ?wait, "webhook delivery failed; retrying");
            tokio::time::sleep(wait).await;
        }
        pending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// `PATH` for the drain hook: the agent's own, else the usual system directories.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// The event as `CACHEFS_*` variables (`CACHEFS_EVENT`, `CACHEFS_TERMINATION_TIME`, ...) plus
/// the whole event as `CACHEFS_EVENT_JSON`; null fields are empty.
pub fn hook_env(event: &serde_json::Value) -> Vec<(String, String)> {
    let mut env = vec![("CACHEFS_EVENT_JSON".to_string(), event.to_string())];
    if let Some(o) = event.as_object() {
        for (k, v) in o {
            let val = match v {
                serde_json::Value::Null => String::new(),
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            env.push((format!("CACHEFS_{}", k.to_ascii_uppercase()), val));
        }
    }
    env
}

async fn run_hooks(cmd: String, mut rx: mpsc::UnboundedReceiver<Queued>, pending: Arc<AtomicUsize>, stop: CancellationToken) {
    loop {
        let (event, deadline) = tokio::select! {
            _ = stop.cancelled() => return,
            e = rx.recv() => match e { Some(e) => e, None => return },
        };
        let kind = event["event"].as_str().unwrap_or("?").to_string();
        let limit = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(1));
        // The hook sees the event and PATH, never the agent's environment (cloud credentials).
        let path = std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string());
        let child = tokio::process::Command::new("/bin/sh")
            .arg("-c")
            .arg(&cmd)
            .env_clear()
            .env("PATH", path)
            .envs(hook_env(&event))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn();
        match child {
            Err(e) => warn!(event = %kind, error = %e, "cannot run the drain hook"),
            Ok(mut child) => match tokio::time::timeout(limit, child.wait()).await {
                Ok(Ok(st)) if st.success() => info!(event = %kind, "drain hook done"),
                Ok(Ok(st)) => warn!(event = %kind, status = %st, "drain hook failed"),
                Ok(Err(e)) => warn!(event = %kind, error = %e, "drain hook failed"),
                Err(_) => {
                    let _ = child.kill().await;
                    warn!(event = %kind, ?limit, "drain hook killed at the deadline");
                }
            },
        }
        pending.fetch_sub(1, Ordering::SeqCst);
    }
}
