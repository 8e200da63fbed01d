//! Held clients (`queue-timeout`): a client that no server of its pool
//! takes now (none eligible, or every connect attempt failed) waits instead
//! of being refused, for up to the pool's `queue-timeout` from its accept.
//!
//! A held client costs an entry here and its socket: no upstream connect,
//! no buffer. What it sent stays in the kernel's receive queue (plus what
//! the preface read already, kept in the entry), so its first bytes reach
//! the server unchanged once it connects. It keeps its admission (it counts
//! against `max-conns` and `max-conns-per-source`) and its place under the
//! relay cap, and it takes a place under the listener's `max-queued`.
//!
//! Its socket is registered for readability only (which on Linux brings
//! RDHUP). A reset (a socket error, HUP) or a FIN (RDHUP, or an end of
//! stream that MSG_PEEK finds with nothing queued; nothing is consumed)
//! means the client gave up, and it is dropped at once, whatever it sent.
//!
//! Held clients connect, oldest first, whenever the fleet's `gains`
//! generation moved (a pool gained an eligible server: a health transition,
//! a reload, a DNS change; the fleet rings this worker's doorbell, so a
//! worker blocked in epoll wakes at once), after a reload, and at least
//! every [`HELD_RETRY`] while one of them needs it: its pool has no active
//! check (a down server comes back only through a trial connect), or it was
//! held after failed connects to a server its pool still takes.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Interest;
use slab::Slab;
use socket2::SockRef;

use super::{farewell, Worker};
use crate::stats::{CloseReason, CounterBlock};
use crate::token;
use crate::upstream::{Pool, Round};

use std::collections::BTreeMap;
use std::mem::MaybeUninit;

use crate::listener::{ListenerId, QueuePlace};
use crate::relay::Unstarted;

/// How often held clients look again without being woken, while one of
/// them needs it (see the module doc).
const HELD_RETRY: Duration = Duration::from_secs(1);

/// Why a held client (or one that would be held) is turned away.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HeldRefusal {
    /// No server took it within its pool's `queue-timeout`: `waited` since
    /// its accept.
    NoServer { waited: Duration },
    /// The listener holds `max` clients already (`max-queued`).
    MaxQueued { max: usize },
    /// The proxy is stopping (drain, abort), or a reload removed the
    /// listener or changed the PROXY header its server expects.
    Draining,
}

impl HeldRefusal {
    /// What the log line says.
    pub(crate) fn text(&self) -> String {
        match self {
            HeldRefusal::NoServer { waited } => format!(
                "no server of the pool took it within its queue-timeout (waited {} ms)",
                waited.as_millis()
            ),
            HeldRefusal::MaxQueued { max } => {
                format!("no server takes new relays and the listener holds max-queued ({max}) clients already")
            }
            HeldRefusal::Draining => "the listener stops (drain, or a reload)".to_string(),
        }
    }
}

/// One held client.
pub(super) struct Held {
    pub(super) client: Unstarted,
    _place: QueuePlace,
    deadline: Instant,
    /// Held after connect attempts failed: try again at the next retry.
    after_failure: bool,
}

/// A worker's held clients, oldest first.
#[derive(Default)]
pub(super) struct Parking {
    held: Slab<Held>,
    /// Keys by (accepted at, relay id).
    order: BTreeMap<(Instant, u64), usize>,
    /// Keys by (deadline, relay id).
    deadlines: BTreeMap<(Instant, u64), usize>,
    /// The fleet's `gains` generation last acted on.
    gains_seen: u64,
    /// The next retry without a wake-up, when one is needed.
    retry_at: Option<Instant>,
    /// A reload happened: look again now.
    look_again: bool,
}

impl Parking {
    /// When the loop must wake for held clients.
    pub(super) fn next(&self) -> Option<Instant> {
        if self.look_again && !self.held.is_empty() {
            return Some(Instant::now());
        }
        let deadline = self.deadlines.keys().next().map(|&(at, _)| at);
        [deadline, self.retry_at].into_iter().flatten().min()
    }

    pub(super) fn len(&self) -> usize {
        self.held.len()
    }
}

/// Whether `held` should try again at the retry tick, woken or not.
fn needs_retry(held: &Held) -> bool {
    held.after_failure || !held.client.accepted.pool.is_checked()
}

