//! Starting and controlling a running proxy: the library's front door.
//!
//! [`start`] binds every listener once per worker (SO_REUSEPORT, so the kernel
//! spreads accepts), spawns the workers and returns a [`ProxyHandle`]. Binding
//! happens on the caller's thread, so "address in use" is reported before any
//! worker runs, as is an upstream that leads back into the proxy (a loop).
//! The relay cap and pipe size in force are logged then too. `spliced run` is
//! this plus signal handling.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{Config, ListenerConfig, Mode};
use crate::error::StartError;
use crate::listener::{self, ListenerId};
use crate::reload::{self, Reloader};
use crate::runtime::{fd_budget, Controller, FdBudget, Runtime};
use crate::shm::Arena;
use crate::stats::Stats;
use crate::upstream::Fleet;
use crate::upstream::{Resolve, SystemResolver};
use crate::worker::Inherited;

/// A running proxy: a [`Runtime`] with bound listeners. Dropping it aborts
/// every relay and joins the workers.
pub struct ProxyHandle {
    local_addrs: Vec<SocketAddr>,
    runtime: Runtime,
    /// Holds the listeners in force and the background resolver (stopped
    /// when the last reloader goes).
    reloader: Reloader,
    /// The admin endpoint, if asked for, and how to start it again (a
    /// live upgrade stops it for the new process and, should that fail,
    /// starts it again).
    #[cfg(feature = "admin")]
    admin: Option<AdminSwitch>,
    /// The servers and their health (a live upgrade hands it over).
    #[cfg(feature = "service")]
    fleet: Arc<Fleet>,
}

/// Binds the listeners, refuses an upstream that loops back into the proxy,
/// logs the limits in force and starts the workers. Server names go
/// through the system resolver.
pub fn start(config: Config) -> Result<ProxyHandle, StartError> {
    start_with(config, Arc::new(SystemResolver))
}

/// [`start`] with server names resolved by `resolver`: once now, then on a
/// background thread every `resolve-interval`.
pub fn start_with(config: Config, resolver: Arc<dyn Resolve>) -> Result<ProxyHandle, StartError> {
    start_inner(config, resolver, Inherited::default(), |_| {})
}

/// [`start`] with the listening sockets a service manager passed to this
/// process (systemd socket activation: `LISTEN_PID`, `LISTEN_FDS`). A
/// listener address that one of them is bound to uses it instead of
/// binding; every worker accepts on that one socket. Sockets that match no
/// listener are closed with a warning. Without such sockets this is
/// [`start`]. The sockets are taken once per process. (Feature `service`.)
#[cfg(feature = "service")]
pub fn start_activated(config: Config) -> Result<ProxyHandle, StartError> {
    let fds = crate::sys::activation::take_inherited()
        .map_err(|e| StartError::Io("read LISTEN_FDS".into(), e))?;
    start_inner(
        config,
        Arc::new(SystemResolver),
        Inherited::new(fds),
        |_| {},
    )
}

/// [`start`] on the listening sockets a live upgrade passed from the
/// running instance (see [`crate::upgrade`]): each listener address
/// adopts every passed socket bound to it; addresses none is bound to
/// are bound anew, and passed sockets no listener claims are closed.
/// Each server of the config that the running instance knew (the same
/// address, probed the same way) starts in the health it had there
/// (`health`): up or down, its last confirmed role; the others start as
/// at any start. (Feature `service`.)
#[cfg(feature = "service")]
pub fn start_upgraded(
    config: Config,
    sockets: Vec<std::os::fd::OwnedFd>,
    health: crate::upgrade::CarriedHealth,
) -> Result<ProxyHandle, StartError> {
    start_inner(
        config,
        Arc::new(SystemResolver),
        Inherited::handed_over(sockets),
        move |fleet| fleet.seed(health.0),
    )
}

