//! Deadlines, closing relays, commands, and draining.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use super::{farewell, Worker, SLAB_KEEP, TIMER_SLACK};
use crate::control::Command;
use crate::error::RelayError;
use crate::relay::{expiry_reason, Relay};
use crate::stats::{CloseReason, CounterBlock};

impl Worker {
    // Deadlines

    /// Gives the relay a heap entry for its deadline unless one at or before
    /// it exists; later deadlines are found lazily when the entry fires.
    pub(super) fn arm(&mut self, key: usize) {
        let relay = &mut self.relays[key];
        if let Some(at) = relay.arm() {
            self.timers.schedule(at, key, relay.id());
        }
    }

    pub(super) fn expire(&mut self, now: Instant) {
        while let Some(entry) = self.timers.pop_due(now) {
            let Some(relay) = self.relays.get_mut(entry.key) else {
                continue;
            };
            if !relay.is_armed(entry.id, entry.at) {
                continue;
            }
            relay.disarm();
            if let Some(interval) = self.config.ops.log_interval {
                relay.log_progress(now, interval);
            }
            match relay.expired(now) {
                None => self.arm(entry.key),
                Some(expiry) => match expiry_reason(expiry) {
                    Some(reason) => self.close(entry.key, reason, None, now),
                    None => {
                        let e = io::Error::new(io::ErrorKind::TimedOut, "connect timed out");
                        self.next_connect_attempt(entry.key, e, now);
                    }
                },
            }
        }
    }

    /// Entries of closed relays (and ones superseded by an earlier deadline)
    /// wait in the heap until their time, which with a long idle timeout
    /// would let the heap grow with the connection rate. Once they clearly
    /// outnumber the live ones, one sweep drops them all: amortised O(1)
    /// per close.
    pub(super) fn sweep_timers(&mut self) {
        if self.timers.len() <= 2 * self.relays.len() + TIMER_SLACK {
            return;
        }
        let relays = &self.relays;
        self.timers
            .retain(|e| relays.get(e.key).is_some_and(|r| r.is_armed(e.id, e.at)));
    }

    // Closing and shutdown

    pub(super) fn close(
        &mut self,
        key: usize,
        reason: CloseReason,
        error: Option<&RelayError>,
        now: Instant,
    ) {
        self.disarm_reads(key);
        let relay = self.relays.remove(key);
        relay.count_close(reason, self.index);
        let listener = relay.listener_id();
        let told = relay.client_can_be_told();
        match farewell::TurnAway::of_close(reason).filter(|_| told) {
            // A PostgreSQL client no server took hears why.
            Some(why) => {
                let runtime = Arc::clone(relay.listener());
                let pool = Arc::clone(relay.pool());
                let kept = relay.close_keeping_client(reason, error, now, &mut self.pools);
                if let Some((mut client, client_addr, first_bytes)) = kept {
                    let _ = self.poll.registry().deregister(&mut client);
                    let leaving = farewell::Leaving {
                        client,
                        client_addr,
                        preread: first_bytes,
                    };
                    self.turn_away(leaving, &runtime, Some(&*pool), why, now);
                }
            }
            None if relay.is_negotiating() => {
                // No server took it: it is reset, not left to time out
                // waiting for a TLS answer.
                relay.reset_client_on_close();
                relay.close(reason, error, now, &mut self.pools);
            }
            None => relay.close(reason, error, now, &mut self.pools),
        }
        self.shared.relays_live.fetch_sub(1, Ordering::Relaxed);
        self.room_freed(listener, now);
        self.sweep_timers();
        if self.relays.is_empty() && self.relays.capacity() > SLAB_KEEP {
            // Give back the slab a burst grew; stale timer and ready-list
            // entries are recognised by relay id.
            self.relays.shrink_to_fit();
        }
    }

    /// A client of `listener` left (a relay closed, a held client went):
    /// its room under the listener's max-conns is free again, and freed
    /// fds may let a paused accept succeed now.
    pub(super) fn room_freed(&mut self, listener: crate::listener::ListenerId, now: Instant) {
        for slot in &mut self.listeners {
            if slot.runtime.id == listener && slot.full_until.is_some() {
                slot.full_until = Some(now);
            }
        }
        if self.accept_paused_until.is_some() {
            self.accept_paused_until = Some(now);
        }
    }

    /// Takes a relay out of the slab without closing it (its client is
    /// held again): it no longer counts as a live relay.
    pub(super) fn take_relay(&mut self, key: usize) -> Relay {
        let mut relay = self.relays.remove(key);
        relay.left_the_slab();
        CounterBlock::sub(&relay.listener().counters(self.index).relays_active, 1);
        self.shared.relays_live.fetch_sub(1, Ordering::Relaxed);
        relay
    }

    pub(super) fn close_all(&mut self, now: Instant) {
        self.refuse_all_held(now);
        let keys: Vec<usize> = self.relays.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, CloseReason::Shutdown, None, now);
        }
        self.farewells.clear();
    }

    /// Carries out queued commands and moves a drain along; returns true
    /// when the worker should exit.
    pub(super) fn check_control(&mut self, now: Instant) -> bool {
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Abort => {
                    self.close_all(now);
                    return true;
                }
                Command::Drain => self.start_draining(now),
                Command::Handoff(mut handoff) => self.take_handoff(&mut handoff, now),
                Command::AbortRelay { id, reporter } => self.abort_relay(id, &reporter, now),
                Command::Reload(reload) => self.reload(*reload, now),
                Command::ListeningSockets(answer) => self.send_listening_sockets(&answer),
                #[cfg(feature = "service")]
                Command::FreezeRelays(answer) => self.freeze_relays(&answer, now),
                #[cfg(feature = "service")]
                Command::EndFreeze(relays) => self.end_freeze(relays, now),
                #[cfg(feature = "service")]
                Command::AdoptRelays(relays, answer) => self.adopt_relays(relays, &answer, now),
            }
        }
        self.close_retired(now);
        if self.draining {
            if self.drain_deadline.is_some_and(|t| t <= now) {
                self.close_all(now);
            }
            // Refused clients still being told why have short deadlines,
            // and a client's first bytes its first-packet timeout: a client
            // accepted before the drain is served, not cut mid-preface.
            return self.relays.is_empty()
                && self.prefaces.is_empty()
                && self.farewells.is_empty()
                && self.parking.len() == 0
                && self.frozen_out == 0;
        }
        false
    }

    pub(super) fn start_draining(&mut self, now: Instant) {
        if !self.draining {
            self.draining = true;
            for slot in &mut self.listeners {
                // Dropping the socket stops accepting; queued SYNs are refused.
                // Deregistered first: another descriptor of the same socket
                // (an inherited one) would keep it in the epoll set.
                if let Some(mut socket) = slot.socket.take() {
                    let _ = self.poll.registry().deregister(&mut socket);
                }
                slot.backlog = false;
            }
            self.drain_deadline = self.config.drain_timeout.and_then(|d| now.checked_add(d));
            // No server will come for them in time that matters: a held
            // client learns at once.
            self.refuse_all_held(now);
            tracing::info!(worker = self.index, relays = self.relays.len(), "draining");
        }
    }
}
