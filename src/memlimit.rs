//! How much memory the memory tier may use: what the host has available, what the agent's
//! cgroup (a container's memory limit) leaves, and what the cache directory's filesystem (a
//! tmpfs of limited size, Docker's 64 MiB `/dev/shm`) can hold.
//!
//! # Contract
//! - [`Limits::gather`] never fails: a limit that cannot be read is `None` (no limit known).
//! - [`Limits::default_cache_size`] is half the host's available memory, at most half of what
//!   the cgroup leaves, at most the room on the cache filesystem.
//! - [`Limits::check`] refuses an explicit size the cgroup or the filesystem cannot hold, with a
//!   one-line reason.
//! - The cache files already in the cache directory count as room in every limit (they are
//!   this agent's own, reused or removed at start): a size that fitted fits again on restart.

use std::path::{Path, PathBuf};

use crate::size::format_size;

/// Bytes kept free on the cache filesystem for journals.
const FS_HEADROOM: u64 = 1 << 20;

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `MemAvailable` of the host.
    pub host_available: Option<u64>,
    /// The tightest `memory.max` of this process's cgroup and its parents, minus what the
    /// cgroup uses now (cgroup v2).
    pub cgroup_room: Option<u64>,
    /// Free bytes on the cache directory's filesystem.
    pub fs_room: Option<u64>,
}

/// Where [`Limits::gather_from`] reads the machine's limits.
pub struct Sources<'a> {
    pub meminfo: &'a Path,
    pub cgroup_root: &'a Path,
    /// The text of `/proc/self/cgroup` (None: unknown).
    pub proc_cgroup: Option<String>,
}

impl Limits {
    /// The limits of this process with its cache in `cache_dir`.
    pub fn gather(cache_dir: &Path) -> Limits {
        let proc_cgroup = std::fs::read_to_string("/proc/self/cgroup").ok();
        Self::gather_from(
            cache_dir,
            &Sources { meminfo: Path::new("/proc/meminfo"), cgroup_root: Path::new("/sys/fs/cgroup"), proc_cgroup },
        )
    }

    /// The limits read from `src`, with the cache files already in `cache_dir` (an earlier
    /// run's, reused or removed at start) counted back as room in every limit they take from:
    /// the free space of their filesystem and, on tmpfs, `MemAvailable` (which excludes tmpfs
    /// pages) and the cgroup's use (which includes them). Without that, a restart would see
    /// its own warm cache as used and refuse, or shrink, the size that fitted before.
    pub fn gather_from(cache_dir: &Path, src: &Sources) -> Limits {
        let ours = cache_file_bytes(cache_dir);
        let in_memory = ours > 0 && crate::sys::is_tmpfs(cache_dir);
        let back = |room: Option<u64>| room.map(|r| if in_memory { r.saturating_add(ours) } else { r });
        Limits {
            host_available: back(host_available(src.meminfo)),
            cgroup_room: back(src.proc_cgroup.as_deref().and_then(|c| cgroup_room(src.cgroup_root, c))),
            fs_room: fs_free(cache_dir).map(|f| f.saturating_add(ours)),
        }
    }

    /// The memory tier's size when none is configured.
    pub fn default_cache_size(&self) -> Option<u64> {
        let host = self.host_available? / 2;
        let cg = self.cgroup_room.map(|r| r / 2).unwrap_or(u64::MAX);
        let fs = self.fs_room.map(|r| r.saturating_sub(FS_HEADROOM)).unwrap_or(u64::MAX);
        Some(host.min(cg).min(fs))
    }

    /// Why `size` cannot be the memory tier's size here, if it cannot.
    pub fn check(&self, size: u64) -> Result<(), TooLarge> {
        let over = |limit: &'static str, room: u64| TooLarge { size, limit, room };
        if let Some(a) = self.host_available.filter(|a| size > *a) {
            return Err(over("the available memory", a));
        }
        if let Some(r) = self.cgroup_room.filter(|r| size > *r) {
            return Err(over("what this cgroup's memory limit leaves", r));
        }
        if let Some(r) = self.fs_room.filter(|r| size > *r) {
            return Err(over("the free space of the cache directory's filesystem", r));
        }
        Ok(())
    }
}

/// An explicit `--cache-size` above one of the limits of this machine.
#[derive(Debug, thiserror::Error)]
#[error("--cache-size {} is above {limit} ({}): the memory tier lives in RAM", format_size(*.size), format_size(*.room))]
pub struct TooLarge {
    pub size: u64,
    pub limit: &'static str,
    pub room: u64,
}

/// `MemAvailable` from a meminfo file.
pub fn host_available(meminfo: &Path) -> Option<u64> {
    let info = std::fs::read_to_string(meminfo).ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// What the cgroup named in `proc_cgroup` (the text of `/proc/self/cgroup`) leaves under the
/// cgroup v2 tree at `root`: the tightest `memory.max - memory.current` of it and its parents.
pub fn cgroup_room(root: &Path, proc_cgroup: &str) -> Option<u64> {
    let rel = proc_cgroup.lines().find_map(|l| l.strip_prefix("0::"))?.trim().trim_start_matches('/');
    let mut dir: PathBuf = root.join(rel);
    let mut room: Option<u64> = None;
    loop {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).ok().and_then(|s| s.trim().parse::<u64>().ok());
        // "max" does not parse: no limit at this level.
        if let Some(max) = read("memory.max") {
            let used = read("memory.current").unwrap_or(0);
            let r = max.saturating_sub(used);
            room = Some(room.map_or(r, |x| x.min(r)));
        }
        if dir == root || !dir.pop() || !dir.starts_with(root) {
            break;
        }
    }
    room
}