impl Worker {
    /// Until when a client accepted at `since` may be held for a server of
    /// `pool`: `None` when it may not (no `queue-timeout`, its time is up,
    /// or the worker drains).
    pub(super) fn hold_deadline(
        &self,
        pool: &Pool,
        since: Instant,
        now: Instant,
    ) -> Option<Instant> {
        if self.draining {
            return None;
        }
        let deadline = since.checked_add(pool.queue_timeout?)?;
        (deadline > now).then_some(deadline)
    }

    /// Holds `client` until `deadline`, or refuses it at `max-queued`.
    /// `registered`: its socket is in the poll already (a relay's).
    /// `after_failure`: its connect attempts failed.
    pub(super) fn hold(
        &mut self,
        client: Unstarted,
        deadline: Instant,
        registered: bool,
        after_failure: bool,
        now: Instant,
    ) {
        let mut client = client;
        let listener = Arc::clone(&client.accepted.listener);
        let Some(place) = listener.queue() else {
            if registered {
                let _ = self.poll.registry().deregister(&mut client.accepted.client);
            }
            let max = listener.config.max_queued.unwrap_or(usize::MAX);
            self.refuse_held(client, HeldRefusal::MaxQueued { max }, now);
            return;
        };
        let entry = self.parking.held.vacant_entry();
        let key = entry.key();
        let registry = self.poll.registry();
        let socket = &mut client.accepted.client;
        let token = token::held(key);
        let done = if registered {
            registry.reregister(socket, token, Interest::READABLE)
        } else {
            registry.register(socket, token, Interest::READABLE)
        };
        if let Err(e) = done {
            tracing::warn!(worker = self.index, client = %client.accepted.client_addr, error = %e, "internal: cannot register a held client; closing it");
            let _ = registry.deregister(socket);
            listener.counters(self.index).closed(CloseReason::Internal);
            return;
        }
        let id = client.accepted.id;
        let since = client.since;
        let counters = listener.counters(self.index);
        CounterBlock::add(&counters.clients_held, 1);
        CounterBlock::add(&counters.clients_held_total, 1);
        self.shared.relays_live.fetch_add(1, Ordering::Relaxed);
        self.doorbell.hold();
        let held = Held {
            client,
            _place: place,
            deadline,
            after_failure,
        };
        if needs_retry(&held) && self.parking.retry_at.is_none() {
            self.parking.retry_at = Some(now + HELD_RETRY);
        }
        entry.insert(held);
        self.parking.order.insert((since, id), key);
        self.parking.deadlines.insert((deadline, id), key);
        tracing::debug!(
            relay = id,
            listener = %listener.label(),
            after_failure,
            "client held until a server of the pool takes it"
        );
        let limit = self.held_warnings.entry(listener.id).or_default();
        if let Some(held_back) = limit.allow(now) {
            tracing::warn!(
                worker = self.index,
                listener = %listener.label(),
                held = self.parking.len(),
                similar_warnings_held_back = held_back,
                "holding new clients: no server of the pool takes them now; each waits for one up to the pool's queue-timeout"
            );
        }
    }

    /// Takes held client `key` out: no longer counted as held, its socket
    /// out of the poll, its wait counted.
    fn unhold(&mut self, key: usize, now: Instant) -> Held {
        let mut held = self.parking.held.remove(key);
        let id = held.client.accepted.id;
        self.parking.order.remove(&(held.client.since, id));
        self.parking.deadlines.remove(&(held.deadline, id));
        let _ = self
            .poll
            .registry()
            .deregister(&mut held.client.accepted.client);
        let counters = held.client.accepted.listener.counters(self.index);
        CounterBlock::sub(&counters.clients_held, 1);
        counters.held_for(now.saturating_duration_since(held.client.since));
        self.shared.relays_live.fetch_sub(1, Ordering::Relaxed);
        self.doorbell.release();
        held
    }