/// Starts the proxy; `seed` sees the empty fleet before any server joins it.
fn start_inner(
    mut config: Config,
    resolver: Arc<dyn Resolve>,
    mut inherited: Inherited,
    seed: impl FnOnce(&Fleet),
) -> Result<ProxyHandle, StartError> {
    reload::prepare(&mut config)?;
    let nofile = crate::sys::raise_nofile_limit();
    let fds = fd_budget(&config, nofile);
    let settings = Arc::new(config.clone());
    let (runtime, reloader, fleet) = spawn_empty(&settings, fds, resolver)?;
    seed(&fleet);
    // A start is a reload from nothing.
    let report = reloader.apply(config, &mut inherited);
    // Servers that join later (a reload) start as new.
    #[cfg(feature = "service")]
    fleet.end_seeding();
    let report = report?;
    inherited.close_unclaimed();
    log_relay_cap(&settings, nofile, fds);
    check_pipe_size(&settings);
    let local_addrs: Vec<SocketAddr> = report.bound.iter().map(|&(_, a)| a).collect();
    #[cfg(feature = "admin")]
    let admin = start_admin(&settings, &runtime)?;
    #[cfg(feature = "admin")]
    let admin = admin.map(|running| AdminSwitch {
        running: Arc::new(std::sync::Mutex::new(Some(running))),
        again: {
            let (settings, runtime) = (Arc::clone(&settings), runtime.admin_parts());
            Arc::new(move || start_admin_with(&settings, &runtime))
        },
    });
    #[cfg(not(feature = "admin"))]
    if settings.ops.admin.is_some() {
        return Err(StartError::Config(crate::config::ConfigError(
            "admin: this build has no admin endpoint (cargo feature `admin`)".into(),
        )));
    }
    if let Some(path) = runtime.stats_file() {
        tracing::info!(path = %path.display(), "counters in the stats file (read with `spliced stats`)");
    }
    Ok(ProxyHandle {
        local_addrs,
        runtime,
        reloader,
        #[cfg(feature = "admin")]
        admin,
        #[cfg(feature = "service")]
        fleet,
    })
}

/// The stats file and a runtime whose workers serve no listener yet, with
/// the reloader that will put the config's listeners in force.
fn spawn_empty(
    config: &Arc<Config>,
    fds: FdBudget,
    resolver: Arc<dyn Resolve>,
) -> Result<(Runtime, Reloader, Arc<Fleet>), StartError> {
    // Pairs handed to a running proxy relay like the first listener's.
    let first = &config.listeners[0];
    let handoff = ListenerConfig::handoff(first.mode, first.timeouts);
    // The handoff pseudo-listener's slot first; the listeners' are kept
    // for them under their names, and taken as the start puts them in
    // force, in config order.
    let names: Vec<String> = [&handoff]
        .into_iter()
        .chain(&config.listeners)
        .map(listener::name_of)
        .collect();
    let server_entries = config
        .listeners
        .iter()
        .flat_map(|l| l.pools())
        .map(|(_, p)| p.servers.len())
        .sum();
    let arena = Arena::create(config.workers, &names, &config.ops, server_entries)?;
    arena.keep_for_later(1);
    let fleet = Fleet::new();
    let per_worker = (0..config.workers).map(|_| Vec::new()).collect();
    let runtime = Runtime::spawn(
        Arc::clone(config),
        arena,
        per_worker,
        Vec::new(),
        handoff,
        fds,
        Arc::clone(&fleet),
    )?;
    let reloader = Reloader::new(reload::State::new(
        Arc::clone(config),
        Arc::clone(&runtime.arena),
        runtime.links(),
        Arc::clone(&runtime.listeners),
        Arc::clone(&runtime.stopping),
        resolver,
        Arc::clone(&fleet),
    ));
    Ok((runtime, reloader, fleet))
}

/// The admin endpoint, running or stopped, and how to start it again.
#[cfg(feature = "admin")]
#[derive(Clone)]
pub(crate) struct AdminSwitch {
    running: Arc<std::sync::Mutex<Option<crate::admin::Admin>>>,
    again: Arc<dyn Fn() -> Result<Option<crate::admin::Admin>, StartError> + Send + Sync>,
}

#[cfg(feature = "admin")]
impl AdminSwitch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<crate::admin::Admin>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stops serving and frees the address (for a new process to bind).
    pub(crate) fn stop(&self) {
        drop(self.lock().take());
    }

    /// Serves again, if stopped.
    pub(crate) fn restart(&self) {
        let mut running = self.lock();
        if running.is_none() {
            match (self.again)() {
                Ok(admin) => *running = admin,
                Err(e) => tracing::error!(error = %e, "cannot serve the admin endpoint again"),
            }
        }
    }
}

