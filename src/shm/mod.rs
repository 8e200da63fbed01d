//! The stats file: every counter block of a running instance, placed in
//! one shared mapping that the workers write directly and `spliced stats`
//! (or anything else) maps read-only.
//!
//! The file is a run of `u64` words, all read and written atomically:
//!
//! ```text
//! header   HEADER_WORDS words: magic, version, layout, pid, start, sizes, state
//! names    NAME_WORDS per listener slot: its name, UTF-8, NUL-padded
//! workers  one CounterBlock per worker (worker-scoped counters)
//! listener one CounterBlock per listener slot and worker, listener-major
//! servers  per server slot: a ServerHead, then one ServerBlock per worker
//! ```
//!
//! The file has room for more listeners and servers than the config starts
//! with, so a reload or a DNS change never moves or resizes it: a listener
//! a reload adds takes the next free listener slot (slots of listeners are
//! never given back: a removed listener's counters keep counting in the
//! totals), and a server takes a free server slot for as long as anything
//! (its pool, a relay connected to it) holds it. The header says how many
//! slots of each kind were ever used, so a reader looks no further. When
//! the room runs out, the newcomer counts in anonymous memory, with a
//! warning, and is missing from `spliced stats` and `/metrics`.
//!
//! The handoff pseudo-listener's slot is named in the header. Nothing on
//! the data path changes: a worker's counter store lands in the mapping
//! instead of on the heap. Without an instance name the same layout lives
//! in an anonymous mapping, so the library and tests take the same path.
//!
//! A new file is built beside the old one and renamed over it, so a reader
//! still mapping a dead instance's file never sees it change size.

mod file;
mod servers;
pub use servers::{REASONS, STATES};
mod view;

use file::CreateError;
pub use file::{check_instance_name, stats_path, take_over_from, InstanceNameError};
pub(crate) use servers::{ListenerCounters, ServerCounters, ServerHead, ServerRegistry, EXCLUDED};
pub use view::{InstanceState, ListenerSnapshot, Liveness, ServerSnapshot, Snapshot, StatsFile};

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use memmap2::{MmapOptions, MmapRaw};

use crate::error::StartError;
use crate::ops::Ops;
use crate::stats::{CounterBlock, ServerBlock, COUNTERS, SERVER_COUNTERS};
use crate::sys::shared::{words, Placed};

/// A counter block as the workers hold it: a place in the mapping.
pub(crate) type Block = Placed<CounterBlock>;

/// "SPLICEDS" as a little-endian word.
const MAGIC: u64 = u64::from_le_bytes(*b"SPLICEDS");
/// Format 2 added listener and server slots beyond the configured ones;
/// format 3 moved a server block's connect buckets after its counters (the
/// blocks are laid out by the counter tables: counters, per-reason arrays,
/// histogram buckets).
const VERSION: u64 = 3;
const HEADER_WORDS: usize = 16;
/// Words of a listener's name: 64 bytes.
const NAME_WORDS: usize = 8;
const BLOCK_WORDS: usize = std::mem::size_of::<CounterBlock>() / 8;
const SERVER_HEAD_WORDS: usize = std::mem::size_of::<ServerHead>() / 8;
const SERVER_BLOCK_WORDS: usize = std::mem::size_of::<ServerBlock>() / 8;
/// Server slots at least; more when the config starts with many servers.
const MIN_SERVER_SLOTS: usize = 1024;
/// Listener slots beyond the configured ones, at least.
const MIN_SPARE_LISTENERS: usize = 64;

// Header word positions.
const H_MAGIC: usize = 0;
const H_VERSION: usize = 1;
const H_LAYOUT: usize = 2;
const H_PID: usize = 3;
const H_START_TICKS: usize = 4;
const H_START_UNIX: usize = 5;
const H_WORKERS: usize = 6;
const H_LISTENERS: usize = 7;
const H_BLOCK_WORDS: usize = 8;
const H_STATE: usize = 9;
/// Listener slots used so far (never more than `H_LISTENERS`, the room).
const H_LISTENERS_USED: usize = 10;
/// Room for server slots, and words per slot (head and every worker's block).
const H_SERVERS: usize = 11;
const H_SERVER_WORDS: usize = 12;
/// Server slots used so far: no live slot lies beyond.
const H_SERVERS_USED: usize = 13;
/// The handoff pseudo-listener's slot, plus one (0: none).
const H_HANDOFF: usize = 14;

