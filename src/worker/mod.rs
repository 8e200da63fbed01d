//! One worker: a mio `Poll`, its own SO_REUSEPORT listeners, its relays.
//!
//! Each loop iteration: poll (the timeout is the earliest of the next
//! deadline, the accept-pause end, or zero when relays wait on the ready
//! list), record readiness and pump the relays it concerns, run relays that
//! ran out of budget last time, then expire due deadlines.
//!
//! Tokens are made and read in `token`: a relay's carry its slab key and its
//! id, so an event meant for a relay that closed earlier in the same batch
//! never reaches a new relay in the same slot. Deferred work (the ready
//! list, the timers) holds the same key + id pair.
//!
//! The writable invariant: readiness is remembered per direction and only
//! cleared by WouldBlock, so any code that leaves bytes pending still gets
//! the destination's next writable edge; nothing needs re-arming.

mod farewell;
mod health;
mod negotiate;
mod park;
mod preface;
mod routing;
mod start;

pub(crate) use negotiate::Negotiation;

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Waker};
use slab::Slab;

use crate::config::Config;
use crate::control::{self, Command, Handoff, Shared, WorkerLink};
use crate::engine::Pools;
use crate::error::{Op, RelayError, Side};
use crate::listener::Listener;
use crate::relay::report::Reporter;
use crate::relay::{self, failure_reason, Next, Peer, Readiness, Relay};
use crate::shm::Block;
use crate::stats::{CloseReason, CounterBlock};
use crate::timer::Timers;
use crate::token::{self, Owner, RelayRef};
use crate::upstream::fleet::Doorbell;

/// Connections accepted per listener per wakeup before serving others.
const ACCEPT_BUDGET: usize = 128;
/// How long accepting pauses after EMFILE/ENFILE.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);
/// What a relay's sockets are registered for. PRIORITY (EPOLLPRI) reports
/// urgent data, at whose mark splice stalls.
const RELAY_INTEREST: Interest = Interest::READABLE
    .add(Interest::WRITABLE)
    .add(Interest::PRIORITY);
/// At the relay cap, how often to look whether another worker freed room.
const CAP_RECHECK: Duration = Duration::from_millis(20);
/// Relay slots kept allocated when a worker becomes idle.
const SLAB_KEEP: usize = 1024;
/// Stale deadline entries a worker tolerates beyond two per live relay
/// before it sweeps them out (closed relays leave theirs behind).
const TIMER_SLACK: usize = 1024;
/// At most one warning a second per worker for each kind of trouble.
const WARN_EVERY: Duration = Duration::from_secs(1);

mod accept;
mod armed;
mod batch;
mod bind;
mod close;
mod connect;
mod reload;
mod upgrade;
pub(crate) use upgrade::ListeningSockets;

pub(crate) use bind::{bind_listeners, Bound, Inherited};

/// Relay ids are unique in the process, across workers.
static NEXT_RELAY_ID: AtomicU64 = AtomicU64::new(1);

/// A new relay id (for a relay accepted here or handed over).
pub(crate) fn next_relay_id() -> u64 {
    NEXT_RELAY_ID.fetch_add(1, Ordering::Relaxed)
}

/// Relay ids of this process start past `id` (a live upgrade's new
/// process carries relays with ids up to it).
#[cfg(feature = "service")]
pub(crate) fn relay_ids_after(id: u64) {
    NEXT_RELAY_ID.fetch_max(id.saturating_add(1), Ordering::Relaxed);
}

/// Lets a warning through at most once per [`WARN_EVERY`], and counts the
/// ones held back so the next line can say how many.
#[derive(Debug, Default)]
struct WarnLimit {
    last: Option<Instant>,
    held_back: u64,
}

impl WarnLimit {
    /// `Some(held back since the last warning)` when one may be logged now.
    fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| now.saturating_duration_since(t) < WARN_EVERY)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

struct ListenerSlot {
    socket: Option<TcpListener>,
    /// The address the socket is bound to, by which a reload names it.
    addr: Option<SocketAddr>,
    runtime: Arc<Listener>,
    /// Stopped by the accept budget with connections possibly left.
    backlog: bool,
    /// At the listener's own max-conns: look again then, or when one of
    /// its relays closes here.
    full_until: Option<Instant>,
}

