//! `--syscalls`: how many system calls a proxy makes per relayed message
//! and per connection, counted by strace attached to its threads only.
//!
//! strace slows every call down, so this is a separate pass after the
//! timed ones, and only counts are taken from it: 64 B round trips on one
//! connection (each is two messages, request and reply), then connections
//! that open, exchange 64 B and close.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::load::{one_exchange, PingPong};

/// Round trips of the per-message count.
const ROUND_TRIPS: u64 = 2000;
/// Connections of the per-connection count.
const CONNECTIONS: u64 = 200;

/// What strace counted for one engine.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SyscallCounts {
    pub per_message: f64,
    pub per_connection: f64,
    /// The calls of the message pass, most frequent first: (name, per message).
    pub message_calls: Vec<(String, f64)>,
    /// The calls of the connection pass, most frequent first.
    pub connection_calls: Vec<(String, f64)>,
}

/// Counts the calls of threads `tids` while `addr` relays the two passes.
pub fn count(tids: &[i32], addr: SocketAddr) -> Result<SyscallCounts, String> {
    if tids.is_empty() {
        return Err("no thread to attach to".into());
    }
    let mut pp = PingPong::open(addr, 64).map_err(|e| format!("open: {e}"))?;
    // Warm up outside the count: buffers, pipes, the first wakeups.
    for _ in 0..50 {
        pp.round_trip().map_err(|e| format!("warm-up: {e}"))?;
    }
    let messages = traced(tids, || {
        for _ in 0..ROUND_TRIPS {
            pp.round_trip().map_err(|e| format!("round trip: {e}"))?;
        }
        Ok(())
    })?;
    drop(pp);
    let connections = traced(tids, || {
        for _ in 0..CONNECTIONS {
            one_exchange(addr).map_err(|e| format!("connection: {e}"))?;
        }
        Ok(())
    })?;
    let per = |calls: &[(String, u64)], n: f64| -> Vec<(String, f64)> {
        calls
            .iter()
            .map(|(c, k)| (c.clone(), *k as f64 / n))
            .collect()
    };
    let total = |calls: &[(String, u64)]| calls.iter().map(|(_, k)| k).sum::<u64>() as f64;
    let msgs = 2.0 * ROUND_TRIPS as f64;
    Ok(SyscallCounts {
        per_message: total(&messages) / msgs,
        per_connection: total(&connections) / CONNECTIONS as f64,
        message_calls: per(&messages, msgs),
        connection_calls: per(&connections, CONNECTIONS as f64),
    })
}

/// Runs `load` with strace attached to `tids`; the calls it counted, by
/// name, most frequent first.
fn traced(
    tids: &[i32],
    load: impl FnOnce() -> Result<(), String>,
) -> Result<Vec<(String, u64)>, String> {
    let out = std::env::temp_dir().join(format!("spliced-bench-strace-{}", std::process::id()));
    let mut cmd = Command::new("strace");
    cmd.arg("-c").arg("-o").arg(&out);
    for t in tids {
        cmd.arg("-p").arg(t.to_string());
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run strace ({e}); install it (Debian package strace)"))?;
    let attached = wait_attached(&mut child, tids.len());
    let loaded = attached.and_then(|()| load());
    // SIGINT makes strace detach and write its summary.
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = child.wait();
    let text = std::fs::read_to_string(&out);
    let _ = std::fs::remove_file(&out);
    loaded?;
    parse_summary(&text.map_err(|e| format!("strace wrote no summary: {e}"))?)
}

/// Waits until strace says it attached to all `n` threads.
fn wait_attached(child: &mut Child, n: usize) -> Result<(), String> {
    let stderr = child.stderr.take().ok_or("strace has no stderr")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let until = Instant::now() + Duration::from_secs(10);
    let mut seen = 0;
    let mut last = String::new();
    while seen < n {
        let left = until.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains("attached") => seen += 1,
            Ok(line) => last = line,
            Err(_) => {
                return Err(format!(
                    "strace attached to {seen} of {n} threads ({})",
                    if last.is_empty() { "no message" } else { &last }
                ))
            }
        }
    }
    Ok(())
}

/// The rows of `strace -c` output: `% time seconds usecs/call calls [errors] syscall`.
fn parse_summary(text: &str) -> Result<Vec<(String, u64)>, String> {
    let mut rows = Vec::new();
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 5 || fields[0].starts_with('%') || fields[0].starts_with('-') {
            continue;
        }
        let name = fields[fields.len() - 1];
        if name == "total" {
            continue;
        }
        if let Ok(calls) = fields[3].parse::<u64>() {
            rows.push((name.to_string(), calls));
        }
    }
    if rows.is_empty() {
        return Err("strace counted no calls".into());
    }
    rows.sort_by_key(|r| std::cmp::Reverse(r.1));
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_strace_summary() {
        let text = "\
% time     seconds  usecs/call     calls    errors syscall
------ ----------- ----------- --------- --------- ----------------
 40.00    0.000400           1       400           write
 35.00    0.000350           1       400       100 read
 25.00    0.000250           1       300           epoll_wait
------ ----------- ----------- --------- --------- ----------------
100.00    0.001000           1      1100       100 total
";
        let rows = parse_summary(text).unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].1, 400);
        assert_eq!(rows.iter().map(|r| r.1).sum::<u64>(), 1100);
        assert!(parse_summary("").is_err());
    }
}
