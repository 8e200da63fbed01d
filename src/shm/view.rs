//! Reading a stats file: validate the header, tell a live instance from a
//! dead one, and sum its counter blocks into a [`Snapshot`].

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use super::*;
use crate::stats::Stats;
use crate::sys::shared::view;

/// What the instance said it was doing when last seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
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

/// Every counter of an instance at one moment.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub pid: u32,
    /// Seconds since the Unix epoch when the instance started.
    pub started_unix: u64,
    pub state: InstanceState,
    /// Worker-scoped counters (pipes, buffers, timers), one per worker.
    pub workers: Vec<Stats>,
    /// Listener-scoped counters; the last entry is `handoff`.
    pub listeners: Vec<ListenerSnapshot>,
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
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    if w.len() < HEADER_WORDS || load_acquire(&w[H_MAGIC]) != MAGIC {
        return Err(bad("not a spliced stats file (or not written yet)"));
    }
    let get = |i: usize| w[i].load(Ordering::Relaxed);
    if get(H_VERSION) != VERSION
        || get(H_LAYOUT) != layout_hash()
        || get(H_BLOCK_WORDS) != BLOCK_WORDS as u64
    {
        return Err(bad(
            "written by a spliced with another counter layout; use the same version's `spliced stats`",
        ));
    }
    let (workers, listeners) = (get(H_WORKERS) as usize, get(H_LISTENERS) as usize);
    if workers == 0
        || workers > 4096
        || listeners > 4096
        || total_words(workers, listeners) > w.len()
    {
        return Err(bad("stats file is truncated or its sizes are corrupt"));
    }
    let start = HEADER_WORDS + listeners * NAME_WORDS;
    let block = |i: usize| {
        let at = start + i * BLOCK_WORDS;
        Stats::sum([view::<CounterBlock>(&w[at..at + BLOCK_WORDS])])
    };
    let listeners = (0..listeners)
        .map(|l| {
            let mut bytes = Vec::with_capacity(NAME_WORDS * 8);
            for j in 0..NAME_WORDS {
                bytes.extend_from_slice(&get(HEADER_WORDS + l * NAME_WORDS + j).to_le_bytes());
            }
            let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
            ListenerSnapshot {
                name: String::from_utf8_lossy(&bytes[..end]).into_owned(),
                workers: (0..workers)
                    .map(|k| block(workers + l * workers + k))
                    .collect(),
            }
        })
        .collect();
    Ok(Snapshot {
        pid: get(H_PID) as u32,
        started_unix: get(H_START_UNIX),
        state: match get(H_STATE) {
            2 => InstanceState::Draining,
            3 => InstanceState::Stopped,
            _ => InstanceState::Running,
        },
        workers: (0..workers).map(block).collect(),
        listeners,
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
