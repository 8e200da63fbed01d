//! Active health checks as pure conversations, and the up/down bookkeeping.
//!
//! A [`Probe`] is one check's conversation with one server, with no socket
//! and no clock: the caller connects, sends what [`Probe::start`] asks for,
//! feeds every byte read to [`Probe::on_bytes`] and sends whatever that
//! answers, until a [`Step::Done`] carries the [`Verdict`]. [`ProbeConn`]
//! is that caller for a mio worker (non-blocking, deadline from `now`), and
//! [`probe_blocking`] wraps it for the CLI and the tests. [`HealthState`]
//! turns a stream of verdicts and passive connect outcomes into up/down
//! transitions (rise/fall, capped exponential retry backoff).
//!
//! docs/PROTOCOLS.md says what each kind sends and what counts as up.

mod conn;
mod http;
pub mod lag;
mod mysql;
#[cfg(feature = "postgres-checks")]
mod postgres;
#[cfg(not(feature = "postgres-checks"))]
#[path = "postgres_unbuilt.rs"]
mod postgres;
mod redis;
mod state;

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

pub use conn::{probe_blocking, ProbeConn};
pub use http::path_role;
#[cfg(feature = "postgres-checks")]
pub use postgres::QUERY as POSTGRES_ROLE_QUERY;

/// Why this build cannot run a postgres check (feature `postgres-checks`).
#[cfg(not(feature = "postgres-checks"))]
pub(crate) fn postgres_unbuilt() -> &'static str {
    postgres::UNBUILT
}
pub use state::{Carried, HealthParams, HealthState, Reported, Transition};

/// Replies longer than this end the probe: a health check never needs
/// more, and a hostile or confused server must not make us buffer forever.
pub const MAX_REPLY: usize = 64 * 1024;

/// Which conversation a check has with the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kind {
    /// The connect succeeding is enough.
    Tcp,
    Redis,
    Postgres,
    Mysql,
    /// `GET path` on a side port (Patroni's REST API).
    Http,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Tcp => "tcp",
            Kind::Redis => "redis",
            Kind::Postgres => "postgres",
            Kind::Mysql => "mysql",
            Kind::Http => "http",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Kind {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Ok(match s {
            "tcp" => Kind::Tcp,
            "redis" => Kind::Redis,
            "postgres" => Kind::Postgres,
            "mysql" => Kind::Mysql,
            "http" => Kind::Http,
            _ => return Err(NameError::Kind(s.to_string())),
        })
    }
}

/// Why a text is no check [`Kind`] or [`WantRole`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NameError {
    /// The text names no check kind.
    Kind(String),
    /// The text names no role.
    Role(String),
}

impl fmt::Display for NameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NameError::Kind(s) => write!(
                f,
                "unknown check kind {s:?} (want tcp, redis, postgres, mysql or http)"
            ),
            NameError::Role(s) => write!(f, "unknown role {s:?} (want any, primary or replica)"),
        }
    }
}

impl std::error::Error for NameError {}

/// The role a server reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Role {
    Primary,
    Replica,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
        })
    }
}

/// The role a check wants; a server in another role is down.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum WantRole {
    #[default]
    Any,
    Primary,
    Replica,
}

impl FromStr for WantRole {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        Ok(match s {
            "any" => WantRole::Any,
            "primary" => WantRole::Primary,
            "replica" => WantRole::Replica,
            _ => return Err(NameError::Role(s.to_string())),
        })
    }
}

impl WantRole {
    fn wanted(self) -> Option<Role> {
        match self {
            WantRole::Any => None,
            WantRole::Primary => Some(Role::Primary),
            WantRole::Replica => Some(Role::Replica),
        }
    }
}

/// What to check: the parsed form of one `health = { ... }` table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckSpec {
    pub kind: Kind,
    pub role: WantRole,
    /// Postgres: the login role (default `postgres`). Redis: the ACL user
    /// for `AUTH` (optional).
    pub user: Option<String>,
    pub password: Option<String>,
    /// Postgres: the database (default `postgres`).
    pub database: Option<String>,
    /// Http: the request path (default `/`).
    pub http_path: String,
    /// Http: the side port; the server's own port when unset.
    pub http_port: Option<u16>,
    /// Ask the server's role even when `role` is `Any`, and report it
    /// without judging it (the pools that share the server judge).
    pub ask_role: bool,
}

impl CheckSpec {
    pub fn new(kind: Kind) -> Self {
        CheckSpec {
            kind,
            role: WantRole::Any,
            user: None,
            password: None,
            database: None,
            http_path: "/".to_string(),
            http_port: None,
            ask_role: false,
        }
    }

    /// Whether the probe asks the server's role.
    pub(crate) fn asks_role(&self) -> bool {
        self.ask_role || self.role != WantRole::Any
    }

