//! A listener's servers: membership (swapped whole when names resolve to
//! new addresses), each server's live relays, which of them are eligible,
//! and the pick that the connector asks for.
//!
//! Every worker picks from the same pool, so what they share is atomic or
//! behind a short lock: the member list is an `Arc` snapshot behind a
//! `RwLock`, rewritten by the resolver thread (new members) and by
//! [`Pool::refresh`] (new standings, after any health change).
//!
//! A server's health is not the pool's: it is the [`Upstream`] of the
//! process-wide [`Fleet`], shared with every other pool (of this or any
//! listener, before or after a reload) that names the same address probed
//! the same way. The pool only judges it for its wanted role
//! ([`super::eligible`]). Its counters are the listener's, shared by the
//! listener's pools before and after a reload, so least-conn and the
//! gauges count relays accepted before a reload too.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use super::balance::{self, Candidate};
use super::eligible::{self, Rules, Standing, State, Want, Why};
use super::fleet::{Fleet, Probing, Upstream};
use crate::config::{self, Balance, OnDown, PoolConfig, SendProxy};
use crate::health::lag::{Lag, Measured};
use crate::health::{CheckSpec, HealthParams, Kind, Reported, Role, WantRole};
use crate::shm::ServerRegistry;

mod server;
pub(crate) use server::{Lease, Server, ServerSample};

/// The longest wait before a down server is tried again.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// A member to be: an address with its entry's weight and role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Member {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    pub(crate) backup: bool,
    pub(crate) check_port: Option<u16>,
}

/// The servers at one moment, and how the pool judges each.
#[derive(Debug, Default)]
pub(crate) struct Members {
    pub(crate) servers: Vec<Arc<Server>>,
    /// Weighted round-robin order over `servers` (indices).
    schedule: Vec<usize>,
    /// Per server, in the same order.
    standings: Vec<Standing>,
}

impl Members {
    /// The addresses of the servers that take new relays.
    fn eligible(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.servers
            .iter()
            .zip(&self.standings)
            .filter(|(_, st)| st.eligible)
            .map(|(s, _)| s.addr)
    }

    /// The state `server` was judged in, if it is a member.
    fn state_of(&self, server: &Arc<Server>) -> Option<State> {
        let i = self.servers.iter().position(|s| Arc::ptr_eq(s, server))?;
        self.standings.get(i).map(|st| st.state)
    }
}

/// The servers of one listener.
#[derive(Debug)]
pub(crate) struct Pool {
    /// The listener's name, for log lines.
    listener: String,
    /// A named pool's name (`[[pool]]`); `None` for a listener's own.
    name: Option<String>,
    /// The PROXY header its servers expect.
    pub(crate) send_proxy: SendProxy,
    /// How long a client no server takes is held for one.
    pub(crate) queue_timeout: Option<Duration>,
    balance: Balance,
    retries: Option<usize>,
    params: HealthParams,
    /// The active check, if any.
    check: Option<Probing>,
    want: Want,
    /// `max-lag`, in bytes.
    max_lag: Option<u64>,
    pub(crate) on_down: OnDown,
    members: RwLock<Arc<Members>>,
    /// Serialises the writers of `members`.
    writing: Mutex<()>,
    /// A reload gave its listener a new pool: this one only serves the
    /// relays it has, and no longer shows its servers' state.
    superseded: std::sync::atomic::AtomicBool,
    /// Round-robin position, shared by all workers.
    cursor: AtomicUsize,
    /// Where the listener's servers count.
    registry: Arc<ServerRegistry>,
    fleet: Arc<Fleet>,
}

impl Pool {
    pub(crate) fn new(
        listener: &str,
        name: Option<&str>,
        config: &PoolConfig,
        registry: Arc<ServerRegistry>,
        fleet: &Arc<Fleet>,
    ) -> Arc<Pool> {
        let h = &config.health;
        let check = check_spec(h).map(|spec| Probing {
            spec,
            interval: h.interval,
            timeout: h.timeout,
        });
        let want = match (h.role, &check) {
            (_, None) => Want::Any,
            (config::Role::Primary, _) => Want::Primary,
            (config::Role::Replica, _) => Want::Replica,
            (config::Role::PreferReplica, _) => Want::PreferReplica,
            (config::Role::Any, Some(c)) if c.spec.kind == Kind::Http => {
                match crate::health::path_role(&c.spec.http_path) {
                    Some(Role::Primary) => Want::Primary,
                    Some(Role::Replica) => Want::Replica,
                    None => Want::Any,
                }
            }
            (config::Role::Any, _) => Want::Any,
        };
        let pool = Arc::new(Pool {
            listener: listener.to_string(),
            name: name.map(str::to_string),
            send_proxy: config.send_proxy,
            queue_timeout: config.queue_timeout,
            balance: config.balance,
            retries: config.retries,
            params: HealthParams {
                rise: h.rise,
                fall: h.fall,
                backoff_base: h.interval,
                backoff_max: BACKOFF_MAX.max(h.interval),
            },
            check,
            want,
            max_lag: h.max_lag,
            on_down: config.on_down,
            members: RwLock::new(Arc::default()),
            writing: Mutex::new(()),
            superseded: std::sync::atomic::AtomicBool::new(false),
            cursor: AtomicUsize::new(0),
            registry,
            fleet: Arc::clone(fleet),
        });
        fleet.add_pool(&pool);
        pool
    }

