//! Alibaba Cloud ECS: `GET /latest/meta-data/instance/spot/termination-time` answers 404 (no
//! notice) or 200 with the UTC release time. Only a body that parses as a time is a notice (old
//! documents describe an empty 200 as "still usable"). The session token of hardened mode is
//! used when the token endpoint gives one.

use std::time::Duration;

use super::http::{Meta, TokenAuth};
use super::{parse_time, Provider, Signal, WatchError, Watcher};

pub struct Aliyun {
    meta: Meta,
    auth: TokenAuth,
    interval: Duration,
}

impl Aliyun {
    pub fn new(endpoint: &str, interval: Duration) -> Result<Aliyun, reqwest::Error> {
        Ok(Aliyun {
            meta: Meta::new(endpoint, Duration::from_secs(2))?,
            auth: TokenAuth::new("X-aliyun-ecs-metadata-token-ttl-seconds", "X-aliyun-ecs-metadata-token", ""),
            interval,
        })
    }
}

/// The signal in one answer of the termination-time path.
pub fn interpret(status: u16, body: &str) -> Result<Vec<Signal>, WatchError> {
    match status {
        404 => Ok(vec![]),
        200 if body.trim().is_empty() => Ok(vec![]),
        200 => match parse_time(body) {
            Some(t) => Ok(vec![Signal::Termination { time: Some(t), what: "spot instance release".into(), event_id: None }]),
            None => Err(WatchError::Malformed(format!("termination-time is not a UTC time: {:?}", snippet(body)))),
        },
        s => Err(WatchError::Status(s)),
    }
}

/// The first characters of a body, for a log line.
pub fn snippet(body: &str) -> String {
    body.chars().take(80).collect()
}

impl Watcher for Aliyun {
    fn provider(&self) -> Provider {
        Provider::Aliyun
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn instance_id(&mut self) -> Option<String> {
        self.auth.text(&self.meta, "/latest/meta-data/instance-id").await
    }

    async fn check(&mut self) -> Result<Vec<Signal>, WatchError> {
        let a = self.auth.get(&self.meta, "/latest/meta-data/instance/spot/termination-time").await?;
        interpret(a.status, &a.body)
    }
}
