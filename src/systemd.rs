//! systemd integration: `READY=1` once the mount answers, `STATUS=` lines, `STOPPING=1`, and
//! watchdog pings that stop when the FUSE loop or the runtime is stuck. Outside systemd (no
//! `NOTIFY_SOCKET`) every call is a no-op.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::warn;

fn send(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(false, states) {
        warn!(error = %e, "could not notify systemd");
    }
}

pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

pub fn status(status: &str) {
    send(&[NotifyState::Status(status)]);
}

pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Half the watchdog period systemd asked for (`WatchdogSec=`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec / 2))
    } else {
        None
    }
}

/// Whether the FUSE mount answers a `statfs` (which always reaches the agent) within `limit`.
pub async fn mount_answers(mountpoint: &Path, limit: Duration) -> bool {
    let p: PathBuf = mountpoint.to_path_buf();
    let probe = tokio::task::spawn_blocking(move || crate::sys::statfs(&p).is_ok());
    matches!(tokio::time::timeout(limit, probe).await, Ok(Ok(true)))
}

/// Ping the watchdog every `interval` while the mount answers; stop pinging (so systemd restarts
/// the service) when it does not. The ping itself runs on the runtime, so a stuck runtime also
/// stops it.
pub async fn watchdog(mountpoint: PathBuf, interval: Duration, stop: tokio_util::sync::CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if mount_answers(&mountpoint, interval).await {
            send(&[NotifyState::Watchdog]);
        } else {
            warn!("the FUSE mount did not answer; withholding the watchdog ping");
        }
    }
}
