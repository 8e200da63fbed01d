//! Entry points for fuzz targets (cargo-fuzz) and property tests: drives the
//! pure state machines with scripted engines. Not a stable API.
//!
//! Each `pub fn` takes arbitrary bytes, decodes them into a script and panics
//! as soon as an invariant breaks: a panic is a fuzz finding. The drivers and
//! the scripted [`Engine`] are also what the proptest properties in
//! `relay::props` run. docs/reliability/fuzzing.md lists every invariant.
//!
//! The scripted engine answers each `fill`/`drain` from a queue of [`Step`]s
//! (then from a default answer) and keeps its own books: bytes in and out,
//! bytes buffered, whether it holds a buffer, how often FIN was forwarded, and
//! whether the direction owes it a readiness edge. The checks compare those
//! books with what the [`Direction`] believes.

use std::collections::VecDeque;
use std::io;
use std::time::{Duration, Instant};

use crate::config::{parse_duration, parse_size, Mode, Timeouts};
use crate::engine::{Endpoints, Transfer};
use crate::error::{Op, RelayError, Side};
use crate::relay::direction::Pumped;
use crate::relay::{pump_pair, Activity, DirState, Direction, Expiry, Next, PairIo, PUMP_BUDGET};

/// Fuzz target `direction`: one [`Direction`] driven by a scripted engine.
pub fn direction_script(data: &[u8]) {
    let (setup, actions) = decode_direction(data);
    run_direction(&setup, &actions);
}

/// Fuzz target `relay_pair`: both directions through `pump_pair`, with the
/// relay's [`Activity`] bookkeeping and a clock.
pub fn pair_script(data: &[u8]) {
    let (setup, actions) = decode_pair(data);
    run_pair(&setup, &actions);
}

/// Fuzz target `config`: the duration and size parsers against reference
/// implementations, and their round trips.
pub fn config_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_duration_text(&text);
    check_size_text(&text);
    check_mode_text(&text);
    if data.len() >= 9 {
        let mut n = [0u8; 8];
        n.copy_from_slice(&data[..8]);
        let n = u64::from_le_bytes(n);
        // Small numbers matter more than huge ones: shift some of them down.
        let n = n >> (data[8] % 64);
        check_duration_number(n);
        check_size_number(n);
    }
}

// ---------------------------------------------------------------------------
// The scripted engine

/// One scripted answer of the engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Moves this many bytes (at least 1: real engines map 0 to EOF).
    Moved(usize),
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
    fn readable_edge(&mut self) {
        self.fill_blocked = false;
    }

    /// The destination reported writable (an epoll edge).
    fn writable_edge(&mut self) {
        self.drain_blocked = false;
    }

    /// From now on the source ends and the destination takes everything.
    fn settle(&mut self) {
        self.fill_default = Step::Eof;
        self.drain_default = Step::Moved(usize::MAX);
    }
}

fn fail(engine: &mut Engine, call: Call, kind: io::ErrorKind) -> io::Error {
    engine.failed = Some((call, kind));
    kind.into()
}

