//! `spliced stats`: a live table of a running instance, read from its stats
//! file. It maps the file read-only and only loads words the workers store,
//! so it needs no admin port and costs the data path nothing.

use std::fmt::Write as _;
use std::io::{self, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::shm::{self, InstanceState, Liveness, ServerSnapshot, Snapshot, StatsFile};
use crate::stats::{CloseReason, Stats};

/// Arguments of `spliced stats`.
#[derive(clap::Args, Debug)]
pub struct StatsArgs {
    /// The instance to read: the --name it runs with.
    #[arg(long, default_value = "spliced", value_name = "NAME")]
    pub name: String,
    /// Read this stats file instead of the named instance's.
    #[arg(long, value_name = "PATH")]
    pub file: Option<PathBuf>,
    /// Redraw the table every --interval with current rates, until Ctrl-C.
    #[arg(long)]
    pub watch: bool,
    /// How often --watch redraws.
    #[arg(long, default_value = "1s", value_name = "DUR", value_parser = interval)]
    pub interval: Duration,
}

fn interval(text: &str) -> Result<Duration, String> {
    match crate::config::parse_duration(text).map_err(|e| e.to_string())? {
        Some(d) if d >= Duration::from_millis(100) => Ok(d),
        _ => Err("the interval must be at least 100ms".into()),
    }
}

/// Runs `spliced stats`: 0 when a live instance was shown, 1 when none runs
/// (no file, or the file of a dead process), 2 on a bad argument.
pub fn run(args: StatsArgs) -> ExitCode {
    let path = match &args.file {
        Some(p) => p.clone(),
        None => {
            if let Err(e) = shm::check_instance_name(&args.name) {
                eprintln!("spliced: error: --name: {e}");
                return ExitCode::from(2);
            }
            shm::stats_path(&args.name)
        }
    };
    let who = args.file.as_ref().map_or_else(
        || format!("instance '{}'", args.name),
        |p| p.display().to_string(),
    );
    let file = match StatsFile::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            eprintln!(
                "spliced: no running {who}: {} does not exist (start it with `spliced run --name {}`)",
                path.display(),
                args.name
            );
            return ExitCode::from(1);
        }
        Err(e) => {
            eprintln!("spliced: error: cannot read {}: {e}", path.display());
            return ExitCode::from(1);
        }
    };
    let mut out = io::stdout().lock();
    if !args.watch {
        return show_once(&file, &who, &mut out);
    }
    watch(file, &who, &args, &mut out)
}

