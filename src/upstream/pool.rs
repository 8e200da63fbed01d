//! A listener's servers: membership (swapped whole when names resolve to
//! new addresses), each server's live relays and passive health, and the
//! pick that the connector asks for.
//!
//! Every worker picks from the same pool, so what they share is atomic or
//! behind a short lock: the member list is an `Arc` snapshot behind a
//! `RwLock` (written only by the resolver thread), each server's health a
//! small `Mutex` taken once per connect outcome.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use super::balance::{self, Candidate};
use crate::config::{Balance, PoolConfig};

/// The longest wait before a down server is tried again.
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Passive health of one server, a pure state machine: `fall` consecutive
/// failed connects mark it down; a down server is offered one trial
/// connect after a backoff that doubles with each failed trial.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct PassiveHealth {
    fails: u32,
    down: bool,
    backoff: Duration,
    retry_at: Option<Instant>,
}

/// A change of a server's state, for the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transition {
    Down { retry_in: Duration },
    Up,
}

impl PassiveHealth {
    pub(crate) fn new() -> PassiveHealth {
        PassiveHealth {
            fails: 0,
            down: false,
            backoff: Duration::ZERO,
            retry_at: None,
        }
    }

    pub(crate) fn is_down(&self) -> bool {
        self.down
    }

    pub(crate) fn failed(&mut self, now: Instant, fall: u32, base: Duration) -> Option<Transition> {
        self.fails = self.fails.saturating_add(1);
        if self.down {
            self.backoff = (self.backoff * 2).min(BACKOFF_MAX.max(base));
            self.retry_at = Some(now + self.backoff);
            return None;
        }
        if self.fails < fall {
            return None;
        }
        self.down = true;
        self.backoff = base;
        self.retry_at = Some(now + base);
        Some(Transition::Down { retry_in: base })
    }

    pub(crate) fn succeeded(&mut self) -> Option<Transition> {
        let was_down = self.down;
        *self = PassiveHealth::new();
        was_down.then_some(Transition::Up)
    }

    /// Takes the down server's trial if it is due: the next one is not
    /// due before another backoff, so one client at a time tries it.
    pub(crate) fn claim_trial(&mut self, now: Instant) -> bool {
        match self.retry_at {
            Some(at) if self.down && at <= now => {
                self.retry_at = Some(now + self.backoff);
                true
            }
            _ => false,
        }
    }
}

/// One address of a pool.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    pub(crate) backup: bool,
    key: u64,
    live: AtomicUsize,
    /// Mirrors `health.is_down()` for lock-free reads in `pick`.
    down: AtomicBool,
    health: Mutex<PassiveHealth>,
}

impl Server {
    fn new(addr: SocketAddr, weight: u32, backup: bool) -> Server {
        Server {
            addr,
            weight,
            backup,
            key: balance::hash_addr(addr),
            live: AtomicUsize::new(0),
            down: AtomicBool::new(false),
            health: Mutex::new(PassiveHealth::new()),
        }
    }

    fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    fn with_health<T>(&self, f: impl FnOnce(&mut PassiveHealth) -> T) -> T {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut h);
        self.down.store(h.is_down(), Ordering::Relaxed);
        out
    }

    pub(crate) fn live(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }
}

/// A relay's hold on a server: counts it among the server's live relays
/// (what least-conn compares) until dropped.
#[derive(Debug)]
pub(crate) struct Lease(pub(crate) Arc<Server>);

