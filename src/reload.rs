//! Reloading a running proxy's config without dropping a connection.
//!
//! A reload is worked out first and carried out only if every step that
//! can fail succeeds: the new config is validated, its names resolved,
//! its new addresses bound and checked for loops while the old listeners
//! go on serving. Only then is each worker told, in one command, which
//! sockets to keep (with which listener's settings), close and add.
//!
//! Sockets are matched by the address the config asks for, listeners by
//! name:
//! - an address in both configs keeps its socket, so no client is refused;
//! - a listener with the same name keeps its id, counters and live count
//!   (one max-conns over old and new relays); when its settings changed,
//!   new connections get the new settings and pool, while relays accepted
//!   before keep the ones they started with;
//! - a listener gone from the config stops accepting; its relays finish
//!   within the drain timeout;
//! - process-wide settings (workers, pipes, relay cap, drain timeout, the
//!   admin address) stay as they were: they need a restart, and the reload
//!   says so.

mod loops;
mod plan;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use crate::config::{Config, ListenerConfig};
use crate::control::{Command, WorkerLink, WorkerReload};
use crate::error::StartError;
use crate::listener::{Listener, ListenerId};
use crate::runtime::ListenerSet;
use crate::upstream::resolve::{self, Refresher};
use crate::upstream::{Fleet, Resolve};
use crate::worker::{self, Inherited};
use plan::{pair_asked, plan, restart_settings, Fate, Plan};

/// What a successful reload changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// Listeners new in this config.
    pub added: Vec<String>,
    /// Listeners gone; they drain.
    pub removed: Vec<String>,
    /// Listeners whose settings changed (for new connections).
    pub changed: Vec<String>,
    /// Newly bound addresses, with their listener's name.
    pub bound: Vec<(String, SocketAddr)>,
    /// Addresses no longer listened on.
    pub closed: Vec<SocketAddr>,
    /// Process-wide settings that differ but keep their old value until
    /// a restart.
    pub need_restart: Vec<&'static str>,
}

/// Reloads a running proxy from any thread; cloneable. Reloads are
/// serialised: one runs at a time.
#[derive(Clone)]
pub struct Reloader {
    state: Arc<Mutex<State>>,
}

/// A listener in force and its sockets: (asked address, bound address).
struct Active {
    listener: Arc<Listener>,
    sockets: Vec<(SocketAddr, SocketAddr)>,
}

pub(crate) struct State {
    config: Arc<Config>,
    /// The stats mapping, where listeners a reload adds count.
    arena: Arc<crate::shm::Arena>,
    active: Vec<Active>,
    links: Vec<WorkerLink>,
    set: Arc<Mutex<ListenerSet>>,
    stopping: Arc<AtomicBool>,
    resolver: Arc<dyn Resolve>,
    refresher: Option<Refresher>,
    next_id: u32,
    /// Every server's health, kept across reloads.
    fleet: Arc<Fleet>,
}

impl State {
    /// Nothing in force yet: `config`'s process-wide settings, no
    /// listener. [`Reloader::apply`] puts the listeners in force.
    pub(crate) fn new(
        config: Arc<Config>,
        arena: Arc<crate::shm::Arena>,
        links: Vec<WorkerLink>,
        set: Arc<Mutex<ListenerSet>>,
        stopping: Arc<AtomicBool>,
        resolver: Arc<dyn Resolve>,
        fleet: Arc<Fleet>,
    ) -> State {
        let mut config = (*config).clone();
        config.listeners.clear();
        State {
            next_id: 0,
            config: Arc::new(config),
            arena,
            active: Vec::new(),
            links,
            set,
            stopping,
            resolver,
            refresher: None,
            fleet,
        }
    }
}

/// Validates a config as given and reads the secret files it names: the
/// first step of a start and of a reload alike.
pub(crate) fn prepare(config: &mut Config) -> Result<(), StartError> {
    config.link_pools().map_err(StartError::Config)?;
    config.validate().map_err(StartError::Config)?;
    #[cfg(not(feature = "postgres-checks"))]
    if let Some(l) = config.listeners.iter().find(|l| {
        l.pools()
            .iter()
            .any(|(_, p)| p.health.check == Some(crate::config::Check::Postgres))
    }) {
        return Err(StartError::Config(crate::config::ConfigError(format!(
            "listener '{}': {}",
            l.name,
            crate::health::postgres_unbuilt()
        ))));
    }
    config.load_secrets().map_err(StartError::Config)
}

