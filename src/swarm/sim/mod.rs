//! The scale simulation: N agents in one process on tokio's paused clock, each running the
//! project's discovery (`swarm::discovery`, trackers and views), membership (`swarm::gossip`,
//! foca's SWIM) and source plan (`swarm::plan`) over an emulated network (`net`), moving chunk
//! descriptions instead of bytes, so 1000 agents and a 70 GB model fit on one machine.
//!
//! # Contract
//! [`run`] loads one model on every agent at once and reports what `cargo bench --bench scale`
//! writes: origin bytes over the model size, control messages (every non-data message an agent
//! sent or answered, refusals included) per agent per second of the load, and simulated load
//! times. With churn, a share of the agents is preempted halfway (notice, drain with handoff,
//! gone); only the agents that stay count for load times, and each must end with every chunk.

mod agent;
pub mod net;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use self::agent::SimAgent;
use self::net::{Link, Origin};
use super::gossip::Member;
use super::NodeId;
use crate::cache::chunk::{chunk_count, chunk_range};

/// A deliberate defect, to show that the figures come from the code under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Defect {
    None,
    /// Readers never ask trackers: every chunk comes from its owner or the origin.
    IgnoreTrackers,
}

/// What is simulated.
#[derive(Debug, Clone)]
pub struct Profile {
    pub agents: usize,
    pub model_bytes: u64,
    pub chunk_size: u64,
    /// Each agent's link, each way.
    pub link_bytes_per_s: f64,
    /// One-way latency of a message between agents.
    pub latency: Duration,
    /// The origin's total bandwidth, one connection's, and its round trip.
    pub origin_bytes_per_s: f64,
    pub origin_connection_bytes_per_s: f64,
    pub origin_rtt: Duration,
    /// Chunks each agent fetches at once.
    pub window: usize,
    pub announce_tick: Duration,
    /// Share of agents preempted halfway through the load.
    pub churn: f64,
    /// How long a preempted agent drains before it is gone.
    pub drain: Duration,
    pub defect: Defect,
}

impl Profile {
    /// 10 Gbit/s agents 0.1 ms apart, an origin of 40 Gbit/s in all, 100 MB/s per connection
    /// and 20 ms away, 8 MiB chunks.
    pub fn new(agents: usize, model_bytes: u64) -> Self {
        Profile {
            agents,
            model_bytes,
            chunk_size: 8 << 20,
            link_bytes_per_s: 1.25e9,
            latency: Duration::from_micros(100),
            origin_bytes_per_s: 5e9,
            origin_connection_bytes_per_s: 1e8,
            origin_rtt: Duration::from_millis(20),
            window: 16,
            announce_tick: Duration::from_millis(50),
            churn: 0.0,
            drain: Duration::from_secs(5),
            defect: Defect::None,
        }
    }
}

/// What one run measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub agents: usize,
    pub model_bytes: u64,
    pub chunk_size: u64,
    pub origin_bytes_ratio: f64,
    pub origin_requests: u64,
    pub control_rpcs_per_agent_per_s_max: f64,
    pub control_rpcs_per_agent_per_s_p50: f64,
    pub load_seconds_p50: f64,
    pub load_seconds_max: f64,
    pub preempted: usize,
    pub stayed: usize,
    /// Agents that stayed and hold every chunk at the end.
    pub finished: usize,
    /// Chunks all agents took from holders, from owners (asked to fill), from the origin; and
    /// requests a peer refused.
    pub chunks_from_holders: u64,
    pub chunks_from_owners: u64,
    pub chunks_from_origin: u64,
    pub refused: u64,
    pub wall_seconds: f64,
}

/// The simulated fleet.
pub struct Sim {
    profile: Profile,
    object: Arc<str>,
    chunks: u64,
    agents: Vec<Arc<SimAgent>>,
    by_id: HashMap<NodeId, usize>,
    by_addr: HashMap<SocketAddr, usize>,
    origin: Origin,
    tasks: TaskTracker,
}

impl Sim {
    fn agent(&self, id: &str) -> Option<&Arc<SimAgent>> {
        self.by_id.get(id).map(|&i| &self.agents[i])
    }

    fn agent_at(&self, m: &Member) -> Option<&Arc<SimAgent>> {
        self.by_addr.get(&m.addr).map(|&i| &self.agents[i])
    }

    fn chunk_bytes(&self, i: u64) -> u64 {
        let r = chunk_range(i, self.profile.model_bytes, self.profile.chunk_size);
        r.end - r.start
    }
}

/// An agent's member entry: ids and addresses are only names here (nothing is dialed).
fn member(i: usize) -> Member {
    let port = 7000 + (i % 50_000) as u16;
    Member { id: format!("agent-{i:05}"), addr: SocketAddr::from(([127, 0, (i / 50_000) as u8, 1], port)), bump: 0 }
}