/// The admin endpoint on its own thread, if the config asks for one.
#[cfg(feature = "admin")]
fn start_admin(
    config: &Config,
    runtime: &Runtime,
) -> Result<Option<crate::admin::Admin>, StartError> {
    start_admin_with(config, &runtime.admin_parts())
}

#[cfg(feature = "admin")]
fn start_admin_with(
    config: &Config,
    parts: &crate::runtime::AdminParts,
) -> Result<Option<crate::admin::Admin>, StartError> {
    let Some(addr) = config.ops.admin else {
        return Ok(None);
    };
    let listeners = Arc::clone(&parts.listeners);
    let routed = Arc::clone(&parts.listeners);
    let admin = crate::admin::Admin::start(
        addr,
        Arc::clone(&parts.arena),
        Arc::new(move || Runtime::server_samples(&listeners)),
        Arc::new(move || Runtime::route_samples(&routed)),
        Arc::clone(&parts.stopping),
    )
    .map_err(|e| StartError::Io(format!("serve the admin endpoint on {addr}"), e))?;
    tracing::info!("admin endpoint on http://{}/metrics", admin.addr());
    Ok(Some(admin))
}

/// Logs the relay cap and the pipes' share of the fd limit in force, and
/// warns when the cap is not what was asked.
fn log_relay_cap(config: &Config, nofile: u64, fds: FdBudget) {
    let (cap, pipe_fds) = (fds.relays, fds.pipe_fds);
    match config.max_relays {
        None => tracing::info!(
            max_conns = cap,
            pipe_fds,
            fd_limit = nofile,
            "at most {cap} relays at once: what the fd limit of {nofile} allows at two sockets per relay and a pipe per four relays; pipes may hold {pipe_fds} fds"
        ),
        Some(asked) if asked > cap => tracing::warn!(
            asked,
            max_conns = cap,
            pipe_fds,
            fd_limit = nofile,
            "max_conns lowered from {asked} to {cap}: the fd limit of {nofile} allows no more at two sockets per relay and a pipe per four relays"
        ),
        Some(asked) if asked < cap => tracing::warn!(
            asked,
            max_conns = cap,
            "max_conns raised from {asked} to {cap}: a proxy must allow at least one relay"
        ),
        Some(_) => tracing::info!(
            max_conns = cap,
            pipe_fds,
            "at most {cap} relays at once; pipes may hold {pipe_fds} fds"
        ),
    }
}

/// Sizes one pipe as the pools will and logs what the kernel granted; warns
/// when pipes will be smaller than asked, because the kernel refuses the size
/// or because a worker's share of the pipe budget cannot hold one such pipe.
/// Listeners that all copy need no pipe, and no check.
fn check_pipe_size(config: &Config) {
    if !config.listeners.iter().any(|l| l.mode != Mode::Copy) {
        return;
    }
    let asked = config.pipe_size;
    let pipe = match crate::sys::Pipe::new() {
        Ok(pipe) => pipe,
        Err(e) => {
            tracing::warn!(error = %e, "cannot create a pipe to check the pipe size");
            return;
        }
    };
    let set = (asked > 0).then(|| crate::sys::set_pipe_size(&pipe, asked));
    let granted = match crate::sys::pipe_size(&pipe) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read a pipe's size back");
            return;
        }
    };
    match set {
        None => tracing::info!(
            pipe_size = granted,
            "pipes keep the kernel's default size of {}",
            human_bytes(granted)
        ),
        Some(Err(e)) => tracing::warn!(
            asked,
            pipe_size = granted,
            error = %e,
            "pipe size {} refused; pipes keep {} (see /proc/sys/fs/pipe-max-size and pipe-user-pages-soft)",
            human_bytes(asked),
            human_bytes(granted)
        ),
        Some(Ok(_)) if granted < asked => tracing::warn!(
            asked,
            pipe_size = granted,
            "pipe size {} not granted; pipes get {}",
            human_bytes(asked),
            human_bytes(granted)
        ),
        Some(Ok(_)) => tracing::info!(pipe_size = granted, "pipe size {}", human_bytes(granted)),
    }
    let workers = config.workers.max(1);
    let share = config.pipe_budget / workers;
    if asked > 0 && share < asked {
        tracing::warn!(
            pipe_budget = config.pipe_budget,
            workers,
            pipe_size = asked,
            "a worker's share of the pipe budget ({} of {}) holds no {} pipe: every pipe keeps the kernel's default size",
            human_bytes(share),
            human_bytes(config.pipe_budget),
            human_bytes(asked)
        );
    }
}