fn show_once(file: &StatsFile, who: &str, out: &mut impl Write) -> ExitCode {
    let snap = match file.snapshot() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("spliced: error: {}: {e}", file.path().display());
            return ExitCode::from(1);
        }
    };
    let dead = file.liveness() == Liveness::Dead;
    let uptime = uptime(&snap);
    let _ = out.write_all(render(&snap, who, None, uptime, dead).as_bytes());
    if dead {
        eprintln!("{}", dead_message(file, who, &snap));
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

fn watch(mut file: StatsFile, who: &str, args: &StatsArgs, out: &mut impl Write) -> ExitCode {
    let mut previous: Option<(Instant, Snapshot)> = None;
    loop {
        if file.liveness() == Liveness::Dead {
            // A new instance of the same name may have replaced the file.
            match StatsFile::open(file.path()) {
                Ok(f) if f.liveness() == Liveness::Running => {
                    file = f;
                    previous = None;
                }
                _ => {
                    if let Ok(snap) = file.snapshot() {
                        eprintln!("{}", dead_message(&file, who, &snap));
                    }
                    return ExitCode::from(1);
                }
            }
        }
        let Ok(snap) = file.snapshot() else {
            return ExitCode::from(1);
        };
        let now = Instant::now();
        let rates = previous
            .as_ref()
            .map(|(at, before)| (now.duration_since(*at), before));
        let table = render(&snap, who, rates, uptime(&snap), false);
        // Home and clear, as top does.
        if out
            .write_all(format!("\x1b[H\x1b[2J{table}").as_bytes())
            .and_then(|()| out.flush())
            .is_err()
        {
            return ExitCode::SUCCESS;
        }
        previous = Some((now, snap));
        std::thread::sleep(args.interval);
    }
}

fn dead_message(file: &StatsFile, who: &str, snap: &Snapshot) -> String {
    format!(
        "spliced: {who} is not running: {} belongs to a dead process (pid {}, started {}); the values shown are its last",
        file.path().display(),
        snap.pid,
        super::time::format_utc(snap.started_unix)
    )
}

fn uptime(snap: &Snapshot) -> Duration {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Duration::from_secs(now.saturating_sub(snap.started_unix))
}

/// The table. `rates` is the time since an earlier snapshot and that
/// snapshot; without one, rates are averages since the start.
pub fn render(
    snap: &Snapshot,
    who: &str,
    rates: Option<(Duration, &Snapshot)>,
    uptime: Duration,
    dead: bool,
) -> String {
    let state = match (dead, snap.state) {
        (true, _) => "DEAD",
        (false, InstanceState::Running) => "running",
        (false, InstanceState::Draining) => "draining",
        (false, InstanceState::Stopped) => "stopped",
    };
    let mut t = String::new();
    let _ = writeln!(
        t,
        "spliced {who}  pid {}  {state}  {}  rates {}",
        snap.pid,
        if dead {
            format!("started {}", super::time::format_utc(snap.started_unix))
        } else {
            format!("up {}", human_duration(uptime))
        },
        if rates.is_some() {
            "over the last interval"
        } else {
            "averaged since start"
        }
    );
    let _ = writeln!(
        t,
        "\n{:<24} {:>7} {:>10} {:>8} {:>12} {:>12} {:>7} {:>8} {:>9} {:>9} {:>6}",
        "LISTENER",
        "ACTIVE",
        "ACCEPTED",
        "CONN/s",
        "C>U/s",
        "U>C/s",
        "SPLICE",
        "FALLBK",
        "CONN-FAIL",
        "LOCAL-ERR",
        "HELD"
    );
    for l in &snap.listeners {
        let now = l.total();
        // By name: a reload may add listeners between two snapshots.
        let before = rates.map(|(_, b)| {
            b.listeners
                .iter()
                .find(|o| o.name == l.name)
                .map(|l| l.total())
                .unwrap_or_default()
        });
        let secs = rates.map_or(uptime, |(d, _)| d).as_secs_f64().max(1e-3);
        let delta = |f: fn(&Stats) -> u64| {
            let b = before.as_ref().map_or(0, f);
            f(&now).saturating_sub(b) as f64 / secs
        };
        let c2u = delta(|s| s.bytes_c2u_spliced + s.bytes_c2u_copied);
        let u2c = delta(|s| s.bytes_u2c_spliced + s.bytes_u2c_copied);
        let total = now.bytes_spliced + now.bytes_copied;
        let share = if total == 0 {
            "-".to_string()
        } else {
            format!("{:.1}%", 100.0 * now.bytes_spliced as f64 / total as f64)
        };
        let _ = writeln!(
            t,
            "{:<24} {:>7} {:>10} {:>8.1} {:>12} {:>12} {:>7} {:>8} {:>9} {:>9} {:>6}",
            l.name,
            now.relays_active,
            now.relays_accepted,
            delta(|s| s.relays_accepted),
            human_rate(c2u),
            human_rate(u2c),
            share,
            now.splice_fallbacks,
            now.upstream_connect_failures,
            now.local_errors,
            now.clients_held,
        );
    }
    render_servers(&mut t, snap, rates, uptime);
    let _ = writeln!(
        t,
        "\n{:<8} {:>7} {:>10} {:>8} {:>9} {:>9} {:>8} {:>8}",
        "WORKER", "RELAYS", "PIPES-USE", "POOLED", "PIPES-MAX", "BUFFERS", "PAUSES", "TIMERS"
    );
    for (i, w) in snap.workers.iter().enumerate() {
        let relays: u64 = snap
            .listeners
            .iter()
            .map(|l| l.workers[i].relays_active)
            .sum();
        let _ = writeln!(
            t,
            "{:<8} {:>7} {:>10} {:>8} {:>9} {:>9} {:>8} {:>8}",
            i,
            relays,
            w.pipes_in_use,
            w.pipes_idle,
            w.pipes_in_use_max,
            w.buffers_in_use,
            w.accept_pauses,
            w.timer_entries
        );
    }
    let all = snap.total();
    let closes: Vec<String> = CloseReason::ALL
        .iter()
        .filter(|r| all.closed(**r) > 0)
        .map(|r| format!("{}={}", r.as_str(), all.closed(*r)))
        .collect();
    let _ = writeln!(
        t,
        "\nclosed {}: {}",
        all.closed_total(),
        if closes.is_empty() {
            "-".to_string()
        } else {
            closes.join(" ")
        }
    );
    t
}

/// One row per server of each listener's pool, listener by listener: its
/// health, role, relays, connects, failures and bytes/s each way.
fn render_servers(
    t: &mut String,
    snap: &Snapshot,
    rates: Option<(Duration, &Snapshot)>,
    uptime: Duration,
) {
    if snap.servers.is_empty() {
        return;
    }
    let _ = writeln!(
        t,
        "\n{:<28} {:<16} {:<11} {:<8} {:<22} {:>6} {:>7} {:>9} {:>7} {:>12} {:>12} {:>10}",
        "SERVER",
        "LISTENER",
        "STATE",
        "ROLE",
        "REASON",
        "CHECK",
        "ACTIVE",
        "CONNECTS",
        "FAILS",
        "C>U/s",
        "U>C/s",
        "LAG"
    );
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = rates.map_or(uptime, |(d, _)| d).as_secs_f64().max(1e-3);
    let order = |name: &str| snap.listeners.iter().position(|l| l.name == name);
    let mut servers: Vec<_> = snap.servers.iter().collect();
    // Addresses in numeric order (`:9` before `:10`).
    let key = |s: &ServerSnapshot| {
        let addr = s.addr.parse::<std::net::SocketAddr>().ok();
        (order(&s.listener), s.listener.clone(), addr, s.addr.clone())
    };
    servers.sort_by_key(|s| key(s));
    for s in servers {
        let now = s.total();
        // The same slot and generation: otherwise it started from zero.
        let before = rates
            .and_then(|(_, b)| {
                b.servers.iter().find(|o| {
                    o.listener == s.listener && o.addr == s.addr && o.generation == s.generation
                })
            })
            .map(|o| o.total())
            .unwrap_or_default();
        let per_sec = |now: u64, before: u64| now.saturating_sub(before) as f64 / secs;
        let addr = if s.backup {
            format!("{} (backup)", s.addr)
        } else {
            s.addr.clone()
        };
        let _ = writeln!(
            t,
            "{:<28} {:<16} {:<11} {:<8} {:<22} {:>6} {:>7} {:>9} {:>7} {:>12} {:>12} {:>10}",
            addr,
            s.listener,
            s.state,
            if s.role == "unknown" { "-" } else { s.role },
            if s.reason.is_empty() { "-" } else { s.reason },
            check_age(s.checked_unix_ms, now_ms),
            s.active,
            now.connects,
            now.connect_failures,
            human_rate(per_sec(now.bytes_c2u(), before.bytes_c2u())),
            human_rate(per_sec(now.bytes_u2c(), before.bytes_u2c())),
            s.lag.map_or("-".to_string(), human_bytes),
        );
    }
}

/// How long ago the last check ended: `0.4s`, `12s`, `-` for never.
fn check_age(checked_unix_ms: u64, now_ms: u64) -> String {
    if checked_unix_ms == 0 {
        return "-".to_string();
    }
    let ms = now_ms.saturating_sub(checked_unix_ms);
    if ms < 10_000 {
        format!("{:.1}s", ms as f64 / 1000.0)
    } else {
        format!("{}s", ms / 1000)
    }
}

/// `1.5 MiB`, `12 KiB`, `300 B`, per second.
fn human_rate(bytes_per_sec: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes_per_sec;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// A byte count: `512 B`, `6.7 MiB`.
fn human_bytes(bytes: u64) -> String {
    human_rate(bytes as f64)
}

fn human_duration(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86400, (s % 86400) / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot(accepted: u64, c2u: u64, u2c: u64) -> Snapshot {
        let stats = Stats {
            relays_accepted: accepted,
            relays_active: 2,
            bytes_spliced: c2u + u2c,
            bytes_c2u_spliced: c2u,
            bytes_u2c_spliced: u2c,
            ..Stats::default()
        };
        Snapshot {
            pid: 42,
            started_unix: 0,
            state: InstanceState::Running,
            workers: vec![Stats::default()],
            listeners: vec![crate::shm::ListenerSnapshot {
                name: "127.0.0.1:6432".into(),
                workers: vec![stats],
            }],
            servers: vec![crate::shm::ServerSnapshot {
                listener: "127.0.0.1:6432".into(),
                addr: "10.0.0.5:5432".into(),
                generation: 1,
                up: true,
                state: "up",
                reason: "",
                checked_unix_ms: 0,
                role: "primary",
                backup: false,
                active: 2,
                lag: None,
                workers: vec![crate::stats::ServerStats {
                    connects: accepted,
                    connect_failures: 1,
                    bytes_c2u_spliced: c2u,
                    bytes_u2c_copied: u2c,
                    ..Default::default()
                }],
            }],
        }
    }

    #[test]
    fn watch_rates_are_deltas_over_the_interval() {
        let before = snapshot(10, 1000, 5000);
        let now = snapshot(30, 1000 + 2048, 5000 + 4 * 1048576);
        let t = render(
            &now,
            "x",
            Some((Duration::from_secs(2), &before)),
            Duration::ZERO,
            false,
        );
        let row = t.lines().find(|l| l.starts_with("127.0.0.1:6432")).unwrap();
        let cols: Vec<&str> = row.split_whitespace().collect();
        // ACTIVE ACCEPTED CONN/s C>U/s U>C/s SPLICE
        assert_eq!(&cols[1..4], ["2", "30", "10.0"], "{row}");
        assert_eq!(&cols[4..8], ["1.0", "KiB", "2.0", "MiB"], "{row}");
        assert_eq!(cols[8], "100.0%", "{row}");
        assert!(t.contains("over the last interval"));
        let once = render(&now, "x", None, Duration::from_secs(10), false);
        assert!(once.contains("averaged since start"));
        let server = t.lines().find(|l| l.starts_with("10.0.0.5:5432")).unwrap();
        let cols: Vec<&str> = server.split_whitespace().collect();
        // LISTENER STATE ROLE REASON CHECK ACTIVE CONNECTS FAILS C>U/s U>C/s LAG
        assert_eq!(
            &cols[1..],
            [
                "127.0.0.1:6432",
                "up",
                "primary",
                "-",
                "-",
                "2",
                "30",
                "1",
                "1.0",
                "KiB",
                "2.0",
                "MiB",
                "-"
            ],
            "{server}"
        );
        let mut lagging = now.clone();
        let s = &mut lagging.servers[0];
        (s.state, s.reason, s.role, s.lag) =
            ("lagging", "replication lag", "replica", Some(7 << 20));
        let t = render(&lagging, "x", None, Duration::from_secs(10), false);
        let server = t.lines().find(|l| l.starts_with("10.0.0.5:5432")).unwrap();
        let cols: Vec<&str> = server.split_whitespace().collect();
        assert_eq!(
            &cols[2..6],
            ["lagging", "replica", "replication", "lag"],
            "{server}"
        );
        assert_eq!(&cols[cols.len() - 2..], ["7.0", "MiB"], "{server}");
        let dead = render(&now, "x", None, Duration::ZERO, true);
        assert!(dead.contains("DEAD") && dead.contains("started 1970-01-01"));
    }

    #[test]
    fn rates_and_times_read_well() {
        assert_eq!(human_rate(300.0), "300 B");
        assert_eq!(human_rate(1536.0), "1.5 KiB");
        assert_eq!(human_rate(3.0 * 1024.0 * 1024.0), "3.0 MiB");
        assert_eq!(human_duration(Duration::from_secs(59)), "59s");
        assert_eq!(human_duration(Duration::from_secs(3725)), "1h02m");
    }
}