pub(crate) struct Worker {
    index: usize,
    poll: Poll,
    listeners: Vec<ListenerSlot>,
    relays: Slab<Relay>,
    timers: Timers,
    /// Relays that ran out of budget with work left.
    ready: Vec<RelayRef>,
    pools: Pools,
    config: Arc<Config>,
    shared: Arc<Shared>,
    commands: Receiver<Command>,
    link: WorkerLink,
    counters: Block,
    accept_paused_until: Option<Instant>,
    accept_warnings: WarnLimit,
    connect_warnings: WarnLimit,
    refusal_warnings: WarnLimit,
    /// Per listener: clients closed because no server took relays.
    no_server_warnings: std::collections::HashMap<crate::listener::ListenerId, WarnLimit>,
    /// Per listener: clients held because no server took relays.
    held_warnings: std::collections::HashMap<crate::listener::ListenerId, WarnLimit>,
    drain_deadline: Option<Instant>,
    draining: bool,
    /// Listeners a reload removed whose relays close at the deadline.
    retiring: Vec<(crate::listener::ListenerId, Instant)>,
    /// Most relays in all workers together; past it, clients wait in the
    /// backlog (see `runtime::fd_budget`).
    relay_cap: usize,
    /// Active health probes this worker runs.
    checks: health::Checks,
    /// Clients read before their relay starts, and cancel requests.
    prefaces: preface::Prefaces,
    /// Refused PostgreSQL clients being told why.
    farewells: farewell::Farewells,
    /// Clients held until a server of their pool takes them.
    parking: park::Parking,
    /// Rung by the fleet when a pool gains a server while clients are held.
    doorbell: Arc<Doorbell>,
    /// Relays a live upgrade froze and has not given back: the worker
    /// does not exit while they are out.
    frozen_out: usize,
    /// The uring loop's ring (`None`: the epoll loop).
    ring: Option<crate::sys::uring::Ring>,
    /// Relays whose drains left bytes for the next batched send.
    sending: Vec<RelayRef>,
    /// The vectors the uring loop's batches are built in.
    batch_room: batch::BatchRoom,
    /// The ring's answered receives, taken each turn (kept for its room).
    received: Vec<crate::sys::uring::Received>,
    /// A live upgrade is settling the receives of the relays it takes.
    settling: bool,
    /// A receive was ever armed on the ring: the worker waits in it.
    ring_waits: bool,
}

impl Worker {
    pub(crate) fn new(
        index: usize,
        config: Arc<Config>,
        listeners: Vec<(TcpListener, Arc<Listener>)>,
        shared: Arc<Shared>,
        counters: Block,
        relay_cap: usize,
        ring: Option<crate::sys::uring::Ring>,
    ) -> io::Result<Worker> {
        let poll = Poll::new()?;
        let ring = ring.map(|mut ring| {
            ring.watch_epoll(std::os::fd::AsRawFd::as_raw_fd(&poll));
            ring
        });
        let waker = Arc::new(Waker::new(poll.registry(), token::waker())?);
        let (link, commands) = control::channel(Arc::clone(&waker));
        let doorbell = Doorbell::new(waker);
        shared.fleet.add_doorbell(&doorbell);
        let mut slots = Vec::with_capacity(listeners.len());
        for (i, (mut socket, runtime)) in listeners.into_iter().enumerate() {
            // TCP_NODELAY was set where the socket was bound (bind.rs).
            poll.registry()
                .register(&mut socket, token::listener(i), Interest::READABLE)?;
            slots.push(ListenerSlot {
                addr: socket.local_addr().ok(),
                socket: Some(socket),
                runtime,
                backlog: false,
                full_until: None,
            });
        }
        Ok(Worker {
            index,
            poll,
            listeners: slots,
            relays: Slab::new(),
            timers: Timers::default(),
            ready: Vec::new(),
            pools: Pools::new(
                &config,
                index,
                counters.clone(),
                Arc::clone(&shared.pipe_fds),
            ),
            config,
            shared,
            commands,
            link,
            counters,
            accept_paused_until: None,
            accept_warnings: WarnLimit::default(),
            connect_warnings: WarnLimit::default(),
            no_server_warnings: std::collections::HashMap::new(),
            held_warnings: std::collections::HashMap::new(),
            refusal_warnings: WarnLimit::default(),
            drain_deadline: None,
            draining: false,
            retiring: Vec::new(),
            relay_cap,
            checks: health::Checks::default(),
            prefaces: preface::Prefaces::default(),
            farewells: farewell::Farewells::default(),
            parking: park::Parking::default(),
            doorbell,
            frozen_out: 0,
            ring,
            sending: Vec::new(),
            batch_room: batch::BatchRoom::default(),
            received: Vec::new(),
            settling: false,
            ring_waits: false,
        })
    }

    /// The sending end of this worker's command channel.
    pub(crate) fn link(&self) -> WorkerLink {
        self.link.clone()
    }

