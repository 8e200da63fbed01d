//! Upstream pools and the one connector: pick a server, start a
//! non-blocking connect, and on failure pick the next.
//!
//! Selection is round-robin per accepted connection over a cursor shared by
//! all workers; attempt `n` of a relay uses the `n`-th server after its
//! first, so a refused or timed-out connect moves on to the next server.
//! The balancing policy lives in [`Pool::first`] and [`Pool::server`]: that
//! is the seam weighted, least-connection or hashed policies fill.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};

use mio::net::TcpStream;

/// The servers of one listener.
#[derive(Debug)]
pub(crate) struct Pool {
    servers: Vec<SocketAddr>,
    /// Round-robin cursor, shared by all workers.
    cursor: AtomicUsize,
}

impl Pool {
    pub(crate) fn new(servers: Vec<SocketAddr>) -> Pool {
        Pool {
            servers,
            cursor: AtomicUsize::new(0),
        }
    }

    /// Where a new relay starts its round of attempts.
    fn first(&self) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed)
    }

    /// The server for attempt `attempt` of a round that started at `first`,
    /// or `None` once every server was tried.
    fn server(&self, first: usize, attempt: usize) -> Option<SocketAddr> {
        let n = self.servers.len();
        (attempt < n).then(|| self.servers[(first + attempt) % n])
    }
}

/// One relay's round of connect attempts over its listener's pool.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Round {
    first: usize,
    /// Attempts started so far.
    started: usize,
}

impl Round {
    pub(crate) fn new(pool: &Pool) -> Round {
        Round {
            first: pool.first(),
            started: 0,
        }
    }

    /// Whether another server is left to try after the current one.
    pub(crate) fn has_next(&self, pool: &Pool) -> bool {
        pool.server(self.first, self.started).is_some()
    }

    /// Starts a connect to the next server. A connect that fails at once
    /// (no route, out of fds) is reported to `failed` with whether another
    /// server follows, and the next is tried. `None` once every server was
    /// tried.
    pub(crate) fn connect_next(
        &mut self,
        pool: &Pool,
        mut failed: impl FnMut(SocketAddr, &io::Error, bool),
    ) -> Option<(TcpStream, SocketAddr)> {
        while let Some(server) = pool.server(self.first, self.started) {
            self.started += 1;
            match TcpStream::connect(server) {
                Ok(stream) => return Some((stream, server)),
                Err(e) => failed(server, &e, self.has_next(pool)),
            }
        }
        None
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
pub(crate) fn connect_result(stream: &TcpStream) -> Connect {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) if established_then_lost(&e) => return Connect::Lost(e),
        Ok(Some(e)) | Err(e) => return Connect::Failed(e),
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

    fn pool(n: u16) -> Pool {
        Pool::new(
            (1..=n)
                .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
                .collect(),
        )
    }

    #[test]
    fn a_round_tries_every_server_once_starting_round_robin() {
        let p = pool(3);
        let firsts: Vec<usize> = (0..4).map(|_| Round::new(&p).first % 3).collect();
        assert_eq!(firsts, [0, 1, 2, 0]);
        let r = Round {
            first: 2,
            started: 0,
        };
        let order: Vec<u16> = (0..3)
            .map(|a| p.server(r.first, a).unwrap().port())
            .collect();
        assert_eq!(order, [3, 1, 2]);
        assert!(p.server(r.first, 3).is_none());
    }

    #[test]
    fn has_next_is_false_on_the_last_server() {
        let p = pool(2);
        let mut r = Round::new(&p);
        assert!(r.has_next(&p));
        r.started = 1;
        assert!(r.has_next(&p));
        r.started = 2;
        assert!(!r.has_next(&p));
    }
}
