//! The machine the figures were measured on, printed with the results.

use std::time::{SystemTime, UNIX_EPOCH};

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

/// Seconds since the epoch as `YYYY-MM-DD HH:MM:SS UTC`.
pub(crate) fn format_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn dates() {
        assert_eq!(super::format_utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::format_utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::format_utc(1_795_219_200), "2026-11-21 00:00:00 UTC");
        assert_eq!(super::format_utc(1_772_000_000), "2026-02-25 06:13:20 UTC");
    }
}
