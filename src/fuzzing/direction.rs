//! One direction.

use std::io;

use crate::error::{Op, Side};
use crate::relay::direction::Pumped;
use crate::relay::{DirState, Direction, PUMP_BUDGET};

use super::checks::{check_books, check_error, check_waiting, close_direction};
use super::engine::{Discard, Engine, Step};

/// How a direction run starts.
#[derive(Clone, Debug, Default)]
pub(crate) struct DirSetup {
    pub(crate) capacity: Option<usize>,
    pub(crate) shutdown_fails: Option<io::ErrorKind>,
    /// The direction's source is the upstream (else the client).
    pub(crate) from_upstream: bool,
    /// After the script, let the source end and the destination accept
    /// everything, and require the direction to finish (liveness, no loss).
    pub(crate) settle: bool,
}

/// What the driver does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Queue an answer for `fill`.
    Fill(Step),
    /// Queue an answer for `drain`.
    Drain(Step),
    /// The source reports readable.
    Readable,
    /// The destination reports writable.
    Writable,
    /// Pump with this budget.
    Pump(u32),
}

/// How a run ended (read by the properties).
#[derive(Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct DirOutcome {
    pub(crate) state: DirState,
    pub(crate) pending: usize,
    pub(crate) filled: u64,
    pub(crate) drained: u64,
    pub(crate) shutdowns: usize,
    pub(crate) holding: bool,
    /// The error that ended the run and what the close did with the buffer.
    pub(crate) error: Option<(Side, Op, Discard)>,
    /// `settle` ran to the end: FIN forwarded, every byte written.
    pub(crate) finished: bool,
}

struct DirRun {
    d: Direction,
    io: Engine,
    from: Side,
    to: Side,
    error: Option<(Side, Op, Discard)>,
}

impl DirRun {
    /// Pumps once and checks everything; false once an error ended the run.
    fn pump(&mut self, budget: u32) -> bool {
        let state = self.d.state();
        let drained = self.io.drained;
        let calls = self.io.calls;
        let mut left = budget;
        match self.d.pump(&mut self.io, &mut left) {
            Ok(p) => {
                self.check_pumped(p, state, drained, calls, budget, left);
                true
            }
            Err(e) => {
                check_error(&e, self.from, self.to, &self.io);
                let done = close_direction(self.d.pending(), &mut self.io);
                self.error = Some((e.side, e.op, done));
                false
            }
        }
    }

    fn check_pumped(
        &self,
        p: Pumped,
        state: DirState,
        drained: u64,
        calls: u32,
        budget: u32,
        left: u32,
    ) {
        let used = self.io.calls - calls;
        assert!(left <= budget, "budget grew");
        assert_eq!(used, budget - left, "engine calls and budget used disagree");
        assert_eq!(
            p.moved as u64,
            self.io.drained - drained,
            "`moved` is not the bytes written"
        );
        assert_eq!(
            p.state_changed,
            self.d.state() != state,
            "`state_changed` is wrong"
        );
        check_books(&self.d, &self.io);
        if p.exhausted {
            assert_eq!(left, 0, "exhausted with budget left");
            assert!(self.d.has_work(), "exhausted with no work left");
        } else {
            check_waiting(&self.d, &self.io);
        }
        if state == DirState::Shut {
            assert_eq!(used, 0, "a shut direction still calls the engine");
        }
    }

    fn readable(&mut self) {
        self.io.readable_edge();
        self.d.source_readable();
    }

    fn writable(&mut self) {
        self.io.writable_edge();
        self.d.destination_writable();
    }

    /// The source ends and the destination takes everything; only owed edges
    /// are delivered. The direction must forward every byte and then FIN.
    fn settle(&mut self) -> bool {
        self.io.settle();
        let rounds = self.io.fills.len() + self.io.drains.len() + 8;
        for _ in 0..rounds {
            if self.d.state() == DirState::Shut {
                break;
            }
            let owed = self.io.fill_blocked || self.io.drain_blocked;
            if self.io.fill_blocked {
                self.readable();
            }
            if self.io.drain_blocked {
                self.writable();
            }
            let before = self.io.calls;
            if !self.pump(PUMP_BUDGET / 2) {
                return false;
            }
            assert!(
                owed || self.io.calls > before || self.d.state() == DirState::Shut,
                "the direction stalls: nothing owed and no progress"
            );
        }
        assert_eq!(
            self.d.state(),
            DirState::Shut,
            "did not finish once the source ended"
        );
        assert_eq!(
            self.io.drained, self.io.filled,
            "bytes lost: filled {} drained {}",
            self.io.filled, self.io.drained
        );
        true
    }
}

/// Runs `actions` against a fresh direction, checking every invariant after
/// every pump. Panics on a violation.
pub(crate) fn run_direction(setup: &DirSetup, actions: &[Action]) -> DirOutcome {
    let (from, to) = if setup.from_upstream {
        (Side::Upstream, Side::Client)
    } else {
        (Side::Client, Side::Upstream)
    };
    let mut run = DirRun {
        d: Direction::new(from, to),
        io: Engine {
            capacity: setup.capacity,
            shutdown_fails: setup.shutdown_fails,
            ..Engine::default()
        },
        from,
        to,
        error: None,
    };
    let mut alive = true;
    for action in actions {
        match *action {
            Action::Fill(step) => run.io.fills.push_back(step),
            Action::Drain(step) => run.io.drains.push_back(step),
            Action::Readable => run.readable(),
            Action::Writable => run.writable(),
            Action::Pump(budget) => alive = run.pump(budget),
        }
        if !alive {
            break;
        }
    }
    let mut finished = false;
    if alive && setup.settle {
        finished = run.settle();
    }
    DirOutcome {
        state: run.d.state(),
        pending: run.d.pending(),
        filled: run.io.filled,
        drained: run.io.drained,
        shutdowns: run.io.shutdowns,
        holding: run.io.holding,
        error: run.error,
        finished,
    }
}
