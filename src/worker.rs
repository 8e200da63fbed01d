//! One worker: a mio `Poll`, its own SO_REUSEPORT listeners, its relays.
//!
//! Each loop iteration: poll (the timeout is the earliest of the next
//! deadline, the accept-pause end, or zero when relays wait on the ready
//! list), record readiness and pump the relays it concerns, run relays that
//! ran out of budget last time, then expire due deadlines.
//!
//! Tokens: relay slab key `k` owns `2k` (client) and `2k + 1` (upstream);
//! listeners count down from [`LISTENER_BASE`]; the waker is `usize::MAX`.
//!
//! The writable invariant: readiness is remembered per direction and only
//! cleared by WouldBlock, so any code that leaves bytes pending still gets
//! the destination's next writable edge; nothing needs re-arming.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::engine::Pools;
use crate::error::{Op, RelayError, Side, StartError};
use crate::proxy::Control;
use crate::relay::{Expiry, ListenerRuntime, Next, Relay};
use crate::stats::{CloseReason, WorkerCounters};
use crate::timer::Timers;
use crate::upstream;

const WAKER: Token = Token(usize::MAX);
const LISTENER_BASE: usize = usize::MAX / 2;
/// Connections accepted per listener per wakeup before serving others.
const ACCEPT_BUDGET: usize = 128;
/// How long accepting pauses after EMFILE/ENFILE.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
const LISTEN_BACKLOG: i32 = 4096;
/// At the relay cap, how often to look whether another worker freed room.
const CAP_RECHECK: Duration = Duration::from_millis(20);
/// Relay slots kept allocated when a worker becomes idle.
const SLAB_KEEP: usize = 1024;

/// Listeners bound for every worker, before any worker starts.
pub(crate) struct Bound {
    /// Every bound address with the index of its listener, in config order.
    pub(crate) local_addrs: Vec<(usize, SocketAddr)>,
    pub(crate) per_worker: Vec<Vec<(TcpListener, Arc<ListenerRuntime>)>>,
}

/// Binds each listener address once per worker with SO_REUSEPORT, so the
/// kernel spreads accepts. The first bind resolves port 0, the others reuse
/// the concrete port.
///
/// SO_REUSEPORT alone would let a second spliced (or anything else that set
/// it) share a port and take half its connections. So each address is first
/// claimed by a probe socket without SO_REUSEPORT: its bind fails with
/// EADDRINUSE while any other process listens there, whatever options that
/// process set. The probe stays bound, not listening, until the workers'
/// sockets listen; SO_REUSEADDR on both lets them coexist.
pub(crate) fn bind_listeners(config: &Config) -> Result<Bound, StartError> {
    let mut per_worker: Vec<Vec<_>> = (0..config.workers).map(|_| Vec::new()).collect();
    let mut local_addrs = Vec::new();
    for (index, listener) in config.listeners.iter().enumerate() {
        let runtime = Arc::new(ListenerRuntime {
            config: listener.clone(),
            next_upstream: AtomicUsize::new(0),
        });
        let dual_family = listener.listen.iter().any(|a| a.is_ipv4());
        for &asked in &listener.listen {
            let fail = |e| StartError::Listen(asked, e);
            let probe = match claim(asked, dual_family) {
                Ok(probe) => probe,
                Err(e) if asked.is_ipv6() && asked.ip().is_unspecified() && no_ipv6(&e) && dual_family => {
                    tracing::warn!(address = %asked, error = %e, "IPv6 is not available here; listening on IPv4 only");
                    continue;
                }
                Err(e) => return Err(fail(e)),
            };
            let addr = probe.local_addr().and_then(|a| {
                a.as_socket()
                    .ok_or_else(|| io::Error::other("bound address is not an IP address"))
            });
            let addr = addr.map_err(fail)?;
            for sockets in per_worker.iter_mut() {
                let socket = bind_one(addr, dual_family).map_err(fail)?;
                sockets.push((socket, Arc::clone(&runtime)));
            }
            local_addrs.push((index, addr));
        }
    }
    Ok(Bound {
        local_addrs,
        per_worker,
    })
}

