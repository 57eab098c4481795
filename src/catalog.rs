//! Names, inodes and pinned object versions. Built from a listing of the source prefix and
//! refreshed on a TTL. No fuser types here.
//!
//! # Contract
//! - Each file is pinned to one [`ObjectVersion`] `(key, etag/version, size)`; a refresh that
//!   sees a different etag or size replaces the pin with a new `Arc`, so new opens see the new
//!   bytes while open handles keep the version they opened.
//! - An inode names one version of one file, never another: a changed object gets a new inode
//!   (so the kernel's page cache and attributes of one version never serve another). An inode
//!   that no longer names anything is [`Error::Stale`] (the kernel then looks the name up again).
//!   Directories keep their inode for the catalog's life.
//! - Directories come from `/` in keys; a key that is both a file and a directory prefix is shown
//!   as the directory (the file is skipped with a warning).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use object_store::path::Path;
use sha2::{Digest, Sha256};

use crate::error::Error;

pub const ROOT_INO: u64 = 1;

/// One version of one object: what a chunk key and a cache file are tied to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectVersion {
    /// Key relative to the source prefix, `/`-separated.
    pub key: String,
    /// Full location in the object store.
    pub location: Path,
    pub etag: Option<String>,
    pub version: Option<String>,
    pub size: u64,
    pub mtime: SystemTime,
    /// Stable identity of this version (hex), used for chunk keys and cache file names.
    pub id: Arc<str>,
    /// Permission bits at the origin, where it has them (a local directory); see [`Entry::perm`].
    pub mode: Option<u32>,
}

impl ObjectVersion {
    pub fn new(key: String, location: Path, etag: Option<String>, version: Option<String>, size: u64, mtime: SystemTime) -> Self {
        let mut h = Sha256::new();
        for part in [location.as_ref(), etag.as_deref().unwrap_or(""), version.as_deref().unwrap_or("")] {
            h.update(part.as_bytes());
            h.update([0u8]);
        }
        h.update(size.to_le_bytes());
        let id: Arc<str> = hex::encode(&h.finalize()[..16]).into();
        ObjectVersion { key, location, etag, version, size, mtime, id, mode: None }
    }

    /// Same bytes at the origin (same etag, version and size).
    pub fn same_version(&self, other: &ObjectVersion) -> bool {
        self.id == other.id
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
}

/// Permission bits of files whose origin has none (object stores): everyone may read.
pub const DEFAULT_FILE_PERM: u16 = 0o444;
/// Permission bits of directories.
pub const DIR_PERM: u16 = 0o555;

/// What `lookup`/`getattr` return.
#[derive(Debug, Clone)]
pub struct Entry {
    pub ino: u64,
    pub kind: Kind,
    pub size: u64,
    pub mtime: SystemTime,
    /// Origin permission bits of a file, if the origin has them.
    pub mode: Option<u32>,
}

impl Entry {
    /// The attributes of `o` under inode `ino`.
    pub fn file(ino: u64, o: &ObjectVersion) -> Entry {
        Entry { ino, kind: Kind::File, size: o.size, mtime: o.mtime, mode: o.mode }
    }

    /// Permission bits the mount shows: a file's origin bits without write bits (the mount is
    /// read-only), else [`DEFAULT_FILE_PERM`]; [`DIR_PERM`] for directories.
    pub fn perm(&self) -> u16 {
        match (self.kind, self.mode) {
            (Kind::Dir, _) => DIR_PERM,
            (Kind::File, Some(m)) => (m & 0o555) as u16,
            (Kind::File, None) => DEFAULT_FILE_PERM,
        }
    }
}

#[derive(Debug, Clone)]
pub struct DirEntry {
    pub ino: u64,
    pub kind: Kind,
    pub name: String,
}

#[derive(Debug, Clone)]
enum NodeData {
    Dir { children: BTreeMap<String, u64> },
    File(Arc<ObjectVersion>),
}

#[derive(Debug, Clone)]
struct Node {
    parent: u64,
    data: NodeData,
}

#[derive(Debug, Default, Clone)]
struct Tree {
    nodes: HashMap<u64, Node>,
    by_path: HashMap<String, u64>,
    next_ino: u64,
    mtime: Option<SystemTime>,
}

/// What a refresh changed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Changes {
    pub added: usize,
    pub changed: usize,
    pub removed: usize,
    /// Versions the catalog listed before and no longer does (changed or removed objects).
    pub retired: Vec<Arc<ObjectVersion>>,
}