impl Reloader {
    pub(crate) fn new(state: State) -> Reloader {
        Reloader {
            state: Arc::new(Mutex::new(state)),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every address listened on now, with its listener's name, in config
    /// order.
    pub fn local_addrs(&self) -> Vec<(String, SocketAddr)> {
        let state = self.lock();
        state
            .active
            .iter()
            .flat_map(|a| {
                let name = &a.listener.config.name;
                a.sockets.iter().map(move |&(_, b)| (name.clone(), b))
            })
            .collect()
    }

    /// Replaces the listeners by those of `config` (see the module doc).
    /// On error nothing changed: the old listeners go on serving.
    pub fn reload(&self, mut config: Config) -> Result<ReloadReport, StartError> {
        prepare(&mut config)?;
        self.apply(config, &mut Inherited::default())
    }

    /// Puts a validated `config`'s listeners in force: the one path from
    /// config to running state. A start is this from nothing (no listener
    /// yet, with the sockets a service manager passed in `inherited`); a
    /// reload is this from the listeners in force.
    ///
    /// Every step that can fail comes before the first that changes
    /// anything: plan, make the listeners, resolve, bind, refuse loops;
    /// then tell the workers and record what is in force.
    pub(crate) fn apply(
        &self,
        config: Config,
        inherited: &mut Inherited,
    ) -> Result<ReloadReport, StartError> {
        let mut state = self.lock();
        if state.stopping.load(Ordering::Relaxed) {
            return Err(StartError::Io(
                "reload".into(),
                io::Error::other("the proxy is stopping"),
            ));
        }
        let need_restart = restart_settings(&state.config, &config);
        // Process-wide settings stay; only the listeners are new.
        let mut effective = (*state.config).clone();
        effective.listeners = config.listeners;
        let old: Vec<_> = state
            .active
            .iter()
            .map(|a| (&a.listener.config, a.sockets.as_slice()))
            .collect();
        let plan = plan(&old, &effective.listeners);
        let draining: Vec<Arc<Listener>> = {
            let set = state.set.lock().unwrap_or_else(|p| p.into_inner());
            set.retired.iter().filter_map(Weak::upgrade).collect()
        };
        let mut next_id = state.next_id;
        let listeners = state.listeners_for(&effective, &plan, &draining, &mut next_id);
        let (refresher, mut bound) =
            state.resolve_and_bind(&effective, &plan, &listeners, inherited)?;

        // Nothing can fail from here on.
        state.supersede(&plan, &effective, &draining);
        state.tell_workers(&plan, &effective, &listeners, &mut bound);
        let report = ReloadReport::of(&plan, &effective, &state.active, &bound, need_restart);
        log_listening(&effective, &bound);
        state.put_in_force(&plan, &effective, listeners, &bound);
        state.config = Arc::new(effective);
        state.refresher = refresher;
        state.next_id = next_id;
        report.log();
        Ok(report)
    }
}

impl State {
    /// The listener each new config entry gets: the running one as it is,
    /// its successor with new settings, an heir of a draining one of the
    /// same name, or a new one with counters of its own.
    fn listeners_for(
        &self,
        effective: &Config,
        plan: &Plan,
        draining: &[Arc<Listener>],
        next_id: &mut u32,
    ) -> Vec<Arc<Listener>> {
        effective
            .listeners
            .iter()
            .zip(&plan.fates)
            .map(|(l, fate)| match *fate {
                Fate::Same(j) => Arc::clone(&self.active[j].listener),
                Fate::Changed(j) => Arc::new(self.active[j].listener.successor(l.clone())),
                Fate::New => {
                    *next_id += 1;
                    let id = ListenerId(*next_id - 1);
                    match draining.iter().find(|d| d.config.name == l.name) {
                        Some(d) => Arc::new(d.heir(id, l.clone())),
                        None => {
                            // The file has room kept for listeners a
                            // reload adds (and takes back those it freed).
                            let counters = self.arena.add_listener(&l.name);
                            Arc::new(Listener::new(id, l.clone(), counters, &self.fleet))
                        }
                    }
                }
            })
            .collect()
    }

    /// The steps that can fail: resolve the pools' servers (starting the
    /// background resolver), bind the new addresses, and refuse an
    /// upstream that leads back into the proxy.
    fn resolve_and_bind(
        &self,
        effective: &Config,
        plan: &Plan,
        listeners: &[Arc<Listener>],
        inherited: &mut Inherited,
    ) -> Result<(Option<Refresher>, worker::Bound), StartError> {
        // Every pool of every listener: its own, or those its routes lead to.
        let targets = listeners.iter().flat_map(|l| {
            l.config
                .pools()
                .into_iter()
                .zip(&l.pools)
                .map(|((_, config), pool)| resolve::Target {
                    listener: l.config.name.clone(),
                    config: config.clone(),
                    pool: Arc::clone(pool),
                })
                .collect::<Vec<_>>()
        });
        let refresher = resolve::start(targets, Arc::clone(&self.resolver))
            .map_err(|e| StartError::Io("start the resolver thread".into(), e))?;
        let bound = worker::bind_listeners(
            effective,
            listeners,
            |i, a| plan.bind.contains(&(i, a)),
            inherited,
        )?;
        let mut all_bound: Vec<(usize, SocketAddr)> =
            plan.keep.iter().map(|&(i, _, b)| (i, b)).collect();
        all_bound.extend(&bound.local_addrs);
        let upstreams: Vec<Vec<SocketAddr>> = listeners
            .iter()
            .map(|l| {
                l.pools
                    .iter()
                    .flat_map(|p| {
                        p.members()
                            .servers
                            .iter()
                            .map(|s| s.addr)
                            .collect::<Vec<_>>()
                    })
                    .collect()
            })
            .collect();
        loops::refuse_loops(effective, &upstreams, &all_bound)?;
        Ok((refresher, bound))
    }

    /// Pools that new ones replace stop showing their servers' state
    /// (their relays still follow it).
    fn supersede(&self, plan: &Plan, effective: &Config, draining: &[Arc<Listener>]) {
        for (i, fate) in plan.fates.iter().enumerate() {
            if let Fate::Changed(j) = *fate {
                self.active[j]
                    .listener
                    .pools
                    .iter()
                    .for_each(|p| p.supersede());
            }
            if *fate == Fate::New {
                let name = &effective.listeners[i].name;
                for d in draining.iter().filter(|d| &d.config.name == name) {
                    d.pools.iter().for_each(|p| p.supersede());
                }
            }
        }
    }

    /// Tells every worker, in one command each, which sockets to keep
    /// (with which listener), close and add, and which listeners retire;
    /// waits until they applied it.
    fn tell_workers(
        &self,
        plan: &Plan,
        effective: &Config,
        listeners: &[Arc<Listener>],
        bound: &mut worker::Bound,
    ) {
        let deadline = effective
            .drain_timeout
            .and_then(|d| Instant::now().checked_add(d));
        let retire: Vec<(ListenerId, Option<Instant>)> = plan
            .removed
            .iter()
            .map(|&j| (self.active[j].listener.id, deadline))
            .collect();
        let (applied, acks) = std::sync::mpsc::channel();
        let mut told = 0;
        for (w, link) in self.links.iter().enumerate() {
            let command = WorkerReload {
                retarget: plan
                    .keep
                    .iter()
                    .map(|&(i, _, b)| (b, Arc::clone(&listeners[i])))
                    .collect(),
                close: plan.close.clone(),
                add: std::mem::take(&mut bound.per_worker[w]),
                retire: retire.clone(),
                applied: Some(applied.clone()),
            };
            // A worker that already exited has nothing to change.
            if link.send(Command::Reload(Box::new(command))).is_ok() {
                told += 1;
            }
        }
        drop(applied);
        wait_applied(&acks, told);
    }

    /// Records the listeners in force with their (asked, bound) sockets,
    /// retires the removed ones and publishes the set.
    fn put_in_force(
        &mut self,
        plan: &Plan,
        effective: &Config,
        listeners: Vec<Arc<Listener>>,
        bound: &worker::Bound,
    ) {
        let mut active: Vec<Active> = listeners
            .iter()
            .map(|l| Active {
                listener: Arc::clone(l),
                sockets: Vec::new(),
            })
            .collect();
        for &(i, asked, b) in &plan.keep {
            active[i].sockets.push((asked, b));
        }
        for (i, sockets) in active.iter_mut().enumerate() {
            let fresh = bound.local_addrs.iter().filter(|b| b.0 == i);
            let asked_left = ListenerConfig {
                listen: plan.bind.iter().filter(|b| b.0 == i).map(|b| b.1).collect(),
                ..effective.listeners[i].clone()
            };
            sockets.sockets.extend(pair_asked(&asked_left, fresh));
        }
        {
            let mut set = self.set.lock().unwrap_or_else(|p| p.into_inner());
            for &j in &plan.removed {
                set.retired.push(Arc::downgrade(&self.active[j].listener));
            }
            // Gone with their last relay, or back under the same name.
            set.retired.retain(|l| {
                l.upgrade()
                    .is_some_and(|l| !listeners.iter().any(|n| n.config.name == l.config.name))
            });
            set.current = listeners;
        }
        self.active = active;
    }
}

/// One line per newly bound address, as the start has always said it.
fn log_listening(effective: &Config, bound: &worker::Bound) {
    for &(i, addr) in &bound.local_addrs {
        let l = &effective.listeners[i];
        let servers: Vec<&str> = l
            .pools()
            .into_iter()
            .flat_map(|(_, p)| p.servers.iter().map(|s| s.address.as_str()))
            .collect();
        let routes: Vec<String> = l
            .routes
            .iter()
            .map(|r| format!("{} -> {}", r.describe(), r.pool))
            .collect();
        tracing::info!(
            listener = %l.name,
            upstreams = ?servers,
            routes = (!routes.is_empty()).then(|| tracing::field::debug(&routes)),
            mode = %l.mode,
            workers = effective.workers,
            pipe_size = effective.pipe_size,
            "listening on {addr}"
        );
    }
}

/// Waits until `told` workers applied the reload (a worker between two
/// polls answers within one loop iteration). A worker that exits first
/// drops its sender instead.
fn wait_applied(acks: &std::sync::mpsc::Receiver<()>, told: usize) {
    let deadline = Instant::now() + APPLY_WAIT;
    for _ in 0..told {
        let left = deadline.saturating_duration_since(Instant::now());
        match acks.recv_timeout(left) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => return,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    "internal: a worker has not applied the reload within {} s; it will when its loop turns",
                    APPLY_WAIT.as_secs()
                );
                return;
            }
        }
    }
}