    /// A named pool's name; `None` for a listener's own.
    pub(crate) fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The role a server must have to take relays from this pool.
    pub(crate) fn want(&self) -> Want {
        self.want
    }

    pub(crate) fn members(&self) -> Arc<Members> {
        Arc::clone(&self.members.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Makes `members` the pool's; tells the fleet when it has an
    /// eligible server it had not (clients held for one connect now).
    fn write(&self, members: Members) {
        let gained = {
            let mut current = self.members.write().unwrap_or_else(|p| p.into_inner());
            let gained = members
                .eligible()
                .any(|a| !current.eligible().any(|b| b == a));
            *current = Arc::new(members);
            gained
        };
        if gained {
            self.fleet.gained();
        }
    }

    /// Whether its servers are actively checked (else a down server comes
    /// back only through a trial connect).
    pub(crate) fn is_checked(&self) -> bool {
        self.check.is_some()
    }

    /// How a member is probed: the pool's check, at its own check port.
    fn probing(&self, m: &Member) -> Option<Probing> {
        let mut p = self.check.clone()?;
        if let Some(port) = m.check_port {
            p.spec.http_port = Some(port);
        }
        p.spec.ask_role = self.want != Want::Any;
        Some(p)
    }

    /// Makes `wanted` the pool. A server that stays keeps its live count
    /// and health; relays of a removed one run on (drain). Returns the
    /// addresses added and removed.
    pub(crate) fn set_members(
        &self,
        mut wanted: Vec<Member>,
    ) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        wanted.sort();
        wanted.dedup_by_key(|m| m.addr);
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.members();
        let same = |s: &Server, m: &Member| {
            s.addr == m.addr
                && s.weight == m.weight
                && s.backup == m.backup
                && s.check_port == m.check_port
        };
        let servers: Vec<Arc<Server>> = wanted
            .iter()
            .map(|m| match old.servers.iter().find(|s| same(s, m)) {
                Some(s) => Arc::clone(s),
                None => Arc::new(Server {
                    addr: m.addr,
                    weight: m.weight,
                    backup: m.backup,
                    check_port: m.check_port,
                    key: balance::hash_addr(m.addr),
                    upstream: self
                        .fleet
                        .upstream(m.addr, self.probing(m).as_ref(), self.params),
                    counters: self.registry.counters(m.addr, m.backup),
                }),
            })
            .collect();
        let added = wanted
            .iter()
            .filter(|m| !old.servers.iter().any(|s| s.addr == m.addr))
            .map(|m| m.addr)
            .collect();
        let removed = old
            .servers
            .iter()
            .filter(|s| !wanted.iter().any(|m| m.addr == s.addr))
            .map(|s| s.addr)
            .collect();
        let weights: Vec<u32> = servers.iter().map(|s| s.weight).collect();
        let standings = self.judge(&servers, &old);
        self.publish(&servers, &standings);
        self.write(Members {
            schedule: balance::wrr_schedule(&weights),
            servers,
            standings,
        });
        (added, removed)
    }

    /// The standings of `servers`, `old` being the members judged last.
    fn judge(&self, servers: &[Arc<Server>], old: &Members) -> Vec<Standing> {
        let facts: Vec<_> = servers.iter().map(|s| s.upstream.facts()).collect();
        let was_lagging: Vec<bool> = servers
            .iter()
            .map(|s| old.state_of(s) == Some(State::Lagging))
            .collect();
        let rules = Rules {
            want: self.want,
            max_lag: self.max_lag,
        };
        eligible::standings(rules, &facts, &was_lagging)
    }

    /// Judges every server again from its current health, logs the
    /// servers that a conflict of primaries excludes, and shows the
    /// standings in the stats file.
    pub(crate) fn refresh(&self) {
        if self.superseded.load(Ordering::Acquire) {
            return;
        }
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.members();
        let standings = self.judge(&old.servers, &old);
        let conflict = |st: &Standing| matches!(st.why, Why::SplitBrain | Why::StaleTimeline);
        let before: Vec<bool> = old.standings.iter().map(conflict).collect();
        let now: Vec<bool> = standings.iter().map(conflict).collect();
        if before != now && now.iter().any(|c| *c) {
            let names: Vec<String> = old
                .servers
                .iter()
                .zip(&standings)
                .filter(|(_, st)| conflict(st))
                .map(|(s, st)| format!("{} ({})", s.addr, st.why.text()))
                .collect();
            tracing::warn!(
                listener = %self.listener,
                pool = self.name.as_deref().map(tracing::field::display),
                "more than one server claims primary: no new relays go to {}",
                names.join(", ")
            );
        }
        let lagging = |st: &Standing| st.state == State::Lagging;
        let moved: Vec<String> = old
            .servers
            .iter()
            .zip(old.standings.iter().zip(&standings))
            .filter(|(_, (was, is))| lagging(was) != lagging(is))
            .map(|(s, (_, is))| {
                let into = if lagging(is) { "leaves" } else { "rejoins" };
                let lag = match s.upstream.lag() {
                    Some(Lag {
                        bytes,
                        measured: Measured::Primary,
                    }) => format!("{bytes} bytes behind the primary"),
                    Some(Lag {
                        bytes,
                        measured: Measured::Received,
                    }) => format!("{bytes} bytes received but not applied, no primary seen"),
                    None => "lag unknown".to_string(),
                };
                format!("{} {into} ({lag})", s.addr)
            })
            .collect();
        self.publish(&old.servers, &standings);
        self.write(Members {
            servers: old.servers.clone(),
            schedule: old.schedule.clone(),
            standings,
        });
        if !moved.is_empty() {
            tracing::warn!(
                listener = %self.listener,
                max_lag = self.max_lag.unwrap_or(0),
                "replication lag: {}",
                moved.join(", ")
            );
            // Written first, then announced: whoever wakes on the
            // generation sees the new standings.
            self.fleet.bump();
        }
    }

    /// Shows each server's standing, role and last check to readers of
    /// the stats file.
    fn publish(&self, servers: &[Arc<Server>], standings: &[Standing]) {
        for (s, st) in servers.iter().zip(standings) {
            let facts = s.upstream.facts();
            let excluded = if st.eligible { 0 } else { crate::shm::EXCLUDED };
            s.counters.show(
                st.state.code() | (st.why.code() << 8) | excluded,
                role_code(facts.reported),
                facts.last_check.map_or(0, unix_millis),
                facts.lag,
            );
        }
    }

    /// A reload put a new pool in its place (see `superseded`).
    pub(crate) fn supersede(&self) {
        self.superseded.store(true, Ordering::Release);
    }

    /// Whether `upstream` is one of its servers.
    pub(crate) fn names(&self, upstream: &Upstream) -> bool {
        self.members()
            .servers
            .iter()
            .any(|s| std::ptr::eq(Arc::as_ptr(&s.upstream), upstream))
    }

    /// The servers as the metrics show them.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn samples(&self) -> Vec<ServerSample> {
        let m = self.members();
        m.servers
            .iter()
            .zip(&m.standings)
            .map(|(s, st)| {
                let facts = s.upstream.facts();
                ServerSample {
                    addr: s.addr,
                    up: st.eligible,
                    state: st.state,
                    role: facts.reported.and_then(Reported::role),
                    live: s.live(),
                    backup: s.backup,
                    last_check: facts.last_check.map(system_time),
                    lag: facts.lag,
                }
            })
            .collect()
    }

