//! The scripted engine.

use std::collections::VecDeque;
use std::io;

use crate::engine::{Endpoints, FillError, Transfer};

/// One scripted answer of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Moves this many bytes (at least 1: real engines map 0 to EOF).
    Moved(usize),
    /// From `fill`: moves this many bytes and empties the source, which
    /// then owes a readable edge before more comes.
    MovedAll(usize),
    WouldBlock,
    /// From `fill`: the source sent FIN. From `drain`: write returned 0.
    Eof,
    Fail(io::ErrorKind),
}

/// The engine calls that can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Call {
    Fill,
    Drain,
    Shutdown,
}

/// What closing the relay did with a direction's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Discard {
    /// No buffer was held.
    Nothing,
    /// An empty buffer went back to the pool.
    Pooled,
    /// A buffer still holding bytes was closed, not pooled.
    Closed,
}

/// Error kinds the script may answer with.
pub(crate) const FAIL_KINDS: [io::ErrorKind; 5] = [
    io::ErrorKind::ConnectionReset,
    io::ErrorKind::BrokenPipe,
    io::ErrorKind::ConnectionAborted,
    io::ErrorKind::TimedOut,
    io::ErrorKind::NotConnected,
];

/// An engine that answers from scripts and checks what it is asked.
///
/// It panics on a call no real engine could see: a drain whose `pending`
/// differs from the bytes it buffers, a drain without a buffer or after FIN,
/// a fill after the source's EOF, FIN with bytes buffered or forwarded twice,
/// a release of a buffer that still holds bytes, any call after an error
/// ended the relay.
#[derive(Debug)]
pub(crate) struct Engine {
    pub(crate) fills: VecDeque<Step>,
    pub(crate) drains: VecDeque<Step>,
    /// The answers once a script runs out.
    pub(crate) fill_default: Step,
    pub(crate) drain_default: Step,
    /// `shutdown` fails with this, if set.
    pub(crate) shutdown_fails: Option<io::ErrorKind>,
    /// Buffer size: a fill into a full buffer says WouldBlock.
    pub(crate) capacity: Option<usize>,
    /// Bytes moved in by `fill` and out by `drain`, in all.
    pub(crate) filled: u64,
    pub(crate) drained: u64,
    /// Bytes in the buffer now.
    pub(crate) buffered: usize,
    /// A buffer is taken (by `fill`) and not yet released.
    pub(crate) holding: bool,
    pub(crate) releases: usize,
    /// `shutdown` calls, failed ones included.
    pub(crate) shutdowns: usize,
    pub(crate) source_eof: bool,
    /// `fill` and `drain` calls: what the budget counts.
    pub(crate) calls: u32,
    /// The last fill said WouldBlock with nothing buffered: the source owes
    /// a readable edge.
    pub(crate) fill_blocked: bool,
    /// The last drain said WouldBlock: the destination owes a writable edge.
    pub(crate) drain_blocked: bool,
    /// The error this engine returned (the relay is over).
    pub(crate) failed: Option<(Call, io::ErrorKind)>,
    /// Set when the relay closed.
    pub(crate) discarded: Option<Discard>,
}

impl Default for Engine {
    fn default() -> Engine {
        Engine {
            fills: VecDeque::new(),
            drains: VecDeque::new(),
            fill_default: Step::WouldBlock,
            drain_default: Step::WouldBlock,
            shutdown_fails: None,
            capacity: None,
            filled: 0,
            drained: 0,
            buffered: 0,
            holding: false,
            releases: 0,
            shutdowns: 0,
            source_eof: false,
            calls: 0,
            fill_blocked: false,
            drain_blocked: false,
            failed: None,
            discarded: None,
        }
    }
}

impl Engine {
    fn usable(&self, what: &str) {
        assert!(
            self.failed.is_none(),
            "{what} after the engine failed with {:?}: an error must end the relay",
            self.failed
        );
        assert!(self.discarded.is_none(), "{what} after the relay closed");
    }

    /// The relay closes: give the buffer back (pooled if empty, closed if it
    /// still holds bytes), as `Slot::discard` does with the direction's
    /// pending count.
    pub(crate) fn discard(&mut self, pending: usize) -> Discard {
        assert!(self.discarded.is_none(), "a direction was closed twice");
        assert_eq!(
            pending, self.buffered,
            "close sees {pending} pending but the buffer holds {}",
            self.buffered
        );
        assert!(
            pending == 0 || self.holding,
            "bytes pending without a buffer"
        );
        let done = match (self.holding, pending) {
            (false, _) => Discard::Nothing,
            (true, 0) => Discard::Pooled,
            (true, _) => Discard::Closed,
        };
        self.holding = false;
        self.discarded = Some(done);
        done
    }

