//! A listener's upstream pool, health checks and client-side settings, as
//! validated values. Every enum names its choices in the config file's words
//! (`as_str`), so errors, `spliced check` and docs say the same thing.

use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

use super::HostPortError;

/// Declares a config enum with its file spelling, `as_str`, `parse` and
/// the list of choices for error messages.
macro_rules! choice {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const CHOICES: &'static [&'static str] = &[$($text),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text {
                    $($text => Some($name::$variant),)+
                    _ => None,
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

choice! {
    /// How a pool picks the server for a new relay.
    Balance {
        /// Weighted round-robin, interleaved (a weight-2 server gets every
        /// other turn, not two in a row).
        RoundRobin = "round-robin",
        /// The server with the fewest live relays for its weight.
        LeastConn = "least-conn",
        /// Consistent (rendezvous) hashing of the client IP.
        SourceHash = "source-hash",
    }
}

choice! {
    /// What happens to live relays of a server that goes down.
    OnDown {
        /// They run on until they end by themselves.
        Drain = "drain",
        /// They are reset.
        Kill = "kill",
    }
}

choice! {
    /// Which PROXY protocol header, if any, is sent to every server.
    SendProxy {
        None = "none",
        V1 = "v1",
        V2 = "v2",
    }
}

choice! {
    /// The active health check's protocol.
    Check {
        Tcp = "tcp",
        Redis = "redis",
        Postgres = "postgres",
        Mysql = "mysql",
        Http = "http",
    }
}

choice! {
    /// The role a server must have to take relays.
    Role {
        Any = "any",
        Primary = "primary",
        Replica = "replica",
        /// Replicas while any is eligible, else the primary.
        PreferReplica = "prefer-replica",
    }
}

choice! {
    /// What a listener reads from a client before connecting upstream.
    Protocol {
        /// Nothing: the upstream connect starts at accept.
        None = "none",
        /// The first packet, to send a CancelRequest to every server, and
        /// with routes to route by it (startup parameters, a TLS
        /// ClientHello after an SSLRequest or in place of one).
        Postgres = "postgres",
        /// A TLS ClientHello, to route by its server name and ALPN.
        Tls = "tls",
    }
}

/// One `servers` entry: a name or IP with a port, resolved at start and
/// every `resolve-interval`. A name may stand for several addresses; each
/// becomes a server of the pool with this entry's weight and role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// `HOST:PORT` as written (an IP address or a name).
    pub address: String,
    /// Relative share of new relays, 1 to [`MAX_WEIGHT`].
    pub weight: u32,
    /// Used only while no other server is up.
    pub backup: bool,
    /// The port its active check connects to (an agent beside the
    /// server, such as Patroni's REST API); the pool's `health.port` or
    /// the server's own port when unset.
    pub check_port: Option<u16>,
}

/// The largest server weight.
pub const MAX_WEIGHT: u32 = 256;

impl ServerConfig {
    pub fn new(address: impl Into<String>) -> ServerConfig {
        ServerConfig {
            address: address.into(),
            weight: 1,
            backup: false,
            check_port: None,
        }
    }

    /// The host and port of `address`; `[v6]:port` loses its brackets.
    pub fn host_port(&self) -> Result<(&str, u16), HostPortError> {
        split_host_port(&self.address)
    }

    /// The address itself when it is an IP address (no resolution needed).
    pub fn ip(&self) -> Option<IpAddr> {
        self.host_port().ok().and_then(|(h, _)| h.parse().ok())
    }
}

/// Splits `HOST:PORT` (or `[v6]:PORT`).
pub fn split_host_port(text: &str) -> Result<(&str, u16), HostPortError> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| HostPortError::NotAnAddress(text.into()))?;
    let port: u16 = port.parse().map_err(|_| HostPortError::Port(text.into()))?;
    let bracketed = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if host.is_empty() {
        return Err(HostPortError::NoHost(text.into()));
    }
    if let Some(v6) = bracketed {
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(HostPortError::NotIpv6 {
                text: text.into(),
                inner: v6.into(),
            });
        }
        return Ok((v6, port));
    }
    if host.contains(':') {
        return Err(HostPortError::Unbracketed(text.into()));
    }
    Ok((host, port))
}

