//! A relay taken apart for a binary upgrade, and put together again in the
//! new process: its state as plain data ([`RelayState`], serialised by the
//! upgrade), and its descriptors in a fixed order beside it.
//!
//! Descriptors, in order: the client socket, the upstream socket, then for
//! the client→upstream direction and then the upstream→client one, what its
//! buffer needs: a pipe's read and write ends ([`Held::Pipe`]), or one
//! memory file holding a copy buffer's unsent bytes ([`Held::Bytes`]).
//! A direction with nothing pending passes no buffer (its empty one stays
//! behind and goes back to the old process's pool with it).
//!
//! Times cross as CLOCK_MONOTONIC nanoseconds, one clock for every process
//! of the host, so idle and FIN deadlines fire in the new process as if no
//! upgrade had happened.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::core::{Activity, RelayCore};
use super::direction::{DirState, Direction};
use super::{Peer, Relay};
use crate::engine::{Buffer, Engine, Pools, Slot, Stream};
use crate::error::Side;
use crate::listener::{Admission, Listener};
use crate::sys::{fdpass, Pipe};
use crate::upstream::Round;

/// One relay as it crosses to the new process.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RelayState {
    pub id: u64,
    /// The listener it was accepted by, by name.
    pub listener: String,
    pub client_addr: Option<SocketAddr>,
    pub upstream_addr: Option<SocketAddr>,
    pub client_unix: bool,
    pub upstream_unix: bool,
    pub c2u: DirectionState,
    pub u2c: DirectionState,
    pub started_ns: u64,
    pub last_active_ns: u64,
    pub half_closed: bool,
    /// When the old process stopped pumping it.
    pub frozen_ns: u64,
}

/// One direction as it crosses.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DirectionState {
    /// `open`, `source-eof` or `shut`.
    pub state: String,
    pub pending: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// `splice` or `copy`.
    pub engine: String,
    pub fell_back: bool,
    pub spliced_any: bool,
    pub auto: bool,
    pub held: Held,
}

/// What a direction's pending bytes travel in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Held {
    /// Nothing pending.
    Nothing,
    /// A pipe of this capacity (two descriptors).
    Pipe { capacity: usize },
    /// A memory file with the bytes (one descriptor).
    Bytes,
}

impl Held {
    /// Descriptors this buffer takes.
    pub fn fds(self) -> usize {
        match self {
            Held::Nothing => 0,
            Held::Pipe { .. } => 2,
            Held::Bytes => 1,
        }
    }
}

impl RelayState {
    /// Descriptors that go with this relay.
    pub fn fds(&self) -> usize {
        2 + self.c2u.held.fds() + self.u2c.held.fds()
    }
}

/// A relay's state and its descriptors, on their way into a worker.
#[derive(Debug)]
pub(crate) struct Parcel {
    pub(crate) state: RelayState,
    pub(crate) fds: Vec<OwnedFd>,
}

/// A monotonic nanosecond time for an `Instant`, given one pair of both
/// taken together.
fn to_ns(at: Instant, now: Instant, now_ns: u64) -> u64 {
    now_ns.saturating_sub(now.saturating_duration_since(at).as_nanos() as u64)
}

fn from_ns(ns: u64, now: Instant, now_ns: u64) -> Instant {
    let ago = Duration::from_nanos(now_ns.saturating_sub(ns));
    now.checked_sub(ago).unwrap_or(now)
}

fn state_name(s: DirState) -> &'static str {
    match s {
        DirState::Open => "open",
        DirState::SourceEof => "source-eof",
        DirState::Shut => "shut",
    }
}

