//! Errors that say which side failed and doing what.

use std::fmt;
use std::io;

use crate::config::ConfigError;

/// Which end of a relay an error came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Upstream,
    /// The proxy itself (pipes, buffers, the event loop).
    Internal,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        })
    }
}

/// The operation that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    Shutdown,
    Connect,
    Register,
    /// Taking a pipe or copy buffer for a direction.
    Buffer,
    /// Handing the relay to a live upgrade's new process.
    Upgrade,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Shutdown => "shutdown",
            Op::Connect => "connect",
            Op::Register => "register",
            Op::Buffer => "buffer",
            Op::Upgrade => "upgrade",
        })
    }
}

/// A failed I/O operation inside a relay.
#[derive(Debug)]
pub struct RelayError {
    pub side: Side,
    pub op: Op,
    pub source: io::Error,
}

impl RelayError {
    pub fn new(side: Side, op: Op, source: io::Error) -> Self {
        RelayError { side, op, source }
    }

    /// A copy for a report that outlives the relay (`io::Error` is not
    /// `Clone`): the same side and operation, and an error with the same
    /// OS code, or else the same kind and text.
    pub(crate) fn duplicate(&self) -> RelayError {
        let source = match self.source.raw_os_error() {
            Some(code) => io::Error::from_raw_os_error(code),
            None => io::Error::new(self.source.kind(), self.source.to_string()),
        };
        RelayError::new(self.side, self.op, source)
    }
}

impl fmt::Display for RelayError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} failed: {}", self.side, self.op, self.source)
    }
}

impl std::error::Error for RelayError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// Whether `e` is the proxy's own shortage (out of fds, socket buffers or
/// memory), not anything a peer did: every server would fail the same way
/// now, so none is blamed for it.
pub(crate) fn is_local_error(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

/// Why the proxy could not start. Each variant prints as one line.
#[derive(Debug)]
pub enum StartError {
    Config(ConfigError),
    /// Binding a listener failed (address in use, permission, bad address).
    Listen(std::net::SocketAddr, io::Error),
    /// An upstream is one of this proxy's own listen addresses: every relay
    /// to it would open another relay.
    Loop(std::net::SocketAddr),
    /// Any other setup step, named by the string.
    Io(String, io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Config(e) => write!(f, "bad configuration: {e}"),
            StartError::Listen(addr, e) => write!(f, "cannot listen on {addr}: {e}"),
            StartError::Loop(addr) => write!(
                f,
                "upstream {addr} is this proxy's own listen address (a loop)"
            ),
            StartError::Io(what, e) => write!(f, "cannot {what}: {e}"),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Config(e) => Some(e),
            StartError::Listen(_, e) | StartError::Io(_, e) => Some(e),
            StartError::Loop(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_proxys_own_shortages_are_local_errors() {
        for errno in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(
                is_local_error(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for errno in [
            libc::ECONNREFUSED,
            libc::EHOSTUNREACH,
            libc::ENETUNREACH,
            libc::ETIMEDOUT,
            libc::ECONNRESET,
            libc::EADDRNOTAVAIL,
        ] {
            assert!(
                !is_local_error(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        assert!(!is_local_error(&io::Error::new(
            io::ErrorKind::TimedOut,
            "connect timed out"
        )));
    }
}
