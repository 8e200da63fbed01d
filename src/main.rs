//! The `spliced` command: CLI → Config → run. Everything else is the library.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use spliced::config::{self, Config, ListenerConfig, Mode, Timeouts};

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
    /// Relay TCP connections from --listen to the --upstream servers.
    Run(RunArgs),
    /// Measure splice against copy (and a direct baseline) on this machine.
    Bench(spliced::bench::BenchArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Address to accept clients on, HOST:PORT.
    #[arg(long, value_name = "ADDR")]
    listen: String,
    /// Server to relay to, HOST:PORT; repeat for round-robin with failover.
    #[arg(long = "upstream", value_name = "ADDR")]
    upstreams: Vec<String>,
    /// How bytes move: splice (zero-copy, falls back per direction) or copy.
    #[arg(long, default_value = "splice", value_name = "MODE")]
    mode: Mode,
    /// Close a relay after this long with no byte moved either way (0 disables).
    #[arg(long, default_value = "1h", value_name = "DUR", value_parser = duration)]
    idle_timeout: Limit,
    /// Inactivity limit once either direction is half-closed (0 disables).
    #[arg(long, default_value = "60s", value_name = "DUR", value_parser = duration)]
    fin_timeout: Limit,
    /// Bound on each upstream connect attempt (0 disables).
    #[arg(long, default_value = "5s", value_name = "DUR", value_parser = duration)]
    connect_timeout: Limit,
    /// Worker threads, each with its own event loop [default: number of CPUs].
    #[arg(long, value_name = "N")]
    workers: Option<usize>,
    /// Capacity asked of each pooled pipe (F_SETPIPE_SZ), e.g. 1m, 256k; 0 keeps the kernel's.
    #[arg(long, value_name = "BYTES", value_parser = config::parse_size)]
    pipe_size: Option<usize>,
    /// Most pipes per worker (in use + pooled); past it, directions copy.
    #[arg(long, value_name = "N")]
    max_pipes: Option<usize>,
    /// Enlarged-pipe bytes for the whole process; past it pipes keep the
    /// kernel's default size [default: half of pipe-user-pages-soft].
    #[arg(long, value_name = "BYTES", value_parser = config::parse_size)]
    pipe_budget: Option<usize>,
    /// Most relays at once; past it, new clients wait in the listen backlog
    /// [default: what the fd limit allows at two sockets per relay].
    #[arg(long, value_name = "N")]
    max_conns: Option<usize>,
    /// After SIGTERM/SIGINT, how long live relays may finish (0: no limit).
    #[arg(long, default_value = "30s", value_name = "DUR", value_parser = duration)]
    drain_timeout: Limit,
}

/// A duration flag's value; `None` when the flag was `0` (disabled).
#[derive(Clone, Copy, Debug)]
struct Limit(Option<Duration>);

fn duration(text: &str) -> Result<Limit, String> {
    config::parse_duration(text).map(Limit)
}

impl RunArgs {
    fn into_config(self) -> Result<Config, String> {
        let listen = config::resolve_listen(&self.listen).map_err(|e| format!("--listen: {e}"))?;
        let mut upstreams = Vec::new();
        for u in &self.upstreams {
            upstreams.extend(config::resolve(u).map_err(|e| format!("--upstream: {e}"))?);
        }
        if upstreams.is_empty() {
            return Err("no upstream: give at least one --upstream HOST:PORT".into());
        }
        let mut config = Config::single(listen[0], upstreams, self.mode);
        config.listeners[0] = ListenerConfig {
            listen,
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
        if let Some(size) = self.pipe_size {
            config.pipe_size = size;
        }
        if let Some(bytes) = self.pipe_budget {
            config.pipe_budget = bytes;
        }
        if let Some(n) = self.max_pipes {
            config.max_pipes_per_worker = n;
        }
        config.max_relays = self.max_conns;
        config.drain_timeout = self.drain_timeout.0;
        config.validate().map_err(|e| e.to_string())?;
        Ok(config)
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            // --help and --version
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => return fail(first_line(&e.to_string())),
    };
    // The bench runs thousands of relays in-process: one line each would
    // cost the worker CPU it measures.
    init_logging(match cli.command {
        Command::Bench(_) => "warn",
        Command::Run(_) => "info",
    });
    match cli.command {
        Command::Run(args) => match args.into_config() {
            Ok(config) => run(config),
            Err(e) => fail(&e),
        },
        Command::Bench(args) => spliced::bench::run(args),
    }
}

fn run(config: Config) -> ExitCode {
    let handle = match spliced::start(config) {
        Ok(h) => h,
        Err(e) => return fail(&e.to_string()),
    };
    let controller = handle.controller();
    let signals = signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
    ]);
    let mut signals = match signals {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot install signal handlers: {e}")),
    };
    std::thread::spawn(move || {
        let mut seen = 0;
        for signal in signals.forever() {
            seen += 1;
            if seen == 1 {
                tracing::info!(signal, "stopping: no new connections; draining live relays");
                controller.shutdown();
            } else {
                tracing::warn!(signal, "second signal: exiting now");
                std::process::exit(1);
            }
        }
    });
    handle.join();
    tracing::info!("all relays closed; exiting");
    ExitCode::SUCCESS
}

fn init_logging(default_level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
}

/// clap's messages span several lines; the first one names the problem.
fn first_line(message: &str) -> &str {
    message
        .lines()
        .next()
        .unwrap_or(message)
        .trim_start_matches("error: ")
}

fn fail(message: &str) -> ExitCode {
    eprintln!("spliced: error: {message}");
    ExitCode::from(2)
}
