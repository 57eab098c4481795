//! cachefs: a node-local agent that mounts a read-only model directory whose bytes come from
//! local memory, then peers, then an object store. See `README.md` and `docs/ARCHITECTURE.md`.
//!
//! The FUSE adapter (`fuse`) is thin; everything it calls lives in `fs` (filesystem core),
//! `catalog` (names, inodes, pinned versions), `cache` (chunks, memory tier, tiered reader)
//! and `origin` (the object store). They are tested without a mount.

pub mod admin;
pub mod agent;
pub mod cache;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod error;
pub mod fs;
pub mod fuse;
pub mod memlimit;
pub mod metrics;
pub mod origin;
pub mod peer;
pub mod preempt;
pub mod redact;
pub mod size;
pub mod splice;
pub mod swarm;
pub mod sys;
pub mod systemd;

pub use error::{Error, EXIT_RUNTIME, EXIT_USAGE};
