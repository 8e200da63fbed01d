//! The `spliced` command: CLI → Config → run. Everything else is the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use spliced::config::{self, Config, Diagnostic, FlagDefaults, ListenerConfig, Mode, Timeouts};

/// `spliced check`.
#[path = "cli/check.rs"]
mod check;
/// Signals, the pid file, privileges and systemd: the binary's part of a
/// running proxy's life (the library's part is `spliced::reload`).
#[path = "cli/lifecycle.rs"]
mod lifecycle;
/// `spliced upgrade` and the control socket it talks to.
#[path = "cli/upgrade.rs"]
mod upgrade;

#[derive(Parser, Debug)]
#[command(
    name = "spliced",
    version,
    about = "A zero-copy (splice) layer-4 TCP proxy for Linux"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Relay TCP connections from --listen to the --upstream servers, or as a --config file says.
    Run(RunArgs),
    /// Measure splice against copy (and a direct baseline) on this machine.
    Bench(spliced::bench::BenchArgs),
    /// Validate a config file and read its password files, without binding; print it with every default filled in.
    Check(CheckArgs),
    /// Show a running instance's counters from its stats file (no network).
    Stats(spliced::cli::stats::StatsArgs),
    /// Tell a running instance to re-read its config file (SIGHUP to the pid in its pid file).
    Reload(ReloadArgs),
    /// Replace a running instance by a new process of the same (or another) binary, with no client refused.
    Upgrade(UpgradeArgs),
}

#[derive(clap::Args, Debug)]
struct UpgradeArgs {
    /// The instance to upgrade: the --name it was started with.
    #[arg(
        long,
        env = "SPLICED_NAME",
        default_value = "spliced",
        value_name = "NAME"
    )]
    name: String,
    /// The binary to start [default: the path the instance was started from, read anew].
    #[arg(long, value_name = "PATH")]
    binary: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
struct ReloadArgs {
    /// The instance to reload: the --name it was started with.
    #[arg(
        long,
        env = "SPLICED_NAME",
        default_value = "spliced",
        value_name = "NAME"
    )]
    name: String,
}

#[derive(clap::Args, Debug)]
struct CheckArgs {
    /// The config file to check (see docs/CONFIG.md).
    #[arg(long, env = "SPLICED_CONFIG", value_name = "FILE")]
    config: PathBuf,
    /// Also read the config file and every password file as this user, as
    /// 'spliced run --user USER' does at a reload; needs root (as --user
    /// does in run).
    #[arg(long, value_name = "USER")]
    user: Option<String>,
}

