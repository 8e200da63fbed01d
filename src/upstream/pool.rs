//! A listener's servers: membership (swapped whole when names resolve to
//! new addresses), each server's live relays and passive health, and the
//! pick that the connector asks for.
//!
//! Every worker picks from the same pool, so what they share is atomic or
//! behind a short lock: the member list is an `Arc` snapshot behind a
//! `RwLock` (written only by the resolver thread), each server's health a
//! small `Mutex` taken once per connect outcome or probe verdict.
//!
//! A server has one [`HealthState`], fed by both passive outcomes (every
//! relay's connect) and, with `health.check`, active probe verdicts. With
//! an active check a down server comes back only through `rise` good
//! probes: a demoted primary still accepts connects, so a connect proves
//! nothing about its role. Each transition to down bumps the pool's
//! `downs` generation, which workers compare once per loop iteration to
//! find relays to reset (`on-down = "kill"`).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::balance::{self, Candidate};
use crate::config::{self, Balance, OnDown, PoolConfig};
use crate::health::{CheckSpec, HealthParams, HealthState, Kind, Transition, Verdict, WantRole};
use crate::shm::{ServerCounters, ServerRegistry};
use crate::stats::ServerBlock;

/// The longest wait before a down server is tried again.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// One address of a pool.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    pub(crate) backup: bool,
    key: u64,
    live: AtomicUsize,
    /// Mirrors `!health.is_up()` for lock-free reads in `pick` and by
    /// the workers looking for relays to reset.
    down: AtomicBool,
    /// An active probe judged it already.
    probed: AtomicBool,
    /// Mirrors the role the last check saw (0 unknown, 1 primary, 2
    /// replica), for lock-free reads by the metrics.
    role: std::sync::atomic::AtomicU8,
    health: Mutex<HealthState>,
    /// Its counters and state words in the stats file, shared with the
    /// entries for the same address in the listener's other pools (before
    /// and after a reload).
    counters: Arc<ServerCounters>,
}

/// One server as the metrics show it, read without a lock.
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
#[derive(Clone, Debug)]
pub(crate) struct ServerSample {
    pub(crate) addr: SocketAddr,
    pub(crate) up: bool,
    pub(crate) role: Option<crate::health::Role>,
    pub(crate) live: usize,
    pub(crate) backup: bool,
}

impl Server {
    fn new(
        addr: SocketAddr,
        weight: u32,
        backup: bool,
        params: HealthParams,
        counters: Arc<ServerCounters>,
    ) -> Server {
        // A new entry (a reload's new pool) starts up, no role seen yet.
        counters.show_state(true, 0);
        Server {
            counters,
            addr,
            weight,
            backup,
            key: balance::hash_addr(addr),
            live: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            probed: AtomicBool::new(false),
            role: std::sync::atomic::AtomicU8::new(0),
            health: Mutex::new(HealthState::new(params, Instant::now())),
        }
    }

    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    fn with_health<T>(&self, f: impl FnOnce(&mut HealthState) -> T) -> T {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut h);
        self.down.store(!h.is_up(), Ordering::Relaxed);
        let role = match h.role() {
            None => 0,
            Some(crate::health::Role::Primary) => 1,
            Some(crate::health::Role::Replica) => 2,
        };
        self.role.store(role, Ordering::Relaxed);
        self.counters.show_state(h.is_up(), role);
        out
    }

    /// The counter block worker `worker` writes for this server.
    pub(crate) fn block(&self, worker: usize) -> &crate::sys::shared::Placed<ServerBlock> {
        self.counters.block(worker)
    }

    pub(crate) fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn sample(&self) -> ServerSample {
        ServerSample {
            addr: self.addr,
            up: !self.is_down(),
            role: match self.role.load(Ordering::Relaxed) {
                1 => Some(crate::health::Role::Primary),
                2 => Some(crate::health::Role::Replica),
                _ => None,
            },
            live: self.live(),
            backup: self.backup,
        }
    }
}

/// A relay's hold on a server: counts it among the server's live relays
/// (what least-conn compares) until dropped.
#[derive(Debug)]
pub(crate) struct Lease(pub(crate) Arc<Server>);

