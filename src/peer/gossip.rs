//! Membership gossip between agents: the SWIM state machine of [`crate::swarm::gossip`] (foca),
//! its messages carried by the `Gossip` RPC of the peer port.
//!
//! # Contract
//! - It starts from the peers that answered this agent's first Hellos; peers that answer later
//!   are added as they do (checked every [`SYNC_EVERY`]).
//! - What gossip says is a hint, never the truth about a member: a member reported up is probed
//!   with Hello at its address (an unconfigured address is taken only when peers authenticate),
//!   and its id and drain state are what that address answers; a member reported down is not
//!   used until it answers a probe again.
//! - Every message goes out with a timeout ([`PROBE_TIMEOUT`]) and at most [`IN_FLIGHT`] at
//!   once (beyond, dropped: SWIM tolerates loss); sends and timers are tracked tasks that end on
//!   shutdown. Messages are taken only from callers [`Membership::admits`].
//! - On shutdown the agent leaves: the members it tells spread that at once.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info};

use super::membership::{Membership, PROBE_TIMEOUT};
use super::proto::GossipMessage;
use crate::metrics::{ControlKind, Direction, Metrics};
use crate::swarm::gossip::{Change, Effects, Gossip, Member};

/// How often peers that answered Hello are added to gossip.
pub const SYNC_EVERY: Duration = Duration::from_secs(1);
/// Gossip messages in flight at once.
pub const IN_FLIGHT: usize = 64;
/// Largest gossip message taken (foca's default packets are about 1.4 KB).
pub const MAX_MESSAGE: usize = 64 * 1024;

/// One agent's gossip: its SWIM state (from [`Swim::start`]) and what it sends with.
pub struct Swim {
    state: Mutex<Option<Gossip>>,
    membership: Arc<Membership>,
    metrics: Arc<Metrics>,
    tasks: TaskTracker,
    stop: CancellationToken,
    in_flight: Arc<tokio::sync::Semaphore>,
    listen: SocketAddr,
}

impl Swim {
    pub fn new(
        membership: Arc<Membership>,
        metrics: Arc<Metrics>,
        listen: SocketAddr,
        tasks: TaskTracker,
        stop: CancellationToken,
    ) -> Self {
        let in_flight = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        Swim { state: Mutex::new(None), membership, metrics, tasks, stop, in_flight, listen }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Gossip>> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Join with the peers that answered so far, then keep adding those that answer later
    /// until shutdown.
    pub async fn run(self: Arc<Self>) {
        self.membership.set_gossiping();
        loop {
            self.sync();
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tokio::time::sleep(SYNC_EVERY) => {}
            }
        }
    }

    /// Start gossip once a peer is known (this agent's address is then known too), and add the
    /// peers that answered Hello but gossip does not know.
    fn sync(self: &Arc<Self>) {
        let known = self.membership.gossip_members();
        let Some((_, first)) = known.first() else { return };
        let mut state = self.lock();
        let g = state.get_or_insert_with(|| {
            let me = Member { id: self.membership.self_id().to_string(), addr: advertised(self.listen, *first), bump: 0 };
            info!(addr = %me.addr, "membership gossip started");
            Gossip::new(me, known.len() + 1, crate::peer::placement::node_hash(self.membership.self_id()))
        });
        let have: std::collections::HashSet<(String, SocketAddr)> = g.members().into_iter().map(|m| (m.id, m.addr)).collect();
        let fresh = have.is_empty();
        let new: Vec<Member> = known.into_iter().filter(|k| !have.contains(k)).map(|(id, addr)| Member { id, addr, bump: 0 }).collect();
        if new.is_empty() {
            return;
        }
        let effects = if fresh { g.join(&new, true) } else { new.into_iter().map(|m| g.meet(m)).fold(Effects::default(), merge) };
        drop(state);
        self.apply(effects);
    }

    /// A gossip message from a peer.
    pub fn receive(self: &Arc<Self>, data: &[u8]) -> Result<(), String> {
        self.metrics.add_control(ControlKind::gossip, Direction::received);
        if data.len() > MAX_MESSAGE {
            return Err(format!("gossip message of {} bytes (at most {MAX_MESSAGE})", data.len()));
        }
        let effects = match self.lock().as_mut() {
            Some(g) => g.handle(data)?,
            None => return Ok(()),
        };
        self.apply(effects);
        Ok(())
    }