/// `1 MiB`, `64 KiB`, `1000 B`.
fn human_bytes(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

impl ProxyHandle {
    /// Reloads the config from any thread (see [`Reloader::reload`]).
    pub fn reloader(&self) -> Reloader {
        self.reloader.clone()
    }

    /// The address the first listener was bound to at start (useful with
    /// port 0); [`Reloader::local_addrs`] has those in force after a reload.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addrs[0]
    }

    /// Every address bound at start, in config order (a listener may have
    /// several).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }

    /// Where the admin endpoint listens, if one was asked for.
    #[cfg(feature = "admin")]
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        let admin = self.admin.as_ref()?;
        let running = admin.lock();
        running.as_ref().map(|a| a.addr())
    }

    /// The runtime under the listeners; pairs handed to it are relayed
    /// beside the accepted ones.
    pub fn runtime(&self) -> &Runtime {
        &self.runtime
    }

    /// Counters summed over all workers and listeners.
    pub fn stats(&self) -> Stats {
        self.runtime.stats()
    }

    /// Each listener's counters, in config order (see
    /// [`Runtime::listener_stats`]).
    pub fn listener_stats(&self) -> Vec<(ListenerId, Stats)> {
        self.runtime.listener_stats()
    }

    /// CPU time (user + system) the worker threads have used so far.
    pub fn worker_cpu_time(&self) -> Duration {
        self.runtime.worker_cpu_time()
    }

    /// Carries on from the counters of the instance a live upgrade
    /// replaces (its stats file's snapshot, read before this process
    /// took the file over): see [`crate::upgrade`]. (Feature `service`.)
    #[cfg(feature = "service")]
    pub fn seed_counters(&self, old: &crate::shm::Snapshot) {
        self.runtime.seed_counters(old);
    }

    /// A cloneable handle that hands this proxy's listening sockets to a
    /// new binary (a live upgrade), from any thread. (Feature `service`.)
    #[cfg(feature = "service")]
    pub fn upgrader(&self) -> crate::upgrade::Upgrader {
        crate::upgrade::Upgrader::new(
            self.runtime.links(),
            self.runtime.controller(),
            Arc::clone(&self.fleet),
            #[cfg(feature = "admin")]
            self.admin.clone(),
        )
    }

    /// Gives the relays a live upgrade carried over to the workers, which
    /// take them and move them on at once. (Feature `service`.)
    #[cfg(feature = "service")]
    pub fn adopt_relays(
        &self,
        relays: crate::upgrade::CarriedRelays,
    ) -> crate::upgrade::AdoptOutcome {
        self.relay_adopter().adopt(relays)
    }

    /// A cloneable handle that gives carried relays to the workers from
    /// any thread (a live upgrade's later rounds). (Feature `service`.)
    #[cfg(feature = "service")]
    pub fn relay_adopter(&self) -> crate::upgrade::RelayAdopter {
        crate::upgrade::RelayAdopter {
            links: self.runtime.links(),
        }
    }

    /// A cloneable handle that can stop this proxy from another thread.
    pub fn controller(&self) -> Controller {
        self.runtime.controller()
    }

    /// Stops accepting; live relays finish within the drain timeout.
    pub fn shutdown(&self) {
        self.runtime.shutdown();
    }

    /// Closes every relay now.
    pub fn abort(&self) {
        self.runtime.abort();
    }

    /// True once every worker has exited (all relays closed).
    pub fn is_finished(&self) -> bool {
        self.runtime.is_finished()
    }

    /// Waits for every worker to exit (after [`shutdown`](Self::shutdown) or
    /// [`abort`](Self::abort)).
    pub fn join(self) {
        self.runtime.join();
    }
}
