//! Turning a client away: every refusal of a client that has no relay (or
//! whose relay never connected) ends here, in [`Worker::turn_away`].
//!
//! A listener without a protocol lets the client go as it always did: a
//! reset for a refusal by the access lists or a limit, a close (FIN) when
//! no server took it. A `protocol = "postgres"` listener answers as a
//! PostgreSQL server that cannot take the client would: `N` to each
//! SSLRequest or GSSENCRequest, then, once the startup packet is whole, a
//! FATAL ErrorResponse whose SQLSTATE and message say why
//! ([`TurnAway::answer`]); then it shuts its side and reads the client's
//! bytes until EOF, so the close does not turn into a reset that would
//! throw the error away before the client read it.
//!
//! That exchange runs on the event loop like a relay: the socket is
//! registered under a farewell token and read and written until
//! WouldBlock. Each step is bounded: the startup packet must be whole
//! within the listener's `first-packet-timeout` (else the client is closed
//! without a word, as PostgreSQL closes one that never completes its
//! startup), the answer is a few hundred bytes, the wait for the client's
//! EOF lasts at most [`LINGER`] and reads at most [`LINGER_BYTES`], and a
//! worker holds at most [`MAX_FAREWELLS`] such clients; past that a client
//! is let go as a listener without a protocol would.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::Interest;
use slab::Slab;
use socket2::SockRef;

use super::Worker;
use crate::config::Protocol;
use crate::listener::{Listener, Refused};
use crate::pgwire::{self, Greeting, Heard, SqlState};
use crate::stats::CloseReason;
use crate::token;
use crate::upstream::eligible::Want;
use crate::upstream::Pool;

/// Refused clients one worker tells why at once; past it, the next are let
/// go without a word.
pub(super) const MAX_FAREWELLS: usize = 256;
/// How long a client that was told why has to close before it is closed.
pub(super) const LINGER: Duration = Duration::from_secs(2);
/// The most bytes read from a client after its answer before it is closed.
pub(super) const LINGER_BYTES: usize = 64 * 1024;

/// Why a client is turned away. The listener says how (see the module).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TurnAway {
    /// Refused by `allow`/`deny`.
    Denied,
    /// Its address already has `max-conns-per-source` relays.
    PerSource,
    /// No server of the pool takes relays in the role it wants; `waited`
    /// is how long the client was held for one first, if it was.
    NoServer { waited: Option<Duration> },
    /// Every server's connect failed.
    ConnectFailed,
    /// The proxy itself is short of file descriptors, socket buffers or
    /// memory.
    LocalShortage,
    /// Too many clients are held already (`max-queued`).
    QueueFull,
    /// The proxy is shutting down, or a reload removed the listener of a
    /// held client.
    Draining,
}

impl From<Refused> for TurnAway {
    fn from(refused: Refused) -> TurnAway {
        match refused {
            Refused::Denied => TurnAway::Denied,
            Refused::PerSource => TurnAway::PerSource,
        }
    }
}

impl TurnAway {
    /// The cause of a closing relay that never connected, if it is one a
    /// client can be told.
    pub(super) fn of_close(reason: CloseReason) -> Option<TurnAway> {
        match reason {
            CloseReason::NoServer => Some(TurnAway::NoServer { waited: None }),
            CloseReason::ConnectFailed => Some(TurnAway::ConnectFailed),
            CloseReason::LocalError => Some(TurnAway::LocalShortage),
            _ => None,
        }
    }

    /// Whether a listener without a protocol resets the client (a refusal
    /// by rule) rather than closing it with a FIN (nothing reached a
    /// server).
    pub(crate) fn resets(self) -> bool {
        match self {
            TurnAway::Denied | TurnAway::PerSource => true,
            TurnAway::NoServer { .. }
            | TurnAway::QueueFull
            | TurnAway::ConnectFailed
            | TurnAway::LocalShortage
            | TurnAway::Draining => false,
        }
    }

