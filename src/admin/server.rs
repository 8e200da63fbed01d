//! The admin event loop: one thread, one mio `Poll`, a slab of at most
//! [`ADMIN_MAX_CONNECTIONS`] connections, each with its own deadline.
//!
//! Nothing here blocks: a connection that cannot go on waits for its next
//! readiness event or its deadline, and the others are served meanwhile.
//! Past the bound, a new connection takes the place of the one that has been
//! quiet longest (no byte in or out), so clients that open connections and
//! hold them cannot lock a liveness probe out.

use std::collections::VecDeque;
use std::io::{self, ErrorKind};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use slab::Slab;

use super::conn::{Conn, Turn};
use super::http::{Head, Response};
use crate::ops::ADMIN_MAX_CONNECTIONS;

pub(super) const LISTENER: Token = Token(usize::MAX - 1);
pub(super) const WAKER: Token = Token(usize::MAX - 2);

/// Most connections accepted per loop turn, so a flood of connects takes
/// turns with the connections already held.
const ACCEPTS_PER_TURN: usize = 64;

struct Entry {
    stream: TcpStream,
    conn: Conn,
}

pub(super) struct Server<A> {
    poll: Poll,
    listener: TcpListener,
    conns: Slab<Entry>,
    answer: A,
    stopping: Arc<AtomicBool>,
    /// Connections with work left from their last turn.
    again: VecDeque<usize>,
    /// Whether the listener may have more connections waiting.
    accept_again: bool,
}

impl<A: FnMut(&Head<'_>) -> Response> Server<A> {
    /// `listener` must be registered with `poll` under [`LISTENER`].
    pub(super) fn new(
        poll: Poll,
        listener: TcpListener,
        answer: A,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        Server {
            poll,
            listener,
            conns: Slab::with_capacity(ADMIN_MAX_CONNECTIONS),
            answer,
            stopping,
            again: VecDeque::new(),
            accept_again: false,
        }
    }

    /// Serves until `stopping` is set (and the waker woken).
    pub(super) fn run(mut self) {
        let mut events = Events::with_capacity(256);
        let mut ready = Vec::new();
        while !self.stopping.load(Ordering::Acquire) {
            let timeout = self.timeout(Instant::now());
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == ErrorKind::Interrupted {
                    continue;
                }
                tracing::error!(error = %e, "admin: the event loop failed; the admin endpoint stops");
                return;
            }
            let now = Instant::now();
            ready.clear();
            ready.extend(self.again.drain(..));
            for event in events.iter() {
                match event.token() {
                    LISTENER => self.accept_again = true,
                    WAKER => {}
                    Token(key) => ready.push(key),
                }
            }
            for &key in &ready {
                self.turn(key, now);
            }
            if self.accept_again {
                self.accept(now);
            }
            self.expire(now);
        }
    }

    /// How long the next poll may wait: not at all with work left, else
    /// until the nearest deadline.
    fn timeout(&self, now: Instant) -> Option<Duration> {
        if self.accept_again || !self.again.is_empty() {
            return Some(Duration::ZERO);
        }
        self.conns
            .iter()
            .map(|(_, e)| e.conn.deadline())
            .min()
            // Round up, so that the deadline has passed on waking.
            .map(|d| d.saturating_duration_since(now) + Duration::from_millis(1))
    }

    fn turn(&mut self, key: usize, now: Instant) {
        let Some(entry) = self.conns.get_mut(key) else {
            return;
        };
        match entry.conn.turn(&mut entry.stream, now, &mut self.answer) {
            Turn::Wait => {}
            Turn::Again => {
                if !self.again.contains(&key) {
                    self.again.push_back(key);
                }
            }
            Turn::Close => self.close(key),
        }
    }

    fn accept(&mut self, now: Instant) {
        for _ in 0..ACCEPTS_PER_TURN {
            let mut stream = match self.listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.accept_again = false;
                    return;
                }
                Err(e) if transient(&e) => continue,
                Err(e) => {
                    // Out of fds or memory: the next connection's readiness
                    // tries again; retrying now would spin.
                    tracing::debug!(error = %e, "admin: accept failed");
                    self.accept_again = false;
                    return;
                }
            };
            if self.conns.len() >= ADMIN_MAX_CONNECTIONS {
                self.make_room();
            }
            let entry = self.conns.vacant_entry();
            let key = entry.key();
            if let Err(e) = self.poll.registry().register(
                &mut stream,
                Token(key),
                Interest::READABLE | Interest::WRITABLE,
            ) {
                tracing::debug!(error = %e, "admin: register a connection");
                continue;
            }
            let _ = stream.set_nodelay(true);
            entry.insert(Entry {
                stream,
                conn: Conn::new(now),
            });
            // The request may be there already.
            self.turn(key, now);
        }
        // More may be waiting: accept again after serving the others.
    }

    /// Closes the connection that has been quiet longest.
    fn make_room(&mut self) {
        let quietest = self
            .conns
            .iter()
            .min_by_key(|(_, e)| e.conn.last_progress())
            .map(|(key, _)| key);
        if let Some(key) = quietest {
            tracing::debug!(
                "admin: {ADMIN_MAX_CONNECTIONS} connections held; closing the quietest"
            );
            self.close(key);
        }
    }

    fn expire(&mut self, now: Instant) {
        let late: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.deadline() <= now)
            .map(|(key, _)| key)
            .collect();
        for key in late {
            self.close(key);
        }
    }

    fn close(&mut self, key: usize) {
        if let Some(mut entry) = self.conns.try_remove(key) {
            let _ = self.poll.registry().deregister(&mut entry.stream);
            self.again.retain(|&k| k != key);
        }
    }
}

/// Accept errors about one connection that went away before it was taken.
fn transient(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::Interrupted
    )
}
