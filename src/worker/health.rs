//! Active health checks and `on-down` inside a worker's loop.
//!
//! Each server of a pool with `health.check` is probed by one worker
//! ((server index + listener id) modulo workers), so checks spread over
//! the workers and no thread is spent on them. A probe is a
//! [`ProbeConn`] registered under a probe token; its verdict goes into
//! the server's one health state in the shared pool, which every worker's
//! pick reads. The next probe of a server is due `interval` after the
//! previous one started, whatever it answered, so a server that stops
//! answering is down within `interval × fall` (plus one timeout).
//!
//! Relays of a server that went down are found by comparing the pool's
//! `downs` generation with the last one seen: one atomic load per pool per
//! loop iteration, and a scan of this worker's relays only when it moved.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mio::Interest;
use slab::Slab;

use super::Worker;
use crate::config::OnDown;
use crate::health::{ProbeConn, Verdict};
use crate::listener::{Listener, ListenerId};
use crate::stats::{CloseReason, CounterBlock};
use crate::token;
use crate::upstream::Server;

/// One running probe.
struct Running {
    conn: ProbeConn,
    server: Arc<Server>,
    listener: Arc<Listener>,
    slot: (ListenerId, SocketAddr),
}

/// A server this worker checks: when its next probe is due, and whether
/// one is running.
struct Due {
    at: Instant,
    running: bool,
}

/// A worker's share of the active checks.
#[derive(Default)]
pub(super) struct Checks {
    probes: Slab<Running>,
    due: HashMap<(ListenerId, SocketAddr), Due>,
    /// The earliest probe start or probe deadline; `None` before the
    /// first round.
    next: Option<Instant>,
    started: bool,
    /// The `downs` generation of each pool last acted on.
    downs_seen: HashMap<ListenerId, u64>,
}

impl Checks {
    /// When the loop must wake for the checks.
    pub(super) fn next(&self) -> Option<Instant> {
        if self.started {
            self.next
        } else {
            // The first round runs on the first iteration.
            Some(Instant::now())
        }
    }
}

impl Worker {
    /// Starts the probes that are due and ends those past their deadline.
    pub(super) fn run_checks(&mut self, now: Instant) {
        if self.draining || (self.checks.started && self.checks.next.is_none_or(|t| t > now)) {
            return;
        }
        self.checks.started = true;
        let mut expired = Vec::new();
        for (key, r) in self.checks.probes.iter_mut() {
            if let Some(v) = r.conn.on_deadline(now) {
                expired.push((key, v));
            }
        }
        for (key, v) in expired {
            self.probe_done(key, v, now);
        }
        let workers = self.config.workers.max(1);
        let mut seen = Vec::new();
        // Servers may join a pool later (names resolved again): look at
        // the members at least once an interval.
        let mut rescan: Option<Instant> = None;
        let mut listeners: Vec<Arc<Listener>> = Vec::new();
        for slot in &self.listeners {
            if !listeners.iter().any(|l| l.id == slot.runtime.id) {
                listeners.push(Arc::clone(&slot.runtime));
            }
        }
        for listener in listeners {
            let Some(check) = listener.pool.check() else {
                continue;
            };
            let at = now + check.interval;
            rescan = Some(rescan.map_or(at, |r| r.min(at)));
            let members = listener.pool.members();
            for (i, server) in members.servers.iter().enumerate() {
                if (i + listener.id.0 as usize) % workers != self.index {
                    continue;
                }
                let slot = (listener.id, server.addr);
                seen.push(slot);
                let due = self.checks.due.entry(slot).or_insert(Due {
                    at: now,
                    running: false,
                });
                if due.running || due.at > now {
                    continue;
                }
                due.at = now + check.interval;
                match ProbeConn::connect(&check.spec, server.addr, now, check.timeout) {
                    Ok(conn) => {
                        due.running = true;
                        let running = Running {
                            conn,
                            server: Arc::clone(server),
                            listener: Arc::clone(&listener),
                            slot,
                        };
                        self.start_probe(running, now);
                    }
                    Err(v) => {
                        CounterBlock::add(&listener.counters(self.index).health_probes, 1);
                        self.judge(&listener, server, &v, now);
                    }
                }
            }
        }
        // Servers that left a pool take their schedule with them.
        self.checks.due.retain(|k, _| seen.contains(k));
        self.checks.next = self
            .checks
            .due
            .values()
            .filter(|d| !d.running)
            .map(|d| d.at)
            .chain(self.checks.probes.iter().map(|(_, r)| r.conn.deadline()))
            .chain(rescan)
            .min();
    }