fn parse_state(s: &str) -> io::Result<DirState> {
    match s {
        "open" => Ok(DirState::Open),
        "source-eof" => Ok(DirState::SourceEof),
        "shut" => Ok(DirState::Shut),
        other => Err(bad(format!("unknown direction state {other:?}"))),
    }
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Relay {
    /// Whether this relay can be handed over now: connected, and nobody in
    /// this process waits for its end (a pair handed to the library).
    pub(crate) fn transferable(&self) -> bool {
        !self.core.is_connecting() && self.reporter.is_none()
    }

    /// The relay's state and the descriptors to pass with it (borrowed
    /// from the relay, which stays whole here until the new process has
    /// taken it), plus memory files made for copy buffers' bytes (to keep
    /// open until sent).
    pub(crate) fn export(
        &self,
        frozen_ns: u64,
        now: Instant,
        now_ns: u64,
    ) -> io::Result<(RelayState, Vec<RawFd>, Vec<OwnedFd>)> {
        let mut fds = vec![
            self.client.as_fd().as_raw_fd(),
            self.upstream.as_fd().as_raw_fd(),
        ];
        let mut made = Vec::new();
        let mut direction = |from: Peer| -> io::Result<DirectionState> {
            let (state, pending, bytes_in, bytes_out) = self.core.direction(from).parts();
            let slot = match from {
                Peer::Client => &self.c2u_slot,
                Peer::Upstream => &self.u2c_slot,
            };
            let (engine, fell_back, spliced_any, auto, buffer) = slot.parts();
            let held = match buffer {
                _ if pending == 0 => Held::Nothing,
                Some(Buffer::Pipe(pipe)) => {
                    fds.push(pipe.pipe().read_end().as_raw_fd());
                    fds.push(pipe.pipe().write_end().as_raw_fd());
                    Held::Pipe {
                        capacity: pipe.capacity(),
                    }
                }
                Some(Buffer::Mapped(heap)) => {
                    let unsent = heap.unsent();
                    if unsent.len() != pending {
                        return Err(io::Error::other(format!(
                            "relay {}: {} bytes buffered, {pending} counted",
                            self.id,
                            unsent.len()
                        )));
                    }
                    let memfd = fdpass::memfd_with(unsent)?;
                    fds.push(memfd.as_raw_fd());
                    made.push(memfd);
                    Held::Bytes
                }
                None => {
                    return Err(io::Error::other(format!(
                        "relay {}: {pending} bytes counted with no buffer",
                        self.id
                    )))
                }
            };
            Ok(DirectionState {
                state: state_name(state).into(),
                pending,
                bytes_in,
                bytes_out,
                engine: engine.as_str().into(),
                fell_back,
                spliced_any,
                auto,
                held,
            })
        };
        let c2u = direction(Peer::Client)?;
        let u2c = direction(Peer::Upstream)?;
        let activity = self.core.activity();
        let state = RelayState {
            id: self.id,
            listener: self.listener.config.name.clone(),
            client_addr: self.client_addr,
            upstream_addr: self.upstream_addr,
            client_unix: self.client.as_tcp().is_none(),
            upstream_unix: self.upstream.as_tcp().is_none(),
            c2u,
            u2c,
            started_ns: to_ns(activity.started, now, now_ns),
            last_active_ns: to_ns(activity.last_active, now, now_ns),
            half_closed: activity.half_closed,
            frozen_ns,
        };
        Ok((state, fds, made))
    }

    /// The relay again, in this process: its sockets, buffers (pipes
    /// adopted by `pools`, bytes in a copy buffer) and state, counted under
    /// `listener` (past its `max-conns` if need be: the client is here
    /// already).
    pub(crate) fn resume(
        parcel: Parcel,
        listener: Arc<Listener>,
        pools: &mut Pools,
        now: Instant,
        now_ns: u64,
    ) -> io::Result<Relay> {
        let Parcel { state, fds } = parcel;
        if fds.len() != state.fds() {
            return Err(bad(format!(
                "relay {}: {} descriptors for {} expected",
                state.id,
                fds.len(),
                state.fds()
            )));
        }
        let mut fds = fds.into_iter();
        let mut next = || fds.next().ok_or_else(|| bad("too few descriptors".into()));
        let stream = |fd: OwnedFd, unix: bool| {
            if unix {
                Stream::Unix(mio::net::UnixStream::from_std(fd.into()))
            } else {
                Stream::Tcp(mio::net::TcpStream::from_std(fd.into()))
            }
        };
        let client = stream(next()?, state.client_unix);
        let upstream = stream(next()?, state.upstream_unix);
        let mut buffer = |d: &DirectionState| -> io::Result<Option<Buffer>> {
            Ok(match d.held {
                Held::Nothing => None,
                Held::Pipe { capacity } => {
                    let read = next()?;
                    let write = next()?;
                    Some(pools.adopt_pipe(Pipe::from_ends(read, write), capacity))
                }
                Held::Bytes => {
                    let bytes = fdpass::read_memfd(next()?, d.pending)?;
                    Some(pools.adopt_bytes(&bytes)?)
                }
            })
        };
        let c2u_buffer = buffer(&state.c2u)?;
        let u2c_buffer = buffer(&state.u2c)?;
        let slot = |d: &DirectionState, buffer| -> io::Result<Slot> {
            let engine = match d.engine.as_str() {
                "splice" => Engine::Splice,
                "copy" => Engine::Copy,
                other => return Err(bad(format!("unknown engine {other:?}"))),
            };
            Ok(Slot::resumed(
                engine,
                d.fell_back,
                d.spliced_any,
                d.auto,
                buffer,
            ))
        };
        let direction = |d: &DirectionState, from, to| -> io::Result<Direction> {
            let parts = (parse_state(&d.state)?, d.pending, d.bytes_in, d.bytes_out);
            Ok(Direction::resumed(from, to, parts))
        };
        let activity = Activity {
            started: from_ns(state.started_ns, now, now_ns),
            last_active: from_ns(state.last_active_ns, now, now_ns),
            connecting_since: None,
            half_closed: state.half_closed,
        };
        let core = RelayCore::resumed(
            direction(&state.c2u, Side::Client, Side::Upstream)?,
            direction(&state.u2c, Side::Upstream, Side::Client)?,
            activity,
        );
        Ok(Relay {
            id: state.id,
            client,
            upstream,
            upstream_addr: state.upstream_addr,
            client_addr: state.client_addr,
            progress_at: None,
            round: Round::empty(),
            server: None,
            _admission: Admission::carried_over(&listener),
            listener,
            core,
            armed_at: None,
            queued: false,
            c2u_slot: slot(&state.c2u, c2u_buffer)?,
            u2c_slot: slot(&state.u2c, u2c_buffer)?,
            reporter: None,
            // Only connected relays are handed over: nothing is ahead of
            // the client's bytes and no refusal can follow any more.
            ahead_header: 0,
            first_bytes: Box::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_cross_as_monotonic_nanoseconds() {
        let now = Instant::now();
        let now_ns = fdpass::monotonic_ns();
        let earlier = now - Duration::from_millis(1500);
        let ns = to_ns(earlier, now, now_ns);
        assert_eq!(now_ns - ns, 1_500_000_000);
        // Read back half a second later in "another process".
        let later = now + Duration::from_millis(500);
        let back = from_ns(ns, later, now_ns + 500_000_000);
        assert_eq!(back, earlier);
    }

    #[test]
    fn direction_states_round_trip() {
        for s in [DirState::Open, DirState::SourceEof, DirState::Shut] {
            assert_eq!(parse_state(state_name(s)).unwrap(), s);
        }
        assert!(parse_state("closing").is_err());
    }
}