/// A fingerprint of the counter table and block size: a reader built from
/// another table refuses the file instead of showing wrong numbers.
fn layout_hash() -> u64 {
    // FNV-1a: stable across builds, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for &b in bytes {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    };
    for name in COUNTERS.names() {
        eat(name.as_bytes());
        eat(&[0]);
    }
    eat(&(BLOCK_WORDS as u64).to_le_bytes());
    for name in SERVER_COUNTERS.names() {
        eat(name.as_bytes());
        eat(&[0]);
    }
    eat(&(SERVER_HEAD_WORDS as u64).to_le_bytes());
    eat(&(SERVER_BLOCK_WORDS as u64).to_le_bytes());
    h
}

/// Where things are in a file of a given shape.
#[derive(Clone, Copy, Debug)]
struct Shape {
    workers: usize,
    /// Listener slots.
    listeners: usize,
    /// Server slots.
    servers: usize,
}

impl Shape {
    fn server_words(&self) -> usize {
        SERVER_HEAD_WORDS + self.workers * SERVER_BLOCK_WORDS
    }

    fn name_at(&self, listener: usize) -> usize {
        HEADER_WORDS + listener * NAME_WORDS
    }

    fn blocks_start(&self) -> usize {
        HEADER_WORDS + self.listeners * NAME_WORDS
    }

    fn worker_block_at(&self, worker: usize) -> usize {
        self.blocks_start() + worker * BLOCK_WORDS
    }

    fn listener_block_at(&self, listener: usize, worker: usize) -> usize {
        self.blocks_start() + (self.workers + listener * self.workers + worker) * BLOCK_WORDS
    }

    fn server_at(&self, slot: usize) -> usize {
        let start =
            self.blocks_start() + (self.workers + self.listeners * self.workers) * BLOCK_WORDS;
        start + slot * self.server_words()
    }

    fn server_block_at(&self, slot: usize, worker: usize) -> usize {
        self.server_at(slot) + SERVER_HEAD_WORDS + worker * SERVER_BLOCK_WORDS
    }

    fn total_words(&self) -> usize {
        self.server_at(self.servers)
    }
}

/// What a running instance is doing, as the stats file and `/healthz` show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Running = 1,
    Draining = 2,
    Stopped = 3,
}

/// A listener slot held by a listener's counters; given back on drop.
pub(crate) struct ListenerSlot {
    arena: Arc<Arena>,
    index: usize,
    name: String,
}

impl std::fmt::Debug for ListenerSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerSlot")
            .field("index", &self.index)
            .field("name", &self.name)
            .finish()
    }
}

impl Drop for ListenerSlot {
    fn drop(&mut self) {
        self.arena.free_listener(self.index, &self.name);
    }
}

/// The mapping every counter block of one runtime lives in.
pub(crate) struct Arena {
    map: Arc<MmapRaw>,
    shape: Shape,
    /// The file to remove when the runtime ends (none when anonymous).
    path: Option<PathBuf>,
    slots: Mutex<Slots>,
}

/// Which slots are taken.
#[derive(Debug, Default)]
struct Slots {
    listeners_used: usize,
    servers_used: usize,
    /// Server slots below `servers_used` given back, lowest first.
    free_servers: BTreeSet<usize>,
    /// Listener slots given back, with the name they had.
    free_listeners: Vec<(usize, String)>,
    /// A "no room" warning was logged already.
    warned: bool,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("shape", &self.shape)
            .field("path", &self.path)
            .finish()
    }
}

