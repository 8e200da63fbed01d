//! Active health checks and `on-down` inside a worker's loop.
//!
//! Each server of the fleet that has an active check is probed by one
//! worker (its id modulo workers), however many pools and listeners name
//! it, so checks spread over the workers and no thread is spent on them.
//! A probe is a [`ProbeConn`] registered under a probe token; its verdict
//! goes into the server's one health state in the fleet, which every
//! pool judges for its role. The next probe of a server is due `interval`
//! after the previous one started, whatever it answered, so a server that
//! stops answering is down within `interval × fall` (plus one timeout).
//!
//! Relays to reset (`on-down = "kill"`) are found by comparing the fleet's
//! `changes` generation with the last one seen: one atomic load per loop
//! iteration, and a scan of this worker's relays only when it moved.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use mio::Interest;
use slab::Slab;

use super::Worker;
use crate::config::OnDown;
use crate::health::lag::Position;
use crate::health::{ProbeConn, Verdict};
use crate::stats::{CloseReason, CounterBlock};
use crate::token;
use crate::upstream::fleet::Upstream;

/// One running probe.
struct Running {
    conn: ProbeConn,
    server: Arc<Upstream>,
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
    /// By the server's fleet id.
    due: HashMap<u64, Due>,
    /// The earliest probe start or probe deadline; `None` before the
    /// first round.
    next: Option<Instant>,
    started: bool,
    /// The fleet's `changes` generation last acted on.
    changes_seen: u64,
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

    /// Look at the fleet again on the next iteration (a reload may have
    /// added servers, which get no relay until their first probe).
    pub(super) fn rescan(&mut self) {
        self.next = Some(Instant::now());
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
        let workers = self.config.workers.max(1) as u64;
        let mut seen = Vec::new();
        // Servers may join the fleet later (reloads, names resolved
        // again): look at it at least once an interval.
        let mut rescan: Option<Instant> = None;
        for server in self.shared.fleet.checked() {
            if server.id % workers != self.index as u64 {
                continue;
            }
            let Some(probing) = server.probing() else {
                continue;
            };
            let at = now + probing.interval;
            rescan = Some(rescan.map_or(at, |r| r.min(at)));
            seen.push(server.id);
            let due = self.checks.due.entry(server.id).or_insert(Due {
                at: now,
                running: false,
            });
            if due.running || due.at > now {
                continue;
            }
            due.at = now + probing.interval;
            match ProbeConn::connect(&probing.spec, server.addr, now, probing.timeout) {
                Ok(conn) => {
                    due.running = true;
                    self.start_probe(Running { conn, server }, now);
                }
                Err(v) => self.judge(&server, &v, None, None, now),
            }
        }
        // Servers that left the fleet take their schedule with them.
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
        if let Some(due) = self.checks.due.get_mut(&r.server.id) {
            due.running = false;
            self.checks.next = Some(self.checks.next.map_or(due.at, |n| n.min(due.at)));
        }
        let (timeline, position) = (r.conn.timeline(), r.conn.position());
        self.judge(&r.server, &verdict, timeline, position, now);
    }

    fn judge(
        &mut self,
        server: &Upstream,
        verdict: &Verdict,
        timeline: Option<u32>,
        position: Option<Position>,
        now: Instant,
    ) {
        CounterBlock::add(&self.counters.health_probes, 1);
        if !verdict.answered() {
            CounterBlock::add(&self.counters.health_probe_failures, 1);
        }
        tracing::debug!(
            worker = self.index,
            upstream = %server.addr,
            "health probe: {verdict}"
        );
        self.shared
            .fleet
            .observe(server, verdict, timeline, position, now);
    }

    /// Resets the relays that `on-down = "kill"` ends: those of servers
    /// that went down or whose role answer changed since their pick, once
    /// per change of the fleet's `changes` generation.
    pub(super) fn reset_down_relays(&mut self, now: Instant) {
        let changes = self.shared.fleet.changes();
        if changes == self.checks.changes_seen {
            return;
        }
        self.checks.changes_seen = changes;
        let doomed: Vec<usize> = self
            .relays
            .iter()
            .filter(|(_, r)| r.pool().on_down == OnDown::Kill)
            .filter(|(_, r)| r.round().lease().is_some_and(|l| l.doomed(r.pool())))
            .map(|(key, _)| key)
            .collect();
        for &key in &doomed {
            let relay = &self.relays[key];
            tracing::debug!(
                relay = relay.id(),
                "resetting a relay of a server that went down or changed role"
            );
            self.close(key, CloseReason::ServerDown, None, now);
        }
        if !doomed.is_empty() {
            tracing::warn!(
                worker = self.index,
                relays = doomed.len(),
                "reset the relays of servers that went down or changed role (on-down = \"kill\")"
            );
        }
    }
}
