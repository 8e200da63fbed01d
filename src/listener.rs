//! A listener as the workers know it: its identity, its settings, its
//! upstream pool and its limits, shared by every worker that accepts for it.
//!
//! Everything that refers to a listener holds an `Arc<Listener>` or its
//! [`ListenerId`], never a position in a list, so listeners can be added or
//! removed while the proxy runs without renumbering the others.
//!
//! Limits are held by guards: a [`Reservation`] is taken before `accept`
//! (so at `max-conns` the listener stops accepting and clients wait in the
//! backlog), and becomes an [`Admission`] once the client passed the access
//! list and its per-source limit. Dropping either gives the room back.

use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use mio::net::TcpStream;
use socket2::{SockRef, TcpKeepalive};

use crate::config::{ListenerConfig, PoolConfig};
use crate::route::{self, Shown};
use crate::shm::{Block, ListenerCounters, ServerRegistry};
use crate::stats::{CounterBlock, Stats};
use crate::upstream::{Fleet, Pool};

/// A listener's identity within one running proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub(crate) u32);

impl std::fmt::Display for ListenerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[derive(Debug)]
pub(crate) struct Listener {
    pub(crate) id: ListenerId,
    pub(crate) config: ListenerConfig,
    /// Every pool its clients may go to: its own alone, or with routes
    /// each named pool they lead to once (in `config.route_pools` order).
    pub(crate) pools: Vec<Arc<Pool>>,
    /// Per route of `config.routes`: the index of its pool in `pools`
    /// and its count of routed clients.
    routes: Vec<Route>,
    fleet: Arc<Fleet>,
    /// Limits and counters, shared with the listener's successors after a
    /// reload, so old and new relays count under one max-conns.
    state: Arc<State>,
}

/// A route as a running listener keeps it.
#[derive(Debug)]
struct Route {
    pool: usize,
    clients: Arc<AtomicU64>,
}

/// One route's count of clients it took, as the metrics show it.
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RouteSample {
    /// Its position, from 1.
    pub(crate) position: usize,
    /// What it matches (`server-name=a.db`, `default`).
    pub(crate) matches: String,
    pub(crate) pool: String,
    pub(crate) clients: u64,
}

/// The route a client took: its position (from 1) and its pool.
#[derive(Clone, Debug)]
pub(crate) struct Routed {
    pub(crate) position: usize,
    pub(crate) pool: Arc<Pool>,
}

#[derive(Debug)]
struct State {
    /// Relays (and reservations) of this listener, over all workers.
    live: AtomicUsize,
    /// Live relays per client IP; kept only with `max_conns_per_source`.
    sources: Mutex<HashMap<IpAddr, usize>>,
    /// Clients held for a server, over all workers (`max_queued`).
    queued: AtomicUsize,
    /// This listener's counters, one block per worker: worker `i` alone
    /// writes block `i`. They live in the runtime's stats mapping.
    counters: Box<[Block]>,
    /// Where its servers count, so a server kept across a reload keeps
    /// its counters.
    servers: Arc<ServerRegistry>,
    /// Clients each route took, by the route's position and what it
    /// matches, kept across reloads for a route that stays.
    routed: Mutex<HashMap<(usize, String), Arc<AtomicU64>>>,
}

/// The name a listener's counters go by in the stats file and metrics.
pub(crate) fn name_of(config: &ListenerConfig) -> String {
    config.name.clone()
}

/// Why a client was turned away after accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refused {
    /// Denied by `deny`, or not in a non-empty `allow`.
    Denied,
    /// Its IP already has `max_conns_per_source` relays here.
    PerSource,
}

impl Listener {
    /// A listener whose counters are `counters`: one block per worker and
    /// its servers' (see [`crate::shm::Arena::listener_counters`]).
    pub(crate) fn new(
        id: ListenerId,
        config: ListenerConfig,
        counters: ListenerCounters,
        fleet: &Arc<Fleet>,
    ) -> Listener {
        let state = Arc::new(State {
            live: AtomicUsize::new(0),
            sources: Mutex::new(HashMap::new()),
            queued: AtomicUsize::new(0),
            counters: counters.blocks,
            servers: counters.servers,
            routed: Mutex::new(HashMap::new()),
        });
        Listener::with_state(id, config, state, fleet)
    }

    /// The listener's pools and routes for `config`, counting under `state`.
    fn with_state(
        id: ListenerId,
        config: ListenerConfig,
        state: Arc<State>,
        fleet: &Arc<Fleet>,
    ) -> Listener {
        let make = |name: Option<&str>, pool: &PoolConfig| {
            Pool::new(&config.name, name, pool, Arc::clone(&state.servers), fleet)
        };
        let (pools, routes) = if config.routes.is_empty() {
            (vec![make(None, &config.pool)], Vec::new())
        } else {
            let pools: Vec<Arc<Pool>> = config
                .route_pools
                .iter()
                .map(|p| make(Some(&p.name), &p.config))
                .collect();
            let mut routed = state.routed.lock().unwrap_or_else(|p| p.into_inner());
            let routes = config
                .routes
                .iter()
                .enumerate()
                .map(|(i, r)| Route {
                    // Validation makes every route's pool one of route_pools.
                    pool: config
                        .route_pools
                        .iter()
                        .position(|p| p.name == r.pool)
                        .unwrap_or(0),
                    clients: Arc::clone(routed.entry((i + 1, r.describe())).or_default()),
                })
                .collect();
            (pools, routes)
        };
        Listener {
            id,
            config,
            pools,
            routes,
            fleet: Arc::clone(fleet),
            state,
        }
    }