#[derive(clap::Args, Debug, Clone)]
struct RunArgs {
    /// This instance's name: its stats file NAME.stats ('spliced stats --name NAME')
    /// and pid file spliced-NAME.pid ('spliced reload --name NAME') are in
    /// $RUNTIME_DIRECTORY, /run/spliced for root, else $XDG_RUNTIME_DIR/spliced
    /// (the pid file: else /tmp/spliced-UID). A NAME a live instance holds is refused.
    #[arg(
        long,
        env = "SPLICED_NAME",
        default_value = "spliced",
        value_name = "NAME"
    )]
    name: String,
    /// Switch to this user (its uid, primary group, no other groups) once
    /// the listeners are bound; needs root.
    #[arg(long, value_name = "USER")]
    user: Option<String>,
    /// A config file with one or more listeners, each with its own pool and
    /// limits (see docs/CONFIG.md). Flags given beside it replace the file's
    /// [defaults] and [global] settings.
    #[arg(long, env = "SPLICED_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to accept clients on: HOST:PORT, :PORT for every IPv4 and IPv6
    /// address, or NAME:PORT for every address the name resolves to.
    #[arg(long, value_name = "ADDR", required_unless_present = "config")]
    listen: Option<String>,
    /// Server to relay to, HOST:PORT; repeat it for round-robin with failover.
    #[arg(long = "upstream", value_name = "ADDR")]
    upstreams: Vec<String>,
    /// How bytes move: splice (zero-copy, falling back to copy per direction), copy, or auto (per direction: copy for small messages, splice once it streams).
    #[arg(long, default_value = "splice", value_name = "MODE")]
    mode: Mode,
    /// Close a relay after this long with no byte moved either way (0 disables).
    #[arg(long, default_value = "1h", value_name = "DUR", value_parser = duration)]
    idle_timeout: Limit,
    /// Inactivity limit once either direction is half-closed (0 disables).
    #[arg(long, default_value = "60s", value_name = "DUR", value_parser = duration)]
    fin_timeout: Limit,
    /// Limit on each upstream connect attempt (0 disables).
    #[arg(long, default_value = "5s", value_name = "DUR", value_parser = duration)]
    connect_timeout: Limit,
    /// Worker threads, each with its own event loop [default: number of CPUs].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// The workers' loop: epoll, or uring (waits in io_uring; copy relays
    /// read through receives armed on it, copy buffers' writes go in
    /// batches; epoll where io_uring cannot be used) [default: epoll].
    #[arg(long = "loop", env = "SPLICED_LOOP", value_name = "LOOP")]
    event_loop: Option<spliced::EventLoop>,
    /// Capacity asked of each pooled pipe (F_SETPIPE_SZ), e.g. 256k; 0 keeps
    /// the kernel's default size.
    #[arg(long, default_value = "1m", value_name = "BYTES", value_parser = config::parse_size)]
    pipe_size: usize,
    /// Most pipes per worker, in use or pooled; past it, new directions copy.
    #[arg(long, default_value = "4096", value_name = "N")]
    max_pipes: usize,
    /// Enlarged-pipe bytes for the whole process; past it, new pipes keep the
    /// kernel's default size [default: half of pipe-user-pages-soft].
    #[arg(long, value_name = "BYTES", value_parser = config::parse_size)]
    pipe_budget: Option<usize>,
    /// Most relays at once; past it, new clients wait in the listen backlog
    /// [default: what the fd limit allows at two sockets per relay plus a
    /// pipe per four relays].
    #[arg(long, value_name = "N")]
    max_conns: Option<usize>,
    /// After SIGTERM/SIGINT, how long live relays may finish (0: no limit).
    #[arg(long, default_value = "30s", value_name = "DUR", value_parser = duration)]
    drain_timeout: Limit,
    /// Serve GET /metrics (Prometheus), /healthz and /livez on this address
    /// [default: off].
    #[arg(long, value_name = "ADDR")]
    admin: Option<String>,
    /// Let this group read the stats file (mode 0640 instead of 0600), e.g.
    /// for a monitoring agent; replaces the file's [global] stats-group.
    #[arg(long, value_name = "GROUP")]
    stats_group: Option<String>,
    /// Log lines as plain text or as one JSON object per line.
    #[arg(long, default_value = "text", value_name = "FORMAT")]
    log_format: LogFormat,
    /// Log a progress line for each relay alive longer than this, once per
    /// interval (0 disables).
    #[arg(long, default_value = "0", value_name = "DUR", value_parser = duration)]
    log_interval: Limit,
}

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// A duration flag's value; `None` when the flag was `0` (disabled).
#[derive(Clone, Copy, Debug)]
struct Limit(Option<Duration>);

fn duration(text: &str) -> Result<Limit, String> {
    config::parse_duration(text)
        .map(Limit)
        .map_err(|e| e.to_string())
}

