//! Reading a process's CPU time, memory and fds from /proc, and the
//! statistics over runs (median, spread, percentiles).

use std::collections::HashSet;
use std::time::Duration;

/// The thread ids of this process whose name starts with `prefix`.
pub fn own_threads(prefix: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let tid: u32 = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.starts_with(prefix).then_some(tid)
        })
        .collect()
}

/// Pins each thread to `cpu` with `taskset -p` (there is no safe affinity call in
/// the crate's dependencies). Returns a note on failure.
pub fn pin_threads(tids: &[u32], cpu: usize) -> Result<(), String> {
    for tid in tids {
        let out = std::process::Command::new("taskset")
            .args(["-p", "-c", &cpu.to_string(), &tid.to_string()])
            .output()
            .map_err(|e| format!("cannot run taskset to pin the proxy: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "taskset -p -c {cpu} {tid} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    Ok(())
}

/// The process `pid` and its live descendants.
pub fn process_tree(pid: u32) -> Vec<u32> {
    let mut out = vec![pid];
    let mut i = 0;
    while i < out.len() && out.len() < 100_000 {
        let p = out[i];
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                let children =
                    std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                out.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<u32>().ok()),
                );
            }
        }
        i += 1;
    }
    out
}

fn clock_ticks() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100, |v| v.max(1) as u64)
}

/// CPU time of this process's log writer thread (`cli::log`): lines the
/// in-process proxy logs are written there, so it is the proxy's CPU too.
pub fn log_writer_cpu() -> Duration {
    own_threads(crate::cli::log::THREAD_NAME)
        .into_iter()
        .map(|tid| task_cpu(&format!("/proc/self/task/{tid}")))
        .sum()
}

/// Fields after the `(comm)` of /proc/PID/stat, so index 0 is field 3 (state).
fn stat_fields(path: &str) -> Option<Vec<u64>> {
    let s = std::fs::read_to_string(path).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    Some(
        rest.split_whitespace()
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// CPU time of one task: schedstat's run time (ns) or, without schedstat,
/// utime + stime from stat (clock ticks).
fn task_cpu(task_dir: &str) -> Duration {
    if let Ok(s) = std::fs::read_to_string(format!("{task_dir}/schedstat")) {
        if let Some(ns) = s
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok())
        {
            return Duration::from_nanos(ns);
        }
    }
    stat_fields(&format!("{task_dir}/stat")).map_or(Duration::ZERO, |f| {
        let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
        Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks())
    })
}

/// CPU time used by `pid`'s threads, its live descendants, and the children it
/// has already reaped (cutime + cstime, so fork-per-connection servers count).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
        return None;
    }
    let mut total = Duration::ZERO;
    for p in process_tree(pid) {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                total += task_cpu(&t.path().to_string_lossy());
            }
        }
        if let Some(f) = stat_fields(&format!("/proc/{p}/stat")) {
            let ticks = f.get(13).copied().unwrap_or(0) + f.get(14).copied().unwrap_or(0);
            total += Duration::from_nanos(ticks * 1_000_000_000 / clock_ticks());
        }
    }
    Some(total)
}

/// Resident memory (KiB) of `pid` (or "self") and, for a pid, its descendants.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let pids: Vec<String> = match pid {
        Some(p) => process_tree(p).iter().map(|p| p.to_string()).collect(),
        None => vec!["self".into()],
    };
    let mut total = 0;
    for (i, p) in pids.into_iter().enumerate() {
        let kib = std::fs::read_to_string(format!("/proc/{p}/status"))
            .ok()
            .and_then(|s| {
                let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_string();
                line.split_whitespace().nth(1)?.parse::<u64>().ok()
            });
        match kib {
            Some(k) => total += k,
            None if i > 0 => {}
            None => return None,
        }
    }
    Some(total)
}

/// Open fds of this process (cheaper than [`fds_and_pipes`]: no readlink).
pub fn own_fd_count() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

/// Open fds and distinct pipes of `pid` (or "self") and, for a pid, its descendants.
pub fn fds_and_pipes(pid: Option<u32>) -> Option<(u64, u64)> {
    let pids: Vec<String> = match pid {
        Some(p) => process_tree(p).iter().map(|p| p.to_string()).collect(),
        None => vec!["self".into()],
    };
    let (mut fds, mut pipes) = (0u64, HashSet::new());
    for (i, p) in pids.into_iter().enumerate() {
        // A child may exit while we look (socat forks one per connection).
        let dir = match std::fs::read_dir(format!("/proc/{p}/fd")) {
            Ok(d) => d,
            Err(_) if i > 0 => continue,
            Err(_) => return None,
        };
        for e in dir.flatten() {
            fds += 1;
            if let Ok(link) = std::fs::read_link(e.path()) {
                let l = link.to_string_lossy();
                if l.starts_with("pipe:") {
                    pipes.insert(format!("{p}/{l}"));
                }
            }
        }
    }
    Some((fds, pipes.len() as u64))
}

/// Raises RLIMIT_NOFILE's soft limit to the hard one (and, where permitted, the hard
/// limit to `want`). Returns the soft limit in force.
pub fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(hard);
    if want > hard {
        let new = want.min(nr_open);
        if setrlimit(Resource::RLIMIT_NOFILE, new, new).is_ok() {
            return new;
        }
    }
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// A figure over several runs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: Vec<f64>,
}

impl Summary {
    pub fn of(values: &[f64]) -> Option<Summary> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        let runs = v.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[n - 1],
            runs,
        })
    }

    /// The largest distance of a run from the median, in % of the median.
    pub fn spread_pct(&self) -> f64 {
        if self.median == 0.0 {
            return 0.0;
        }
        (self.max - self.median).max(self.median - self.min) / self.median.abs() * 100.0
    }
}

/// The `p`-quantile (0..=1) of sorted samples, nearest rank.
pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let s = Summary::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max), (2.0, 1.0, 3.0));
        assert!((s.spread_pct() - 50.0).abs() < 1e-9);
        assert_eq!(Summary::of(&[1.0, 3.0]).unwrap().median, 2.0);
        assert!(Summary::of(&[f64::NAN]).is_none());
    }

    #[test]
    fn percentiles_nearest_rank() {
        let v: Vec<u64> = (1..=1000).collect();
        assert_eq!(percentile(&v, 0.5), 500);
        assert_eq!(percentile(&v, 0.99), 990);
        assert_eq!(percentile(&v, 0.999), 999);
        assert_eq!(percentile(&[7], 0.999), 7);
    }

    #[test]
    fn own_process_is_readable() {
        assert!(rss_kib(None).unwrap() > 0);
        let (fds, _) = fds_and_pipes(None).unwrap();
        assert!(fds >= 3);
        assert!(process_cpu(std::process::id()).is_some());
    }
}
