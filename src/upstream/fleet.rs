//! Every server the process knows, with one health state each, shared by
//! every pool that names it, before and after a reload.
//!
//! A server is one address probed one way: pools (of any listener, old or
//! new) that name the same address with the same check (kind, probe
//! target, HTTP path, login user and database) share one [`Upstream`]:
//! one probe per interval, one rise/fall count, one reported role. The
//! password, interval, timeout, rise and fall are the latest config's, so
//! rotating a monitor password or tuning a timeout keeps the health that
//! was learnt. A pool new to a server therefore sees its live state at
//! once, and relays accepted before a reload stay attached to the same
//! state as those accepted after it.
//!
//! Every change that can exclude a server (down, a new role answer, a check
//! error) moves the fleet's `changes` generation and makes every pool
//! re-evaluate which of its servers are eligible (`Pool::refresh`); a pool
//! whose replica starts or stops lagging moves it too.
//!
//! A pool that gains an eligible server (a health transition, new members
//! from a reload or a DNS change, a replica that stops lagging) moves the
//! `gains` generation instead and rings the [`Doorbell`] of every worker
//! that holds clients, so a worker blocked in epoll connects them at once
//! rather than at its next timeout.
//!
//! Replication lag is measured here, across pools: each role answer's
//! position is kept with the time of its probe, and every replica's lag is
//! measured again after each probe against the servers whose last answer
//! confirmed them primary, whichever pool names them (see
//! [`crate::health::lag`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use super::pool::Pool;
use crate::health::lag::{self, Lag, Position, Samples};
use crate::health::{
    Carried, CheckSpec, HealthParams, HealthState, Kind, Reported, Role, Transition, Verdict,
};

/// What makes two pools' servers one: the address and how it is probed.
/// A live upgrade names servers by it too.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ServerKey {
    pub(crate) addr: SocketAddr,
    pub(crate) check: Option<CheckKey>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct CheckKey {
    pub(crate) kind: Kind,
    pub(crate) target: SocketAddr,
    pub(crate) path: String,
    pub(crate) user: Option<String>,
    pub(crate) database: Option<String>,
}

/// One server's health as a live upgrade carries it to the new process:
/// which server, and what the old process last knew of it.
#[cfg(feature = "service")]
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServerHealth {
    pub(crate) key: ServerKey,
    pub(crate) health: Carried,
}

impl ServerKey {
    pub(crate) fn new(addr: SocketAddr, spec: Option<&CheckSpec>) -> ServerKey {
        ServerKey {
            addr,
            check: spec.map(|s| CheckKey {
                kind: s.kind,
                target: s.target(addr),
                path: s.http_path.clone(),
                user: s.user.clone(),
                database: s.database.clone(),
            }),
        }
    }
}

/// How a server is probed now: the latest config's settings.
#[derive(Clone, Debug)]
pub(crate) struct Probing {
    pub(crate) spec: CheckSpec,
    pub(crate) interval: Duration,
    pub(crate) timeout: Duration,
}

/// One server: its address, how it is probed, and its health.
#[derive(Debug)]
pub(crate) struct Upstream {
    /// Unique in the process: spreads probes over the workers.
    pub(crate) id: u64,
    pub(crate) addr: SocketAddr,
    probing: Mutex<Option<Probing>>,
    health: Mutex<HealthState>,
    /// Mirrors `!health.is_up()` for lock-free reads.
    down: AtomicBool,
    replication: Mutex<Replication>,
}

/// A server's recent replication positions, and its lag while it is a
/// replica.
#[derive(Debug, Default)]
struct Replication {
    samples: Samples,
    lag: Option<Lag>,
}

/// A server's health at one moment, as the pools judge it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Facts {
    pub(crate) up: bool,
    pub(crate) reported: Option<Reported>,
    pub(crate) answered: bool,
    pub(crate) check_error: bool,
    pub(crate) timeline: Option<u32>,
    pub(crate) last_check: Option<Instant>,
    /// A replica's replication lag in bytes, when measured.
    pub(crate) lag: Option<u64>,
}