impl Endpoints for Engine {
    fn fill(&mut self) -> io::Result<Transfer> {
        self.usable("fill");
        assert!(!self.source_eof, "fill after the source reported EOF");
        self.calls += 1;
        self.holding = true;
        let mut step = self.fills.pop_front().unwrap_or(self.fill_default);
        if let (Step::Moved(n), Some(cap)) = (step, self.capacity) {
            let room = cap.saturating_sub(self.buffered);
            step = if room == 0 {
                Step::WouldBlock
            } else {
                Step::Moved(n.min(room))
            };
        }
        match step {
            Step::Moved(n) => {
                let n = n.max(1);
                self.buffered = self
                    .buffered
                    .checked_add(n)
                    .expect("buffered byte count overflows");
                self.filled += n as u64;
                self.fill_blocked = false;
                Ok(Transfer::Moved(n))
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
            Step::Fail(kind) => Err(fail(self, Call::Fill, kind)),
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
            Step::Moved(n) => {
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
    fn fill(&mut self) -> io::Result<Transfer> {
        (**self).fill()
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

// ---------------------------------------------------------------------------
// Checks shared by both drivers

/// What a direction and its engine must agree on after every successful pump.
pub(crate) fn check_books(d: &Direction, io: &Engine) {
    assert!(
        io.failed.is_none(),
        "the engine failed ({:?}) but the pump returned Ok",
        io.failed
    );
    assert!(
        io.drained <= io.filled,
        "bytes out ({}) exceed bytes in ({})",
        io.drained,
        io.filled
    );
    assert_eq!(
        d.bytes_out(),
        io.drained,
        "bytes_out differs from the bytes the engine wrote"
    );
    assert_eq!(
        d.pending(),
        io.buffered,
        "pending differs from the bytes buffered"
    );
    assert_eq!(
        d.pending() as u64,
        io.filled - io.drained,
        "pending is not bytes in minus bytes out"
    );
    if d.pending() == 0 {
        assert!(
            !io.holding,
            "nothing pending but a buffer is still held (no release)"
        );
    } else {
        assert!(io.holding, "bytes pending without a buffer");
    }
    match d.state() {
        DirState::Open => {
            assert!(!io.source_eof, "the source's EOF was not recorded");
            assert_eq!(io.shutdowns, 0, "FIN forwarded while the source is open");
        }
        DirState::SourceEof => {
            assert!(io.source_eof, "SourceEof without an EOF from the source");
            assert_eq!(io.shutdowns, 0, "FIN forwarded but the state is SourceEof");
            assert!(
                d.pending() > 0,
                "source ended and nothing pending, yet FIN not forwarded"
            );
        }
        DirState::Shut => {
            assert!(io.source_eof, "Shut without an EOF from the source");
            assert_eq!(
                io.shutdowns, 1,
                "Shut but FIN forwarded {} times",
                io.shutdowns
            );
            assert_eq!(d.pending(), 0, "Shut with bytes pending");
        }
    }
}

/// A direction that stops without running out of budget must be waiting for
/// an edge the kernel owes it: otherwise the relay stalls for good under
/// edge-triggered epoll.
pub(crate) fn check_waiting(d: &Direction, io: &Engine) {
    if d.pending() > 0 {
        assert!(
            io.drain_blocked,
            "stopped with {} bytes pending but the destination never said WouldBlock: lost wakeup",
            d.pending()
        );
    }
    if d.state() == DirState::Open && d.pending() == 0 {
        assert!(
            io.fill_blocked,
            "stopped with an open, empty source that never said WouldBlock: lost wakeup"
        );
    }
    assert!(
        !(d.state() == DirState::SourceEof && d.pending() == 0),
        "stopped with the source ended and nothing pending, FIN not forwarded"
    );
}

/// The error a failed pump returned must name the engine call that failed.
pub(crate) fn check_error(e: &RelayError, from: Side, to: Side, io: &Engine) {
    let (call, kind) = io
        .failed
        .expect("the pump failed but the engine returned no error");
    let expected = match call {
        Call::Fill => (from, Op::Read),
        Call::Drain => (to, Op::Write),
        Call::Shutdown => (to, Op::Shutdown),
    };
    assert_eq!(
        (e.side, e.op),
        expected,
        "error attributed to the wrong side or operation"
    );
    assert_eq!(e.source.kind(), kind, "error kind changed on the way up");
}

/// The direction's part of the relay close after an error: the buffer goes
/// back (pooled only if empty); nothing stays held.
fn close_direction(d: &Direction, io: &mut Engine) -> Discard {
    let done = io.discard(d.pending());
    assert!(!io.holding);
    if d.pending() > 0 {
        assert_eq!(
            done,
            Discard::Closed,
            "a buffer holding bytes went back to the pool"
        );
    }
    done
}

// ---------------------------------------------------------------------------
// One direction

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
                let done = close_direction(&self.d, &mut self.io);
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

// ---------------------------------------------------------------------------
// Both directions: pump_pair and Activity

/// The two directions' engines, as `pump_pair` wants them.
#[derive(Debug, Default)]
pub(crate) struct PairEngines {
    pub(crate) c2u: Engine,
    pub(crate) u2c: Engine,
}

impl PairEngines {
    pub(crate) fn of(&mut self, from: Side) -> &mut Engine {
        match from {
            Side::Client => &mut self.c2u,
            _ => &mut self.u2c,
        }
    }
}

impl PairIo for PairEngines {
    type Io<'a>
        = &'a mut Engine
    where
        Self: 'a;

    fn io(&mut self, from: Side) -> &mut Engine {
        self.of(from)
    }
}

/// How a pair run starts.
#[derive(Clone, Debug, Default)]
pub(crate) struct PairSetup {
    pub(crate) timeouts: Timeouts,
    pub(crate) capacity: Option<usize>,
    pub(crate) shutdown_fails: Option<io::ErrorKind>,
    pub(crate) settle: bool,
}

/// What the pair driver does next. `Side` names a direction by its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PairAction {
    Fill(Side, Step),
    Drain(Side, Step),
    /// Readiness reported for one socket (readable, writable), routed as
    /// `Relay::ready` does.
    Ready(Side, bool, bool),
    Pump,
    /// The clock moves on this many milliseconds; an expired deadline
    /// closes the relay.
    Tick(u64),
}

/// How a pair run ended (read by the properties).
#[derive(Debug)]
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct PairOutcome {
    pub(crate) error: Option<(Side, Op)>,
    pub(crate) expired: Option<Expiry>,
    pub(crate) finished: bool,
    pub(crate) filled: [u64; 2],
    pub(crate) drained: [u64; 2],
    pub(crate) discards: [Option<Discard>; 2],
    pub(crate) pumps: usize,
}

struct PairRun {
    c2u: Direction,
    u2c: Direction,
    io: PairEngines,
    activity: Activity,
    timeouts: Timeouts,
    now: Instant,
    error: Option<(Side, Op)>,
    expired: Option<Expiry>,
    finished: bool,
    pumps: usize,
}

impl PairRun {
    fn over(&self) -> bool {
        self.error.is_some() || self.expired.is_some() || self.finished
    }

    /// Both directions forwarded FIN: the worker closes the relay, which
    /// must find no buffer held.
    fn finish(&mut self) {
        for e in [&self.io.c2u, &self.io.u2c] {
            assert_eq!(e.drained, e.filled, "bytes lost");
        }
        self.close();
        for e in [&self.io.c2u, &self.io.u2c] {
            assert_eq!(
                e.discarded,
                Some(Discard::Nothing),
                "a finished relay still held a buffer"
            );
        }
        self.finished = true;
    }

    /// Closes both directions (what `Relay::close` does with the buffers).
    fn close(&mut self) {
        close_direction(&self.c2u, &mut self.io.c2u);
        close_direction(&self.u2c, &mut self.io.u2c);
    }

    fn ready(&mut self, side: Side, readable: bool, writable: bool) {
        let other = match side {
            Side::Client => Side::Upstream,
            _ => Side::Client,
        };
        if readable {
            self.io.of(side).readable_edge();
            self.dir(side).source_readable();
        }
        if writable {
            // The socket's writable bit belongs to the direction toward it.
            self.io.of(other).writable_edge();
            self.dir(other).destination_writable();
        }
    }

    fn dir(&mut self, from: Side) -> &mut Direction {
        match from {
            Side::Client => &mut self.c2u,
            _ => &mut self.u2c,
        }
    }

    /// One `pump_pair` and the relay's bookkeeping (`Relay::pump`), checked.
    fn pump(&mut self) -> Option<Next> {
        self.pumps += 1;
        let states = [self.c2u.state(), self.u2c.state()];
        let drained = [self.io.c2u.drained, self.io.u2c.drained];
        let calls = [self.io.c2u.calls, self.io.u2c.calls];
        let deadline = self.activity.deadline(&self.timeouts);
        let result = pump_pair(&mut self.c2u, &mut self.u2c, &mut self.io);
        let used = [self.io.c2u.calls - calls[0], self.io.u2c.calls - calls[1]];
        for u in used {
            assert!(
                u <= PUMP_BUDGET / 2,
                "a direction used {u} calls, over half the budget"
            );
        }
        let p = match result {
            Ok(p) => p,
            Err(e) => {
                match (self.io.c2u.failed, self.io.u2c.failed) {
                    (Some(_), None) => {
                        check_error(&e, Side::Client, Side::Upstream, &self.io.c2u);
                        assert_eq!(used[1], 0, "the other direction ran after an error");
                    }
                    (None, Some(_)) => {
                        check_books(&self.c2u, &self.io.c2u);
                        check_error(&e, Side::Upstream, Side::Client, &self.io.u2c);
                    }
                    other => panic!("pump_pair failed with {e} but the engines say {other:?}"),
                }
                // The caller closes (and resets) both sides: the relay is over.
                self.close();
                self.error = Some((e.side, e.op));
                return None;
            }
        };
        for (d, io) in [(&self.c2u, &self.io.c2u), (&self.u2c, &self.io.u2c)] {
            check_books(d, io);
        }
        let moved = (self.io.c2u.drained - drained[0]) + (self.io.u2c.drained - drained[1]);
        assert_eq!(p.moved as u64, moved, "`moved` is not the bytes written");
        let changed = self.c2u.state() != states[0] || self.u2c.state() != states[1];
        assert_eq!(p.state_changed, changed, "`state_changed` is wrong");
        let both_shut = self.c2u.state() == DirState::Shut && self.u2c.state() == DirState::Shut;
        assert_eq!(
            p.next == Next::Finished,
            both_shut,
            "Finished iff both directions forwarded FIN"
        );
        // Liveness: a direction that did not spend its whole budget with work
        // left waits for an edge it is owed. (Spending it all on a last drain
        // that said WouldBlock reports Wait although a fill was skipped: see
        // relay::props::exhausted_means_budget_out_with_work_left. The fill
        // is only deferred to the owed writable edge, so Wait is accepted.)
        let mut any_exhausted = false;
        for (d, io, u) in [
            (&self.c2u, &self.io.c2u, used[0]),
            (&self.u2c, &self.io.u2c, used[1]),
        ] {
            let exhausted = u == PUMP_BUDGET / 2 && d.has_work();
            any_exhausted |= exhausted;
            if !exhausted || p.next == Next::Wait {
                check_waiting(d, io);
            }
        }
        if p.next == Next::Again {
            assert!(
                any_exhausted,
                "Again without a direction out of budget with work left"
            );
        }
        // Relay::pump's bookkeeping.
        if p.moved > 0 {
            self.activity.last_active = self.now;
        }
        if p.state_changed {
            self.activity.half_closed = true;
        }
        let half = self.c2u.state() != DirState::Open || self.u2c.state() != DirState::Open;
        assert_eq!(
            self.activity.half_closed, half,
            "half_closed disagrees with the directions"
        );
        self.check_deadline(deadline, p.moved > 0 && !p.state_changed);
        Some(p.next)
    }

    /// The deadline never precedes the last transfer, a fresh transfer puts
    /// it in the future, and a transfer alone never moves it earlier.
    fn check_deadline(&self, before: Option<(Instant, Expiry)>, transfer_only: bool) {
        let after = self.activity.deadline(&self.timeouts);
        if let Some((at, _)) = after {
            assert!(
                at >= self.activity.last_active,
                "deadline before the last transfer"
            );
            if self.activity.last_active == self.now {
                assert!(
                    at > self.now,
                    "a relay that just moved bytes is already expired"
                );
            }
        }
        if transfer_only {
            assert_eq!(
                before.is_some(),
                after.is_some(),
                "a transfer toggled the deadline"
            );
            if let (Some((b, _)), Some((a, _))) = (before, after) {
                assert!(a >= b, "a transfer moved the deadline earlier");
            }
        }
        check_expiry(&self.activity, &self.timeouts, self.now);
    }

    fn tick(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        check_expiry(&self.activity, &self.timeouts, self.now);
        if let Some(e) = self.activity.expired(&self.timeouts, self.now) {
            self.close();
            self.expired = Some(e);
        }
    }

    /// Both sources end, both destinations take everything, only owed edges
    /// are delivered: the relay must finish with every byte written.
    fn settle(&mut self) {
        self.io.c2u.settle();
        self.io.u2c.settle();
        let script = |e: &Engine| e.fills.len() + e.drains.len();
        let rounds = script(&self.io.c2u) + script(&self.io.u2c) + 8;
        let mut next = Next::Again;
        for _ in 0..rounds {
            if next == Next::Finished {
                break;
            }
            let mut owed = false;
            for from in [Side::Client, Side::Upstream] {
                let (fill, drain) = {
                    let e = self.io.of(from);
                    (e.fill_blocked, e.drain_blocked)
                };
                owed |= fill || drain;
                if fill {
                    self.io.of(from).readable_edge();
                    self.dir(from).source_readable();
                }
                if drain {
                    self.io.of(from).writable_edge();
                    self.dir(from).destination_writable();
                }
            }
            let calls = self.io.c2u.calls + self.io.u2c.calls;
            match self.pump() {
                None => return,
                Some(n) => next = n,
            }
            let progressed = self.io.c2u.calls + self.io.u2c.calls > calls;
            assert!(
                owed || progressed || next == Next::Finished,
                "the relay stalls: nothing owed and no progress"
            );
        }
        assert_eq!(
            next,
            Next::Finished,
            "the relay did not finish once both sources ended"
        );
        self.finish();
    }
}

/// `expired` agrees with `deadline`, and names a deadline that really passed.
pub(crate) fn check_expiry(a: &Activity, t: &Timeouts, now: Instant) {
    let deadline = a.deadline(t);
    let expired = a.expired(t, now);
    assert_eq!(
        expired,
        deadline.filter(|(at, _)| *at <= now).map(|(_, e)| e)
    );
    let since = now.saturating_duration_since(a.last_active);
    match expired {
        Some(Expiry::Idle) => assert!(t.idle.is_some_and(|d| since >= d), "idle expiry too early"),
        Some(Expiry::FinTimeout) => {
            assert!(
                a.half_closed,
                "FIN timeout on a relay that is not half-closed"
            );
            assert!(t.fin.is_some_and(|d| since >= d), "FIN expiry too early");
        }
        Some(Expiry::Connect) => {
            let since = a
                .connecting_since
                .expect("connect expiry while not connecting");
            assert!(t
                .connect
                .is_some_and(|d| now.saturating_duration_since(since) >= d));
        }
        None => {}
    }
}

/// Runs `actions` against a connected relay's two directions.
pub(crate) fn run_pair(setup: &PairSetup, actions: &[PairAction]) -> PairOutcome {
    let engine = || Engine {
        capacity: setup.capacity,
        shutdown_fails: setup.shutdown_fails,
        ..Engine::default()
    };
    let now = Instant::now();
    let mut activity = Activity::new(now);
    check_expiry(&activity, &setup.timeouts, now);
    // Relay::connected.
    activity.connecting_since = None;
    activity.last_active = now;
    let mut run = PairRun {
        c2u: Direction::new(Side::Client, Side::Upstream),
        u2c: Direction::new(Side::Upstream, Side::Client),
        io: PairEngines {
            c2u: engine(),
            u2c: engine(),
        },
        activity,
        timeouts: setup.timeouts,
        now,
        error: None,
        expired: None,
        finished: false,
        pumps: 0,
    };
    for action in actions {
        if run.over() {
            break;
        }
        match *action {
            PairAction::Fill(from, step) => run.io.of(from).fills.push_back(step),
            PairAction::Drain(from, step) => run.io.of(from).drains.push_back(step),
            PairAction::Ready(side, r, w) => run.ready(side, r, w),
            PairAction::Pump => {
                if run.pump() == Some(Next::Finished) {
                    run.finish();
                }
            }
            PairAction::Tick(ms) => run.tick(ms),
        }
    }
    if !run.over() && setup.settle {
        run.settle();
    }
    PairOutcome {
        error: run.error,
        expired: run.expired,
        finished: run.finished,
        filled: [run.io.c2u.filled, run.io.u2c.filled],
        drained: [run.io.c2u.drained, run.io.u2c.drained],
        discards: [run.io.c2u.discarded, run.io.u2c.discarded],
        pumps: run.pumps,
    }
}

// ---------------------------------------------------------------------------
// Decoding fuzz bytes

/// Reads fuzz bytes; past the end every byte is 0.
struct Bytes<'a> {
    data: &'a [u8],
}

impl Bytes<'_> {
    fn next(&mut self) -> Option<u8> {
        let (first, rest) = self.data.split_first()?;
        self.data = rest;
        Some(*first)
    }

    fn byte(&mut self) -> u8 {
        self.next().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.byte(), self.byte()])
    }

    fn step(&mut self) -> Step {
        let b = self.byte();
        match b & 7 {
            0..=2 => Step::Moved(1 + (b >> 3) as usize),
            3 => Step::Moved(1 + self.u16() as usize * 16),
            4 | 5 => Step::WouldBlock,
            6 => Step::Eof,
            _ => Step::Fail(FAIL_KINDS[(b >> 3) as usize % FAIL_KINDS.len()]),
        }
    }

    fn capacity(&mut self, b: u8) -> Option<usize> {
        match b & 3 {
            0 => None,
            1 => Some(1 + self.byte() as usize),
            2 => Some(1 + self.u16() as usize),
            _ => Some(64 * 1024),
        }
    }
}

fn decode_direction(data: &[u8]) -> (DirSetup, Vec<Action>) {
    let mut r = Bytes { data };
    let h = r.byte();
    let setup = DirSetup {
        capacity: r.capacity(h),
        shutdown_fails: (h & 12 == 12).then(|| FAIL_KINDS[(h >> 6) as usize % FAIL_KINDS.len()]),
        from_upstream: h & 16 != 0,
        settle: h & 32 == 0,
    };
    let mut actions = Vec::new();
    while let Some(b) = r.next() {
        match b % 8 {
            0 => actions.push(Action::Fill(r.step())),
            1 => actions.push(Action::Drain(r.step())),
            2 => actions.push(Action::Readable),
            3 => actions.push(Action::Writable),
            4 => actions.push(Action::Pump(u32::from(b >> 3))),
            5 => actions.extend([
                Action::Readable,
                Action::Writable,
                Action::Pump(PUMP_BUDGET / 2),
            ]),
            6 => actions.push(Action::Pump(PUMP_BUDGET / 2)),
            _ => {
                actions.push(Action::Fill(r.step()));
                actions.push(Action::Drain(r.step()));
            }
        }
    }
    (setup, actions)
}

fn decode_pair(data: &[u8]) -> (PairSetup, Vec<PairAction>) {
    let mut r = Bytes { data };
    let h = r.byte();
    let timeout = |r: &mut Bytes| match r.byte() {
        0 => None,
        b => Some(Duration::from_millis(u64::from(b) * 10)),
    };
    let timeouts = Timeouts {
        idle: timeout(&mut r),
        fin: timeout(&mut r),
        connect: timeout(&mut r),
    };
    let setup = PairSetup {
        timeouts,
        capacity: r.capacity(h),
        shutdown_fails: (h & 12 == 12).then(|| FAIL_KINDS[(h >> 6) as usize % FAIL_KINDS.len()]),
        settle: h & 32 == 0,
    };
    let side = |b: u8| {
        if b & 8 == 0 {
            Side::Client
        } else {
            Side::Upstream
        }
    };
    let mut actions = Vec::new();
    while let Some(b) = r.next() {
        match b % 8 {
            0 | 1 => actions.push(PairAction::Fill(side(b), r.step())),
            2 | 3 => actions.push(PairAction::Drain(side(b), r.step())),
            4 => actions.push(PairAction::Ready(side(b), b & 16 != 0, b & 32 != 0)),
            5 | 6 => actions.push(PairAction::Pump),
            _ => actions.push(PairAction::Tick(u64::from(b >> 3) * 4)),
        }
    }
    (setup, actions)
}

// ---------------------------------------------------------------------------
// Config parsers

/// A second, independent reading of `parse_duration`'s grammar: Ok(None) for
/// "disabled", Err(()) for a rejection, Ok(Some(nanos)) otherwise, summed
/// exactly (no saturation) in u128.
pub(crate) fn reference_duration(text: &str) -> Result<Option<u128>, ()> {
    let s = text.trim();
    if s == "0" {
        return Ok(None);
    }
    if s.is_empty() {
        return Err(());
    }
    let mut total: u128 = 0;
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let mut digits = String::new();
        while let Some(c) = chars.next_if(char::is_ascii_digit) {
            digits.push(c);
        }
        let mut unit = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_ascii_digit()) {
            unit.push(c);
        }
        let value: u64 = digits.parse().map_err(|_| ())?;
        let nanos: u128 = match unit.as_str() {
            "us" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            _ => return Err(()),
        };
        total = total.saturating_add(u128::from(value) * nanos);
    }
    if total > crate::config::MAX_DURATION.as_nanos() {
        return Err(());
    }
    Ok((total > 0).then_some(total))
}

