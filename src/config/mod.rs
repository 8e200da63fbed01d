//! Validated settings: what the CLI flags and the config file turn into.
//!
//! A [`Config`] holds several [`ListenerConfig`]s, each with its own pool,
//! limits, engine and timeouts, and every worker serves all of them. A
//! relay keeps an `Arc` to its listener's settings, so per-listener changes
//! never touch the hot path.
//!
//! | file | what lives there |
//! |---|---|
//! | `mod.rs` | `Config`, `ListenerConfig`, `Timeouts`, `Mode`, validation |
//! | `pool.rs` | pools, servers, health, access lists, keepalive |
//! | `route.rs` | named pools, routes and the rules of a route table |
//! | `parse.rs` | durations, sizes, addresses |
//! | `listen.rs` | which listen addresses can be bound side by side |
//! | `file/` | the TOML file: every error with its key and line (`values.rs` typed values, `listener.rs` the top tables and listeners, `pool.rs` pools and health) |
//! | `check.rs` | the effective config as TOML (`spliced check`) |
//! | `preflight.rs` | password files and server names, as `run` will meet them |

#[cfg(feature = "config-file")]
mod check;
#[cfg(feature = "config-file")]
mod file;
pub mod listen;
mod parse;
mod pool;
mod preflight;
mod route;

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

#[cfg(feature = "config-file")]
pub use check::effective_toml;
#[cfg(feature = "config-file")]
pub use file::{load, parse_str, Diagnostic, FlagDefaults, Loaded};
pub use parse::*;
pub use pool::*;
pub use preflight::{Preflight, RunAs};
#[cfg(test)]
pub(crate) use route::test_route;
pub use route::{route_problems, server_name_problem, NamedPool, RouteConfig, MAX_ALPN_LEN};

/// How a listener's relays move bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum Mode {
    /// socket → pipe → socket with splice(2); falls back to copy per direction.
    Splice,
    /// read(2)/write(2) through a userspace buffer.
    Copy,
    /// Per direction: copy while it carries small messages, splice once it
    /// streams, and back; the engine changes only with the buffer empty.
    Auto,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Splice => "splice",
            Mode::Copy => "copy",
            Mode::Auto => "auto",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Mode {
    type Err = ModeError;
    fn from_str(s: &str) -> Result<Self, ModeError> {
        match s {
            "splice" => Ok(Mode::Splice),
            "copy" => Ok(Mode::Copy),
            "auto" => Ok(Mode::Auto),
            other => Err(ModeError::Unknown(other.to_string())),
        }
    }
}

/// Why a text is no [`Mode`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModeError {
    /// The text names no mode.
    Unknown(String),
}

impl fmt::Display for ModeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ModeError::Unknown(text) => {
                write!(f, "unknown mode '{text}' (expected splice, copy or auto)")
            }
        }
    }
}

impl std::error::Error for ModeError {}

/// How each worker waits for and moves bytes (`[global] loop`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "lowercase")
)]
pub enum EventLoop {
    /// epoll: one read(2), write(2) or splice(2) per socket and transfer.
    #[default]
    Epoll,
    /// epoll for readiness; the copy engine's reads of the sockets a wakeup
    /// reported, and the writes its relays queued, go to the kernel in one
    /// io_uring submission per batch. Falls back to `epoll` (logged once)
    /// where io_uring cannot be used.
    Uring,
}

impl EventLoop {
    pub fn as_str(self) -> &'static str {
        match self {
            EventLoop::Epoll => "epoll",
            EventLoop::Uring => "uring",
        }
    }
}