    /// The source reported readable (an epoll edge).
    pub(super) fn readable_edge(&mut self) {
        self.fill_blocked = false;
    }

    /// The destination reported writable (an epoll edge).
    pub(super) fn writable_edge(&mut self) {
        self.drain_blocked = false;
    }

    /// From now on the source ends and the destination takes everything.
    pub(super) fn settle(&mut self) {
        self.fill_default = Step::Eof;
        self.drain_default = Step::Moved(usize::MAX);
    }
}

fn fail(engine: &mut Engine, call: Call, kind: io::ErrorKind) -> io::Error {
    engine.failed = Some((call, kind));
    kind.into()
}

impl Endpoints for Engine {
    fn fill(&mut self, pending: usize) -> Result<Transfer, FillError> {
        self.usable("fill");
        assert_eq!(pending, self.buffered, "pending count drifted (fill)");
        assert!(!self.source_eof, "fill after the source reported EOF");
        self.calls += 1;
        self.holding = true;
        let mut step = self.fills.pop_front().unwrap_or(self.fill_default);
        if let (Step::Moved(n) | Step::MovedAll(n), Some(cap)) = (step, self.capacity) {
            let room = cap.saturating_sub(self.buffered);
            step = match step {
                _ if room == 0 => Step::WouldBlock,
                Step::MovedAll(_) => Step::MovedAll(n.min(room)),
                _ => Step::Moved(n.min(room)),
            };
        }
        match step {
            Step::Moved(n) | Step::MovedAll(n) => {
                let n = n.max(1);
                self.buffered = self
                    .buffered
                    .checked_add(n)
                    .expect("buffered byte count overflows");
                self.filled += n as u64;
                let all = matches!(step, Step::MovedAll(_));
                // A source emptied by this read owes a readable edge.
                self.fill_blocked = all;
                Ok(if all {
                    Transfer::MovedAll(n)
                } else {
                    Transfer::Moved(n)
                })
            }
            Step::WouldBlock => {
                // With bytes buffered this may mean "full": no edge is owed.
                self.fill_blocked = self.buffered == 0;
                Ok(Transfer::WouldBlock)
            }
            Step::Eof => {
                self.source_eof = true;
                self.fill_blocked = false;
                Ok(Transfer::Eof)
            }
            Step::Fail(kind) => Err(fail(self, Call::Fill, kind).into()),
        }
    }

    fn drain(&mut self, pending: usize) -> io::Result<Transfer> {
        self.usable("drain");
        assert!(self.holding, "drain without a buffer");
        assert_eq!(
            pending, self.buffered,
            "drain asked for {pending} bytes but the buffer holds {}: pending count drifted",
            self.buffered
        );
        assert!(pending > 0, "drain with nothing pending");
        assert_eq!(self.shutdowns, 0, "write after FIN was forwarded");
        self.calls += 1;
        match self.drains.pop_front().unwrap_or(self.drain_default) {
            Step::Moved(n) | Step::MovedAll(n) => {
                let n = n.clamp(1, pending);
                self.buffered -= n;
                self.drained += n as u64;
                self.drain_blocked = false;
                Ok(Transfer::Moved(n))
            }
            Step::WouldBlock => {
                self.drain_blocked = true;
                Ok(Transfer::WouldBlock)
            }
            Step::Eof => {
                self.failed = Some((Call::Drain, io::ErrorKind::WriteZero));
                Ok(Transfer::Eof)
            }
            Step::Fail(kind) => Err(fail(self, Call::Drain, kind)),
        }
    }

    fn shutdown(&mut self) -> io::Result<()> {
        self.usable("shutdown");
        assert!(self.source_eof, "FIN forwarded before the source sent one");
        assert_eq!(self.buffered, 0, "FIN forwarded with bytes still pending");
        assert!(!self.holding, "FIN forwarded while a buffer is still held");
        self.shutdowns += 1;
        assert_eq!(self.shutdowns, 1, "FIN forwarded twice");
        match self.shutdown_fails {
            Some(kind) => Err(fail(self, Call::Shutdown, kind)),
            None => Ok(()),
        }
    }

    fn release(&mut self) {
        self.usable("release");
        assert_eq!(self.buffered, 0, "released a buffer still holding bytes");
        if self.holding {
            self.holding = false;
            self.releases += 1;
        }
    }
}

impl Endpoints for &mut Engine {
    fn fill(&mut self, pending: usize) -> Result<Transfer, FillError> {
        (**self).fill(pending)
    }
    fn drain(&mut self, pending: usize) -> io::Result<Transfer> {
        (**self).drain(pending)
    }
    fn shutdown(&mut self) -> io::Result<()> {
        (**self).shutdown()
    }
    fn release(&mut self) {
        (**self).release()
    }
}
