//! A cache directory backed by huge pages.
//!
//! Storing a chunk on a tmpfs without huge pages allocates, charges and indexes one 4 KiB page
//! at a time: measured here, that is half of what a remote hit costs the receiving agent. On
//! a tmpfs with `huge=within_size` the same bytes take 2 MiB pages.
//!
//! # Contract
//! - [`prepare`] mounts a tmpfs with `huge=within_size` (mode 0700, nosuid, nodev, noexec) on
//!   the cache directory when all of these hold: the directory is on a tmpfs without huge
//!   pages (`/dev/shm`, the default, is one), it is not a mount point itself (an operator's own
//!   mount is left as it is), it is missing or empty (files of an earlier run are not hidden),
//!   the chunk size is a multiple of 2 MiB (evicting a chunk frees whole pages), and the
//!   kernel allows it (root). Otherwise nothing changes; it says which and why.
//! - The new tmpfs may grow to the size of the one it sits in, so the limits computed from that
//!   one still stand.
//! - The mount stays when the agent exits: a restarted agent finds its warm cache in it (and,
//!   it being a mount point, mounts nothing).

use std::io;
use std::path::{Path, PathBuf};

/// What [`prepare`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HugePages {
    /// A tmpfs with huge pages was mounted on the directory now.
    Mounted,
    /// The directory already has huge pages (an earlier run's mount, or the operator's).
    Already,
    /// Left as it is, and why.
    Skipped(String),
}

const HUGE_PAGE: u64 = 2 << 20;

/// Mount a huge-page tmpfs on `dir` where the contract allows it.
pub fn prepare(dir: &Path, chunk_size: u64) -> HugePages {
    let skip = |why: &str| HugePages::Skipped(why.to_string());
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let Some(at) = existing_ancestor(dir) else { return skip("its parent directories cannot be resolved") };
    match tmpfs_huge(&mounts, &at) {
        None => return skip("it is not on tmpfs"),
        Some(true) => return HugePages::Already,
        Some(false) => {}
    }
    if crate::sys::mounted_at(&mounts, dir) {
        return skip("it is a mount point of its own");
    }
    if !chunk_size.is_multiple_of(HUGE_PAGE) {
        return skip("the chunk size is not a multiple of 2 MiB");
    }
    if std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some()) {
        return skip("it holds files of an earlier run");
    }
    let size = match crate::sys::statfs(&at) {
        Ok(s) => s.f_blocks.saturating_mul(s.f_bsize as u64),
        Err(e) => return skip(&format!("statfs: {e}")),
    };
    match mount(dir, size) {
        Ok(()) => HugePages::Mounted,
        Err(e) => skip(&format!("mounting a tmpfs there failed: {e}")),
    }
}

/// `dir`, or its nearest ancestor that exists, resolved.
fn existing_ancestor(dir: &Path) -> Option<PathBuf> {
    dir.ancestors().find_map(|a| std::fs::canonicalize(a).ok())
}

/// For the mount that holds `path` (resolved) in a `/proc/self/mounts` text: None if it is not
/// tmpfs, else whether it has huge pages.
fn tmpfs_huge(mounts: &str, path: &Path) -> Option<bool> {
    // The deepest mount point above the path; of several there, the last mounted.
    let entry = path.ancestors().find_map(|a| {
        let a = crate::sys::mount_table_path(a);
        mounts.lines().rfind(|l| l.split(' ').nth(1) == Some(a.as_str()))
    })?;
    let mut fields = entry.split(' ');
    let (fstype, options) = (fields.nth(2)?, fields.next().unwrap_or(""));
    if fstype != "tmpfs" {
        return None;
    }
    Some(options.split(',').any(|o| o.strip_prefix("huge=").is_some_and(|h| h != "never" && h != "deny")))
}

fn mount(dir: &Path, size: u64) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let c = |s: &str| std::ffi::CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte"));
    let (target, fstype) = (c(&dir.display().to_string())?, c("tmpfs")?);
    let data = c(&format!("huge=within_size,mode=0700,size={size}"))?;
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: valid NUL-terminated strings; mount(2) reads them and keeps no pointer.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), flags, data.as_ptr().cast()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /dev/shm tmpfs rw,relatime,size=24683772k 0 0
tmpfs /dev/shm/big tmpfs rw,relatime,size=8g,huge=within_size 0 0
tmpfs /dev/shm/never tmpfs rw,huge=never 0 0
tmpfs /dev/shm/two\\040words tmpfs rw,huge=always 0 0
tmpfs /dev/shm/re tmpfs rw,huge=always 0 0
tmpfs /dev/shm/re tmpfs rw 0 0
";

    /// The mount holding a path is the deepest one above it (the last of several at one
    /// place); only tmpfs counts, and `huge=never` is no huge pages.
    #[test]
    fn the_mount_holding_a_path_tells_its_huge_pages() {
        let at = |p: &str| tmpfs_huge(MOUNTS, Path::new(p));
        assert_eq!(at("/dev/shm/cachefs"), Some(false));
        assert_eq!(at("/dev/shm/big/cachefs"), Some(true));
        assert_eq!(at("/dev/shm/big"), Some(true));
        assert_eq!(at("/dev/shm/bigger/x"), Some(false));
        assert_eq!(at("/dev/shm/never/x"), Some(false));
        assert_eq!(at("/dev/shm/two words/x"), Some(true));
        assert_eq!(at("/dev/shm/re/x"), Some(false), "the later mount hides the earlier");
        assert_eq!(at("/var/cache/cachefs"), None);
    }

    /// A directory that holds files, or whose chunks are not whole huge pages, is left alone.
    #[test]
    fn a_directory_with_files_or_small_chunks_is_left_alone() {
        let d = tempfile::tempdir_in("/dev/shm").unwrap();
        std::fs::write(d.path().join("x"), b"1").unwrap();
        let with_files = prepare(d.path(), 8 << 20);
        assert!(!matches!(with_files, HugePages::Mounted), "{with_files:?}");
        let e = d.path().join("empty");
        let small = prepare(&e, 1 << 20);
        assert!(!matches!(small, HugePages::Mounted), "{small:?}");
        assert!(!crate::sys::is_mount_point(d.path()) && !crate::sys::is_mount_point(&e));
    }
}
