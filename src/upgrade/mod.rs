//! Binary upgrade: a running instance starts a new binary and hands it
//! every listening socket and every live relay, with the bytes in flight,
//! so no client is refused and no relay ends.
//!
//! # How it goes
//!
//! 1. **Start.** The old process (asked by `spliced upgrade`, through the
//!    instance's control socket, or by SIGUSR2) makes a `SOCK_SEQPACKET`
//!    Unix socket pair and starts the new binary: the path given
//!    (`--binary`), else the path this process was started from, read
//!    from disk afresh. The child gets the same command line and one end of
//!    the pair, inherited, its number in `SPLICED_UPGRADE_FD`.
//! 2. **Listeners.** The old process sends a duplicate of every listening
//!    socket (every worker's, so no accept queue is orphaned) with its
//!    address. The child starts as `spliced run` does, reading the config
//!    file afresh, but a listener address it has a socket for uses those
//!    sockets instead of binding (the socket-activation path, `Inherited`).
//!    Both processes may accept for a moment; clients that arrive later
//!    wait in the kernel's backlog. The child answers `ready`, or `refused`
//!    with the reason (a config it rejects, a snapshot format it does not
//!    read) and exits.
//! 3. **Freeze and hand.** Each old worker stops accepting and gives up
//!    every connected relay: its sockets leave the epoll set first, then
//!    the relay leaves the worker whole. The old process sends the relays
//!    in batches, each within `SCM_MAX_FD` (253) descriptors and each
//!    acknowledged: both sockets, each non-empty pipe (both ends; empty
//!    buffers are not passed), a memory file with a copy buffer's unsent
//!    bytes, and the relay's state (`relay::frozen::RelayState`): id,
//!    listener name, addresses, per direction its state, pending bytes,
//!    counts and engine, and its times as CLOCK_MONOTONIC nanoseconds so
//!    deadlines carry on unchanged. The receiver's control buffer has room
//!    for 253 descriptors and a truncated one (`MSG_CTRUNC`) is an error;
//!    it raised RLIMIT_NOFILE at start, as every start does.
//!
//!    Relays still connecting to their server, or still reading a client's
//!    first packet, are not handed in the middle of that: freezing repeats
//!    every few milliseconds, for up to two seconds, and takes each one
//!    once it is connected. What is left then stays in the old process,
//!    which relays it to its end while it drains (as a shutdown would).
//! 4. **Commit.** Once every batch is acknowledged the old process says how
//!    many relays it sent; the child confirms it holds them all, the old
//!    process commits, and only then does the child register and pump them.
//!    Until that point nothing has moved a byte of a handed relay in the
//!    child, so on any failure (the binary missing, not starting, refusing
//!    the config, another snapshot format, dying or timing out before it
//!    confirms) the old process kills the child, takes every relay back
//!    into its workers (registered again, pumped at once) and accepts
//!    again; `spliced upgrade` exits non-zero with the reason. After the
//!    commit the old process closes its copies of the descriptors (which
//!    ends nothing: the child holds the same sockets and pipes), drains
//!    whatever it kept and exits. The child then writes the pid file,
//!    publishes its stats file under the instance's name, takes the
//!    control socket, and tells systemd `MAINPID=` and `READY=1`.
//!
//! A relay's pause is measured from the moment the old worker froze it to
//! the moment the new worker has registered and pumped it once.
//!
//! # The wire format
//!
//! Each message is one packet: the magic `SPUP`, the snapshot format
//! version as a little-endian `u32` ([`FORMAT`]), then one JSON
//! [`Message`]. A reader checks the magic and version before anything
//! else; a binary that reads another version says so and refuses.
//! Descriptors travel as `SCM_RIGHTS` with the message that names them, in
//! the order the message lists them.

pub mod control;
mod new;
mod old;

pub use new::{Incoming, TakeOver};
pub use old::{UpgradeError, UpgradeReport, Upgrader};

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};

use crate::relay::frozen::RelayState;
use crate::sys::fdpass;

/// The snapshot format this binary writes and reads.
pub const FORMAT: u32 = 1;
const MAGIC: &[u8; 4] = b"SPUP";
/// The environment variable naming the inherited socket's descriptor.
pub const FD_ENV: &str = "SPLICED_UPGRADE_FD";
/// A test-only fault for the upgrade path (see `Incoming::from_env`).
pub const FAULT_ENV: &str = "SPLICED_UPGRADE_FAULT";
/// The largest message either side reads.
const MAX_MESSAGE: usize = 256 * 1024;
/// Descriptors per batch: `SCM_MAX_FD` less room for one more relay's.
const BATCH_FDS: usize = fdpass::SCM_MAX_FD - 6;
/// Relays per batch, whatever their descriptors, to keep messages small.
const BATCH_RELAYS: usize = 64;

