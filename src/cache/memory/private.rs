//! Cached model bytes are the agent user's alone: the cache directory is `0700` and every file
//! the tier writes in it is `0600`. A directory left with looser modes (an earlier version, an
//! operator's `mkdir`) is tightened at start, with a warning, or refused when it cannot be.

use std::fs::OpenOptions;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use tracing::warn;

/// Mode of the cache directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file in it.
pub const FILE_MODE: u32 = 0o600;

/// Options that create files with [`FILE_MODE`].
pub(super) fn options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

/// Write `body` to a new (or truncated) private file.
pub(super) fn write(path: &Path, body: &[u8]) -> io::Result<()> {
    use std::io::Write;
    options().write(true).create(true).truncate(true).open(path)?.write_all(body)
}

/// Create `dir` (and missing parents) private, or make an existing one private.
pub(super) fn prepare_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(DIR_MODE).create(dir)?;
    let md = std::fs::metadata(dir)?;
    if !md.is_dir() {
        return Err(io::Error::new(io::ErrorKind::NotADirectory, "it is a file, not a directory"));
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(DIR_MODE)).map_err(|e| {
            io::Error::new(e.kind(), format!("it is open to other users (mode {mode:04o}) and cannot be made private: {e}"))
        })?;
        warn!(cache_dir = %dir.display(), was = %format!("{mode:04o}"), "cache directory was open to other users; made it 0700");
    }
    tighten_files(dir)
}

/// Files an earlier version left readable by others become [`FILE_MODE`].
fn tighten_files(dir: &Path) -> io::Result<()> {
    let mut tightened = 0;
    for entry in std::fs::read_dir(dir)?.flatten() {
        let Ok(md) = entry.metadata() else { continue };
        if md.is_file() && md.permissions().mode() & 0o077 != 0 {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(FILE_MODE))?;
            tightened += 1;
        }
    }
    if tightened > 0 {
        warn!(cache_dir = %dir.display(), files = tightened, "cache files were readable by other users; made them 0600");
    }
    Ok(())
}