impl Upstream {
    pub(crate) fn is_down(&self) -> bool {
        self.down.load(Ordering::Relaxed)
    }

    fn with_health<T>(&self, f: impl FnOnce(&mut HealthState) -> T) -> T {
        let mut h = self.health.lock().unwrap_or_else(|p| p.into_inner());
        let out = f(&mut h);
        self.down.store(!h.is_up(), Ordering::Relaxed);
        out
    }

    pub(crate) fn facts(&self) -> Facts {
        let lag = self.replication().lag.map(|l| l.bytes);
        self.with_health(|h| Facts {
            up: h.is_up(),
            reported: h.reported(),
            answered: h.answered(),
            check_error: h.check_error().is_some(),
            timeline: h.timeline(),
            last_check: h.last_check(),
            lag,
        })
    }

    fn replication(&self) -> std::sync::MutexGuard<'_, Replication> {
        self.replication.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A replica's measured lag, and how it was measured.
    pub(crate) fn lag(&self) -> Option<Lag> {
        self.replication().lag
    }

    /// How often it is probed (none: passive health only).
    fn interval(&self) -> Option<Duration> {
        let probing = self.probing.lock().unwrap_or_else(|p| p.into_inner());
        probing.as_ref().map(|p| p.interval)
    }

    /// How it is probed, if it is.
    pub(crate) fn probing(&self) -> Option<Probing> {
        self.probing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The role the last answer reported.
    pub(crate) fn reported(&self) -> Option<Reported> {
        self.with_health(|h| h.reported())
    }
}

/// The process's servers and pools.
#[derive(Debug, Default)]
pub(crate) struct Fleet {
    servers: Mutex<HashMap<ServerKey, Weak<Upstream>>>,
    pools: Mutex<Vec<Weak<Pool>>>,
    /// Moves at every change that can exclude a server: workers compare it
    /// once per loop iteration to find relays to reset (`on-down`).
    changes: AtomicU64,
    /// Moves whenever a pool gains an eligible server: workers that hold
    /// clients compare it once per loop iteration.
    gains: AtomicU64,
    doorbells: Mutex<Vec<Weak<Doorbell>>>,
    next_id: AtomicU64,
    /// A live upgrade's new process: the old process's health of its
    /// servers, taken by each server as it joins the fleet at the start.
    seeds: Mutex<HashMap<ServerKey, Carried>>,
}

/// How the fleet wakes one worker: its mio waker, rung only while the
/// worker holds clients.
#[derive(Debug)]
pub(crate) struct Doorbell {
    waker: Arc<mio::Waker>,
    /// Clients the worker holds now.
    held: AtomicUsize,
}

impl Doorbell {
    pub(crate) fn new(waker: Arc<mio::Waker>) -> Arc<Doorbell> {
        Arc::new(Doorbell {
            waker,
            held: AtomicUsize::new(0),
        })
    }

    /// The worker holds one client more. Sequentially consistent with the
    /// fleet's `gains`: either the worker's next look at `gains` sees a
    /// gain, or the gain sees this client and rings.
    pub(crate) fn hold(&self) {
        self.held.fetch_add(1, Ordering::SeqCst);
    }