impl Arena {
    /// An arena for `workers` workers and the listeners named `names` (the
    /// handoff pseudo-listener included), with room for more listeners and
    /// for at least `servers` servers. With an instance name (`ops`) it is
    /// that instance's stats file; when the file cannot be made (or another
    /// live process owns it) the reason is logged and the counters live in
    /// an anonymous mapping: the proxy runs, `spliced stats` cannot see it.
    /// The one error is a file that cannot be given to `ops.stats_group`.
    pub(crate) fn create(
        workers: usize,
        names: &[String],
        ops: &Ops,
        servers: usize,
    ) -> Result<Arc<Arena>, StartError> {
        let shape = Shape {
            workers: workers.max(1),
            listeners: names.len() + names.len().max(MIN_SPARE_LISTENERS),
            servers: (4 * servers).max(MIN_SERVER_SLOTS),
        };
        // The file is sparse: slots never used cost no memory.
        let len = shape.total_words() * 8;
        let mut filed = None;
        if let Some(name) = ops.instance.as_deref() {
            let path = stats_path(name);
            match file::create_file(&path, len, ops.stats_group.as_ref()) {
                Ok(map) => filed = Some((map, path)),
                Err(CreateError::Group(group, e)) => {
                    return Err(StartError::Io(
                        format!(
                            "give the stats file {} to group '{}' (stats-group; this user must be a member of it)",
                            path.display(),
                            group.name
                        ),
                        e,
                    ))
                }
                Err(CreateError::File(e)) => tracing::warn!(
                    instance = name,
                    path = %path.display(),
                    error = %e,
                    "no stats file: `spliced stats` cannot see this instance (the admin endpoint still works)"
                ),
            }
        }
        let (map, path) = match filed {
            Some((map, path)) => (map, Some(path)),
            // An anonymous mapping of a few KiB only fails when memory is
            // exhausted, which nothing else would survive either.
            None => (
                anonymous(len).expect("map anonymous memory for counters"),
                None,
            ),
        };
        let arena = Arena {
            map: Arc::new(map),
            shape,
            path,
            slots: Mutex::new(Slots {
                listeners_used: names.len(),
                ..Slots::default()
            }),
        };
        arena.init(names);
        Ok(Arc::new(arena))
    }

    /// An arena in anonymous memory (no instance name, no file).
    #[cfg(test)]
    pub(crate) fn new(workers: usize, names: &[String], servers: usize) -> Arc<Arena> {
        match Arena::create(workers, names, &Ops::default(), servers) {
            Ok(arena) => arena,
            Err(e) => unreachable!("an anonymous arena has no file to fail: {e}"),
        }
    }

    fn init(&self, names: &[String]) {
        let w = words(&self.map);
        let set = |i: usize, v: u64| w[i].store(v, Ordering::Relaxed);
        set(H_VERSION, VERSION);
        set(H_LAYOUT, layout_hash());
        set(H_PID, u64::from(std::process::id()));
        set(
            H_START_TICKS,
            view::start_ticks(std::process::id()).unwrap_or(0),
        );
        let unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        set(H_START_UNIX, unix);
        set(H_WORKERS, self.shape.workers as u64);
        set(H_LISTENERS, self.shape.listeners as u64);
        set(H_BLOCK_WORDS, BLOCK_WORDS as u64);
        set(H_STATE, State::Running as u64);
        set(H_LISTENERS_USED, names.len() as u64);
        set(H_SERVERS, self.shape.servers as u64);
        set(H_SERVER_WORDS, self.shape.server_words() as u64);
        for (i, name) in names.iter().enumerate() {
            self.name_listener(i, name);
        }
        // Published last: a reader that sees the magic sees the rest.
        w[H_MAGIC].store(MAGIC, Ordering::Release);
    }

    /// Sets the name listener `index` goes by (cut to 64 bytes). A reader
    /// may see a name half-changed for a moment, never invalid memory.
    pub(crate) fn name_listener(&self, index: usize, name: &str) {
        assert!(index < self.shape.listeners);
        write_name(&words(&self.map)[self.shape.name_at(index)..], name);
    }

    /// Worker `worker`'s block of worker-scoped counters.
    pub(crate) fn worker_block(&self, worker: usize) -> Block {
        assert!(worker < self.shape.workers);
        Placed::new(&self.map, self.shape.worker_block_at(worker))
    }

