//! `idle`: open N relays that exchanged 64 bytes and went quiet, and read what
//! the proxy holds for them: resident memory, fds and pipes per relay.
//!
//! spliced runs in a child process of its own (this binary with a hidden
//! flag), so its memory and fds are measured apart from the load generator's
//! and from whatever earlier workloads left in this process's heap. A
//! `--target` is read from /proc/PID the same way.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use super::args::{BenchArgs, EngineSpec, Settings};
use super::engines;
use super::load::exchange_and_keep;
use super::measure;
use super::netpath::{NetPath, Side};
use super::workloads::{Figures, Metric};
use crate::{EventLoop, Mode};

/// What the proxy holds at one moment.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Probe {
    pub rss_kib: u64,
    /// None when /proc/PID/fd is not readable (a process that is not dumpable).
    pub fds: Option<u64>,
    pub pipes: Option<u64>,
    /// Relays the proxy reports open (in-process spliced only).
    pub relays: Option<u64>,
}

/// The fds the idle measurement needs in this process: a client and an upstream
/// socket per relay, plus room for the rest (the proxy child also keeps pooled
/// pipes, its listeners and event loops).
pub fn fds_needed(relays: usize) -> u64 {
    2 * relays as u64 + 600
}

/// How many relays fit in the fd limit in force: in this process (a client
/// and an upstream socket each) and under the relay cap the proxy child
/// takes from the same limit with `workers` workers (its fd budget keeps
/// room for pipes), so no relay is left waiting in the listen backlog.
pub fn relays_that_fit(wanted: usize, nofile: u64, workers: usize) -> usize {
    let here = (nofile.saturating_sub(600) / 2) as usize;
    let unspecified = SocketAddr::from(([127, 0, 0, 1], 0));
    let mut child = crate::config::Config::single(unspecified, vec![unspecified], Mode::Splice);
    child.workers = workers.max(1);
    let proxy = crate::runtime::fd_budget(&child, nofile).relays;
    wanted.min(here).min(proxy)
}

enum Prober {
    Child {
        child: Child,
        stdin: ChildStdin,
        stdout: BufReader<ChildStdout>,
    },
    Pid(u32),
}

impl Prober {
    fn probe(&mut self) -> Result<Probe, String> {
        match self {
            Prober::Pid(pid) => {
                let rss_kib =
                    measure::rss_kib(Some(*pid)).ok_or("cannot read the target's memory")?;
                let fp = measure::fds_and_pipes(Some(*pid));
                Ok(Probe {
                    rss_kib,
                    fds: fp.map(|f| f.0),
                    pipes: fp.map(|f| f.1),
                    relays: None,
                })
            }
            Prober::Child { stdin, stdout, .. } => {
                writeln!(stdin, "probe").map_err(|e| format!("idle child: {e}"))?;
                let mut line = String::new();
                stdout
                    .read_line(&mut line)
                    .map_err(|e| format!("idle child: {e}"))?;
                serde_json::from_str(&line).map_err(|e| format!("idle child said {line:?}: {e}"))
            }
        }
    }

    fn finish(self) {
        if let Prober::Child {
            mut child, stdin, ..
        } = self
        {
            drop(stdin);
            let _ = child.wait();
        }
    }
}

fn spawn_child(
    mode: Mode,
    pipe_size: usize,
    event_loop: EventLoop,
    s: &Settings,
    upstream: SocketAddr,
    path: &NetPath,
) -> Result<(Prober, SocketAddr), String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find this program: {e}"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("bench")
        .arg("--idle-child")
        .arg(format!("{}:{}:{}", mode.as_str(), pipe_size, event_loop))
        .arg("--workers")
        .arg(s.workers.to_string())
        .arg("--upstream")
        .arg(upstream.to_string())
        .arg("--idle-listen")
        .arg(path.listen_ip().to_string());
    if let Some(ns) = path.netns(Side::Proxy) {
        cmd.arg("--idle-netns").arg(ns);
    }
    if let Some(cpu) = s.pin_proxy {
        cmd.arg("--pin-proxy").arg(cpu.to_string());
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start the idle proxy process: {e}"))?;
    let stdin = child.stdin.take().ok_or("no stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().ok_or("no stdout")?);
    let mut line = String::new();
    let _ = stdout.read_line(&mut line);
    let addr = line
        .strip_prefix("listening ")
        .and_then(|a| a.trim().parse().ok());
    match addr {
        Some(addr) => Ok((
            Prober::Child {
                child,
                stdin,
                stdout,
            },
            addr,
        )),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            Err(format!(
                "the idle proxy process did not start (said {line:?})"
            ))
        }
    }
}

/// One idle run through `spec`; `None` for `direct`, which has no proxy to measure.
pub fn run(
    spec: &EngineSpec,
    relays: usize,
    s: &Settings,
    upstream: SocketAddr,
    path: &NetPath,
) -> Option<Result<Figures, String>> {
    let (mut prober, addr) = match spec {
        // No separate process whose memory per relay could be read.
        EngineSpec::Direct | EngineSpec::Handoff | EngineSpec::Tokio => return None,
        EngineSpec::Target { pid: None, .. } => return None,
        EngineSpec::Target {
            addr,
            pid: Some(pid),
            ..
        } => (Prober::Pid(*pid), *addr),
        EngineSpec::Proxy {
            mode,
            pipe_size,
            event_loop,
        } => match spawn_child(*mode, *pipe_size, *event_loop, s, upstream, path) {
            Ok(x) => x,
            Err(e) => return Some(Err(e)),
        },
    };
    let r = measure_idle(&mut prober, addr, relays);
    prober.finish();
    Some(r)
}

