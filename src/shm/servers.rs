//! Server slots: the counters of one server of one listener, in the stats
//! file for as long as anything holds the server.
//!
//! A listener's [`ServerRegistry`] (shared by the listener's successors
//! after a reload) hands every pool the same [`ServerCounters`] for the
//! same address while any holder lives: a server that stays across a
//! reload or a re-resolution keeps counting where it was. Once the last
//! holder (its pool entry, a relay connected to it) is gone, the slot is
//! given back and its counters with it; an address that comes back later
//! starts again from zero in a slot whose generation moved, which a reader
//! (and Prometheus's `rate`) sees as a counter reset.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use super::{anonymous_words, read_name, write_name, Arena, Block, NAME_WORDS};
use crate::stats::ServerBlock;
use crate::sys::shared::{word_block, Placed};

/// The state names of [`ServerHead::down`]'s low byte, by code.
pub const STATES: [&str; 7] = [
    "up",
    "down",
    "wrong-role",
    "check-error",
    "unknown",
    "standby",
    "lagging",
];

/// The reasons of [`ServerHead::down`]'s second byte, by code.
pub const REASONS: [&str; 9] = [
    "",
    "no answer",
    "role",
    "stale timeline",
    "several primaries",
    "role not confirmed yet",
    "check fails",
    "replicas serve",
    "replication lag",
];

/// Bit 16 of [`ServerHead::down`]: it takes no new relays.
pub(crate) const EXCLUDED: u64 = 1 << 16;

word_block! {
    /// A server slot's description, before its per-worker blocks.
    pub(crate) struct ServerHead {
        /// 1 while the slot belongs to a server, 0 when free.
        pub(crate) status: AtomicU64,
        /// Bumped each time the slot is taken: tells a reused slot apart.
        pub(crate) generation: AtomicU64,
        /// The listener slot whose pool it belongs to.
        pub(crate) listener: AtomicU64,
        /// Relays holding it now (connecting or connected).
        pub(crate) live: AtomicU64,
        /// How its pool judges it: the state code in bits 0–7 (0 up, 1 down,
        /// 2 wrong role, 3 check error, 4 unknown, 5 standby, 6 lagging), the reason in
        /// bits 8–15 ([`REASONS`]), and bit 16 set while it takes no new
        /// relays. 0 is up and eligible; any other value was "down" to readers
        /// of the first format.
        pub(crate) down: AtomicU64,
        /// The role the last answer reported: 0 unknown, 1 primary, 2 replica.
        pub(crate) role: AtomicU64,
        /// 1 for a backup server.
        pub(crate) backup: AtomicU64,
        /// When its last probe ended, in Unix milliseconds (0: never).
        pub(crate) checked: AtomicU64,
        /// A replica's measured replication lag in bytes, plus one (0: not
        /// measured).
        pub(crate) lag: AtomicU64,
        /// Its address as text, NUL-padded.
        pub(crate) name: [AtomicU64; NAME_WORDS],
    }
}

/// The words of state before the name.
const STATE_WORDS: usize = 9;

// The name follows the words of state (`publish` and `name` rely on it),
// and the generation is word 1 (`Arena::take_server` keeps it).
const _: () = assert!(std::mem::offset_of!(ServerHead, generation) == 8);
const _: () = assert!(std::mem::offset_of!(ServerHead, name) / 8 == STATE_WORDS);

/// A lag as [`ServerHead::lag`] holds it.
pub(crate) fn lag_word(lag: Option<u64>) -> u64 {
    lag.map_or(0, |l| l.saturating_add(1))
}

/// [`ServerHead::lag`] read back.
pub(crate) fn lag_of(word: u64) -> Option<u64> {
    word.checked_sub(1)
}

/// Fills a zeroed slot's head and publishes it (status last).
pub(super) fn publish(w: &[AtomicU64], listener: usize, addr: &str, backup: bool) {
    let head: &ServerHead = crate::sys::shared::view(w);
    write_name(&w[STATE_WORDS..], addr);
    head.listener.store(listener as u64, Ordering::Relaxed);
    head.backup.store(u64::from(backup), Ordering::Relaxed);
    head.generation.fetch_add(1, Ordering::Relaxed);
    head.status.store(1, Ordering::Release);
}

/// Marks a slot free.
pub(super) fn retire(w: &[AtomicU64]) {
    let head: &ServerHead = crate::sys::shared::view(w);
    head.status.store(0, Ordering::Release);
}

/// The name in a slot's head.
pub(super) fn name(w: &[AtomicU64]) -> String {
    read_name(&w[STATE_WORDS..])
}

/// One server's counters: its head (state for `spliced stats`) and one
/// block per worker. Gives its slot back when dropped.
pub(crate) struct ServerCounters {
    /// The arena and slot, when it lives in the stats file.
    slot: Option<(Arc<Arena>, usize)>,
    head: Placed<ServerHead>,
    blocks: Box<[Placed<ServerBlock>]>,
}

impl std::fmt::Debug for ServerCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerCounters")
            .field("slot", &self.slot.as_ref().map(|s| s.1))
            .finish_non_exhaustive()
    }
}

