//! Command-line arguments of `spliced bench` and the settings derived from them.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use super::netpath::PathKind;
use super::upstream::{DEFAULT_WRITE, MAX_WRITE};
use crate::config::{parse_duration, parse_size};
use crate::{EventLoop, Mode};

/// A workload family; each can be selected with `--workloads`.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Streaming through 1 and N connections, one way and both ways at once.
    Bulk,
    /// Request/response ping-pong across message sizes.
    Rr,
    /// A new connection for each small exchange, closed after it.
    Connect,
    /// `connect` with a TLS ClientHello first, through a listener that routes
    /// by its server name and through one without routes.
    ConnectRouted,
    /// Many open idle relays: the proxy's memory, fds and pipes per relay.
    Idle,
}

impl Workload {
    pub fn as_str(self) -> &'static str {
        match self {
            Workload::Bulk => "bulk",
            Workload::Rr => "rr",
            Workload::Connect => "connect",
            Workload::ConnectRouted => "connect-routed",
            Workload::Idle => "idle",
        }
    }
}

/// Arguments of `spliced bench`.
#[derive(clap::Args, Debug, Clone)]
#[command(
    after_help = "The figures are the median of several runs, with the spread (largest \
distance of a run from the median, in %). docs/BENCHMARKS.md explains how to read them."
)]
pub struct BenchArgs {
    /// Workloads to run, comma-separated.
    #[arg(long, short = 'w', value_enum, value_delimiter = ',',
          default_values_t = [Workload::Bulk, Workload::Rr, Workload::Connect, Workload::Idle])]
    pub workloads: Vec<Workload>,

    /// Engines to compare, comma-separated: splice, copy, auto (spliced's three modes,
    /// on the epoll loop), uring-splice, uring-copy, uring-auto (the same on the uring loop),
    /// handoff (pairs handed to an in-process spliced runtime), tokio (an in-process
    /// copy_bidirectional baseline), direct (no proxy) or target (every --target)
    /// [default: splice,copy,direct; with --target: direct,target].
    #[arg(long, short = 'e', value_delimiter = ',', value_name = "ENGINE")]
    pub engines: Vec<String>,

    /// Run a short smoke test (under 10 s): fewer, shorter runs and 1000 idle relays.
    #[arg(long)]
    pub quick: bool,

    /// Print the results as JSON on stdout instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Also count the system calls each proxy makes per relayed 64 B message and per
    /// connection, with strace attached to its threads (a separate, untimed pass; needs
    /// strace, and ptrace rights over a --target-pid)
    #[arg(long)]
    pub syscalls: bool,

    /// Also draw throughput and CPU per GiB against rr message size into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// Measure another running proxy, one that forwards to --upstream; repeat it to
    /// compare several proxies in one run.
    #[arg(long, value_name = "[NAME=]HOST:PORT")]
    pub target: Vec<String>,

    /// PID of a --target proxy, whose CPU time, memory and fds (its child processes'
    /// included) are then read from /proc; the n-th --target-pid goes with the n-th --target.
    #[arg(long, value_name = "PID")]
    pub target_pid: Vec<u32>,

    /// A --target's second listener, one that routes TLS clients by server name to
    /// --upstream (`a.db.example`, `*.olap.db.example`, `b.db.example` and a default):
    /// what the connect-routed workload's routed case measures; the n-th goes with
    /// the n-th --target.
    #[arg(long, value_name = "HOST:PORT")]
    pub target_routed: Vec<String>,

    /// Where the embedded upstream (sink, source and echo server) listens; a --target
    /// must forward there [default: 127.0.0.1:0; with a veth path: 10.201.0.2:0, its
    /// end of the veth pair].
    #[arg(long, value_name = "HOST:PORT")]
    pub upstream: Option<SocketAddr>,

    #[command(flatten)]
    pub net: Box<PathArgs>,

    /// Pipe size of the splice engine; give several, e.g. 64k,256k,1m, to compare them
    /// side by side as engines named splice-64k, splice-256k and so on [default: 1m].
    #[arg(long, value_delimiter = ',', value_parser = parse_size_arg, value_name = "SIZE")]
    pub pipe_size: Vec<usize>,

    /// Worker threads of the proxy under test.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub workers: usize,

    /// Runs per figure, of which the median is reported [default: 5, idle 3; with
    /// --quick: 3, idle 1].
    #[arg(long, value_name = "N")]
    pub runs: Option<usize>,

    /// Measured time of one bulk, rr or connect run, e.g. 400ms [default: 250ms, rr
    /// 150ms; with --quick: 50ms].
    #[arg(long, value_parser = parse_duration_arg, value_name = "DUR")]
    pub duration: Option<Duration>,

    /// Connections of the many-connection bulk cases [default: 8].
    #[arg(long, value_name = "N")]
    pub conns: Option<usize>,

    /// Message sizes of the rr workload, comma-separated [default: 64,1k,16k,256k].
    #[arg(long, value_delimiter = ',', value_parser = parse_size_arg, value_name = "SIZE")]
    pub sizes: Vec<usize>,

    /// Size of each write of the bulk senders (the load's and the upstream's),
    /// comma-separated, at most 4m; each size gets its bulk cases, upstream to client
    /// included [default: 256k, without that case].
    #[arg(long, value_delimiter = ',', value_parser = parse_write_size_arg, value_name = "SIZE")]
    pub write_sizes: Vec<usize>,

    /// Idle relays to open [default: 10000; with --quick: 1000].
    #[arg(long, value_name = "N")]
    pub idle_relays: Option<usize>,

    /// Pin the in-process proxy's worker threads to this CPU (runs taskset -p on them).
    #[arg(long, value_name = "CPU")]
    pub pin_proxy: Option<usize>,

    /// Internal: run as the proxy process of an idle measurement.
    #[arg(long, hide = true)]
    pub idle_child: Option<String>,
}