    fn start_probe(&mut self, mut running: Running, now: Instant) {
        let entry = self.checks.probes.vacant_entry();
        let key = entry.key();
        let registered = self.poll.registry().register(
            running.conn.stream(),
            token::probe(key),
            Interest::READABLE | Interest::WRITABLE,
        );
        entry.insert(running);
        if let Err(e) = registered {
            let v = Verdict::down(format!("internal: cannot register the probe socket: {e}"));
            self.probe_done(key, v, now);
        }
    }

    /// An event on a probe's socket.
    pub(super) fn on_probe_event(&mut self, key: usize, now: Instant) {
        let Some(r) = self.checks.probes.get_mut(key) else {
            return;
        };
        if let Some(v) = r.conn.on_ready(now) {
            self.probe_done(key, v, now);
        }
    }

    fn probe_done(&mut self, key: usize, verdict: Verdict, now: Instant) {
        let mut r = self.checks.probes.remove(key);
        let _ = self.poll.registry().deregister(r.conn.stream());
        if let Some(due) = self.checks.due.get_mut(&r.slot) {
            due.running = false;
            self.checks.next = Some(self.checks.next.map_or(due.at, |n| n.min(due.at)));
        }
        self.judge(&r.listener, &r.server, &verdict, now);
    }

    fn judge(&mut self, listener: &Listener, server: &Server, verdict: &Verdict, now: Instant) {
        let counters = listener.counters(self.index);
        CounterBlock::add(&counters.health_probes, 1);
        if !verdict.is_up() {
            CounterBlock::add(&counters.health_probe_failures, 1);
        }
        tracing::debug!(
            worker = self.index,
            listener = listener.label(),
            upstream = %server.addr,
            "health probe: {verdict}"
        );
        listener.pool.observe(server, verdict, now);
    }

    /// Resets the relays of servers that went down, for pools with
    /// `on-down = "kill"`, once per change of their `downs` generation.
    pub(super) fn reset_down_relays(&mut self, now: Instant) {
        let mut moved = false;
        for slot in &self.listeners {
            let pool = &slot.runtime.pool;
            if pool.on_down != OnDown::Kill {
                continue;
            }
            let downs = pool.downs();
            let seen = self.checks.downs_seen.entry(slot.runtime.id).or_insert(0);
            if *seen != downs {
                *seen = downs;
                moved = true;
            }
        }
        if !moved {
            return;
        }
        let doomed: Vec<(usize, SocketAddr)> = self
            .relays
            .iter()
            .filter(|(_, r)| r.listener.pool.on_down == OnDown::Kill)
            .filter_map(|(key, r)| {
                let server = r.round.server().filter(|s| s.is_down())?;
                Some((key, server.addr))
            })
            .collect();
        for &(key, server) in &doomed {
            let relay = &self.relays[key];
            tracing::debug!(relay = relay.id, upstream = %server, "resetting a relay of a down server");
            self.close(key, CloseReason::ServerDown, None, now);
        }
        if !doomed.is_empty() {
            tracing::warn!(
                worker = self.index,
                relays = doomed.len(),
                "reset the relays of servers that went down (on-down = \"kill\")"
            );
        }
    }
}