/// `parse_duration` never panics, agrees with [`reference_duration`]
/// (saturating past u64::MAX seconds), ignores surrounding whitespace, and
/// what it returns prints back to itself.
pub(crate) fn check_duration_text(text: &str) {
    let got = parse_duration(text);
    let want = reference_duration(text);
    match (&got, want) {
        (Err(msg), Err(())) => assert!(!msg.is_empty()),
        (Ok(None), Ok(None)) => {}
        (Ok(Some(d)), Ok(Some(nanos))) => {
            let cap = u128::from(u64::MAX) * 1_000_000_000;
            if nanos >= cap {
                assert!(
                    *d >= Duration::from_secs(u64::MAX),
                    "{text:?}: {d:?} should saturate"
                );
            } else {
                assert_eq!(d.as_nanos(), nanos, "{text:?}: wrong duration");
            }
            if let Ok(us) = u64::try_from(d.as_micros()) {
                if d.subsec_nanos() % 1000 == 0 {
                    assert_eq!(
                        parse_duration(&format!("{us}us")),
                        Ok(Some(*d)),
                        "{text:?}: no round trip"
                    );
                }
            }
        }
        (got, want) => panic!("{text:?}: parse_duration gave {got:?}, the reference {want:?}"),
    }
    assert_eq!(
        parse_duration(&format!(" {text}\t")).ok(),
        got.ok(),
        "{text:?}: whitespace matters"
    );
}

