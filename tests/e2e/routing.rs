//! Routing in role pools, judged by the server that answers each client:
//! a relay of a `role = "primary"` pool reaches only a server whose last
//! answer said primary, and at most one of them at a time; health
//! survives reloads; a failing check login is not a dead server.
//!
//! Every scenario probes every 200 ms (`fall = 2`, `rise = 1`), so a change
//! is seen within one interval plus one probe timeout, and a failover
//! completes within `interval × fall + 1 s`.

#[path = "routing/lag.rs"]
mod lag;
#[path = "routing/pg.rs"]
mod pg;
#[path = "routing/redis.rs"]
mod redis;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::common::pace;
use crate::fixture::WireError;

pub const INTERVAL: Duration = Duration::from_millis(200);
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(150);
pub const FALL: u32 = 2;
/// How long a client waits for an answer before it counts as held (the
/// machine is shared and loaded: a served login can take most of a second).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);

/// The longest a failover may leave clients without a server.
pub fn failover_bound() -> Duration {
    INTERVAL * FALL + Duration::from_secs(1)
}

/// How late spliced may learn of a role change: the next probe of the
/// server (one interval) and its answer (one probe timeout).
pub fn probe_lag() -> Duration {
    INTERVAL + PROBE_TIMEOUT
}

/// A `[[listener]]` with a health-checked pool. `pool_extra` and
/// `health_extra` are TOML lines added to `[listener.pool]` and
/// `[listener.pool.health]`.
pub struct ListenerToml<'a> {
    pub name: &'a str,
    pub port: u16,
    pub servers: &'a [u16],
    pub check: &'a str,
    pub role: &'a str,
    pub pool_extra: &'a str,
    pub health_extra: &'a str,
}

impl ListenerToml<'_> {
    pub fn render(&self) -> String {
        format!(
            "[[listener]]\n\
             name = \"{name}\"\n\
             listen = \"127.0.0.1:{port}\"\n\
             [listener.pool]\n\
             servers = [{servers}]\n\
             {pool_extra}\n\
             [listener.pool.health]\n\
             check = \"{check}\"\n\
             role = \"{role}\"\n\
             interval = \"{interval}ms\"\n\
             fall = {FALL}\n\
             rise = 1\n\
             {health_extra}\n",
            name = self.name,
            port = self.port,
            servers = loopback_servers(self.servers),
            pool_extra = self.pool_extra,
            check = self.check,
            role = self.role,
            interval = INTERVAL.as_millis(),
            health_extra = self.health_extra,
        )
    }
}

/// The value of a `servers = [...]` list: these ports on 127.0.0.1.
pub fn loopback_servers(ports: &[u16]) -> String {
    let quoted: Vec<String> = ports.iter().map(|p| format!("\"127.0.0.1:{p}\"")).collect();
    quoted.join(", ")
}

/// `[listener.pool.health]` lines of a PostgreSQL check by the monitor
/// login with its password file, and a probe timeout.
pub fn pg_login(password_file: &Path, timeout: &str) -> String {
    format!(
        "user = \"{}\"\npassword-file = \"{}\"\ntimeout = \"{timeout}\"",
        crate::fixture::MONITOR_USER,
        password_file.display()
    )
}

/// What one client attempt saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// Served; the answer (e.g. "f|5432": in recovery?, port).
    Served(String),
    /// A write refused because it reached a replica.
    ReadOnly(String),
    /// Refused, reset or closed before an answer.
    Refused(String),
    /// No answer within [`CLIENT_TIMEOUT`].
    Held,
    /// Any other server error.
    Error(String),
}

impl Seen {
    pub fn of(r: Result<String, WireError>) -> Seen {
        match r {
            Ok(v) => Seen::Served(v),
            Err(e) if e.is_read_only() => Seen::ReadOnly(e.to_string()),
            Err(e) if e.is_timeout() => Seen::Held,
            Err(e) if e.is_refused() => Seen::Refused(e.to_string()),
            Err(e) => Seen::Error(e.to_string()),
        }
    }

    pub fn served(&self) -> Option<&str> {
        match self {
            Seen::Served(v) => Some(v),
            _ => None,
        }
    }
}

/// One client attempt: when it started and ended, and what it saw.
#[derive(Debug, Clone)]
pub struct Attempt {
    pub start: Instant,
    pub end: Instant,
    pub seen: Seen,
}

/// A client loop on its own thread: one attempt, a short pause, again,
/// until [`ClientLoop::finish`].
pub struct ClientLoop {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Attempt>>,
}

impl ClientLoop {
    pub fn spawn(gap: Duration, mut attempt: impl FnMut() -> Seen + Send + 'static) -> ClientLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let handle = {
            let stop = Arc::clone(&stop);
            thread::spawn(move || {
                let mut out = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    let start = Instant::now();
                    let seen = attempt();
                    out.push(Attempt {
                        start,
                        end: Instant::now(),
                        seen,
                    });
                    pace(gap);
                }
                out
            })
        };
        ClientLoop { stop, handle }
    }

    /// Stops the loop and returns every attempt, in order.
    pub fn finish(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.join().expect("client loop panicked")
    }
}

/// Counts of each kind of outcome, for printing.
pub fn tally(attempts: &[Attempt]) -> String {
    let (mut served, mut ro, mut refused, mut held, mut error) = (0, 0, 0, 0, 0);
    for a in attempts {
        match a.seen {
            Seen::Served(_) => served += 1,
            Seen::ReadOnly(_) => ro += 1,
            Seen::Refused(_) => refused += 1,
            Seen::Held => held += 1,
            Seen::Error(_) => error += 1,
        }
    }
    format!(
        "{} attempts: {served} served, {ro} read-only, {refused} refused, {held} held, {error} other errors",
        attempts.len()
    )
}

/// The longest stretch without a served attempt, from the first served
/// one on (measured between the ends of consecutive served attempts, and
/// from the last served one to the last attempt).
pub fn longest_outage(attempts: &[Attempt]) -> Duration {
    let mut last_ok: Option<Instant> = None;
    let mut worst = Duration::ZERO;
    for a in attempts {
        if let Some(t) = last_ok {
            worst = worst.max(a.end - t);
        }
        if a.seen.served().is_some() {
            last_ok = Some(a.end);
        }
    }
    worst
}

/// Polls `attempt` until it returns `Ok` `n` times in a row (a routing
/// that has settled, not one lucky answer); panics naming `what` and the
/// last answer after `timeout`.
pub fn settle_on(
    timeout: Duration,
    n: usize,
    what: &str,
    mut attempt: impl FnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + timeout;
    let (mut run, mut last) = (0, String::new());
    while run < n {
        match attempt() {
            Ok(()) => run += 1,
            Err(e) => (run, last) = (0, e),
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting until {what}; last answer: {last}"
        );
        crate::common::poll_pause();
    }
}

/// The first few items, for a failure message.
pub fn first<T>(items: &[T]) -> &[T] {
    &items[..items.len().min(8)]
}

/// Milliseconds from `t0` to `t` (negative if before), for printing.
pub fn ms(t0: Instant, t: Instant) -> i64 {
    if t >= t0 {
        (t - t0).as_millis() as i64
    } else {
        -((t0 - t).as_millis() as i64)
    }
}