/// The tree is replaced whole by each refresh: lookups read the current one and never wait
/// for a refresh to be built.
pub struct Catalog {
    tree: RwLock<Arc<Tree>>,
    /// One refresh at a time.
    applying: std::sync::Mutex<()>,
    started: SystemTime,
}

impl Default for Catalog {
    fn default() -> Self {
        Self::new()
    }
}

impl Catalog {
    pub fn new() -> Self {
        let mut tree = Tree { next_ino: ROOT_INO + 1, ..Default::default() };
        tree.nodes.insert(ROOT_INO, Node { parent: ROOT_INO, data: NodeData::Dir { children: BTreeMap::new() } });
        tree.by_path.insert(String::new(), ROOT_INO);
        Catalog { tree: RwLock::new(Arc::new(tree)), applying: Default::default(), started: SystemTime::now() }
    }

    fn read(&self) -> Arc<Tree> {
        self.tree.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replace the contents with `objects` (a full listing), keeping inode numbers by path.
    pub fn apply(&self, objects: Vec<ObjectVersion>) -> Changes {
        let _one = self.applying.lock().unwrap_or_else(|p| p.into_inner());
        let before = self.read();
        let mut tree = Tree::clone(&before);
        let mut changes = apply_to(&mut tree, objects);
        changes.retired = retired(&before, &tree);
        *self.tree.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tree);
        changes
    }
}

/// The file versions of `before` that `after` no longer has.
fn retired(before: &Tree, after: &Tree) -> Vec<Arc<ObjectVersion>> {
    let files = |t: &Tree| -> Vec<Arc<ObjectVersion>> {
        t.nodes.values().filter_map(|n| if let NodeData::File(o) = &n.data { Some(o.clone()) } else { None }).collect()
    };
    let now: HashSet<Arc<str>> = files(after).into_iter().map(|o| o.id.clone()).collect();
    files(before).into_iter().filter(|o| !now.contains(&o.id)).collect()
}

/// [`Catalog::apply`] on a private copy of the tree.
fn apply_to(tree: &mut Tree, objects: Vec<ObjectVersion>) -> Changes {
    {
        let mut changes = Changes::default();
        // Which paths are directories in this listing.
        let mut dirs: HashSet<String> = HashSet::from([String::new()]);
        for o in &objects {
            let mut p = o.key.as_str();
            while let Some((parent, _)) = p.rsplit_once('/') {
                dirs.insert(parent.to_string());
                p = parent;
            }
        }
        let mut keep: HashSet<String> = dirs.clone();
        let mut sorted_dirs: Vec<&String> = dirs.iter().collect();
        sorted_dirs.sort_by_key(|d| d.matches('/').count() + usize::from(!d.is_empty()));
        for d in sorted_dirs {
            ensure_dir(tree, d);
        }
        for o in objects {
            if dirs.contains(&o.key) || o.key.split('/').any(|p| p.is_empty() || p == "." || p == "..") {
                tracing::warn!(key = %o.key, "skipping object: its name is also a directory or not a valid path");
                continue;
            }
            keep.insert(o.key.clone());
            let parent_path = o.key.rsplit_once('/').map(|(p, _)| p).unwrap_or("").to_string();
            let name = o.key.rsplit_once('/').map(|(_, n)| n).unwrap_or(&o.key).to_string();
            match tree.by_path.get(&o.key).copied() {
                Some(ino) => {
                    let same = matches!(tree.nodes.get(&ino).map(|n| &n.data), Some(NodeData::File(old)) if old.same_version(&o));
                    if !same {
                        // A new version, a new inode: the old one is retired (stale).
                        let parent = tree.nodes.remove(&ino).map(|n| n.parent).unwrap_or(ROOT_INO);
                        add_file(tree, parent, name, o);
                        changes.changed += 1;
                    }
                }
                None => {
                    let parent = tree.by_path.get(&parent_path).copied().unwrap_or(ROOT_INO);
                    add_file(tree, parent, name, o);
                    changes.added += 1;
                }
            }
        }
        // Drop what the listing no longer has.
        let gone: Vec<(String, u64)> = tree.by_path.iter().filter(|(p, _)| !keep.contains(*p)).map(|(p, i)| (p.clone(), *i)).collect();
        for (path, ino) in gone {
            tree.by_path.remove(&path);
            if let Some(node) = tree.nodes.remove(&ino) {
                if matches!(node.data, NodeData::File(_)) {
                    changes.removed += 1;
                }
                let name = path.rsplit_once('/').map(|(_, n)| n).unwrap_or(&path).to_string();
                if let Some(Node { data: NodeData::Dir { children }, .. }) = tree.nodes.get_mut(&node.parent) {
                    children.remove(&name);
                }
            }
        }
        if changes != Changes::default() {
            tree.mtime = Some(SystemTime::now());
        }
        changes
    }
}

