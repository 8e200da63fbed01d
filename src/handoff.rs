//! Handing two connected sockets to a running [`Runtime`].
//!
//! A program that accepted (or connected) two sockets and decided they
//! belong together hands both over and moves on; the runtime relays them
//! with exactly the proxy's relay: zero-copy splice where the kernel
//! allows it, half-close per direction, a reset answered with a reset, and
//! the idle and FIN deadlines. The returned [`Handoff`] reports the outcome
//! (blocking, polled, or as a future) and can abort the pair.
//!
//! ```
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//! use spliced::Runtime;
//!
//! let runtime = Runtime::builder().workers(1).start().unwrap();
//! // Two connected pairs: the program keeps one end of each.
//! let l = TcpListener::bind("127.0.0.1:0").unwrap();
//! let mut client = TcpStream::connect(l.local_addr().unwrap()).unwrap();
//! let (a, _) = l.accept().unwrap();
//! let mut server = TcpStream::connect(l.local_addr().unwrap()).unwrap();
//! let (b, _) = l.accept().unwrap();
//!
//! let pair = runtime.handoff(a, b).unwrap();
//! client.write_all(b"ping").unwrap();
//! client.shutdown(std::net::Shutdown::Write).unwrap();
//! let mut got = Vec::new();
//! server.read_to_end(&mut got).unwrap();
//! assert_eq!(got, b"ping");
//! drop(server);
//! let outcome = pair.wait();
//! assert_eq!(outcome.a_to_b, 4);
//! ```

use std::fmt;
use std::future::Future;
use std::io;
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use crate::control::{Command, Handoff as Queued, WorkerLink};
use crate::engine::Stream;
use crate::relay::report::Reporter;
use crate::relay::HandedOff;
use crate::runtime::Runtime;

mod outcome;

pub use outcome::{End, Ending, Outcome, PairError};

/// A connected stream socket a runtime can relay: TCP, or a Unix stream
/// socket (to a local PostgreSQL or Redis, say). A tokio stream converts
/// with `into_std()`.
///
/// ```
/// use std::os::unix::net::UnixStream;
/// use spliced::Socket;
///
/// let (local, _peer) = UnixStream::pair().unwrap();
/// assert!(matches!(Socket::from(local), Socket::Unix(_)));
/// ```
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl From<TcpStream> for Socket {
    fn from(s: TcpStream) -> Socket {
        Socket::Tcp(s)
    }
}

impl From<UnixStream> for Socket {
    fn from(s: UnixStream) -> Socket {
        Socket::Unix(s)
    }
}

impl Socket {
    fn into_stream(self) -> Result<Stream, (Socket, io::Error)> {
        let nonblocking = match &self {
            Socket::Tcp(s) => s.set_nonblocking(true),
            Socket::Unix(s) => s.set_nonblocking(true),
        };
        match (nonblocking, self) {
            (Err(e), socket) => Err((socket, e)),
            (Ok(()), Socket::Tcp(s)) => Ok(Stream::Tcp(mio::net::TcpStream::from_std(s))),
            (Ok(()), Socket::Unix(s)) => Ok(Stream::Unix(mio::net::UnixStream::from_std(s))),
        }
    }

    fn from_stream(stream: Stream) -> Socket {
        match stream {
            Stream::Tcp(s) => Socket::Tcp(s.into()),
            Stream::Unix(s) => Socket::Unix(s.into()),
        }
    }
}

/// Why a runtime did not take a pair.
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
/// use spliced::handoff::Refusal;
/// let too_much = vec![0u8; 1 << 20];
/// let err = runtime.handoff_with_read(a, too_much, b, Vec::new()).unwrap_err();
/// assert!(matches!(err.refusal, Refusal::ReadAheadTooLarge { .. }));
/// ```
#[derive(Debug)]
pub enum Refusal {
    /// The runtime is shutting down or has stopped.
    ShuttingDown,
    /// Read-ahead bytes larger than a copy buffer (`max` bytes).
    ReadAheadTooLarge { len: usize, max: usize },
    /// A socket could not be made non-blocking.
    Socket(End, io::Error),
}

