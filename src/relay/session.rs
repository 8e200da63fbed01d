//! The session around a relay's pair ([`Session`]: listener, pool, route,
//! round of connects, negotiation, admission), and what the worker asks of
//! a relay, by name: who it is, its session as the connect moves on, and
//! its place in the worker's timer heap and ready list. The fields stay
//! private to `relay`; the worker sees only these steps.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use super::core::Expiry;
use super::report::Reporter;
use super::{Relay, RouteTag};
use crate::config::Protocol;
use crate::engine::Stream;
use crate::listener::{Admission, Listener, ListenerId};
use crate::stats::{CloseReason, CounterBlock};
use crate::upstream::{Pool, Round};
use crate::worker::Negotiation;

/// The session around a relay's pair: what it is for (listener, pool,
/// route) and how it got its server (the round of connects, a TLS
/// negotiation), its room under the listener's limits, and what a close
/// owes outside the pair (the client's address and first bytes for a
/// refusal spoken in its protocol, a waiting handoff). The pair itself
/// (sockets, slots, core) is the relay's.
pub(super) struct Session {
    pub(super) listener: Arc<Listener>,
    /// The pool it connects through: its listener's own, or its route's.
    pub(super) pool: Arc<Pool>,
    /// The route that took its client, if its listener has routes.
    pub(super) route: Option<Box<RouteTag>>,
    /// What must pass between spliced and the server before bytes flow
    /// (a TLS client's SSLRequest, a direct hello): while it is `Some`,
    /// the relay counts as connecting.
    pub(super) negotiation: Option<Box<Negotiation>>,
    /// The server connected to; `None` for a handed-off pair.
    pub(super) upstream_addr: Option<SocketAddr>,
    /// The client's address as accepted; `None` for a handed-off pair.
    pub(super) client_addr: Option<SocketAddr>,
    /// This relay's connect attempts over the pool; once it is connected
    /// for good, only the lease of its server (`Round::settle`).
    pub(super) round: Round,
    /// Its room under the listener's limits, given back when it closes.
    pub(super) admission: Admission,
    /// Someone waits for this relay's end (a handed-off pair).
    pub(super) reporter: Option<Arc<Reporter>>,
    /// What the client sent before the connect, kept until an upstream
    /// connects for a `protocol = "postgres"` listener, so a client no
    /// server takes can still be answered as a server would (empty, not
    /// allocated, otherwise).
    pub(super) first_bytes: Box<[u8]>,
}

impl Relay {
    // Who it is

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn listener(&self) -> &Arc<Listener> {
        &self.session.listener
    }

    pub(crate) fn listener_id(&self) -> ListenerId {
        self.session.listener.id
    }

    /// The pool it connects through: its listener's own, or its route's.
    pub(crate) fn pool(&self) -> &Arc<Pool> {
        &self.session.pool
    }

    /// Its connect attempts; once connected, the lease of its server.
    pub(crate) fn round(&self) -> &Round {
        &self.session.round
    }

    /// The server it connects to; `None` for a handed-off pair.
    pub(crate) fn upstream_addr(&self) -> Option<SocketAddr> {
        self.session.upstream_addr
    }

    /// When its client was accepted.
    pub(crate) fn started(&self) -> Instant {
        self.core.activity().started
    }

    pub(crate) fn is_connecting(&self) -> bool {
        self.core.is_connecting()
    }

    // Joining the worker

    /// A relay launched for a client that was accepted at `since`, with
    /// `ahead_header` bytes of `send-proxy` header before the client's own
    /// and what spliced negotiates with the server first.
    pub(crate) fn resume(
        &mut self,
        since: Instant,
        ahead_header: u16,
        negotiation: Option<Box<Negotiation>>,
    ) {
        self.core.accepted_at(since);
        self.ahead_header = ahead_header;
        self.session.negotiation = negotiation;
    }

    /// Both sockets, for registering with the worker's poll.
    pub(crate) fn sockets_mut(&mut self) -> (&mut Stream, &mut Stream) {
        (&mut self.client, &mut self.upstream)
    }

    /// The first progress line is due at `at` (`None`: no progress lines).
    pub(crate) fn progress_from(&mut self, at: Option<Instant>) {
        self.progress_at = at;
    }

    // The connect

    /// spliced negotiates with the server before the client's bytes (a TLS
    /// client): while so, the relay counts as connecting.
    pub(crate) fn is_negotiating(&self) -> bool {
        self.session.negotiation.is_some()
    }

    /// The negotiation has begun: the upstream's events are its answer.
    pub(crate) fn negotiation_started(&self) -> bool {
        self.session
            .negotiation
            .as_ref()
            .is_some_and(|n| n.started())
    }

    /// The upstream connected: the negotiation begins.
    pub(crate) fn begin_negotiation(&mut self) {
        if let Some(n) = self.session.negotiation.as_mut() {
            n.begin();
        }
    }

    /// The negotiation and the upstream socket it speaks over (TCP only).
    pub(crate) fn negotiation_io(&mut self) -> Option<(&mut Negotiation, &TcpStream)> {
        let n = self.session.negotiation.as_deref_mut()?;
        let stream = self.upstream.as_tcp()?;
        Some((n, stream))
    }

    /// A connect attempt failed: the next one negotiates from the start.
    pub(crate) fn restart_negotiation(&mut self) {
        if let Some(n) = self.session.negotiation.as_mut() {
            n.restart();
        }
    }

