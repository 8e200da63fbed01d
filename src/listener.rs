//! A listener as the workers know it: its identity, its settings and its
//! upstream pool, shared by every worker that accepts for it.
//!
//! Everything that refers to a listener holds an `Arc<Listener>` or its
//! [`ListenerId`], never a position in a list, so listeners can be added or
//! removed while the proxy runs without renumbering the others.

use std::net::SocketAddr;

use crate::config::ListenerConfig;
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
}

impl Listener {
    pub(crate) fn new(id: ListenerId, config: ListenerConfig) -> Listener {
        let pool = Pool::new(config.upstreams.clone());
        Listener { id, config, pool }
    }

    /// A name for log lines: the first address it listens on.
    pub(crate) fn label(&self) -> SocketAddr {
        self.config.listen[0]
    }
}