    /// The counters of listener slot `listener` (one of the names the
    /// arena was made with): one block per worker, and its servers' slots.
    /// The slot is given back when the last holder of its counters goes.
    pub(crate) fn listener_counters(self: &Arc<Self>, listener: usize) -> ListenerCounters {
        assert!(listener < self.slots().listeners_used);
        let blocks = (0..self.shape.workers)
            .map(|w| Placed::new(&self.map, self.shape.listener_block_at(listener, w)))
            .collect();
        let name = read_name(&words(&self.map)[self.shape.name_at(listener)..]);
        ListenerCounters {
            blocks,
            servers: Arc::new(
                ServerRegistry::new(Some((Arc::clone(self), listener)), self.shape.workers)
                    .holding(ListenerSlot {
                        arena: Arc::clone(self),
                        index: listener,
                        name,
                    }),
            ),
        }
    }

    /// Counters for a listener a reload adds: the slot a listener of the
    /// same name gave back (its counters go on: one identity per name),
    /// else any slot given back (zeroed), else the next never used; in
    /// anonymous memory (with a warning) when none is left.
    pub(crate) fn add_listener(self: &Arc<Self>, name: &str) -> ListenerCounters {
        let slot = {
            let mut slots = self.slots();
            let same = slots.free_listeners.iter().position(|(_, n)| n == name);
            if let Some(at) = same.or((!slots.free_listeners.is_empty()).then_some(0)) {
                let (index, old) = slots.free_listeners.remove(at);
                if old != name {
                    self.zero_listener(index);
                }
                self.name_listener(index, name);
                Some(index)
            } else if slots.listeners_used < self.shape.listeners {
                self.name_listener(slots.listeners_used, name);
                slots.listeners_used += 1;
                words(&self.map)[H_LISTENERS_USED]
                    .store(slots.listeners_used as u64, Ordering::Release);
                Some(slots.listeners_used - 1)
            } else {
                self.no_room(&mut slots, "listener", name);
                None
            }
        };
        match slot {
            Some(i) => self.listener_counters(i),
            None => ListenerCounters::detached(self.shape.workers),
        }
    }

    /// Gives a listener slot back: readers no longer list it (its name is
    /// cleared); a later listener of the same name takes it again.
    fn free_listener(&self, index: usize, name: &str) {
        write_name(&words(&self.map)[self.shape.name_at(index)..], "");
        self.slots().free_listeners.push((index, name.to_string()));
    }