    /// Runs until aborted, or until draining has closed every relay.
    pub(crate) fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        loop {
            let now = Instant::now();
            if let Err(e) = self.wait(&mut events, self.poll_timeout(now)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(worker = self.index, error = %e, "internal: epoll_wait failed; closing this worker's relays");
                self.close_all(Instant::now());
                return;
            }
            let now = Instant::now();
            for event in events.iter() {
                match token::decode(event.token()) {
                    Owner::Waker => {}
                    Owner::Listener(index) if index < self.listeners.len() => {
                        self.accept(index, now)
                    }
                    Owner::Listener(_) => {}
                    Owner::Relay(relay, side) => self.on_socket_event(relay, side, event, now),
                    Owner::Probe(key) => self.on_probe_event(key, now),
                    Owner::Preface(key) => self.on_preface_event(key, now),
                    Owner::Farewell(key) => self.on_farewell_event(key, now),
                    Owner::Held(key) => self.on_held_event(key, event, now),
                }
            }
            self.take_received();
            self.read_ahead(now);
            self.run_ready(now);
            self.resume_accepting(now);
            self.pools.trim(now);
            self.expire(now);
            self.expire_prefaces(now);
            self.expire_farewells(now);
            self.run_checks(now);
            self.reset_down_relays(now);
            self.resume_held(now);
            self.expire_held(now);
            self.flush_sends(now);
            self.counters
                .timer_entries
                .store(self.timers.len() as u64, Ordering::Relaxed);
            if self.check_control(now) {
                return;
            }
        }
    }

    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.ready.is_empty()
            || !self.sending.is_empty()
            || self.listeners.iter().any(|l| l.backlog)
        {
            return Some(Duration::ZERO);
        }
        [
            self.timers.next(),
            self.accept_paused_until,
            self.drain_deadline,
            self.checks.next(),
            self.prefaces.next(),
            self.farewells.next(),
            self.parking.next(),
            self.pools.trim_due(),
        ]
        .into_iter()
        .chain(self.listeners.iter().map(|l| l.full_until))
        .chain(self.retiring.iter().map(|&(_, at)| Some(at)))
        .flatten()
        .min()
        .map(|at| at.saturating_duration_since(now))
    }

    /// Takes a pair handed over from outside the accept loop: it joins the
    /// worker exactly as an accepted client whose upstream connected.
    fn take_handoff(&mut self, handoff: &mut Handoff, now: Instant) {
        let Some(pair) = handoff.take() else {
            return;
        };
        let counters = pair.listener.counters(self.index);
        CounterBlock::add(&counters.relays_accepted, 1);
        match Relay::handed_off(pair, &mut self.pools, now) {
            Ok(relay) => {
                if let Some(key) = self.admit(relay, now) {
                    let relay = &mut self.relays[key];
                    // Read-ahead bytes wait in the buffers: pump once.
                    if relay.queue() {
                        self.ready.push(RelayRef {
                            key,
                            id: relay.id(),
                        });
                    }
                }
            }
            Err(refused) => {
                let (pair, e) = *refused;
                let e = RelayError::new(Side::Internal, Op::Register, e);
                tracing::warn!(relay = pair.id, error = %e, "handoff refused");
                pair.listener
                    .counters(self.index)
                    .closed(CloseReason::Internal);
                // Dropping the pair closes both sockets; the waiter learns why.
                let report = relay::report::RelayReport {
                    bytes_c2u: 0,
                    bytes_u2c: 0,
                    duration: Duration::ZERO,
                    engine_c2u: "none",
                    engine_u2c: "none",
                    reason: CloseReason::Internal,
                    error: Some(Arc::new(e)),
                };
                pair.client.reset_on_close();
                pair.upstream.reset_on_close();
                pair.reporter.finish(report);
            }
        }
    }

    /// Places a relay in the slab and registers both sockets: the one path
    /// every relay takes, accepted or handed over. `None` if it closed at
    /// once because a socket could not be registered.
    fn admit(&mut self, relay: Relay, now: Instant) -> Option<usize> {
        match self.place(relay, now) {
            Ok(key) => Some(key),
            Err(refused) => {
                let (relay, e) = *refused;
                // Counted in, then closed as every relay is.
                let key = self.count_in(relay);
                self.close(key, CloseReason::Internal, Some(&e), now);
                None
            }
        }
    }

    /// Registers both sockets under the slot the relay is to take, then
    /// places it there. A relay a socket of which cannot be registered
    /// comes back, registered nowhere.
    fn place(&mut self, mut relay: Relay, now: Instant) -> Result<usize, Box<(Relay, RelayError)>> {
        let this = RelayRef {
            key: self.relays.vacant_entry().key(),
            id: relay.id(),
        };
        let interest = self.relay_interest(&relay);
        let registry = self.poll.registry();
        let (client, upstream) = relay.sockets_mut();
        let registered = registry
            .register(client, token::relay(this, Peer::Client), interest)
            .and_then(|()| {
                registry
                    .register(upstream, token::relay(this, Peer::Upstream), interest)
                    .inspect_err(|_| {
                        let _ = registry.deregister(client);
                    })
            });
        if let Err(e) = registered {
            return Err(Box::new((
                relay,
                RelayError::new(Side::Internal, Op::Register, e),
            )));
        }
        relay.progress_from(
            self.config
                .ops
                .log_interval
                .and_then(|i| now.checked_add(i)),
        );
        let key = self.count_in(relay);
        self.arm(key);
        Ok(key)
    }

    /// Puts a relay in the slab and counts it live.
    fn count_in(&mut self, relay: Relay) -> usize {
        CounterBlock::add(&relay.listener().counters(self.index).relays_active, 1);
        let key = self.relays.insert(relay);
        self.relays[key].placed(key);
        self.shared.relays_live.fetch_add(1, Ordering::Relaxed);
        key
    }

    /// Resets both sides of a handed-off relay at its owner's request.
    fn abort_relay(&mut self, id: u64, reporter: &Reporter, now: Instant) {
        let key = reporter.key();
        if self.relays.get(key).is_some_and(|r| r.id() == id) {
            self.close(key, CloseReason::Aborted, None, now);
        }
    }

    // Readiness

    fn on_socket_event(
        &mut self,
        this: RelayRef,
        peer: Peer,
        event: &mio::event::Event,
        now: Instant,
    ) {
        let key = this.key;
        let Some(relay) = self.relays.get_mut(key) else {
            return;
        };
        if !this.is(relay.id()) {
            // Meant for a relay that closed earlier in this batch.
            return;
        }
        let connecting = relay.is_connecting();
        // While connecting, the upstream's errors are the connect's outcome,
        // read below; the client's end the relay at once.
        if event.is_error() && !(connecting && peer == Peer::Upstream) {
            if let Some(e) = relay.socket_error(peer) {
                self.close(key, failure_reason(e.side), Some(&e), now);
                return;
            }
        }
        // HUP and RDHUP are hints: the read that follows tells EOF or error.
        let readable = event.is_readable() || event.is_read_closed() || event.is_error();
        let writable = event.is_writable() || event.is_write_closed() || event.is_error();
        if connecting && peer == Peer::Upstream {
            let hung_up = event.is_read_closed() || event.is_error();
            let urgent = event.is_priority();
            self.on_connect_event(key, event.is_writable(), (hung_up, urgent), now);
            return;
        }
        let readiness = Readiness {
            readable,
            writable,
            hung_up: event.is_read_closed() || event.is_error(),
            urgent: event.is_priority(),
        };
        relay.ready(peer, readiness);
        if self.ring.is_some() {
            // Pumped after the turn's batched read (`read_ahead`).
            if relay.queue() {
                self.ready.push(this);
            }
        } else {
            self.run_relay(key, now);
        }
    }

    fn run_ready(&mut self, now: Instant) {
        let ready = std::mem::take(&mut self.ready);
        for this in ready {
            match self.relays.get_mut(this.key) {
                Some(relay) if relay.id() == this.id => {
                    relay.dequeue();
                    self.run_relay(this.key, now);
                }
                // Closed since it was queued; the slot may hold a new relay.
                _ => {}
            }
        }
    }

    fn run_relay(&mut self, key: usize, now: Instant) {
        let relay = &mut self.relays[key];
        let batched = self.ring.is_some();
        let newly_half_closed = match relay.pump(now, &mut self.pools, batched) {
            Ok((next, newly_half_closed)) => {
                match next {
                    Next::Wait => {}
                    Next::Again => {
                        if relay.queue() {
                            self.ready.push(RelayRef {
                                key,
                                id: relay.id(),
                            });
                        }
                    }
                    Next::Finished => {
                        self.close(key, CloseReason::Eof, None, now);
                        return;
                    }
                }
                if batched && relay.wants_send() {
                    self.sending.push(RelayRef {
                        key,
                        id: relay.id(),
                    });
                }
                self.arm_reads(key);
                newly_half_closed
            }
            Err(e) => {
                self.close(key, failure_reason(e.side), Some(&e), now);
                return;
            }
        };
        if newly_half_closed {
            // The FIN timeout may be earlier than the armed idle deadline.
            self.arm(key);
        }
    }
}

fn out_of_fds(e: &io::Error) -> bool {
    crate::error::is_local_error(e)
}

#[cfg(test)]
mod tests {
    use std::net::{TcpListener, TcpStream};

    /// The worker sets TCP_NODELAY once on each listening socket instead of
    /// on every accepted one; that relies on accepted sockets inheriting it.
    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&l).set_nodelay(true).unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, _) = l.accept().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
