//! Reading a stats file: validate the header, tell a live instance from a
//! dead one, and sum its counter blocks into a [`Snapshot`].

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use super::*;
use crate::stats::{ServerStats, Stats};
use crate::sys::shared::view;

/// What the instance said it was doing when last seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum InstanceState {
    Running,
    Draining,
    Stopped,
}

/// Whether the process that wrote a stats file still runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Liveness {
    Running,
    /// The pid is gone, or now belongs to another process.
    Dead,
}

/// One listener's counters, per worker.
#[derive(Clone, Debug)]
pub struct ListenerSnapshot {
    pub name: String,
    /// Index `i` is worker `i`'s block.
    pub workers: Vec<Stats>,
}

impl ListenerSnapshot {
    /// The listener's counters summed over the workers.
    pub fn total(&self) -> Stats {
        self.workers
            .iter()
            .cloned()
            .fold(Stats::default(), |a, b| a + b)
    }
}

/// One server of a listener's pool: its state and counters, per worker.
#[derive(Clone, Debug)]
pub struct ServerSnapshot {
    /// The listener whose pool it is in.
    pub listener: String,
    /// Its address.
    pub addr: String,
    /// Changes when its slot is given to another server (or the same
    /// address again): counters start from zero then.
    pub generation: u64,
    /// It takes new relays.
    pub up: bool,
    /// `up`, `down`, `wrong-role`, `check-error`, `unknown`, `standby` or
    /// `lagging`.
    pub state: &'static str,
    /// Why it is in that state (empty when up).
    pub reason: &'static str,
    /// When its last probe ended, in Unix milliseconds (0: never).
    pub checked_unix_ms: u64,
    /// The role the last answer reported: `primary`, `replica` or `unknown`.
    pub role: &'static str,
    pub backup: bool,
    /// Relays holding it now (connecting or connected).
    pub active: u64,
    /// A replica's measured replication lag, in bytes.
    pub lag: Option<u64>,
    /// Index `i` is worker `i`'s block.
    pub workers: Vec<ServerStats>,
}

impl ServerSnapshot {
    /// The server's counters summed over the workers.
    pub fn total(&self) -> ServerStats {
        let mut sum = ServerStats::default();
        for w in &self.workers {
            sum += w;
        }
        sum
    }
}

/// Every counter of an instance at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub pid: u32,
    /// Seconds since the Unix epoch when the instance started.
    pub started_unix: u64,
    pub state: InstanceState,
    /// Worker-scoped counters (pipes, buffers, timers), one per worker.
    pub workers: Vec<Stats>,
    /// Listener-scoped counters, in the order the listeners came (those a
    /// reload added after the ones the instance started with); the last
    /// entry is `handoff`.
    pub listeners: Vec<ListenerSnapshot>,
    /// Every server of every listener's pool (and those still held by
    /// relays after leaving it), in slot order.
    pub servers: Vec<ServerSnapshot>,
}

impl Snapshot {
    /// Everything summed: listeners and workers.
    pub fn total(&self) -> Stats {
        let workers = self
            .workers
            .iter()
            .cloned()
            .fold(Stats::default(), |a, b| a + b);
        self.listeners
            .iter()
            .map(|l| l.total())
            .fold(workers, |a, b| a + b)
    }
}