    fn zero_listener(&self, index: usize) {
        let w = words(&self.map);
        for worker in 0..self.shape.workers {
            let at = self.shape.listener_block_at(index, worker);
            for word in &w[at..at + BLOCK_WORDS] {
                word.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Gives the named slots from `first` on back, under their names, so
    /// that listeners of those names take them (in that order) when they
    /// are put in force: the start does that as a reload from nothing.
    pub(crate) fn keep_for_later(&self, first: usize) {
        let used = self.slots().listeners_used;
        for index in first..used {
            let name = read_name(&words(&self.map)[self.shape.name_at(index)..]);
            self.free_listener(index, &name);
        }
    }

    /// Marks listener slot `listener` as the handoff pseudo-listener.
    pub(crate) fn mark_handoff(&self, listener: usize) {
        words(&self.map)[H_HANDOFF].store(listener as u64 + 1, Ordering::Relaxed);
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn no_room(&self, slots: &mut Slots, what: &str, name: &str) {
        if !std::mem::replace(&mut slots.warned, true) {
            tracing::warn!(
                listeners = self.shape.listeners,
                servers = self.shape.servers,
                "the stats file has no room left for {what} {name} (nor any other until a restart): it counts in memory only, missing from `spliced stats` and /metrics"
            );
        }
    }

    /// Takes a free server slot for `addr` of listener slot `listener` and
    /// returns where it starts; `None` when none is left. Its words are
    /// zeroed before it is published, so a reused slot starts from zero.
    fn take_server(&self, listener: usize, addr: &str, backup: bool) -> Option<usize> {
        let mut slots = self.slots();
        let slot = match slots.free_servers.pop_first() {
            Some(slot) => slot,
            None if slots.servers_used < self.shape.servers => {
                slots.servers_used += 1;
                words(&self.map)[H_SERVERS_USED]
                    .store(slots.servers_used as u64, Ordering::Release);
                slots.servers_used - 1
            }
            None => {
                self.no_room(&mut slots, "server", addr);
                return None;
            }
        };
        let w = words(&self.map);
        let at = self.shape.server_at(slot);
        // All but the generation (word 1), which `publish` moves on.
        for (i, word) in w[at..at + self.shape.server_words()].iter().enumerate() {
            if i != 1 {
                word.store(0, Ordering::Relaxed);
            }
        }
        servers::publish(&w[at..], listener, addr, backup);
        Some(slot)
    }

    /// Gives a server slot back once nothing holds its server.
    fn free_server(&self, slot: usize) {
        servers::retire(&words(&self.map)[self.shape.server_at(slot)..]);
        self.slots().free_servers.insert(slot);
    }

    fn server_head(&self, slot: usize) -> Placed<ServerHead> {
        Placed::new(&self.map, self.shape.server_at(slot))
    }

    fn server_block(&self, slot: usize, worker: usize) -> Placed<ServerBlock> {
        Placed::new(&self.map, self.shape.server_block_at(slot, worker))
    }

    pub(crate) fn set_state(&self, state: State) {
        words(&self.map)[H_STATE].store(state as u64, Ordering::Relaxed);
    }

    /// The stats file, when there is one.
    pub(crate) fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Everything in the arena now, as a reader of the file would see it.
    pub(crate) fn snapshot(&self) -> Snapshot {
        view::read(words(&self.map)).expect("this process's own arena is well-formed")
    }
}

impl Arena {
    /// Marks the instance stopped and removes its stats file. Called when
    /// the workers are gone; the mapping itself lives on while anything
    /// (a signal thread's controller, say) still holds it.
    pub(crate) fn retire(&self) {
        self.set_state(State::Stopped);
        if let Some(path) = &self.path {
            // Only our own file: a later instance of the same name may
            // have replaced it already.
            let ours = StatsFile::open(path).is_ok_and(|f| f.pid() == std::process::id());
            if ours {
                let _ = fs::remove_file(path);
            }
        }
    }
}

impl Drop for Arena {
    fn drop(&mut self) {
        self.retire();
    }
}

/// A block of its own in anonymous memory, outside the stats file: for
/// unit tests.
pub(crate) fn detached_block() -> Block {
    Placed::new(&anonymous_words(BLOCK_WORDS), 0)
}

fn anonymous(len: usize) -> io::Result<MmapRaw> {
    Ok(MmapOptions::new().len(len).map_anon()?.into())
}

/// `n` words of their own in anonymous memory (counters kept outside the
/// file when it has no room).
fn anonymous_words(n: usize) -> Arc<MmapRaw> {
    // A few KiB only fail to map when memory is exhausted, which nothing
    // else would survive either.
    Arc::new(anonymous(n.max(1) * 8).expect("map anonymous memory for counters"))
}

/// Stores `name` (cut to 64 bytes on a char boundary) in the first
/// NAME_WORDS of `w`, NUL-padded. A reader may see it half-changed for a
/// moment, never invalid memory.
fn write_name(w: &[AtomicU64], name: &str) {
    let mut bytes = [0u8; NAME_WORDS * 8];
    let n = floor_char_boundary(name, bytes.len());
    bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
    for (j, chunk) in bytes.chunks_exact(8).enumerate() {
        let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        w[j].store(word, Ordering::Relaxed);
    }
}

/// The name stored by [`write_name`].
fn read_name(w: &[AtomicU64]) -> String {
    let mut bytes = Vec::with_capacity(NAME_WORDS * 8);
    for word in &w[..NAME_WORDS] {
        bytes.extend_from_slice(&word.load(Ordering::Relaxed).to_le_bytes());
    }
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// The longest prefix of `s` of at most `max` bytes that ends on a char.
fn floor_char_boundary(s: &str, max: usize) -> usize {
    (0..=max.min(s.len()))
        .rev()
        .find(|&i| s.is_char_boundary(i))
        .unwrap_or(0)
}

/// Loads a word with acquire ordering (the magic).
fn load_acquire(w: &AtomicU64) -> u64 {
    w.load(Ordering::Acquire)
}

#[cfg(test)]
mod tests;