impl RunArgs {
    /// The config the flags describe; `given` tells which flags were on the
    /// command line (and so override a config file).
    fn into_config(self, given: impl Fn(&str) -> bool) -> Result<Config, String> {
        if let Some(path) = self.config.clone() {
            return self.file_config(&path, given);
        }
        let listen = self.listen.as_deref().unwrap_or_default();
        let listen_addrs = config::resolve_listen(listen).map_err(|e| format!("--listen: {e}"))?;
        let mut upstreams = Vec::new();
        for u in &self.upstreams {
            upstreams.extend(config::resolve(u).map_err(|e| format!("--upstream: {e}"))?);
        }
        if upstreams.is_empty() {
            return Err("no upstream: give at least one --upstream HOST:PORT".into());
        }
        let mut config = Config::single(listen_addrs[0], upstreams, self.mode);
        config.listeners[0] = ListenerConfig {
            name: listen.to_string(),
            listen: listen_addrs,
            timeouts: Timeouts {
                idle: self.idle_timeout.0,
                fin: self.fin_timeout.0,
                connect: self.connect_timeout.0,
            },
            ..config.listeners[0].clone()
        };
        if let Some(n) = self.workers {
            config.workers = n;
        }
        if let Some(event_loop) = self.event_loop {
            config.event_loop = event_loop;
        }
        config.pipe_size = self.pipe_size;
        config.max_pipes_per_worker = self.max_pipes;
        if let Some(bytes) = self.pipe_budget {
            config.pipe_budget = bytes;
        }
        config.max_relays = self.max_conns;
        config.drain_timeout = self.drain_timeout.0;
        self.apply_ops(&mut config)?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// The admin endpoint, the stats group, the instance name and progress
    /// lines; `--admin` and `--stats-group` override the config file.
    fn apply_ops(&self, config: &mut Config) -> Result<(), String> {
        if let Some(admin) = &self.admin {
            let addrs = config::resolve(admin).map_err(|e| format!("--admin: {e}"))?;
            config.ops.admin = addrs.first().copied();
        }
        if let Some(group) = &self.stats_group {
            let group = spliced::ops::StatsGroup::lookup(group)
                .map_err(|e| format!("--stats-group: {e}"))?;
            config.ops.stats_group = Some(group);
        }
        spliced::shm::check_instance_name(&self.name).map_err(|e| format!("--name: {e}"))?;
        config.ops.instance = Some(self.name.clone());
        config.ops.log_interval = self.log_interval.0;
        Ok(())
    }

    /// The config file's listeners, with the flags that were given laid
    /// over its [defaults] and [global] settings.
    fn file_config(self, path: &Path, given: impl Fn(&str) -> bool) -> Result<Config, String> {
        if self.listen.is_some() || !self.upstreams.is_empty() {
            return Err(format!(
                "--listen and --upstream describe a single listener and cannot be combined with --config {} (also set by SPLICED_CONFIG): put the listener in the file",
                path.display()
            ));
        }
        let flags = FlagDefaults {
            mode: given("mode").then_some(self.mode),
            idle_timeout: given("idle_timeout").then_some(self.idle_timeout.0),
            fin_timeout: given("fin_timeout").then_some(self.fin_timeout.0),
            connect_timeout: given("connect_timeout").then_some(self.connect_timeout.0),
        };
        let loaded = config::load(path, &flags).map_err(|d| first_of(path, &d, "problems"))?;
        if !loaded.unsupported.is_empty() {
            return Err(first_of(path, &loaded.unsupported, "such settings"));
        }
        let mut config = loaded.config;
        self.overlay(&mut config, given);
        self.apply_ops(&mut config)?;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }

    /// The config file again, for a reload: every problem, one a line.
    fn reread(&self, given: impl Fn(&str) -> bool) -> Result<Config, Vec<String>> {
        let Some(path) = &self.config else {
            return Err(vec![
                "started without --config: there is no file to re-read".into(),
            ]);
        };
        let flags = FlagDefaults {
            mode: given("mode").then_some(self.mode),
            idle_timeout: given("idle_timeout").then_some(self.idle_timeout.0),
            fin_timeout: given("fin_timeout").then_some(self.fin_timeout.0),
            connect_timeout: given("connect_timeout").then_some(self.connect_timeout.0),
        };
        let lines = |d: &[Diagnostic]| -> Vec<String> {
            d.iter()
                .map(|d| format!("{}: {d}", path.display()))
                .collect()
        };
        let loaded = config::load(path, &flags).map_err(|d| lines(&d))?;
        if !loaded.unsupported.is_empty() {
            return Err(lines(&loaded.unsupported));
        }
        let mut config = loaded.config;
        self.overlay(&mut config, given);
        self.apply_ops(&mut config).map_err(|e| vec![e])?;
        config.validate().map_err(|e| vec![e.to_string()])?;
        Ok(config)
    }

    /// The flags given beside a config file, laid over it.
    fn overlay(&self, config: &mut Config, given: impl Fn(&str) -> bool) {
        if let Some(n) = self.workers {
            config.workers = n;
        }
        if let Some(event_loop) = self.event_loop {
            config.event_loop = event_loop;
        }
        if given("pipe_size") {
            config.pipe_size = self.pipe_size;
        }
        if given("max_pipes") {
            config.max_pipes_per_worker = self.max_pipes;
        }
        if let Some(bytes) = self.pipe_budget {
            config.pipe_budget = bytes;
        }
        if self.max_conns.is_some() {
            config.max_relays = self.max_conns;
        }
        if given("drain_timeout") {
            config.drain_timeout = self.drain_timeout.0;
        }
    }
}

/// The first diagnostic as one line, saying how many more there are.
fn first_of(path: &Path, diagnostics: &[Diagnostic], what: &str) -> String {
    let mut line = format!("{}: {}", path.display(), diagnostics[0]);
    if diagnostics.len() > 1 {
        line.push_str(&format!(
            " (and {} more {what}; 'spliced check --config {}' lists them all)",
            diagnostics.len() - 1,
            path.display()
        ));
    }
    line
}

fn main() -> ExitCode {
    let parsed = Cli::command()
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(&usage_error(&e)),
    };
    // The bench runs thousands of relays in-process: one line each would
    // cost the worker CPU it measures.
    match cli.command {
        Command::Run(args) => {
            let _log = init_logging("info", args.log_format);
            // Captured now: a binary replaced on disk later is what an
            // upgrade starts, never the old inode (/proc/self/exe).
            let binary = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("spliced"));
            let origin = (binary, std::env::args_os().skip(1).collect());
            let incoming = match spliced::upgrade::Incoming::from_env() {
                None => None,
                Some(Ok(incoming)) => Some(incoming),
                Some(Err(e)) => return fail(&format!("upgrade: {e}")),
            };
            let given_ids = given_ids(&matches);
            let given = move |id: &str| given_ids.contains(&id);
            match args.clone().into_config(&given) {
                Ok(config) => {
                    let (name, user) = (args.name.clone(), args.user.clone());
                    lifecycle::run(
                        config,
                        &name,
                        user.as_deref(),
                        origin,
                        incoming,
                        move || args.reread(&given),
                    )
                }
                Err(e) => {
                    if let Some(incoming) = incoming {
                        incoming.refuse(&e);
                    }
                    fail(&e)
                }
            }
        }
        Command::Bench(args) => {
            // The bench runs thousands of relays in-process: one line each
            // would cost the worker CPU it measures.
            let _log = init_logging("warn", LogFormat::Text);
            spliced::bench::run(args)
        }
        Command::Check(args) => {
            let _log = init_logging("warn", LogFormat::Text);
            check::check(args)
        }
        Command::Stats(args) => {
            let _log = init_logging("warn", LogFormat::Text);
            spliced::cli::stats::run(args)
        }
        Command::Reload(args) => {
            let _log = init_logging("warn", LogFormat::Text);
            lifecycle::signal_reload(&args.name)
        }
        Command::Upgrade(args) => {
            let _log = init_logging("warn", LogFormat::Text);
            upgrade::request(&args.name, args.binary.as_deref())
        }
    }
}

