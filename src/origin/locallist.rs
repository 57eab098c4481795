//! Listing a local-directory origin file by file, so one file whose name cannot be an object key
//! (a control character, bytes that are not UTF-8) does not take the listing down:
//! `object_store`'s own local listing ends at the first such name.
//!
//! # Contract
//! - [`list`] returns every regular file under `root` (symlinks followed, as `object_store`
//!   does) whose relative path is a valid key (`object_store::path::Path::parse`), with the
//!   metadata the store itself gives it (`head`: the same etag its reads check), and the names it
//!   skipped. Files named like the store's own temporary uploads (`name#123`) are left out, as the
//!   store leaves them out.
//! - The walk runs off the async threads; every `head` has a timeout of
//!   [`super::LIST_PAGE_TIMEOUT`]. A file that vanishes between the walk and its `head` is
//!   left out; any other error fails the listing.

use std::path::PathBuf;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};

use super::s3list::Listing;
use super::{OriginError, LIST_PAGE_TIMEOUT};

/// What the walk found at one place.
enum Found {
    Key(Path),
    /// A file whose name cannot be a key, and why.
    BadName(String),
    /// The directory could not be read (permissions, a link loop): the listing fails.
    Io(String),
}

/// Every file under `root`.
fn walk(root: PathBuf) -> Vec<Found> {
    walkdir::WalkDir::new(&root)
        .min_depth(1)
        .follow_links(true)
        .into_iter()
        .filter_map(|e| match e {
            Ok(e) if e.file_type().is_file() => match key_of(&root, e.path()) {
                Ok(k) if temporary(&k) => None,
                Ok(k) => Some(Found::Key(k)),
                Err(why) => Some(Found::BadName(why)),
            },
            Ok(_) => None,
            Err(err) => Some(Found::Io(err.to_string())),
        })
        .collect()
}

/// The key of `file` under `root`.
fn key_of(root: &std::path::Path, file: &std::path::Path) -> Result<Path, String> {
    let rel = file.strip_prefix(root).map_err(|_| format!("{} is outside the source", file.display()))?;
    let name = rel.to_str().ok_or_else(|| format!("{:?} is not UTF-8", rel.display().to_string()))?;
    Path::parse(name).map_err(|e| format!("{name:?}: {e}"))
}

/// Named like the store's temporary upload files (`name#123`).
fn temporary(p: &Path) -> bool {
    p.filename().and_then(|f| f.rsplit_once('#')).is_some_and(|(_, s)| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
}

/// Every file under `root` (see the contract); `store` is the local store rooted there.
pub async fn list(store: &dyn ObjectStore, root: PathBuf, prefix: &Path) -> Result<Listing, OriginError> {
    let found = tokio::task::spawn_blocking(move || walk(root)).await.map_err(|e| OriginError::Request(format!("listing: {e}")))?;
    let mut listing = Listing::default();
    for k in found {
        let key = match k {
            Found::Key(key) => key,
            Found::Io(why) => return Err(OriginError::Request(format!("cannot list the source directory: {why}"))),
            Found::BadName(why) => {
                listing.skipped.push(why);
                continue;
            }
        };
        if key.prefix_match(prefix).is_none() {
            continue;
        }
        let head = tokio::time::timeout(LIST_PAGE_TIMEOUT, store.head(&key)).await.map_err(|_| OriginError::Timeout(LIST_PAGE_TIMEOUT))?;
        match head {
            Ok(meta) => listing.objects.push(meta),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(super::map_err(prefix.as_ref(), e)),
        }
    }
    Ok(listing)
}