    /// The same listener with new settings and a new pool, as a reload
    /// makes it: it keeps its id, its counters and its count of live
    /// relays, while relays accepted before keep this one's settings.
    pub(crate) fn successor(&self, config: ListenerConfig) -> Listener {
        self.heir(self.id, config)
    }

    /// A listener of the same name added again while this removed one
    /// still drains: one identity (counters, stats-file row, live count),
    /// but its own id, so the old relays' drain deadline is not the new
    /// ones'.
    pub(crate) fn heir(&self, id: ListenerId, config: ListenerConfig) -> Listener {
        Listener::with_state(id, config, Arc::clone(&self.state), self.fleet())
    }

    /// The fleet its pools' servers belong to.
    pub(crate) fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// Its own pool, when it has no routes: where every client goes.
    pub(crate) fn own_pool(&self) -> Option<&Arc<Pool>> {
        self.routes.is_empty().then(|| self.pools.first()).flatten()
    }

    /// Whether clients are routed (and must be read first to be).
    pub(crate) fn has_routes(&self) -> bool {
        !self.routes.is_empty()
    }

    /// The route that takes a client that showed `shown`, counted; `None`
    /// when none does (no default route).
    pub(crate) fn route(&self, shown: &Shown) -> Option<Routed> {
        let i = route::pick(&self.config.routes, shown)?;
        let r = &self.routes[i];
        r.clients.fetch_add(1, Ordering::Relaxed);
        Some(Routed {
            position: i + 1,
            pool: Arc::clone(&self.pools[r.pool]),
        })
    }

    /// The pool of this listener that stands for `pool` of an earlier
    /// listener of the same name: its own pool, or the named pool of the
    /// same name.
    pub(crate) fn counterpart(&self, pool: &Pool) -> Option<&Arc<Pool>> {
        match (self.own_pool(), pool.name()) {
            (Some(own), None) => Some(own),
            (None, Some(name)) => self.pools.iter().find(|p| p.name() == Some(name)),
            _ => None,
        }
    }

