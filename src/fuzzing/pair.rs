//! Both directions: the relay core the worker drives, with a scripted
//! engine in place of sockets.

use std::io;
use std::time::{Duration, Instant};

use crate::config::Timeouts;
use crate::error::{Op, Side};
use crate::relay::{
    expiry_reason, failure_reason, Activity, ClosePlan, DirState, Expiry, Next, PairIo, Peer,
    RelayCore, PUMP_BUDGET,
};
use crate::stats::CloseReason;

use super::checks::{check_books, check_close_plan, check_error, check_waiting, close_direction};
use super::engine::{Discard, Engine, Step};

/// The two directions' engines, as `pump_pair` wants them.
#[derive(Debug, Default)]
pub(crate) struct PairEngines {
    pub(crate) c2u: Engine,
    pub(crate) u2c: Engine,
}

impl PairEngines {
    pub(crate) fn of(&mut self, from: Peer) -> &mut Engine {
        match from {
            Peer::Client => &mut self.c2u,
            Peer::Upstream => &mut self.u2c,
        }
    }
}

impl PairIo for PairEngines {
    type Io<'a>
        = &'a mut Engine
    where
        Self: 'a;

    fn io(&mut self, from: Peer) -> &mut Engine {
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

/// What the pair driver does next. A `Peer` names a direction by its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PairAction {
    Fill(Peer, Step),
    Drain(Peer, Step),
    /// Readiness reported for one socket (readable, writable), routed by
    /// the relay core.
    Ready(Peer, bool, bool),
    Pump,
    /// The clock moves on this many milliseconds; an expired deadline
    /// closes the relay.
    Tick(u64),
    /// spliced cuts the relay for this reason (the drain deadline, a
    /// server down under `on-down = "kill"`, an abort).
    Cut(CloseReason),
}

/// The close reasons with which spliced cuts a relay that had not ended.
pub(crate) const CUT_REASONS: [CloseReason; 3] = [
    CloseReason::Shutdown,
    CloseReason::ServerDown,
    CloseReason::Aborted,
];

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
    /// The core's close plan (why, and what became of each socket), if
    /// the relay closed.
    pub(crate) closed: Option<ClosePlan>,
}

struct PairRun {
    core: RelayCore,
    io: PairEngines,
    timeouts: Timeouts,
    now: Instant,
    error: Option<(Side, Op)>,
    expired: Option<Expiry>,
    finished: bool,
    pumps: usize,
    closed: Option<ClosePlan>,
}

impl PairRun {
    fn over(&self) -> bool {
        self.closed.is_some()
    }

    /// Both directions forwarded FIN: the worker closes the relay, which
    /// must find no buffer held.
    fn finish(&mut self) {
        for e in [&self.io.c2u, &self.io.u2c] {
            assert_eq!(e.drained, e.filled, "bytes lost");
        }
        self.close(CloseReason::Eof);
        for e in [&self.io.c2u, &self.io.u2c] {
            assert_eq!(
                e.discarded,
                Some(Discard::Nothing),
                "a finished relay still held a buffer"
            );
        }
        self.finished = true;
    }

    /// Closes the relay for `reason` by the core's close plan, the one
    /// `Relay::close` carries out on sockets: the plan is checked against
    /// the engines' books, then each buffer goes back as it says.
    fn close(&mut self, reason: CloseReason) {
        let plan = self.core.close_plan(reason);
        assert_eq!(plan.reason, reason, "the plan is for another reason");
        check_close_plan(&plan, &self.io.u2c, &self.io.c2u);
        close_direction(plan.pending_c2u, &mut self.io.c2u);
        close_direction(plan.pending_u2c, &mut self.io.u2c);
        self.closed = Some(plan);
    }

    /// Readiness of `peer`'s socket, routed by the core; the engines learn
    /// which edge the kernel delivered.
    fn ready(&mut self, peer: Peer, readable: bool, writable: bool) {
        if readable {
            self.io.of(peer).readable_edge();
        }
        if writable {
            // The socket's writable bit belongs to the direction toward it.
            self.io.of(peer.other()).writable_edge();
        }
        // The scripted source needs an edge for every byte and its EOF,
        // so no edge carries a hang-up.
        self.core.ready(peer, readable, writable, false);
    }

