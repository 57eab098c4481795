//! Peers: other agents that serve chunks from their memory over gRPC (`proto/cachefs.proto`).
//!
//! - `placement`: which live peer owns a chunk (rendezvous hashing).
//! - `membership`: who the peers are (static list, DNS), their identity, state and backoff.
//! - `inventory`: which chunks each peer holds or fills, per object, refreshed in the background.
//! - `client`: the peer tier of the read path ([`PeerSource`], a `ChunkSource`).
//! - `server`: what this agent serves to others ([`PeerServer`]); `streams`: its gRPC chunk streams.
//! - `handoff`: handing off sole copies before this agent goes away, and taking them.
//! - `gossip`: membership gossip (`swarm::gossip`, SWIM) over the `Gossip` RPC.
//! - `tracking`: holder discovery by segment trackers (`swarm::Discovery` over gRPC).
//! - `raw`: the bulk data path (`ReadChunk` without HTTP/2, on the same port, when not using TLS).

pub mod auth;
pub mod client;
pub mod gossip;
pub mod handoff;
pub mod inventory;
pub mod membership;
pub mod placement;
pub mod raw;
pub mod server;
pub mod streams;
pub mod tracking;
pub mod vouch;

pub use client::PeerSource;
pub use membership::Membership;
pub use server::PeerServer;

/// Generated from `proto/cachefs.proto`.
#[allow(clippy::all)]
pub mod proto {
    tonic::include_proto!("cachefs.v1");
}

/// Wire revision of this agent's peer protocol.
pub const PROTOCOL: u32 = 2;
/// gRPC metadata key carrying the shared peer token.
pub const TOKEN_HEADER: &str = "x-cachefs-token";
/// Most chunk bytes in one `ChunkData` message.
pub const MESSAGE_BYTES: usize = 1 << 20;
/// HTTP/2 flow-control windows: the 64 KiB default caps a stream at a few hundred MB/s.
pub const STREAM_WINDOW: u32 = 32 << 20;
pub const CONNECTION_WINDOW: u32 = 128 << 20;
/// HTTP/2 frame size (the default 16 KiB costs a frame header and a wakeup per 16 KiB).
pub const FRAME_SIZE: u32 = 1 << 20;

/// Largest gRPC message accepted either way (a data message plus headroom).
pub const MAX_GRPC_MESSAGE: usize = MESSAGE_BYTES + (64 << 10);

use crate::catalog::ObjectVersion;

/// The wire name of an object version.
pub fn object_ref(o: &ObjectVersion) -> proto::ObjectRef {
    proto::ObjectRef {
        key: o.key.clone(),
        etag: o.etag.clone().unwrap_or_default(),
        version: o.version.clone().unwrap_or_default(),
        size: o.size,
    }
}

/// Whether `r` names exactly version `o`.
pub fn same_version(o: &ObjectVersion, r: &proto::ObjectRef) -> bool {
    o.key == r.key && o.etag.as_deref().unwrap_or("") == r.etag && o.version.as_deref().unwrap_or("") == r.version && o.size == r.size
}

/// A bitmap of `n` bits, least significant bit first.
pub fn bitmap(n: u64, mut present: impl FnMut(u64) -> bool) -> Vec<u8> {
    let mut v = vec![0u8; n.div_ceil(8) as usize];
    for i in 0..n {
        if present(i) {
            v[(i / 8) as usize] |= 1 << (i % 8);
        }
    }
    v
}

pub fn bit(map: &[u8], i: u64) -> bool {
    map.get((i / 8) as usize).is_some_and(|b| b & (1 << (i % 8)) != 0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn bitmaps() {
        let m = super::bitmap(11, |i| i % 3 == 0);
        assert_eq!(m.len(), 2);
        for i in 0..11 {
            assert_eq!(super::bit(&m, i), i % 3 == 0);
        }
        assert!(!super::bit(&m, 100));
    }
}