    /// The SQLSTATE and message a PostgreSQL client is told, naming the
    /// listener, the cause, and (for a limit) the client's address.
    pub(crate) fn answer(self, listener: &str, want: Want, client: IpAddr) -> (SqlState, String) {
        let client = client.to_canonical();
        match self {
            TurnAway::Denied => (
                SqlState::InvalidAuthorization,
                format!(
                    "spliced: connections from {client} are not allowed on listener {listener}"
                ),
            ),
            TurnAway::PerSource => (
                SqlState::TooManyConnections,
                format!("spliced: too many connections from {client} for listener {listener}"),
            ),
            TurnAway::NoServer { waited } => {
                let role = match want {
                    Want::Any => "server",
                    Want::Primary => "primary",
                    Want::Replica => "replica",
                    Want::PreferReplica => "replica or primary",
                };
                let after = waited.map_or(String::new(), |d| format!(" after {}", rounded(d)));
                (
                    SqlState::CannotConnectNow,
                    format!("spliced: no {role} for listener {listener}{after}"),
                )
            }
            TurnAway::ConnectFailed => (
                SqlState::CannotConnectNow,
                format!("spliced: no server reachable for listener {listener}"),
            ),
            TurnAway::LocalShortage => (
                SqlState::InsufficientResources,
                format!("spliced: out of file descriptors or memory for listener {listener}"),
            ),
            TurnAway::QueueFull => (
                SqlState::TooManyConnections,
                format!("spliced: too many clients waiting for listener {listener}"),
            ),
            TurnAway::Draining => (
                SqlState::CannotConnectNow,
                format!("spliced: shutting down, listener {listener} takes no new connections"),
            ),
        }
    }
}

/// A wait as a person reads it: `250ms`, `2.5s`, `10s`.
fn rounded(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        return format!("{}ms", d.as_millis());
    }
    let tenths = (d.as_millis() + 50) / 100;
    match tenths % 10 {
        0 => format!("{}s", tenths / 10),
        t => format!("{}.{t}s", tenths / 10),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading the client's first packets.
    Listening,
    /// Writing what is queued, then shutting the write side.
    Speaking,
    /// Reading (and dropping) what the client sends until its EOF.
    Lingering,
}

/// A refused PostgreSQL client being told why.
struct Farewell {
    client: TcpStream,
    client_addr: SocketAddr,
    greeting: Greeting,
    /// The ErrorResponse, queued once the startup packet is whole.
    error: Vec<u8>,
    /// Bytes queued for the client.
    out: Vec<u8>,
    phase: Phase,
    /// Bytes read while lingering.
    drained: usize,
    deadline: Instant,
}

/// What a step of a farewell left.
enum Step {
    /// Waiting for readiness or the deadline.
    Wait,
    /// Done: close the client.
    Done,
}

impl Farewell {
    /// Takes bytes the client sent: answers its encryption requests, and
    /// queues the error once its startup packet is whole. Bytes after that
    /// are dropped.
    fn hear(&mut self, mut bytes: &[u8]) {
        while self.phase == Phase::Listening && !bytes.is_empty() {
            let (used, heard) = self.greeting.feed(bytes);
            bytes = &bytes[used..];
            match heard {
                Heard::More => {}
                Heard::EncryptionRequest => self.out.push(b'N'),
                Heard::Startup => {
                    self.out.append(&mut self.error);
                    self.phase = Phase::Speaking;
                }
                // A cancel connection is closed without an answer.
                Heard::Cancel => self.phase = Phase::Speaking,
            }
        }
    }

    /// Writes, reads and moves on until the socket would block; never
    /// loops without progress (each turn moves bytes or changes phase).
    fn advance(&mut self, now: Instant) -> io::Result<Step> {
        let mut chunk = [0u8; 1024];
        loop {
            while !self.out.is_empty() {
                match (&self.client).write(&self.out) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        self.out.drain(..n);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Wait),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            match self.phase {
                Phase::Speaking => {
                    self.client.shutdown(Shutdown::Write)?;
                    self.phase = Phase::Lingering;
                    self.deadline = now + LINGER;
                }
                Phase::Listening | Phase::Lingering => match (&self.client).read(&mut chunk) {
                    // Before the answer: the client gave up. After: it
                    // read the answer and closed, as it should.
                    Ok(0) => return Ok(Step::Done),
                    Ok(n) if self.phase == Phase::Listening => self.hear(&chunk[..n]),
                    Ok(n) => {
                        self.drained += n;
                        if self.drained > LINGER_BYTES {
                            return Ok(Step::Done);
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Wait),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                },
            }
        }
    }
}

/// A worker's refused clients being told why.
#[derive(Default)]
pub(super) struct Farewells {
    entries: Slab<Farewell>,
    next: Option<Instant>,
}

impl Farewells {
    pub(super) fn next(&self) -> Option<Instant> {
        self.next
    }

    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Closes every client at once (the worker stops).
    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.next = None;
    }