/// Simulate `p` and report.
pub fn run(p: &Profile) -> Result<Report, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .map_err(|e| format!("cannot start the simulation's runtime: {e}"))?;
    let wall = std::time::Instant::now();
    let report = rt.block_on(simulate(p.clone()));
    rt.shutdown_background();
    Ok(Report { wall_seconds: wall.elapsed().as_secs_f64(), ..report })
}

async fn simulate(p: Profile) -> Report {
    let chunks = chunk_count(p.model_bytes, p.chunk_size);
    let members: Vec<Member> = (0..p.agents).map(member).collect();
    let agents: Vec<Arc<SimAgent>> =
        members.iter().enumerate().map(|(i, m)| Arc::new(SimAgent::new(i, m.clone(), p.agents, chunks, p.link_bytes_per_s))).collect();
    let sim = Arc::new(Sim {
        object: Arc::from("model.safetensors@v1"),
        chunks,
        by_id: agents.iter().map(|a| (a.id.clone(), a.index)).collect(),
        by_addr: agents.iter().map(|a| (a.member.addr, a.index)).collect(),
        agents,
        origin: Origin {
            link: Link::new(p.origin_bytes_per_s),
            per_connection: p.origin_connection_bytes_per_s,
            rtt: p.origin_rtt,
            bytes: Default::default(),
            requests: Default::default(),
        },
        tasks: TaskTracker::new(),
        profile: p.clone(),
    });
    let start = Instant::now();
    for a in &sim.agents {
        a.join(&sim, &members);
    }
    let preempted = preempted(&p);
    for a in &sim.agents {
        sim.tasks.spawn(a.clone().announcer(sim.clone()));
        sim.tasks.spawn(a.clone().load(sim.clone()));
    }
    // Halfway through the load as the links allow it.
    let halfway = Duration::from_secs_f64(p.model_bytes as f64 / p.link_bytes_per_s / 2.0);
    let churn = {
        let sim = sim.clone();
        let preempted = preempted.clone();
        async move {
            tokio::time::sleep(halfway).await;
            for &i in &preempted {
                sim.tasks.spawn(sim.agents[i].clone().drain(sim.clone()));
            }
        }
    };
    sim.tasks.spawn(churn);
    let limit = start + Duration::from_secs_f64(p.model_bytes as f64 / p.link_bytes_per_s * 50.0 + 120.0);
    while Instant::now() < limit && !sim.agents.iter().enumerate().all(|(i, a)| preempted.contains(&i) || a.holds_all()) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    report(&sim, &preempted, start)
}

/// Which agents are preempted: every k-th, so the same share wherever they sit.
fn preempted(p: &Profile) -> Vec<usize> {
    let n = (p.agents as f64 * p.churn).round() as usize;
    if n == 0 {
        return Vec::new();
    }
    (0..n).map(|k| k * p.agents / n).collect()
}

fn report(sim: &Sim, preempted: &[usize], start: Instant) -> Report {
    let p = &sim.profile;
    let end = Instant::now();
    let stayed: Vec<&Arc<SimAgent>> = sim.agents.iter().filter(|a| !preempted.contains(&a.index)).collect();
    let mut loads: Vec<f64> =
        stayed.iter().map(|a| a.done_at.lock().map(|d| d.unwrap_or(end)).unwrap_or(end).duration_since(start).as_secs_f64()).collect();
    let span = loads.iter().cloned().fold(0.0, f64::max).max(1e-3);
    let mut rates: Vec<f64> = sim.agents.iter().map(|a| a.counters.total() as f64 / span).collect();
    Report {
        agents: p.agents,
        model_bytes: p.model_bytes,
        chunk_size: p.chunk_size,
        origin_bytes_ratio: sim.origin.bytes.load(Ordering::Relaxed) as f64 / p.model_bytes as f64,
        origin_requests: sim.origin.requests.load(Ordering::Relaxed),
        control_rpcs_per_agent_per_s_max: rates.iter().cloned().fold(0.0, f64::max),
        control_rpcs_per_agent_per_s_p50: median(&mut rates),
        load_seconds_p50: median(&mut loads),
        load_seconds_max: span,
        preempted: preempted.len(),
        stayed: stayed.len(),
        finished: stayed.iter().filter(|a| a.holds_all()).count(),
        chunks_from_holders: sum(sim, |c| &c.from_holders),
        chunks_from_owners: sum(sim, |c| &c.from_owners),
        chunks_from_origin: sum(sim, |c| &c.from_origin),
        refused: sum(sim, |c| &c.refused),
        wall_seconds: 0.0,
    }
}

fn sum(sim: &Sim, pick: impl Fn(&net::Counters) -> &std::sync::atomic::AtomicU64) -> u64 {
    sim.agents.iter().map(|a| pick(&a.counters).load(Ordering::Relaxed)).sum()
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
