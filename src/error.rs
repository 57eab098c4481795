//! The meaning-based error every core operation returns. The FUSE adapter maps it to an errno
//! in exactly one place (`fuse::errno`).

use std::sync::Arc;

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