impl fmt::Display for EventLoop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for EventLoop {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "epoll" => Ok(EventLoop::Epoll),
            "uring" => Ok(EventLoop::Uring),
            other => Err(ConfigError(format!(
                "unknown loop '{other}' (expected epoll or uring)"
            ))),
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

/// One listener: the addresses it accepts on, who may connect, and the
/// pool its connections go to.
#[derive(Clone, Debug, PartialEq)]
pub struct ListenerConfig {
    /// Unique within a config; names the listener in log lines.
    pub name: String,
    /// Every address is bound by every worker; `:PORT` yields both the IPv4
    /// and the IPv6 wildcard, and a host name every address it resolves to.
    pub listen: Vec<SocketAddr>,
    /// The listener's own pool (`[listener.pool]`); unused (and empty)
    /// when it has routes.
    pub pool: PoolConfig,
    /// Routes to named pools, tried in order (`[[listener.route]]`);
    /// empty: every client goes to `pool`.
    pub routes: Vec<RouteConfig>,
    /// The named pools its routes lead to, each once, as
    /// [`Config::link_pools`] copied them from [`Config::pools`]: a
    /// listener carries what it runs with, so a reload that changes a
    /// named pool changes each listener that routes to it.
    pub route_pools: Vec<NamedPool>,
    pub mode: Mode,
    pub timeouts: Timeouts,
    /// This listener's relays at most; at the limit it stops accepting and
    /// clients wait in the listen backlog.
    pub max_conns: Option<usize>,
    /// Live relays per client IP at most; past it, new connections are reset.
    pub max_conns_per_source: Option<usize>,
    /// Clients held at once (over all workers) while no server takes
    /// relays (`queue-timeout`); past it, new ones are refused. `None`:
    /// no bound but `max_conns` and the relay cap.
    pub max_queued: Option<usize>,
    pub access: Access,
    /// Every client must come from these sources and start with a PROXY
    /// header, whose source address then stands for the client's.
    pub accept_proxy: Option<AcceptProxy>,
    /// What the first client packet is read for before the upstream
    /// connect (PostgreSQL cancel requests); `None` reads nothing.
    pub protocol: Protocol,
    /// How long a `protocol` listener waits for the client's first packet
    /// before it connects upstream with what it has.
    pub first_packet_timeout: Duration,
    /// Keepalive probes on both sockets; `None` keeps the system's setting.
    pub keepalive: Option<Keepalive>,
    /// TCP_USER_TIMEOUT on both sockets.
    pub user_timeout: Option<Duration>,
}

impl ListenerConfig {
    /// The settings of pairs handed to a runtime: no address, no servers.
    pub fn handoff(mode: Mode, timeouts: Timeouts) -> Self {
        let mut l = ListenerConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)), Vec::new(), mode);
        l.name = "handoff".into();
        l.listen.clear();
        l.timeouts = timeouts;
        l
    }

    /// A listener named after its address, with every server an IP address.
    pub fn new(listen: SocketAddr, upstreams: Vec<SocketAddr>, mode: Mode) -> Self {
        ListenerConfig {
            name: listen.to_string(),
            listen: vec![listen],
            pool: PoolConfig::new(
                upstreams
                    .iter()
                    .map(|a| ServerConfig::new(a.to_string()))
                    .collect(),
            ),
            routes: Vec::new(),
            route_pools: Vec::new(),
            mode,
            timeouts: Timeouts::default(),
            max_conns: None,
            max_conns_per_source: None,
            max_queued: None,
            access: Access::default(),
            accept_proxy: None,
            protocol: Protocol::None,
            first_packet_timeout: DEFAULT_FIRST_PACKET_TIMEOUT,
            keepalive: None,
            user_timeout: None,
        }
    }

    /// Every pool the listener's clients may go to, with how messages
    /// name it: its own (`pool`) or, with routes, each named pool once
    /// (`pool 'NAME'`).
    pub fn pools(&self) -> Vec<(String, &PoolConfig)> {
        if self.routes.is_empty() {
            return vec![("pool".to_string(), &self.pool)];
        }
        self.route_pools
            .iter()
            .map(|p| (format!("pool '{}'", p.name), &p.config))
            .collect()
    }

    /// [`ListenerConfig::pools`], to change them (passwords read at start).
    pub fn pools_mut(&mut self) -> Vec<&mut PoolConfig> {
        if self.routes.is_empty() {
            return vec![&mut self.pool];
        }
        self.route_pools.iter_mut().map(|p| &mut p.config).collect()
    }

    /// Replaces the pool's servers by these addresses.
    pub fn set_upstreams(&mut self, upstreams: &[SocketAddr]) {
        self.pool.servers = upstreams
            .iter()
            .map(|a| ServerConfig::new(a.to_string()))
            .collect();
    }
}

