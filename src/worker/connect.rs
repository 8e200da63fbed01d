//! The connector's side in the worker: starting connects over a round,
//! their outcome, failing over to the next server, and socket options.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use super::Worker;
use crate::error::{is_local_error, Op, RelayError, Side};
use crate::listener::Listener;
use crate::relay::{Peer, Readiness};
use crate::stats::{CloseReason, CounterBlock};
use crate::token::{self, RelayRef};
use crate::upstream::{self, Connect, Pool, Round};

impl Worker {
    /// The connector: starts a connect to the next server of `round`,
    /// logging each server that fails at once. `Ok(None)` once every server
    /// was tried; `Err` when the proxy itself is short of fds, socket
    /// buffers or memory (counted and logged here as the proxy's own, no
    /// server blamed).
    pub(super) fn connect_next(
        &mut self,
        relay: u64,
        round: &mut Round,
        listener: &Listener,
        pool: &Pool,
        now: Instant,
    ) -> io::Result<Option<(TcpStream, SocketAddr)>> {
        let next = round.connect_next(pool, self.index, now, |server, e, more| {
            self.connect_failed(relay, listener, server, e, more, now);
        });
        match &next {
            Ok(Some((stream, _))) => self.tune(listener, stream, Side::Upstream, now),
            Ok(None) => {}
            Err(e) => self.local_error(relay, listener, e, now),
        }
        next
    }

    /// Counts an upstream connect that failed for the proxy's own shortage
    /// (out of fds, socket buffers or memory) and warns, rate-limited: no
    /// server is at fault, so none is blamed or tried next. Accepting
    /// pauses, as when accept itself runs out.
    pub(super) fn local_error(
        &mut self,
        relay: u64,
        listener: &Listener,
        e: &io::Error,
        now: Instant,
    ) {
        CounterBlock::add(&listener.counters(self.index).local_errors, 1);
        match self.connect_warnings.allow(now) {
            Some(held_back) => tracing::warn!(
                worker = self.index,
                relay,
                listener = %listener.label(),
                error = %e,
                similar_warnings_held_back = held_back,
                "upstream connect failed for the proxy's own want of resources, not the server's; the client is closed"
            ),
            None => {
                tracing::debug!(relay, error = %e, "upstream connect failed for the proxy's own want of resources")
            }
        }
        self.pause_accepting(now, e);
    }

    /// Keepalive and TCP_USER_TIMEOUT on a relay's socket; a failure is
    /// logged (rate-limited) and the relay goes on without them.
    pub(super) fn tune(
        &mut self,
        listener: &Listener,
        stream: &TcpStream,
        side: Side,
        now: Instant,
    ) {
        if let Err(e) = listener.tune(stream) {
            if let Some(held_back) = self.connect_warnings.allow(now) {
                tracing::warn!(
                    worker = self.index,
                    listener = %listener.label(),
                    error = %e,
                    similar_warnings_held_back = held_back,
                    "internal: cannot set keepalive/user-timeout on the {side} socket"
                );
            }
        }
    }

    /// Counts a failed connect attempt and warns (rate-limited) naming the
    /// server and the error, and whether another server is tried.
    pub(super) fn connect_failed(
        &mut self,
        relay: u64,
        listener: &Listener,
        server: SocketAddr,
        e: &io::Error,
        trying_next: bool,
        now: Instant,
    ) {
        CounterBlock::add(&listener.counters(self.index).upstream_connect_failures, 1);
        let next = if trying_next {
            "trying the next server"
        } else {
            "no server left to try"
        };
        match self.connect_warnings.allow(now) {
            Some(held_back) => tracing::warn!(
                worker = self.index,
                relay,
                listener = %listener.label(),
                upstream = %server,
                error = %e,
                similar_warnings_held_back = held_back,
                "upstream connect failed; {next}"
            ),
            None => {
                tracing::debug!(relay, upstream = %server, error = %e, "upstream connect failed; {next}")
            }
        }
    }

