//! `POST /warm`: load files into memory, streaming one JSON line of progress at a time.
//!
//! # Contract
//! - One job at a time per path: a second request for a path being warmed is 409.
//! - A job stops when its client goes away (the progress stream is dropped) unless the request
//!   says `"detach": true`; every job stops at shutdown.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use tracing::info;

use super::AdminState;
use crate::catalog::{Catalog, ObjectVersion};

#[derive(serde::Deserialize)]
pub struct WarmRequest {
    /// A file or directory, relative to the mount root.
    path: String,
    /// Keep going after the client disconnects.
    #[serde(default)]
    detach: bool,
}

/// Paths being warmed now.
#[derive(Default)]
pub struct Jobs(Mutex<HashSet<String>>);

/// Holds a path in [`Jobs`] until dropped.
struct Claim(Arc<Jobs>, String);

impl Drop for Claim {
    fn drop(&mut self) {
        self.0 .0.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.1);
    }
}

impl Jobs {
    fn claim(self: &Arc<Self>, path: &str) -> Option<Claim> {
        let fresh = self.0.lock().unwrap_or_else(|p| p.into_inner()).insert(path.to_string());
        fresh.then(|| Claim(self.clone(), path.to_string()))
    }
}

/// The files a warm request names: the file itself, or every file under the directory.
fn files_under(catalog: &Catalog, path: &str) -> Vec<Arc<ObjectVersion>> {
    if let Ok(o) = catalog.object_at(path) {
        return vec![o];
    }
    let prefix = if path.is_empty() { String::new() } else { format!("{path}/") };
    let mut v: Vec<_> = catalog.files().into_iter().filter(|o| o.key.starts_with(&prefix)).collect();
    v.sort_by(|a, b| a.key.cmp(&b.key));
    v
}

fn line(v: serde_json::Value) -> Result<bytes::Bytes, std::convert::Infallible> {
    Ok(bytes::Bytes::from(format!("{v}\n")))
}

pub async fn warm(State(s): State<AdminState>, Json(req): Json<WarmRequest>) -> axum::response::Response {
    let path = req.path.trim_matches('/').to_string();
    let files = files_under(&s.catalog, &path);
    if files.is_empty() {
        return super::error_reply(StatusCode::NOT_FOUND, format!("{}: no such file or directory in the mount", req.path));
    }
    let Some(claim) = s.warm_jobs.claim(&path) else {
        return super::error_reply(StatusCode::CONFLICT, format!("{}: already being warmed", req.path));
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<serde_json::Value>(64);
    let (reader, stop, detach) = (s.reader.clone(), s.stop.clone(), req.detach);
    s.tasks.spawn(async move {
        let _claim = claim;
        let gone = async {
            if detach {
                std::future::pending::<()>().await
            } else {
                tx.closed().await
            }
        };
        tokio::select! {
            _ = run(reader, files, tx.clone()) => {}
            _ = gone => info!(path = %path, "warm cancelled: the client went away"),
            _ = stop.cancelled() => {}
        }
    });
    let stream = futures::StreamExt::map(tokio_stream::wrappers::ReceiverStream::new(rx), line);
    ([(header::CONTENT_TYPE, "application/x-ndjson")], axum::body::Body::from_stream(stream)).into_response()
}

/// Load every file, reporting progress on `tx` (a closed channel is not an error here).
async fn run(reader: Arc<crate::cache::Reader>, files: Vec<Arc<ObjectVersion>>, tx: tokio::sync::mpsc::Sender<serde_json::Value>) {
    let total: u64 = files.iter().map(|o| o.size).sum();
    let _ = tx.send(serde_json::json!({ "total": total, "files": files.len() })).await;
    let mut loaded = 0u64;
    for obj in &files {
        let r = reader
            .load_all(obj, |n| {
                loaded += n;
                let _ = tx.try_send(serde_json::json!({ "loaded": loaded }));
            })
            .await;
        if let Err(e) = r {
            let _ = tx.send(serde_json::json!({ "error": format!("{}: {e}", obj.key) })).await;
            return;
        }
    }
    let _ = tx.send(serde_json::json!({ "done": true, "loaded": loaded })).await;
}