/// `N<unit>` parses to exactly N units (saturating), `0<unit>` disables.
pub(crate) fn check_duration_number(n: u64) {
    type Unit = (&'static str, fn(u64) -> Duration);
    let units: [Unit; 6] = [
        ("us", Duration::from_micros),
        ("ms", Duration::from_millis),
        ("s", Duration::from_secs),
        ("m", |n| Duration::from_secs(n.saturating_mul(60))),
        ("h", |n| Duration::from_secs(n.saturating_mul(3600))),
        ("d", |n| Duration::from_secs(n.saturating_mul(86400))),
    ];
    for (unit, make) in units {
        let text = format!("{n}{unit}");
        let got = parse_duration(&text);
        if make(n) > crate::config::MAX_DURATION {
            assert!(got.is_err(), "{text}: past the maximum must be rejected");
        } else {
            assert_eq!(got, Ok((n > 0).then(|| make(n))), "{text}");
        }
    }
    if n > 0 {
        assert!(
            parse_duration(&n.to_string()).is_err(),
            "a bare number must be rejected"
        );
    }
    // Sums: "Nm Ns" is the sum of its parts.
    let m = n % 100_000;
    let sum = parse_duration(&format!("{m}m{n}s"));
    let want = Duration::from_secs(m * 60).saturating_add(Duration::from_secs(n));
    if want > crate::config::MAX_DURATION {
        assert!(sum.is_err(), "{m}m{n}s: past the maximum must be rejected");
    } else {
        assert_eq!(sum.unwrap().unwrap_or(Duration::ZERO), want, "{m}m{n}s");
    }
}

/// A second reading of `parse_size`: the size in bytes, exactly, or Err.
pub(crate) fn reference_size(text: &str) -> Result<u128, ()> {
    let s = text.trim();
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    let value: usize = digits.parse().map_err(|_| ())?;
    let unit = s[digits.len()..].to_ascii_lowercase();
    let mult: u128 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(()),
    };
    Ok(value as u128 * mult)
}