/// Active health checking of a pool's servers, and the passive `fall`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HealthConfig {
    /// The active probe; `None` keeps passive health only (failed connects).
    pub check: Option<Check>,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive passed probes that bring a down server back.
    pub rise: u32,
    /// Consecutive failures (probes, or connects of relays) that mark a
    /// server down.
    pub fall: u32,
    pub role: Role,
    /// Postgres/MySQL login for role checks.
    pub user: Option<String>,
    pub password_file: Option<String>,
    /// What `password_file` holds, read by [`Config::load_secrets`](super::Config::load_secrets) at start.
    pub password: Option<Secret>,
    pub database: Option<String>,
    /// The HTTP agent's port (the Patroni pattern); the server's own port if unset.
    pub port: Option<u16>,
    pub path: Option<String>,
    /// The most replication lag, in bytes, a replica may have and still
    /// take new relays (`max-lag`; replica and prefer-replica pools of
    /// postgres and redis checks).
    pub max_lag: Option<u64>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            check: None,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(1),
            rise: 2,
            fall: 3,
            role: Role::Any,
            user: None,
            password_file: None,
            password: None,
            database: None,
            port: None,
            path: None,
            max_lag: None,
        }
    }
}

/// A password: compared and cloned like a string, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A listener's upstream servers and how they are chosen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    pub balance: Balance,
    /// Further servers to try after a failed connect; `None`: every other
    /// server once (pool size - 1).
    pub retries: Option<usize>,
    pub on_down: OnDown,
    /// How often names are resolved again; `None`: only at start (a name
    /// that did not resolve then is still retried until it does).
    pub resolve_interval: Option<Duration>,
    pub send_proxy: SendProxy,
    pub servers: Vec<ServerConfig>,
    pub health: HealthConfig,
    /// How long a new client is held while no server of the pool takes
    /// relays (or every connect attempt failed), waiting for one to; `None`
    /// refuses it at once.
    pub queue_timeout: Option<Duration>,
}

impl PoolConfig {
    pub fn new(servers: Vec<ServerConfig>) -> PoolConfig {
        PoolConfig {
            balance: Balance::RoundRobin,
            retries: None,
            on_down: OnDown::Drain,
            resolve_interval: Some(Duration::from_secs(30)),
            send_proxy: SendProxy::None,
            servers,
            health: HealthConfig::default(),
            queue_timeout: None,
        }
    }
}

/// TCP keepalive probes on both sockets of a relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub count: u32,
}

/// The most TCP_KEEPIDLE and TCP_KEEPINTVL take, in seconds (the kernel's
/// MAX_TCP_KEEPIDLE and MAX_TCP_KEEPINTVL); they count whole seconds from 1.
pub const MAX_KEEPALIVE_SECS: u64 = 32767;
/// The most TCP_KEEPCNT takes (the kernel's MAX_TCP_KEEPCNT).
pub const MAX_KEEPALIVE_COUNT: u32 = 127;
/// The most TCP_USER_TIMEOUT takes: it is an `int` of milliseconds.
pub const MAX_USER_TIMEOUT: Duration = Duration::from_millis(i32::MAX as u64);

impl Keepalive {
    /// What the kernel would refuse (every relay would then run without
    /// keepalive): `(setting, problem)`, worded for an error line.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        for (name, d, option) in [
            ("idle", self.idle, "TCP_KEEPIDLE"),
            ("interval", self.interval, "TCP_KEEPINTVL"),
        ] {
            if let Some(p) = keepalive_secs_problem(d, option) {
                out.push((name, p));
            }
        }
        if self.count == 0 || self.count > MAX_KEEPALIVE_COUNT {
            out.push((
                "count",
                format!(
                    "{} is out of range (1 to {MAX_KEEPALIVE_COUNT}, the most TCP_KEEPCNT takes)",
                    self.count
                ),
            ));
        }
        out
    }
}

