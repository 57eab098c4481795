//! A metadata-service client: every request has a timeout, proxies are never used (metadata
//! addresses are link-local), bodies are capped, and the optional session token of AWS and
//! Alibaba (`PUT /latest/api/token`) is fetched, refreshed before it expires, renewed on 401 and
//! given up on (plain GETs) when the token endpoint does not answer.

use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Method, RequestBuilder};
use tokio::time::Instant;
use tracing::{info, warn};

use super::WatchError;

/// Largest metadata body read; anything longer is malformed.
const MAX_BODY: usize = 64 * 1024;

/// One answer: status, headers, body text.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: String,
}

#[derive(Clone)]
pub struct Meta {
    client: reqwest::Client,
    base: String,
}

impl Meta {
    /// `base` is scheme and host (`http://169.254.169.254`); `timeout` bounds every request.
    pub fn new(base: &str, timeout: Duration) -> Result<Meta, reqwest::Error> {
        let client = reqwest::Client::builder().no_proxy().connect_timeout(Duration::from_secs(1).min(timeout)).timeout(timeout).build()?;
        Ok(Meta { client, base: base.trim_end_matches('/').to_string() })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.client.request(method, format!("{}{}", self.base, path))
    }

    /// Send and read the whole (capped) body.
    pub async fn send(&self, req: RequestBuilder) -> Result<Answer, WatchError> {
        let mut resp = req.send().await.map_err(|e| WatchError::Unreachable(error_chain(&e)))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| WatchError::Unreachable(error_chain(&e)))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_BODY {
                return Err(WatchError::Malformed(format!("body longer than {MAX_BODY} bytes")));
            }
        }
        let body = String::from_utf8(body).map_err(|_| WatchError::Malformed("body is not UTF-8".into()))?;
        Ok(Answer { status, headers, body })
    }
}

/// The error and its causes on one line (reqwest hides "connection refused" in a source).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

/// The session-token dance shared by AWS IMDSv2 and Alibaba's hardened mode.
pub struct TokenAuth {
    /// Header carrying the requested lifetime on `PUT /latest/api/token`.
    pub ttl_header: &'static str,
    /// Header carrying the token on every other request.
    pub token_header: &'static str,
    pub ttl: Duration,
    /// What to tell the operator when no token can be had.
    pub fallback_hint: &'static str,
    token: Option<(String, Instant)>,
    /// No token until then (the endpoint refused or was absent): plain requests.
    retry_at: Option<Instant>,
    warned: bool,
}

impl TokenAuth {
    pub fn new(ttl_header: &'static str, token_header: &'static str, fallback_hint: &'static str) -> Self {
        TokenAuth { ttl_header, token_header, ttl: Duration::from_secs(21600), fallback_hint, token: None, retry_at: None, warned: false }
    }

    /// A valid token, fetching one if needed; None means "send plain requests".
    async fn token(&mut self, meta: &Meta) -> Option<String> {
        if let Some((t, got)) = &self.token {
            // Refresh a minute before the requested lifetime runs out.
            if got.elapsed() + Duration::from_secs(60) < self.ttl {
                return Some(t.clone());
            }
        }
        self.token = None;
        if self.retry_at.is_some_and(|at| Instant::now() < at) {
            return None;
        }
        let req = meta.request(Method::PUT, "/latest/api/token").header(self.ttl_header, self.ttl.as_secs().to_string());
        let why = match meta.send(req).await {
            Ok(a) if a.status == 200 && !a.body.trim().is_empty() && a.body.trim().bytes().all(|b| b.is_ascii_graphic()) => {
                if self.warned {
                    info!("metadata session token obtained again");
                }
                self.warned = false;
                self.retry_at = None;
                let t = a.body.trim().to_string();
                self.token = Some((t.clone(), Instant::now()));
                return Some(t);
            }
            Ok(a) => format!("HTTP {}", a.status),
            Err(e) => e.to_string(),
        };
        if !self.warned {
            warn!(reason = %why, "no metadata session token; falling back to plain requests. {}", self.fallback_hint);
            self.warned = true;
        }
        self.retry_at = Some(Instant::now() + Duration::from_secs(60));
        None
    }

    /// The trimmed text at `path` if it answers 200 with something (an instance id, say).
    pub async fn text(&mut self, meta: &Meta, path: &str) -> Option<String> {
        let a = self.get(meta, path).await.ok()?;
        (a.status == 200 && !a.body.trim().is_empty()).then(|| a.body.trim().to_string())
    }

    /// GET `path` with the token when there is one; a 401 (token expired or revoked) or a 403
    /// to a plain request (token required) gets a fresh token and one retry.
    pub async fn get(&mut self, meta: &Meta, path: &str) -> Result<Answer, WatchError> {
        let token = self.token(meta).await;
        let header = self.token_header;
        let req = |t: &Option<String>| {
            let r = meta.request(Method::GET, path);
            match t {
                Some(t) => r.header(header, t.as_str()),
                None => r,
            }
        };
        let a = meta.send(req(&token)).await?;
        let retry = a.status == 401 || (a.status == 403 && token.is_none());
        if !retry {
            return Ok(a);
        }
        self.token = None;
        self.retry_at = None;
        let token = self.token(meta).await;
        if token.is_none() {
            return Ok(a);
        }
        meta.send(req(&token)).await
    }
}

/// Exponential backoff between failed checks: 0.5 s doubling up to `cap`.
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(cap: Duration) -> Self {
        Backoff { next: Duration::from_millis(500), cap }
    }
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(500);
    }
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d
    }
}
