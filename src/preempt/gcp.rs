//! Google Cloud: `instance/preempted` (`TRUE`/`FALSE`) and `instance/maintenance-event`
//! (`TERMINATE_ON_HOST_MAINTENANCE` is a termination), both with `Metadata-Flavor: Google`,
//! read once and then long-polled with `wait_for_change=true&last_etag=ETAG`. Neither carries a
//! time: the deadline is now + 30 s. Both back to normal is a withdrawal.

use std::time::Duration;

use reqwest::Method;

use super::aliyun::snippet;
use super::http::Meta;
use super::{Provider, Signal, WatchError, Watcher};

const BASE: &str = "/computeMetadata/v1/instance/";
/// Server-side wait of one long poll; the request itself may take a little longer.
const LONG_POLL_SECS: u64 = 60;

struct Key {
    name: &'static str,
    allowed: &'static [&'static str],
    value: Option<String>,
    etag: Option<String>,
}

pub struct Gcp {
    meta: Meta,
    long: Meta,
    interval: Duration,
    keys: [Key; 2],
}

impl Gcp {
    /// `interval` paces polling only when the server sends no ETag (long-polling needs one).
    pub fn new(endpoint: &str, interval: Duration) -> Result<Gcp, reqwest::Error> {
        Ok(Gcp {
            meta: Meta::new(endpoint, Duration::from_secs(2))?,
            long: Meta::new(endpoint, Duration::from_secs(LONG_POLL_SECS + 10))?,
            interval: if interval.is_zero() { Duration::from_secs(2) } else { interval },
            keys: [
                Key { name: "preempted", allowed: &["TRUE", "FALSE"], value: None, etag: None },
                Key {
                    name: "maintenance-event",
                    allowed: &["NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE"],
                    value: None,
                    etag: None,
                },
            ],
        })
    }

    fn long_polling(&self) -> bool {
        self.keys.iter().all(|k| k.etag.is_some())
    }

    fn signals(&self) -> Vec<Signal> {
        interpret(self.keys[0].value.as_deref(), self.keys[1].value.as_deref())
    }
}

/// The signal in the last answers of `instance/preempted` and `instance/maintenance-event`.
pub fn interpret(preempted: Option<&str>, maintenance: Option<&str>) -> Vec<Signal> {
    let what = match (preempted.map(str::trim) == Some("TRUE"), maintenance.map(str::trim) == Some("TERMINATE_ON_HOST_MAINTENANCE")) {
        (true, _) => "instance preempted",
        (false, true) => "terminate on host maintenance",
        (false, false) => return vec![Signal::Clear],
    };
    vec![Signal::Termination { time: None, what: what.into(), event_id: None }]
}

/// Ask for one key; with an ETag, wait until it changes.
async fn get_key(meta: &Meta, key: &Key, wait: bool) -> Result<(String, Option<String>), WatchError> {
    let path = match (&key.etag, wait) {
        (Some(etag), true) => format!("{BASE}{}?wait_for_change=true&last_etag={etag}&timeout_sec={LONG_POLL_SECS}", key.name),
        _ => format!("{BASE}{}", key.name),
    };
    let a = meta.send(meta.request(Method::GET, &path).header("Metadata-Flavor", "Google")).await?;
    if a.status != 200 {
        return Err(WatchError::Status(a.status));
    }
    let v = a.body.trim().to_string();
    if !key.allowed.contains(&v.as_str()) {
        return Err(WatchError::Malformed(format!("{} is {:?}, expected one of {:?}", key.name, snippet(&v), key.allowed)));
    }
    let etag = a
        .headers
        .get(reqwest::header::ETAG)
        .and_then(|e| e.to_str().ok())
        .filter(|e| e.bytes().all(|b| b.is_ascii_alphanumeric()))
        .map(str::to_string);
    Ok((v, etag))
}

impl Watcher for Gcp {
    fn provider(&self) -> Provider {
        Provider::Gcp
    }

    fn interval(&self) -> Duration {
        if self.long_polling() {
            Duration::ZERO
        } else {
            self.interval
        }
    }

    async fn instance_id(&mut self) -> Option<String> {
        let a = self.meta.send(self.meta.request(Method::GET, &format!("{BASE}id")).header("Metadata-Flavor", "Google")).await.ok()?;
        (a.status == 200 && !a.body.trim().is_empty()).then(|| a.body.trim().to_string())
    }

    async fn check(&mut self) -> Result<Vec<Signal>, WatchError> {
        if !self.long_polling() {
            for i in 0..2 {
                let (v, etag) = get_key(&self.meta, &self.keys[i], false).await?;
                self.keys[i].value = Some(v);
                self.keys[i].etag = etag;
            }
            return Ok(self.signals());
        }
        // Whichever key changes first; the other poll is dropped and restarted next time.
        let (i, r) = tokio::select! {
            r = get_key(&self.long, &self.keys[0], true) => (0, r),
            r = get_key(&self.long, &self.keys[1], true) => (1, r),
        };
        let (v, etag) = r?;
        self.keys[i].value = Some(v);
        self.keys[i].etag = etag;
        Ok(self.signals())
    }
}