    /// How many connect attempts a relay gets: one, plus `retries`
    /// (default: every other server once).
    pub(crate) fn attempts(&self) -> usize {
        let n = self.members().servers.len();
        1 + self.retries.unwrap_or(n.saturating_sub(1))
    }

    pub(crate) fn next_cursor(&self) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed)
    }

    /// The server for a relay's next attempt, leased to it: without an
    /// active check, a down server whose trial is due first (that is how
    /// it comes back), then the policy's choice among eligible servers not
    /// yet tried, primaries before backups. Backups are chosen only while
    /// no primary is eligible, or once every eligible primary failed this
    /// relay already.
    pub(crate) fn pick(
        &self,
        cursor: usize,
        client: IpAddr,
        tried: &[SocketAddr],
        now: Instant,
    ) -> Option<Lease> {
        let m = self.members();
        let untried = |i: usize| !tried.contains(&m.servers[i].addr);
        let ok = |i: usize| m.standings.get(i).is_some_and(|st| st.eligible);
        let n = m.servers.len();
        let primary_ok = (0..n).any(|i| !m.servers[i].backup && ok(i));
        if self.check.is_none() {
            for i in (0..n).filter(|&i| m.servers[i].is_down() && untried(i)) {
                let s = &m.servers[i];
                if (!s.backup || !primary_ok) && self.fleet.take_trial(&s.upstream, now) {
                    return Some(Lease::new(Arc::clone(s)));
                }
            }
        }
        for backup in [false, true] {
            if backup && (0..n).any(|i| !m.servers[i].backup && ok(i) && untried(i)) {
                break;
            }
            let eligible = |i: usize| m.servers[i].backup == backup && ok(i) && untried(i);
            if let Some(s) = self.choose(&m, cursor, client, &eligible) {
                return Some(Lease::new(s));
            }
        }
        None
    }

    fn choose(
        &self,
        m: &Members,
        cursor: usize,
        client: IpAddr,
        eligible: &dyn Fn(usize) -> bool,
    ) -> Option<Arc<Server>> {
        match self.balance {
            Balance::RoundRobin => {
                let len = m.schedule.len();
                (0..len)
                    .map(|k| m.schedule[(cursor + k) % len])
                    .find(|&i| eligible(i))
                    .map(|i| Arc::clone(&m.servers[i]))
            }
            Balance::LeastConn | Balance::SourceHash => {
                let set: Vec<usize> = (0..m.servers.len()).filter(|&i| eligible(i)).collect();
                let cands: Vec<Candidate> = set
                    .iter()
                    .map(|&i| Candidate {
                        weight: m.servers[i].weight,
                        live: m.servers[i].live(),
                        key: m.servers[i].key,
                    })
                    .collect();
                let at = match self.balance {
                    Balance::LeastConn => balance::least_conn(&cands, cursor),
                    _ => balance::rendezvous(&cands, balance::hash_ip(client)),
                };
                at.map(|k| Arc::clone(&m.servers[set[k]]))
            }
        }
    }

    /// A lease on the member at `addr`, for a relay that is connected to
    /// it already (one a live upgrade handed over); `None` if the pool no
    /// longer has it.
    #[cfg(feature = "service")]
    pub(crate) fn lease_of(&self, addr: SocketAddr) -> Option<Lease> {
        let m = self.members();
        let server = m.servers.iter().find(|s| s.addr == addr)?;
        Some(Lease::new(Arc::clone(server)))
    }

    /// A connect to `server` failed (refused, timed out, unreachable).
    pub(crate) fn failed(&self, server: &Server, reason: &str, now: Instant) {
        self.fleet.connect_failed(&server.upstream, reason, now);
    }

    /// A connect to `server` succeeded (see [`Fleet::connect_ok`]).
    pub(crate) fn succeeded(&self, server: &Server, now: Instant) {
        self.fleet.connect_ok(&server.upstream, now);
    }
}