/// How long a `protocol` listener waits for a first packet by default.
pub const DEFAULT_FIRST_PACKET_TIMEOUT: Duration = Duration::from_secs(5);
/// Default capacity asked of each pooled pipe (F_SETPIPE_SZ). See docs/BENCHMARKS.md
/// for the measurements behind it.
pub const DEFAULT_PIPE_SIZE: usize = 1 << 20;
/// Default size of a copy-engine buffer.
pub const DEFAULT_COPY_BUFFER: usize = 64 * 1024;

/// Process-wide settings.
#[derive(Clone, Debug)]
pub struct Config {
    pub listeners: Vec<ListenerConfig>,
    /// Named pools (`[[pool]]`), which listeners' routes lead to.
    pub pools: Vec<NamedPool>,
    /// Worker threads, each with its own event loop and SO_REUSEPORT listener.
    pub workers: usize,
    /// Which loop the workers run.
    pub event_loop: EventLoop,
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
    /// limit (a reserve kept, two sockets per relay plus a pipe per four
    /// relays; pipes get what the sockets leave), so accepted clients
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
            pools: Vec::new(),
            workers: default_workers(),
            event_loop: EventLoop::Epoll,
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

    /// Checks what types cannot: non-empty lists, unique names, sane sizes.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(ConfigError("no listener configured".into()));
        }
        let mut names = std::collections::HashSet::new();
        let mut pool_names = std::collections::HashSet::new();
        for p in &self.pools {
            if !pool_names.insert(p.name.as_str()) {
                return Err(ConfigError(format!("two pools are named '{}'", p.name)));
            }
            validate_pool(&format!("pool '{}'", p.name), &p.config)?;
        }
        for l in &self.listeners {
            if !names.insert(l.name.as_str()) {
                return Err(ConfigError(format!("two listeners are named '{}'", l.name)));
            }
            if let Some((i, key, problem)) =
                route_problems(l.protocol, &l.routes).into_iter().next()
            {
                return Err(ConfigError(format!(
                    "listener '{}': route {}: {key}: {problem}",
                    l.name,
                    i + 1
                )));
            }
            for r in &l.routes {
                if !l.route_pools.iter().any(|p| p.name == r.pool) {
                    return Err(ConfigError(format!(
                        "listener '{}': a route leads to pool '{}', which is not defined",
                        l.name, r.pool
                    )));
                }
            }
            for (which, pool) in l.pools() {
                validate_pool(&format!("listener '{}': {which}", l.name), pool)?;
            }
            if l.listen.is_empty() {
                return Err(ConfigError(format!("listener '{}' has no address", l.name)));
            }
            if let Some((setting, problem)) =
                l.keepalive.iter().flat_map(Keepalive::problems).next()
            {
                return Err(ConfigError(format!(
                    "listener '{}': keepalive.{setting}: {problem}",
                    l.name
                )));
            }
            if let Some(problem) = l.user_timeout.and_then(user_timeout_problem) {
                return Err(ConfigError(format!(
                    "listener '{}': user-timeout: {problem}",
                    l.name
                )));
            }
            if l.max_conns == Some(0) || l.max_conns_per_source == Some(0) {
                return Err(ConfigError(format!(
                    "listener '{}': a connection limit of 0 would refuse everyone",
                    l.name
                )));
            }
        }
        self.validate_runtime()
    }

    /// Gives every listener with routes a copy of the named pools they
    /// lead to ([`ListenerConfig::route_pools`]), from [`Config::pools`].
    /// A name [`Config::pools`] lacks may have been given to the listener
    /// directly (a config built in code); otherwise it is an error.
    pub fn link_pools(&mut self) -> Result<(), ConfigError> {
        for l in &mut self.listeners {
            let mut linked: Vec<NamedPool> = Vec::new();
            for r in &l.routes {
                if linked.iter().any(|p| p.name == r.pool) {
                    continue;
                }
                let found = self
                    .pools
                    .iter()
                    .chain(&l.route_pools)
                    .find(|p| p.name == r.pool)
                    .cloned()
                    .ok_or_else(|| {
                        ConfigError(format!(
                            "listener '{}': a route leads to pool '{}', which is not defined",
                            l.name, r.pool
                        ))
                    })?;
                linked.push(found);
            }
            l.route_pools = linked;
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
        if self.copy_buffer_size > crate::engine::MAX_COPY_BUFFER {
            return Err(ConfigError(format!(
                "copy buffer size must be at most {} bytes",
                crate::engine::MAX_COPY_BUFFER
            )));
        }
        Ok(())
    }
}