    /// The worker holds one client fewer.
    pub(crate) fn release(&self) {
        self.held.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Fleet {
    pub(crate) fn new() -> Arc<Fleet> {
        Arc::new(Fleet::default())
    }

    /// The server at `addr` probed by `check` (none: passive health only),
    /// with the latest settings; made on first use.
    pub(crate) fn upstream(
        &self,
        addr: SocketAddr,
        check: Option<&Probing>,
        params: HealthParams,
    ) -> Arc<Upstream> {
        let key = ServerKey::new(addr, check.map(|c| &c.spec));
        let mut servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(u) = servers.get(&key).and_then(Weak::upgrade) {
            u.with_health(|h| h.set_params(params));
            let mut probing = u.probing.lock().unwrap_or_else(|p| p.into_inner());
            if let (Some(old), Some(new)) = (probing.as_mut(), check) {
                // A pool that wants a role keeps it asked for.
                let ask_role = old.spec.ask_role || new.spec.ask_role;
                *old = new.clone();
                old.spec.ask_role = ask_role;
            }
            return Arc::clone(&u);
        }
        servers.retain(|_, u| u.strong_count() > 0);
        let seed = self.seeds().remove(&key);
        let health = match seed {
            Some(carried) => HealthState::seeded(params, &carried, Instant::now()),
            None => HealthState::new(params, Instant::now()),
        };
        let u = Arc::new(Upstream {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            addr,
            probing: Mutex::new(check.cloned()),
            down: AtomicBool::new(!health.is_up()),
            health: Mutex::new(health),
            replication: Mutex::default(),
        });
        servers.insert(key, Arc::downgrade(&u));
        u
    }

    fn seeds(&self) -> std::sync::MutexGuard<'_, HashMap<ServerKey, Carried>> {
        self.seeds.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every live server's health, for a live upgrade to carry over.
    #[cfg(feature = "service")]
    pub(crate) fn carried(&self) -> Vec<ServerHealth> {
        let servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(u64, ServerHealth)> = servers
            .iter()
            .filter_map(|(key, u)| {
                let u = u.upgrade()?;
                let health = u.with_health(|h| h.carried());
                Some((
                    u.id,
                    ServerHealth {
                        key: key.clone(),
                        health,
                    },
                ))
            })
            .collect();
        out.sort_by_key(|(id, _)| *id);
        out.into_iter().map(|(_, s)| s).collect()
    }

    /// A live upgrade's new process, before its start: each server of the
    /// config that the old process knew (the same address probed the same
    /// way) starts in the state the old process last knew, not as new.
    /// Servers the config no longer names are ignored.
    #[cfg(feature = "service")]
    pub(crate) fn seed(&self, carried: Vec<ServerHealth>) {
        let mut seeds = self.seeds();
        seeds.clear();
        seeds.extend(carried.into_iter().map(|s| (s.key, s.health)));
    }

    /// The start is over: servers that join later (a reload) start as new.
    #[cfg(feature = "service")]
    pub(crate) fn end_seeding(&self) {
        self.seeds().clear();
    }

    /// Every live server that has an active check.
    pub(crate) fn checked(&self) -> Vec<Arc<Upstream>> {
        let servers = self.servers.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<Arc<Upstream>> = servers
            .values()
            .filter_map(Weak::upgrade)
            .filter(|u| u.probing.lock().is_ok_and(|p| p.is_some()))
            .collect();
        out.sort_by_key(|u| u.id);
        out
    }

    pub(crate) fn add_pool(&self, pool: &Arc<Pool>) {
        let mut pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.retain(|p| p.strong_count() > 0);
        pools.push(Arc::downgrade(pool));
    }

    fn pools(&self) -> Vec<Arc<Pool>> {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner());
        pools.iter().filter_map(Weak::upgrade).collect()
    }

    /// The `changes` generation.
    pub(crate) fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// The `gains` generation.
    pub(crate) fn gains(&self) -> u64 {
        self.gains.load(Ordering::SeqCst)
    }

    /// Rings `doorbell` at every gain while its worker holds clients.
    pub(crate) fn add_doorbell(&self, doorbell: &Arc<Doorbell>) {
        let mut bells = self.doorbells.lock().unwrap_or_else(|p| p.into_inner());
        bells.retain(|b| b.strong_count() > 0);
        bells.push(Arc::downgrade(doorbell));
    }

    /// A pool gained an eligible server: moves `gains` and wakes every
    /// worker that holds clients.
    pub(crate) fn gained(&self) {
        self.gains.fetch_add(1, Ordering::SeqCst);
        let bells = self.doorbells.lock().unwrap_or_else(|p| p.into_inner());
        for bell in bells.iter().filter_map(Weak::upgrade) {
            if bell.held.load(Ordering::SeqCst) > 0 {
                // Fails only once the worker's poll is gone (it exited).
                let _ = bell.waker.wake();
            }
        }
    }

    /// An active probe's verdict on `server`, with the timeline and the
    /// replication position its answer gave.
    pub(crate) fn observe(
        &self,
        server: &Upstream,
        verdict: &Verdict,
        timeline: Option<u32>,
        position: Option<Position>,
        now: Instant,
    ) {
        let changes = server.with_health(|h| {
            let t = h.observe(verdict, now);
            if verdict.answered() {
                h.set_timeline(timeline);
            }
            t
        });
        {
            let mut r = server.replication();
            // Positions of another role are not this one's.
            if changes.iter().any(|t| matches!(t, Transition::Role { .. })) {
                r.samples.clear();
            }
            if let (Verdict::Up { role: Some(_) }, Some(p)) = (verdict, position) {
                r.samples.push(now, p);
            }
        }
        // Only a new position or a change of state moves a lag.
        let lags_moved = (position.is_some() || !changes.is_empty()) && self.measure_lags();
        if let Verdict::CheckError { reason } = verdict {
            // Once per probe, so once per interval: rate-limited by the
            // schedule itself.
            tracing::warn!(
                upstream = %server.addr,
                "health check error (the server keeps its last confirmed state): {reason}"
            );
        }
        self.apply(server, &changes, "check");
        // The age of the last check is shown whatever it said (only the
        // pools that name this server need to show it again).
        if changes.is_empty() {
            if lags_moved {
                self.publish();
            } else {
                for pool in self.pools().iter().filter(|p| p.names(server)) {
                    pool.refresh();
                }
            }
        }
    }

    /// Measures every replica's lag again; returns whether one moved.
    fn measure_lags(&self) -> bool {
        let servers = self.checked();
        let role = |u: &Upstream| {
            let f = u.with_health(|h| (h.is_up(), h.reported()));
            match f {
                (up, Some(Reported::Is(r))) => Some((up, r)),
                _ => None,
            }
        };
        let roles: Vec<Option<(bool, Role)>> = servers.iter().map(|u| role(u)).collect();
        // A primary's samples count within twice the longer of its own
        // interval and the replica's: one probe of each fits.
        let primaries: Vec<(Samples, Duration)> = servers
            .iter()
            .zip(&roles)
            .filter(|(_, r)| *r == &Some((true, Role::Primary)))
            .map(|(u, _)| {
                (
                    u.replication().samples.clone(),
                    u.interval().unwrap_or_default(),
                )
            })
            .collect();
        let mut moved = false;
        for (u, r) in servers.iter().zip(&roles) {
            let own = u.interval().unwrap_or_default();
            let mut rep = u.replication();
            let lag = match (r, rep.samples.latest()) {
                (Some((_, Role::Replica)), Some(latest)) => lag::replica_lag(
                    latest,
                    primaries.iter().map(|(s, iv)| (s, 2 * own.max(*iv))),
                ),
                _ => None,
            };
            if rep.lag != lag {
                moved |= rep.lag.map(|l| l.bytes) != lag.map(|l| l.bytes);
                rep.lag = lag;
            }
        }
        moved
    }

    /// Moves the `changes` generation: a pool excluded or readmitted a
    /// server for a reason of its own (replication lag).
    pub(crate) fn bump(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// A client connect to `server` failed.
    pub(crate) fn connect_failed(&self, server: &Upstream, reason: &str, now: Instant) {
        let t = server.with_health(|h| h.connect_failed(reason, now));
        self.apply(server, t.as_slice(), "connect");
    }

    /// A client connect to `server` succeeded: brings a down server of
    /// passive health back (an actively checked one comes back through its
    /// probes only: a connect proves no role).
    pub(crate) fn connect_ok(&self, server: &Upstream, now: Instant) {
        if server.probing().is_some() {
            return;
        }
        let t = server.with_health(|h| h.connect_ok(now));
        self.apply(server, t.as_slice(), "connect");
    }

    /// May a connect go to the down, passively checked `server` now?
    pub(crate) fn take_trial(&self, server: &Upstream, now: Instant) -> bool {
        server.with_health(|h| h.take_trial(now))
    }

    fn apply(&self, server: &Upstream, changes: &[Transition], by: &str) {
        if changes.is_empty() {
            return;
        }
        for t in changes {
            log_transition(server, t, by);
        }
        self.changes.fetch_add(1, Ordering::AcqRel);
        self.publish();
    }

    /// Every pool re-evaluates its servers (and shows them in the stats
    /// file).
    pub(crate) fn publish(&self) {
        for pool in self.pools() {
            pool.refresh();
        }
    }
}

fn log_transition(server: &Upstream, t: &Transition, by: &str) {
    match t {
        Transition::Down { reason } => tracing::warn!(
            upstream = %server.addr,
            "server marked down after failed {by}s: {reason}"
        ),
        Transition::Up { role } => {
            let role = role.map(|r| format!(" as {r}")).unwrap_or_default();
            tracing::warn!(upstream = %server.addr, "server is up again{role} (after a good {by})");
        }
        Transition::Role { from, to } => {
            let show = |r: &Reported| match r {
                Reported::Is(r) => r.to_string(),
                Reported::Not(r) => format!("not {r}"),
            };
            let from = from.as_ref().map_or("unknown".to_string(), show);
            tracing::warn!(
                upstream = %server.addr,
                "server reports role {} (was {from})",
                show(to)
            );
        }
        // Logged per probe by `observe`.
        Transition::CheckError { .. } => {}
        Transition::CheckOk => {
            tracing::warn!(upstream = %server.addr, "health check works again")
        }
    }
}

#[cfg(all(test, feature = "service"))]
mod tests {
    use super::*;

    fn probing(kind: Kind) -> Probing {
        Probing {
            spec: CheckSpec::new(kind),
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(1),
        }
    }

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_new_fleet_takes_the_old_ones_health_of_the_same_servers_only() {
        let p = HealthParams::default();
        let old = Fleet::new();
        let primary = old.upstream(addr(1), Some(&probing(Kind::Redis)), p);
        let dead = old.upstream(addr(2), Some(&probing(Kind::Redis)), p);
        let gone = old.upstream(addr(3), Some(&probing(Kind::Redis)), p);
        let now = Instant::now();
        let role = Verdict::Up {
            role: Some(Role::Primary),
        };
        old.observe(&primary, &role, Some(3), None, now);
        old.observe(&dead, &role, None, None, now);
        old.observe(&dead, &Verdict::down("refused"), None, None, now);
        old.observe(&dead, &Verdict::down("refused"), None, None, now);
        old.observe(&dead, &Verdict::down("refused"), None, None, now);
        assert!(dead.is_down());
        old.observe(&gone, &role, None, None, now);
        let carried = old.carried();
        assert_eq!(carried.len(), 3);

        let new = Fleet::new();
        new.seed(carried);
        let primary = new.upstream(addr(1), Some(&probing(Kind::Redis)), p);
        let f = primary.facts();
        assert!(f.up);
        assert_eq!(f.reported, Some(Reported::Is(Role::Primary)));
        assert_eq!(f.timeline, Some(3));
        let dead = new.upstream(addr(2), Some(&probing(Kind::Redis)), p);
        assert!(dead.is_down(), "down stays down");
        assert!(!dead.facts().up);
        // The same address probed another way is another server: new.
        let other = new.upstream(addr(3), Some(&probing(Kind::Tcp)), p);
        assert_eq!(other.facts().reported, None);
        assert!(!other.facts().answered);
        // After the start, a server that joins is new.
        new.end_seeding();
        let later = new.upstream(addr(3), Some(&probing(Kind::Redis)), p);
        assert_eq!(later.facts().reported, None);
    }
}
