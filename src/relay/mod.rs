//! A relay: one client, one upstream, and the pure [`RelayCore`] between
//! them.
//!
//! The relay owns both sockets and the two directions' buffer slots; every
//! decision (readiness routing, timing, when it is finished, who gets a
//! reset at close) is the core's, which takes `now` and knows no socket.
//! Every transfer costs one timestamp store (`last_active`); the worker's
//! timer re-arms lazily when a deadline fires early.
//!
//! Its fields are its own: the worker moves a relay on through the named
//! steps in `session` (the connect, the timer entry, the ready list, the
//! close's counts) and the sockets' ones here (`ready`, `pump`, `close`).

mod batch;
pub(crate) mod close;
pub(crate) mod core;
pub(crate) mod direction;
#[cfg(feature = "service")]
pub(crate) mod image;
#[cfg(test)]
mod props;
pub(crate) mod report;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;

pub(crate) use self::close::{expiry_reason, failure_reason};
#[cfg(any(test, fuzzing))]
pub(crate) use self::close::{ClosePlan, SocketEnd};
#[cfg(any(test, fuzzing))]
pub(crate) use self::core::{Activity, Expiry, PUMP_BUDGET};
pub(crate) use self::core::{Next, PairIo, Peer, RelayCore};
#[cfg(any(test, fuzzing))]
pub(crate) use direction::{DirState, Direction};

use crate::config::Timeouts;
use crate::engine::{Engine, Pools, Slot, Stream, Wire};
use crate::error::{Op, RelayError};
use crate::listener::{Admission, Listener};
use crate::stats::{CloseReason, CounterBlock, ServerBlock};
use crate::sys::shared::Placed;
use crate::upstream::{Pool, Round};
use report::{ClosedLine, RelayReport, Reporter, Traffic};
use session::Session;

/// The target of every relay's lines (`spliced::relay`), whichever module
/// logs them.
const LOG_TARGET: &str = module_path!();

/// A relay's sockets, slots and the worker's pools, as [`PairIo`].
struct RelayIo<'r> {
    client: &'r Stream,
    upstream: &'r Stream,
    c2u_slot: &'r mut Slot,
    u2c_slot: &'r mut Slot,
    pools: &'r mut Pools,
    counters: &'r CounterBlock,
    server: Option<&'r ServerBlock>,
    batched: bool,
}

impl PairIo for RelayIo<'_> {
    type Io<'a>
        = Wire<'a>
    where
        Self: 'a;

    fn io(&mut self, from: Peer) -> Wire<'_> {
        match from {
            Peer::Client => Wire {
                slot: self.c2u_slot,
                src: self.client,
                dst: self.upstream,
                pools: self.pools,
                counters: self.counters,
                to_client: false,
                server: self.server,
                batched: self.batched,
            },
            Peer::Upstream => Wire {
                slot: self.u2c_slot,
                src: self.upstream,
                dst: self.client,
                pools: self.pools,
                counters: self.counters,
                to_client: true,
                server: self.server,
                batched: self.batched,
            },
        }
    }
}

pub(crate) struct Relay {
    id: u64,
    /// Who the pair is for and how it got its server: listener, pool,
    /// route, the connect round, admission.
    session: Session,
    client: Stream,
    upstream: Stream,
    /// When the next progress line is due (`--log-interval`); the relay's
    /// one timer entry covers it, so progress costs no timer of its own.
    progress_at: Option<Instant>,
    /// The counters of the server it connected to, as this worker writes
    /// them; set once connected (its lease in the round keeps the slot).
    server: Option<Placed<ServerBlock>>,
    core: RelayCore,
    /// The deadline this relay currently has an entry for in the timer heap.
    armed_at: Option<Instant>,
    /// On the worker's ready list (ran out of budget with work left).
    queued: bool,
    /// How many of the bytes read ahead are the `send-proxy` header (the
    /// rest are the client's own).
    ahead_header: u16,
    c2u_slot: Slot,
    u2c_slot: Slot,
}

/// What one epoll event said about a socket.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Readiness {
    pub(crate) readable: bool,
    pub(crate) writable: bool,
    pub(crate) hung_up: bool,
    pub(crate) urgent: bool,
}

/// A connected pair handed to the runtime, with the bytes already read
/// from each side (delivered to the other side before anything else).
pub(crate) struct HandedOff {
    pub(crate) id: u64,
    pub(crate) listener: Arc<Listener>,
    pub(crate) client: Stream,
    pub(crate) upstream: Stream,
    pub(crate) client_preread: Vec<u8>,
    pub(crate) upstream_preread: Vec<u8>,
    pub(crate) reporter: Arc<Reporter>,
    pub(crate) admission: Admission,
}