/// How long a reload waits for the workers to take it.
const APPLY_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

impl ReloadReport {
    /// What a reload changed, from its plan and the listeners that were in
    /// force before it (`old`).
    fn of(
        plan: &Plan,
        effective: &Config,
        old: &[Active],
        bound: &worker::Bound,
        need_restart: Vec<&'static str>,
    ) -> ReloadReport {
        let mut report = ReloadReport {
            need_restart,
            ..ReloadReport::default()
        };
        for (i, fate) in plan.fates.iter().enumerate() {
            let name = effective.listeners[i].name.clone();
            match fate {
                Fate::New => report.added.push(name),
                Fate::Changed(_) => report.changed.push(name),
                Fate::Same(_) => {}
            }
        }
        for &j in &plan.removed {
            report.removed.push(old[j].listener.config.name.clone());
        }
        report.bound = bound
            .local_addrs
            .iter()
            .map(|&(i, a)| (effective.listeners[i].name.clone(), a))
            .collect();
        report.closed = plan.close.clone();
        report
    }

    /// One line per change, in the words of the start-up lines.
    fn log(&self) {
        for addr in &self.closed {
            tracing::info!("stopped listening on {addr}; relays accepted there carry on");
        }
        for name in &self.changed {
            tracing::info!(listener = %name, "new settings apply to new connections; live relays keep theirs");
        }
        for name in &self.removed {
            tracing::info!(listener = %name, "listener removed; its relays drain");
        }
        for setting in &self.need_restart {
            tracing::warn!(setting, "{setting} changed in the config but takes effect only after a restart; keeping the running value");
        }
    }
}
