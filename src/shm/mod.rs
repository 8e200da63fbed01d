//! The stats file: every counter block of a running instance, placed in
//! one shared mapping that the workers write directly and `spliced stats`
//! (or anything else) maps read-only.
//!
//! The file is a run of `u64` words, all read and written atomically:
//!
//! ```text
//! header   HEADER_WORDS words: magic, version, layout, pid, start, sizes, state
//! names    NAME_WORDS per listener: its name, UTF-8, NUL-padded
//! workers  one CounterBlock per worker (worker-scoped counters)
//! listener one CounterBlock per listener and worker, listener-major
//! ```
//!
//! The last listener is the pseudo-listener of handed-off pairs. Nothing on
//! the data path changes: a worker's counter store lands in the mapping
//! instead of on the heap. Without an instance name the same layout lives
//! in an anonymous mapping, so the library and tests take the same path.
//!
//! A new file is built beside the old one and renamed over it, so a reader
//! still mapping a dead instance's file never sees it change size.

mod view;

pub use view::{InstanceState, ListenerSnapshot, Liveness, Snapshot, StatsFile};

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use memmap2::{MmapOptions, MmapRaw};

use crate::stats::{CounterBlock, COUNTERS};
use crate::sys::shared::{words, Placed};

/// A counter block as the workers hold it: a place in the mapping.
pub(crate) type Block = Placed<CounterBlock>;

/// "SPLICEDS" as a little-endian word.
const MAGIC: u64 = u64::from_le_bytes(*b"SPLICEDS");
const VERSION: u64 = 1;
const HEADER_WORDS: usize = 16;
/// Words of a listener's name: 64 bytes.
const NAME_WORDS: usize = 8;
const BLOCK_WORDS: usize = std::mem::size_of::<CounterBlock>() / 8;

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
    for c in COUNTERS {
        eat(c.name.as_bytes());
        eat(&[0]);
    }
    eat(&(BLOCK_WORDS as u64).to_le_bytes());
    h
}

fn total_words(workers: usize, listeners: usize) -> usize {
    HEADER_WORDS + listeners * NAME_WORDS + (workers + listeners * workers) * BLOCK_WORDS
}

/// Where instance `name`'s stats file lives: under `$RUNTIME_DIRECTORY`
/// (set by systemd's `RuntimeDirectory=`), else `$XDG_RUNTIME_DIR/spliced`,
/// else `/run/spliced`.
pub fn stats_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| {
            // systemd joins several directories with ':'; the first is ours.
            let first = v.to_string_lossy().split(':').next()?.to_string();
            (!first.is_empty()).then(|| PathBuf::from(first))
        })
        .or_else(|| {
            std::env::var_os("XDG_RUNTIME_DIR")
                .filter(|v| !v.is_empty())
                .map(|d| PathBuf::from(d).join("spliced"))
        })
        .unwrap_or_else(|| PathBuf::from("/run/spliced"));
    dir.join(format!("{name}.stats"))
}

/// Checks an instance name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting
/// with a dot (it names a file).
pub fn check_instance_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "instance name '{name}' must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"
        ))
    }
}

/// What a running instance is doing, as the stats file and `/healthz` show it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Running = 1,
    Draining = 2,
    Stopped = 3,
}

/// The mapping every counter block of one runtime lives in.
pub(crate) struct Arena {
    map: Arc<MmapRaw>,
    workers: usize,
    listeners: usize,
    /// The file to remove when the runtime ends (none when anonymous).
    path: Option<PathBuf>,
}

impl std::fmt::Debug for Arena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Arena")
            .field("workers", &self.workers)
            .field("listeners", &self.listeners)
            .field("path", &self.path)
            .finish()
    }
}

