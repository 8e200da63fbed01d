//! How the outside talks to running workers: commands flow down a channel
//! beside each worker's mio `Waker`; what workers share flows up through
//! [`Shared`]. Nothing here knows the worker or the proxy, so neither
//! imports the other.

use std::io;
use std::sync::atomic::AtomicUsize;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::Arc;

use mio::Waker;

/// What a worker can be told. Reload, hand-off of a connected pair and
/// health updates join here.
#[derive(Debug)]
pub(crate) enum Command {
    /// Stop accepting; let live relays finish within the drain timeout.
    Drain,
    /// Close every relay now and exit the loop.
    Abort,
}

/// State every worker reads and writes, shared with the proxy handle.
#[derive(Debug, Default)]
pub(crate) struct Shared {
    /// Relays alive in all workers, checked against the relay cap.
    pub(crate) relays_live: AtomicUsize,
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
        self.commands
            .send(command)
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the worker has exited"))?;
        self.waker.wake()
    }
}

/// A channel for one worker: the link for the outside, the receiver for
/// the worker (which owns the `Poll` the waker belongs to).
pub(crate) fn channel(waker: Arc<Waker>) -> (WorkerLink, Receiver<Command>) {
    let (commands, receiver) = mpsc::channel();
    (WorkerLink { commands, waker }, receiver)
}