/// `--path` and what goes with it: where the load, the proxy and the upstream
/// meet.
#[derive(clap::Args, Debug, Clone)]
pub struct PathArgs {
    /// The network path: loopback; veth, the upstream in a network namespace of its own
    /// behind a veth pair with --mtu and a NIC's offloads (GSO on sending, GRO on
    /// receiving); veth2, the load generator behind a second such pair too;
    /// veth-nooffload, the veth layout with one segment per skb and no GRO, a worst case
    /// no NIC shows. The veth paths need root, ip and ethtool; veth and veth2 refuse to
    /// report unless direct over them reaches a quarter of direct over loopback. The
    /// bench removes their namespaces when it ends, also on Ctrl-C.
    #[arg(long, value_enum, default_value_t = PathKind::Loopback)]
    pub path: PathKind,

    /// MTU of the veth pairs [default: 1500].
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u32).range(576..=65535))]
    pub mtu: Option<u32>,

    /// Set up the --path, print where the proxy and the upstream go (one line of
    /// key=value), keep it until stdin closes or a signal, then remove it. For scripts
    /// that run other proxies on the same path (scripts/bench-peers.sh).
    #[arg(long)]
    pub hold: bool,

    /// Use the namespaces of a running `spliced bench --hold` (its netns= name) instead of
    /// creating new ones; a --target then runs in NAME-px.
    #[arg(long, value_name = "NAME")]
    pub netns: Option<String>,

    /// Internal: the network namespace the idle proxy process enters first.
    #[arg(long, hide = true)]
    pub idle_netns: Option<PathBuf>,

    /// Internal: the address the idle proxy process listens on.
    #[arg(long, hide = true, default_value = "127.0.0.1")]
    pub idle_listen: IpAddr,
}

fn parse_size_arg(s: &str) -> Result<usize, String> {
    parse_size(s).map_err(|e| e.to_string())
}

fn parse_write_size_arg(s: &str) -> Result<usize, String> {
    let n = parse_size_arg(s)?;
    if n == 0 || n > MAX_WRITE {
        return Err(format!("a write size must be 1 to {MAX_WRITE} bytes"));
    }
    Ok(n)
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s)
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "the duration must be positive".to_string())
}

