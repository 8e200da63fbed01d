//! What a handed-off pair did: its byte counts and engines, why it
//! ended, and the failure of an end that ended it.

use std::fmt;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Op, RelayError, Side};
use crate::relay::report::RelayReport;
use crate::stats::CloseReason;

/// One of the two sockets of a pair, in the order they were handed over.
///
/// ```
/// # use std::io::{Read, Write};
/// # use std::net::{Shutdown, TcpListener, TcpStream};
/// # let runtime = spliced::Runtime::builder().workers(1).start().unwrap();
/// # let l = TcpListener::bind("127.0.0.1:0").unwrap();
/// # let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
/// # let (a, _) = l.accept().unwrap();
/// # let mut server = TcpStream::connect(l.local_addr().unwrap()).unwrap();
/// # let (b, _) = l.accept().unwrap();
/// use spliced::handoff::{End, Ending};
/// let pair = runtime.handoff(a, b).unwrap();
/// server.write_all(b"x").unwrap();
/// # socket2::SockRef::from(&server).set_linger(Some(std::time::Duration::ZERO)).unwrap();
/// drop(server); // b's peer resets
/// let outcome = pair.wait();
/// assert_eq!(outcome.ending, Ending::Reset(End::B));
/// assert_eq!(outcome.error.unwrap().end, End::B);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum End {
    A,
    B,
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            End::A => "a",
            End::B => "b",
        })
    }
}

/// Why a handed-off pair ended.
///
/// ```
/// # use std::io::{Read, Write};
/// # use std::net::{Shutdown, TcpListener, TcpStream};
/// # let runtime = spliced::Runtime::builder().workers(1).start().unwrap();
/// # let l = TcpListener::bind("127.0.0.1:0").unwrap();
/// # let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
/// # let (a, _) = l.accept().unwrap();
/// # let mut server = TcpStream::connect(l.local_addr().unwrap()).unwrap();
/// # let (b, _) = l.accept().unwrap();
/// use spliced::handoff::Ending;
/// let pair = runtime.handoff(a, b).unwrap();
/// client.shutdown(Shutdown::Write).unwrap();
/// server.shutdown(Shutdown::Write).unwrap();
/// assert_eq!(pair.wait().ending, Ending::Completed);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Both sides sent FIN and every byte was delivered.
    Completed,
    /// No byte moved either way for the idle timeout.
    IdleTimeout,
    /// After a FIN, the pair was inactive for the FIN timeout.
    FinTimeout,
    /// This side reset the connection or failed; the other was reset.
    Reset(End),
    /// [`Handoff::abort`](super::Handoff::abort) ended the pair; each
    /// side whose peer had not finished was reset.
    Aborted,
    /// The runtime shut down (its drain timeout ran out, or it stopped
    /// before the pair was taken); each side whose peer had not finished
    /// was reset.
    Shutdown,
    /// The runtime itself failed (no buffer could be had); both sides were
    /// reset.
    Internal,
}

/// What a handed-off pair did.
///
/// ```
/// # use std::io::{Read, Write};
/// # use std::net::{Shutdown, TcpListener, TcpStream};
/// # let runtime = spliced::Runtime::builder().workers(1).start().unwrap();
/// # let l = TcpListener::bind("127.0.0.1:0").unwrap();
/// # let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
/// # let (a, _) = l.accept().unwrap();
/// # let mut server = TcpStream::connect(l.local_addr().unwrap()).unwrap();
/// # let (b, _) = l.accept().unwrap();
/// let pair = runtime.handoff(a, b).unwrap();
/// client.write_all(b"hello").unwrap();
/// client.shutdown(Shutdown::Write).unwrap();
/// server.shutdown(Shutdown::Write).unwrap();
/// let outcome = pair.wait();
/// assert_eq!((outcome.a_to_b, outcome.b_to_a), (5, 0));
/// assert!(["splice", "copy"].contains(&outcome.engine_a_to_b));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// Bytes delivered to `b` from `a` (read-ahead bytes included).
    pub a_to_b: u64,
    /// Bytes delivered to `a` from `b` (read-ahead bytes included).
    pub b_to_a: u64,
    pub duration: Duration,
    /// The engine each direction ended with: `splice`, `copy`, or
    /// `copy-fallback` (splice was refused or no pipe could be had).
    pub engine_a_to_b: &'static str,
    pub engine_b_to_a: &'static str,
    pub ending: Ending,
    /// The failure that ended the pair, if one of its ends failed: which
    /// end, the operation and the error (`read failed: Connection reset by
    /// peer`). A failure of the runtime itself ends the pair as
    /// [`Ending::Internal`] with no error here.
    pub error: Option<PairError>,
}

impl Outcome {
    pub(super) fn from_report(r: RelayReport) -> Outcome {
        let end = |side: Side| match side {
            Side::Client => Some(End::A),
            Side::Upstream => Some(End::B),
            Side::Internal => None,
        };
        let ending = match r.reason {
            CloseReason::Eof => Ending::Completed,
            CloseReason::Idle => Ending::IdleTimeout,
            CloseReason::FinTimeout => Ending::FinTimeout,
            CloseReason::ClientReset => Ending::Reset(End::A),
            CloseReason::UpstreamReset => Ending::Reset(End::B),
            CloseReason::Aborted => Ending::Aborted,
            CloseReason::Shutdown => Ending::Shutdown,
            CloseReason::Internal
            | CloseReason::ConnectFailed
            | CloseReason::NoServer
            | CloseReason::LocalError
            | CloseReason::ServerDown => Ending::Internal,
        };
        Outcome {
            a_to_b: r.bytes_c2u,
            b_to_a: r.bytes_u2c,
            duration: r.duration,
            engine_a_to_b: r.engine_c2u,
            engine_b_to_a: r.engine_u2c,
            ending,
            error: r.error.and_then(|e| {
                end(e.side).map(|end| PairError {
                    end,
                    op: e.op,
                    error: e,
                })
            }),
        }
    }
}

/// The failure of one end that ended a pair.
#[derive(Clone, Debug)]
pub struct PairError {
    /// The end whose socket failed.
    pub end: End,
    /// What was done with it: read, write, shutdown.
    pub op: Op,
    error: Arc<RelayError>,
}

impl PairError {
    /// The OS error.
    pub fn io_error(&self) -> &io::Error {
        &self.error.source
    }
}

impl fmt::Display for PairError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} failed: {}", self.op, self.error.source)
    }
}

impl std::error::Error for PairError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error.source)
    }
}

/// Equal when the end, the operation and the error's kind, code and text
/// are.
impl PartialEq for PairError {
    fn eq(&self, other: &PairError) -> bool {
        let (a, b) = (self.io_error(), other.io_error());
        self.end == other.end
            && self.op == other.op
            && a.kind() == b.kind()
            && a.raw_os_error() == b.raw_os_error()
            && a.to_string() == b.to_string()
    }
}

impl Eq for PairError {}