/// The ids of `spliced run`'s flags that were on the command line, kept
/// for every reload (they override the file each time).
fn given_ids(matches: &ArgMatches) -> Vec<&'static str> {
    let ids = [
        "mode",
        "idle_timeout",
        "fin_timeout",
        "connect_timeout",
        "pipe_size",
        "max_pipes",
        "drain_timeout",
    ];
    ids.into_iter().filter(|id| given(matches, id)).collect()
}

/// Whether `spliced run`'s flag `id` was on the command line (not a default).
fn given(matches: &ArgMatches, id: &str) -> bool {
    matches
        .subcommand_matches("run")
        .is_some_and(|m| m.value_source(id) == Some(ValueSource::CommandLine))
}

/// Logs to stderr, through a writer thread (`spliced::cli::log`) so that
/// no worker makes a system call per line; the returned guard writes what
/// is left when dropped. JSON lines carry the event's fields at the top
/// level beside `timestamp`, `level`, `target` and `message`, and no span
/// data, so the fields documented in docs/OPERATIONS.md are all there is.
fn init_logging(default_level: &str, format: LogFormat) -> spliced::cli::log::Flush {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let (writer, flush) = spliced::cli::log::start();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer)
        .with_ansi(false);
    match format {
        LogFormat::Text => builder
            .event_format(spliced::cli::logfmt::TextFormat::new())
            .init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .init(),
    }
    flush
}