fn measure_idle(prober: &mut Prober, addr: SocketAddr, relays: usize) -> Result<Figures, String> {
    // One relay first, so one-time setup is not charged to the idle ones.
    drop(exchange_and_keep(addr).map_err(|e| format!("idle warm-up: {e}"))?);
    std::thread::sleep(Duration::from_millis(50));
    let before = prober.probe()?;
    let open = open_relays(addr, relays)?;
    // Let the proxy finish any work it deferred, then read.
    let until = Instant::now() + Duration::from_secs(5);
    let mut after = prober.probe()?;
    while after.relays.is_some_and(|r| r < relays as u64) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(20));
        after = prober.probe()?;
    }
    std::thread::sleep(Duration::from_millis(100));
    let after = prober.probe()?;
    close_relays(open);
    let n = relays as f64;
    let mut f = vec![
        (Metric::Relays, n),
        (
            Metric::BytesPerRelay,
            after.rss_kib.saturating_sub(before.rss_kib) as f64 * 1024.0 / n,
        ),
    ];
    if let (Some(a), Some(b)) = (after.fds, before.fds) {
        f.push((Metric::FdsPerRelay, a.saturating_sub(b) as f64 / n));
    }
    if let Some(p) = after.pipes {
        f.push((Metric::Pipes, p as f64));
    }
    Ok(f)
}

/// Opens `relays` relays from a few threads (one at a time would take seconds).
fn open_relays(addr: SocketAddr, relays: usize) -> Result<Vec<TcpStream>, String> {
    const THREADS: usize = 4;
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let n = relays / THREADS + usize::from(t < relays % THREADS);
            std::thread::spawn(move || {
                (0..n)
                    .map(|_| exchange_and_keep(addr))
                    .collect::<std::io::Result<Vec<TcpStream>>>()
            })
        })
        .collect();
    let mut open = Vec::with_capacity(relays);
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(v)) => open.extend(v),
            Ok(Err(e)) => first_err = first_err.or(Some(e.to_string())),
            Err(_) => first_err = first_err.or(Some("a thread panicked".into())),
        }
    }
    match first_err {
        None => Ok(open),
        Some(e) => Err(format!(
            "opening idle relays ({} of {relays} open): {e}",
            open.len()
        )),
    }
}

/// Closes the relays from a few threads (each close runs the loopback FIN
/// through the kernel at once, which adds up over thousands).
fn close_relays(mut open: Vec<TcpStream>) {
    let chunk = open.len() / 4 + 1;
    let mut handles = Vec::new();
    while !open.is_empty() {
        let part = open.split_off(open.len().saturating_sub(chunk));
        handles.push(std::thread::spawn(move || drop(part)));
    }
    for h in handles {
        let _ = h.join();
    }
}

/// The hidden `--idle-child MODE:PIPE_SIZE` mode: run spliced, answer probes on stdin.
pub fn child_main(spec: &str, args: &BenchArgs) -> ExitCode {
    let mut parts = spec.split(':');
    let parsed = (|| {
        let mode = parts.next()?.parse::<Mode>().ok()?;
        let pipe_size = parts.next()?.parse::<usize>().ok()?;
        let event_loop = parts.next()?.parse::<EventLoop>().ok()?;
        Some((mode, pipe_size, event_loop))
    })();
    let Some((mode, pipe_size, event_loop)) = parsed else {
        eprintln!("spliced: error: bad --idle-child {spec:?}");
        return ExitCode::from(2);
    };
    // Before the proxy starts, so that its workers start in the namespace too.
    if let Some(ns) = &args.net.idle_netns {
        if let Err(e) = crate::os::netns::enter(ns) {
            eprintln!(
                "spliced: error: idle proxy: cannot enter network namespace {}: {e}",
                ns.display()
            );
            return ExitCode::from(2);
        }
    }
    let Some(upstream) = args.upstream else {
        eprintln!("spliced: error: idle proxy: no --upstream");
        return ExitCode::from(2);
    };
    let workers = args.workers.max(1);
    let h = match engines::start_proxy(
        mode,
        pipe_size,
        event_loop,
        workers,
        args.net.idle_listen,
        upstream,
    ) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("spliced: error: idle proxy: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(cpu) = args.pin_proxy {
        if let Err(e) = engines::pin_workers(cpu, args.workers.max(1)) {
            eprintln!("spliced bench: {e}; the idle proxy runs unpinned");
        }
    }
    let mut out = std::io::stdout().lock();
    if writeln!(out, "listening {}", h.local_addr())
        .and_then(|_| out.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim() != "probe" {
            continue;
        }
        let stats = h.stats();
        let p = Probe {
            rss_kib: measure::rss_kib(None).unwrap_or(0),
            fds: measure::own_fd_count(),
            pipes: Some(stats.pipes_in_use),
            relays: Some(stats.relays_active),
        };
        let json = serde_json::to_string(&p).unwrap_or_default();
        if writeln!(out, "{json}").and_then(|_| out.flush()).is_err() {
            break;
        }
    }
    h.abort();
    h.join();
    ExitCode::SUCCESS
}
