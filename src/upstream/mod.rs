//! Upstream pools and the one connector: pick a server, start a
//! non-blocking connect, and on failure pick the next.
//!
//! | file | what lives there |
//! |---|---|
//! | `mod.rs` | `Round` (one relay's attempts), the connect outcome |
//! | `pool.rs` | `Pool`: members, live relays per server, their standings, the pick |
//! | `fleet.rs` | `Fleet`: every server of the process with its one health state, shared by pools |
//! | `eligible.rs` | which servers a pool may use for its role, as a pure function |
//! | `balance.rs` | the policies as pure functions: weighted round-robin, least-conn, rendezvous hashing |
//! | `resolve.rs` | the `Resolve` seam and the background re-resolution thread |

mod balance;
pub(crate) mod eligible;
pub(crate) mod fleet;
mod pool;
pub(crate) mod resolve;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use crate::error::is_local_error;
pub(crate) use fleet::Fleet;

#[cfg(test)]
pub(crate) use pool::Member;
pub(crate) use pool::{Lease, Pool, Server, ServerSample};
pub use resolve::{Resolve, SystemResolver};

/// One relay's round of connect attempts over its listener's pool: at most
/// the pool's `attempts()`, each to a server not tried yet. The current
/// attempt's server is leased (it counts among that server's live relays
/// until the relay closes or moves on).
#[derive(Debug)]
pub(crate) struct Round {
    /// The server of the current attempt (the relay's, once connected).
    current: Option<Lease>,
    /// What picking the next server needs; boxed, and dropped by
    /// [`Round::settle`] once the relay is connected for good, so a
    /// connected relay holds only its lease.
    attempts: Option<Box<Attempts>>,
}

/// A round's state while servers may still be tried.
#[derive(Debug)]
struct Attempts {
    cursor: usize,
    client: IpAddr,
    max_attempts: usize,
    tried: Vec<SocketAddr>,
}

impl Attempts {
    fn has_next(&self, pool: &Pool) -> bool {
        self.tried.len() < self.max_attempts
            && pool
                .members()
                .servers
                .iter()
                .any(|s| !self.tried.contains(&s.addr))
    }
}

impl Round {
    pub(crate) fn new(pool: &Pool, client: IpAddr) -> Round {
        Round {
            current: None,
            attempts: Some(Box::new(Attempts {
                cursor: pool.next_cursor(),
                client,
                max_attempts: pool.attempts(),
                tried: Vec::new(),
            })),
        }
    }

    /// A round with nothing to try (what a relay holds while its real
    /// round is out being advanced, and a handed-off pair's).
    pub(crate) fn empty() -> Round {
        Round {
            current: None,
            attempts: None,
        }
    }

    /// The round of a relay connected already, holding `lease` only.
    #[cfg(feature = "service")]
    pub(crate) fn holding(lease: Lease) -> Round {
        Round {
            current: Some(lease),
            attempts: None,
        }
    }

    /// The relay is connected for good (no other server will be tried):
    /// keeps the lease, frees the rest.
    pub(crate) fn settle(&mut self) {
        self.attempts = None;
    }

    fn tried(&self) -> &[SocketAddr] {
        self.attempts.as_ref().map_or(&[], |a| &a.tried)
    }

    /// Whether no server was tried at all (the pool had none to offer).
    pub(crate) fn tried_none(&self) -> bool {
        self.tried().is_empty()
    }

    /// Whether another server may be tried after the current one (an
    /// estimate for the log: the pool may change meanwhile).
    pub(crate) fn has_next(&self, pool: &Pool) -> bool {
        self.attempts.as_ref().is_some_and(|a| a.has_next(pool))
    }

    /// Starts a connect to the next server, counted as an attempt in
    /// worker `worker`'s block of that server. A connect that fails at once
    /// (no route, refused) counts against the server, is reported to
    /// `failed` with whether another server follows, and the next is
    /// tried. `Ok(None)` once no server is left to try.
    ///
    /// A connect that fails for the proxy's own shortage (out of fds,
    /// socket buffers or memory: [`is_local_error`]) ends the round with
    /// `Err`: it is neither an attempt nor a failure of the server, and
    /// every other server would fail the same way.
    pub(crate) fn connect_next(
        &mut self,
        pool: &Pool,
        worker: usize,
        now: Instant,
        mut failed: impl FnMut(SocketAddr, &io::Error, bool),
    ) -> io::Result<Option<(TcpStream, SocketAddr)>> {
        self.current = None;
        let Some(a) = self.attempts.as_mut() else {
            return Ok(None);
        };
        while a.tried.len() < a.max_attempts {
            let Some(lease) = pool.pick(a.cursor + a.tried.len(), a.client, &a.tried, now) else {
                return Ok(None);
            };
            let server = lease.server.addr;
            let counters = lease.server.block(worker);
            match TcpStream::connect(server) {
                Ok(stream) => {
                    a.tried.push(server);
                    counters.connect_attempts.fetch_add(1, Relaxed);
                    self.current = Some(lease);
                    return Ok(Some((stream, server)));
                }
                Err(e) if is_local_error(&e) => return Err(e),
                Err(e) => {
                    a.tried.push(server);
                    counters.connect_attempts.fetch_add(1, Relaxed);
                    counters.connect_failures.fetch_add(1, Relaxed);
                    pool.failed(&lease.server, &e.to_string(), now);
                    failed(server, &e, a.has_next(pool));
                }
            }
        }
        Ok(None)
    }