    /// Every refusal of a held client, or of one that would be held: it is
    /// closed as a client no server took always is (a FIN, or a reset if
    /// its bytes wait unread), counted with its reason, and logged
    /// (rate-limited per listener).
    pub(super) fn refuse_held(&mut self, client: Unstarted, why: HeldRefusal, now: Instant) {
        let listener = Arc::clone(&client.accepted.listener);
        let counters = listener.counters(self.index);
        match why {
            HeldRefusal::NoServer { .. } => {
                CounterBlock::add(&counters.held_timeouts, 1);
                counters.closed(CloseReason::NoServer);
            }
            HeldRefusal::MaxQueued { .. } => {
                CounterBlock::add(&counters.refused_max_queued, 1);
                counters.closed(CloseReason::NoServer);
            }
            HeldRefusal::Draining => counters.closed(CloseReason::Shutdown),
        }
        let addr = client.accepted.client_addr;
        let Unstarted {
            accepted,
            ahead,
            ahead_header,
            ..
        } = client;
        let preread = ahead
            .get(usize::from(ahead_header)..)
            .unwrap_or_default()
            .to_vec();
        let told = match why {
            HeldRefusal::NoServer { waited } => farewell::TurnAway::NoServer {
                waited: Some(waited),
            },
            HeldRefusal::MaxQueued { .. } => farewell::TurnAway::QueueFull,
            HeldRefusal::Draining => farewell::TurnAway::Draining,
        };
        // A client being told why no longer counts against the listener's
        // limits: its admission goes now.
        drop(accepted.admission);
        let pool = accepted.pool;
        let leaving = farewell::Leaving {
            client: accepted.client,
            client_addr: addr,
            preread,
        };
        self.turn_away(leaving, &listener, Some(&*pool), told, now);
        self.room_freed(listener.id, now);
        if why == HeldRefusal::Draining {
            tracing::debug!(listener = %listener.label(), client = %addr, "held client closed: {}", why.text());
            return;
        }
        let limit = self.no_server_warnings.entry(listener.id).or_default();
        if let Some(held_back) = limit.allow(now) {
            tracing::warn!(
                worker = self.index,
                listener = %listener.label(),
                client = %addr,
                reason = %CloseReason::NoServer,
                similar_closes_held_back = held_back,
                "client refused: {}",
                why.text()
            );
        }
    }

