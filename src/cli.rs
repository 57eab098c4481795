//! The `status`, `warm`, `drain` and `resume` commands (clients of a running agent's admin
//! endpoint), and the `completions` and `manpages` commands (what the package installs).

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

/// The agent's admin address and the token to present to it.
fn target(admin: &str, token_file: Option<&std::path::Path>) -> Result<(std::net::SocketAddr, Option<String>), String> {
    Ok((admin_addr(admin)?, token(token_file)?))
}

/// The admin token from `--admin-token-file`, if one was given.
fn token(file: Option<&std::path::Path>) -> Result<Option<String>, String> {
    file.map(|p| crate::config::read_token("--admin-token-file", p)).transpose().map_err(|e| crate::error::report(&e))
}

pub fn warm(admin: &str, token_file: Option<&std::path::Path>, detach: bool, paths: &[String]) -> ExitCode {
    let (addr, token) = match target(admin, token_file) {
        Ok(t) => t,
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
        if let Err(e) = warm_one(addr, token.as_deref(), detach, path, &rel) {
            eprintln!("cachefs: error: warm {path}: {e}");
            failed += 1;
        }
    }
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// Warm one path (`rel` to the mount root), showing progress as it streams in.
fn warm_one(addr: std::net::SocketAddr, token: Option<&str>, detach: bool, path: &str, rel: &str) -> Result<(), String> {
    let mut progress = Progress::new(path);
    let (mut error, mut done) = (None, false);
    let body = serde_json::json!({ "path": rel, "detach": detach }).to_string();
    let r = client::post_lines(addr, "/warm", token, &body, |_, line| {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { return };
        progress.update(v["total"].as_u64(), v["loaded"].as_u64());
        error = error.take().or_else(|| v["error"].as_str().map(String::from));
        done |= v["done"].as_bool() == Some(true);
    });
    match (r, error, done) {
        (Ok(_), None, true) => {
            progress.finish();
            Ok(())
        }
        (Ok(_), Some(e), _) => Err(progress.abandon(e)),
        (Ok(code), None, false) => Err(progress.abandon(format!("the agent stopped before finishing (HTTP {code})"))),
        (Err(e), _, _) => Err(progress.abandon(e)),
    }
}

/// How `warm` shows progress: a bar on a terminal, else a line on stdout at most every
/// [`PROGRESS_LINE_EVERY`] (logs and CI).
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines { path: String, total: u64, loaded: u64, last: Option<std::time::Instant> },
}

/// How often `warm` prints a progress line when stdout is not a terminal.
const PROGRESS_LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

impl Progress {
    fn new(path: &str) -> Progress {
        if !std::io::IsTerminal::is_terminal(&std::io::stdout()) {
            return Progress::Lines { path: path.to_string(), total: 0, loaded: 0, last: None };
        }
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_message(path.to_string());
        Progress::Bar(bar)
    }

    fn update(&mut self, total: Option<u64>, loaded: Option<u64>) {
        match self {
            Progress::Bar(bar) => {
                total.inspect(|t| bar.set_length(*t));
                loaded.inspect(|l| bar.set_position(*l));
            }
            Progress::Lines { path, total: t, loaded: l, last } => {
                *t = total.unwrap_or(*t);
                *l = loaded.unwrap_or(*l);
                if last.is_none_or(|at| at.elapsed() >= PROGRESS_LINE_EVERY) {
                    *last = Some(std::time::Instant::now());
                    println!("warm {path}: {} of {}", format_size(*l), format_size(*t));
                }
            }
        }
    }

    fn finish(self) {
        match self {
            Progress::Bar(bar) => bar.finish(),
            Progress::Lines { path, total, .. } => println!("warm {path}: done, {} in memory", format_size(total)),
        }
    }

    /// Stop showing progress; gives `why` back.
    fn abandon(self, why: String) -> String {
        if let Progress::Bar(bar) = self {
            bar.abandon();
        }
        why
    }
}

pub fn drain(admin: &str, handoff: bool, token_file: Option<&std::path::Path>) -> ExitCode {
    let (addr, token) = match target(admin, token_file) {
        Ok(t) => t,
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

pub fn resume(admin: &str, token_file: Option<&std::path::Path>) -> ExitCode {
    let (addr, token) = match target(admin, token_file) {
        Ok(t) => t,
        Err(e) => return fail(e),
    };
    let (mut state, mut error) = (String::new(), None);
    match client::post_lines(addr, "/resume", token.as_deref(), "{}", |_, line| {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
            state = v["state"].as_str().unwrap_or("").to_string();
            error = v["error"].as_str().map(String::from);
        }
    }) {
        Ok(200) => {
            println!("{state}");
            ExitCode::SUCCESS
        }
        Ok(code) => fail(format!("resume refused (HTTP {code}): {}", error.unwrap_or_default())),
        Err(e) => fail(e),
    }
}

/// `cachefs completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell) -> ExitCode {
    let mut cmd = <crate::config::Cli as clap::CommandFactory>::command();
    clap_complete::generate(shell, &mut cmd, "cachefs", &mut std::io::stdout());
    ExitCode::SUCCESS
}

/// `cachefs manpages DIR`: cachefs(1) and a page per command (cachefs-mount(1), ...), in roff.
pub fn manpages(dir: &std::path::Path) -> ExitCode {
    let cmd = <crate::config::Cli as clap::CommandFactory>::command();
    let mut pages = vec![("cachefs".to_string(), cmd.clone())];
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("cachefs-{}", sub.get_name());
        pages.push((name.clone(), sub.clone().name(name).version(cmd.get_version().unwrap_or_default().to_string())));
    }
    let write = |name: &str, page: clap::Command| -> std::io::Result<()> {
        let mut out = Vec::new();
        clap_mangen::Man::new(page).render(&mut out)?;
        std::fs::write(dir.join(format!("{name}.1")), out)
    };
    let result = std::fs::create_dir_all(dir).and_then(|_| pages.into_iter().try_for_each(|(name, page)| write(&name, page)));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(format!("cannot write man pages into {}: {e}", dir.display())),
    }
}
