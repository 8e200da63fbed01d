//! Validated settings: what the CLI (and later a TOML file) turns into.
//!
//! A [`Config`] holds several
//! [`ListenerConfig`]s, each with its own upstreams, engine and timeouts, and
//! every worker serves all of them. A relay keeps an `Arc` to its listener's
//! settings, so per-listener changes never touch the hot path.

use std::fmt;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// How a listener's relays move bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// socket → pipe → socket with splice(2); falls back to copy per direction.
    Splice,
    /// read(2)/write(2) through a userspace buffer.
    Copy,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Splice => "splice",
            Mode::Copy => "copy",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "splice" => Ok(Mode::Splice),
            "copy" => Ok(Mode::Copy),
            other => Err(format!("unknown mode '{other}' (expected splice or copy)")),
        }
    }
}

/// Deadlines of one listener's relays. `None` disables a deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// Close a relay when no byte moved either way for this long.
    pub idle: Option<Duration>,
    /// The inactivity limit once either direction has seen EOF.
    pub fin: Option<Duration>,
    /// Bounds each upstream connect attempt.
    pub connect: Option<Duration>,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            idle: Some(Duration::from_secs(3600)),
            fin: Some(Duration::from_secs(60)),
            connect: Some(Duration::from_secs(5)),
        }
    }
}

/// One listener: the addresses it accepts on and where its connections go.
#[derive(Clone, Debug)]
pub struct ListenerConfig {
    /// Every address is bound by every worker; `:PORT` yields both the IPv4
    /// and the IPv6 wildcard, and a host name every address it resolves to.
    pub listen: Vec<SocketAddr>,
    /// Tried round-robin per accepted connection; a failed connect tries the next.
    pub upstreams: Vec<SocketAddr>,
    pub mode: Mode,
    pub timeouts: Timeouts,
}

impl ListenerConfig {
    pub fn new(listen: SocketAddr, upstreams: Vec<SocketAddr>, mode: Mode) -> Self {
        ListenerConfig {
            listen: vec![listen],
            upstreams,
            mode,
            timeouts: Timeouts::default(),
        }
    }
}

/// Default capacity asked of each pooled pipe (F_SETPIPE_SZ). See docs/BENCHMARKS.md
/// for the measurements behind it.
pub const DEFAULT_PIPE_SIZE: usize = 1 << 20;
/// Default size of a copy-engine buffer.
pub const DEFAULT_COPY_BUFFER: usize = 64 * 1024;

/// Process-wide settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    /// Worker threads, each with its own event loop and SO_REUSEPORT listener.
    pub workers: usize,
    /// Capacity asked of pooled pipes; 0 keeps the kernel default (64 KiB).
    pub pipe_size: usize,
    /// Most pipes one worker holds (in use plus pooled); past it, directions copy.
    pub max_pipes_per_worker: usize,
    /// Most empty pipes one worker keeps for reuse.
    pub max_idle_pipes_per_worker: usize,
    /// Bytes of enlarged pipe capacity the whole process may hold (split
    /// evenly between workers). Past it, new pipes keep the kernel's default
    /// size. The default is half of `pipe-user-pages-soft`, the per-user
    /// allowance past which the kernel itself refuses to enlarge pipes.
    pub pipe_budget: usize,
    pub copy_buffer_size: usize,
    /// Most relays at once, over all workers. `None` derives it from the fd
    /// limit (two sockets per relay, a reserve kept), so accepted clients
    /// never fail for want of an upstream socket: past the cap, new
    /// connections wait in the listen backlog.
    pub max_relays: Option<usize>,
    /// How long live relays may finish after the first SIGTERM/SIGINT.
    pub drain_timeout: Option<Duration>,
    /// The admin endpoint, the stats file, progress lines.
    pub ops: crate::ops::Ops,
}

impl Config {
    /// A config with one listener and default settings.
    pub fn single(listen: SocketAddr, upstreams: Vec<SocketAddr>, mode: Mode) -> Self {
        Config {
            listeners: vec![ListenerConfig::new(listen, upstreams, mode)],
            workers: default_workers(),
            pipe_size: DEFAULT_PIPE_SIZE,
            max_pipes_per_worker: 4096,
            max_idle_pipes_per_worker: 64,
            pipe_budget: default_pipe_budget(),
            copy_buffer_size: DEFAULT_COPY_BUFFER,
            max_relays: None,
            drain_timeout: Some(Duration::from_secs(30)),
            ops: crate::ops::Ops::default(),
        }
    }

    /// Checks what types cannot: non-empty lists and sane sizes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(ConfigError("no listener configured".into()));
        }
        self.validate_runtime()?;
        for l in &self.listeners {
            if l.upstreams.is_empty() {
                return Err(ConfigError(format!(
                    "listener {} has no upstream server",
                    display_addrs(&l.listen)
                )));
            }
            if l.listen.is_empty() {
                return Err(ConfigError("a listener has no address".into()));
            }
        }
        Ok(())
    }

    /// Checks the settings a runtime needs even with no listener (one
    /// that only relays handed-off pairs).
    pub fn validate_runtime(&self) -> Result<(), ConfigError> {
        if self.workers == 0 {
            return Err(ConfigError("workers must be at least 1".into()));
        }
        if self.copy_buffer_size == 0 {
            return Err(ConfigError("copy buffer size must be positive".into()));
        }
        Ok(())
    }
}