    /// An event on a held client's socket: drops it if it gave up. A
    /// reset shows as a socket error; a FIN as RDHUP (whatever bytes wait
    /// before it: a client that stopped sending is not waited for), or as
    /// an end of stream that a peek finds with nothing queued.
    pub(super) fn on_held_event(&mut self, key: usize, event: &mio::event::Event, now: Instant) {
        let Some(held) = self.parking.held.get(key) else {
            return;
        };
        let socket = SockRef::from(&held.client.accepted.client);
        let reset = event.is_error() && !matches!(socket.take_error(), Ok(None));
        let reason = if reset || event.is_write_closed() {
            CloseReason::ClientReset
        } else if event.is_read_closed() {
            CloseReason::Eof
        } else {
            let mut byte = [MaybeUninit::<u8>::uninit(); 1];
            match socket.peek(&mut byte) {
                // Its bytes wait for the server.
                Ok(n) if n > 0 => return,
                Ok(_) => CloseReason::Eof,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                    ) =>
                {
                    return
                }
                Err(_) => CloseReason::ClientReset,
            }
        };
        let held = self.unhold(key, now);
        let listener = Arc::clone(&held.client.accepted.listener);
        listener.counters(self.index).closed(reason);
        tracing::debug!(
            relay = held.client.accepted.id,
            listener = %listener.label(),
            reason = %reason,
            "held client gave up"
        );
        drop(held);
        self.room_freed(listener.id, now);
    }

    /// Refuses the held clients whose queue-timeout passed.
    pub(super) fn expire_held(&mut self, now: Instant) {
        while let Some((&(at, _), &key)) = self.parking.deadlines.first_key_value() {
            if at > now {
                break;
            }
            let held = self.unhold(key, now);
            let waited = now.saturating_duration_since(held.client.since);
            self.refuse_held(held.client, HeldRefusal::NoServer { waited }, now);
        }
    }

    /// Refuses every held client (the worker stops).
    pub(super) fn refuse_all_held(&mut self, now: Instant) {
        let keys: Vec<usize> = self.parking.held.iter().map(|(k, _)| k).collect();
        for key in keys {
            let held = self.unhold(key, now);
            self.refuse_held(held.client, HeldRefusal::Draining, now);
        }
    }

    /// After a reload: held clients of a removed listener are refused;
    /// the others follow their listener's new settings and their pool's
    /// successor (the listener's own pool, or the named pool of the same
    /// name), unless that pool is gone (a route's pool the reload removed)
    /// or wants another PROXY header than the one made for them.
    pub(super) fn rehome_held(&mut self, removed: &[ListenerId], now: Instant) {
        let keys: Vec<usize> = self.parking.held.iter().map(|(k, _)| k).collect();
        for key in keys {
            let accepted = &self.parking.held[key].client.accepted;
            let (old, pool) = (Arc::clone(&accepted.listener), Arc::clone(&accepted.pool));
            let new = self
                .listeners
                .iter()
                .find(|s| s.runtime.id == old.id)
                .map(|s| Arc::clone(&s.runtime));
            let moved = match &new {
                Some(new) => match new.counterpart(&pool) {
                    Some(p) if p.send_proxy == pool.send_proxy => Some(Some(Arc::clone(p))),
                    _ => None,
                },
                None if removed.contains(&old.id) => None,
                None => Some(None),
            };
            let Some(moved) = moved else {
                let held = self.unhold(key, now);
                self.refuse_held(held.client, HeldRefusal::Draining, now);
                continue;
            };
            if let (Some(new), Some(pool)) = (new, moved) {
                let accepted = &mut self.parking.held[key].client.accepted;
                accepted.listener = new;
                accepted.pool = pool;
            }
        }
        self.parking.look_again = true;
    }

    /// Connects held clients, oldest first, when a pool gained a server
    /// since the last look, after a reload, or at the retry tick. A
    /// pool that offers no server is passed over for the rest of the
    /// round.
    pub(super) fn resume_held(&mut self, now: Instant) {
        if self.parking.held.is_empty() {
            self.parking.retry_at = None;
            return;
        }
        let gains = self.shared.fleet.gains();
        let tick = self.parking.retry_at.is_some_and(|t| t <= now);
        if gains == self.parking.gains_seen && !tick && !self.parking.look_again {
            return;
        }
        self.parking.gains_seen = gains;
        self.parking.look_again = false;
        let order: Vec<usize> = self.parking.order.values().copied().collect();
        let mut none_there: Vec<Arc<Pool>> = Vec::new();
        for key in order {
            let Some(held) = self.parking.held.get(key) else {
                continue;
            };
            let listener = Arc::clone(&held.client.accepted.listener);
            let pool = Arc::clone(&held.client.accepted.pool);
            if none_there.iter().any(|p| Arc::ptr_eq(p, &pool)) {
                continue;
            }
            let (id, ip) = (
                held.client.accepted.id,
                held.client.accepted.client_addr.ip(),
            );
            let mut round = Round::new(&pool, ip);
            match self.connect_next(id, &mut round, &listener, &pool, now) {
                Ok(Some(upstream)) => {
                    let held = self.unhold(key, now);
                    self.launch(held.client, upstream, round, now);
                }
                Ok(None) if round.tried_none() => none_there.push(pool),
                // Every server failed at once: it waits on.
                Ok(None) => self.parking.held[key].after_failure = true,
                Err(_) => {
                    // The proxy's own shortage (counted and logged): the
                    // others wait for the next look.
                    let held = self.unhold(key, now);
                    listener
                        .counters(self.index)
                        .closed(CloseReason::LocalError);
                    drop(held);
                    self.room_freed(listener.id, now);
                    break;
                }
            }
        }
        self.parking.retry_at = self
            .parking
            .held
            .iter()
            .any(|(_, h)| needs_retry(h))
            .then(|| now + HELD_RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::Relay;

    /// A held client must cost no more than a relay slot (it holds one).
    #[test]
    fn a_held_client_costs_no_more_than_a_relay_slot() {
        let held = std::mem::size_of::<Held>();
        let relay = std::mem::size_of::<Relay>();
        // Its two index entries: a (time, id) key and a slab key each.
        let index = 2 * (std::mem::size_of::<(Instant, u64)>() + std::mem::size_of::<usize>());
        println!("held entry {held} B + index {index} B; relay slot {relay} B");
        assert!(
            held + index <= relay,
            "held {held} + {index} B > relay {relay} B"
        );
    }
}
