//! How the outside talks to running workers: commands flow down a channel
//! beside each worker's mio `Waker`; what workers share flows up through
//! [`Shared`]. Nothing here knows the worker or the proxy, so neither
//! imports the other.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpListener;
use mio::Waker;

use crate::engine::PipeFds;
use crate::listener::{Listener, ListenerId};
use crate::relay::report::{RelayReport, Reporter};
use crate::relay::HandedOff;
use crate::stats::CloseReason;

/// What a worker can be told.
pub(crate) enum Command {
    /// Stop accepting; let live relays finish within the drain timeout.
    Drain,
    /// Close every relay now and exit the loop.
    Abort,
    /// Relay this connected pair.
    Handoff(Box<Handoff>),
    /// Reset both sides of handed-off relay `id` now.
    AbortRelay { id: u64, reporter: Arc<Reporter> },
    /// Take a reloaded config's listeners.
    Reload(Box<WorkerReload>),
    /// Stop every relay that can be handed over and send them out, for a
    /// live upgrade's new process, with the count of those that may be
    /// later (clients still connecting or reading their first bytes).
    #[cfg(feature = "service")]
    FreezeRelays(Sender<(Vec<crate::relay::image::Outbound>, usize)>),
    /// The relays a freeze sent out, back: each handed over, resumed or
    /// reset.
    #[cfg(feature = "service")]
    EndFreeze(Vec<(crate::relay::Relay, Fate)>),
    /// Take relays another process froze (a live upgrade's new process);
    /// the answer says which could not be taken, and each one's pause.
    #[cfg(feature = "service")]
    AdoptRelays(Vec<crate::relay::image::Inbound>, Sender<Adopted>),
    /// Send a duplicate of every listening socket this worker accepts on,
    /// with its address, for a live upgrade's new process (only a build
    /// with the `service` feature upgrades).
    #[cfg_attr(not(feature = "service"), allow(dead_code))]
    ListeningSockets(Sender<crate::worker::ListeningSockets>),
}

/// What becomes of a relay a live upgrade froze.
#[cfg(feature = "service")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fate {
    /// The new process took it: let go without a trace.
    Handed,
    /// The upgrade failed before the new process could touch it: carry on.
    Resume,
    /// The new process ended after it may have moved the relay's bytes:
    /// nothing can tell what it left, so both sides are reset.
    Reset,
}

/// What a worker of a live upgrade's new process made of the relays it
/// was given.
#[cfg(feature = "service")]
#[derive(Debug, Default)]
pub(crate) struct Adopted {
    /// Relays not taken (their listener is gone, or no buffer could be
    /// had), by id, with why; their descriptors closed here untouched, so
    /// the old process can carry on with them.
    pub(crate) declined: Vec<(u64, String)>,
    /// Per relay taken, from its freeze to its registration here, in
    /// nanoseconds.
    pub(crate) pauses: Vec<u64>,
}

/// One worker's part of a reload, applied between two polls so no accept
/// sees half of it. Sockets are named by their bound address: a worker has
/// one socket per address.
#[derive(Default)]
pub(crate) struct WorkerReload {
    /// Kept sockets and the listener that accepts on them from now on
    /// (new settings, or a new owner of the address).
    pub(crate) retarget: Vec<(SocketAddr, Arc<Listener>)>,
    /// Sockets to stop accepting on; their queued clients are refused.
    pub(crate) close: Vec<SocketAddr>,
    /// Newly bound sockets, this worker's own.
    pub(crate) add: Vec<(TcpListener, Arc<Listener>)>,
    /// Listeners gone from the config: their live relays are closed at
    /// this deadline if still open (`None`: they may take as long as their
    /// own timeouts allow).
    pub(crate) retire: Vec<(ListenerId, Option<Instant>)>,
    /// Told once the worker has applied it (dropped unsent if it never
    /// will), so a reload returns only when new clients meet the new config.
    pub(crate) applied: Option<Sender<()>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Drain => f.write_str("Drain"),
            Command::Abort => f.write_str("Abort"),
            Command::Handoff(_) => f.write_str("Handoff"),
            Command::AbortRelay { id, .. } => write!(f, "AbortRelay({id})"),
            Command::ListeningSockets(_) => f.write_str("ListeningSockets"),
            #[cfg(feature = "service")]
            Command::FreezeRelays(_) => f.write_str("FreezeRelays"),
            #[cfg(feature = "service")]
            Command::EndFreeze(r) => write!(f, "EndFreeze({})", r.len()),
            #[cfg(feature = "service")]
            Command::AdoptRelays(r, _) => write!(f, "AdoptRelays({})", r.len()),
            Command::Reload(r) => write!(
                f,
                "Reload(retarget {}, close {}, add {}, retire {})",
                r.retarget.len(),
                r.close.len(),
                r.add.len(),
                r.retire.len()
            ),
        }
    }
}