/// A pair the runtime did not take, given back whole: both sockets (in
/// non-blocking mode) and the read-ahead bytes.
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
/// use spliced::Socket;
/// runtime.shutdown();
/// let err = runtime.handoff(a, b).unwrap_err();
/// eprintln!("{err}"); // handoff refused: the runtime is shutting down
/// let Socket::Tcp(a) = err.a else { unreachable!() };
/// a.set_nonblocking(false).unwrap();
/// (&a).write_all(b"still the program's").unwrap();
/// ```
#[derive(Debug)]
pub struct HandoffError {
    pub a: Socket,
    pub b: Socket,
    pub read_from_a: Vec<u8>,
    pub read_from_b: Vec<u8>,
    pub refusal: Refusal,
}

impl fmt::Display for HandoffError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.refusal {
            Refusal::ShuttingDown => f.write_str("handoff refused: the runtime is shutting down"),
            Refusal::ReadAheadTooLarge { len, max } => write!(
                f,
                "handoff refused: {len} read-ahead bytes exceed the {max}-byte copy buffer"
            ),
            Refusal::Socket(end, e) => {
                write!(
                    f,
                    "handoff refused: cannot make socket {end} non-blocking: {e}"
                )
            }
        }
    }
}

impl std::error::Error for HandoffError {}

/// A pair being relayed. Dropping the handle leaves the pair running.
///
/// `handoff(a, b)` and `handoff(b, a)` behave alike; only the names of
/// the byte counts swap.
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
/// let pair = runtime.handoff(b, a).unwrap(); // either order
/// server.write_all(b"hi").unwrap();
/// server.shutdown(Shutdown::Write).unwrap();
/// client.shutdown(Shutdown::Write).unwrap();
/// assert_eq!(pair.wait().a_to_b, 2); // from `b` above, the server's side
/// ```
pub struct Handoff {
    id: u64,
    reporter: Arc<Reporter>,
    link: WorkerLink,
}

impl fmt::Debug for Handoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handoff").field("id", &self.id).finish()
    }
}

impl Handoff {
    /// The relay id, as in the runtime's log lines.
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
    /// assert!(pair.id() > 0);
    /// ```
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Ends both directions at once with a reset to both sockets' peers.
    /// Only a peer that already has the other's FIN, after every byte,
    /// keeps its clean EOF (a reset would tell it the stream was cut).
    /// Does nothing if the pair has ended already.
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
    /// pair.abort();
    /// assert_eq!(pair.wait().ending, spliced::handoff::Ending::Aborted);
    /// let err = client.read(&mut [0u8; 8]).unwrap_err();
    /// assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset);
    /// ```
    pub fn abort(&self) {
        let command = Command::AbortRelay {
            id: self.id,
            reporter: Arc::clone(&self.reporter),
        };
        // A worker that has exited has closed the pair already.
        let _ = self.link.send(command);
    }

    /// Blocks until the pair has ended.
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
    /// drop((client, server)); // both peers close
    /// println!("{:?}", pair.wait());
    /// ```
    pub fn wait(&self) -> Outcome {
        Outcome::from_report(self.reporter.wait())
    }

    /// The outcome if the pair has ended, without blocking.
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
    /// assert!(pair.try_result().is_none()); // both peers still connected
    /// # drop((client, server)); pair.wait();
    /// ```
    pub fn try_result(&self) -> Option<Outcome> {
        self.reporter.try_report().map(Outcome::from_report)
    }

    /// A future of the outcome, for any executor (it needs no runtime of
    /// its own: the worker wakes the task when the pair ends).
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
    /// drop((client, server));
    /// let tokio = tokio::runtime::Builder::new_current_thread().build().unwrap();
    /// let outcome = tokio.block_on(pair.finished());
    /// assert_eq!(outcome.a_to_b, 0);
    /// ```
    pub fn finished(&self) -> Finished {
        Finished {
            reporter: Arc::clone(&self.reporter),
        }
    }
}

/// The outcome of a [`Handoff`] as a future; see [`Handoff::finished`].
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
/// let finished: spliced::handoff::Finished = runtime.handoff(a, b).unwrap().finished();
/// drop((client, server));
/// let tokio = tokio::runtime::Builder::new_current_thread().build().unwrap();
/// tokio.block_on(finished);
/// ```
#[derive(Debug)]
pub struct Finished {
    reporter: Arc<Reporter>,
}

impl Future for Finished {
    type Output = Outcome;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Outcome> {
        match self.reporter.poll_report(cx.waker()) {
            Some(report) => Poll::Ready(Outcome::from_report(report)),
            None => Poll::Pending,
        }
    }
}