/// One message between the old process and the new one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub(crate) enum Message {
    /// Old → new: listening sockets, one descriptor per address listed.
    Listeners {
        addrs: Vec<std::net::SocketAddr>,
        last: bool,
    },
    /// New → old: serving with the sockets; relays may come.
    Ready { pid: u32 },
    /// New → old: the new process will not take over, and why.
    Refused { reason: String },
    /// Old → new: relays, their descriptors in order.
    Relays { relays: Vec<RelayState> },
    /// New → old: a batch of this many relays is held.
    Ack { relays: usize },
    /// Old → new: that was every relay, this many in all.
    Done { relays: usize },
    /// New → old: this many relays are held, none resumed yet.
    Holding { relays: usize },
    /// Old → new: they are yours; resume them.
    Commit,
    /// New → old: resumed, with the pauses measured.
    Resumed {
        relays: usize,
        p50_ns: u64,
        p99_ns: u64,
        max_ns: u64,
    },
}

/// Why a message could not be read.
#[derive(Debug)]
pub(crate) enum WireError {
    Io(io::Error),
    /// The peer closed its end.
    Closed,
    /// Not a message of this protocol.
    Garbled(String),
    /// Another snapshot format version.
    Version(u32),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Io(e) if e.kind() == io::ErrorKind::WouldBlock => {
                f.write_str("timed out waiting for the other process")
            }
            WireError::Io(e) => write!(f, "{e}"),
            WireError::Closed => f.write_str("the other process closed the upgrade socket"),
            WireError::Garbled(what) => write!(f, "not an upgrade message: {what}"),
            WireError::Version(v) => write!(
                f,
                "the other binary speaks snapshot format {v}; this one reads format {FORMAT}"
            ),
        }
    }
}

pub(crate) fn send(socket: BorrowedFd<'_>, message: &Message, fds: &[RawFd]) -> io::Result<()> {
    let mut bytes = Vec::with_capacity(256);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&FORMAT.to_le_bytes());
    serde_json::to_writer(&mut bytes, message).map_err(io::Error::other)?;
    fdpass::send_with_fds(socket, &bytes, fds)
}

pub(crate) fn recv(socket: BorrowedFd<'_>) -> Result<(Message, Vec<OwnedFd>), WireError> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let (n, fds) = fdpass::recv_with_fds(socket.as_fd(), &mut buf)
        .map_err(WireError::Io)?
        .ok_or(WireError::Closed)?;
    let bytes = &buf[..n];
    if n < 8 || &bytes[..4] != MAGIC {
        return Err(WireError::Garbled(format!("{n} bytes without the magic")));
    }
    let version = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
    if version != FORMAT {
        return Err(WireError::Version(version));
    }
    let message =
        serde_json::from_slice(&bytes[8..]).map_err(|e| WireError::Garbled(e.to_string()))?;
    Ok((message, fds))
}

/// The nearest-rank percentile `p` (0..=100) of sorted `values`.
pub(crate) fn percentile(sorted: &[u64], p: u64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() as u64 * p).div_ceil(100).max(1) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_their_format_and_are_checked_first() {
        let (a, b) = fdpass::seqpacket_pair().unwrap();
        send(a.as_fd(), &Message::Ready { pid: 7 }, &[]).unwrap();
        assert!(matches!(
            recv(b.as_fd()).unwrap().0,
            Message::Ready { pid: 7 }
        ));
        let mut older = Vec::from(*MAGIC);
        older.extend_from_slice(&0u32.to_le_bytes());
        older.extend_from_slice(b"{\"kind\":\"commit\"}");
        fdpass::send_with_fds(a.as_fd(), &older, &[]).unwrap();
        match recv(b.as_fd()) {
            Err(e @ WireError::Version(0)) => {
                assert!(e.to_string().contains("format 0"), "{e}")
            }
            other => panic!("{other:?}"),
        }
        fdpass::send_with_fds(a.as_fd(), b"hello", &[]).unwrap();
        assert!(matches!(recv(b.as_fd()), Err(WireError::Garbled(_))));
        drop(a);
        assert!(matches!(recv(b.as_fd()), Err(WireError::Closed)));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&v, 50), 50);
        assert_eq!(percentile(&v, 99), 99);
        assert_eq!(percentile(&v, 100), 100);
        assert_eq!(percentile(&[5], 99), 5);
        assert_eq!(percentile(&[], 99), 0);
    }
}
