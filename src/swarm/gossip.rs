//! Membership by SWIM gossip (`foca`): each agent probes one member per period and spreads what
//! it learns on the messages it sends anyway, so its traffic does not grow with the fleet.
//!
//! # Contract
//! - A [`Gossip`] starts from its seeds (the configured peers, taken as alive: agents given the
//!   same list agree on the members from the first moment) and learns the rest by gossip.
//! - Its traffic per agent is bounded whatever N is: one probe per `probe_period` (plus an
//!   indirect probe cycle for a member that does not answer), gossip to [`GOSSIP_FANOUT`]
//!   members per [`GOSSIP_EVERY`], and the answers to others' probes.
//! - A member that leaves ([`Gossip::leave`]) or stops answering is reported down and dropped
//!   from [`Gossip::members`]; one that comes back with a new incarnation is taken again.
//! - Bytes from the network are decoded by foca's codec; a bad message is an error, never a
//!   panic, and changes nothing.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use foca::{AccumulatingRuntime, Config, Foca, Identity, NoCustomBroadcast, OwnedNotification, PeriodicParams, PostcardCodec, Timer};
use rand_foca::rngs::SmallRng;
use rand_foca::SeedableRng;
use serde::{Deserialize, Serialize};

/// How often gossip goes out unprompted.
pub const GOSSIP_EVERY: Duration = Duration::from_secs(1);
/// Members each unprompted gossip goes to.
pub const GOSSIP_FANOUT: usize = 2;
/// How often an agent asks one member (and one member it believes down) for its whole view,
/// so that members nobody spread news of, and false downs, are healed.
pub const ANNOUNCE_EVERY: Duration = Duration::from_secs(30);

/// A member: its node id, the address it was dialed at, and a counter bumped on rejoin.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub addr: SocketAddr,
    pub bump: u16,
}

impl Identity for Member {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Member { bump: self.bump.wrapping_add(1), ..self.clone() })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        // The later incarnation of the process at this address wins (wrapping counter).
        self.bump.wrapping_sub(adversary.bump) < u16::MAX / 2
    }
}

/// A change of membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Up(Member),
    Down(Member),
}

/// What a call asks the caller to do: messages to send, timers to set, changes to apply.
#[derive(Default)]
pub struct Effects {
    pub send: Vec<(Member, bytes::Bytes)>,
    pub timers: Vec<(Duration, Timer<Member>)>,
    pub changes: Vec<Change>,
}

type Swim = Foca<Member, PostcardCodec, SmallRng, NoCustomBroadcast>;

/// One agent's membership state machine.
pub struct Gossip {
    foca: Swim,
    rt: AccumulatingRuntime<Member>,
}

/// SWIM settings for a fleet of about `size` agents.
pub fn config(size: usize) -> Config {
    let n = NonZeroU32::new(size.clamp(1, u32::MAX as usize) as u32).unwrap_or(NonZeroU32::MIN);
    let mut c = Config::new_lan(n);
    c.periodic_gossip =
        Some(PeriodicParams { frequency: GOSSIP_EVERY, num_members: NonZeroUsize::new(GOSSIP_FANOUT).unwrap_or(NonZeroUsize::MIN) });
    c.periodic_announce = Some(PeriodicParams { frequency: ANNOUNCE_EVERY, num_members: NonZeroUsize::MIN });
    c.periodic_announce_to_down_members = Some(PeriodicParams { frequency: ANNOUNCE_EVERY, num_members: NonZeroUsize::MIN });
    c
}

impl Gossip {
    /// `me` in a fleet of about `size`, random choices seeded by `seed`.
    pub fn new(me: Member, size: usize, seed: u64) -> Self {
        Gossip { foca: Foca::new(me, config(size), SmallRng::seed_from_u64(seed), PostcardCodec), rt: AccumulatingRuntime::new() }
    }

    /// Take `seeds` as alive members and tell one of them (chosen by this agent's id, so that
    /// a fleet started at once does not all call the first) we are here. With `spread`, the
    /// seeds are news to pass on (this agent may be the only one that knows them); a list every
    /// member was configured with is not.
    pub fn join(&mut self, seeds: &[Member], spread: bool) -> Effects {
        let me = self.foca.identity().clone();
        let others: Vec<Member> = seeds.iter().filter(|s| s.addr != me.addr).cloned().collect();
        let _ = self.foca.apply_many(others.iter().cloned().map(foca::Member::alive), spread, &mut self.rt);
        if !others.is_empty() {
            let pick = crate::peer::placement::node_hash(&me.id) % others.len() as u64;
            let _ = self.foca.announce(others[pick as usize].clone(), &mut self.rt);
        }
        self.effects()
    }