fn new_socket(addr: SocketAddr, v6_only: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && v6_only {
        // Beside an IPv4 address of the same listener, `[::]` must not claim
        // IPv4 too, or the two binds would collide.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_cloexec(true)?;
    Ok(socket)
}

/// Binds without SO_REUSEPORT to find out whether the address is free.
fn claim(addr: SocketAddr, v6_only: bool) -> io::Result<Socket> {
    let socket = new_socket(addr, v6_only)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn bind_one(addr: SocketAddr, v6_only: bool) -> io::Result<TcpListener> {
    let socket = new_socket(addr, v6_only)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// The host has no IPv6 (disabled, or no such address family).
fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
    )
}

struct ListenerSlot {
    socket: Option<TcpListener>,
    runtime: Arc<ListenerRuntime>,
    /// Stopped by the accept budget with connections possibly left.
    backlog: bool,
}

pub(crate) struct Worker {
    index: usize,
    poll: Poll,
    waker: Arc<Waker>,
    listeners: Vec<ListenerSlot>,
    relays: Slab<Relay>,
    timers: Timers,
    /// Relays that ran out of budget with work left.
    ready: Vec<usize>,
    pools: Pools,
    config: Arc<Config>,
    control: Arc<Control>,
    counters: Arc<WorkerCounters>,
    next_id: u64,
    accept_paused_until: Option<Instant>,
    last_accept_warning: Option<Instant>,
    drain_deadline: Option<Instant>,
    draining: bool,
    /// Most relays in all workers together; past it, clients wait in the
    /// backlog (see `proxy::relay_cap`).
    relay_cap: usize,
}

impl Worker {
    pub(crate) fn new(
        index: usize,
        config: Arc<Config>,
        listeners: Vec<(TcpListener, Arc<ListenerRuntime>)>,
        control: Arc<Control>,
        counters: Arc<WorkerCounters>,
        relay_cap: usize,
    ) -> io::Result<Worker> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let mut slots = Vec::with_capacity(listeners.len());
        for (i, (mut socket, runtime)) in listeners.into_iter().enumerate() {
            poll.registry()
                .register(&mut socket, Token(LISTENER_BASE - i), Interest::READABLE)?;
            slots.push(ListenerSlot {
                socket: Some(socket),
                runtime,
                backlog: false,
            });
        }
        Ok(Worker {
            index,
            poll,
            waker,
            listeners: slots,
            relays: Slab::new(),
            timers: Timers::default(),
            ready: Vec::new(),
            pools: Pools::new(&config, Arc::clone(&counters)),
            config,
            control,
            counters,
            next_id: 0,
            accept_paused_until: None,
            last_accept_warning: None,
            drain_deadline: None,
            draining: false,
            relay_cap,
        })
    }

    pub(crate) fn waker(&self) -> Arc<Waker> {
        Arc::clone(&self.waker)
    }

    /// Runs until aborted, or until draining has closed every relay.
    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            if let Err(e) = self.poll.poll(&mut events, self.poll_timeout(now)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(worker = self.index, error = %e, "internal: epoll_wait failed; closing this worker's relays");
                self.close_all(Instant::now());
                return;
            }
            let now = Instant::now();
            for event in events.iter() {
                match event.token() {
                    WAKER => {}
                    Token(t) if t > LISTENER_BASE - self.listeners.len() && t <= LISTENER_BASE => {
                        self.accept(LISTENER_BASE - t, now);
                    }
                    Token(t) => {
                        let side = if t % 2 == 0 {
                            Side::Client
                        } else {
                            Side::Upstream
                        };
                        self.on_socket_event(t / 2, side, event, now);
                    }
                }
            }
            self.run_ready(now);
            self.resume_accepting(now);
            self.expire(now);
            if self.check_control(now) {
                return;
            }
        }
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.ready.is_empty() || self.listeners.iter().any(|l| l.backlog) {
            return Some(Duration::ZERO);
        }
        [
            self.timers.next(),
            self.accept_paused_until,
            self.drain_deadline,
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| at.saturating_duration_since(now))
    }

    // Accepting

    fn accept(&mut self, index: usize, now: Instant) {
        if self.accept_paused_until.is_some() {
            return;
        }
        self.listeners[index].backlog = false;
        for _ in 0..ACCEPT_BUDGET {
            if self.control.relays_live.load(Ordering::Relaxed) >= self.relay_cap {
                self.reach_relay_cap(now);
                return;
            }
            let accepted = match self.listeners[index].socket.as_ref() {
                Some(socket) => socket.accept(),
                None => return,
            };
            match accepted {
                Ok((client, addr)) => {
                    let runtime = Arc::clone(&self.listeners[index].runtime);
                    self.start_relay(client, addr, runtime, now);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if out_of_fds(&e) => {
                    self.pause_accepting(now, &e);
                    return;
                }
                // The client gave up between SYN and accept; nothing to serve.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    tracing::warn!(worker = self.index, error = %e, "accept failed");
                    return;
                }
            }
        }
        self.listeners[index].backlog = true;
    }

    /// Pauses accepting instead of spinning on a listener that stays readable.
    fn pause_accepting(&mut self, now: Instant, e: &io::Error) {
        self.accept_paused_until = Some(now + ACCEPT_PAUSE);
        WorkerCounters::add(&self.counters.accept_pauses, 1);
        if self.may_warn_about_accepting(now) {
            tracing::warn!(
                worker = self.index,
                error = %e,
                relays = self.relays.len(),
                "out of file descriptors: accepting paused for {} ms",
                ACCEPT_PAUSE.as_millis()
            );
        }
    }

    /// Stops accepting until a relay closes here, or briefly when the
    /// relays that would free room live in another worker. Meanwhile the
    /// kernel queues new clients.
    fn reach_relay_cap(&mut self, now: Instant) {
        self.accept_paused_until = Some(now + CAP_RECHECK);
        WorkerCounters::add(&self.counters.accept_pauses, 1);
        if self.may_warn_about_accepting(now) {
            tracing::warn!(
                worker = self.index,
                relays = self.relays.len(),
                cap = self.relay_cap,
                "relay limit reached (from the fd limit or --max-conns): new connections wait in the listen backlog"
            );
        }
    }

    /// Accept-pause warnings are logged at most once a second per worker.
    fn may_warn_about_accepting(&mut self, now: Instant) -> bool {
        let due = self
            .last_accept_warning
            .is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            self.last_accept_warning = Some(now);
        }
        due
    }

    fn resume_accepting(&mut self, now: Instant) {
        if self.accept_paused_until.is_some_and(|t| t <= now) {
            self.accept_paused_until = None;
            for i in 0..self.listeners.len() {
                self.accept(i, now);
            }
        } else if self.accept_paused_until.is_none() {
            for i in 0..self.listeners.len() {
                if self.listeners[i].backlog {
                    self.accept(i, now);
                }
            }
        }
    }

    fn start_relay(
        &mut self,
        client: TcpStream,
        addr: SocketAddr,
        runtime: Arc<ListenerRuntime>,
        now: Instant,
    ) {
        WorkerCounters::add(&self.counters.relays_accepted, 1);
        // Database traffic is small request/response: never delay it.
        let _ = client.set_nodelay(true);
        let first = upstream::first_index(&runtime);
        let mut attempt = 0;
        let mut last_error = None;
        let (upstream, upstream_addr) = loop {
            let Some(server) = upstream::server(&runtime, first, attempt) else {
                let error = last_error.map(|e| RelayError::new(Side::Upstream, Op::Connect, e));
                tracing::info!(
                    client = %addr,
                    reason = %CloseReason::ConnectFailed,
                    error = error.as_ref().map(tracing::field::display),
                    "relay closed"
                );
                self.counters.closed(CloseReason::ConnectFailed);
                return;
            };
            match upstream::start_connect(server) {
                Ok(stream) => break (stream, server),
                Err(e) => {
                    self.connect_failed(server, &e);
                    if out_of_fds(&e) {
                        self.pause_accepting(now, &e);
                    }
                    last_error = Some(e);
                    attempt += 1;
                }
            }
        };
        self.next_id += 1;
        let entry = self.relays.vacant_entry();
        let key = entry.key();
        let mut relay = Relay::new(
            self.next_id,
            runtime,
            client,
            addr,
            upstream,
            upstream_addr,
            first,
            now,
        );
        relay.attempt = attempt;
        let registry = self.poll.registry();
        let both = Interest::READABLE | Interest::WRITABLE;
        let registered = registry
            .register(&mut relay.client, Token(2 * key), both)
            .map_err(|e| RelayError::new(Side::Internal, Op::Register, e))
            .and_then(|()| {
                registry
                    .register(&mut relay.upstream, Token(2 * key + 1), both)
                    .map_err(|e| RelayError::new(Side::Internal, Op::Register, e))
            });
        entry.insert(relay);
        WorkerCounters::add(&self.counters.relays_active, 1);
        self.control.relays_live.fetch_add(1, Ordering::Relaxed);
        match registered {
            Ok(()) => self.arm(key),
            Err(e) => self.close(key, CloseReason::ConnectFailed, Some(&e), now),
        }
    }

    fn connect_failed(&self, server: SocketAddr, e: &io::Error) {
        WorkerCounters::add(&self.counters.upstream_connect_failures, 1);
        tracing::debug!(upstream = %server, error = %e, "upstream connect failed; trying the next server");
    }

    // Readiness

    fn on_socket_event(&mut self, key: usize, side: Side, event: &mio::event::Event, now: Instant) {
        let Some(relay) = self.relays.get_mut(key) else {
            return;
        };
        if relay.is_connecting() {
            if side == Side::Upstream {
                self.on_connect_event(key, now);
            } else {
                relay.ready(
                    side,
                    event.is_readable() || event.is_read_closed(),
                    event.is_writable(),
                );
            }
            return;
        }
        if event.is_error() {
            if let Some(e) = relay.socket_error(side) {
                let reason = reset_reason(e.side);
                self.close(key, reason, Some(&e), now);
                return;
            }
        }
        // HUP and RDHUP are hints: the read that follows tells EOF or error.
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        let writable = event.is_writable() || event.is_write_closed() || event.is_error();
        relay.ready(side, readable, writable);
        self.run_relay(key, now);
    }

    fn on_connect_event(&mut self, key: usize, now: Instant) {
        let relay = &mut self.relays[key];
        match upstream::connect_result(&relay.upstream) {
            Ok(false) => {}
            Ok(true) => {
                let _ = relay.upstream.set_nodelay(true);
                relay.connected(now);
                tracing::debug!(relay = relay.id, upstream = %relay.upstream_addr, "upstream connected");
                self.arm(key);
                self.run_relay(key, now);
            }
            Err(e) => {
                let server = relay.upstream_addr;
                self.connect_failed(server, &e);
                self.next_connect_attempt(key, e, now);
            }
        }
    }

    /// Tries the next server after a failed or timed-out connect.
    fn next_connect_attempt(&mut self, key: usize, mut error: io::Error, now: Instant) {
        loop {
            let relay = &self.relays[key];
            let next = upstream::server(&relay.listener, relay.first_upstream, relay.attempt + 1);
            let Some(server) = next else {
                let e = RelayError::new(Side::Upstream, Op::Connect, error);
                self.close(key, CloseReason::ConnectFailed, Some(&e), now);
                return;
            };
            let token = Token(2 * key + 1);
            let attempt = upstream::start_connect(server).and_then(|mut stream| {
                let interest = Interest::READABLE | Interest::WRITABLE;
                self.poll
                    .registry()
                    .register(&mut stream, token, interest)?;
                Ok(stream)
            });
            let relay = &mut self.relays[key];
            match attempt {
                Ok(stream) => {
                    // The old socket closes on drop, which also removes it from epoll.
                    relay.retry_upstream(stream, server, now);
                    self.arm(key);
                    return;
                }
                Err(e) => {
                    relay.attempt += 1;
                    self.connect_failed(server, &e);
                    error = e;
                }
            }
        }
    }

    fn run_ready(&mut self, now: Instant) {
        let ready = std::mem::take(&mut self.ready);
        for key in ready {
            if let Some(relay) = self.relays.get_mut(key) {
                relay.queued = false;
                self.run_relay(key, now);
            }
        }
    }

    fn run_relay(&mut self, key: usize, now: Instant) {
        let relay = &mut self.relays[key];
        let was_half_closed = relay.activity.half_closed;
        match relay.pump(now, &mut self.pools) {
            Ok(Next::Wait) => {}
            Ok(Next::Again) => {
                if !relay.queued {
                    relay.queued = true;
                    self.ready.push(key);
                }
            }
            Ok(Next::Finished) => {
                self.close(key, CloseReason::Eof, None, now);
                return;
            }
            Err(e) => {
                self.close(key, reset_reason(e.side), Some(&e), now);
                return;
            }
        }
        if !was_half_closed && self.relays[key].activity.half_closed {
            // The FIN timeout may be earlier than the armed idle deadline.
            self.arm(key);
        }
    }

    // Deadlines

    /// Gives the relay a heap entry for its deadline unless one at or before
    /// it exists; later deadlines are found lazily when the entry fires.
    fn arm(&mut self, key: usize) {
        let relay = &mut self.relays[key];
        if let Some(at) = relay.deadline() {
            if relay.armed_at.is_none_or(|armed| at < armed) {
                relay.armed_at = Some(at);
                self.timers.schedule(at, key, relay.id);
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(entry) = self.timers.pop_due(now) {
            let Some(relay) = self.relays.get_mut(entry.key) else {
                continue;
            };
            if relay.id != entry.id || relay.armed_at != Some(entry.at) {
                continue;
            }
            relay.armed_at = None;
            match relay.activity.expired(relay.timeouts(), now) {
                None => self.arm(entry.key),
                Some(Expiry::Connect) => {
                    let server = relay.upstream_addr;
                    let e = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                    self.connect_failed(server, &e);
                    self.next_connect_attempt(entry.key, e, now);
                }
                Some(Expiry::Idle) => self.close(entry.key, CloseReason::Idle, None, now),
                Some(Expiry::FinTimeout) => {
                    self.close(entry.key, CloseReason::FinTimeout, None, now)
                }
            }
        }
    }

    // Closing and shutdown

    fn close(&mut self, key: usize, reason: CloseReason, error: Option<&RelayError>, now: Instant) {
        let relay = self.relays.remove(key);
        relay.close(reason, error, now, &mut self.pools);
        self.counters.closed(reason);
        WorkerCounters::sub(&self.counters.relays_active, 1);
        self.control.relays_live.fetch_sub(1, Ordering::Relaxed);
        // Freed fds may let a paused accept succeed now.
        if self.accept_paused_until.is_some() {
            self.accept_paused_until = Some(now);
        }
        if self.relays.is_empty() && self.relays.capacity() > SLAB_KEEP {
            // Give back the slab a burst grew; stale timer and ready-list
            // entries are recognised by relay id.
            self.relays.shrink_to_fit();
        }
    }

    fn close_all(&mut self, now: Instant) {
        let keys: Vec<usize> = self.relays.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, CloseReason::Shutdown, None, now);
        }
    }

    /// Reacts to shutdown requests; returns true when the worker should exit.
    fn check_control(&mut self, now: Instant) -> bool {
        if self.control.aborting.load(Ordering::SeqCst) {
            self.close_all(now);
            return true;
        }
        if !self.draining && self.control.draining.load(Ordering::SeqCst) {
            self.draining = true;
            for slot in &mut self.listeners {
                // Dropping the socket stops accepting; queued SYNs are refused.
                slot.socket = None;
                slot.backlog = false;
            }
            self.drain_deadline = self.config.drain_timeout.and_then(|d| now.checked_add(d));
            tracing::info!(worker = self.index, relays = self.relays.len(), "draining");
        }
        if self.draining {
            if self.drain_deadline.is_some_and(|t| t <= now) {
                self.close_all(now);
            }
            return self.relays.is_empty();
        }
        false
    }
}

fn out_of_fds(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

fn reset_reason(side: Side) -> CloseReason {
    match side {
        Side::Client => CloseReason::ClientReset,
        // An internal failure is reported as the upstream's: the client must
        // see a reset either way, and the log line carries the real side.
        Side::Upstream | Side::Internal => CloseReason::UpstreamReset,
    }
}