impl Lease {
    fn new(server: Arc<Server>) -> Lease {
        server.live.fetch_add(1, Ordering::Relaxed);
        Lease(server)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.live.fetch_sub(1, Ordering::Relaxed);
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
    fall: u32,
    /// The first wait before a down server is tried again.
    backoff: Duration,
    members: RwLock<Arc<Members>>,
    /// Round-robin position, shared by all workers.
    cursor: AtomicUsize,
}

impl Pool {
    pub(crate) fn new(listener: &str, config: &PoolConfig) -> Pool {
        Pool {
            listener: listener.to_string(),
            balance: config.balance,
            retries: config.retries,
            fall: config.health.fall,
            backoff: config.health.interval,
            members: RwLock::new(Arc::default()),
            cursor: AtomicUsize::new(0),
        }
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
                None => Arc::new(Server::new(m.addr, m.weight, m.backup)),
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
        for s in m.servers.iter().filter(|s| s.is_down() && untried(s)) {
            if (!s.backup || !primary_up) && s.with_health(|h| h.claim_trial(now)) {
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
    pub(crate) fn failed(&self, server: &Server, now: Instant) {
        let t = server.with_health(|h| h.failed(now, self.fall, self.backoff));
        if let Some(Transition::Down { retry_in }) = t {
            tracing::warn!(
                listener = %self.listener,
                upstream = %server.addr,
                fall = self.fall,
                "server marked down after {} failed connects; next try in {} ms",
                self.fall,
                retry_in.as_millis()
            );
        }
    }

    /// A connect to `server` succeeded.
    pub(crate) fn succeeded(&self, server: &Server) {
        if let Some(Transition::Up) = server.with_health(PassiveHealth::succeeded) {
            tracing::info!(listener = %self.listener, upstream = %server.addr, "server is up again");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: Duration = Duration::from_secs(1);

    // Tests for the Up state

    #[test]
    fn up_goes_down_after_fall_consecutive_failures() {
        let now = Instant::now();
        let mut h = PassiveHealth::new();
        assert_eq!(h.failed(now, 3, BASE), None);
        assert_eq!(h.failed(now, 3, BASE), None);
        assert_eq!(h.succeeded(), None, "a success resets the count");
        assert_eq!(h.failed(now, 3, BASE), None);
        assert_eq!(h.failed(now, 3, BASE), None);
        assert_eq!(
            h.failed(now, 3, BASE),
            Some(Transition::Down { retry_in: BASE })
        );
        assert!(h.is_down());
    }

    #[test]
    fn an_up_server_offers_no_trial() {
        let mut h = PassiveHealth::new();
        assert!(!h.claim_trial(Instant::now()));
    }

    // Tests for the Down state

    #[test]
    fn down_offers_one_trial_per_backoff_and_doubles_it_on_failure() {
        let t0 = Instant::now();
        let mut h = PassiveHealth::new();
        h.failed(t0, 1, BASE);
        assert!(!h.claim_trial(t0), "not before the backoff");
        assert!(h.claim_trial(t0 + BASE));
        assert!(!h.claim_trial(t0 + BASE), "one trial at a time");
        assert_eq!(h.failed(t0 + BASE, 1, BASE), None);
        assert!(!h.claim_trial(t0 + BASE * 2), "backoff doubled to 2 s");
        assert!(h.claim_trial(t0 + BASE * 3));
        for _ in 0..10 {
            h.failed(t0, 1, BASE);
        }
        assert_eq!(h.backoff, BACKOFF_MAX, "capped");
    }

    #[test]
    fn down_comes_up_on_a_successful_trial() {
        let t0 = Instant::now();
        let mut h = PassiveHealth::new();
        h.failed(t0, 1, BASE);
        assert_eq!(h.succeeded(), Some(Transition::Up));
        assert_eq!(h, PassiveHealth::new());
    }

    // The pick

    fn pool(balance: Balance, members: &[(u16, u32, bool)]) -> Pool {
        let mut config = PoolConfig::new(Vec::new());
        config.balance = balance;
        config.health.fall = 1;
        let p = Pool::new("test", &config);
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
        p.failed(&primary, now);
        assert_eq!(port(p.pick(0, CLIENT, &[], now)), 2);
        // ...until the primary's trial is due, which it gets, and passes.
        let trial = p.pick(0, CLIENT, &[], now + Duration::from_secs(3));
        assert_eq!(port(trial), 1);
        p.succeeded(&primary);
        assert_eq!(port(p.pick(0, CLIENT, &[], now)), 1);
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
