//! Server names to addresses: once at start on the caller's thread, then on
//! a background thread every `resolve-interval`, never in a worker's loop
//! (getaddrinfo blocks).
//!
//! Resolution goes through the [`Resolve`] seam; the proxy uses the system
//! resolver (so /etc/hosts, Kubernetes headless services and Consul names
//! work) and tests inject their own. A name that fails to resolve keeps the
//! addresses it last had; one that never resolved is retried every
//! [`UNRESOLVED_RETRY`] (or sooner, with a shorter interval) until it does.

use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::pool::{Member, Pool};
use crate::config::PoolConfig;

/// How often a name that has never resolved is tried again.
pub const UNRESOLVED_RETRY: Duration = Duration::from_secs(5);

/// Turns a host name and port into addresses.
pub trait Resolve: Send + Sync {
    fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>>;
}

/// getaddrinfo(3), through the standard library.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemResolver;

impl Resolve for SystemResolver {
    fn resolve(&self, host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
        Ok((host, port).to_socket_addrs()?.collect())
    }
}

/// A pool for the resolver to keep filled: the name of the listener it
/// serves (for the log lines), its settings (the server entries and
/// `resolve-interval`) and the pool that takes the addresses.
pub(crate) struct Target {
    pub(crate) listener: String,
    pub(crate) config: PoolConfig,
    pub(crate) pool: Arc<Pool>,
}

/// One pool as the resolver keeps it: each server entry's last addresses
/// (`None`: never resolved).
struct Tracked {
    target: Target,
    known: Vec<Option<Vec<SocketAddr>>>,
    next: Instant,
    /// Resolved once already.
    started: bool,
}

impl Tracked {
    fn new(target: Target, now: Instant) -> Tracked {
        let known = vec![None; target.config.servers.len()];
        Tracked {
            target,
            known,
            next: now,
            started: false,
        }
    }

    /// Resolves every entry, keeps the last addresses of a name that fails
    /// now, and gives the pool its new members. Logs what changed.
    fn refresh(&mut self, resolver: &dyn Resolve, now: Instant) {
        let pool_config = &self.target.config;
        let mut members = Vec::new();
        for (entry, known) in pool_config.servers.iter().zip(&mut self.known) {
            // Validation guarantees HOST:PORT.
            let Ok((host, port)) = entry.host_port() else {
                continue;
            };
            let addrs = match entry.ip() {
                Some(ip) => Ok(vec![SocketAddr::new(ip, port)]),
                None => resolver.resolve(host, port).and_then(|a| {
                    if a.is_empty() {
                        Err(io::Error::new(io::ErrorKind::NotFound, "no address"))
                    } else {
                        Ok(a)
                    }
                }),
            };
            match addrs {
                Ok(addrs) => *known = Some(addrs),
                Err(e) => tracing::warn!(
                    listener = %self.target.listener,
                    pool = self.target.pool.name().map(tracing::field::display),
                    server = %entry.address,
                    error = %e,
                    "cannot resolve a server name; {}",
                    if known.is_some() { "keeping its last addresses" } else { "retrying" }
                ),
            }
            for &addr in known.iter().flatten() {
                members.push(Member {
                    addr,
                    weight: entry.weight,
                    backup: entry.backup,
                    check_port: entry.check_port,
                });
            }
        }
        let (added, removed) = self.target.pool.set_members(members);
        // The first resolution is what the start line shows; changes after
        // it are news.
        if self.started && (!added.is_empty() || !removed.is_empty()) {
            tracing::info!(
                listener = %self.target.listener,
                pool = self.target.pool.name().map(tracing::field::display),
                added = ?added,
                removed = ?removed,
                servers = self.target.pool.members().servers.len(),
                "pool membership changed"
            );
        }
        self.started = true;
        let unresolved = self.known.iter().any(Option::is_none);
        let wait = match (pool_config.resolve_interval, unresolved) {
            (Some(every), false) => Some(every),
            (Some(every), true) => Some(every.min(UNRESOLVED_RETRY)),
            (None, true) => Some(UNRESOLVED_RETRY),
            (None, false) => None,
        };
        self.next = wait.map_or(now + Duration::from_secs(86_400 * 365), |w| now + w);
    }

    /// Whether this pool needs the background thread at all.
    fn needs_refresh(&self) -> bool {
        let names = self.target.config.servers.iter().any(|s| s.ip().is_none());
        names
            && (self.target.config.resolve_interval.is_some()
                || self.known.iter().any(Option::is_none))
    }
}

/// The background resolver. Dropping it stops the thread (at its next
/// wakeup; a lookup in progress is not interrupted).
pub(crate) struct Refresher {
    _stop: Sender<()>,
}

/// Resolves every target's servers now, on this thread, then starts the
/// background thread if some pool has names to resolve again.
pub(crate) fn start(
    targets: impl IntoIterator<Item = Target>,
    resolver: Arc<dyn Resolve>,
) -> io::Result<Option<Refresher>> {
    let now = Instant::now();
    let mut tracked: Vec<Tracked> = targets.into_iter().map(|t| Tracked::new(t, now)).collect();
    for t in &mut tracked {
        t.refresh(&*resolver, now);
    }
    tracked.retain(Tracked::needs_refresh);
    if tracked.is_empty() {
        return Ok(None);
    }
    let (stop, stopped) = mpsc::channel();
    std::thread::Builder::new()
        .name("spliced-resolve".into())
        .spawn(move || run(tracked, &*resolver, stopped))?;
    Ok(Some(Refresher { _stop: stop }))
}

fn run(mut tracked: Vec<Tracked>, resolver: &dyn Resolve, stopped: Receiver<()>) {
    loop {
        let now = Instant::now();
        for t in tracked.iter_mut().filter(|t| t.next <= now) {
            t.refresh(resolver, now);
        }
        let Some(next) = tracked.iter().map(|t| t.next).min() else {
            return;
        };
        match stopped.recv_timeout(next.saturating_duration_since(Instant::now())) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}