    fn wake_by(&mut self, deadline: Instant) {
        self.next = Some(self.next.map_or(deadline, |n| n.min(deadline)));
    }
}

/// Lets a client go without a word: reset, or closed with a FIN.
pub(super) fn let_go(client: TcpStream, reset: bool) {
    if reset {
        // A failed setsockopt only means the socket is already gone.
        let _ = SockRef::from(&client).set_linger(Some(Duration::ZERO));
    }
    drop(client);
}

/// A client being turned away: its socket, which must not be registered
/// with the worker's poll, its address, and what was read from it already
/// (after any PROXY header).
pub(super) struct Leaving {
    pub(super) client: TcpStream,
    pub(super) client_addr: SocketAddr,
    pub(super) preread: Vec<u8>,
}

impl Worker {
    /// Turns a client away for `why`, as its listener (and, once a route
    /// chose it, `pool`) speaks (see the module). Counting and logging the
    /// refusal is the caller's. Returns whether the client is being told
    /// why (a PostgreSQL error follows).
    pub(super) fn turn_away(
        &mut self,
        leaving: Leaving,
        listener: &Listener,
        pool: Option<&Pool>,
        why: TurnAway,
        now: Instant,
    ) -> bool {
        let Leaving {
            client,
            client_addr,
            preread,
        } = leaving;
        if listener.config.protocol != Protocol::Postgres {
            let_go(client, why.resets());
            return false;
        }
        if self.farewells.entries.len() >= MAX_FAREWELLS {
            tracing::debug!(worker = self.index, client = %client_addr, "{MAX_FAREWELLS} refused clients are being told why already; this one is let go without a word");
            let_go(client, why.resets());
            return false;
        }
        // Before a route chose its pool, a client hears of no role.
        let want = pool.map_or(Want::Any, Pool::want);
        let (state, message) = why.answer(listener.label(), want, client_addr.ip());
        let mut farewell = Farewell {
            client,
            client_addr,
            greeting: Greeting::default(),
            error: pgwire::error_response(state, &message),
            out: Vec::new(),
            phase: Phase::Listening,
            drained: 0,
            deadline: now + listener.config.first_packet_timeout,
        };
        farewell.hear(&preread);
        let entry = self.farewells.entries.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut farewell.client,
            token::farewell(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            tracing::warn!(worker = self.index, client = %client_addr, error = %e, "internal: cannot register a refused client's socket; closing it");
            let_go(farewell.client, why.resets());
            return false;
        }
        let deadline = farewell.deadline;
        entry.insert(farewell);
        self.farewells.wake_by(deadline);
        // It may have sent already, and the answer may be due now.
        self.on_farewell_event(key, now);
        true
    }

    /// Readiness of a refused client being told why.
    pub(super) fn on_farewell_event(&mut self, key: usize, now: Instant) {
        let Some(farewell) = self.farewells.entries.get_mut(key) else {
            return;
        };
        match farewell.advance(now) {
            Ok(Step::Wait) => {
                let deadline = farewell.deadline;
                self.farewells.wake_by(deadline);
            }
            Ok(Step::Done) => {
                self.farewells.entries.remove(key);
            }
            Err(e) => {
                tracing::debug!(client = %farewell.client_addr, error = %e, "refused client failed while told why");
                self.farewells.entries.remove(key);
            }
        }
    }