impl Catalog {
    fn entry(&self, tree: &Tree, ino: u64) -> Result<Entry, Error> {
        let node = node(tree, ino)?;
        Ok(match &node.data {
            NodeData::Dir { .. } => Entry { ino, kind: Kind::Dir, size: 0, mtime: tree.mtime.unwrap_or(self.started), mode: None },
            NodeData::File(o) => Entry::file(ino, o),
        })
    }

    pub fn lookup(&self, parent: u64, name: &str) -> Result<Entry, Error> {
        let tree = self.read();
        let node = node(&tree, parent)?;
        match &node.data {
            NodeData::Dir { children } => {
                let ino = *children.get(name).ok_or(Error::NotFound)?;
                self.entry(&tree, ino)
            }
            NodeData::File(_) => Err(Error::NotDir),
        }
    }

    pub fn getattr(&self, ino: u64) -> Result<Entry, Error> {
        self.entry(&self.read(), ino)
    }

    /// Entries of a directory, `.` and `..` first, in a stable order.
    pub fn readdir(&self, ino: u64) -> Result<Vec<DirEntry>, Error> {
        let tree = self.read();
        let node = node(&tree, ino)?;
        let NodeData::Dir { children } = &node.data else { return Err(Error::NotDir) };
        let mut out =
            vec![DirEntry { ino, kind: Kind::Dir, name: ".".into() }, DirEntry { ino: node.parent, kind: Kind::Dir, name: "..".into() }];
        for (name, child) in children {
            let kind = match tree.nodes.get(child).map(|n| &n.data) {
                Some(NodeData::Dir { .. }) => Kind::Dir,
                Some(NodeData::File(_)) => Kind::File,
                None => continue,
            };
            out.push(DirEntry { ino: *child, kind, name: name.clone() });
        }
        Ok(out)
    }

    /// The version a new open of `ino` gets.
    pub fn object(&self, ino: u64) -> Result<Arc<ObjectVersion>, Error> {
        let tree = self.read();
        match &node(&tree, ino)?.data {
            NodeData::File(o) => Ok(o.clone()),
            NodeData::Dir { .. } => Err(Error::IsDir),
        }
    }

    /// The version at a path relative to the mount root (`a/b.bin`).
    pub fn object_at(&self, path: &str) -> Result<Arc<ObjectVersion>, Error> {
        let path = path.trim_matches('/');
        let ino = *self.read().by_path.get(path).ok_or(Error::NotFound)?;
        self.object(ino)
    }

    /// The inode that serves `obj` now (its path, as that version), if any.
    pub fn ino_of(&self, obj: &ObjectVersion) -> Option<u64> {
        let tree = self.read();
        let ino = *tree.by_path.get(obj.key.as_str())?;
        match &node(&tree, ino).ok()?.data {
            NodeData::File(o) if o.id == obj.id => Some(ino),
            _ => None,
        }
    }

    /// Every file version now in the catalog.
    pub fn files(&self) -> Vec<Arc<ObjectVersion>> {
        self.read()
            .nodes
            .values()
            .filter_map(|n| match &n.data {
                NodeData::File(o) => Some(o.clone()),
                _ => None,
            })
            .collect()
    }
}

/// The node of `ino`: an inode given out before that names nothing now is stale.
fn node(tree: &Tree, ino: u64) -> Result<&Node, Error> {
    match tree.nodes.get(&ino) {
        Some(n) => Ok(n),
        None if ino > ROOT_INO && ino < tree.next_ino => Err(Error::Stale(format!("inode {ino}"))),
        None => Err(Error::NotFound),
    }
}

