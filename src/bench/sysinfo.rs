//! The machine the figures were measured on, printed with the results.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::cli::time::format_utc;

#[derive(Clone, Debug, serde::Serialize)]
pub struct SysInfo {
    pub date_utc: String,
    pub kernel: String,
    pub cpu_model: String,
    pub cpus: usize,
    /// /proc/sys/fs/pipe-max-size (bytes).
    pub pipe_max_size: Option<u64>,
    /// /proc/sys/fs/pipe-user-pages-soft (pages; 0 = no limit).
    pub pipe_user_pages_soft: Option<u64>,
    /// /proc/sys/fs/pipe-user-pages-hard (pages; 0 = no limit).
    pub pipe_user_pages_hard: Option<u64>,
    pub root: bool,
    pub user: String,
    /// CPUs this process may run on.
    pub affinity: String,
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_u64(path: &str) -> Option<u64> {
    read(path)?.parse().ok()
}

pub fn collect() -> SysInfo {
    let cpuinfo = read("/proc/cpuinfo").unwrap_or_default();
    let cpu_model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown".into(), |(_, v)| v.trim().to_string());
    let uid = nix::unistd::geteuid();
    let user = nix::unistd::User::from_uid(uid)
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name);
    let affinity = read("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default();
    SysInfo {
        date_utc: utc_now(),
        kernel: read("/proc/sys/kernel/osrelease").unwrap_or_else(|| "unknown".into()),
        cpu_model,
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        pipe_max_size: read_u64("/proc/sys/fs/pipe-max-size"),
        pipe_user_pages_soft: read_u64("/proc/sys/fs/pipe-user-pages-soft"),
        pipe_user_pages_hard: read_u64("/proc/sys/fs/pipe-user-pages-hard"),
        root: uid.is_root(),
        user,
        affinity,
    }
}

impl SysInfo {
    /// Lines for the top of the table.
    pub fn lines(&self) -> Vec<String> {
        let pages = |p: Option<u64>| match p {
            None => "?".to_string(),
            Some(0) => "no limit".to_string(),
            Some(p) => format!("{p} pages ({} MiB)", (p * 4096) >> 20),
        };
        let root_note = if self.root {
            "root: pipe-user-pages-soft does not apply; see docs/BENCHMARKS.md"
        } else {
            "not root: pipe-user-pages-soft applies"
        };
        vec![
            format!("date      {}", self.date_utc),
            format!("kernel    {}", self.kernel),
            format!(
                "cpu       {} ({} CPUs, this process may use {})",
                self.cpu_model, self.cpus, self.affinity
            ),
            format!(
                "pipes     pipe-max-size {} B, pipe-user-pages-soft {}, -hard {}",
                self.pipe_max_size.map_or("?".into(), |v| v.to_string()),
                pages(self.pipe_user_pages_soft),
                pages(self.pipe_user_pages_hard)
            ),
            format!("user      {} ({root_note})", self.user),
        ]
    }
}

/// `2026-11-21 23:59:00 UTC`, from the system clock.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format_utc(secs)
}