    /// The current attempt's connect completed.
    pub(crate) fn succeeded(&self, pool: &Pool, now: Instant) {
        if let Some(lease) = &self.current {
            pool.succeeded(&lease.server, now);
        }
    }

    /// The current attempt's connect failed or timed out (counted in
    /// worker `worker`'s block of the server). A local error
    /// ([`is_local_error`]) is the proxy's own: the server is not blamed.
    pub(crate) fn failed(&self, pool: &Pool, worker: usize, error: &io::Error, now: Instant) {
        if is_local_error(error) {
            return;
        }
        if let Some(lease) = &self.current {
            lease
                .server
                .block(worker)
                .connect_failures
                .fetch_add(1, Relaxed);
            pool.failed(&lease.server, &error.to_string(), now);
        }
    }

    /// The server of the current attempt (the relay's, once connected).
    pub(crate) fn lease(&self) -> Option<&Lease> {
        self.current.as_ref()
    }

    /// The server of the current attempt (the relay's, once connected).
    pub(crate) fn server(&self) -> Option<&Arc<Server>> {
        self.current.as_ref().map(|l| &l.server)
    }
}

/// Where a non-blocking connect stands.
#[derive(Debug)]
pub(crate) enum Connect {
    /// Still in the handshake (a spurious wakeup).
    Pending,
    Established,
    /// The handshake completed, then the server reset the connection before
    /// the connect event was handled: a connection that failed, not a
    /// failed connect, so it must not fail over.
    Lost(io::Error),
    /// The handshake failed (refused, unreachable, timed out): try the next
    /// server.
    Failed(io::Error),
}

/// Reads a connect's outcome after an event on its socket (mio's recipe:
/// register for WRITABLE, then `take_error`, then `peer_addr`).
pub(crate) fn connect_result(stream: &TcpStream, writable: bool) -> Connect {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) if established_then_lost(&e) => return Connect::Lost(e),
        Ok(Some(e)) | Err(e) => return Connect::Failed(e),
        // A connecting socket turns writable when the handshake is done;
        // with no error pending, it is connected (no getpeername needed).
        Ok(None) if writable => return Connect::Established,
        Ok(None) => {}
    }
    match stream.peer_addr() {
        Ok(_) => Connect::Established,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Connect::Pending,
        Err(e) => Connect::Failed(e),
    }
}

/// Errors a socket only gets after its handshake completed: a reset (a
/// reset during the handshake reads as ECONNREFUSED) or a write to a closed
/// connection.
fn established_then_lost(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNRESET) | Some(libc::EPIPE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::PoolConfig;
    use crate::shm::ServerRegistry;

    /// A pool of one live loopback server that one failed connect marks
    /// down (`fall = 1`), and a round whose connect to it started.
    fn connecting() -> (Arc<Pool>, Round, std::net::TcpListener) {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut config = PoolConfig::new(Vec::new());
        config.health.fall = 1;
        let pool = Pool::new(
            "test",
            None,
            &config,
            Arc::new(ServerRegistry::new(None, 1)),
            &Fleet::new(),
        );
        pool.set_members(vec![Member {
            addr: server.local_addr().unwrap(),
            weight: 1,
            backup: false,
            check_port: None,
        }]);
        let mut round = Round::new(&pool, IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let started = round.connect_next(&pool, 0, Instant::now(), |_, e, _| {
            panic!("the connect failed at once: {e}")
        });
        assert!(matches!(started, Ok(Some(_))), "{started:?}");
        (pool, round, server)
    }

    #[test]
    fn the_proxys_own_shortage_never_counts_against_a_server() {
        let (pool, round, _server) = connecting();
        let server = Arc::clone(round.server().unwrap());
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let e = io::Error::from_raw_os_error(errno);
            round.failed(&pool, 0, &e, Instant::now());
            assert!(!server.is_down(), "marked down for {e}");
        }
        assert_eq!(server.block(0).connect_failures.load(Relaxed), 0);
        // A failure of the server's own does count (fall = 1: down at once).
        let refused = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        round.failed(&pool, 0, &refused, Instant::now());
        assert!(server.is_down(), "a refused connect must count");
        assert_eq!(server.block(0).connect_failures.load(Relaxed), 1);
    }
}