    /// Refuses combinations that cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), CheckSpecError> {
        let role_kinds = matches!(self.kind, Kind::Redis | Kind::Postgres);
        if self.role != WantRole::Any && !role_kinds {
            return Err(CheckSpecError::Role(self.kind));
        }
        if self.password.is_some() && !role_kinds {
            return Err(CheckSpecError::Password(self.kind));
        }
        if self.kind == Kind::Http {
            let p = &self.http_path;
            if !p.starts_with('/') || p.bytes().any(|b| b <= b' ' || b == 0x7f) {
                return Err(CheckSpecError::Path(p.clone()));
            }
        } else if self.http_port.is_some() {
            return Err(CheckSpecError::Port(self.kind));
        }
        for (key, v) in [("user", &self.user), ("database", &self.database)] {
            if v.as_deref()
                .is_some_and(|s| s.is_empty() || s.contains('\0'))
            {
                return Err(CheckSpecError::Name(key));
            }
        }
        if self.password.as_deref().is_some_and(|s| s.contains('\0')) {
            return Err(CheckSpecError::PasswordNul);
        }
        Ok(())
    }

    /// The address the probe connects to for `server`.
    pub fn target(&self, server: SocketAddr) -> SocketAddr {
        // `http_port` is the pool's `port` (http only) or a server's own
        // `check-port` (any check, as HAProxy's `check port`).
        match self.http_port {
            Some(port) => SocketAddr::new(server.ip(), port),
            None => server,
        }
    }
}

/// A health check setting that cannot work, and which.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CheckSpecError {
    /// `health.role` on a check that cannot ask a role.
    Role(Kind),
    /// `health.password` on a check that logs in to nothing.
    Password(Kind),
    /// A `health.path` that is no HTTP path.
    Path(String),
    /// `health.port` on a check other than http.
    Port(Kind),
    /// `health.user` or `health.database` empty or holding a NUL.
    Name(&'static str),
    /// `health.password` holding a NUL.
    PasswordNul,
}

impl fmt::Display for CheckSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CheckSpecError::Role(kind) => write!(
                f,
                "health.role applies to redis and postgres checks only, not {kind}{}",
                if *kind == Kind::Http {
                    " (choose health.path instead, e.g. /primary)"
                } else {
                    ""
                }
            ),
            CheckSpecError::Password(kind) => write!(
                f,
                "health.password applies to redis and postgres checks only, not {kind}"
            ),
            CheckSpecError::Path(p) => write!(
                f,
                "health.path {p:?} must start with '/' and hold no spaces or control characters"
            ),
            CheckSpecError::Port(kind) => {
                write!(f, "health.port applies to http checks only, not {kind}")
            }
            CheckSpecError::Name(key) => {
                write!(f, "health.{key} must be non-empty and hold no NUL")
            }
            CheckSpecError::PasswordNul => f.write_str("health.password must hold no NUL"),
        }
    }
}

impl std::error::Error for CheckSpecError {}

/// The outcome of one probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The server answered; `role` is what it reported, when the check
    /// asked for it.
    Up { role: Option<Role> },
    /// The server answered that it is not in `role` (an HTTP agent's 503
    /// on a role path such as Patroni's `/primary`).
    NotRole { role: Role },
    /// No answer: refused, reset, timed out, or a reply that is no answer.
    Down { reason: String },
    /// The check itself is broken (its login was refused, its database
    /// does not exist, the agent wants credentials): says nothing about
    /// the server, whose last confirmed state stands.
    CheckError { reason: String },
}

impl Verdict {
    /// A down verdict; the reason is made one printable line of at most
    /// [`MAX_REASON`] characters, whatever server text it quotes.
    pub fn down(reason: impl Into<String>) -> Self {
        Verdict::Down {
            reason: one_line(&reason.into(), MAX_REASON),
        }
    }

    /// A check error; the reason is bounded as for [`Verdict::down`].
    pub fn check_error(reason: impl Into<String>) -> Self {
        Verdict::CheckError {
            reason: one_line(&reason.into(), MAX_REASON),
        }
    }

    pub fn is_up(&self) -> bool {
        matches!(self, Verdict::Up { .. })
    }

    /// The server answered (whatever role it reported).
    pub fn answered(&self) -> bool {
        matches!(self, Verdict::Up { .. } | Verdict::NotRole { .. })
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Up { role: Some(r) } => write!(f, "up ({r})"),
            Verdict::Up { role: None } => f.write_str("up"),
            Verdict::NotRole { role } => write!(f, "answered: not {role}"),
            Verdict::Down { reason } => write!(f, "down: {reason}"),
            Verdict::CheckError { reason } => write!(f, "check error: {reason}"),
        }
    }
}

/// Up with the reported role, or down when it is not the wanted one.
fn judge(want: WantRole, got: Role) -> Verdict {
    match want.wanted() {
        Some(w) if w != got => Verdict::down(format!("role is {got}, want {w}")),
        _ => Verdict::Up { role: Some(got) },
    }
}

/// What the caller does next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Send these bytes, then keep reading.
    Send(Vec<u8>),
    /// Keep reading.
    NeedMore,
    /// The probe is over; close the connection (after [`Probe::goodbye`]).
    Done(Verdict),
}

enum Talk {
    Tcp,
    Redis(redis::Redis),
    Postgres(postgres::Postgres),
    Mysql(mysql::Mysql),
    Http(http::Http),
}