impl Arena {
    /// An arena for `workers` workers and the listeners named `names` (the
    /// handoff pseudo-listener included). With an instance name it is that
    /// instance's stats file; when the file cannot be made (or another live
    /// process owns it) the reason is logged and the counters live in an
    /// anonymous mapping: the proxy runs, `spliced stats` cannot see it.
    pub(crate) fn new(workers: usize, names: &[String], instance: Option<&str>) -> Arc<Arena> {
        let workers = workers.max(1);
        let len = total_words(workers, names.len()) * 8;
        let filed = instance.and_then(|name| {
            let path = stats_path(name);
            match create_file(&path, len) {
                Ok(map) => Some((map, path)),
                Err(e) => {
                    tracing::warn!(
                        instance = name,
                        path = %path.display(),
                        error = %e,
                        "no stats file: `spliced stats` cannot see this instance (the admin endpoint still works)"
                    );
                    None
                }
            }
        });
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
            workers,
            listeners: names.len(),
            path,
        };
        arena.init(names);
        Arc::new(arena)
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
        set(H_WORKERS, self.workers as u64);
        set(H_LISTENERS, self.listeners as u64);
        set(H_BLOCK_WORDS, BLOCK_WORDS as u64);
        set(H_STATE, State::Running as u64);
        for (i, name) in names.iter().enumerate() {
            self.name_listener(i, name);
        }
        // Published last: a reader that sees the magic sees the rest.
        w[H_MAGIC].store(MAGIC, Ordering::Release);
    }

    /// Sets the name listener `index` goes by (cut to 64 bytes). A reader
    /// may see a name half-changed for a moment, never invalid memory.
    pub(crate) fn name_listener(&self, index: usize, name: &str) {
        assert!(index < self.listeners);
        let w = words(&self.map);
        let mut bytes = [0u8; NAME_WORDS * 8];
        let n = floor_char_boundary(name, bytes.len());
        bytes[..n].copy_from_slice(&name.as_bytes()[..n]);
        for (j, chunk) in bytes.chunks_exact(8).enumerate() {
            let word = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
            w[HEADER_WORDS + index * NAME_WORDS + j].store(word, Ordering::Relaxed);
        }
    }

    fn blocks_start(&self) -> usize {
        HEADER_WORDS + self.listeners * NAME_WORDS
    }

    /// Worker `worker`'s block of worker-scoped counters.
    pub(crate) fn worker_block(&self, worker: usize) -> Block {
        assert!(worker < self.workers);
        Placed::new(&self.map, self.blocks_start() + worker * BLOCK_WORDS)
    }

    /// Listener `listener`'s blocks, one per worker.
    pub(crate) fn listener_blocks(&self, listener: usize) -> Box<[Block]> {
        assert!(listener < self.listeners);
        let first = self.blocks_start() + (self.workers + listener * self.workers) * BLOCK_WORDS;
        (0..self.workers)
            .map(|w| Placed::new(&self.map, first + w * BLOCK_WORDS))
            .collect()
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

/// A block of its own in anonymous memory, outside the stats file: for a
/// listener a reload added, and for unit tests.
pub(crate) fn detached_block() -> Block {
    Arena::new(1, &[], None).worker_block(0)
}

fn anonymous(len: usize) -> io::Result<MmapRaw> {
    Ok(MmapOptions::new().len(len).map_anon()?.into())
}

/// Builds the file under a temporary name and renames it into place,
/// refusing when a live process owns the current one.
fn create_file(path: &Path, len: usize) -> io::Result<MmapRaw> {
    if let Ok(existing) = StatsFile::open(path) {
        if existing.liveness() == Liveness::Running && existing.pid() != std::process::id() {
            return Err(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "instance name in use by running pid {}; give this one another name",
                    existing.pid()
                ),
            ));
        }
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("stats.{}.tmp", std::process::id()));
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)?;
    let made = file
        .set_len(len as u64)
        .and_then(|()| MmapOptions::new().map_raw(&file))
        .and_then(|map| fs::rename(&tmp, path).map(|()| map));
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made
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
mod tests {
    use super::*;

    #[test]
    fn blocks_handed_out_are_what_a_reader_sees() {
        let names = vec!["127.0.0.1:6432".to_string(), "handoff".to_string()];
        let arena = Arena::new(2, &names, None);
        let l0 = arena.listener_blocks(0);
        let l1 = arena.listener_blocks(1);
        CounterBlock::add(&l0[1].bytes_spliced, 10);
        CounterBlock::add(&l1[0].relays_accepted, 3);
        CounterBlock::add(&arena.worker_block(1).pipes_in_use, 2);
        let snap = arena.snapshot();
        assert_eq!(snap.listeners.len(), 2);
        assert_eq!(snap.listeners[0].name, "127.0.0.1:6432");
        assert_eq!(snap.listeners[0].total().bytes_spliced, 10);
        assert_eq!(snap.listeners[1].workers[0].relays_accepted, 3);
        assert_eq!(snap.workers[1].pipes_in_use, 2);
        assert_eq!(snap.state, InstanceState::Running);
        arena.set_state(State::Draining);
        assert_eq!(arena.snapshot().state, InstanceState::Draining);
    }

    #[test]
    fn a_long_name_is_cut_on_a_char_boundary() {
        let name = "é".repeat(40);
        let arena = Arena::new(1, &[name], None);
        let got = &arena.snapshot().listeners[0].name;
        assert_eq!(got.len(), 64);
        assert!(got.chars().all(|c| c == 'é'));
    }

    #[test]
    fn instance_names_are_file_names() {
        assert!(check_instance_name("pg-main_1.a").is_ok());
        for bad in ["", ".hidden", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_instance_name(bad).is_err(), "{bad}");
        }
    }
}