    /// Leave the fleet (at shutdown): tell members, within the probe timeout.
    pub async fn leave(&self) {
        let Some(effects) = self.lock().as_mut().map(|g| g.leave()) else { return };
        let sends = effects.send.into_iter().map(|(to, data)| self.send(to, data));
        let _ = tokio::time::timeout(PROBE_TIMEOUT, futures::future::join_all(sends)).await;
        info!("left the membership gossip");
    }

    fn apply(self: &Arc<Self>, e: Effects) {
        for c in e.changes {
            match c {
                Change::Up(m) => self.membership.gossip_up(m.addr, &m.id),
                Change::Down(m) => self.membership.gossip_down(m.addr, &m.id),
            }
        }
        for (to, data) in e.send {
            let Ok(permit) = self.in_flight.clone().try_acquire_owned() else {
                debug!(to = %to.addr, "too many gossip messages in flight; dropping one");
                continue;
            };
            let me = self.clone();
            self.tasks.spawn(async move {
                let _permit = permit;
                tokio::select! {
                    _ = me.stop.cancelled() => {}
                    _ = me.send(to, data) => {}
                }
            });
        }
        for (after, timer) in e.timers {
            let me = self.clone();
            self.tasks.spawn(async move {
                tokio::select! {
                    _ = me.stop.cancelled() => {}
                    _ = tokio::time::sleep(after) => {
                        let effects = me.lock().as_mut().map(|g| g.timer(timer));
                        if let Some(e) = effects {
                            me.apply(e);
                        }
                    }
                }
            });
        }
    }

    /// Send one message to `to`, if it is a peer this agent may talk to.
    async fn send(&self, to: Member, data: bytes::Bytes) {
        let Some(peer) = self.membership.all().into_iter().find(|p| p.answers_at(to.addr)) else {
            // Taught by gossip: an address that is not (yet) a peer is asked Hello first.
            self.membership.gossip_up(to.addr, &to.id);
            return;
        };
        let mut req = tonic::Request::new(GossipMessage { data });
        req.set_timeout(PROBE_TIMEOUT);
        self.metrics.add_control(ControlKind::gossip, Direction::sent);
        match tokio::time::timeout(PROBE_TIMEOUT * 2, peer.client().gossip(req)).await {
            Ok(Ok(_)) => debug!(peer = %peer.addr, "gossip message sent"),
            Ok(Err(s)) => debug!(peer = %peer.addr, error = %s.message(), "gossip message refused"),
            Err(_) => debug!(peer = %peer.addr, "gossip message timed out"),
        }
    }
}

/// Combine the effects of several calls.
fn merge(mut a: Effects, b: Effects) -> Effects {
    a.send.extend(b.send);
    a.timers.extend(b.timers);
    a.changes.extend(b.changes);
    a
}

/// The address peers reach this agent at: the peer listen address, or when it listens on every
/// interface, the local address this host would use to reach `peer` (no packet is sent).
pub fn advertised(listen: SocketAddr, peer: SocketAddr) -> SocketAddr {
    if !listen.ip().is_unspecified() {
        return listen;
    }
    let any: SocketAddr = if peer.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { (std::net::Ipv6Addr::UNSPECIFIED, 0).into() };
    let local = std::net::UdpSocket::bind(any).and_then(|s| s.connect(peer).and_then(|_| s.local_addr()));
    SocketAddr::new(local.map(|a| a.ip()).unwrap_or(peer.ip()), listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_advertised_address_is_the_one_peers_reach() {
        let peer: SocketAddr = "127.0.0.7:9000".parse().unwrap();
        assert_eq!(advertised("127.0.0.3:7000".parse().unwrap(), peer), "127.0.0.3:7000".parse().unwrap());
        assert_eq!(advertised("0.0.0.0:7000".parse().unwrap(), peer).port(), 7000);
        assert!(advertised("0.0.0.0:7000".parse().unwrap(), peer).ip().is_loopback());
    }
}