impl ServerCounters {
    /// Counters in anonymous memory, outside the stats file.
    pub(crate) fn detached(workers: usize, backup: bool) -> ServerCounters {
        let head_words = std::mem::size_of::<ServerHead>() / 8;
        let block_words = std::mem::size_of::<ServerBlock>() / 8;
        let map = anonymous_words(head_words + workers * block_words);
        let head: Placed<ServerHead> = Placed::new(&map, 0);
        head.backup.store(u64::from(backup), Ordering::Relaxed);
        ServerCounters {
            slot: None,
            head,
            blocks: (0..workers)
                .map(|w| Placed::new(&map, head_words + w * block_words))
                .collect(),
        }
    }

    /// The block worker `worker` writes.
    pub(crate) fn block(&self, worker: usize) -> &Placed<ServerBlock> {
        &self.blocks[worker]
    }

    /// The server's state words.
    pub(crate) fn head(&self) -> &ServerHead {
        &self.head
    }

    /// Shows the server's standing (see [`ServerHead::down`]), reported
    /// role, last check and replication lag to readers of the file.
    pub(crate) fn show(&self, standing: u64, role: u64, checked_unix_ms: u64, lag: Option<u64>) {
        self.head.lag.store(lag_word(lag), Ordering::Relaxed);
        self.head.down.store(standing, Ordering::Relaxed);
        self.head.role.store(role, Ordering::Relaxed);
        self.head.checked.store(checked_unix_ms, Ordering::Relaxed);
    }
}

impl Drop for ServerCounters {
    fn drop(&mut self) {
        if let Some((arena, slot)) = &self.slot {
            arena.free_server(*slot);
        }
    }
}

/// A listener's counters: one block per worker, and its servers'.
pub(crate) struct ListenerCounters {
    pub(crate) blocks: Box<[Block]>,
    /// Its servers, and its slot in the stats file, which is given back
    /// when the last holder of the registry goes.
    pub(crate) servers: Arc<ServerRegistry>,
}

impl ListenerCounters {
    /// Counters in anonymous memory, outside the stats file.
    pub(crate) fn detached(workers: usize) -> ListenerCounters {
        ListenerCounters {
            blocks: (0..workers).map(|_| super::detached_block()).collect(),
            servers: Arc::new(ServerRegistry::new(None, workers)),
        }
    }
}

/// Where a listener's servers count: one [`ServerCounters`] per address
/// while anything holds it.
pub(crate) struct ServerRegistry {
    /// The arena and the listener's slot in it; none: anonymous memory.
    arena: Option<(Arc<Arena>, usize)>,
    workers: usize,
    known: Mutex<HashMap<SocketAddr, Weak<ServerCounters>>>,
    /// The listener's slot, given back with the registry.
    _slot: Option<super::ListenerSlot>,
}

impl std::fmt::Debug for ServerRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerRegistry")
            .field("listener", &self.arena.as_ref().map(|a| a.1))
            .finish_non_exhaustive()
    }
}

impl ServerRegistry {
    pub(crate) fn new(arena: Option<(Arc<Arena>, usize)>, workers: usize) -> ServerRegistry {
        ServerRegistry {
            arena,
            workers: workers.max(1),
            known: Mutex::new(HashMap::new()),
            _slot: None,
        }
    }

    /// The same, giving `slot` back when dropped.
    pub(crate) fn holding(self, slot: super::ListenerSlot) -> ServerRegistry {
        ServerRegistry {
            _slot: Some(slot),
            ..self
        }
    }

