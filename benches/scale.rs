//! `cargo bench --bench scale [-- --quick] [--agents 10,100,1000] [--model SIZE]`: one model
//! cold-loaded by N agents at once, simulated (`cachefs::swarm::sim`: the agent's discovery,
//! membership and source plan over an emulated network), then the same with 10% of the agents
//! preempted halfway. Prints a table and writes `target/bench/scale.json`.

use cachefs::swarm::sim::{self, Profile, Report};

struct Opts {
    agents: Vec<usize>,
    model: u64,
    quick: bool,
}

fn parse_opts() -> Result<Opts, String> {
    let (mut agents, mut model, mut quick) = (vec![10, 100, 1000], None, false);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--bench" => {}
            "--quick" => quick = true,
            "--agents" => {
                let v = args.next().ok_or("--agents needs a list like 10,100,1000")?;
                agents = v
                    .split(',')
                    .map(|n| n.trim().parse::<usize>().ok().filter(|n| (2..=5000).contains(n)))
                    .collect::<Option<Vec<_>>>()
                    .ok_or(format!("--agents {v:?}: give agent counts from 2 to 5000, separated by commas"))?;
            }
            "--model" => {
                let v = args.next().ok_or("--model needs a size")?;
                model = Some(cachefs::size::parse_size(&v).map_err(|e| format!("--model: {e}"))?);
            }
            other => return Err(format!("unknown argument {other:?}; use --quick, --agents LIST, --model SIZE")),
        }
    }
    let model = model.unwrap_or(if quick { 16_000_000_000 } else { 70_000_000_000 });
    if model < 64 << 20 {
        return Err("--model must be at least 64MiB".into());
    }
    Ok(Opts { agents, model, quick })
}

fn row(name: &str, r: &Report) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or_default();
    v["name"] = serde_json::json!(name);
    v
}

fn main() {
    let opts = match parse_opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let mut rows = Vec::new();
    println!(
        "{:<22} {:>6} {:>8} {:>9} {:>9} {:>9} {:>9} {:>8} {:>7}",
        "row", "agents", "origin", "ctl/s max", "ctl/s p50", "load p50", "load max", "finished", "wall s"
    );
    for &n in &opts.agents {
        for churn in [0.0, 0.1] {
            let mut p = Profile::new(n, opts.model);
            p.churn = churn;
            let name = if churn > 0.0 { format!("{n} agents, churn 10%") } else { format!("{n} agents") };
            let r = match sim::run(&p) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("error: {e}");
                    std::process::exit(1);
                }
            };
            println!(
                "{:<22} {:>6} {:>7.3}x {:>9.1} {:>9.1} {:>8.1}s {:>8.1}s {:>4}/{:<4} {:>7.1}",
                name,
                n,
                r.origin_bytes_ratio,
                r.control_rpcs_per_agent_per_s_max,
                r.control_rpcs_per_agent_per_s_p50,
                r.load_seconds_p50,
                r.load_seconds_max,
                r.finished,
                r.stayed,
                r.wall_seconds
            );
            println!(
                "    chunks from holders {} owners {} origin {}, refused {}",
                r.chunks_from_holders, r.chunks_from_owners, r.chunks_from_origin, r.refused
            );
            rows.push(row(&name, &r));
        }
    }
    let p = Profile::new(0, opts.model);
    let doc = serde_json::json!({
        "quick": opts.quick,
        "profile": {
            "link_gbps": p.link_bytes_per_s * 8.0 / 1e9,
            "latency_ms": p.latency.as_secs_f64() * 1e3,
            "origin_gbps": p.origin_bytes_per_s * 8.0 / 1e9,
            "origin_connection_mbps": p.origin_connection_bytes_per_s / 1e6,
            "origin_rtt_ms": p.origin_rtt.as_secs_f64() * 1e3,
            "chunk_size": p.chunk_size,
            "window": p.window,
            "drain_seconds": p.drain.as_secs_f64(),
        },
        "rows": rows,
    });
    let _ = std::fs::create_dir_all("target/bench");
    match std::fs::write("target/bench/scale.json", serde_json::to_vec_pretty(&doc).unwrap_or_default()) {
        Ok(()) => println!("wrote target/bench/scale.json"),
        Err(e) => {
            eprintln!("error: cannot write target/bench/scale.json: {e}");
            std::process::exit(1);
        }
    }
}
