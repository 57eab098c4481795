//! CLI → Config → `Agent::start` → serve until SIGTERM/SIGINT → `RunningAgent::shutdown`.

use std::process::ExitCode;

use cachefs::config::{resolve_mount, Cli, Command, LogFormat};
use clap::Parser;

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let b = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    match format {
        LogFormat::Plain => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

/// Any panic (a bug, or input nothing checked) becomes one `cachefs: error:` line and an error
/// log record instead of a backtrace. A panic on the main thread still ends the process (exit
/// 101); one in a task ends that task only.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown panic".into());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        let line = cachefs::error::one_line(format!("internal error: {what}{at}"));
        tracing::error!(error = %line, "panic");
        eprintln!("cachefs: error: {line}");
    }));
}

/// clap's message on one line: its text up to the usage block (so a missing argument is named:
/// "the following required arguments were not provided: <PATHS>...").
fn clap_message(text: &str) -> String {
    let head: Vec<&str> = text.lines().take_while(|l| !l.trim().is_empty() && !l.starts_with("Usage:")).collect();
    let msg = cachefs::error::one_line(head.join(" "));
    let msg = msg.trim_start_matches("error: ");
    if msg.is_empty() {
        "invalid arguments".into()
    } else {
        msg.to_string()
    }
}

fn main() -> ExitCode {
    install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            eprintln!("cachefs: error: {} (see cachefs --help)", clap_message(&e.to_string()));
            return ExitCode::from(cachefs::EXIT_USAGE);
        }
    };
    match cli.command {
        Command::Status { admin, json } => cachefs::cli::status(&admin, json),
        Command::Warm { admin, admin_token_file, detach, paths } => cachefs::cli::warm(&admin, admin_token_file.as_deref(), detach, &paths),
        Command::Drain { admin, handoff, admin_token_file } => cachefs::cli::drain(&admin, handoff, admin_token_file.as_deref()),
        Command::Resume { admin, admin_token_file } => cachefs::cli::resume(&admin, admin_token_file.as_deref()),
        Command::Completions { shell } => cachefs::cli::completions(shell),
        Command::Manpages { dir } => cachefs::cli::manpages(&dir),
        Command::Mount(args) => {
            let cfg = match resolve_mount(args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("cachefs: error: {}", cachefs::error::report(&e));
                    return ExitCode::from(cachefs::EXIT_USAGE);
                }
            };
            init_tracing(cfg.log_format);
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().thread_name("cachefs").build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("cachefs: error: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            let result = rt.block_on(cachefs::agent::run(cfg, cachefs::agent::shutdown_signal()));
            // Blocking work still running (a FUSE thread kept by an open file) must not hold the exit.
            rt.shutdown_timeout(cachefs::agent::RUNTIME_SHUTDOWN_TIMEOUT);
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("cachefs: error: {}", cachefs::error::report(&e));
                    ExitCode::from(e.exit_code())
                }
            }
        }
    }
}
