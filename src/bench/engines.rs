//! The engines under test: spliced in-process (splice or copy), another
//! running proxy (`--target`), or no proxy at all (`direct`).

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::args::{EngineSpec, Settings, Workload};
use super::clienthello::BENCH_ALPN;
use super::inproc::{self, Front};
use super::measure;
use super::netpath::{NetPath, Side};
use crate::config::{ConfigError, FlagDefaults};
use crate::{Config, EventLoop, Mode, ProxyHandle, Stats};

/// One engine, ready to take load.
pub struct Engine {
    pub spec: EngineSpec,
    pub label: String,
    /// Where the load connects.
    pub addr: SocketAddr,
    /// A listener that routes TLS clients by server name: an in-process
    /// spliced's second one (with the `connect-routed` workload only), or
    /// a target's `--target-routed`.
    pub routed_addr: Option<SocketAddr>,
    handle: Option<ProxyHandle>,
    front: Option<Front>,
}

impl Engine {
    /// Starts an in-process proxy for `Proxy` specs; the others need nothing started.
    pub fn start(
        spec: &EngineSpec,
        label: String,
        upstream: SocketAddr,
        s: &Settings,
        path: &NetPath,
    ) -> Result<Engine, String> {
        let listen = path.listen_ip();
        let mut front = None;
        let routed = s.workloads.contains(&Workload::ConnectRouted);
        let (addr, handle) = match spec {
            EngineSpec::Direct => (upstream, None),
            EngineSpec::Target { addr, .. } => (*addr, None),
            EngineSpec::Handoff | EngineSpec::Tokio => {
                let f = path
                    .run_in(Side::Proxy, || match spec {
                        EngineSpec::Handoff => {
                            Front::handoff(Mode::Splice, s.workers, listen, upstream)
                        }
                        _ => Front::tokio(listen, upstream),
                    })?
                    .map_err(|e| format!("{label}: cannot start: {e}"))?;
                let addr = f.addr;
                front = Some(f);
                (addr, None)
            }
            EngineSpec::Proxy {
                mode,
                pipe_size,
                event_loop,
            } => {
                // The workers start where their creator is, so they connect from the
                // proxy's namespace.
                let h = path
                    .run_in(Side::Proxy, || {
                        let mut cfg = proxy_config(*mode, *pipe_size, s.workers, listen, upstream);
                        cfg.event_loop = *event_loop;
                        if routed {
                            add_routed_listener(&mut cfg, listen, upstream)?;
                        }
                        crate::start(cfg)
                    })?
                    .map_err(|e| format!("{label}: cannot start spliced: {e}"))?;
                let addr = h.local_addr();
                (addr, Some(h))
            }
        };
        let routed_addr = match spec {
            EngineSpec::Target { routed, .. } => *routed,
            _ => handle
                .as_ref()
                .and_then(|h| h.local_addrs().get(1).copied()),
        };
        Ok(Engine {
            spec: spec.clone(),
            label,
            addr,
            routed_addr,
            handle,
            front,
        })
    }

    pub fn is_target(&self) -> bool {
        matches!(self.spec, EngineSpec::Target { .. })
    }

    pub fn mode(&self) -> Option<Mode> {
        match self.spec {
            EngineSpec::Proxy { mode, .. } => Some(mode),
            _ => None,
        }
    }

    /// The proxy's CPU time so far, where it can be read.
    pub fn cpu(&self) -> Option<Duration> {
        if let Some(h) = &self.handle {
            return Some(h.worker_cpu_time() + measure::log_writer_cpu());
        }
        if let Some(f) = &self.front {
            return Some(f.cpu() + measure::log_writer_cpu());
        }
        match self.spec {
            EngineSpec::Target { pid: Some(pid), .. } => measure::process_cpu(pid),
            _ => None,
        }
    }

    /// Pipes the proxy holds for relays now (in-process: in use; a target: every pipe it has open).
    pub fn pipes(&self) -> Option<u64> {
        if let Some(h) = &self.handle {
            return Some(h.stats().pipes_in_use);
        }
        if let Some(f) = &self.front {
            return Some(f.stats().map_or(0, |s| s.pipes_in_use));
        }
        match self.spec {
            EngineSpec::Target { pid: Some(pid), .. } => {
                measure::fds_and_pipes(Some(pid)).map(|(_, p)| p)
            }
            _ => None,
        }
    }

    pub fn stats(&self) -> Option<Stats> {
        match (&self.handle, &self.front) {
            (Some(h), _) => Some(h.stats()),
            (None, Some(f)) => f.stats(),
            (None, None) => None,
        }
    }