/// A reported role in the stats file: 0 unknown, 1 primary, 2 replica.
fn role_code(r: Option<Reported>) -> u64 {
    match r.and_then(Reported::role) {
        None => 0,
        Some(Role::Primary) => 1,
        Some(Role::Replica) => 2,
    }
}

fn system_time(at: Instant) -> SystemTime {
    SystemTime::now() - Instant::now().saturating_duration_since(at)
}

fn unix_millis(at: Instant) -> u64 {
    system_time(at)
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The probe a pool's `health` table asks for, if any.
fn check_spec(h: &config::HealthConfig) -> Option<CheckSpec> {
    let kind = match h.check? {
        config::Check::Tcp => Kind::Tcp,
        config::Check::Redis => Kind::Redis,
        config::Check::Postgres => Kind::Postgres,
        config::Check::Mysql => Kind::Mysql,
        config::Check::Http => Kind::Http,
    };
    let mut spec = CheckSpec::new(kind);
    // The pools judge the role; the probe only reports it.
    spec.role = WantRole::Any;
    spec.user = h.user.clone();
    spec.password = h.password.as_ref().map(|p| p.0.clone());
    spec.database = h.database.clone();
    if let Some(path) = &h.path {
        spec.http_path = path.clone();
    }
    spec.http_port = h.port;
    Some(spec)
}

#[cfg(test)]
mod tests;