/// One check's conversation with one server.
pub struct Probe {
    talk: Talk,
    done: Option<Verdict>,
}

impl Probe {
    /// `target` is the address connected to (it names the HTTP `Host`).
    pub fn new(spec: &CheckSpec, target: SocketAddr) -> Self {
        let talk = match spec.kind {
            Kind::Tcp => Talk::Tcp,
            Kind::Redis => Talk::Redis(redis::Redis::new(spec)),
            Kind::Postgres => Talk::Postgres(postgres::Postgres::new(spec)),
            Kind::Mysql => Talk::Mysql(mysql::Mysql::default()),
            Kind::Http => Talk::Http(http::Http::new(spec, target)),
        };
        Probe { talk, done: None }
    }

    /// Call once the connect succeeded: what to send first (or, for `tcp`,
    /// the verdict).
    pub fn start(&mut self) -> Step {
        let step = match &mut self.talk {
            Talk::Tcp => Step::Done(Verdict::Up { role: None }),
            Talk::Redis(t) => t.start(),
            Talk::Postgres(t) => t.start(),
            Talk::Mysql(_) => Step::NeedMore,
            Talk::Http(t) => t.start(),
        };
        self.record(step)
    }

    /// Bytes the server sent (any split).
    pub fn on_bytes(&mut self, data: &[u8]) -> Step {
        if let Some(v) = &self.done {
            return Step::Done(v.clone());
        }
        let step = match &mut self.talk {
            Talk::Tcp => Step::Done(Verdict::Up { role: None }),
            Talk::Redis(t) => t.on_bytes(data),
            Talk::Postgres(t) => t.on_bytes(data),
            Talk::Mysql(t) => t.on_bytes(data),
            Talk::Http(t) => t.on_bytes(data),
        };
        self.record(step)
    }

    /// The server closed its side before the probe was done.
    pub fn on_eof(&mut self) -> Verdict {
        if let Some(v) = &self.done {
            return v.clone();
        }
        let v = Verdict::down(format!(
            "{} server closed the connection while the probe was {}",
            self.kind_name(),
            self.phase()
        ));
        self.done = Some(v.clone());
        v
    }

    /// What the probe is waiting for, for timeout messages.
    pub fn phase(&self) -> &'static str {
        match &self.talk {
            Talk::Tcp => "connecting",
            Talk::Redis(t) => t.phase(),
            Talk::Postgres(t) => t.phase(),
            Talk::Mysql(_) => "waiting for the handshake",
            Talk::Http(_) => "waiting for the status line",
        }
    }

    /// Bytes to send, best effort, before closing after `Done`: a polite
    /// end of an established session, so the server logs no error.
    pub fn goodbye(&self) -> &'static [u8] {
        match &self.talk {
            Talk::Postgres(t) => t.goodbye(),
            _ => b"",
        }
    }

    pub fn verdict(&self) -> Option<&Verdict> {
        self.done.as_ref()
    }

    /// A PostgreSQL primary's timeline, when its answer gave one.
    pub fn timeline(&self) -> Option<u32> {
        match &self.talk {
            Talk::Postgres(t) => t.timeline(),
            _ => None,
        }
    }

    /// Where the server is in its replication stream, when its role
    /// answer said (PostgreSQL, Redis).
    pub fn position(&self) -> Option<lag::Position> {
        match &self.talk {
            Talk::Postgres(t) => t.position(),
            Talk::Redis(t) => t.position(),
            _ => None,
        }
    }

    fn kind_name(&self) -> &'static str {
        match &self.talk {
            Talk::Tcp => "tcp",
            Talk::Redis(_) => "redis",
            Talk::Postgres(_) => "postgres",
            Talk::Mysql(_) => "mysql",
            Talk::Http(_) => "http",
        }
    }

    fn record(&mut self, step: Step) -> Step {
        if let Step::Done(v) = &step {
            self.done = Some(v.clone());
        }
        step
    }
}

/// An input buffer that holds at most [`MAX_REPLY`] bytes. It takes only
/// what fits, so a reply that completes within the cap is judged the same
/// however the bytes were split.
#[derive(Default)]
struct Inbox {
    buf: Vec<u8>,
}

impl Inbox {
    /// Appends what fits; returns how many bytes were taken.
    fn push(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(MAX_REPLY - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        n
    }

    /// The verdict for a reply still incomplete: too long once full.
    fn incomplete(&self, kind: &str) -> Step {
        if self.buf.len() >= MAX_REPLY {
            Step::Done(Verdict::down(format!(
                "{kind} reply longer than {MAX_REPLY} bytes"
            )))
        } else {
            Step::NeedMore
        }
    }
}

/// The longest reason kept, in characters.
pub const MAX_REASON: usize = 400;

/// Server text in a reason: printable, one line, bounded.
fn quote(bytes: &[u8]) -> String {
    one_line(&String::from_utf8_lossy(bytes), 200)
}

fn one_line(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max)
        .collect();
    if s.chars().nth(max).is_some() {
        out.push('…');
    }
    out.trim().to_string()
}

#[cfg(test)]
mod tests;
