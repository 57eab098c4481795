//! Who may use the admin port for more than looking.
//!
//! # Contract
//! - `GET /status` and every `POST` must name this agent in `Host`: the admin address, or
//!   `localhost` with any port, or (admin on a wildcard address) an IP literal with the admin
//!   port. Any other name, or none, is 403: a DNS-rebinding page cannot read or act.
//! - A `POST` that carries a browser's cross-site marks (an `Origin` header, or `Sec-Fetch-Site`
//!   other than `none`/`same-origin`) is 403; one whose body is not `application/json` is 415, so
//!   no HTML form can send it.
//! - With an admin token, a `POST` without `Authorization: Bearer <token>` is 401 (the compare
//!   takes constant time). Without one, a `POST` from anything but a loopback address is 403:
//!   an agent whose admin port others can reach acts only for its own host unless a token is set.
//!
//! Other `GET`s (`/healthz`, `/readyz`, `/metrics`) are open: probes and scrapers name the node
//! by whatever address they reach it at.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::Response;
use subtle::ConstantTimeEq;

pub struct Guard {
    admin: SocketAddr,
    token: Option<Vec<u8>>,
}

impl Guard {
    pub fn new(admin: SocketAddr, token: Option<String>) -> Arc<Guard> {
        Arc::new(Guard { admin, token: token.map(String::into_bytes) })
    }

    /// Whether `host` (a `Host` header value) names this agent.
    fn host_ok(&self, host: &str) -> bool {
        let (name, port) = split_host(host);
        if name.eq_ignore_ascii_case("localhost") {
            return true;
        }
        let Ok(ip) = name.parse::<IpAddr>() else { return false };
        let port_ok = port.is_none_or(|p| p == self.admin.port());
        port_ok && (ip == self.admin.ip() || self.admin.ip().is_unspecified())
    }

    /// Whether POSTs from other hosts are open: the admin address is not loopback and no
    /// token guards it (the agent says so at start).
    pub fn open_to_other_hosts(&self) -> bool {
        self.token.is_none() && !self.admin.ip().is_loopback()
    }

    /// Why the request from `client` (unknown: `None`) may not go on, if it may not.
    fn refuse(&self, method: &Method, path: &str, h: &HeaderMap, client: Option<IpAddr>) -> Option<(StatusCode, String)> {
        let post = method == Method::POST;
        if !post && path != "/status" {
            return None;
        }
        let host = h.get(header::HOST).and_then(|v| v.to_str().ok()).unwrap_or("");
        if !self.host_ok(host) {
            return Some((StatusCode::FORBIDDEN, format!("Host {host:?} does not name this agent (use {} or localhost)", self.admin)));
        }
        if !post {
            return None;
        }
        let site = h.get("sec-fetch-site").and_then(|v| v.to_str().ok());
        if h.contains_key(header::ORIGIN) || site.is_some_and(|s| s != "none" && s != "same-origin") {
            return Some((StatusCode::FORBIDDEN, "cross-site requests are refused".into()));
        }
        let json =
            h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|c| c.trim_start().starts_with("application/json"));
        if !json {
            return Some((StatusCode::UNSUPPORTED_MEDIA_TYPE, "POST bodies must be application/json".into()));
        }
        let Some(want) = self.token.as_deref() else {
            return match client {
                Some(ip) if ip.is_loopback() || ip.to_canonical().is_loopback() => None,
                _ => Some((
                    StatusCode::FORBIDDEN,
                    "without an admin token, POSTs are taken from this host only (see --admin-token-file)".into(),
                )),
            };
        };
        let got = h
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("")
            .trim()
            .as_bytes();
        if got.len() == want.len() && bool::from(got.ct_eq(want)) {
            None
        } else {
            Some((StatusCode::UNAUTHORIZED, "missing or wrong admin token (Authorization: Bearer; see --admin-token-file)".into()))
        }
    }
}