    /// The counters of `addr`: the ones it has while anything holds them,
    /// else a new slot (or anonymous memory when the file is full).
    pub(crate) fn counters(&self, addr: SocketAddr, backup: bool) -> Arc<ServerCounters> {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = known.get(&addr).and_then(Weak::upgrade) {
            c.head.backup.store(u64::from(backup), Ordering::Relaxed);
            return c;
        }
        known.retain(|_, c| c.strong_count() > 0);
        let placed = self.arena.as_ref().and_then(|(arena, listener)| {
            let slot = arena.take_server(*listener, &addr.to_string(), backup)?;
            Some(ServerCounters {
                head: arena.server_head(slot),
                blocks: (0..self.workers)
                    .map(|w| arena.server_block(slot, w))
                    .collect(),
                slot: Some((Arc::clone(arena), slot)),
            })
        });
        let c = Arc::new(placed.unwrap_or_else(|| ServerCounters::detached(self.workers, backup)));
        known.insert(addr, Arc::downgrade(&c));
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::ServerStats;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_held_server_keeps_its_slot_and_a_freed_one_starts_from_zero() {
        let arena = Arena::new(2, &["a".to_string()], 0);
        let reg = arena.listener_counters(0).servers;
        let one = reg.counters(addr(1), false);
        one.block(1)
            .connect_attempts
            .fetch_add(3, Ordering::Relaxed);
        let again = reg.counters(addr(1), false);
        assert!(Arc::ptr_eq(&one, &again), "one slot per address while held");
        let snap = arena.snapshot();
        assert_eq!(snap.servers.len(), 1);
        let s = &snap.servers[0];
        assert_eq!((s.listener.as_str(), s.addr.as_str()), ("a", "127.0.0.1:1"));
        assert_eq!(s.total().connect_attempts, 3);
        let first_generation = s.generation;
        drop((one, again));
        assert!(
            arena.snapshot().servers.is_empty(),
            "freed with its last holder"
        );
        let back = reg.counters(addr(1), true);
        let snap = arena.snapshot();
        assert_eq!(snap.servers[0].total(), ServerStats::default());
        assert!(snap.servers[0].backup);
        assert_ne!(snap.servers[0].generation, first_generation);
        drop(back);
    }

    #[test]
    fn listeners_a_reload_adds_take_the_spare_slots_then_count_in_memory() {
        let arena = Arena::new(1, &["a".to_string(), "handoff".to_string()], 0);
        arena.mark_handoff(1);
        let spare = super::super::MIN_SPARE_LISTENERS;
        let added: Vec<_> = (0..=spare)
            .map(|i| arena.add_listener(&format!("l{i}")))
            .collect();
        added[0].blocks[0]
            .relays_accepted
            .fetch_add(2, Ordering::Relaxed);
        added[spare].blocks[0]
            .relays_accepted
            .fetch_add(9, Ordering::Relaxed);
        let snap = arena.snapshot();
        let names: Vec<&str> = snap.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names.len(), 2 + spare, "one more than the room: in memory");
        assert_eq!((names[0], names[1]), ("a", "l0"));
        assert_eq!(names.last(), Some(&"handoff"), "handoff is read last");
        assert_eq!(snap.listeners[1].total().relays_accepted, 2);
        assert_eq!(
            snap.total().relays_accepted,
            2,
            "the one past the room is not in the file"
        );
    }

    #[test]
    fn a_full_file_counts_in_memory() {
        let arena = Arena::new(1, &["a".to_string()], 0);
        let reg = arena.listener_counters(0).servers;
        let held: Vec<_> = (0..super::super::MIN_SERVER_SLOTS as u16)
            .map(|p| reg.counters(addr(p + 1), false))
            .collect();
        let extra = reg.counters(addr(60000), false);
        extra.block(0).connects.fetch_add(1, Ordering::Relaxed);
        assert_eq!(arena.snapshot().servers.len(), held.len());
    }
}

/// Servers that come and go with a pool's membership (a reload's new pool,
/// a re-resolution): what the file shows.
#[cfg(test)]
mod membership {
    use super::*;
    use crate::config::PoolConfig;
    use crate::upstream::{Member, Pool};
    use std::time::Instant;

    fn members(ports: &[u16]) -> Vec<Member> {
        ports
            .iter()
            .map(|&p| Member {
                addr: SocketAddr::from(([127, 0, 0, 1], p)),
                weight: 1,
                backup: false,
                check_port: None,
            })
            .collect()
    }

    fn shown(arena: &Arena) -> Vec<(String, u64)> {
        let mut out: Vec<_> = arena
            .snapshot()
            .servers
            .iter()
            .map(|s| (s.addr.clone(), s.total().connect_attempts))
            .collect();
        out.sort();
        out
    }

    #[test]
    fn a_removed_server_stays_while_a_relay_holds_it_and_a_kept_one_keeps_counting() {
        let arena = Arena::new(1, &["db".to_string()], 0);
        let registry = arena.listener_counters(0).servers;
        let fleet = crate::upstream::Fleet::new();
        let config = PoolConfig::new(Vec::new());
        let old = Pool::new("db", None, &config, Arc::clone(&registry), &fleet);
        old.set_members(members(&[1, 2]));
        let client = "192.0.2.1".parse().unwrap();
        let lease = old.pick(0, client, &[], Instant::now()).expect("a server");
        lease
            .server
            .block(0)
            .connect_attempts
            .fetch_add(5, Ordering::Relaxed);
        let held = lease.server.addr.port();
        let other = if held == 1 { 2 } else { 1 };
        for s in old.members().servers.iter() {
            s.block(0).connect_attempts.fetch_add(1, Ordering::Relaxed);
        }
        // A reload: the listener's new pool keeps only the other address.
        let new = Pool::new("db", None, &config, Arc::clone(&registry), &fleet);
        new.set_members(members(&[other]));
        drop(old);
        let name = |p: u16| format!("127.0.0.1:{p}");
        assert_eq!(shown(&arena), {
            let mut v = vec![(name(held), 6), (name(other), 1)];
            v.sort();
            v
        });
        assert_eq!(
            arena
                .snapshot()
                .servers
                .iter()
                .map(|s| s.active)
                .sum::<u64>(),
            1
        );
        // Its last relay gone, the removed server leaves the file.
        drop(lease);
        assert_eq!(shown(&arena), vec![(name(other), 1)]);
        // A re-resolution that brings it back starts it from zero.
        new.set_members(members(&[1, 2]));
        assert!(shown(&arena).contains(&(name(held), 0)));
        assert!(shown(&arena).contains(&(name(other), 1)));
    }
}
