//! One address of a pool ([`Server`]), as the metrics sample it
//! ([`ServerSample`]), and a relay's hold on it ([`Lease`]).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::SystemTime;

use super::super::eligible::State;
use super::super::fleet::Upstream;
use super::{Pool, Want};
use crate::health::{Reported, Role};
use crate::shm::ServerCounters;
use crate::stats::ServerBlock;

/// One address of a pool.
#[derive(Debug)]
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    pub(crate) weight: u32,
    pub(crate) backup: bool,
    pub(super) check_port: Option<u16>,
    pub(super) key: u64,
    /// Its health, shared process-wide.
    pub(crate) upstream: Arc<Upstream>,
    /// Its counters and state words in the stats file, shared with the
    /// entries for the same address in the listener's other pools (before
    /// and after a reload).
    pub(super) counters: Arc<ServerCounters>,
}

/// One server as the metrics show it, read without a lock.
#[cfg_attr(not(feature = "admin"), allow(dead_code))]
#[derive(Clone, Debug)]
pub(crate) struct ServerSample {
    pub(crate) addr: SocketAddr,
    /// It takes new relays.
    pub(crate) up: bool,
    pub(crate) state: State,
    /// The role its last answer reported (also while down).
    pub(crate) role: Option<Role>,
    pub(crate) live: usize,
    pub(crate) backup: bool,
    /// When its last probe ended, as a Unix time.
    pub(crate) last_check: Option<SystemTime>,
    /// A replica's measured replication lag, in bytes.
    pub(crate) lag: Option<u64>,
}

impl Server {
    pub(crate) fn is_down(&self) -> bool {
        self.upstream.is_down()
    }

    /// The counter block worker `worker` writes for this server.
    pub(crate) fn block(&self, worker: usize) -> &crate::sys::shared::Placed<ServerBlock> {
        self.counters.block(worker)
    }

    /// Relays holding it now, over all of its listener's pools.
    pub(crate) fn live(&self) -> usize {
        self.counters.head().live.load(Ordering::Relaxed) as usize
    }
}

/// A relay's hold on a server: counts it among the server's live relays
/// (what least-conn compares) until dropped, and remembers the role the
/// server had when it was picked.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) server: Arc<Server>,
    role: Option<Reported>,
}

impl Lease {
    pub(super) fn new(server: Arc<Server>) -> Lease {
        server.counters.head().live.fetch_add(1, Ordering::Relaxed);
        let role = server.upstream.reported();
        Lease { server, role }
    }

    /// Whether `on-down = "kill"` ends a relay on this lease: its server
    /// stopped answering, or (in a pool that wants a role) its role answer
    /// changed since the pick. A check error changes neither.
    pub(crate) fn doomed(&self, pool: &Pool) -> bool {
        self.server.is_down()
            || (pool.want != Want::Any && self.server.upstream.reported() != self.role)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.server
            .counters
            .head()
            .live
            .fetch_sub(1, Ordering::Relaxed);
    }
}
