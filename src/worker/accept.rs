//! Accepting: the accept budget, pauses when fds run out or at a relay
//! cap, refusals by the access lists and per-source limits.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use socket2::SockRef;

use super::{farewell, out_of_fds, Worker, ACCEPT_BUDGET, ACCEPT_PAUSE, CAP_RECHECK};
use crate::listener::{Listener, Refused};
use crate::stats::CounterBlock;

impl Worker {
    // Accepting

    pub(super) fn accept(&mut self, index: usize, now: Instant) {
        if self.accept_paused_until.is_some() {
            return;
        }
        if self.listeners[index].full_until.is_some() {
            return;
        }
        self.listeners[index].backlog = false;
        for _ in 0..ACCEPT_BUDGET {
            if self.shared.relays_live.load(Ordering::Relaxed) >= self.relay_cap {
                self.reach_relay_cap(now);
                return;
            }
            let runtime = Arc::clone(&self.listeners[index].runtime);
            let Some(reservation) = runtime.reserve() else {
                self.reach_listener_cap(index, now);
                return;
            };
            let accepted = match self.listeners[index].socket.as_ref() {
                Some(socket) => socket.accept(),
                None => return,
            };
            match accepted {
                Ok((client, addr)) => self.accepted(client, addr, runtime, reservation, now),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if out_of_fds(&e) => {
                    self.pause_accepting(now, &e);
                    return;
                }
                // The client gave up between SYN and accept; nothing to serve.
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    let listener = &self.listeners[index].runtime;
                    tracing::warn!(
                        worker = self.index,
                        listener = %listener.id,
                        address = %listener.label(),
                        error = %e,
                        "accept failed"
                    );
                    return;
                }
            }
        }
        self.listeners[index].backlog = true;
    }

    /// Pauses accepting instead of spinning on a listener that stays readable.
    pub(super) fn pause_accepting(&mut self, now: Instant, e: &io::Error) {
        self.accept_paused_until = Some(now + ACCEPT_PAUSE);
        CounterBlock::add(&self.counters.accept_pauses, 1);
        CounterBlock::add(&self.counters.accept_pauses_fds, 1);
        if self.accept_warnings.allow(now).is_some() {
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
    pub(super) fn reach_relay_cap(&mut self, now: Instant) {
        self.accept_paused_until = Some(now + CAP_RECHECK);
        CounterBlock::add(&self.counters.accept_pauses, 1);
        CounterBlock::add(&self.counters.accept_pauses_cap, 1);
        if self.accept_warnings.allow(now).is_some() {
            tracing::warn!(
                worker = self.index,
                relays = self.relays.len(),
                cap = self.relay_cap,
                "relay limit reached (from the fd limit or --max-conns): new connections wait in the listen backlog"
            );
        }
    }

    /// Stops accepting on one listener at its own max-conns until one of
    /// its relays closes here, or briefly when they live in another worker.
    pub(super) fn reach_listener_cap(&mut self, index: usize, now: Instant) {
        self.listeners[index].full_until = Some(now + CAP_RECHECK);
        let counters = self.listeners[index].runtime.counters(self.index);
        CounterBlock::add(&counters.listener_limit_pauses, 1);
        if self.accept_warnings.allow(now).is_some() {
            let listener = &self.listeners[index].runtime;
            tracing::warn!(
                worker = self.index,
                listener = %listener.label(),
                max_conns = listener.config.max_conns,
                "listener at its max-conns: new connections wait in the listen backlog"
            );
        }
    }

    /// Turns away a client the listener refused (see
    /// [`Worker::turn_away`]), counts it and logs it (rate-limited). No
    /// upstream was contacted. `preread` is what was read from it already.
    pub(super) fn refuse(
        &mut self,
        client: TcpStream,
        addr: SocketAddr,
        listener: &Listener,
        refused: Refused,
        preread: Vec<u8>,
        now: Instant,
    ) {
        let counters = listener.counters(self.index);
        let (counter, why) = match refused {
            Refused::Denied => (&counters.refused_denied, "not allowed by allow/deny"),
            Refused::PerSource => (
                &counters.refused_max_conns_per_source,
                "its address is at max-conns-per-source",
            ),
        };
        CounterBlock::add(counter, 1);
        let cause = farewell::TurnAway::from(refused);
        let pool = listener.own_pool().map(|p| &**p);
        let leaving = farewell::Leaving {
            client,
            client_addr: addr,
            preread,
        };
        let how = if self.turn_away(leaving, listener, pool, cause, now) {
            "told why"
        } else {
            "reset"
        };
        self.warn_refused(addr, listener, how, why, now);
    }

    /// Every refusal before a relay exists that is a reset whatever the
    /// listener speaks: reset the client, count it on `counter`, and log
    /// `why` (rate-limited, the rest at debug).
    pub(super) fn reset_refused(
        &mut self,
        client: TcpStream,
        addr: SocketAddr,
        listener: &Listener,
        counter: &AtomicU64,
        why: &str,
        now: Instant,
    ) {
        let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
        drop(client);
        CounterBlock::add(counter, 1);
        self.warn_refused(addr, listener, "reset", why, now);
    }

    /// Logs a refused client: at warn at most once a second per worker,
    /// the rest at debug.
    fn warn_refused(
        &mut self,
        addr: SocketAddr,
        listener: &Listener,
        how: &str,
        why: &str,
        now: Instant,
    ) {
        match self.refusal_warnings.allow(now) {
            Some(held_back) => tracing::warn!(
                worker = self.index,
                listener = %listener.label(),
                client = %addr,
                similar_warnings_held_back = held_back,
                "client refused ({how}): {why}"
            ),
            None => {
                tracing::debug!(listener = %listener.label(), client = %addr, "client refused ({how}): {why}")
            }
        }
    }

    pub(super) fn resume_accepting(&mut self, now: Instant) {
        for i in 0..self.listeners.len() {
            if self.listeners[i].full_until.is_some_and(|t| t <= now) {
                self.listeners[i].full_until = None;
                if self.accept_paused_until.is_none() {
                    self.accept(i, now);
                }
            }
        }
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
}