    /// Every thread of the proxy, for strace (a target's whole process tree).
    pub fn tids(&self) -> Vec<i32> {
        if let Some(h) = &self.handle {
            return h.runtime().worker_tids();
        }
        if let Some(f) = &self.front {
            return f.tids();
        }
        match self.spec {
            EngineSpec::Target { pid: Some(pid), .. } => measure::process_tree(pid)
                .into_iter()
                .flat_map(|p| {
                    std::fs::read_dir(format!("/proc/{p}/task"))
                        .into_iter()
                        .flatten()
                        .flatten()
                        .filter_map(|t| t.file_name().to_str()?.parse::<i32>().ok())
                })
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Threads this engine runs in this process (for pinning).
    pub fn threads(&self, workers: usize) -> usize {
        match self.spec {
            EngineSpec::Proxy { .. } => workers,
            EngineSpec::Handoff => workers + inproc::EXTRA_THREADS,
            EngineSpec::Tokio => inproc::EXTRA_THREADS,
            EngineSpec::Direct | EngineSpec::Target { .. } => 0,
        }
    }

    /// Stops an in-process proxy.
    pub fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
            h.join();
        }
        if let Some(f) = self.front.take() {
            f.stop();
        }
    }
}

/// Starts spliced in this process with one listener on an ephemeral port of `listen`.
pub fn start_proxy(
    mode: Mode,
    pipe_size: usize,
    event_loop: EventLoop,
    workers: usize,
    listen: IpAddr,
    upstream: SocketAddr,
) -> Result<ProxyHandle, crate::StartError> {
    let mut cfg = proxy_config(mode, pipe_size, workers, listen, upstream);
    cfg.event_loop = event_loop;
    crate::start(cfg)
}

fn proxy_config(
    mode: Mode,
    pipe_size: usize,
    workers: usize,
    listen: IpAddr,
    upstream: SocketAddr,
) -> Config {
    let listen = SocketAddr::new(listen, 0);
    let mut cfg = Config::single(listen, vec![upstream], mode);
    cfg.workers = workers;
    cfg.pipe_size = pipe_size;
    cfg
}

/// The server names of the routed listener's routes, in table order; the
/// `connect-routed` load asks for the last, so every route is tried.
pub const ROUTED_NAMES: [&str; 3] = ["a.db.example", "*.olap.db.example", "b.db.example"];

/// Adds a second listener to `cfg`, in the mode of its first, as a config
/// file would write it: `protocol = "tls"`, a server-name route per
/// [`ROUTED_NAMES`] and a default route, each to its own named pool that
/// holds the one upstream.
fn add_routed_listener(
    cfg: &mut Config,
    listen: IpAddr,
    upstream: SocketAddr,
) -> Result<(), crate::StartError> {
    let mut text = String::new();
    let pools: Vec<String> = (0..=ROUTED_NAMES.len())
        .map(|i| format!("pool-{i}"))
        .collect();
    for p in &pools {
        text += &format!("[[pool]]\nname = \"{p}\"\nservers = [\"{upstream}\"]\n\n");
    }
    let listen = SocketAddr::new(listen, 0);
    text +=
        &format!("[[listener]]\nname = \"routed\"\nlisten = \"{listen}\"\nprotocol = \"tls\"\n\n");
    for (name, pool) in ROUTED_NAMES.iter().zip(&pools) {
        text += &format!("[[listener.route]]\nserver-name = \"{name}\"\npool = \"{pool}\"\n\n");
    }
    text += &format!(
        "[[listener.route]]\npool = \"{}\"\n",
        pools[ROUTED_NAMES.len()]
    );
    let parsed = crate::config::parse_str(&text, &FlagDefaults::default())
        .map_err(|e| crate::StartError::Config(ConfigError(format!("the routed listener: {e:?}"))))?
        .config;
    let mode = cfg.listeners[0].mode;
    for mut l in parsed.listeners {
        l.mode = mode;
        cfg.listeners.push(l);
    }
    cfg.pools.extend(parsed.pools);
    Ok(())
}

/// Pins every spliced worker thread of this process (named `spliced-w*`) to
/// `cpu`, once `expected` of them are running (a new thread names itself).
pub fn pin_workers(cpu: usize, expected: usize) -> Result<(), String> {
    let until = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let tids = measure::own_threads("spliced-w");
        if tids.len() >= expected {
            return measure::pin_threads(&tids, cpu);
        }
        if std::time::Instant::now() >= until {
            return Err(format!(
                "found {} of {expected} spliced worker threads to pin",
                tids.len()
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// One small echo exchange through the engine, so a wrong --target fails fast
/// with a clear message instead of as a zero in the table.
pub fn check(e: &Engine) -> Result<(), String> {
    super::load::one_exchange(e.addr).map_err(|err| {
        let hint = if e.is_target() {
            " (is it running, and does it forward to --upstream?)"
        } else {
            ""
        };
        format!("{}: no echo through {}: {err}{hint}", e.label, e.addr)
    })?;
    if let Some(addr) = e.routed_addr {
        let hello = super::clienthello::client_hello(Some(ROUTED_NAMES[0]), &BENCH_ALPN, 0);
        super::load::request_reply(addr, &hello).map_err(|err| {
            format!(
                "{}: no echo through the routed listener {addr}: {err}",
                e.label
            )
        })?;
    }
    Ok(())
}
