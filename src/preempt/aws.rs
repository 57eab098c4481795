//! AWS EC2: IMDSv2 session token (refreshed, renewed on 401, IMDSv1 when none can be had);
//! `spot/instance-action` (404 none, 200 `{"action", "time"}`) is a termination notice;
//! `events/recommendations/rebalance` (200 `{"noticeTime"}`) is a hint.

use std::time::Duration;

use serde::Deserialize;
use tracing::warn;

use super::aliyun::snippet;
use super::http::{Meta, TokenAuth};
use super::{parse_time, Provider, Signal, WatchError, Watcher};

pub struct Aws {
    meta: Meta,
    auth: TokenAuth,
    interval: Duration,
}

impl Aws {
    pub fn new(endpoint: &str, interval: Duration) -> Result<Aws, reqwest::Error> {
        Ok(Aws {
            meta: Meta::new(endpoint, Duration::from_secs(2))?,
            auth: TokenAuth::new(
                "X-aws-ec2-metadata-token-ttl-seconds",
                "X-aws-ec2-metadata-token",
                "Using IMDSv1. In a container without host networking the default hop limit of 1 blocks IMDSv2 tokens: run with host networking or raise the hop limit.",
            ),
            interval,
        })
    }
}

#[derive(Deserialize)]
struct InstanceAction {
    action: String,
    time: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rebalance {
    notice_time: String,
}

/// The signal in one answer of `spot/instance-action`.
pub fn interpret_action(status: u16, body: &str) -> Result<Option<Signal>, WatchError> {
    match status {
        404 => Ok(None),
        200 => {
            let a: InstanceAction =
                serde_json::from_str(body).map_err(|e| WatchError::Malformed(format!("instance-action {:?}: {e}", snippet(body))))?;
            if !matches!(a.action.as_str(), "stop" | "terminate" | "hibernate") {
                return Err(WatchError::Malformed(format!("instance-action has an unknown action {:?}", a.action)));
            }
            let t =
                parse_time(&a.time).ok_or_else(|| WatchError::Malformed(format!("instance-action time {:?} is not RFC 3339", a.time)))?;
            Ok(Some(Signal::Termination { time: Some(t), what: format!("spot instance-action {}", a.action), event_id: None }))
        }
        s => Err(WatchError::Status(s)),
    }
}

/// The signal in one answer of `events/recommendations/rebalance`.
pub fn interpret_rebalance(status: u16, body: &str) -> Result<Option<Signal>, WatchError> {
    match status {
        404 => Ok(None),
        200 => {
            let r: Rebalance =
                serde_json::from_str(body).map_err(|e| WatchError::Malformed(format!("rebalance {:?}: {e}", snippet(body))))?;
            let t = parse_time(&r.notice_time)
                .ok_or_else(|| WatchError::Malformed(format!("rebalance noticeTime {:?} is not RFC 3339", r.notice_time)))?;
            Ok(Some(Signal::Rebalance { time: Some(t) }))
        }
        s => Err(WatchError::Status(s)),
    }
}

impl Watcher for Aws {
    fn provider(&self) -> Provider {
        Provider::Aws
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn instance_id(&mut self) -> Option<String> {
        self.auth.text(&self.meta, "/latest/meta-data/instance-id").await
    }

    async fn check(&mut self) -> Result<Vec<Signal>, WatchError> {
        let a = self.auth.get(&self.meta, "/latest/meta-data/spot/instance-action").await?;
        let mut out: Vec<Signal> = interpret_action(a.status, &a.body)?.into_iter().collect();
        // The hint is secondary: its failures are logged, never hide a termination notice.
        match self
            .auth
            .get(&self.meta, "/latest/meta-data/events/recommendations/rebalance")
            .await
            .and_then(|a| interpret_rebalance(a.status, &a.body))
        {
            Ok(s) => out.extend(s),
            Err(e) => warn!(error = %e, "rebalance recommendation check failed"),
        }
        Ok(out)
    }
}