/// What a relay whose every connect failed was made of, taken back so its
/// client can wait for a server again.
pub(crate) struct Unstarted {
    pub(crate) accepted: Accepted,
    /// The bytes meant for the server before the client's own: the
    /// `send-proxy` header (`ahead_header` bytes), then what the client
    /// sent before the relay started.
    pub(crate) ahead: Vec<u8>,
    pub(crate) ahead_header: u16,
    /// When the client was accepted.
    pub(crate) since: Instant,
    /// What spliced negotiates with the server before the client's bytes
    /// (a TLS client's); such a client is never held.
    pub(crate) negotiation: Option<Box<crate::worker::Negotiation>>,
}

/// Which route took a client, for its relay's log lines.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RouteTag {
    /// The route's position in its listener's table, from 1.
    pub(crate) position: usize,
    /// The server name its TLS hello asked for.
    pub(crate) server_name: Option<Box<str>>,
}

/// The accepted client of a new relay.
pub(crate) struct Accepted {
    pub(crate) id: u64,
    pub(crate) listener: Arc<Listener>,
    /// The pool it goes to (its listener's own, or its route's).
    pub(crate) pool: Arc<Pool>,
    pub(crate) route: Option<Box<RouteTag>>,
    pub(crate) client: TcpStream,
    pub(crate) client_addr: SocketAddr,
    pub(crate) admission: Admission,
}

impl Relay {
    /// A relay whose first upstream connect (`upstream`, to `upstream_addr`,
    /// attempt one of `round`) has just started.
    pub(crate) fn new(
        accepted: Accepted,
        upstream: (TcpStream, SocketAddr),
        round: Round,
        now: Instant,
    ) -> Relay {
        let Accepted {
            id,
            listener,
            pool,
            route,
            client,
            client_addr,
            admission,
        } = accepted;
        let mode = listener.config.mode;
        Relay {
            id,
            session: Session {
                listener,
                pool,
                route,
                negotiation: None,
                upstream_addr: Some(upstream.1),
                client_addr: Some(client_addr),
                round,
                admission,
                reporter: None,
                first_bytes: Box::default(),
            },
            client: Stream::Tcp(client),
            upstream: Stream::Tcp(upstream.0),
            progress_at: None,
            server: None,
            core: RelayCore::new(now),
            armed_at: None,
            queued: false,
            ahead_header: 0,
            c2u_slot: Slot::new(mode),
            u2c_slot: Slot::new(mode),
        }
    }

    /// A relay of a pair that is connected already. The bytes read ahead
    /// from each side wait in a copy buffer of their direction, so they
    /// reach the other side first. Fails (giving nothing away) only when
    /// no buffer can be had for them, or they do not fit one.
    pub(crate) fn handed_off(
        pair: HandedOff,
        pools: &mut Pools,
        now: Instant,
    ) -> Result<Relay, Box<(HandedOff, std::io::Error)>> {
        let mode = pair.listener.config.mode;
        let counters = pair.listener.counters(pools.worker);
        let c2u_slot = match Slot::preloaded(mode, &pair.client_preread, pools, counters) {
            Ok(slot) => slot,
            Err(e) => return Err(Box::new((pair, e))),
        };
        let u2c_slot = match Slot::preloaded(mode, &pair.upstream_preread, pools, counters) {
            Ok(slot) => slot,
            Err(e) => {
                let mut c2u_slot = c2u_slot;
                c2u_slot.discard(pools, 0);
                return Err(Box::new((pair, e)));
            }
        };
        let mut core = RelayCore::new(now);
        core.connected(now, false);
        core.preload(Peer::Client, pair.client_preread.len());
        core.preload(Peer::Upstream, pair.upstream_preread.len());
        // A handoff listener has its own pool and no routes; the pair
        // never connects, so its round has nothing to try.
        let pool = Arc::clone(&pair.listener.pools[0]);
        let round = Round::empty();
        Ok(Relay {
            id: pair.id,
            session: Session {
                listener: pair.listener,
                pool,
                route: None,
                negotiation: None,
                upstream_addr: None,
                client_addr: None,
                round,
                admission: pair.admission,
                reporter: Some(pair.reporter),
                first_bytes: Box::default(),
            },
            client: pair.client,
            upstream: pair.upstream,
            progress_at: None,
            server: None,
            core,
            armed_at: None,
            queued: false,
            ahead_header: 0,
            c2u_slot,
            u2c_slot,
        })
    }