/// `parse_size` never panics, agrees with [`reference_size`] (rejecting
/// what overflows usize) and ignores surrounding whitespace.
pub(crate) fn check_size_text(text: &str) {
    let got = parse_size(text);
    match (&got, reference_size(text)) {
        (Ok(n), Ok(want)) => assert_eq!(*n as u128, want, "{text:?}"),
        (Err(_), Ok(want)) => assert!(want > usize::MAX as u128, "{text:?}: rejected {want}"),
        (Err(_), Err(())) => {}
        (Ok(n), Err(())) => panic!("{text:?}: parse_size accepted {n}, the reference rejects it"),
    }
    assert_eq!(
        parse_size(&format!("\n{text} ")).ok(),
        got.ok(),
        "{text:?}: whitespace matters"
    );
}

pub(crate) fn check_size_number(n: u64) {
    let Ok(n) = usize::try_from(n) else { return };
    assert_eq!(parse_size(&n.to_string()), Ok(n));
    for (unit, shift) in [
        ("k", 10),
        ("KiB", 10),
        ("m", 20),
        ("MB", 20),
        ("g", 30),
        ("GiB", 30),
    ] {
        let want = n.checked_mul(1 << shift);
        assert_eq!(parse_size(&format!("{n}{unit}")).ok(), want, "{n}{unit}");
    }
}