    /// The upstream socket, while it is TCP (a handed-off pair's may not be).
    pub(crate) fn upstream_tcp(&self) -> Option<&TcpStream> {
        self.upstream.as_tcp()
    }

    /// The round of connects, taken out while the worker tries the next
    /// server (an empty round stays in its place until [`Relay::put_round`]).
    pub(crate) fn take_round(&mut self) -> Round {
        std::mem::replace(&mut self.session.round, Round::empty())
    }

    pub(crate) fn put_round(&mut self, round: Round) {
        self.session.round = round;
    }

    /// The server accepted the connect: the round counts it a success and
    /// the relay writes that server's counters (of worker `worker`) from
    /// now on.
    pub(crate) fn server_took(&mut self, now: Instant, worker: usize) {
        self.session.round.succeeded(&self.session.pool, now);
        self.server = self.session.round.server().map(|s| s.block(worker).clone());
    }

    /// The upstream connected and is alive: the client's first bytes are
    /// the server's to answer now, the connect's time is counted, and the
    /// socket sends without delay.
    pub(crate) fn upstream_established(&mut self, now: Instant, worker: usize) {
        self.forget_first_bytes();
        self.server_took(now, worker);
        if let Some(since) = self.core.activity().connecting_since {
            let took = now.saturating_duration_since(since);
            self.session.listener.counters(worker).connected(took);
            if let Some(server) = &self.server {
                server.connected(took);
            }
        }
        self.upstream.set_nodelay();
    }

    /// No other server will be tried: the round keeps its lease only, and
    /// the relay is connected (`hung_up`: the server's FIN came with the
    /// connect, unannounced to the relay).
    pub(crate) fn settle(&mut self, now: Instant, hung_up: bool) {
        self.session.round.settle();
        self.core.connected(now, hung_up);
    }

    /// The server accepted the connect, and the connection reset at once:
    /// the server counts as taken and the relay as connected, so it closes
    /// as a reset of a connected pair (no other server is tried).
    pub(crate) fn upstream_reset(&mut self, now: Instant, worker: usize, hung_up: bool) {
        self.server_took(now, worker);
        self.core.connected(now, hung_up);
    }

    /// The server agreed to the negotiation: bytes flow from now on.
    pub(crate) fn negotiated(&mut self, now: Instant) {
        self.session.negotiation = None;
        self.settle(now, false);
    }

    // Deadlines and the ready list

    /// Whether the relay needs a new timer entry, and for when: its
    /// deadline, if it has no entry at or before it.
    pub(crate) fn arm(&mut self) -> Option<Instant> {
        let at = self.deadline()?;
        if self.armed_at.is_none_or(|armed| at < armed) {
            self.armed_at = Some(at);
            return Some(at);
        }
        None
    }

    /// Whether the timer entry (`id`, `at`) is this relay's current one.
    pub(crate) fn is_armed(&self, id: u64, at: Instant) -> bool {
        self.id == id && self.armed_at == Some(at)
    }

    /// Its timer entry fired: it has none until it is armed again.
    pub(crate) fn disarm(&mut self) {
        self.armed_at = None;
    }

    /// What expired at `now`, if anything.
    pub(crate) fn expired(&self, now: Instant) -> Option<Expiry> {
        self.core.expired(self.timeouts(), now)
    }

    /// Puts the relay on the ready list's books: `true` if it was not on
    /// the list yet (the caller pushes it).
    pub(crate) fn queue(&mut self) -> bool {
        !std::mem::replace(&mut self.queued, true)
    }

    /// Taken off the ready list.
    pub(crate) fn dequeue(&mut self) {
        self.queued = false;
    }

    /// The relay left its worker's slab (a live upgrade froze it, or its
    /// client is held again): its ready-list and timer entries name a slot
    /// it no longer holds, so neither counts. Placed again, it is queued
    /// and armed afresh; a stale mark would keep it off the ready list for
    /// good, and on the uring loop every wakeup goes through that list.
    pub(crate) fn left_the_slab(&mut self) {
        self.queued = false;
        self.armed_at = None;
    }

    // The close

    /// Counts its close under `reason` in worker `worker`'s blocks of its
    /// listener and its server.
    pub(crate) fn count_close(&self, reason: CloseReason, worker: usize) {
        let counters = self.session.listener.counters(worker);
        counters.closed(reason);
        CounterBlock::sub(&counters.relays_active, 1);
        if let Some(server) = &self.server {
            CounterBlock::add(&server.relays_closed, 1);
        }
    }

    /// Whether its client can be told in words why it closes: a
    /// PostgreSQL client no server took yet, that spliced negotiates
    /// nothing for (a TLS client can hear no word of ours).
    pub(crate) fn client_can_be_told(&self) -> bool {
        self.core.is_connecting()
            && self.session.negotiation.is_none()
            && self.session.listener.config.protocol == Protocol::Postgres
    }

    /// The client gets a reset, not a FIN, when the relay closes.
    pub(crate) fn reset_client_on_close(&self) {
        self.client.reset_on_close();
    }

    /// Both sides get a reset, not a FIN, when the relay closes.
    #[cfg(feature = "service")]
    pub(crate) fn reset_both_on_close(&self) {
        self.client.reset_on_close();
        self.upstream.reset_on_close();
    }
}