/// Sums the blocks in `w`, a whole arena's words.
pub(super) fn read(w: &[AtomicU64]) -> io::Result<Snapshot> {
    let bad = |why: String| io::Error::new(io::ErrorKind::InvalidData, why);
    if w.len() < HEADER_WORDS || load_acquire(&w[H_MAGIC]) != MAGIC {
        return Err(bad("not a spliced stats file (or not written yet)".into()));
    }
    let get = |i: usize| w[i].load(Ordering::Relaxed);
    if get(H_VERSION) != VERSION {
        return Err(bad(format!(
            "stats file format {} is not the format {VERSION} this spliced reads; use the `spliced stats` of the version that runs (`{} --version`)",
            get(H_VERSION),
            std::env::args().next().unwrap_or_else(|| "spliced".into()),
        )));
    }
    if get(H_LAYOUT) != layout_hash()
        || get(H_BLOCK_WORDS) != BLOCK_WORDS as u64
        || get(H_SERVER_WORDS)
            != (SERVER_HEAD_WORDS + get(H_WORKERS) as usize * SERVER_BLOCK_WORDS) as u64
    {
        return Err(bad(
            "written by a spliced with another counter layout (same format, other counters); use the same version's `spliced stats`".into(),
        ));
    }
    let shape = Shape {
        workers: get(H_WORKERS) as usize,
        listeners: get(H_LISTENERS) as usize,
        servers: get(H_SERVERS) as usize,
    };
    let (listeners_used, servers_used) = (
        w[H_LISTENERS_USED].load(Ordering::Acquire) as usize,
        w[H_SERVERS_USED].load(Ordering::Acquire) as usize,
    );
    if shape.workers == 0
        || shape.workers > 4096
        || shape.listeners > 1 << 16
        || shape.servers > 1 << 20
        || listeners_used > shape.listeners
        || servers_used > shape.servers
        || shape.total_words() > w.len()
    {
        return Err(bad(
            "stats file is truncated or its sizes are corrupt".into()
        ));
    }
    let block = |at: usize| Stats::sum([view::<CounterBlock>(&w[at..at + BLOCK_WORDS])]);
    let mut listeners: Vec<ListenerSnapshot> = (0..listeners_used)
        .map(|l| ListenerSnapshot {
            name: read_name(&w[shape.name_at(l)..]),
            workers: (0..shape.workers)
                .map(|k| block(shape.listener_block_at(l, k)))
                .collect(),
        })
        .collect();
    let names: Vec<String> = listeners.iter().map(|l| l.name.clone()).collect();
    let mut servers = Vec::new();
    for slot in 0..servers_used {
        let at = shape.server_at(slot);
        let head: &ServerHead = view(&w[at..]);
        if head.status.load(Ordering::Acquire) != 1 {
            continue;
        }
        let listener = head.listener.load(Ordering::Relaxed) as usize;
        let standing = head.down.load(Ordering::Relaxed);
        servers.push(ServerSnapshot {
            listener: names.get(listener).cloned().unwrap_or_default(),
            addr: servers::name(&w[at..]),
            generation: head.generation.load(Ordering::Relaxed),
            up: standing & servers::EXCLUDED == 0,
            state: servers::STATES
                .get((standing & 0xff) as usize)
                .copied()
                .unwrap_or("down"),
            reason: servers::REASONS
                .get(((standing >> 8) & 0xff) as usize)
                .copied()
                .unwrap_or(""),
            checked_unix_ms: head.checked.load(Ordering::Relaxed),
            role: match head.role.load(Ordering::Relaxed) {
                1 => "primary",
                2 => "replica",
                _ => "unknown",
            },
            backup: head.backup.load(Ordering::Relaxed) == 1,
            active: head.live.load(Ordering::Relaxed),
            lag: servers::lag_of(head.lag.load(Ordering::Relaxed)),
            workers: (0..shape.workers)
                .map(|k| {
                    let b = shape.server_block_at(slot, k);
                    ServerStats::sum([view::<ServerBlock>(&w[b..b + SERVER_BLOCK_WORDS])])
                })
                .collect(),
        });
    }
    // The handoff pseudo-listener goes last, after listeners a reload
    // added; slots given back have no name: nothing to show.
    let handoff = (get(H_HANDOFF) as usize).checked_sub(1);
    let mut handed = None;
    let mut index = 0;
    listeners.retain_mut(|l| {
        let at = index;
        index += 1;
        if Some(at) == handoff {
            handed = Some(std::mem::replace(
                l,
                ListenerSnapshot {
                    name: String::new(),
                    workers: Vec::new(),
                },
            ));
            return false;
        }
        !l.name.is_empty()
    });
    listeners.extend(handed);
    Ok(Snapshot {
        pid: get(H_PID) as u32,
        started_unix: get(H_START_UNIX),
        state: match get(H_STATE) {
            2 => InstanceState::Draining,
            3 => InstanceState::Stopped,
            _ => InstanceState::Running,
        },
        workers: (0..shape.workers)
            .map(|k| block(shape.worker_block_at(k)))
            .collect(),
        listeners,
        servers,
    })
}

/// A stats file mapped read-only.
pub struct StatsFile {
    map: MmapRaw,
    path: PathBuf,
}

impl StatsFile {
    /// Maps the file at `path` and checks that it is a stats file of this
    /// counter layout.
    pub fn open(path: &Path) -> io::Result<StatsFile> {
        let file = File::open(path)?;
        let map = MmapOptions::new().map_raw_read_only(&file)?;
        let f = StatsFile {
            map,
            path: path.to_path_buf(),
        };
        f.snapshot()?;
        Ok(f)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The pid of the process that wrote the file.
    pub fn pid(&self) -> u32 {
        words(&self.map)[H_PID].load(Ordering::Relaxed) as u32
    }

    /// Whether the writer still runs: its pid exists and started when the
    /// file says (so a recycled pid is not mistaken for it).
    pub fn liveness(&self) -> Liveness {
        let w = words(&self.map);
        let ticks = w[H_START_TICKS].load(Ordering::Relaxed);
        match start_ticks(self.pid()) {
            Some(now) if ticks == 0 || now == ticks => Liveness::Running,
            _ => Liveness::Dead,
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> io::Result<Snapshot> {
        read(words(&self.map))
    }
}

/// A process's start time in clock ticks since boot (field 22 of
/// /proc/PID/stat), `None` when there is no such process.
pub(super) fn start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_its_start_is_stable() {
        let me = std::process::id();
        let a = start_ticks(me).expect("own stat");
        assert_eq!(start_ticks(me), Some(a));
        assert_eq!(start_ticks(u32::MAX), None);
    }

    #[test]
    fn a_file_of_another_format_or_layout_is_named_so() {
        let arena = Arena::new(1, &["a".to_string()], 0);
        let w = words(&arena.map);
        w[H_VERSION].store(2, Ordering::Relaxed);
        let e = read(w).expect_err("format 2 refused").to_string();
        assert!(e.contains("stats file format 2 is not the format 3"), "{e}");
        w[H_VERSION].store(VERSION, Ordering::Relaxed);
        w[H_LAYOUT].store(7, Ordering::Relaxed);
        let e = read(w).expect_err("another layout refused").to_string();
        assert!(e.contains("another counter layout"), "{e}");
    }

    #[test]
    fn a_file_of_something_else_is_refused() {
        let dir = std::env::temp_dir().join(format!("spliced-view-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("junk.stats");
        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let e = StatsFile::open(&path).err().expect("refused");
        assert!(e.to_string().contains("not a spliced stats file"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
