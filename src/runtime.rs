//! The runtime: worker threads, each with its event loop, pools and
//! relays, and the channel that tells them what to do.
//!
//! `spliced run` is a runtime with listeners ([`crate::proxy::start`] binds
//! them first); a program that embeds spliced starts one without listeners
//! and hands it connected pairs ([`Runtime::handoff`]). Both kinds of
//! relay take the same path inside a worker.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::TcpListener;

use crate::config::{Config, EventLoop, ListenerConfig, Mode, Timeouts};
use crate::control::{Command, Shared, WorkerLink};
use crate::error::StartError;
use crate::listener::{self, Listener, ListenerId};
use crate::shm::{Arena, Block, Snapshot, State};
use crate::stats::Stats;
use crate::upstream::Fleet;
use crate::worker::Worker;

/// The id of the pseudo-listener whose settings and counters handed-off
/// pairs use; real listeners count up from zero.
const HANDOFF_LISTENER: ListenerId = ListenerId(u32::MAX);

struct WorkerHandle {
    thread: Option<JoinHandle<()>>,
    link: WorkerLink,
    counters: Block,
    tid: Arc<AtomicI32>,
}

/// Asks a running runtime (or proxy) to stop, from any thread (a signal
/// handler's, say).
#[derive(Clone)]
pub struct Controller {
    links: Vec<WorkerLink>,
    stopping: Arc<AtomicBool>,
    arena: Arc<Arena>,
}

impl Controller {
    /// Stops accepting and taking handoffs; live relays finish within the
    /// drain timeout.
    pub fn shutdown(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.arena.set_state(State::Draining);
        self.tell_all(|| Command::Drain);
    }

    /// Closes every relay now.
    pub fn abort(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        self.arena.set_state(State::Draining);
        self.tell_all(|| Command::Abort);
    }

    fn tell_all(&self, command: impl Fn() -> Command) {
        for link in &self.links {
            // A failed send means the worker already exited: nothing to tell it.
            let _ = link.send(command());
        }
    }
}

/// The shared state the admin endpoint reads.
#[cfg(feature = "admin")]
pub(crate) struct AdminParts {
    pub(crate) listeners: Arc<std::sync::Mutex<ListenerSet>>,
    pub(crate) arena: Arc<Arena>,
    pub(crate) stopping: Arc<AtomicBool>,
}

/// Running workers. Dropping it aborts every relay and joins the workers.
///
/// ```
/// use std::time::Duration;
/// use spliced::{Mode, Runtime};
///
/// let runtime = Runtime::builder()
///     .workers(1)
///     .mode(Mode::Splice)
///     .idle_timeout(Some(Duration::from_secs(600)))
///     .start()
///     .expect("start the runtime");
/// assert_eq!(runtime.stats().relays_active, 0);
/// runtime.shutdown();
/// runtime.join();
/// ```
pub struct Runtime {
    workers: Vec<WorkerHandle>,
    pub(crate) listeners: Arc<Mutex<ListenerSet>>,
    pub(crate) handoff_listener: Arc<Listener>,
    /// Round-robin over workers for handoffs.
    next_worker: AtomicUsize,
    pub(crate) stopping: Arc<AtomicBool>,
    pub(crate) copy_buffer_size: usize,
    /// The mapping every counter block lives in (the stats file).
    pub(crate) arena: Arc<Arena>,
}

/// The listeners whose counters the runtime reports; a reload changes it.
#[derive(Debug, Default)]
pub(crate) struct ListenerSet {
    /// In config order.
    pub(crate) current: Vec<Arc<Listener>>,
    /// Removed by a reload, while relays of theirs live: their counters
    /// count in the totals until the last one closes, when their rows
    /// leave the stats file too.
    pub(crate) retired: Vec<std::sync::Weak<Listener>>,
}

/// Settings of a runtime started for handoffs; see [`Runtime::builder`].
#[derive(Clone, Debug)]
pub struct RuntimeBuilder {
    config: Config,
    mode: Mode,
    timeouts: Timeouts,
}

impl RuntimeBuilder {
    /// Worker threads (default: one per CPU).
    pub fn workers(mut self, n: usize) -> Self {
        self.config.workers = n;
        self
    }

    /// Which loop the workers run (default: epoll).
    pub fn event_loop(mut self, event_loop: EventLoop) -> Self {
        self.config.event_loop = event_loop;
        self
    }

    /// How handed-off pairs move bytes (default: splice).
    pub fn mode(mut self, mode: Mode) -> Self {
        self.mode = mode;
        self
    }