/// A pair on its way to a worker. Should the worker exit before taking it,
/// dropping it resets both sockets and tells whoever waits that the runtime
/// stopped, so no waiter hangs.
pub(crate) struct Handoff {
    pair: Option<HandedOff>,
}

impl Handoff {
    pub(crate) fn new(pair: HandedOff) -> Handoff {
        Handoff { pair: Some(pair) }
    }

    /// The pair, for the worker that relays it.
    pub(crate) fn take(&mut self) -> Option<HandedOff> {
        self.pair.take()
    }

    /// The pair back, for a sender whose worker has exited.
    pub(crate) fn into_pair(mut self) -> Option<HandedOff> {
        self.pair.take()
    }
}

impl Drop for Handoff {
    fn drop(&mut self) {
        if let Some(pair) = self.pair.take() {
            // A pair no worker took is cut before a byte moved: no peer's
            // FIN reached the other, so both are reset, never sent a FIN.
            pair.client.reset_on_close();
            pair.upstream.reset_on_close();
            pair.reporter.finish(RelayReport {
                bytes_c2u: 0,
                bytes_u2c: 0,
                duration: std::time::Duration::ZERO,
                engine_c2u: "none",
                engine_u2c: "none",
                reason: CloseReason::Shutdown,
                error: None,
            });
        }
    }
}

/// State every worker reads and writes, shared with the proxy handle.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Relays alive in all workers, checked against the relay cap.
    pub(crate) relays_live: AtomicUsize,
    /// Every upstream server and its health.
    pub(crate) fleet: Arc<crate::upstream::Fleet>,
    /// The pipe fds all workers' pools hold, within the pipes' share of
    /// the fd limit.
    pub(crate) pipe_fds: Arc<PipeFds>,
}

impl Shared {
    /// Nothing live yet; pipes may hold at most `pipe_fds` fds.
    pub(crate) fn new(pipe_fds: usize, fleet: Arc<crate::upstream::Fleet>) -> Shared {
        Shared {
            relays_live: AtomicUsize::new(0),
            fleet,
            pipe_fds: Arc::new(PipeFds::new(pipe_fds)),
        }
    }
}

/// The sending end of one worker's command channel.
#[derive(Clone, Debug)]
pub(crate) struct WorkerLink {
    commands: Sender<Command>,
    waker: Arc<Waker>,
}

impl WorkerLink {
    /// Queues `command` and wakes the worker. Fails only when the worker
    /// has exited, which leaves nothing to tell it.
    pub(crate) fn send(&self, command: Command) -> io::Result<()> {
        self.try_send(command)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the worker has exited"))
    }

    /// Like [`send`](Self::send), but gives the command back when the
    /// worker has exited.
    pub(crate) fn try_send(&self, command: Command) -> Result<(), Command> {
        self.commands.send(command).map_err(|e| e.0)?;
        // Waking fails only if the poll is gone, i.e. the worker exited;
        // then the command is dropped with the channel.
        let _ = self.waker.wake();
        Ok(())
    }
}

/// A channel for one worker: the link for the outside, the receiver for
/// the worker (which owns the `Poll` the waker belongs to).
pub(crate) fn channel(waker: Arc<Waker>) -> (WorkerLink, Receiver<Command>) {
    let (commands, receiver) = mpsc::channel();
    (WorkerLink { commands, waker }, receiver)
}
