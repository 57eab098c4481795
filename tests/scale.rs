//! The scale simulation (`cachefs::swarm::sim`, what `cargo bench --bench scale` runs) at test
//! sizes: its figures come from the discovery code, and a fleet loads what it should.

use cachefs::swarm::sim::{run, Defect, Profile};

/// A defect in discovery (readers never ask trackers) changes what the simulation measures:
/// no chunk comes from a holder any more, and loads take longer.
#[test]
fn a_defect_in_discovery_changes_the_figures() {
    let mut p = Profile::new(40, 1 << 30);
    let good = run(&p).unwrap();
    p.defect = Defect::IgnoreTrackers;
    let bad = run(&p).unwrap();
    eprintln!("trackers: {good:?}\nignored:  {bad:?}");
    assert!(good.chunks_from_holders > good.chunks_from_owners, "{good:?}");
    assert_eq!(bad.chunks_from_holders, 0, "{bad:?}");
    assert!(bad.load_seconds_p50 > good.load_seconds_p50 * 1.2, "good {good:?}\nbad {bad:?}");
    assert_eq!((good.finished, bad.finished), (40, 40));
}

/// 1000 agents cold-load one model at once: the origin sees it about once, every agent ends
/// with every chunk, and no agent's control traffic grows with the fleet.
#[test]
fn a_thousand_agents_load_one_model_from_one_copy() {
    let p = Profile::new(1000, 1 << 30);
    let r = run(&p).unwrap();
    eprintln!("{r:?}");
    assert_eq!(r.finished, 1000, "{r:?}");
    assert!(r.origin_bytes_ratio <= 1.05, "{r:?}");
    let small = run(&Profile::new(50, 1 << 30)).unwrap();
    eprintln!("{small:?}");
    // Messages per agent over the load, not per second (a short load makes rates meaningless).
    let per_agent = |r: &cachefs::swarm::sim::Report| r.control_rpcs_per_agent_per_s_p50 * r.load_seconds_max;
    assert!(per_agent(&r) < per_agent(&small) * 3.0, "1000 agents: {r:?}\n50 agents: {small:?}");
}

/// Agents preempted mid-load hand off and go; every agent that stays finishes.
#[test]
fn preempted_agents_leave_the_rest_whole() {
    let mut p = Profile::new(100, 2 << 30);
    p.churn = 0.2;
    let r = run(&p).unwrap();
    eprintln!("{r:?}");
    assert_eq!((r.preempted, r.stayed, r.finished), (20, 80, 80), "{r:?}");
    assert!(r.origin_bytes_ratio <= 1.2, "{r:?}");
}