/// Give `o` a new inode under `parent` as `name` (replacing whatever the name pointed to).
fn add_file(tree: &mut Tree, parent: u64, name: String, o: ObjectVersion) {
    let ino = tree.next_ino;
    tree.next_ino += 1;
    tree.by_path.insert(o.key.clone(), ino);
    tree.nodes.insert(ino, Node { parent, data: NodeData::File(Arc::new(o)) });
    if let Some(Node { data: NodeData::Dir { children }, .. }) = tree.nodes.get_mut(&parent) {
        children.insert(name, ino);
    }
}

fn ensure_dir(tree: &mut Tree, path: &str) {
    if let Some(ino) = tree.by_path.get(path).copied() {
        if matches!(tree.nodes.get(&ino).map(|n| &n.data), Some(NodeData::Dir { .. })) {
            return;
        }
        // A file became a directory: its inode is retired with it.
        tree.nodes.remove(&ino);
    }
    let (parent_path, name) = path.rsplit_once('/').unwrap_or(("", path));
    let parent = tree.by_path.get(parent_path).copied().unwrap_or(ROOT_INO);
    let ino = tree.next_ino;
    tree.next_ino += 1;
    tree.nodes.insert(ino, Node { parent, data: NodeData::Dir { children: BTreeMap::new() } });
    tree.by_path.insert(path.to_string(), ino);
    if let Some(Node { data: NodeData::Dir { children }, .. }) = tree.nodes.get_mut(&parent) {
        children.insert(name.to_string(), ino);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(key: &str, etag: &str, size: u64) -> ObjectVersion {
        ObjectVersion::new(key.into(), Path::from(key), Some(etag.into()), None, size, SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn tree_and_refresh() {
        let c = Catalog::new();
        let ch = c.apply(vec![v("a/b/c.bin", "1", 10), v("a/d.bin", "1", 5), v("top", "1", 0)]);
        assert_eq!(ch, Changes { added: 3, changed: 0, removed: 0, retired: vec![] });
        let a = c.lookup(ROOT_INO, "a").unwrap();
        assert_eq!(a.kind, Kind::Dir);
        let b = c.lookup(a.ino, "b").unwrap();
        let f = c.lookup(b.ino, "c.bin").unwrap();
        assert_eq!((f.kind, f.size), (Kind::File, 10));
        let names: Vec<String> = c.readdir(a.ino).unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, vec![".", "..", "b", "d.bin"]);
        assert!(matches!(c.lookup(ROOT_INO, "nope"), Err(Error::NotFound)));
        assert!(matches!(c.lookup(f.ino, "x"), Err(Error::NotDir)));
        assert!(matches!(c.object(a.ino), Err(Error::IsDir)));

        let old = c.object(f.ino).unwrap();
        let ch = c.apply(vec![v("a/b/c.bin", "2", 12), v("top", "1", 0)]);
        assert_eq!((ch.added, ch.changed, ch.removed), (0, 1, 1));
        let mut retired: Vec<(&str, Option<&str>)> = ch.retired.iter().map(|o| (o.key.as_str(), o.etag.as_deref())).collect();
        retired.sort();
        assert_eq!(retired, vec![("a/b/c.bin", Some("1")), ("a/d.bin", Some("1"))]);
        let f2 = c.lookup(b.ino, "c.bin").unwrap();
        assert_eq!(f2.size, 12);
        assert_ne!(f2.ino, f.ino, "a new version gets a new inode");
        assert_eq!(old.size, 10, "an open handle keeps its version");
        assert!(!c.object(f2.ino).unwrap().same_version(&old));
        assert!(matches!(c.getattr(f.ino), Err(Error::Stale(_))), "the old inode is stale");
        assert!(matches!(c.object(f.ino), Err(Error::Stale(_))));
        assert!(matches!(c.getattr(999_999), Err(Error::NotFound)));
        // The same version again keeps the inode.
        c.apply(vec![v("a/b/c.bin", "2", 12), v("top", "1", 0)]);
        assert_eq!(c.lookup(b.ino, "c.bin").unwrap().ino, f2.ino);
        assert!(matches!(c.lookup(a.ino, "d.bin"), Err(Error::NotFound)));
        assert_eq!(c.object_at("/a/b/c.bin").unwrap().size, 12);
    }

    #[test]
    fn file_shadowed_by_dir() {
        let c = Catalog::new();
        c.apply(vec![v("x", "1", 1), v("x/y", "1", 2)]);
        assert_eq!(c.lookup(ROOT_INO, "x").unwrap().kind, Kind::Dir);
    }
}