/// What to run, after defaults and --quick are applied.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Settings {
    pub workloads: Vec<Workload>,
    pub quick: bool,
    pub runs: usize,
    pub idle_runs: usize,
    #[serde(serialize_with = "ser_secs")]
    pub duration: Duration,
    #[serde(serialize_with = "ser_secs")]
    pub rr_duration: Duration,
    #[serde(serialize_with = "ser_secs")]
    pub warmup: Duration,
    pub conns: usize,
    pub connect_threads: usize,
    pub sizes: Vec<usize>,
    /// Write sizes of the bulk cases.
    pub write_sizes: Vec<usize>,
    /// `--write-sizes` was given: the bulk cases name their write size and
    /// include upstream to client.
    pub write_sizes_given: bool,
    pub idle_relays: usize,
    pub workers: usize,
    pub pin_proxy: Option<usize>,
}

fn ser_secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl Settings {
    pub fn from_args(a: &BenchArgs) -> Settings {
        let quick = a.quick;
        let mut workloads = Vec::new();
        for w in &a.workloads {
            if !workloads.contains(w) {
                workloads.push(*w);
            }
        }
        let sizes = if a.sizes.is_empty() {
            vec![64, 1 << 10, 16 << 10, 256 << 10]
        } else {
            a.sizes.clone()
        };
        let runs = a.runs.unwrap_or(if quick { 3 } else { 5 }).max(1);
        Settings {
            workloads,
            quick,
            runs,
            idle_runs: if quick { 1 } else { runs.min(3) },
            duration: a.duration.unwrap_or(if quick {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(250)
            }),
            rr_duration: a.duration.unwrap_or(if quick {
                Duration::from_millis(50)
            } else {
                Duration::from_millis(150)
            }),
            warmup: if quick {
                Duration::from_millis(20)
            } else {
                Duration::from_millis(80)
            },
            conns: a.conns.unwrap_or(8).max(1),
            connect_threads: 2,
            sizes,
            write_sizes: if a.write_sizes.is_empty() {
                vec![DEFAULT_WRITE]
            } else {
                a.write_sizes.clone()
            },
            write_sizes_given: !a.write_sizes.is_empty(),
            idle_relays: a.idle_relays.unwrap_or(if quick { 1000 } else { 10_000 }),
            workers: a.workers.max(1),
            pin_proxy: a.pin_proxy,
        }
    }
}

/// One engine the load is run through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EngineSpec {
    /// No proxy: the load talks to the embedded upstream.
    Direct,
    /// spliced in-process, on the epoll or the uring loop.
    Proxy {
        mode: Mode,
        pipe_size: usize,
        event_loop: EventLoop,
    },
    /// A blocking accept loop in this process handing each pair to a
    /// spliced runtime (the embedding API).
    Handoff,
    /// A tokio runtime in this process running `copy_bidirectional` per pair.
    Tokio,
    /// Another running proxy.
    Target {
        name: String,
        addr: SocketAddr,
        pid: Option<u32>,
        /// Its listener that routes by server name (`--target-routed`).
        routed: Option<SocketAddr>,
    },
}

impl EngineSpec {
    pub fn label(&self, several_pipe_sizes: bool) -> String {
        match self {
            EngineSpec::Direct => "direct".into(),
            EngineSpec::Proxy {
                mode: Mode::Splice,
                pipe_size,
                event_loop,
            } if several_pipe_sizes => {
                format!(
                    "{}splice-{}",
                    loop_prefix(*event_loop),
                    size_label(*pipe_size)
                )
            }
            EngineSpec::Proxy {
                mode, event_loop, ..
            } => format!("{}{}", loop_prefix(*event_loop), mode.as_str()),
            EngineSpec::Handoff => "handoff".into(),
            EngineSpec::Tokio => "tokio".into(),
            EngineSpec::Target { name, .. } => name.clone(),
        }
    }
}

/// `65536` → `64k`, `1048576` → `1m`.
pub fn size_label(n: usize) -> String {
    if n >= 1 << 20 && n.trailing_zeros() >= 20 {
        format!("{}m", n >> 20)
    } else if n >= 1 << 10 && n.trailing_zeros() >= 10 {
        format!("{}k", n >> 10)
    } else {
        n.to_string()
    }
}

