//! A listener as the workers know it: its identity, its settings and its
//! upstream pool, shared by every worker that accepts for it.
//!
//! Everything that refers to a listener holds an `Arc<Listener>` or its
//! [`ListenerId`], never a position in a list, so listeners can be added or
//! removed while the proxy runs without renumbering the others.

use crate::config::ListenerConfig;
use crate::shm::Block;
use crate::stats::{CounterBlock, Stats};
use crate::upstream::Pool;

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
    pub(crate) pool: Pool,
    /// This listener's counters, one block per worker: worker `i` alone
    /// writes block `i`. They live in the runtime's stats mapping.
    counters: Box<[Block]>,
    /// The first address it got bound to (port 0 resolved): what logs and
    /// metrics call it, until listeners have names of their own.
    bound: std::sync::OnceLock<std::net::SocketAddr>,
}

impl Listener {
    /// A listener whose counters are `counters`, one block per worker
    /// (see [`crate::shm::Arena::listener_blocks`]).
    pub(crate) fn new(id: ListenerId, config: ListenerConfig, counters: Box<[Block]>) -> Listener {
        let pool = Pool::new(config.upstreams.clone());
        Listener {
            id,
            config,
            pool,
            counters,
            bound: std::sync::OnceLock::new(),
        }
    }

    /// The block worker `worker` writes this listener's counters to.
    pub(crate) fn counters(&self, worker: usize) -> &CounterBlock {
        &self.counters[worker]
    }

    /// This listener's counters summed over the workers.
    pub(crate) fn stats(&self) -> Stats {
        Stats::sum(self.counters.iter().map(|b| &**b))
    }

    /// Records the address the first of its sockets got.
    pub(crate) fn set_bound(&self, addr: std::net::SocketAddr) {
        let _ = self.bound.set(addr);
    }

    /// A name for log lines: the first address it listens on, or
    /// `handoff` for the pairs a program hands to the runtime.
    pub(crate) fn label(&self) -> Label<'_> {
        Label(self)
    }
}

/// The name a listener's counters go by in the stats file and metrics:
/// its first address for now (`handoff` for handed-off pairs).
pub(crate) fn name_of(config: &ListenerConfig) -> String {
    match config.listen.first() {
        Some(addr) => addr.to_string(),
        None => "handoff".to_string(),
    }
}

/// See [`Listener::label`].
pub(crate) struct Label<'a>(&'a Listener);

impl std::fmt::Display for Label<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.bound.get().or(self.0.config.listen.first()) {
            Some(addr) => addr.fmt(f),
            None => f.write_str("handoff"),
        }
    }
}