    /// Every route's count of clients.
    #[cfg_attr(not(feature = "admin"), allow(dead_code))]
    pub(crate) fn route_samples(&self) -> Vec<RouteSample> {
        self.config
            .routes
            .iter()
            .zip(&self.routes)
            .enumerate()
            .map(|(i, (r, slot))| RouteSample {
                position: i + 1,
                matches: r.describe(),
                pool: r.pool.clone(),
                clients: slot.clients.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// The block worker `worker` writes this listener's counters to.
    pub(crate) fn counters(&self, worker: usize) -> &CounterBlock {
        &self.state.counters[worker]
    }

    /// This listener's counters summed over the workers.
    pub(crate) fn stats(&self) -> Stats {
        Stats::sum(self.state.counters.iter().map(|b| &**b))
    }

    /// The listener's name, for log lines.
    pub(crate) fn label(&self) -> &str {
        &self.config.name
    }

    /// Room for one more relay, or `None` at `max_conns`.
    pub(crate) fn reserve(self: &Arc<Self>) -> Option<Reservation> {
        let max = self.config.max_conns.unwrap_or(usize::MAX);
        self.state
            .live
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(Reservation(Arc::clone(self)))
    }

    /// Checks the access list, then the per-source limit, before anything
    /// is done for the client (no upstream connect yet).
    /// Room for a handed-off pair: under `max_conns` (unset for the
    /// handoff settings), with no source to check.
    pub(crate) fn admit_handoff(self: &Arc<Self>) -> Option<Admission> {
        self.reserve().map(|reservation| Admission {
            reservation,
            source: None,
        })
    }

    /// Room for a relay that is live already (a live upgrade handed it
    /// over): counted under `max_conns` and the per-source limit even past
    /// them, as the old process counted it.
    #[cfg(feature = "service")]
    pub(crate) fn admit_carried(self: &Arc<Self>, client: Option<IpAddr>) -> Admission {
        self.state.live.fetch_add(1, Ordering::AcqRel);
        let source = client.filter(|_| self.config.max_conns_per_source.is_some());
        if let Some(ip) = source {
            let mut sources = self.state.sources.lock().unwrap_or_else(|p| p.into_inner());
            *sources.entry(ip).or_insert(0) += 1;
        }
        Admission {
            reservation: Reservation(Arc::clone(self)),
            source,
        }
    }

    pub(crate) fn admit(
        &self,
        reservation: Reservation,
        client: IpAddr,
    ) -> Result<Admission, Refused> {
        if !self.config.access.permits(client) {
            return Err(Refused::Denied);
        }
        let source = match self.config.max_conns_per_source {
            None => None,
            Some(max) => {
                let mut sources = self.state.sources.lock().unwrap_or_else(|p| p.into_inner());
                let n = sources.entry(client).or_insert(0);
                if *n >= max {
                    return Err(Refused::PerSource);
                }
                *n += 1;
                Some(client)
            }
        };
        Ok(Admission {
            reservation,
            source,
        })
    }

    /// Room for one more held client, or `None` at `max_queued`.
    pub(crate) fn queue(&self) -> Option<QueuePlace> {
        let max = self.config.max_queued.unwrap_or(usize::MAX);
        self.state
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        Some(QueuePlace(Arc::clone(&self.state)))
    }

    /// Keepalive and TCP_USER_TIMEOUT, as configured, on one of a relay's
    /// sockets.
    pub(crate) fn tune(&self, stream: &TcpStream) -> io::Result<()> {
        let socket = SockRef::from(stream);
        if let Some(k) = self.config.keepalive {
            let params = TcpKeepalive::new()
                .with_time(k.idle)
                .with_interval(k.interval)
                .with_retries(k.count);
            socket.set_tcp_keepalive(&params)?;
        }
        if let Some(t) = self.config.user_timeout {
            socket.set_tcp_user_timeout(Some(t))?;
        }
        Ok(())
    }
}

/// One held client's place under the listener's `max_queued`, given
/// back on drop.
#[derive(Debug)]
pub(crate) struct QueuePlace(Arc<State>);

impl Drop for QueuePlace {
    fn drop(&mut self) {
        self.0.queued.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One relay's room under the listener's `max_conns`.
#[derive(Debug)]
pub(crate) struct Reservation(Arc<Listener>);

impl Drop for Reservation {
    fn drop(&mut self) {
        self.0.state.live.fetch_sub(1, Ordering::AcqRel);
    }
}

/// An admitted client: its room under `max_conns` and, when limited, its
/// count under `max_conns_per_source`, both given back on drop.
#[derive(Debug)]
pub(crate) struct Admission {
    reservation: Reservation,
    source: Option<IpAddr>,
}

impl Drop for Admission {
    fn drop(&mut self) {
        if let Some(ip) = self.source {
            let mut sources = self
                .reservation
                .0
                .state
                .sources
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if let Some(n) = sources.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    sources.remove(&ip);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    fn listener(tweak: impl FnOnce(&mut ListenerConfig)) -> Arc<Listener> {
        let mut c = ListenerConfig::new("127.0.0.1:0".parse().unwrap(), vec![], Mode::Splice);
        tweak(&mut c);
        let arena = crate::shm::Arena::new(1, &[c.name.clone()], 0);
        Arc::new(Listener::new(
            ListenerId(0),
            c,
            arena.listener_counters(0),
            &Fleet::new(),
        ))
    }

    #[test]
    fn max_conns_reserves_and_gives_back() {
        let l = listener(|c| c.max_conns = Some(2));
        let a = l.reserve().unwrap();
        let _b = l.reserve().unwrap();
        assert!(l.reserve().is_none());
        drop(a);
        assert!(l.reserve().is_some());
    }

    #[test]
    fn per_source_limit_counts_each_ip() {
        let l = listener(|c| c.max_conns_per_source = Some(1));
        let (x, y): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first = l.admit(l.reserve().unwrap(), x).unwrap();
        assert_eq!(
            l.admit(l.reserve().unwrap(), x).unwrap_err(),
            Refused::PerSource
        );
        let _other = l.admit(l.reserve().unwrap(), y).unwrap();
        drop(first);
        assert!(l.admit(l.reserve().unwrap(), x).is_ok());
        assert_eq!(
            l.state.live.load(Ordering::Relaxed),
            1,
            "refusals gave their room back"
        );
    }

    #[test]
    fn tune_sets_keepalive_and_user_timeout_through_socket2() {
        use crate::config::Keepalive;
        use std::time::Duration;
        let l = listener(|c| {
            c.keepalive = Some(Keepalive {
                idle: Duration::from_secs(30),
                interval: Duration::from_secs(10),
                count: 3,
            });
            c.user_timeout = Some(Duration::from_secs(7));
        });
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let std_stream = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
        let stream = TcpStream::from_std(std_stream);
        l.tune(&stream).unwrap();
        let s = SockRef::from(&stream);
        assert!(s.keepalive().unwrap());
        assert_eq!(s.keepalive_time().unwrap(), Duration::from_secs(30));
        assert_eq!(s.keepalive_interval().unwrap(), Duration::from_secs(10));
        assert_eq!(s.keepalive_retries().unwrap(), 3);
        assert_eq!(s.tcp_user_timeout().unwrap(), Some(Duration::from_secs(7)));
    }

    #[test]
    fn the_access_list_comes_first() {
        let l = listener(|c| c.access.deny = vec!["10.0.0.0/8".parse().unwrap()]);
        let r = l.admit(l.reserve().unwrap(), "10.1.1.1".parse().unwrap());
        assert_eq!(r.unwrap_err(), Refused::Denied);
    }
}