/// Half of `pipe-user-pages-soft` in bytes; 32 MiB if it cannot be read,
/// 1 GiB if the limit is off (0).
pub fn default_pipe_budget() -> usize {
    const PAGE: usize = 4096;
    match std::fs::read_to_string("/proc/sys/fs/pipe-user-pages-soft")
        .ok()
        .and_then(|s| s.trim().parse::<usize>().ok())
    {
        Some(0) => 1 << 30,
        Some(pages) => pages * PAGE / 2,
        None => 32 << 20,
    }
}

pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// A configuration problem, worded for a one-line error message. It names
/// settings as the library knows them (`workers`, a listener's upstream
/// servers); a front end (the CLI, a config file) maps them to its own
/// words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The longest timeout accepted: a year. Longer ones are surely typos, and
/// `Instant + Duration` must never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86400);

/// Parses `500ms`, `30s`, `5m`, `1h` (also `us`, `d`, and sums like `1m30s`).
/// `0` alone means "disabled" and yields `None`; any other bare number is
/// rejected, because `--idle-timeout 30` is ambiguous.
pub fn parse_duration(text: &str) -> Result<Option<Duration>, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(None);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "'{text}' is not a duration (try 500ms, 30s, 5m, 1h)"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("'{text}' is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "" => {
                return Err(format!(
                    "'{text}' has no unit (try {value}s or {value}ms; 0 disables)"
                ))
            }
            "us" => Duration::from_micros(value),
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.saturating_mul(60)),
            "h" => Duration::from_secs(value.saturating_mul(3600)),
            "d" => Duration::from_secs(value.saturating_mul(86400)),
            other => {
                return Err(format!(
                    "'{text}' has an unknown unit '{other}' (use us, ms, s, m, h or d)"
                ))
            }
        };
        total = total.saturating_add(part);
    }
    if total > MAX_DURATION {
        return Err(format!("'{text}' is longer than the maximum of 365d"));
    }
    Ok(if total.is_zero() { None } else { Some(total) })
}

/// Parses a byte size: `65536`, `64k`, `1m`, `1MiB`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let s = text.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(format!("'{text}' is not a size (try 65536, 256k or 1m)"));
    }
    let value: usize = s[..digits]
        .parse()
        .map_err(|_| format!("'{text}' is too large"))?;
    let mult = match s[digits..].to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("'{text}' has an unknown unit '{other}'")),
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("'{text}' is too large"))
}

/// `a, b, c` for log lines and errors.
pub fn display_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves a listen address. Besides what [`resolve`] takes, `:PORT` (and
/// `*:PORT`) means every address, IPv4 and IPv6, as HAProxy and nginx users
/// write it. A name is bound on every address it resolves to.
pub fn resolve_listen(text: &str) -> Result<Vec<SocketAddr>, String> {
    let wildcard_port = text.strip_prefix(':').or_else(|| text.strip_prefix("*:"));
    if let Some(port) = wildcard_port {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("'{text}' has no valid port (expected :PORT, e.g. :6432)"))?;
        return Ok(vec![
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        ]);
    }
    let mut addrs = resolve(text)?;
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|a| seen.insert(*a));
    Ok(addrs)
}

/// Resolves `host:port` (or `ip:port`, or `[v6]:port`) to addresses.
pub fn resolve(text: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    if !text.contains(':') {
        return Err(format!("'{text}' is not an address (expected HOST:PORT)"));
    }
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{text}': {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("'{text}' resolves to no address"));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!(
            parse_duration("500ms"),
            Ok(Some(Duration::from_millis(500)))
        );
        assert_eq!(parse_duration("30s"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(parse_duration("5m"), Ok(Some(Duration::from_secs(300))));
        assert_eq!(parse_duration("1h"), Ok(Some(Duration::from_secs(3600))));
        assert_eq!(parse_duration("1m30s"), Ok(Some(Duration::from_secs(90))));
        assert_eq!(parse_duration("0"), Ok(None));
        assert_eq!(parse_duration("0s"), Ok(None));
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999999s").is_err());
        assert_eq!(parse_duration("365d"), Ok(Some(MAX_DURATION)));
        assert!(parse_duration("366d").unwrap_err().contains("maximum"));
        assert!(parse_duration("106751991167301d").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("x").is_err());
        assert!(parse_size("1q").is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(resolve("127.0.0.1:80").unwrap().len(), 1);
        assert!(resolve("[::1]:80").is_ok());
        assert!(resolve("nonsense").is_err());
        assert!(resolve("127.0.0.1:notaport").is_err());
    }

    #[test]
    fn listen_addresses() {
        let all = resolve_listen(":6432").unwrap();
        assert_eq!(all.len(), 2);
        assert!(all
            .iter()
            .all(|a| a.ip().is_unspecified() && a.port() == 6432));
        assert!(all[0].is_ipv4() && all[1].is_ipv6());
        assert_eq!(resolve_listen("*:5").unwrap().len(), 2);
        assert!(resolve_listen(":").is_err());
        assert!(resolve_listen(":99999").is_err());
        assert_eq!(resolve_listen("127.0.0.1:7").unwrap().len(), 1);
        let local = resolve_listen("localhost:7").unwrap();
        assert!(!local.is_empty() && local.iter().all(|a| a.ip().is_loopback()));
    }

    #[test]
    fn validation_names_the_problem() {
        let mut c = Config::single("127.0.0.1:1".parse().unwrap(), vec![], Mode::Splice);
        assert!(c.validate().unwrap_err().0.contains("no upstream"));
        c.listeners[0]
            .upstreams
            .push("127.0.0.1:2".parse().unwrap());
        assert!(c.validate().is_ok());
        c.workers = 0;
        assert!(c.validate().is_err());
    }
}
