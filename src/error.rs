//! The meaning-based error every core operation returns (the FUSE adapter maps it to an errno
//! in exactly one place, `fuse::errno`), and the two helpers every module shares for errors and
//! locks: [`one_line`] and [`report`], and [`lock`].

use std::sync::Arc;

/// Exit code of a command that failed at run time (README, Exit codes).
pub const EXIT_RUNTIME: u8 = 1;
/// Exit code of bad flags, config, source or options: nothing was started.
pub const EXIT_USAGE: u8 = 2;

/// What went wrong, in terms a filesystem caller understands.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    #[error("no such file or directory")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("read-only filesystem")]
    ReadOnly,
    #[error("unknown file handle")]
    BadHandle,
    /// The object changed at the origin under an open handle; the handle's version is gone.
    #[error("object {0} changed at the origin")]
    Stale(String),
    /// Every source failed to supply the bytes.
    #[error("no source could supply the data: {0}")]
    Unavailable(Arc<str>),
    #[error("timed out after {0:?}")]
    TimedOut(std::time::Duration),
}

impl Error {
    pub fn unavailable(msg: impl std::fmt::Display) -> Self {
        Error::Unavailable(msg.to_string().into())
    }
}

/// A message on one line: any run of whitespace (newlines included) becomes one space.
pub fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// An error and its sources on one line, each source once (`cannot read config x: No such file`):
/// what the operator sees of any error that ends a command.
pub fn report(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let part = s.to_string();
        if !text.contains(&part) {
            text = format!("{text}: {part}");
        }
        next = s.source();
    }
    one_line(text)
}

/// Lock `m` even if a thread panicked while holding it: the data behind every lock here stays
/// valid across a panic, and one panic must not take the data path down with it.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
