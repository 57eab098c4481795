//! The few raw syscalls the agent makes on paths, each wrapped once: `statfs`, a lazy unmount,
//! and "is this a mount point" from the mount table.

use std::ffi::CString;
use std::io;
use std::path::Path;

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes()).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains a NUL byte"))
}

/// `statfs(2)` of `path`. On a FUSE mount this always reaches the daemon behind it.
pub fn statfs(path: &Path) -> io::Result<libc::statfs> {
    let c = c_path(path)?;
    // SAFETY: zeroed is a valid statfs (plain integers).
    let mut s: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and s a valid out-pointer.
    if unsafe { libc::statfs(c.as_ptr(), &mut s) } == 0 {
        Ok(s)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `path` is on tmpfs.
pub fn is_tmpfs(path: &Path) -> bool {
    statfs(path).is_ok_and(|s| s.f_type == libc::TMPFS_MAGIC)
}

/// Detach whatever is mounted at `path` lazily (`umount2(MNT_DETACH)`): it goes away once
/// nothing uses it any more.
pub fn detach(path: &Path) -> io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: c is a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether `path` is a mount point now, from the mount table (`stat` may be answered from the
/// kernel's attribute cache even when the FUSE daemon behind it is gone).
pub fn is_mount_point(path: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else { return false };
    mounted_at(&mounts, path)
}

/// Whether a `/proc/self/mounts` text has a mount at `path`.
pub fn mounted_at(mounts: &str, path: &Path) -> bool {
    let escaped = mount_table_path(path);
    mounts.lines().any(|l| l.split(' ').nth(1) == Some(escaped.as_str()))
}

/// `path` as the mount table writes it (spaces and the like escaped as octal).
pub fn mount_table_path(path: &Path) -> String {
    path.display().to_string().replace('\\', "\\134").replace(' ', "\\040").replace('\t', "\\011").replace('\n', "\\012")
}