    /// `writable`, `hung_up` (RDHUP/HUP) and `urgent` (EPOLLPRI) are what
    /// the upstream socket's event said.
    pub(super) fn on_connect_event(
        &mut self,
        key: usize,
        writable: bool,
        (hung_up, urgent): (bool, bool),
        now: Instant,
    ) {
        let relay = &mut self.relays[key];
        if relay.negotiation_started() {
            // Connected already: the events are the server's answer.
            self.negotiate(key, now);
            return;
        }
        let outcome = match relay.upstream_tcp() {
            // Only a TCP upstream is ever connecting; a handed-off pair is not.
            None => Connect::Established,
            // A handshake that failed (or a connection already reset) shows
            // EPOLLERR and EPOLLHUP beside its EPOLLOUT (tcp_poll), so
            // writable with neither is connected: no SO_ERROR to read.
            Some(_) if writable && !hung_up => Connect::Established,
            Some(s) => upstream::connect_result(s, writable),
        };
        match outcome {
            Connect::Pending => {}
            Connect::Established => {
                relay.upstream_established(now, self.index);
                if relay.is_negotiating() {
                    self.begin_negotiation(key, now);
                    return;
                }
                if urgent {
                    // Urgent data from a server that spoke at once: its
                    // direction must look for the mark splice stops at.
                    relay.ready(
                        Peer::Upstream,
                        Readiness {
                            readable: false,
                            writable: false,
                            hung_up: false,
                            urgent: true,
                        },
                    );
                }
                // No other server will be tried: the round keeps its lease
                // only. The edges of the connect went here, not to the relay:
                // a server that spoke and closed at once left its FIN
                // unannounced.
                relay.settle(now, hung_up);
                tracing::debug!(
                    relay = relay.id(),
                    upstream = relay.upstream_addr().map(tracing::field::display),
                    "upstream connected"
                );
                self.arm(key);
                self.run_relay(key, now);
            }
            Connect::Lost(e) => {
                // The server accepted: this is a connection that reset, not
                // a failed connect, so the client gets a reset too and no
                // other server is tried.
                relay.upstream_reset(now, self.index, hung_up);
                let e = RelayError::new(Side::Upstream, Op::Read, e);
                self.close(key, CloseReason::UpstreamReset, Some(&e), now);
            }
            Connect::Failed(e) => self.next_connect_attempt(key, e, now),
        }
    }

    /// Moves on to the next server after a failed or timed-out connect. A
    /// local error (the proxy's own shortage) tries no other server: the
    /// client is closed with `local-error`.
    pub(super) fn next_connect_attempt(&mut self, key: usize, error: io::Error, now: Instant) {
        let relay = &mut self.relays[key];
        let (id, failed) = (relay.id(), relay.upstream_addr());
        let listener = Arc::clone(relay.listener());
        let pool = Arc::clone(relay.pool());
        let tls = relay.is_negotiating();
        relay.restart_negotiation();
        if is_local_error(&error) {
            self.local_error(id, &listener, &error, now);
            let e = RelayError::new(Side::Upstream, Op::Connect, error);
            self.close(key, CloseReason::LocalError, Some(&e), now);
            return;
        }
        let mut round = relay.take_round();
        round.failed(&pool, self.index, &error, now);
        let more = round.has_next(&pool);
        if let Some(failed) = failed {
            self.connect_failed(id, &listener, failed, &error, more, now);
        }
        let token = token::relay(RelayRef { key, id }, Peer::Upstream);
        let interest = self.relay_interest(&self.relays[key]);
        let mut error = error;
        let next = loop {
            let (mut stream, server) =
                match self.connect_next(id, &mut round, &listener, &pool, now) {
                    Ok(Some(next)) => next,
                    Ok(None) => break Ok(None),
                    Err(local) => break Err(local),
                };
            match self.poll.registry().register(&mut stream, token, interest) {
                Ok(()) => break Ok(Some((stream, server))),
                Err(e) => {
                    let more = round.has_next(&pool);
                    self.connect_failed(id, &listener, server, &e, more, now);
                    error = e;
                }
            }
        };
        let relay = &mut self.relays[key];
        relay.put_round(round);
        match next {
            Ok(Some((stream, server))) => {
                // The old socket closes on drop, which also removes it from epoll.
                relay.retry_upstream(stream, server, now);
                self.arm(key);
            }
            Ok(None) => {
                let since = relay.started();
                let hold = (!tls)
                    .then(|| self.hold_deadline(&pool, since, now))
                    .flatten();
                if let Some(deadline) = hold {
                    // Every server failed while the pool still took
                    // relays (a failover its checks have not seen yet):
                    // the client waits for what remains of its time.
                    let relay = self.take_relay(key);
                    match relay.into_unstarted(&mut self.pools) {
                        Some(client) => self.hold(client, deadline, true, true, now),
                        // Only a handed-off pair has no accepted client,
                        // and it never connects.
                        None => listener
                            .counters(self.index)
                            .closed(CloseReason::ConnectFailed),
                    }
                    return;
                }
                let e = RelayError::new(Side::Upstream, Op::Connect, error);
                self.close(key, CloseReason::ConnectFailed, Some(&e), now);
            }
            Err(local) => {
                let e = RelayError::new(Side::Upstream, Op::Connect, local);
                self.close(key, CloseReason::LocalError, Some(&e), now);
            }
        }
    }
}
