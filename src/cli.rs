//! The `status` and `warm` commands: clients of a running agent's admin endpoint.

use std::process::ExitCode;

use crate::admin::client;
use crate::agent::status::Status;
use crate::config::admin_addr;
use crate::size::format_size;

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("cachefs: error: {msg}");
    ExitCode::FAILURE
}

fn status_json(admin: &str) -> Result<String, String> {
    let addr = admin_addr(admin)?;
    let (code, body) = client::get(addr, "/status")?;
    if code != 200 {
        return Err(format!("the agent answered /status with HTTP {code}"));
    }
    Ok(body)
}

fn fetch_status(admin: &str) -> Result<Status, String> {
    serde_json::from_str(&status_json(admin)?).map_err(|e| format!("the agent's /status is not what this cachefs reads: {e}"))
}

pub fn status(admin: &str, json: bool) -> ExitCode {
    if json {
        return match status_json(admin) {
            Ok(body) => {
                println!("{}", body.trim_end());
                ExitCode::SUCCESS
            }
            Err(e) => fail(e),
        };
    }
    match fetch_status(admin) {
        Ok(st) => {
            print_status(&st);
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

fn print_status(st: &Status) {
    let or_dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    println!("mount       {}  ({})", st.mountpoint, if st.ready { "ready" } else { "not ready" });
    println!("source      {}", st.source);
    println!("state       {}", st.drain_state);
    let d = &st.drain;
    let watched = if d.provider == "none" { "not watched".to_string() } else { d.provider.clone() };
    println!("preemption  {watched}{}", d.instance_id.as_ref().map(|i| format!("  (instance {i})")).unwrap_or_default());
    if let Some(reason) = &d.reason {
        let (t, dl, dr) = (or_dash(&d.termination_time), or_dash(&d.deadline), or_dash(&d.drained_time));
        println!("drain       {reason}; termination {t}, deadline {dl}, drained {dr}");
    }
    println!("files       {}  (open handles: {})", st.files, st.open_handles);
    let c = &st.cache;
    println!("cache       {} of {}  (chunk {})", format_size(c.used_bytes), format_size(c.capacity_bytes), format_size(c.chunk_size));
    let r = &st.read_bytes;
    println!("read        memory {}  peer {}  origin {}", format_size(r.memory), format_size(r.peer), format_size(r.origin));
    let o = &st.origin;
    println!("origin      {} in {} requests, {} errors", format_size(o.bytes), o.requests, o.errors);
    if st.peers.is_empty() {
        println!("peers       none");
    }
    for p in &st.peers {
        println!("peer        {}  {}  {}", p.addr, p.state, p.node_id.as_deref().unwrap_or(""));
    }
}

/// The admin token from `--admin-token-file`, if one was given.
fn token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    file.map(|p| crate::config::read_token("--admin-token-file", p)).transpose().map_err(|e| crate::error::report(&e))
}

pub fn warm(admin: &str, token_file: Option<&std::path::Path>, detach: bool, paths: &[String]) -> ExitCode {
    let (addr, token) = match admin_addr(admin).and_then(|a| Ok((a, token(token_file)?))) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let mountpoint = match fetch_status(admin) {
        Ok(st) => st.mountpoint,
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

pub fn drain(admin: &str, handoff: bool, token_file: Option<&std::path::Path>) -> ExitCode {
    let (addr, token) = match admin_addr(admin).and_then(|a| Ok((a, token(token_file)?))) {
        Ok(a) => a,
        Err(e) => return fail(e),
    };
    let (mut state, mut error, mut handed_off, mut lost) = (String::new(), None, None, None);
    let body = serde_json::json!({ "handoff": handoff }).to_string();
    match client::post_lines(addr, "/drain", token.as_deref(), &body, |_, line| {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            state = v["state"].as_str().unwrap_or("").to_string();
            error = v["error"].as_str().map(String::from);
            (handed_off, lost) = (v["handed_off_bytes"].as_u64(), v["lost_bytes"].as_u64());
        }
    }) {
        Ok(200) if state == "drained" => {
            match (handed_off, lost) {
                (Some(h), Some(l)) => println!("drained: {} handed off, {} lost", format_size(h), format_size(l)),
                _ => println!("drained"),
            }
            ExitCode::SUCCESS
        }
        Ok(code) if error.is_some() => fail(format!("drain refused (HTTP {code}): {}", error.unwrap_or_default())),
        Ok(code) => fail(format!("drain did not complete (HTTP {code}, state {state:?})")),
        Err(e) => fail(e),
    }
}
