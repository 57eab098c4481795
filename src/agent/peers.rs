//! The peer part of an agent: membership of the mesh, the peer chunk source that sits ahead of
//! the origin, whole-file verification of what peers sent, and the server other agents read
//! this agent's chunks from. Absent when no peer setting is given.

use std::sync::Arc;

use tracing::{info, warn, Instrument};

use super::{AgentError, Shared};
use crate::cache::verify::Verifier;
use crate::cache::Reader;
use crate::config::PeerConfig;
use crate::peer::client::PeerTimeouts;
use crate::peer::gossip::Swim;
use crate::peer::handoff::Handoff;
use crate::peer::membership::Compat;
use crate::peer::tracking::Tracking;
use crate::peer::{Membership, PeerServer, PeerSource};
use crate::preempt::HandOff;

use super::storage::Storage;

/// Membership and verification of one agent in a mesh.
pub struct Peers {
    pub membership: Arc<Membership>,
    pub verifier: Arc<Verifier>,
    pub tracking: Arc<Tracking>,
    /// Membership gossip (when this agent listens for peers).
    pub gossip: Option<Arc<Swim>>,
}

impl Peers {
    /// The peer part for `cfg`, or None when this agent takes part in no mesh.
    pub fn build(
        cfg: &PeerConfig,
        source: String,
        read_timeout: std::time::Duration,
        storage: &Storage,
        shared: &Shared,
    ) -> Result<Option<Self>, AgentError> {
        if !cfg.enabled() {
            return Ok(None);
        }
        let compat = Compat { chunk_size: storage.memory.chunk_size(), source };
        let membership = Arc::new(Membership::new(shared.node_id.clone(), compat, cfg, shared.metrics.clone()).map_err(AgentError::Peers)?);
        if let Some(t) = &cfg.tls {
            crate::peer::server::check_tls(t).map_err(AgentError::Peers)?;
            info!("peer traffic uses mutual TLS");
        } else if cfg.tokens.is_empty() {
            warn!("peers are unauthenticated: only configured peers (--peers, --peer-dns) are used, but any host that reaches the peer port can read cached chunks (set --peer-token-file or mutual TLS)");
        }
        let (origin, memory) = (storage.origin.clone(), storage.memory.clone());
        let timeout = PeerTimeouts::within(read_timeout).inventory;
        let tracking =
            Arc::new(Tracking::new(membership.clone(), memory.clone(), shared.metrics.clone(), timeout, shared.draining.clone()));
        let verifier = Verifier::new(origin, memory, membership.clone(), shared.metrics.clone(), shared.tasks.clone(), shared.stop.clone());
        let gossip = cfg.listen.map(|listen| {
            Arc::new(Swim::new(membership.clone(), shared.metrics.clone(), listen, shared.tasks.clone(), shared.stop.clone()))
        });
        Ok(Some(Peers { membership, verifier, tracking, gossip }))
    }

    /// The chunk source that asks peers before the origin, within `read_timeout` (it also
    /// takes the chunks draining peers hand off).
    pub fn source(&self, storage: &Storage, read_timeout: std::time::Duration, shared: &Shared) -> Arc<PeerSource> {
        let timeouts = PeerTimeouts::within(read_timeout);
        let source = PeerSource::new(
            self.membership.clone(),
            storage.memory.clone(),
            shared.draining.clone(),
            timeouts,
            shared.metrics.clone(),
            shared.tasks.clone(),
        );
        Arc::new(source.with_verifier(self.verifier.clone()).with_tracking(self.tracking.clone()))
    }

    /// What hands off this agent's sole copies when it drains.
    pub fn handoff(&self, storage: &Storage, read_timeout: std::time::Duration, shared: &Shared) -> Arc<dyn HandOff> {
        Arc::new(Handoff {
            membership: self.membership.clone(),
            memory: storage.memory.clone(),
            catalog: storage.catalog.clone(),
            metrics: shared.metrics.clone(),
            inventory_timeout: PeerTimeouts::within(read_timeout).inventory,
            tracking: Some(self.tracking.clone()),
        })
    }

    /// Serve this agent's chunks on `cfg.listen` (when set) until shutdown.
    pub async fn serve(
        &self,
        cfg: &PeerConfig,
        source: String,
        storage: &Storage,
        reader: &Arc<Reader>,
        handoff: Arc<PeerSource>,
        shared: &Shared,
    ) -> Result<(), AgentError> {
        let Some(listen) = cfg.listen else { return Ok(()) };
        let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| AgentError::Listen(listen.to_string(), e))?;
        let server = PeerServer {
            catalog: storage.catalog.clone(),
            reader: reader.clone(),
            metrics: shared.metrics.clone(),
            membership: self.membership.clone(),
            node_id: shared.node_id.clone(),
            source,
            draining: shared.draining.clone(),
            active: shared.peer_streams.clone(),
            raw_data: cfg.tls.is_none(),
            handoff: Some(handoff),
            streams: Default::default(),
            fills: Default::default(),
            tracking: Some(self.tracking.clone()),
            gossip: self.gossip.clone(),
        };
        let announcer = self.tracking.clone().run(reader.clone(), shared.stop.clone());
        shared.tasks.spawn(announcer.instrument(tracing::info_span!("tracking")));
        info!(listen = %listen, node = %shared.node_id, "serving chunks to peers");
        let (tokens, tls, stop, raw_tasks) = (cfg.tokens.clone(), cfg.tls.clone(), shared.stop.clone(), shared.tasks.clone());
        let serve = async move {
            if let Err(e) = crate::peer::server::serve(server, listener, tokens, tls, raw_tasks, stop).await {
                warn!(error = %e, "peer server stopped");
            }
        };
        shared.tasks.spawn(serve.instrument(tracing::info_span!("peer_server")));
        Ok(())
    }

    /// Find the peers once (DNS, Hello to each), then keep probing them and gossiping until
    /// shutdown.
    pub async fn join(&self, shared: &Shared) {
        let m = &self.membership;
        m.resolve().await;
        m.probe_all().await;
        info!(peers = m.all().len(), live = m.live().len(), "peer membership ready");
        shared.tasks.spawn(m.clone().run(shared.stop.clone()).instrument(tracing::info_span!("membership")));
        if let Some(g) = &self.gossip {
            shared.tasks.spawn(g.clone().run().instrument(tracing::info_span!("gossip")));
        }
    }
}
