//! The `status` and `warm` commands: clients of a running agent's admin endpoint.

use std::process::ExitCode;

use crate::admin::client;
use crate::config::admin_addr;
use crate::size::format_size;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("cachefs: error: {msg}");
    ExitCode::FAILURE
}

fn fetch_status(admin: &str) -> Result<serde_json::Value, String> {
    let addr = admin_addr(admin)?;
    let (code, body) = client::get(addr, "/status")?;
    if code != 200 {
        return Err(format!("the agent answered /status with HTTP {code}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("the agent's /status is not JSON: {e}"))
}

pub fn status(admin: &str, json: bool) -> ExitCode {
    let st = match fetch_status(admin) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    if json {
        println!("{st}");
        return ExitCode::SUCCESS;
    }
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    let s = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_string();
    println!("mount       {}  ({})", s(&st["mountpoint"]), if st["ready"].as_bool() == Some(true) { "ready" } else { "not ready" });
    println!("source      {}", s(&st["source"]));
    println!("state       {}", s(&st["drain_state"]));
    let d = &st["drain"];
    let provider = s(&d["provider"]);
    println!(
        "preemption  {}{}",
        if provider == "none" { "not watched".to_string() } else { provider },
        d["instance_id"].as_str().map(|i| format!("  (instance {i})")).unwrap_or_default()
    );
    if let Some(reason) = d["reason"].as_str() {
        println!(
            "drain       {reason}; termination {}, deadline {}, drained {}",
            s(&d["termination_time"]),
            s(&d["deadline"]),
            s(&d["drained_time"])
        );
    }
    println!("files       {}  (open handles: {})", n(&st["files"]), n(&st["open_handles"]));
    println!(
        "cache       {} of {}  (chunk {})",
        format_size(n(&st["cache"]["used_bytes"])),
        format_size(n(&st["cache"]["capacity_bytes"])),
        format_size(n(&st["cache"]["chunk_size"]))
    );
    println!(
        "read        memory {}  peer {}  origin {}",
        format_size(n(&st["read_bytes"]["memory"])),
        format_size(n(&st["read_bytes"]["peer"])),
        format_size(n(&st["read_bytes"]["origin"]))
    );
    println!(
        "origin      {} in {} requests, {} errors",
        format_size(n(&st["origin"]["bytes"])),
        n(&st["origin"]["requests"]),
        n(&st["origin"]["errors"])
    );
    let peers = st["peers"].as_array().cloned().unwrap_or_default();
    if peers.is_empty() {
        println!("peers       none");
    }
    for p in peers {
        println!("peer        {}  {}  {}", s(&p["addr"]), s(&p["state"]), p["node_id"].as_str().unwrap_or(""));
    }
    ExitCode::SUCCESS
}

/// The admin token from `--admin-token-file`, if one was given.
fn token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    file.map(|p| crate::config::read_token("--admin-token-file", p)).transpose()
}

pub fn warm(admin: &str, token_file: Option<&std::path::Path>, detach: bool, paths: &[String]) -> ExitCode {
    let (addr, token) = match admin_addr(admin).and_then(|a| Ok((a, token(token_file)?))) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let mountpoint = match fetch_status(admin) {
        Ok(st) => st["mountpoint"].as_str().unwrap_or("").to_string(),
        Err(e) => return fail(e),
    };
    let mut failed = 0;
    for path in paths {
        // Absolute paths under the mountpoint become relative to the mount root.
        let rel = match path.strip_prefix(&mountpoint) {
            Some(r) if path.starts_with('/') && !mountpoint.is_empty() => r.trim_start_matches('/').to_string(),
            _ => path.trim_start_matches("./").to_string(),
        };
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(path.clone());
        let mut error: Option<String> = None;
        let mut done = false;
        let body = serde_json::json!({ "path": rel, "detach": detach }).to_string();
        let r = client::post_lines(addr, "/warm", token.as_deref(), &body, |_, line| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { return };
            if let Some(t) = v["total"].as_u64() {
                bar.set_length(t);
            }
            if let Some(l) = v["loaded"].as_u64() {
                bar.set_position(l);
            }
            if let Some(e) = v["error"].as_str() {
                error = Some(e.to_string());
            }
            if v["done"].as_bool() == Some(true) {
                done = true;
            }
        });
        match (r, error, done) {
            (Ok(_), None, true) => bar.finish(),
            (Ok(_), Some(e), _) => {
                bar.abandon();
                eprintln!("cachefs: error: warm {path}: {e}");
                failed += 1;
            }
            (Ok(code), None, false) => {
                bar.abandon();
                eprintln!("cachefs: error: warm {path}: the agent stopped before finishing (HTTP {code})");
                failed += 1;
            }
            (Err(e), _, _) => {
                bar.abandon();
                eprintln!("cachefs: error: warm {path}: {e}");
                failed += 1;
            }
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

pub fn drain(admin: &str, token_file: Option<&std::path::Path>) -> ExitCode {
    let (addr, token) = match admin_addr(admin).and_then(|a| Ok((a, token(token_file)?))) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let (mut state, mut error) = (String::new(), None);
    match client::post_lines(addr, "/drain", token.as_deref(), "{}", |_, line| {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            state = v["state"].as_str().unwrap_or("").to_string();
            error = v["error"].as_str().map(String::from);
        }
    }) {
        Ok(200) if state == "drained" => {
            println!("drained");
            ExitCode::SUCCESS
        }
        Ok(code) if error.is_some() => fail(format!("drain refused (HTTP {code}): {}", error.unwrap_or_default())),
        Ok(code) => fail(format!("drain did not complete (HTTP {code}, state {state:?})")),
        Err(e) => fail(e),
    }
}