/// `64` → `64 B`, `16384` → `16 KiB`.
pub fn size_human(n: usize) -> String {
    if n >= 1 << 20 && n.trailing_zeros() >= 20 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n.trailing_zeros() >= 10 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

/// How an engine's label names the uring loop (the epoll loop's labels
/// are the modes alone).
fn loop_prefix(event_loop: EventLoop) -> &'static str {
    match event_loop {
        EventLoop::Epoll => "",
        EventLoop::Uring => "uring-",
    }
}

/// The engines to run, in order, from --engines, --target and --pipe-size.
pub fn engine_specs(a: &BenchArgs) -> Result<Vec<EngineSpec>, String> {
    let mut targets = Vec::new();
    for (i, t) in a.target.iter().enumerate() {
        let (name, addr) = match t.split_once('=') {
            Some((n, rest)) if !n.is_empty() && !n.contains(':') => (n.to_string(), rest),
            _ => (
                if a.target.len() == 1 {
                    "target".to_string()
                } else {
                    format!("target{}", i + 1)
                },
                t.as_str(),
            ),
        };
        let addr = crate::config::resolve(addr).map_err(|e| e.to_string())?[0];
        let routed = match a.target_routed.get(i) {
            Some(r) => {
                Some(crate::config::resolve(r).map_err(|e| format!("--target-routed: {e}"))?[0])
            }
            None => None,
        };
        targets.push(EngineSpec::Target {
            name,
            addr,
            pid: a.target_pid.get(i).copied(),
            routed,
        });
    }
    if a.target_pid.len() > a.target.len() {
        return Err("more --target-pid than --target".into());
    }
    if a.target_routed.len() > a.target.len() {
        return Err("more --target-routed than --target".into());
    }
    let names: Vec<String> = if a.engines.is_empty() {
        if targets.is_empty() {
            vec!["splice".into(), "copy".into(), "direct".into()]
        } else {
            vec!["direct".into(), "target".into()]
        }
    } else {
        a.engines
            .iter()
            .map(|s| s.trim().to_ascii_lowercase())
            .collect()
    };
    let pipe_sizes = if a.pipe_size.is_empty() {
        vec![crate::config::DEFAULT_PIPE_SIZE]
    } else {
        a.pipe_size.clone()
    };
    let mut out = Vec::new();
    for n in &names {
        let (event_loop, mode_name) = match n.strip_prefix("uring-") {
            Some(rest) => (EventLoop::Uring, rest),
            None => (EventLoop::Epoll, n.as_str()),
        };
        let add: Vec<EngineSpec> = match mode_name {
            "splice" => pipe_sizes
                .iter()
                .map(|&p| EngineSpec::Proxy {
                    mode: Mode::Splice,
                    pipe_size: p,
                    event_loop,
                })
                .collect(),
            "copy" => vec![EngineSpec::Proxy {
                mode: Mode::Copy,
                pipe_size: pipe_sizes[0],
                event_loop,
            }],
            "auto" => vec![EngineSpec::Proxy {
                mode: Mode::Auto,
                pipe_size: pipe_sizes[0],
                event_loop,
            }],
            _ if event_loop == EventLoop::Uring => {
                return Err(format!(
                    "unknown engine '{n}' (the uring loop runs uring-splice, uring-copy and uring-auto)"
                ))
            }
            "handoff" => vec![EngineSpec::Handoff],
            "tokio" => vec![EngineSpec::Tokio],
            "direct" => vec![EngineSpec::Direct],
            "target" | "targets" => {
                if targets.is_empty() {
                    return Err("engine 'target' needs --target HOST:PORT".into());
                }
                targets.clone()
            }
            other => {
                return Err(format!(
                    "unknown engine '{other}' (expected splice, copy, auto, uring-splice, uring-copy, uring-auto, handoff, tokio, direct or target)"
                ))
            }
        };
        for e in add {
            if !out.contains(&e) {
                out.push(e);
            }
        }
    }
    if !targets.is_empty() && !out.iter().any(|e| matches!(e, EngineSpec::Target { .. })) {
        out.extend(targets);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn parse(args: &[&str]) -> BenchArgs {
        Cli::parse_from(std::iter::once("bench").chain(args.iter().copied())).bench
    }

    #[test]
    fn default_engines_and_sizes() {
        let a = parse(&[]);
        let specs = engine_specs(&a).unwrap();
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[2], EngineSpec::Direct);
        let s = Settings::from_args(&a);
        assert_eq!(s.sizes, vec![64, 1024, 16384, 262144]);
        assert_eq!(s.workloads.len(), 4);
        assert!(Settings::from_args(&parse(&["--quick"])).duration < s.duration);
    }

    #[test]
    fn write_sizes_name_their_bulk_cases() {
        let s = Settings::from_args(&parse(&["-w", "bulk"]));
        assert_eq!(s.write_sizes, vec![DEFAULT_WRITE]);
        let names: Vec<String> = super::super::workloads::cases(&s)
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(
            names[0], "1 conn, one way",
            "unchanged without --write-sizes"
        );
        assert_eq!(names.len(), 3);

        let s = Settings::from_args(&parse(&["-w", "bulk", "--write-sizes", "16k,4m"]));
        assert_eq!(s.write_sizes, vec![16 << 10, 4 << 20]);
        let names: Vec<String> = super::super::workloads::cases(&s)
            .into_iter()
            .map(|c| c.name)
            .collect();
        assert_eq!(names.len(), 8);
        assert_eq!(names[1], "1 conn, upstream to client, 16 KiB writes");
        assert_eq!(names[7], "1 conn, both ways, 4 MiB writes");
    }

    #[test]
    fn a_write_size_past_the_upstream_buffer_is_refused() {
        let parsed = Cli::try_parse_from(["bench", "--write-sizes", "8m"]);
        assert!(parsed.is_err());
        assert!(parse_write_size_arg("0").is_err());
    }

    #[test]
    fn targets_pipe_sizes_and_labels() {
        let a = parse(&[
            "--target",
            "haproxy=127.0.0.1:8000",
            "--target-pid",
            "42",
            "--target",
            "127.0.0.1:8001",
            "-e",
            "splice,direct,target",
            "--pipe-size",
            "64k,1m",
        ]);
        let specs = engine_specs(&a).unwrap();
        let labels: Vec<String> = specs.iter().map(|s| s.label(true)).collect();
        assert_eq!(
            labels,
            ["splice-64k", "splice-1m", "direct", "haproxy", "target2"]
        );
        assert!(matches!(specs[3], EngineSpec::Target { pid: Some(42), .. }));
        assert!(matches!(specs[4], EngineSpec::Target { pid: None, .. }));
        assert!(engine_specs(&parse(&["-e", "bogus"])).is_err());
        assert!(engine_specs(&parse(&["-e", "target"])).is_err());
    }

    #[test]
    fn a_routed_listener_goes_with_its_target() {
        let a = parse(&[
            "--target",
            "haproxy=127.0.0.1:8000",
            "--target-routed",
            "127.0.0.1:8001",
            "--target",
            "127.0.0.1:8002",
        ]);
        let specs = engine_specs(&a).unwrap();
        let routed: Vec<Option<SocketAddr>> = specs
            .iter()
            .filter_map(|s| match s {
                EngineSpec::Target { routed, .. } => Some(*routed),
                _ => None,
            })
            .collect();
        assert_eq!(routed, [Some(([127, 0, 0, 1], 8001).into()), None]);
        let one_too_many = parse(&[
            "--target",
            "127.0.0.1:8000",
            "--target-routed",
            "127.0.0.1:8001",
            "--target-routed",
            "127.0.0.1:8002",
        ]);
        assert!(engine_specs(&one_too_many).is_err());
    }

    #[test]
    fn size_names() {
        assert_eq!(size_label(65536), "64k");
        assert_eq!(size_label(1 << 20), "1m");
        assert_eq!(size_label(1000), "1000");
        // What the --pipe-size help quotes as the default.
        assert_eq!(size_label(crate::config::DEFAULT_PIPE_SIZE), "1m");
        assert_eq!(size_human(64), "64 B");
        assert_eq!(size_human(256 << 10), "256 KiB");
    }
}