    /// Closes the refused clients whose time is up: one that never sent a
    /// whole startup packet, one that did not close after its answer.
    pub(super) fn expire_farewells(&mut self, now: Instant) {
        if self.farewells.next.is_none_or(|t| t > now) {
            return;
        }
        self.farewells.entries.retain(|_, f| {
            if f.deadline > now {
                return true;
            }
            tracing::debug!(client = %f.client_addr, phase = ?f.phase, "refused client closed at its deadline");
            false
        });
        self.farewells.next = self.farewells.entries.iter().map(|(_, f)| f.deadline).min();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 7));

    #[test]
    fn each_cause_has_its_sqlstate_and_sentence() {
        let say = |why: TurnAway, want| {
            let (state, message) = why.answer("pg-rw", want, CLIENT);
            (state.code(), message)
        };
        let no_server = TurnAway::NoServer { waited: None };
        assert_eq!(
            say(no_server, Want::Primary),
            ("57P03", "spliced: no primary for listener pg-rw".into())
        );
        assert_eq!(
            say(no_server, Want::Replica).1,
            "spliced: no replica for listener pg-rw"
        );
        assert_eq!(
            say(no_server, Want::PreferReplica).1,
            "spliced: no replica or primary for listener pg-rw"
        );
        assert_eq!(
            say(no_server, Want::Any).1,
            "spliced: no server for listener pg-rw"
        );
        let waited = |d| TurnAway::NoServer { waited: Some(d) };
        assert_eq!(
            say(waited(Duration::from_secs(10)), Want::Primary).1,
            "spliced: no primary for listener pg-rw after 10s"
        );
        assert_eq!(
            say(waited(Duration::from_millis(2_460)), Want::Primary).1,
            "spliced: no primary for listener pg-rw after 2.5s"
        );
        assert_eq!(
            say(waited(Duration::from_millis(250)), Want::Primary).1,
            "spliced: no primary for listener pg-rw after 250ms"
        );
        assert_eq!(
            say(TurnAway::PerSource, Want::Any),
            (
                "53300",
                "spliced: too many connections from 10.0.0.7 for listener pg-rw".into()
            )
        );
        assert_eq!(
            say(TurnAway::Denied, Want::Any),
            (
                "28000",
                "spliced: connections from 10.0.0.7 are not allowed on listener pg-rw".into()
            )
        );
        assert_eq!(
            say(TurnAway::ConnectFailed, Want::Primary),
            (
                "57P03",
                "spliced: no server reachable for listener pg-rw".into()
            )
        );
        assert_eq!(say(TurnAway::LocalShortage, Want::Any).0, "53000");
        assert_eq!(say(TurnAway::QueueFull, Want::Any).0, "53300");
        assert_eq!(say(TurnAway::Draining, Want::Any).0, "57P03");
    }

    #[test]
    fn an_ipv4_client_on_a_dual_stack_socket_is_named_as_ipv4() {
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().unwrap();
        let (_, message) = TurnAway::PerSource.answer("pg", Want::Any, mapped);
        assert!(message.contains(" 10.0.0.7 "), "{message}");
    }

    #[test]
    fn without_a_protocol_limits_reset_and_the_rest_close() {
        for why in [TurnAway::Denied, TurnAway::PerSource] {
            assert!(why.resets(), "{why:?}");
        }
        // A client past max-queued was accepted to be held: it is closed as
        // any client no server took.
        for why in [
            TurnAway::QueueFull,
            TurnAway::NoServer { waited: None },
            TurnAway::ConnectFailed,
            TurnAway::LocalShortage,
            TurnAway::Draining,
        ] {
            assert!(!why.resets(), "{why:?}");
        }
    }

    #[test]
    fn only_closes_before_a_connect_are_told() {
        assert_eq!(
            TurnAway::of_close(CloseReason::NoServer),
            Some(TurnAway::NoServer { waited: None })
        );
        assert_eq!(
            TurnAway::of_close(CloseReason::ConnectFailed),
            Some(TurnAway::ConnectFailed)
        );
        assert_eq!(
            TurnAway::of_close(CloseReason::LocalError),
            Some(TurnAway::LocalShortage)
        );
        for reason in [
            CloseReason::Eof,
            CloseReason::Idle,
            CloseReason::ClientReset,
            CloseReason::Shutdown,
        ] {
            assert_eq!(TurnAway::of_close(reason), None);
        }
    }
}