/// clap's error as one line: the lines before its usage and "For more
/// information" footer (the problem, then any list of arguments or tip),
/// joined, and a pointer to the right `--help`.
fn usage_error(e: &clap::Error) -> String {
    let command = Cli::command();
    let path = help_path(&command);
    if e.kind() == clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
        let names: Vec<&str> = command
            .get_subcommands()
            .map(|c| c.get_name())
            .filter(|&n| n != "help")
            .collect();
        return format!(
            "no command given; expected one of: {} (see '{path} --help')",
            names.join(", ")
        );
    }
    let rendered = e.to_string();
    let mut line = String::new();
    let mut in_list = false;
    for raw in rendered.lines() {
        let text = raw.trim();
        if text.starts_with("Usage:") || text.starts_with("For more information") {
            break;
        }
        if text.is_empty() {
            in_list = false;
            continue;
        }
        let text = text.strip_prefix("error: ").unwrap_or(text);
        let item = raw.starts_with(' ') && !text.starts_with("tip:");
        let joint = if line.is_empty() {
            ""
        } else if line.ends_with(':') || text.starts_with('[') {
            " "
        } else if in_list && item {
            ", "
        } else {
            "; "
        };
        line.push_str(joint);
        line.push_str(text);
        in_list = item || line.ends_with(':');
    }
    format!("{line} (see '{path} --help')")
}

/// `spliced` or `spliced SUBCOMMAND`: whose `--help` explains the error.
fn help_path(command: &clap::Command) -> String {
    let name = command.get_name();
    match std::env::args().nth(1) {
        Some(sub) if command.get_subcommands().any(|c| c.get_name() == sub) => {
            format!("{name} {sub}")
        }
        _ => name.to_string(),
    }
}

fn fail(message: &str) -> ExitCode {
    eprintln!("spliced: error: {message}");
    ExitCode::from(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run_args(args: &[&str]) -> RunArgs {
        let argv = ["spliced", "run", "--listen", "127.0.0.1:1"];
        match Cli::parse_from(argv.iter().chain(args)).command {
            Command::Run(r) => r,
            _ => unreachable!(),
        }
    }

    #[test]
    fn cli_defaults_are_the_library_defaults() {
        let cli = run_args(&["--upstream", "127.0.0.1:2"]);
        let lib = Config::single("127.0.0.1:1".parse().unwrap(), vec![], Mode::Splice);
        assert_eq!(cli.pipe_size, lib.pipe_size);
        assert_eq!(cli.max_pipes, lib.max_pipes_per_worker);
        let timeouts = Timeouts::default();
        assert_eq!(cli.idle_timeout.0, timeouts.idle);
        assert_eq!(cli.fin_timeout.0, timeouts.fin);
        assert_eq!(cli.connect_timeout.0, timeouts.connect);
        assert_eq!(cli.drain_timeout.0, lib.drain_timeout);
    }

    #[test]
    fn clap_errors_become_one_line() {
        let one_line = |argv: &[&str]| {
            let e = Cli::try_parse_from(argv).unwrap_err();
            let line = usage_error(&e);
            assert!(!line.contains('\n'), "{line}");
            line
        };
        let missing = one_line(&["spliced", "run"]);
        assert!(
            missing.contains("not provided: --listen <ADDR>"),
            "{missing}"
        );
        let typo = one_line(&["spliced", "runn"]);
        assert!(
            typo.contains("'runn'; tip: a similar subcommand exists: 'run'"),
            "{typo}"
        );
        let bare = one_line(&["spliced"]);
        assert!(bare.contains("run, bench, check, stats"), "{bare}");
    }
}