    /// Close a pair after this long with no byte moved (default 1 h;
    /// `None` disables it).
    pub fn idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeouts.idle = timeout;
        self
    }

    /// The inactivity limit once either side sent FIN (default 60 s).
    pub fn fin_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.timeouts.fin = timeout;
        self
    }

    /// Capacity asked of each pooled pipe (default 1 MiB).
    pub fn pipe_size(mut self, bytes: usize) -> Self {
        self.config.pipe_size = bytes;
        self
    }

    /// How long live pairs may finish after [`Runtime::shutdown`] (default
    /// 30 s; `None` waits for them).
    pub fn drain_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Every process-wide setting at once (its listeners are ignored).
    pub fn config(mut self, config: Config) -> Self {
        self.config = config;
        self.config.listeners.clear();
        self
    }

    /// Starts the workers.
    pub fn start(self) -> Result<Runtime, StartError> {
        self.config.validate_runtime().map_err(StartError::Config)?;
        let nofile = crate::sys::raise_nofile_limit();
        let fds = fd_budget(&self.config, nofile);
        let handoff = ListenerConfig::handoff(self.mode, self.timeouts);
        let per_worker = (0..self.config.workers).map(|_| Vec::new()).collect();
        let arena = Arena::create(
            self.config.workers,
            &[listener::name_of(&handoff)],
            &self.config.ops,
            0,
        )?;
        Runtime::spawn(
            Arc::new(self.config),
            arena,
            per_worker,
            Vec::new(),
            handoff,
            fds,
            Fleet::new(),
        )
    }
}

impl Runtime {
    /// A runtime for handoffs: set it up, then [`start`](RuntimeBuilder::start).
    pub fn builder() -> RuntimeBuilder {
        let mut config = Config::single(
            "127.0.0.1:0".parse().expect("an address"),
            vec![],
            Mode::Splice,
        );
        config.listeners.clear();
        RuntimeBuilder {
            config,
            mode: Mode::Splice,
            timeouts: Timeouts::default(),
        }
    }

    /// Spawns one worker per entry of `per_worker`, each serving its own
    /// sockets of `listeners`.
    pub(crate) fn spawn(
        config: Arc<Config>,
        arena: Arc<Arena>,
        per_worker: Vec<Vec<(TcpListener, Arc<Listener>)>>,
        listeners: Vec<Arc<Listener>>,
        handoff: ListenerConfig,
        fds: FdBudget,
        fleet: Arc<Fleet>,
    ) -> Result<Runtime, StartError> {
        let shared = Arc::new(Shared::new(fds.pipe_fds, Arc::clone(&fleet)));
        let listeners_len = listeners.len();
        arena.mark_handoff(listeners_len);
        let mut runtime = Runtime {
            workers: Vec::with_capacity(per_worker.len()),
            listeners: Arc::new(Mutex::new(ListenerSet {
                current: listeners,
                retired: Vec::new(),
            })),
            handoff_listener: Arc::new(Listener::new(
                HANDOFF_LISTENER,
                handoff,
                // The handoff pseudo-listener is the arena's last name.
                arena.listener_counters(listeners_len),
                &fleet,
            )),
            next_worker: AtomicUsize::new(0),
            stopping: Arc::new(AtomicBool::new(false)),
            copy_buffer_size: config.copy_buffer_size,
            arena: Arc::clone(&arena),
        };
        let mut rings = rings(config.event_loop, per_worker.len());
        for (index, sockets) in per_worker.into_iter().enumerate() {
            let counters = arena.worker_block(index);
            let tid = Arc::new(AtomicI32::new(0));
            let w = Worker::new(
                index,
                Arc::clone(&config),
                sockets,
                Arc::clone(&shared),
                counters.clone(),
                fds.relays,
                rings.pop().flatten(),
            )
            .map_err(|e| StartError::Io("create the event loop".into(), e))?;
            let link = w.link();
            let tid_slot = Arc::clone(&tid);
            // On failure `runtime` drops, which aborts and joins the
            // workers already started.
            let thread = std::thread::Builder::new()
                .name(format!("spliced-w{index}"))
                .spawn(move || {
                    tid_slot.store(crate::sys::gettid(), Ordering::Relaxed);
                    w.run();
                })
                .map_err(|e| StartError::Io("spawn a worker thread".into(), e))?;
            runtime.workers.push(WorkerHandle {
                thread: Some(thread),
                link,
                counters,
                tid,
            });
        }
        Ok(runtime)
    }

    /// The link of the worker that takes the next handoff.
    pub(crate) fn next_link(&self) -> &WorkerLink {
        let i = self.next_worker.fetch_add(1, Ordering::Relaxed) % self.workers.len();
        &self.workers[i].link
    }

    /// Counters summed over all workers, listeners and handed-off pairs.
    pub fn stats(&self) -> Stats {
        let set = self.listener_set();
        let retired: Vec<Arc<Listener>> = set.retired.iter().filter_map(|l| l.upgrade()).collect();
        let listeners = set
            .current
            .iter()
            .chain(&retired)
            .chain([&self.handoff_listener])
            .map(|l| l.stats());
        let workers = Stats::sum(self.workers.iter().map(|w| &*w.counters));
        // Listener blocks are summed from the listeners, not the arena, so a
        // listener added at run time would count too.
        listeners.fold(workers, |sum, l| sum + l)
    }