/// A keepalive time the kernel refuses: under a second (it counts whole
/// seconds, and 0 is invalid) or over [`MAX_KEEPALIVE_SECS`].
pub fn keepalive_secs_problem(d: Duration, option: &str) -> Option<String> {
    if d < Duration::from_secs(1) || d > Duration::from_secs(MAX_KEEPALIVE_SECS) {
        Some(format!(
            "{} is out of range (1s to {MAX_KEEPALIVE_SECS}s, what {option} takes)",
            super::format_duration(Some(d))
        ))
    } else {
        None
    }
}

/// A TCP_USER_TIMEOUT the kernel refuses (over [`MAX_USER_TIMEOUT`]) or
/// that would round down to 0 ms, which means "the system's default".
pub fn user_timeout_problem(d: Duration) -> Option<String> {
    if d < Duration::from_millis(1) || d > MAX_USER_TIMEOUT {
        Some(format!(
            "{} is out of range (1ms to {}ms, about 24.8 days: what TCP_USER_TIMEOUT takes)",
            super::format_duration(Some(d)),
            MAX_USER_TIMEOUT.as_millis()
        ))
    } else {
        None
    }
}

/// Sources whose connections start with a PROXY v1/v2 header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcceptProxy {
    pub trusted: Vec<IpNet>,
    /// How long a client may take to send its whole header before it is
    /// reset.
    pub timeout: Duration,
}

impl AcceptProxy {
    /// The header deadline unless a config says otherwise.
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

    /// Headers from these sources, with the default deadline.
    pub fn new(trusted: Vec<IpNet>) -> Self {
        AcceptProxy {
            trusted,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }
}

/// Which client addresses may connect: `deny` first, then `allow` (an
/// empty `allow` lets everyone else in).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

impl Access {
    /// Whether `ip` may connect. An IPv4-mapped IPv6 address is matched as
    /// the IPv4 address it stands for.
    pub fn permits(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_round_trip() {
        for c in Balance::CHOICES {
            assert_eq!(Balance::parse(c).unwrap().as_str(), *c);
        }
        assert_eq!(Balance::parse("rr"), None);
        assert_eq!(SendProxy::parse("v2"), Some(SendProxy::V2));
    }

    #[test]
    fn host_port_splits_names_and_addresses() {
        assert_eq!(split_host_port("db1:5432"), Ok(("db1", 5432)));
        assert_eq!(split_host_port("[::1]:80"), Ok(("::1", 80)));
        assert!(split_host_port("db1").is_err());
        assert!(split_host_port(":5432").is_err());
        assert!(split_host_port("db1:x").is_err());
        assert!(split_host_port("::1:80").is_err());
        assert_eq!(
            ServerConfig::new("10.0.0.1:1").ip(),
            Some("10.0.0.1".parse().unwrap())
        );
        assert_eq!(ServerConfig::new("db:1").ip(), None);
    }

    #[test]
    fn deny_wins_then_allow_filters() {
        let net = |s: &str| s.parse::<IpNet>().unwrap();
        let a = Access {
            allow: vec![net("10.0.0.0/8")],
            deny: vec![net("10.9.0.0/16")],
        };
        assert!(a.permits("10.1.2.3".parse().unwrap()));
        assert!(!a.permits("10.9.2.3".parse().unwrap()));
        assert!(!a.permits("192.0.2.1".parse().unwrap()));
        assert!(a.permits("::ffff:10.1.2.3".parse().unwrap()));
        assert!(Access::default().permits("192.0.2.1".parse().unwrap()));
    }
}