    fn activity(&self) -> &Activity {
        self.core.activity()
    }

    /// One [`RelayCore::pump`], as the worker runs it, checked.
    fn pump(&mut self) -> Option<Next> {
        self.pumps += 1;
        let (c2u, u2c) = (Peer::Client, Peer::Upstream);
        let states = [
            self.core.direction(c2u).state(),
            self.core.direction(u2c).state(),
        ];
        let drained = [self.io.c2u.drained, self.io.u2c.drained];
        let calls = [self.io.c2u.calls, self.io.u2c.calls];
        let deadline = self.core.deadline(&self.timeouts);
        let result = self.core.pump(&mut self.io, self.now).map(|p| p.pair);
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
                        check_books(self.core.direction(c2u), &self.io.c2u);
                        check_error(&e, Side::Upstream, Side::Client, &self.io.u2c);
                    }
                    other => panic!("pump_pair failed with {e} but the engines say {other:?}"),
                }
                // The caller closes (and resets) both sides: the relay is over.
                self.error = Some((e.side, e.op));
                self.close(failure_reason(e.side));
                return None;
            }
        };
        for (d, io) in [
            (self.core.direction(c2u), &self.io.c2u),
            (self.core.direction(u2c), &self.io.u2c),
        ] {
            check_books(d, io);
        }
        let moved = (self.io.c2u.drained - drained[0]) + (self.io.u2c.drained - drained[1]);
        assert_eq!(p.moved as u64, moved, "`moved` is not the bytes written");
        let now_states = [
            self.core.direction(c2u).state(),
            self.core.direction(u2c).state(),
        ];
        let changed = now_states != states;
        assert_eq!(p.state_changed, changed, "`state_changed` is wrong");
        let both_shut = now_states == [DirState::Shut, DirState::Shut];
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
            (self.core.direction(c2u), &self.io.c2u, used[0]),
            (self.core.direction(u2c), &self.io.u2c, used[1]),
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
        // The core's bookkeeping: every transfer and every FIN is activity.
        if p.moved > 0 || p.state_changed {
            assert_eq!(
                self.activity().last_active,
                self.now,
                "activity not recorded"
            );
        }
        let half = now_states.iter().any(|s| *s != DirState::Open);
        assert_eq!(
            self.activity().half_closed,
            half,
            "half_closed disagrees with the directions"
        );
        self.check_deadline(deadline, p.moved > 0 && !p.state_changed);
        Some(p.next)
    }

    /// The deadline never precedes the last transfer, a fresh transfer puts
    /// it in the future, and a transfer alone never moves it earlier.
    fn check_deadline(&self, before: Option<(Instant, Expiry)>, transfer_only: bool) {
        let after = self.activity().deadline(&self.timeouts);
        if let Some((at, _)) = after {
            assert!(
                at >= self.activity().last_active,
                "deadline before the last transfer"
            );
            if self.activity().last_active == self.now {
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
        check_expiry(self.activity(), &self.timeouts, self.now);
    }

    fn tick(&mut self, ms: u64) {
        self.now += Duration::from_millis(ms);
        check_expiry(self.activity(), &self.timeouts, self.now);
        if let Some(e) = self.core.expired(&self.timeouts, self.now) {
            self.expired = Some(e);
            let Some(reason) = expiry_reason(e) else {
                unreachable!("the pair driver starts connected")
            };
            self.close(reason);
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
            for from in [Peer::Client, Peer::Upstream] {
                let (fill, drain) = {
                    let e = self.io.of(from);
                    (e.fill_blocked, e.drain_blocked)
                };
                owed |= fill || drain;
                if fill {
                    // The source of this direction is `from`'s socket.
                    self.ready(from, true, false);
                }
                if drain {
                    // Its destination is the other peer's socket.
                    self.ready(from.other(), false, true);
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
    let mut core = RelayCore::new(now);
    check_expiry(core.activity(), &setup.timeouts, now);
    core.connected(now, false);
    let mut run = PairRun {
        core,
        io: PairEngines {
            c2u: engine(),
            u2c: engine(),
        },
        timeouts: setup.timeouts,
        now,
        error: None,
        expired: None,
        finished: false,
        pumps: 0,
        closed: None,
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
            PairAction::Cut(reason) => run.close(reason),
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
        closed: run.closed,
    }
}