fn check_mode_text(text: &str) {
    match text.parse::<Mode>() {
        Ok(mode) => assert_eq!(mode.as_str(), text),
        Err(msg) => {
            assert!(text != "splice" && text != "copy");
            assert!(msg.contains("unknown mode"));
        }
    }
}

// ---------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    type Target = fn(&[u8]);

    const TARGETS: [(&str, Target); 3] = [
        ("direction", direction_script),
        ("relay_pair", pair_script),
        ("config", config_text),
    ];

    fn seeds(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/seeds")
            .join(target);
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let data = std::fs::read(&p).unwrap();
                (p, data)
            })
            .collect()
    }

    /// The committed seed corpus (and any minimized crash saved beside it)
    /// is a regression suite, with or without cargo-fuzz.
    #[test]
    fn seed_corpus_passes() {
        for (name, target) in TARGETS {
            let seeds = seeds(name);
            assert!(!seeds.is_empty(), "no seeds for {name}");
            for (path, data) in seeds {
                if let Err(panic) = std::panic::catch_unwind(|| target(&data)) {
                    panic!("{}: {:?}", path.display(), panic.downcast_ref::<String>());
                }
            }
        }
    }

    /// A tiny xorshift generator: no extra dependency for the fallback loop.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
    }

    /// The fallback when cargo-fuzz cannot run: `SPLICED_FUZZ_SECS` seconds
    /// of random and mutated-seed inputs for `SPLICED_FUZZ_TARGET` (all
    /// targets if unset). Run by scripts/fuzz.sh with `--ignored`.
    #[test]
    #[ignore = "long-running; scripts/fuzz.sh runs it when cargo-fuzz cannot"]
    fn random_inputs() {
        let secs: u64 = std::env::var("SPLICED_FUZZ_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(5);
        let only = std::env::var("SPLICED_FUZZ_TARGET").ok();
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1;
        for (name, target) in TARGETS {
            if only.as_deref().is_some_and(|o| o != name) {
                continue;
            }
            let mut rng = Rng(seed);
            let corpus: Vec<Vec<u8>> = seeds(name).into_iter().map(|(_, d)| d).collect();
            let end = Instant::now() + Duration::from_secs(secs);
            let mut runs = 0u64;
            while Instant::now() < end {
                let mut data = if rng.next() % 2 == 0 {
                    corpus[rng.next() as usize % corpus.len()].clone()
                } else {
                    Vec::new()
                };
                let len = (rng.next() % 256) as usize;
                for _ in 0..len {
                    let b = rng.next() as u8;
                    if !data.is_empty() && rng.next() % 3 == 0 {
                        let at = rng.next() as usize % data.len();
                        data[at] = b;
                    } else {
                        data.push(b);
                    }
                }
                if let Err(panic) = std::panic::catch_unwind(|| target(&data)) {
                    panic!(
                        "{name}: input {data:?} failed: {:?}",
                        panic
                            .downcast_ref::<String>()
                            .map(String::as_str)
                            .or(panic.downcast_ref::<&str>().copied())
                    );
                }
                runs += 1;
            }
            eprintln!("fuzz fallback: {name}: {runs} inputs in {secs}s, no failure");
        }
    }

    #[test]
    fn a_release_of_a_full_buffer_is_caught() {
        let mut e = Engine::default();
        e.fills.push_back(Step::Moved(3));
        e.fill().unwrap();
        let caught = std::panic::catch_unwind(move || e.release());
        assert!(caught.is_err(), "the engine must catch a lost buffer");
    }

    #[test]
    fn a_drifted_pending_count_is_caught() {
        let mut e = Engine::default();
        e.fills.push_back(Step::Moved(3));
        e.fill().unwrap();
        let caught = std::panic::catch_unwind(move || e.drain(2));
        assert!(caught.is_err(), "the engine must catch pending drift");
    }

    #[test]
    fn a_plain_transfer_finishes() {
        let setup = DirSetup {
            settle: true,
            ..DirSetup::default()
        };
        let out = run_direction(
            &setup,
            &[
                Action::Fill(Step::Moved(10)),
                Action::Drain(Step::Moved(4)),
                Action::Pump(16),
            ],
        );
        assert!(out.finished);
        assert_eq!((out.filled, out.drained, out.shutdowns), (10, 10, 1));
        assert!(!out.holding);
    }

    #[test]
    fn a_reset_ends_the_pair_and_discards_both_buffers() {
        let setup = PairSetup {
            settle: true,
            ..PairSetup::default()
        };
        let out = run_pair(
            &setup,
            &[
                PairAction::Fill(Side::Upstream, Step::Moved(7)),
                PairAction::Drain(Side::Upstream, Step::WouldBlock),
                PairAction::Pump,
                PairAction::Fill(Side::Client, Step::Fail(io::ErrorKind::ConnectionReset)),
                PairAction::Ready(Side::Client, true, false),
                PairAction::Pump,
                PairAction::Pump,
            ],
        );
        assert_eq!(out.pumps, 2, "nothing runs after the error");
        assert_eq!(out.error, Some((Side::Client, Op::Read)));
        assert_eq!(out.discards, [Some(Discard::Pooled), Some(Discard::Closed)]);
    }

    #[test]
    fn config_examples() {
        for text in [
            "0",
            "0s",
            "30s",
            "1m30s",
            " 5m ",
            "1h",
            "500ms",
            "7us",
            "2d",
            "",
            "30",
            "5 s",
            "1x",
            "99999999999999999999s",
            "18446744073709551615d",
        ] {
            check_duration_text(text);
        }
        for text in [
            "65536",
            "64k",
            "1MiB",
            "1m",
            " 2G",
            "k",
            "1 k",
            "18446744073709551615",
            "18446744073709551615k",
        ] {
            check_size_text(text);
        }
        check_duration_number(0);
        check_duration_number(90);
        check_duration_number(u64::MAX);
        check_size_number(u64::MAX);
    }
}
