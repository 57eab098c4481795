//! Admin HTTP: `GET /healthz` (alive), `GET /readyz` (200 only when mounted and serving),
//! `GET /metrics` (Prometheus text), `GET /status` (JSON), `POST /warm` (load files into memory;
//! the response streams one JSON line of progress at a time), `POST /drain` (manual drain),
//! `POST /resume` (undo a manual drain).
//! Who may call what is in [`guard`].

pub mod guard;
pub mod warm;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio_util::sync::CancellationToken;

use crate::cache::Reader;
use crate::catalog::Catalog;
use crate::metrics::Metrics;

/// A refusal or failure answered as `{"error": msg}` with `code`.
pub fn error_reply(code: StatusCode, msg: String) -> axum::response::Response {
    (code, Json(serde_json::json!({ "error": msg }))).into_response()
}

#[derive(Clone)]
pub struct AdminState {
    pub metrics: Arc<Metrics>,
    /// Mounted, serving and not draining.
    pub ready: Arc<AtomicBool>,
    pub status: Arc<crate::agent::status::StatusParts>,
    pub catalog: Arc<Catalog>,
    pub reader: Arc<Reader>,
    /// Warm jobs run here, so shutdown stops them.
    pub tasks: tokio_util::task::TaskTracker,
    pub drain: Arc<crate::preempt::Drain>,
    /// Deadline of a manual drain.
    pub drain_timeout: std::time::Duration,
    /// Paths being warmed now (one job per path).
    pub warm_jobs: Arc<warm::Jobs>,
    /// Cancelled at shutdown: warm jobs stop.
    pub stop: CancellationToken,
    pub guard: Arc<guard::Guard>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .route("/warm", axum::routing::post(warm::warm))
        .route("/drain", axum::routing::post(drain))
        .route("/resume", axum::routing::post(resume))
        .layer(axum::middleware::from_fn_with_state(state.guard.clone(), guard::check))
        .with_state(state)
}

async fn readyz(State(s): State<AdminState>) -> impl IntoResponse {
    if s.ready.load(Ordering::SeqCst) {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// OpenMetrics when the scraper asks for it (Prometheus does), else the Prometheus text format.
async fn metrics(State(s): State<AdminState>, headers: axum::http::HeaderMap) -> impl IntoResponse {
    use crate::metrics::{OPENMETRICS_CONTENT_TYPE, TEXT_CONTENT_TYPE};
    s.metrics.ready.set(i64::from(s.ready.load(Ordering::SeqCst)));
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if accept.contains("application/openmetrics-text") {
        ([(header::CONTENT_TYPE, OPENMETRICS_CONTENT_TYPE)], s.metrics.encode())
    } else {
        ([(header::CONTENT_TYPE, TEXT_CONTENT_TYPE)], s.metrics.encode_text())
    }
}

async fn status(State(s): State<AdminState>) -> impl IntoResponse {
    Json(s.status.status())
}

/// What `POST /drain` may ask (an empty body asks for nothing more).
#[derive(Debug, Default, serde::Deserialize)]
struct DrainRequest {
    /// Hand off the chunks no other agent holds first.
    #[serde(default)]
    handoff: bool,
}

/// Start draining (once) and answer when drained.
async fn drain(State(s): State<AdminState>, body: axum::body::Bytes) -> axum::response::Response {
    let req: DrainRequest = if body.iter().all(u8::is_ascii_whitespace) {
        DrainRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                return (StatusCode::BAD_REQUEST, Json(serde_json::json!({ "error": format!("bad drain request: {e}") }))).into_response()
            }
        }
    };
    let policy = if req.handoff { crate::preempt::HandoffPolicy::Always } else { crate::preempt::HandoffPolicy::Never };
    s.drain.begin(crate::preempt::Asker::Operator, s.drain_timeout, policy);
    s.drain.wait(s.drain_timeout + std::time::Duration::from_secs(5)).await;
    let st = s.drain.status();
    Json(serde_json::json!({ "state": st.state, "handed_off_bytes": st.handed_off_bytes, "lost_bytes": st.lost_bytes })).into_response()
}

/// Undo a drain an operator asked for: serving again (200), or 409 with the reason.
async fn resume(State(s): State<AdminState>) -> axum::response::Response {
    match s.drain.resume() {
        Ok(()) => Json(serde_json::json!({ "state": s.drain.status().state })).into_response(),
        Err(why) => error_reply(StatusCode::CONFLICT, why),
    }
}

/// Serve until `stop` is cancelled.
pub async fn serve(listener: tokio::net::TcpListener, state: AdminState, stop: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router(state).into_make_service_with_connect_info::<std::net::SocketAddr>())
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

/// A small blocking client of the admin endpoint, for the `status` and `warm` commands.
pub mod client {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{SocketAddr, TcpStream};
    use std::time::Duration;

    fn connect(addr: SocketAddr, read_timeout: Option<Duration>) -> Result<TcpStream, String> {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
            .map_err(|e| format!("cannot reach the agent's admin endpoint at {addr}: {e} (is `cachefs mount` running? see --admin)"))?;
        s.set_read_timeout(read_timeout).map_err(|e| e.to_string())?;
        Ok(s)
    }

    /// Send one HTTP/1.0 request; returns the status and a reader positioned at the body.
    fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
        read_timeout: Option<Duration>,
    ) -> Result<(u16, BufReader<TcpStream>), String> {
        let mut s = connect(addr, read_timeout)?;
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .map_err(|e| e.to_string())?;
        let mut r = BufReader::new(s);
        let mut status_line = String::new();
        r.read_line(&mut status_line).map_err(|e| format!("no answer from the agent: {e}"))?;
        let status = status_line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("malformed answer from the agent")?;
        loop {
            let mut h = String::new();
            if r.read_line(&mut h).map_err(|e| e.to_string())? == 0 || h.trim().is_empty() {
                break;
            }
        }
        Ok((status, r))
    }

    pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
        let (status, mut r) = request(addr, "GET", path, None, "", Some(Duration::from_secs(10)))?;
        let mut body = String::new();
        r.read_to_string(&mut body).map_err(|e| e.to_string())?;
        Ok((status, body))
    }

    /// POST and hand each line of the (streamed) answer to `on_line`.
    pub fn post_lines(
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
        body: &str,
        mut on_line: impl FnMut(u16, &str),
    ) -> Result<u16, String> {
        let (status, r) = request(addr, "POST", path, token, body, Some(Duration::from_secs(300)))?;
        for line in r.lines() {
            let line = line.map_err(|e| format!("the agent's answer broke off: {e}"))?;
            if !line.trim().is_empty() {
                on_line(status, &line);
            }
        }
        Ok(status)
    }
}