    /// `m` answered this agent directly (its own probe): take it as an alive member and tell
    /// others (it may know only this agent).
    pub fn meet(&mut self, m: Member) -> Effects {
        if m.addr != self.foca.identity().addr {
            let _ = self.foca.apply_many(std::iter::once(foca::Member::alive(m)), true, &mut self.rt);
        }
        self.effects()
    }

    /// A message from the network.
    pub fn handle(&mut self, data: &[u8]) -> Result<Effects, String> {
        self.foca.handle_data(data, &mut self.rt).map_err(|e| format!("bad membership message: {e}"))?;
        Ok(self.effects())
    }

    /// A timer set by earlier effects fired.
    pub fn timer(&mut self, t: Timer<Member>) -> Effects {
        let _ = self.foca.handle_timer(t, &mut self.rt);
        self.effects()
    }

    /// This agent leaves the fleet (it drains): others are told at once.
    pub fn leave(&mut self) -> Effects {
        let _ = self.foca.leave_cluster(&mut self.rt);
        self.effects()
    }

    /// Members believed alive (not this agent), sorted.
    pub fn members(&self) -> Vec<Member> {
        let mut m: Vec<Member> = self.foca.iter_members().map(|m| m.id().clone()).collect();
        m.sort();
        m
    }

    /// Gossip to a few members now (what the periodic gossip timer does).
    #[cfg(test)]
    fn gossip_now(&mut self) -> Effects {
        let _ = self.foca.gossip(&mut self.rt);
        self.effects()
    }

    pub fn me(&self) -> &Member {
        self.foca.identity()
    }

    fn effects(&mut self) -> Effects {
        let mut e = Effects::default();
        while let Some(s) = self.rt.to_send() {
            e.send.push(s);
        }
        while let Some(t) = self.rt.to_schedule() {
            e.timers.push(t);
        }
        while let Some(n) = self.rt.to_notify() {
            match n {
                OwnedNotification::MemberUp(m) => e.changes.push(Change::Up(m)),
                OwnedNotification::MemberDown(m) => e.changes.push(Change::Down(m)),
                _ => {}
            }
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(i: u16) -> Member {
        Member { id: format!("node-{i}"), addr: SocketAddr::from(([127, 0, 0, 1], 7000 + i)), bump: 0 }
    }

    #[test]
    fn seeds_are_members_and_garbage_is_an_error() {
        let seeds: Vec<Member> = (0..5).map(member).collect();
        let mut g = Gossip::new(member(0), 5, 1);
        let e = g.join(&seeds, false);
        assert_eq!(g.members().len(), 4);
        assert_eq!(e.send.len(), 1, "one announce to a seed");
        assert!(g.handle(b"\xff\x00garbage").is_err());
        assert_eq!(g.members().len(), 4);
    }

    /// Deliver every message until none is left (timers not fired); returns changes seen.
    fn settle(fleet: &mut [Gossip], mut queue: Vec<(Member, bytes::Bytes)>) -> Vec<(usize, Change)> {
        let mut seen = Vec::new();
        while let Some((to, data)) = queue.pop() {
            let Some(i) = fleet.iter().position(|g| g.me().addr == to.addr) else { continue };
            let e = fleet[i].handle(&data).unwrap_or_default();
            queue.extend(e.send);
            seen.extend(e.changes.into_iter().map(|c| (i, c)));
        }
        seen
    }

    /// A knows B; C meets B later: A learns of C through B, without ever being told by config.
    #[test]
    fn a_member_met_by_one_is_spread_to_the_others() {
        let mut fleet = vec![Gossip::new(member(0), 3, 1), Gossip::new(member(1), 3, 2), Gossip::new(member(2), 3, 3)];
        let e = fleet[0].join(&[member(1)], true);
        settle(&mut fleet, e.send);
        let e = fleet[2].join(&[member(1)], true);
        settle(&mut fleet, e.send);
        let e = fleet[1].meet(member(2));
        settle(&mut fleet, e.send);
        // B's next probe or gossip carries C to A.
        for _ in 0..20 {
            let mut sends = Vec::new();
            for g in fleet.iter_mut() {
                let e = g.gossip_now();
                sends.extend(e.send);
            }
            settle(&mut fleet, sends);
        }
        assert!(fleet[0].members().contains(&member(2)), "A never learned C: {:?}", fleet[0].members());
    }
}