    /// Bytes that go to the upstream before anything read from the client
    /// (a PROXY header, what the client sent before the connect). They
    /// wait in a copy buffer of the client→upstream direction.
    pub(crate) fn read_ahead(&mut self, bytes: &[u8], pools: &mut Pools) -> std::io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let counters = self.session.listener.counters(pools.worker);
        let slot = Slot::preloaded(self.session.listener.config.mode, bytes, pools, counters)?;
        self.c2u_slot = slot;
        self.core.preload(Peer::Client, bytes.len());
        Ok(())
    }

    /// Keeps what the client sent before the connect (see `first_bytes`).
    pub(crate) fn keep_first_bytes(&mut self, bytes: Vec<u8>) {
        self.session.first_bytes = bytes.into_boxed_slice();
    }

    /// An upstream connected: the client's first bytes are the server's
    /// to answer now.
    pub(crate) fn forget_first_bytes(&mut self) {
        self.session.first_bytes = Box::default();
    }

    /// Takes an accepted relay that never connected apart: its client, its
    /// admission and the bytes read ahead (all still buffered: nothing
    /// moves before the connect). The upstream socket closes. `None` for
    /// a relay that is not such (a handed-off pair).
    pub(crate) fn into_unstarted(mut self, pools: &mut Pools) -> Option<Unstarted> {
        let (Stream::Tcp(client), Some(client_addr)) = (self.client, self.session.client_addr)
        else {
            return None;
        };
        if !self.core.is_connecting() {
            return None;
        }
        let ahead = self.c2u_slot.take_preloaded(pools);
        self.u2c_slot.discard(pools, 0);
        Some(Unstarted {
            accepted: Accepted {
                id: self.id,
                listener: self.session.listener,
                pool: self.session.pool,
                route: self.session.route,
                client,
                client_addr,
                admission: self.session.admission,
            },
            ahead,
            ahead_header: self.ahead_header,
            since: self.core.activity().started,
            negotiation: self.session.negotiation,
        })
    }

    /// The worker keeps this relay at slab `key`.
    pub(crate) fn placed(&self, key: usize) {
        if let Some(reporter) = &self.session.reporter {
            reporter.place(key);
        }
    }

    pub(crate) fn timeouts(&self) -> &Timeouts {
        &self.session.listener.config.timeouts
    }

    /// The relay's next deadline: the core's (connect, idle, FIN), or the
    /// next progress line if that comes first.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        let core = self.core.deadline(self.timeouts()).map(|(at, _)| at);
        match (core, self.progress_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Logs a progress line if one is due at `now` and schedules the next,
    /// `interval` later.
    pub(crate) fn log_progress(&mut self, now: Instant, interval: Duration) {
        if self.progress_at.is_none_or(|at| at > now) {
            return;
        }
        self.progress_at = now.checked_add(interval);
        let (c2u, u2c) = (
            self.core.direction(Peer::Client),
            self.core.direction(Peer::Upstream),
        );
        let duration_ms = now
            .saturating_duration_since(self.core.activity().started)
            .as_millis() as u64;
        tracing::info!(
            relay = self.id,
            client = self.session.client_addr.map(tracing::field::display),
            listener = %self.session.listener.label(),
            upstream = self.session.upstream_addr.map(tracing::field::display),
            bytes_c2u = c2u.bytes_out(),
            bytes_u2c = u2c.bytes_out(),
            duration_ms,
            engine_c2u = %self.engine_label(Peer::Client),
            engine_u2c = %self.engine_label(Peer::Upstream),
            "relay progress"
        );
    }

    /// A new connect attempt replaced the upstream socket.
    pub(crate) fn retry_upstream(&mut self, upstream: TcpStream, addr: SocketAddr, now: Instant) {
        self.upstream = Stream::Tcp(upstream);
        self.session.upstream_addr = Some(addr);
        self.core.connecting(now);
    }

    /// Records readiness reported for one socket. `urgent` is EPOLLPRI:
    /// out-of-band data arrived, which splice cannot step over, so the
    /// direction it feeds is told (and must look again). `hung_up` is
    /// RDHUP/HUP: the peer's FIN may wait behind its data.
    pub(crate) fn ready(&mut self, peer: Peer, readiness: Readiness) {
        if readiness.urgent {
            match peer {
                Peer::Client => self.c2u_slot.urgent_data(),
                Peer::Upstream => self.u2c_slot.urgent_data(),
            }
        }
        self.core.ready(
            peer,
            readiness.readable || readiness.urgent,
            readiness.writable,
            readiness.hung_up,
        );
    }

    /// The socket error epoll hinted at, if the socket really has one.
    pub(crate) fn socket_error(&self, peer: Peer) -> Option<RelayError> {
        let socket = match peer {
            Peer::Client => &self.client,
            Peer::Upstream => &self.upstream,
        };
        match socket.take_error() {
            Ok(Some(e)) | Err(e) => Some(RelayError::new(peer.into(), Op::Read, e)),
            Ok(None) => None,
        }
    }

    /// Pumps both directions within the budget. Returns what is left to do
    /// and whether the relay became half-closed (its deadline may be
    /// earlier now). `batched` (the uring loop): copy buffers' bytes wait
    /// for the worker's next batched send.
    pub(crate) fn pump(
        &mut self,
        now: Instant,
        pools: &mut Pools,
        batched: bool,
    ) -> Result<(Next, bool), RelayError> {
        let mut io = RelayIo {
            client: &self.client,
            upstream: &self.upstream,
            c2u_slot: &mut self.c2u_slot,
            u2c_slot: &mut self.u2c_slot,
            counters: self.session.listener.counters(pools.worker),
            server: self.server.as_deref(),
            pools,
            batched,
        };
        let pumped = self.core.pump(&mut io, now)?;
        if pumped.pair.state_changed {
            tracing::trace!(
                relay = self.id,
                c2u = ?self.core.direction(Peer::Client).state(),
                u2c = ?self.core.direction(Peer::Upstream).state(),
                "half-close"
            );
        }
        Ok((pumped.pair.next, pumped.newly_half_closed))
    }

    /// Closes both sockets, giving buffers back, and logs the one line per
    /// relay. Which side gets a reset instead of a FIN is the core's call.
    pub(crate) fn close(
        mut self,
        reason: CloseReason,
        error: Option<&RelayError>,
        now: Instant,
        pools: &mut Pools,
    ) {
        self.finish(reason, error, now, pools);
    }

    /// Closes the relay as [`Relay::close`] does, but hands back its TCP
    /// client (still registered with the worker's poll), with the client's
    /// address and what it sent before the connect, so the client can be
    /// told why. `None` for a handed-off pair.
    pub(crate) fn close_keeping_client(
        mut self,
        reason: CloseReason,
        error: Option<&RelayError>,
        now: Instant,
        pools: &mut Pools,
    ) -> Option<(TcpStream, SocketAddr, Vec<u8>)> {
        let plan = self.finish(reason, error, now, pools);
        if plan.client.is_reset() {
            // The client is owed a reset, not a word.
            return None;
        }
        match (self.client.into_tcp(), self.session.client_addr) {
            (Some(client), Some(addr)) => Some((client, addr, self.session.first_bytes.into_vec())),
            _ => None,
        }
    }

    /// Everything of a close but dropping the sockets (a socket not reset
    /// sends its FIN, if it has not yet, when it is dropped); returns the
    /// core's plan it carried out.
    fn finish(
        &mut self,
        reason: CloseReason,
        error: Option<&RelayError>,
        now: Instant,
        pools: &mut Pools,
    ) -> close::ClosePlan {
        let plan = self.core.close_plan(reason);
        if plan.client.is_reset() {
            self.client.reset_on_close();
        }
        if plan.upstream.is_reset() {
            self.upstream.reset_on_close();
        }
        self.c2u_slot.discard(pools, plan.pending_c2u);
        self.u2c_slot.discard(pools, plan.pending_u2c);
        let (c2u, u2c) = (
            self.core.direction(Peer::Client),
            self.core.direction(Peer::Upstream),
        );
        let duration = now.saturating_duration_since(self.core.activity().started);
        let duration_ms = duration.as_millis() as u64;
        if let Some(reporter) = &self.session.reporter {
            reporter.finish(RelayReport {
                bytes_c2u: c2u.bytes_out(),
                bytes_u2c: u2c.bytes_out(),
                duration,
                engine_c2u: self.engine_label(Peer::Client),
                engine_u2c: self.engine_label(Peer::Upstream),
                reason,
                error: error.map(|e| Arc::new(e.duplicate())),
            });
        }
        ClosedLine {
            relay: self.id,
            client: self.session.client_addr,
            listener: self.session.listener.label(),
            upstream: self.session.upstream_addr,
            traffic: Some(Traffic {
                bytes_c2u: c2u.bytes_out(),
                bytes_u2c: u2c.bytes_out(),
                duration_ms,
                engine_c2u: self.engine_label(Peer::Client),
                engine_u2c: self.engine_label(Peer::Upstream),
            }),
            route: self.session.route.as_deref(),
            reason,
            error,
        }
        .log();
        plan
    }

    /// The engine a direction ended with (`splice`, `copy`, or `copy` after a
    /// fallback from splice).
    fn engine_label(&self, from: Peer) -> &'static str {
        let slot = match from {
            Peer::Client => &self.c2u_slot,
            Peer::Upstream => &self.u2c_slot,
        };
        match slot.engine() {
            Engine::Copy if slot.fell_back() => "copy-fallback",
            engine => engine.as_str(),
        }
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// A relay's slot in its worker's slab is most of what an idle relay
    /// costs in memory: it must not grow unnoticed. The connect-time state
    /// (the round's tried servers) lives outside it, freed once connected.
    #[test]
    fn a_relay_fits_its_budget() {
        let size = std::mem::size_of::<Relay>();
        eprintln!("size_of::<Relay>() = {size}");
        assert!(
            size <= 472,
            "a Relay is {size} bytes, past its budget of 472"
        );
        assert!(std::mem::size_of::<Round>() <= 24);
    }
}