/// Free bytes on the filesystem holding `dir` (or its nearest existing parent).
pub fn fs_free(dir: &Path) -> Option<u64> {
    let mut at = dir.to_path_buf();
    while !at.exists() {
        if !at.pop() {
            return None;
        }
    }
    let s = crate::sys::statfs(&at).ok()?;
    let block = if s.f_frsize > 0 { s.f_frsize } else { s.f_bsize };
    Some(s.f_bavail.saturating_mul(block as u64))
}

/// Bytes allocated to the memory tier's data files in `dir` (0 if there are none).
pub fn cache_file_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(crate::cache::memory::DATA_SUFFIX))
                .filter_map(|e| e.metadata().ok())
                .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
                .sum()
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_room_is_the_tightest_of_the_tree() {
        let root = tempfile::tempdir().unwrap();
        let pod = root.path().join("kubepods/pod1");
        let ctr = pod.join("ctr");
        std::fs::create_dir_all(&ctr).unwrap();
        std::fs::write(root.path().join("kubepods/memory.max"), "max\n").unwrap();
        std::fs::write(pod.join("memory.max"), format!("{}\n", 4u64 << 30)).unwrap();
        std::fs::write(pod.join("memory.current"), format!("{}\n", 1u64 << 30)).unwrap();
        std::fs::write(ctr.join("memory.max"), "max\n").unwrap();
        std::fs::write(ctr.join("memory.current"), "123\n").unwrap();
        assert_eq!(cgroup_room(root.path(), "0::/kubepods/pod1/ctr\n"), Some(3 << 30));
        assert_eq!(cgroup_room(root.path(), "0::/kubepods\n"), None, "no limit anywhere");
        assert_eq!(cgroup_room(root.path(), "12:memory:/x\n"), None, "cgroup v1 only: unknown");
    }

    #[test]
    fn default_and_check() {
        let l = Limits { host_available: Some(20 << 30), cgroup_room: Some(3 << 30), fs_room: Some(64 << 20) };
        assert_eq!(l.default_cache_size(), Some((64 << 20) - FS_HEADROOM), "Docker's 64 MiB /dev/shm");
        let l = Limits { fs_room: None, ..l };
        assert_eq!(l.default_cache_size(), Some(3 << 29), "half of what the cgroup leaves");
        let e = l.check(4 << 30).unwrap_err().to_string();
        assert!(e.contains("cgroup's memory limit"), "{e}");
        assert!(Limits { fs_room: Some(1 << 20), ..Default::default() }.check(2 << 20).unwrap_err().to_string().contains("free space"));
        assert_eq!(Limits::default().default_cache_size(), None);
        assert!(Limits::default().check(u64::MAX).is_ok());
    }

    /// A warm restart: the previous run's cache file (as large as the configured size) is in
    /// the tmpfs cache directory, so MemAvailable, the cgroup's use and the filesystem's free
    /// space all count its pages as taken. The same size must still be accepted.
    #[test]
    fn a_warm_restart_accepts_the_size_its_cache_already_has() {
        let size: u64 = 64 << 20;
        let cache = tempfile::tempdir_in("/dev/shm").unwrap();
        std::fs::write(cache.path().join(format!("v1{}", crate::cache::memory::DATA_SUFFIX)), vec![7u8; size as usize]).unwrap();
        let proc = tempfile::tempdir().unwrap();
        let meminfo = proc.path().join("meminfo");
        // The host has 16 MiB available besides the cache's own pages.
        std::fs::write(&meminfo, format!("MemTotal: 1000000 kB\nMemAvailable: {} kB\n", 16 << 10)).unwrap();
        let cg = proc.path().join("cg");
        std::fs::create_dir_all(cg.join("agent")).unwrap();
        // The cgroup allows the cache plus 8 MiB, and its use includes the cache.
        std::fs::write(cg.join("agent/memory.max"), format!("{}\n", size + (8 << 20))).unwrap();
        std::fs::write(cg.join("agent/memory.current"), format!("{}\n", size + (1 << 20))).unwrap();
        let src = Sources { meminfo: &meminfo, cgroup_root: &cg, proc_cgroup: Some("0::/agent\n".into()) };
        let l = Limits::gather_from(cache.path(), &src);
        assert_eq!(l.host_available, Some((16 << 20) + size));
        assert_eq!(l.cgroup_room, Some(size + (7 << 20)));
        assert!(l.check(size).is_ok(), "a restart refused the size its cache already holds: {:?}", l.check(size));
        assert!(l.check(size + (32 << 20)).is_err(), "room beyond the cache's own was made up");
        assert!(l.default_cache_size().is_some_and(|d| d >= size / 2), "the default shrank below the warm cache: {l:?}");
    }

    #[test]
    fn this_machine_has_limits() {
        let dir = tempfile::tempdir().unwrap();
        let l = Limits::gather(dir.path());
        assert!(l.host_available.is_some_and(|a| a > 0));
        assert!(l.fs_room.is_some());
        assert!(l.default_cache_size().is_some_and(|s| s <= l.host_available.unwrap() / 2));
    }
}
