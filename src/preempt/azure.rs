//! Azure: `GET /metadata/scheduledevents` with `Metadata: true`. `Preempt` and `Terminate`
//! events whose `Resources` name this VM are termination notices (`NotBefore`, RFC 1123, is the
//! time; empty once started); events for other VMs are ignored; an empty list withdraws a
//! notice. Once drained, `StartRequests` acknowledges the event when configured.

use std::time::Duration;

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde::Deserialize;
use tracing::{info, warn};

use super::aliyun::snippet;
use super::http::Meta;
use super::{Provider, Signal, WatchError, Watcher};

const EVENTS: &str = "/metadata/scheduledevents?api-version=2020-07-01";
const NAME: &str = "/metadata/instance/compute/name?api-version=2021-02-01&format=text";

pub struct Azure {
    meta: Meta,
    interval: Duration,
    vm_name: Option<String>,
}

impl Azure {
    pub fn new(endpoint: &str, interval: Duration) -> Result<Azure, reqwest::Error> {
        Ok(Azure { meta: Meta::new(endpoint, Duration::from_secs(2))?, interval, vm_name: None })
    }

    async fn name(&mut self) -> Option<String> {
        if self.vm_name.is_none() {
            let a = self.meta.send(self.meta.request(Method::GET, NAME).header("Metadata", "true")).await.ok()?;
            if a.status == 200 && !a.body.trim().is_empty() {
                self.vm_name = Some(a.body.trim().to_string());
            }
        }
        self.vm_name.clone()
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Document {
    #[allow(dead_code)]
    document_incarnation: u64,
    events: Vec<Event>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Event {
    event_id: String,
    event_type: String,
    resources: Vec<String>,
    #[serde(default)]
    not_before: String,
}

/// RFC 1123 (`Mon, 19 Sep 2016 18:29:47 GMT`); empty is "no time".
fn parse_not_before(s: &str) -> Result<Option<DateTime<Utc>>, WatchError> {
    if s.trim().is_empty() {
        return Ok(None);
    }
    DateTime::parse_from_rfc2822(s.trim())
        .map(|t| Some(t.with_timezone(&Utc)))
        .map_err(|_| WatchError::Malformed(format!("NotBefore {s:?} is not an RFC 1123 time")))
}

/// The signal in one scheduled-events document, for the VM named `vm`.
pub fn interpret(status: u16, body: &str, vm: &str) -> Result<Vec<Signal>, WatchError> {
    if status != 200 {
        return Err(WatchError::Status(status));
    }
    let doc: Document =
        serde_json::from_str(body).map_err(|e| WatchError::Malformed(format!("scheduledevents {:?}: {e}", snippet(body))))?;
    for ev in &doc.events {
        let ours = ev.resources.iter().any(|r| r.eq_ignore_ascii_case(vm));
        if ours && matches!(ev.event_type.as_str(), "Preempt" | "Terminate") {
            let time = parse_not_before(&ev.not_before)?;
            return Ok(vec![Signal::Termination {
                time,
                what: format!("scheduled event {} {}", ev.event_type, ev.event_id),
                event_id: Some(ev.event_id.clone()),
            }]);
        }
    }
    Ok(vec![Signal::Clear])
}

impl Watcher for Azure {
    fn provider(&self) -> Provider {
        Provider::Azure
    }

    fn interval(&self) -> Duration {
        self.interval
    }

    async fn instance_id(&mut self) -> Option<String> {
        self.name().await
    }

    async fn check(&mut self) -> Result<Vec<Signal>, WatchError> {
        let Some(vm) = self.name().await else {
            return Err(WatchError::Unreachable("this VM's name (compute/name) could not be read; events cannot be matched".into()));
        };
        let a = self.meta.send(self.meta.request(Method::GET, EVENTS).header("Metadata", "true")).await?;
        interpret(a.status, &a.body, &vm)
    }

    async fn acknowledge(&mut self, event_id: &str) {
        let body = serde_json::json!({ "StartRequests": [{ "EventId": event_id }] }).to_string();
        let req = self
            .meta
            .request(Method::POST, EVENTS)
            .header("Metadata", "true")
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        match self.meta.send(req).await {
            Ok(a) if a.status == 200 => info!(event_id, "acknowledged the scheduled event (StartRequests)"),
            Ok(a) => warn!(event_id, status = a.status, "acknowledging the scheduled event failed"),
            Err(e) => warn!(event_id, error = %e, "acknowledging the scheduled event failed"),
        }
    }
}