impl Lease {
    fn new(server: Arc<Server>) -> Lease {
        server.live.fetch_add(1, Ordering::Relaxed);
        server.counters.head().live.fetch_add(1, Ordering::Relaxed);
        Lease(server)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
        self.0.counters.head().live.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A member to be: an address with its entry's weight and role.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Member {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    pub(crate) backup: bool,
}

/// The servers at one moment.
#[derive(Debug, Default)]
pub(crate) struct Members {
    pub(crate) servers: Vec<Arc<Server>>,
    /// Weighted round-robin order over `servers` (indices).
    schedule: Vec<usize>,
}

/// The servers of one listener.
#[derive(Debug)]
pub(crate) struct Pool {
    /// The listener's name, for log lines.
    listener: String,
    balance: Balance,
    retries: Option<usize>,
    params: HealthParams,
    /// The active check, if any.
    check: Option<ActiveCheck>,
    pub(crate) on_down: OnDown,
    /// Transitions to down so far: workers compare it with the value they
    /// last saw to know when to look for relays of a down server.
    downs: AtomicU64,
    members: RwLock<Arc<Members>>,
    /// Round-robin position, shared by all workers.
    cursor: AtomicUsize,
    /// Where the listener's servers count.
    registry: Arc<ServerRegistry>,
}

/// A pool's active check: what to ask, how often, within what time.
#[derive(Debug)]
pub(crate) struct ActiveCheck {
    pub(crate) spec: CheckSpec,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

impl Pool {
    pub(crate) fn new(listener: &str, config: &PoolConfig, registry: Arc<ServerRegistry>) -> Pool {
        let h = &config.health;
        Pool {
            listener: listener.to_string(),
            balance: config.balance,
            retries: config.retries,
            params: HealthParams {
                rise: h.rise,
                fall: h.fall,
                backoff_base: h.interval,
                backoff_max: BACKOFF_MAX.max(h.interval),
            },
            check: check_spec(h).map(|spec| ActiveCheck {
                spec,
                interval: h.interval,
                timeout: h.timeout,
            }),
            on_down: config.on_down,
            downs: AtomicU64::new(0),
            members: RwLock::new(Arc::default()),
            cursor: AtomicUsize::new(0),
            registry,
        }
    }

    /// The active check, if the pool has one.
    pub(crate) fn check(&self) -> Option<&ActiveCheck> {
        self.check.as_ref()
    }

    /// How many times a server of this pool went down so far.
    pub(crate) fn downs(&self) -> u64 {
        self.downs.load(Ordering::Acquire)
    }

