//! A misbehaving peer: a real gRPC server that answers `Hello` like a healthy agent and, as
//! chosen, claims every chunk and fails on data, holds nothing, or never answers anything else.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;

use cachefs::peer::proto::peer_server::{Peer, PeerServer};
use cachefs::peer::proto::*;
use futures::Stream;
use tonic::{Request, Response, Status};

/// How the fake answers `ReadChunk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Misbehave {
    /// Sends the first 64 KiB, then nothing, forever.
    Stall = 0,
    /// Announces a chunk one byte longer than it is.
    WrongLength = 1,
    /// Sends the whole chunk with a crc32c that does not match it.
    BadChecksum = 2,
    /// Answers NOT_FOUND although its inventory claims the chunk (a lost chunk: no backoff).
    Refuse = 3,
    /// Holds nothing: an empty inventory, NOT_FOUND for every chunk, no handoffs.
    Empty = 4,
    /// Answers Hello, then never answers any other request (a peer stuck after its probe).
    Unresponsive = 5,
}

struct Svc {
    chunk_size: u64,
    source: String,
    node_id: String,
    mode: Arc<AtomicU8>,
    hellos: Arc<AtomicU64>,
    reads: Arc<AtomicU64>,
    seen: Arc<std::sync::Mutex<Option<ObjectRef>>>,
}

impl Svc {
    /// Never returns when unresponsive.
    async fn hang(&self) {
        if self.mode.load(Ordering::SeqCst) == Misbehave::Unresponsive as u8 {
            futures::future::pending::<()>().await;
        }
    }
}

type DataStream = Pin<Box<dyn Stream<Item = Result<ChunkData, Status>> + Send>>;

#[tonic::async_trait]
impl Peer for Svc {
    type ReadChunkStream = DataStream;

    async fn read_chunk(&self, req: Request<ReadChunkRequest>) -> Result<Response<DataStream>, Status> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        let r = req.into_inner();
        self.hang().await;
        if [Misbehave::Refuse as u8, Misbehave::Empty as u8].contains(&self.mode.load(Ordering::SeqCst)) {
            return Err(Status::not_found("chunk not held"));
        }
        let size = r.object.map(|o| o.size).unwrap_or(0);
        let start = r.index * self.chunk_size;
        let want = self.chunk_size.min(size.saturating_sub(start));
        let zeros = |n: u64| bytes::Bytes::from(vec![0u8; n as usize]);
        let stream: DataStream = match self.mode.load(Ordering::SeqCst) {
            0 => {
                let first = ChunkData { offset: 0, data: zeros(want.min(64 << 10)), chunk_len: want, crc32c: 0 };
                Box::pin(futures::stream::iter([Ok(first)]).chain(futures::stream::pending()))
            }
            1 => Box::pin(futures::stream::iter([Ok(ChunkData { offset: 0, data: zeros(want), chunk_len: want + 1, crc32c: 0 })])),
            _ => {
                let crc = crc32c::crc32c(&vec![0u8; want as usize]) ^ 1;
                Box::pin(futures::stream::iter([Ok(ChunkData { offset: 0, data: zeros(want), chunk_len: want, crc32c: crc })]))
            }
        };
        Ok(Response::new(stream))
    }

    async fn inventory(&self, req: Request<InventoryRequest>) -> Result<Response<InventoryResponse>, Status> {
        let r = req.into_inner();
        if let Some(o) = r.objects.first() {
            *self.seen.lock().unwrap() = Some(o.clone());
        }
        self.hang().await;
        let all = if self.mode.load(Ordering::SeqCst) == Misbehave::Empty as u8 { 0 } else { 0xff };
        let objects = r
            .objects
            .into_iter()
            .map(|o| {
                let chunks = o.size.div_ceil(self.chunk_size);
                ObjectInventory {
                    key: o.key,
                    etag: o.etag,
                    present: vec![all; chunks.div_ceil(8) as usize].into(),
                    chunks,
                    filling: Default::default(),
                    digests: Default::default(),
                    digests_mac: Default::default(),
                }
            })
            .collect();
        Ok(Response::new(InventoryResponse { objects, draining: false }))
    }

    async fn hello(&self, _req: Request<HelloRequest>) -> Result<Response<HelloResponse>, Status> {
        self.hellos.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(HelloResponse {
            node_id: self.node_id.clone(),
            protocol: cachefs::peer::PROTOCOL,
            draining: false,
            chunk_size: self.chunk_size,
            source: self.source.clone(),
            raw_data: false,
        }))
    }

    async fn drain(&self, _req: Request<DrainNotice>) -> Result<Response<DrainAck>, Status> {
        self.hang().await;
        Ok(Response::new(DrainAck {}))
    }

    type HandoffStream = Pin<Box<dyn Stream<Item = Result<HandoffProgress, Status>> + Send>>;

    /// A misbehaving peer takes no handoffs.
    async fn lookup(
        &self,
        _r: tonic::Request<cachefs::peer::proto::LookupRequest>,
    ) -> Result<tonic::Response<cachefs::peer::proto::LookupResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("tracks nothing"))
    }

    async fn announce(
        &self,
        _r: tonic::Request<cachefs::peer::proto::AnnounceRequest>,
    ) -> Result<tonic::Response<cachefs::peer::proto::AnnounceResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("tracks nothing"))
    }

    async fn gossip(
        &self,
        _r: tonic::Request<cachefs::peer::proto::GossipMessage>,
    ) -> Result<tonic::Response<cachefs::peer::proto::GossipAck>, tonic::Status> {
        Err(tonic::Status::unimplemented("does not gossip"))
    }

    async fn handoff(&self, _req: Request<HandoffRequest>) -> Result<Response<Self::HandoffStream>, Status> {
        self.hang().await;
        Err(Status::unimplemented("takes no handoffs"))
    }
}

use futures::StreamExt;

pub struct FakePeer {
    pub addr: String,
    pub hellos: Arc<AtomicU64>,
    pub reads: Arc<AtomicU64>,
    /// The last object an agent asked this fake's inventory about, as the agent names it.
    pub seen: Arc<std::sync::Mutex<Option<ObjectRef>>>,
    mode: Arc<AtomicU8>,
    _rt: tokio::runtime::Runtime,
}

impl FakePeer {
    /// A fake peer of agents serving `source` in chunks of `chunk_size`, on 127.0.0.1.
    pub fn start(source: &str, chunk_size: u64, mode: Misbehave) -> FakePeer {
        Self::start_on("127.0.0.1:0", source, chunk_size, mode)
    }

    /// [`FakePeer::start`] listening on `addr`.
    pub fn start_on(addr: &str, source: &str, chunk_size: u64, mode: Misbehave) -> FakePeer {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let listener = rt.block_on(tokio::net::TcpListener::bind(addr)).unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (mode, hellos, reads) = (Arc::new(AtomicU8::new(mode as u8)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
        let seen = Arc::new(std::sync::Mutex::new(None));
        let svc = Svc {
            chunk_size,
            source: source.to_string(),
            node_id: format!("fake-{addr}"),
            mode: mode.clone(),
            hellos: hellos.clone(),
            reads: reads.clone(),
            seen: seen.clone(),
        };
        rt.spawn(async move {
            let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
            let _ = tonic::transport::Server::builder().add_service(PeerServer::new(svc)).serve_with_incoming(incoming).await;
        });
        FakePeer { addr, hellos, reads, seen, mode, _rt: rt }
    }

    pub fn set_mode(&self, m: Misbehave) {
        self.mode.store(m as u8, Ordering::SeqCst);
    }
}