    /// Each listener's counters (its relays, bytes and closes), in the
    /// order of the config in force; the worker-scoped counters (pipes, buffers, timers) are zero
    /// here and counted once in [`Runtime::stats`].
    pub fn listener_stats(&self) -> Vec<(ListenerId, Stats)> {
        let set = self.listener_set();
        set.current.iter().map(|l| (l.id, l.stats())).collect()
    }

    fn listener_set(&self) -> std::sync::MutexGuard<'_, ListenerSet> {
        self.listeners.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds the counters of `old` (the snapshot of the instance a live
    /// upgrade replaces) to worker 0's blocks: each listener's by name
    /// (`handoff` to the handoff pseudo-listener's), each server's by its
    /// listener's name and its address, the worker-scoped ones summed.
    /// Gauges are not carried: they describe the old process's relays,
    /// which are counted again as the new process takes them. A listener
    /// or server of `old` the current config does not name is dropped.
    #[cfg(feature = "service")]
    pub(crate) fn seed_counters(&self, old: &crate::shm::Snapshot) {
        let set = self.listener_set();
        for old_listener in &old.listeners {
            let target = set
                .current
                .iter()
                .chain([&self.handoff_listener])
                .find(|l| l.label() == old_listener.name);
            if let Some(listener) = target {
                listener.counters(0).seed(&old_listener.total());
            }
        }
        // Each server's, by listener and address, when the new config
        // still has it (a server shared by pools counts once).
        for old_server in &old.servers {
            let server = set
                .current
                .iter()
                .filter(|l| l.label() == old_server.listener)
                .flat_map(|l| l.pools.iter())
                .find_map(|pool| {
                    let members = pool.members();
                    let found = members
                        .servers
                        .iter()
                        .find(|s| s.addr.to_string() == old_server.addr)
                        .cloned();
                    found
                });
            if let Some(server) = server {
                server.block(0).seed(&old_server.total());
            }
        }
        if let Some(first) = self.workers.first() {
            let workers = old
                .workers
                .iter()
                .cloned()
                .fold(Stats::default(), |a, b| a + b);
            first.counters.seed(&workers);
        }
    }

    /// What the admin endpoint reads, to start it now or again later.
    #[cfg(feature = "admin")]
    pub(crate) fn admin_parts(&self) -> AdminParts {
        AdminParts {
            listeners: Arc::clone(&self.listeners),
            arena: Arc::clone(&self.arena),
            stopping: Arc::clone(&self.stopping),
        }
    }

    /// Every worker's command link, for a reload.
    pub(crate) fn links(&self) -> Vec<WorkerLink> {
        self.workers.iter().map(|w| w.link.clone()).collect()
    }

    /// Every counter block, per worker and per listener, as the stats file
    /// holds it.
    pub fn snapshot(&self) -> Snapshot {
        self.arena.snapshot()
    }

    /// The stats file this runtime's counters live in, if it has one.
    pub fn stats_file(&self) -> Option<&std::path::Path> {
        self.arena.path()
    }

    /// True once [`shutdown`](Self::shutdown) or [`abort`](Self::abort) was
    /// asked: the runtime takes no new relays.
    pub fn is_draining(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    /// The counters of handed-off pairs alone.
    pub fn handoff_stats(&self) -> Stats {
        self.handoff_listener.stats()
    }

    /// CPU time (user + system) the worker threads have used so far.
    pub fn worker_cpu_time(&self) -> Duration {
        self.workers
            .iter()
            .map(|w| crate::sys::thread_cpu_time(w.tid.load(Ordering::Relaxed)))
            .sum()
    }

    /// Every server of every current listener, for the metrics.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn server_samples(
        listeners: &Mutex<ListenerSet>,
    ) -> Vec<(String, crate::upstream::ServerSample)> {
        let set = listeners.lock().unwrap_or_else(|p| p.into_inner());
        set.current
            .iter()
            .flat_map(|l| {
                let name = l.config.name.clone();
                // A server two of its pools share is shown once.
                let mut samples: Vec<crate::upstream::ServerSample> =
                    l.pools.iter().flat_map(|p| p.samples()).collect();
                let mut seen = std::collections::HashSet::new();
                samples.retain(|s| seen.insert(s.addr));
                samples
                    .into_iter()
                    .map(move |s| (name.clone(), s))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Every route of every current listener, for the metrics.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn route_samples(
        listeners: &Mutex<ListenerSet>,
    ) -> Vec<(String, crate::listener::RouteSample)> {
        let set = listeners.lock().unwrap_or_else(|p| p.into_inner());
        set.current
            .iter()
            .flat_map(|l| {
                let name = l.config.name.clone();
                l.route_samples()
                    .into_iter()
                    .map(move |r| (name.clone(), r))
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The kernel thread ids of the workers (for tracing tools).
    #[cfg_attr(not(feature = "cli"), allow(dead_code))]
    pub(crate) fn worker_tids(&self) -> Vec<i32> {
        self.workers
            .iter()
            .map(|w| w.tid.load(Ordering::Relaxed))
            .collect()
    }

    /// A cloneable handle that can stop this runtime from another thread.
    pub fn controller(&self) -> Controller {
        Controller {
            links: self.workers.iter().map(|w| w.link.clone()).collect(),
            stopping: Arc::clone(&self.stopping),
            arena: Arc::clone(&self.arena),
        }
    }

    /// Stops accepting and taking handoffs; live relays finish within the
    /// drain timeout.
    pub fn shutdown(&self) {
        self.controller().shutdown();
    }

    /// Closes every relay now.
    pub fn abort(&self) {
        self.controller().abort();
    }

    /// True once every worker has exited (all relays closed).
    pub fn is_finished(&self) -> bool {
        self.workers
            .iter()
            .all(|w| w.thread.as_ref().is_none_or(|t| t.is_finished()))
    }

    /// Waits for every worker to exit (after [`shutdown`](Self::shutdown) or
    /// [`abort`](Self::abort)).
    pub fn join(mut self) {
        self.join_workers();
    }

    fn join_workers(&mut self) {
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                // A panicking worker already printed its message; the others go on.
                let _ = t.join();
            }
        }
        self.arena.retire();
    }
}

/// How the fd limit is shared out: the relay cap, and the pipe fds all
/// workers together may hold. `2 × relays + pipe_fds` never exceeds the
/// limit less its reserve, so pipes can never take the socket of a client
/// the cap let in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct FdBudget {
    /// Most relays at once, over all workers.
    pub(crate) relays: usize,
    /// Most pipe fds (two per pipe, live or pooled) over all workers.
    pub(crate) pipe_fds: usize,
}

/// The fd budget of the whole process, from RLIMIT_NOFILE `nofile`:
///
/// - a reserve (an eighth of the limit, 16 to 256 fds, plus 4 per worker)
///   for the event loops, listeners, health probes, the admin server and
///   the stats file;
/// - the relay cap: `max_relays` if set and lower, else what is left at
///   two sockets per relay plus a pipe per four relays (HAProxy's default
///   `maxpipes` of a quarter of `maxconn`), i.e. `left × 2 / 5`. Every
///   relay under the cap has its two sockets guaranteed;
/// - the pipes' share: whatever the relays' sockets leave, `left − 2 ×
///   relays` (so a lower `max_relays` leaves pipes more). Past it a new
///   pipe is not made and the direction copies (a fallback, counted).
///
/// The cap is shared, not split per worker, because SO_REUSEPORT does not
/// spread connections evenly: a per-worker share would strand clients on a
/// full worker while another has room. The pipe share is one count for the
/// same reason.
/// One io_uring per worker for the `uring` loop; none for `epoll`, or
/// where io_uring cannot be used, which is logged once: the workers then
/// run the epoll loop.
fn rings(event_loop: EventLoop, workers: usize) -> Vec<Option<crate::sys::uring::Ring>> {
    if event_loop == EventLoop::Epoll {
        return Vec::new();
    }
    let mut rings = Vec::with_capacity(workers);
    for _ in 0..workers {
        match crate::sys::uring::Ring::new() {
            Ok(ring) => rings.push(Some(ring)),
            Err(e) => {
                tracing::warn!(error = %e, "io_uring cannot be used here (kernel.io_uring_disabled, a seccomp profile, or an old kernel): the workers run the epoll loop");
                return Vec::new();
            }
        }
    }
    tracing::info!(workers, "the workers run the uring loop");
    rings
}

pub(crate) fn fd_budget(config: &Config, nofile: u64) -> FdBudget {
    let reserve = (nofile / 8).clamp(16, 256) + 4 * config.workers as u64
        // The admin endpoint's own fds, bounded, so its clients can never
        // take a relay's.
        + config.ops.admin_fds();
    let left = nofile.saturating_sub(reserve);
    let by_fds = (left * 2 / 5) as usize;
    let relays = config.max_relays.map_or(by_fds, |m| m.min(by_fds)).max(1);
    let pipe_fds = left.saturating_sub(2 * relays as u64) as usize & !1;
    FdBudget { relays, pipe_fds }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if self.workers.iter().any(|w| w.thread.is_some()) {
            self.abort();
            self.join_workers();
        }
    }
}

#[cfg(test)]
mod tests;