impl Runtime {
    /// Relays two connected sockets until both sides have closed, and
    /// returns at once. See the [module docs](crate::handoff).
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
    /// client.write_all(b"ping").unwrap();
    /// let mut buf = [0u8; 4];
    /// server.read_exact(&mut buf).unwrap();
    /// assert_eq!(&buf, b"ping");
    /// ```
    pub fn handoff(
        &self,
        a: impl Into<Socket>,
        b: impl Into<Socket>,
    ) -> Result<Handoff, HandoffError> {
        self.handoff_with_read(a, Vec::new(), b, Vec::new())
    }

    /// Like [`handoff`](Self::handoff), for sockets the program already
    /// read from (a protocol header it peeked at, say): `read_from_a`
    /// reaches `b`, and `read_from_b` reaches `a`, before any byte relayed
    /// after them. Each may be at most the copy buffer size (64 KiB by
    /// default).
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
    /// client.write_all(b"HEADER rest").unwrap();
    /// let mut a = a;
    /// let mut header = [0u8; 7];
    /// a.read_exact(&mut header).unwrap(); // the program peeks at a header
    /// let pair = runtime.handoff_with_read(a, header.to_vec(), b, Vec::new()).unwrap();
    /// let mut got = [0u8; 11];
    /// server.read_exact(&mut got).unwrap();
    /// assert_eq!(&got, b"HEADER rest");
    /// ```
    pub fn handoff_with_read(
        &self,
        a: impl Into<Socket>,
        read_from_a: Vec<u8>,
        b: impl Into<Socket>,
        read_from_b: Vec<u8>,
    ) -> Result<Handoff, HandoffError> {
        let (a, b) = (a.into(), b.into());
        let refuse = |a, b, read_from_a, read_from_b, refusal| HandoffError {
            a,
            b,
            read_from_a,
            read_from_b,
            refusal,
        };
        if self.stopping.load(Ordering::Relaxed) {
            return Err(refuse(
                a,
                b,
                read_from_a,
                read_from_b,
                Refusal::ShuttingDown,
            ));
        }
        let max = self.copy_buffer_size;
        if let Some(len) = [read_from_a.len(), read_from_b.len()]
            .into_iter()
            .find(|&n| n > max)
        {
            let refusal = Refusal::ReadAheadTooLarge { len, max };
            return Err(refuse(a, b, read_from_a, read_from_b, refusal));
        }
        let a = match a.into_stream() {
            Ok(a) => a,
            Err((a, e)) => {
                return Err(refuse(
                    a,
                    b,
                    read_from_a,
                    read_from_b,
                    Refusal::Socket(End::A, e),
                ))
            }
        };
        let b = match b.into_stream() {
            Ok(b) => b,
            Err((b, e)) => {
                let a = Socket::from_stream(a);
                return Err(refuse(
                    a,
                    b,
                    read_from_a,
                    read_from_b,
                    Refusal::Socket(End::B, e),
                ));
            }
        };
        for s in [&a, &b] {
            s.set_nodelay();
        }
        let Some(admission) = self.handoff_listener.admit_handoff() else {
            // The handoff settings set no max-conns; this is only defence.
            let (a, b) = (Socket::from_stream(a), Socket::from_stream(b));
            return Err(refuse(
                a,
                b,
                read_from_a,
                read_from_b,
                Refusal::ShuttingDown,
            ));
        };
        let reporter = Arc::new(Reporter::default());
        let id = crate::worker::next_relay_id();
        let pair = HandedOff {
            id,
            listener: Arc::clone(&self.handoff_listener),
            client: a,
            upstream: b,
            client_preread: read_from_a,
            upstream_preread: read_from_b,
            reporter: Arc::clone(&reporter),
            admission,
        };
        let link = self.next_link();
        match link.try_send(Command::Handoff(Box::new(Queued::new(pair)))) {
            Ok(()) => Ok(Handoff {
                id,
                reporter,
                link: link.clone(),
            }),
            Err(Command::Handoff(queued)) => match queued.into_pair() {
                Some(pair) => Err(refuse(
                    Socket::from_stream(pair.client),
                    Socket::from_stream(pair.upstream),
                    pair.client_preread,
                    pair.upstream_preread,
                    Refusal::ShuttingDown,
                )),
                None => unreachable!("a queued pair is taken only by its worker"),
            },
            Err(_) => unreachable!("try_send gives back the command it was given"),
        }
    }
}