/// Checks one pool: servers, weights, health settings. `which` names it
/// in the message (`listener 'pg': pool`, `pool 'tenant-a'`).
fn validate_pool(which: &str, pool: &PoolConfig) -> Result<(), ConfigError> {
    if pool.servers.is_empty() {
        return Err(ConfigError(format!("{which} has no upstream server")));
    }
    for s in &pool.servers {
        s.host_port()
            .map_err(|e| ConfigError(format!("{which}: server {e}")))?;
        if s.weight == 0 || s.weight > MAX_WEIGHT {
            return Err(ConfigError(format!(
                "{which}: server {} has weight {} (1 to {MAX_WEIGHT})",
                s.address, s.weight
            )));
        }
    }
    let h = &pool.health;
    if h.fall == 0 || h.rise == 0 {
        return Err(ConfigError(format!(
            "{which}: health rise and fall must be at least 1"
        )));
    }
    if h.check == Some(Check::Http) && h.role != Role::Any {
        return Err(ConfigError(format!(
            "{which}: an http check takes the role from its path (e.g. path = \"/primary\")"
        )));
    }
    if matches!(h.check, Some(Check::Tcp | Check::Mysql)) && h.role != Role::Any {
        return Err(ConfigError(format!(
            "{which}: a {} check cannot tell roles: use redis, postgres or http",
            h.check.map_or("", Check::as_str)
        )));
    }
    if h.max_lag.is_some()
        && !(matches!(h.check, Some(Check::Postgres | Check::Redis))
            && matches!(h.role, Role::Replica | Role::PreferReplica))
    {
        return Err(ConfigError(format!(
            "{which}: health max-lag applies to postgres and redis checks with role replica or prefer-replica"
        )));
    }
    if h.max_lag == Some(0) {
        return Err(ConfigError(format!(
            "{which}: health max-lag must be positive"
        )));
    }
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_names_the_problem() {
        let mut c = Config::single("127.0.0.1:1".parse().unwrap(), vec![], Mode::Splice);
        assert!(c.validate().unwrap_err().0.contains("no upstream"));
        c.listeners[0].set_upstreams(&["127.0.0.1:2".parse().unwrap()]);
        assert!(c.validate().is_ok());
        let twin = c.listeners[0].clone();
        c.listeners.push(twin);
        assert!(c.validate().unwrap_err().0.contains("two listeners"));
        c.listeners.pop();
        c.workers = 0;
        assert!(c.validate().is_err());
    }

    #[test]
    fn an_unknown_mode_is_a_typed_error_with_the_choices() {
        assert_eq!("auto".parse::<Mode>(), Ok(Mode::Auto));
        let e = "zero-copy".parse::<Mode>().unwrap_err();
        assert_eq!(e, ModeError::Unknown("zero-copy".to_string()));
        assert_eq!(
            e.to_string(),
            "unknown mode 'zero-copy' (expected splice, copy or auto)"
        );
    }
}