/// `host[:port]` or `[v6]:port` into its name and port.
fn split_host(host: &str) -> (&str, Option<u16>) {
    if let Some(rest) = host.strip_prefix('[') {
        let (ip, tail) = rest.split_once(']').unwrap_or((rest, ""));
        return (ip, tail.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    match host.rsplit_once(':') {
        Some((n, p)) if !n.contains(':') => (n, p.parse().ok()),
        _ => (host, None),
    }
}

/// Axum middleware applying [`Guard`].
pub async fn check(State(g): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let client = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    match g.refuse(req.method(), req.uri().path(), req.headers(), client) {
        Some((code, msg)) => {
            tracing::warn!(path = %req.uri().path(), status = code.as_u16(), reason = %msg, "admin request refused");
            super::error_reply(code, msg)
        }
        None => next.run(req).await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
        }
        h
    }

    const LOCAL: Option<IpAddr> = Some(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

    #[test]
    fn hosts_origins_and_tokens() {
        let g = Guard::new("127.0.0.1:7071".parse().unwrap(), Some("tok".into()));
        let ok = [("host", "127.0.0.1:7071"), ("content-type", "application/json"), ("authorization", "Bearer tok")];
        assert_eq!(g.refuse(&Method::POST, "/drain", &headers(&ok), LOCAL), None);
        let localhost = [("host", "localhost:7071"), ("content-type", "application/json"), ("authorization", "Bearer tok")];
        assert_eq!(g.refuse(&Method::POST, "/drain", &headers(&localhost), LOCAL), None);
        let code = |h: &[(&str, &str)]| g.refuse(&Method::POST, "/drain", &headers(h), LOCAL).map(|r| r.0);
        assert_eq!(
            code(&[("host", "evil.example:7071"), ("content-type", "application/json"), ("authorization", "Bearer tok")]),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(code(&[("host", "127.0.0.1:7071"), ("content-type", "application/json")]), Some(StatusCode::UNAUTHORIZED));
        assert_eq!(
            code(&[("host", "127.0.0.1:7071"), ("content-type", "application/json"), ("authorization", "Bearer tox")]),
            Some(StatusCode::UNAUTHORIZED)
        );
        assert_eq!(
            code(&[("host", "127.0.0.1:7071"), ("content-type", "text/plain"), ("authorization", "Bearer tok")]),
            Some(StatusCode::UNSUPPORTED_MEDIA_TYPE)
        );
        let cross = [
            ("host", "127.0.0.1:7071"),
            ("origin", "https://evil.example"),
            ("content-type", "application/json"),
            ("authorization", "Bearer tok"),
        ];
        assert_eq!(code(&cross), Some(StatusCode::FORBIDDEN));
        // Reading /status needs a good Host, not the token; other GETs are open.
        assert_eq!(
            g.refuse(&Method::GET, "/status", &headers(&[("host", "rebind.example:7071")]), LOCAL).map(|r| r.0),
            Some(StatusCode::FORBIDDEN)
        );
        assert_eq!(g.refuse(&Method::GET, "/status", &headers(&[("host", "127.0.0.1:7071")]), LOCAL), None);
        assert_eq!(g.refuse(&Method::GET, "/metrics", &headers(&[("host", "10.1.2.3:7071")]), LOCAL), None);
        let wild = Guard::new("0.0.0.0:7071".parse().unwrap(), None);
        assert_eq!(wild.refuse(&Method::GET, "/status", &headers(&[("host", "10.1.2.3:7071")]), LOCAL), None);
        assert!(wild.refuse(&Method::GET, "/status", &headers(&[("host", "10.1.2.3:80")]), LOCAL).is_some());
        assert_eq!(split_host("[::1]:7071"), ("::1", Some(7071)));
    }

    #[test]
    fn without_a_token_posts_come_from_this_host_only() {
        let post = [("host", "10.1.2.3:7071"), ("content-type", "application/json")];
        let wild = Guard::new("0.0.0.0:7071".parse().unwrap(), None);
        assert!(wild.open_to_other_hosts());
        let from = |ip: &str| wild.refuse(&Method::POST, "/drain", &headers(&post), Some(ip.parse().unwrap())).map(|r| r.0);
        assert_eq!(from("10.9.9.9"), Some(StatusCode::FORBIDDEN));
        assert_eq!(from("127.0.0.1"), None);
        assert_eq!(from("::ffff:127.0.0.1"), None);
        assert_eq!(wild.refuse(&Method::POST, "/drain", &headers(&post), None).map(|r| r.0), Some(StatusCode::FORBIDDEN));
        // GETs stay open; with a token, the token decides.
        assert_eq!(wild.refuse(&Method::GET, "/status", &headers(&post), Some("10.9.9.9".parse().unwrap())), None);
        let tok = Guard::new("0.0.0.0:7071".parse().unwrap(), Some("tok".into()));
        assert!(!tok.open_to_other_hosts());
        let authed = [("host", "10.1.2.3:7071"), ("content-type", "application/json"), ("authorization", "Bearer tok")];
        assert_eq!(tok.refuse(&Method::POST, "/drain", &headers(&authed), Some("10.9.9.9".parse().unwrap())), None);
        assert!(!Guard::new("127.0.0.1:7071".parse().unwrap(), None).open_to_other_hosts());
    }
}