    pub(crate) fn members(&self) -> Arc<Members> {
        Arc::clone(&self.members.read().unwrap_or_else(|p| p.into_inner()))
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
        let old = self.members();
        let same = |s: &Server, m: &Member| {
            s.addr == m.addr && s.weight == m.weight && s.backup == m.backup
        };
        let servers: Vec<Arc<Server>> = wanted
            .iter()
            .map(|m| match old.servers.iter().find(|s| same(s, m)) {
                Some(s) => Arc::clone(s),
                None => Arc::new(Server::new(
                    m.addr,
                    m.weight,
                    m.backup,
                    self.params,
                    self.registry.counters(m.addr, m.backup),
                )),
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
        let members = Members {
            schedule: balance::wrr_schedule(&weights),
            servers,
        };
        *self.members.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(members);
        (added, removed)
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

    /// The server for a relay's next attempt, leased to it: a down server
    /// whose trial is due first (that is how it comes back), then the
    /// policy's choice among up servers not yet tried, primaries before
    /// backups. Backups are chosen only while no primary is up, or once
    /// every up primary failed this relay already.
    pub(crate) fn pick(
        &self,
        cursor: usize,
        client: IpAddr,
        tried: &[SocketAddr],
        now: Instant,
    ) -> Option<Lease> {
        let m = self.members();
        let untried = |s: &Arc<Server>| !tried.contains(&s.addr);
        let primary_up = m.servers.iter().any(|s| !s.backup && !s.is_down());
        // With an active check, only probes bring a server back.
        let trials = self.check.is_none();
        for s in m
            .servers
            .iter()
            .filter(|s| trials && s.is_down() && untried(s))
        {
            if (!s.backup || !primary_up) && s.with_health(|h| h.take_trial(now)) {
                return Some(Lease::new(Arc::clone(s)));
            }
        }
        for backup in [false, true] {
            if backup
                && m.servers
                    .iter()
                    .any(|s| !s.backup && !s.is_down() && untried(s))
            {
                break;
            }
            let eligible = |s: &Arc<Server>| s.backup == backup && !s.is_down() && untried(s);
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
        eligible: &dyn Fn(&Arc<Server>) -> bool,
    ) -> Option<Arc<Server>> {
        match self.balance {
            Balance::RoundRobin => {
                let len = m.schedule.len();
                (0..len)
                    .map(|k| &m.servers[m.schedule[(cursor + k) % len]])
                    .find(|s| eligible(s))
                    .cloned()
            }
            Balance::LeastConn | Balance::SourceHash => {
                let set: Vec<&Arc<Server>> = m.servers.iter().filter(|s| eligible(s)).collect();
                let cands: Vec<Candidate> = set
                    .iter()
                    .map(|s| Candidate {
                        weight: s.weight,
                        live: s.live(),
                        key: s.key,
                    })
                    .collect();
                let at = match self.balance {
                    Balance::LeastConn => balance::least_conn(&cands, cursor),
                    _ => balance::rendezvous(&cands, balance::hash_ip(client)),
                };
                at.map(|i| Arc::clone(set[i]))
            }
        }
    }

    /// A connect to `server` failed (refused, timed out, unreachable).
    pub(crate) fn failed(&self, server: &Server, reason: &str, now: Instant) {
        let t = server.with_health(|h| h.connect_failed(reason, now));
        self.transition(server, t, "connect");
    }

    /// A connect to `server` succeeded. Without an active check that
    /// brings a down server back and resets the fall count. With one it
    /// changes nothing: a demoted primary still accepts connects, and
    /// they must not undo the probes' failures.
    pub(crate) fn succeeded(&self, server: &Server, now: Instant) {
        if self.check.is_some() {
            return;
        }
        let t = server.with_health(|h| h.connect_ok(now));
        self.transition(server, t, "connect");
    }

    /// An active probe's verdict on `server`. A server's first verdict
    /// counts `fall` times: a replica behind `role = "primary"` must not
    /// take writes for `interval × fall` after start.
    pub(crate) fn observe(&self, server: &Server, verdict: &Verdict, now: Instant) {
        let first = !server.probed.swap(true, Ordering::Relaxed);
        let repeat = if first { self.params.fall } else { 1 };
        let t =
            server.with_health(|h| (0..repeat).fold(None, |t, _| h.observe(verdict, now).or(t)));
        self.transition(server, t, "check");
    }

    /// Logs a change of state, and counts a down one for the workers.
    fn transition(&self, server: &Server, t: Option<Transition>, by: &str) {
        match t {
            None => {}
            Some(Transition::Down { reason }) => {
                self.downs.fetch_add(1, Ordering::AcqRel);
                let relays = match self.on_down {
                    OnDown::Drain => "its relays drain",
                    OnDown::Kill => "its relays are reset",
                };
                tracing::warn!(
                    listener = %self.listener,
                    upstream = %server.addr,
                    fall = self.params.fall,
                    live = server.live(),
                    "server marked down after {} failed {by}s ({relays}): {reason}",
                    self.params.fall,
                );
            }
            Some(Transition::Up { role }) => {
                let role = role.map(|r| format!(" as {r}")).unwrap_or_default();
                tracing::warn!(
                    listener = %self.listener,
                    upstream = %server.addr,
                    "server is up again{role} (after a good {by})"
                );
            }
        }
    }
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
    spec.role = match h.role {
        config::Role::Any => WantRole::Any,
        config::Role::Primary => WantRole::Primary,
        config::Role::Replica => WantRole::Replica,
    };
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
mod tests {
    use super::*;

    // The pick

    fn pool(balance: Balance, members: &[(u16, u32, bool)]) -> Pool {
        let mut config = PoolConfig::new(Vec::new());
        config.balance = balance;
        config.health.fall = 1;
        let p = Pool::new("test", &config, Arc::new(ServerRegistry::new(None, 1)));
        p.set_members(
            members
                .iter()
                .map(|&(port, weight, backup)| Member {
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    weight,
                    backup,
                })
                .collect(),
        );
        p
    }

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 1));

    fn port(l: Option<Lease>) -> u16 {
        l.expect("a server").0.addr.port()
    }

    #[test]
    fn backups_serve_only_when_no_primary_can() {
        let p = pool(Balance::RoundRobin, &[(1, 1, false), (2, 1, true)]);
        let now = Instant::now();
        assert_eq!(port(p.pick(0, CLIENT, &[], now)), 1);
        // The primary failed this relay: its retry goes to the backup.
        let one = [SocketAddr::from(([127, 0, 0, 1], 1))];
        assert_eq!(port(p.pick(0, CLIENT, &one, now)), 2);
        // The primary is down: the backup takes every relay...
        let primary = Arc::clone(&p.members().servers[0]);
        p.failed(&primary, "refused", now);
        assert_eq!(port(p.pick(0, CLIENT, &[], now)), 2);
        // ...until the primary's trial is due, which it gets, and passes.
        let trial = p.pick(0, CLIENT, &[], now + Duration::from_secs(3));
        assert_eq!(port(trial), 1);
        p.succeeded(&primary, now);
        assert_eq!(port(p.pick(0, CLIENT, &[], now)), 1);
    }

    // Passive and active health share one state per server

    fn checked_pool(rise: u32) -> Pool {
        let mut config = PoolConfig::new(Vec::new());
        config.health.fall = 1;
        config.health.rise = rise;
        config.health.check = Some(config::Check::Redis);
        let p = Pool::new("test", &config, Arc::new(ServerRegistry::new(None, 1)));
        p.set_members(
            [1, 2]
                .iter()
                .map(|&port| Member {
                    addr: SocketAddr::from(([127, 0, 0, 1], port)),
                    weight: 1,
                    backup: false,
                })
                .collect(),
        );
        p
    }

    #[test]
    fn a_down_verdict_counts_a_down_and_takes_the_server_out_of_the_pick() {
        let p = checked_pool(2);
        let now = Instant::now();
        let first = Arc::clone(&p.members().servers[0]);
        assert_eq!(p.downs(), 0);
        p.observe(&first, &Verdict::down("role is replica, want primary"), now);
        assert_eq!(p.downs(), 1);
        assert!(first.is_down());
        for later in [0, 5, 60] {
            let at = now + Duration::from_secs(later);
            assert_eq!(port(p.pick(0, CLIENT, &[], at)), 2, "no trial at +{later}s");
        }
    }

    #[test]
    fn a_first_bad_verdict_takes_a_server_down_at_once() {
        let mut config = PoolConfig::new(Vec::new());
        config.health.fall = 3;
        config.health.check = Some(config::Check::Postgres);
        let p = Pool::new("test", &config, Arc::new(ServerRegistry::new(None, 1)));
        p.set_members(vec![Member {
            addr: SocketAddr::from(([127, 0, 0, 1], 1)),
            weight: 1,
            backup: false,
        }]);
        let s = Arc::clone(&p.members().servers[0]);
        let now = Instant::now();
        p.observe(&s, &Verdict::down("role is replica, want primary"), now);
        assert!(s.is_down(), "no fall count for the first verdict");
        p.observe(&s, &Verdict::Up { role: None }, now);
        p.observe(&s, &Verdict::Up { role: None }, now);
        p.observe(&s, &Verdict::down("again"), now);
        assert!(!s.is_down(), "later verdicts count once");
    }

    #[test]
    fn with_an_active_check_only_rise_good_probes_bring_a_server_back() {
        let p = checked_pool(2);
        let now = Instant::now();
        let first = Arc::clone(&p.members().servers[0]);
        p.observe(&first, &Verdict::Up { role: None }, now);
        p.failed(&first, "refused", now);
        assert!(first.is_down(), "a passive failure counts towards fall");
        p.succeeded(&first, now);
        assert!(first.is_down(), "a connect proves no role");
        p.observe(&first, &Verdict::Up { role: None }, now);
        assert!(first.is_down(), "one of rise = 2");
        p.observe(&first, &Verdict::Up { role: None }, now);
        assert!(!first.is_down());
        assert_eq!(p.downs(), 1, "coming up is no down");
    }

    #[test]
    fn membership_changes_keep_state_of_servers_that_stay() {
        let p = pool(Balance::LeastConn, &[(1, 1, false), (2, 1, false)]);
        let lease = p.pick(0, CLIENT, &[], Instant::now()).unwrap();
        let held = lease.0.addr;
        let (added, removed) = p.set_members(vec![
            Member {
                addr: held,
                weight: 1,
                backup: false,
            },
            Member {
                addr: SocketAddr::from(([127, 0, 0, 1], 3)),
                weight: 1,
                backup: false,
            },
        ]);
        assert_eq!(added.len(), 1);
        assert_eq!(removed.len(), 1);
        let m = p.members();
        let kept = m.servers.iter().find(|s| s.addr == held).unwrap();
        assert_eq!(kept.live(), 1, "the lease still counts");
        drop(lease);
        assert_eq!(kept.live(), 0);
        assert_eq!(p.attempts(), 2);
    }
}
