//! The pure relay core: both directions, their timing, readiness routing
//! and the close decision (made in `relay::close`). No sockets: the worker
//! drives it with real ones through [`PairIo`], the property tests and fuzz
//! targets with a scripted engine, so both exercise the same code.

use std::time::{Duration, Instant};

use super::close::{plan, ClosePlan};
#[cfg(feature = "service")]
use super::direction::DirectionImage;
use super::direction::{DirState, Direction};
use crate::config::Timeouts;
use crate::engine::Endpoints;
use crate::error::{RelayError, Side};
use crate::stats::CloseReason;

/// One end of a relay. Routing needs exactly two values; [`Side`] adds
/// `Internal` for errors of the proxy itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Peer {
    Client,
    Upstream,
}

impl Peer {
    #[cfg(any(test, fuzzing))]
    pub(crate) fn other(self) -> Peer {
        match self {
            Peer::Client => Peer::Upstream,
            Peer::Upstream => Peer::Client,
        }
    }
}

impl From<Peer> for Side {
    fn from(p: Peer) -> Side {
        match p {
            Peer::Client => Side::Client,
            Peer::Upstream => Side::Upstream,
        }
    }
}

/// Engine calls one relay may make per wakeup before yielding to others.
pub(crate) const PUMP_BUDGET: u32 = 32;

/// Which deadline fired.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Expiry {
    Connect,
    Idle,
    FinTimeout,
}

/// The relay's clock-related facts, apart from its sockets so it can be
/// tested with `now` as a parameter.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Activity {
    pub(crate) started: Instant,
    /// Last time a byte was written either way (or the connect completed).
    pub(crate) last_active: Instant,
    /// Set while an upstream connect attempt is in flight.
    pub(crate) connecting_since: Option<Instant>,
    /// Either direction has seen EOF.
    pub(crate) half_closed: bool,
}

impl Activity {
    pub(crate) fn new(now: Instant) -> Activity {
        Activity {
            started: now,
            last_active: now,
            connecting_since: Some(now),
            half_closed: false,
        }
    }

    /// The next deadline and what it means. A half-closed relay is held to
    /// the shorter of the FIN and idle timeouts. A deadline too far away to
    /// represent counts as none.
    pub(crate) fn deadline(&self, t: &Timeouts) -> Option<(Instant, Expiry)> {
        let after = |from: Instant, d: Option<Duration>, what| Some((from.checked_add(d?)?, what));
        if let Some(since) = self.connecting_since {
            return after(since, t.connect, Expiry::Connect);
        }
        let idle = after(self.last_active, t.idle, Expiry::Idle);
        if !self.half_closed {
            return idle;
        }
        let fin = after(self.last_active, t.fin, Expiry::FinTimeout);
        match (idle, fin) {
            (Some(i), Some(f)) => Some(if f.0 <= i.0 { f } else { i }),
            (i, f) => f.or(i),
        }
    }

    /// What has expired at `now`, if anything.
    pub(crate) fn expired(&self, t: &Timeouts, now: Instant) -> Option<Expiry> {
        self.deadline(t)
            .filter(|(at, _)| *at <= now)
            .map(|(_, e)| e)
    }
}

/// What a pump of the whole relay left to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Next {
    /// Wait for readiness.
    Wait,
    /// Out of budget with work left: run again after other relays.
    Again,
    /// Both directions forwarded FIN.
    Finished,
}

/// Hands out one direction's I/O at a time (both borrow the worker's pools).
pub(crate) trait PairIo {
    type Io<'a>: Endpoints
    where
        Self: 'a;
    /// The I/O of the direction whose source is `from`.
    fn io(&mut self, from: Peer) -> Self::Io<'_>;
}

/// What pumping both directions achieved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PairPumped {
    pub(crate) moved: usize,
    pub(crate) state_changed: bool,
    pub(crate) next: Next,
}

/// Pumps both directions of a relay, half the budget each so a firehose one
/// way cannot starve the other. Any error ends the pump at once: the caller
/// closes (and resets) both sides, so no direction is left orphaned.
pub(crate) fn pump_pair(
    c2u: &mut Direction,
    u2c: &mut Direction,
    io: &mut impl PairIo,
) -> Result<PairPumped, RelayError> {
    let mut c2u_budget = PUMP_BUDGET / 2;
    let mut u2c_budget = PUMP_BUDGET / 2;
    let a = c2u.pump(&mut io.io(Peer::Client), &mut c2u_budget)?;
    let b = u2c.pump(&mut io.io(Peer::Upstream), &mut u2c_budget)?;
    let next = if c2u.state() == DirState::Shut && u2c.state() == DirState::Shut {
        Next::Finished
    } else if a.exhausted || b.exhausted {
        Next::Again
    } else {
        Next::Wait
    };
    Ok(PairPumped {
        moved: a.moved + b.moved,
        state_changed: a.state_changed || b.state_changed,
        next,
    })
}

/// A connected relay's core, handed to a live upgrade's new process.
#[cfg(feature = "service")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CoreImage {
    pub(crate) c2u: DirectionImage,
    pub(crate) u2c: DirectionImage,
    /// Since its client was accepted.
    pub(crate) age: Duration,
    /// Since a byte last moved (or a FIN), what its idle and FIN deadlines
    /// count from.
    pub(crate) idle: Duration,
    pub(crate) half_closed: bool,
}

/// Both directions of one relay and its timing facts.
#[derive(Debug)]
pub(crate) struct RelayCore {
    c2u: Direction,
    u2c: Direction,
    activity: Activity,
}

/// What one [`RelayCore::pump`] did, for the worker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Pumped {
    pub(crate) pair: PairPumped,
    /// The relay became half-closed now: its deadline may move earlier.
    pub(crate) newly_half_closed: bool,
}

impl RelayCore {
    /// A relay whose upstream connect has just started.
    pub(crate) fn new(now: Instant) -> RelayCore {
        RelayCore {
            c2u: Direction::new(Side::Client, Side::Upstream),
            u2c: Direction::new(Side::Upstream, Side::Client),
            activity: Activity::new(now),
        }
    }

    /// The core as a live upgrade hands it over: both directions and how
    /// long ago (at `now`) it started and last moved a byte.
    #[cfg(feature = "service")]
    pub(crate) fn image(&self, now: Instant) -> CoreImage {
        CoreImage {
            c2u: self.c2u.image(),
            u2c: self.u2c.image(),
            age: now.saturating_duration_since(self.activity.started),
            idle: now.saturating_duration_since(self.activity.last_active),
            half_closed: self.activity.half_closed,
        }
    }

    /// A connected relay's core as another process left it, its clock
    /// facts rebased on `now`: its idle and FIN deadlines fall where they
    /// would have (plus the time the handover took).
    #[cfg(feature = "service")]
    pub(crate) fn from_image(image: &CoreImage, now: Instant) -> RelayCore {
        let ago = |d: Duration| now.checked_sub(d).unwrap_or(now);
        RelayCore {
            c2u: Direction::from_image(Side::Client, Side::Upstream, image.c2u),
            u2c: Direction::from_image(Side::Upstream, Side::Client, image.u2c),
            activity: Activity {
                started: ago(image.age),
                last_active: ago(image.idle),
                connecting_since: None,
                half_closed: image.half_closed,
            },
        }
    }

    pub(crate) fn direction(&self, from: Peer) -> &Direction {
        match from {
            Peer::Client => &self.c2u,
            Peer::Upstream => &self.u2c,
        }
    }

    pub(crate) fn activity(&self) -> &Activity {
        &self.activity
    }

    pub(crate) fn is_connecting(&self) -> bool {
        self.activity.connecting_since.is_some()
    }

    /// The client was accepted at `at`, before the relay was made (it was
    /// held, or read first): its age counts from then.
    pub(crate) fn accepted_at(&mut self, at: Instant) {
        self.activity.started = self.activity.started.min(at);
    }

    /// A new connect attempt started (after a failed one).
    pub(crate) fn connecting(&mut self, now: Instant) {
        self.activity.connecting_since = Some(now);
    }

    /// The upstream connect finished; bytes may flow.
    /// `hung_up`: the upstream's edges while connecting carried RDHUP/HUP
    /// (they went to the connect, not to the direction).
    pub(crate) fn connected(&mut self, now: Instant, hung_up: bool) {
        self.activity.connecting_since = None;
        self.activity.last_active = now;
        // Readiness edges that arrived while connecting are not lost: the
        // directions start optimistic and the first call tells the truth.
        self.c2u.destination_writable();
        if hung_up {
            self.u2c.source_unsure();
        } else {
            self.u2c.source_readable();
        }
    }

    /// The direction from `from` starts with `n` bytes already accepted
    /// (read ahead by whoever handed the pair over).
    pub(crate) fn preload(&mut self, from: Peer, n: usize) {
        match from {
            Peer::Client => self.c2u.preload(n),
            Peer::Upstream => self.u2c.preload(n),
        }
    }

    /// Routes readiness of one peer's socket: its readable bit belongs to
    /// the direction it feeds, its writable bit to the one that feeds it.
    /// `hung_up`: the readable edge came with RDHUP or HUP.
    pub(crate) fn ready(&mut self, peer: Peer, readable: bool, writable: bool, hung_up: bool) {
        let (reading, writing) = match peer {
            Peer::Client => (&mut self.c2u, &mut self.u2c),
            Peer::Upstream => (&mut self.u2c, &mut self.c2u),
        };
        if hung_up {
            reading.source_unsure();
        } else if readable {
            reading.source_readable();
        }
        if writable {
            writing.destination_writable();
        }
    }

    /// Pumps both directions within the budget and keeps the books: every
    /// transfer, and every FIN seen or forwarded, is activity (the
    /// half-closed limit counts from the FIN, not the last byte before it).
    /// A relay still connecting never moves: nothing may reach (or
    /// half-close) an upstream before its connect is known to have worked.
    pub(crate) fn pump(
        &mut self,
        io: &mut impl PairIo,
        now: Instant,
    ) -> Result<Pumped, RelayError> {
        if self.is_connecting() {
            return Ok(Pumped {
                pair: PairPumped {
                    moved: 0,
                    state_changed: false,
                    next: Next::Wait,
                },
                newly_half_closed: false,
            });
        }
        let pair = pump_pair(&mut self.c2u, &mut self.u2c, io)?;
        if pair.moved > 0 || pair.state_changed {
            self.activity.last_active = now;
        }
        let newly_half_closed = pair.state_changed && !self.activity.half_closed;
        if pair.state_changed {
            self.activity.half_closed = true;
        }
        Ok(Pumped {
            pair,
            newly_half_closed,
        })
    }

    pub(crate) fn deadline(&self, t: &Timeouts) -> Option<(Instant, Expiry)> {
        self.activity.deadline(t)
    }

    pub(crate) fn expired(&self, t: &Timeouts, now: Instant) -> Option<Expiry> {
        self.activity.expired(t, now)
    }

    /// What becomes of each socket and buffer when the relay ends for
    /// `reason`.
    pub(crate) fn close_plan(&self, reason: CloseReason) -> ClosePlan {
        plan(reason, &self.c2u, &self.u2c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts(idle: u64, fin: u64, connect: u64) -> Timeouts {
        let opt = |ms: u64| (ms > 0).then(|| Duration::from_millis(ms));
        Timeouts {
            idle: opt(idle),
            fin: opt(fin),
            connect: opt(connect),
        }
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A core rebuilt from its image (a live upgrade's) keeps both
    /// directions' books and its deadlines: they fall where they would
    /// have, counted from the last byte, not from the rebuild.
    #[cfg(feature = "service")]
    #[test]
    fn a_core_rebuilt_from_its_image_keeps_its_books_and_deadlines() {
        let t = timeouts(1000, 300, 50);
        let t0 = Instant::now();
        let mut core = RelayCore::new(t0);
        core.connected(t0 + ms(10), false);
        core.preload(Peer::Client, 7);
        core.activity.last_active = t0 + ms(100);
        core.activity.half_closed = true;
        let image = core.image(t0 + ms(250));
        let later = t0 + ms(5000);
        let back = RelayCore::from_image(&image, later);
        assert_eq!(back.image(later), image);
        assert_eq!(back.direction(Peer::Client).pending(), 7);
        // The FIN deadline was 300 ms after the last byte, 150 ms after
        // the image was taken: the rebuilt core has it 150 ms after `later`.
        assert_eq!(
            back.deadline(&t),
            Some((later + ms(150), Expiry::FinTimeout))
        );
        assert!(!back.is_connecting());
    }

    // Tests for the connecting phase

    #[test]
    fn connecting_is_bounded_by_the_connect_timeout() {
        let t0 = Instant::now();
        let a = Activity::new(t0);
        let t = timeouts(100, 50, 30);
        assert_eq!(a.deadline(&t), Some((t0 + ms(30), Expiry::Connect)));
        assert_eq!(a.expired(&t, t0 + ms(29)), None);
        assert_eq!(a.expired(&t, t0 + ms(30)), Some(Expiry::Connect));
    }

    #[test]
    fn connecting_without_a_connect_timeout_has_no_deadline() {
        let a = Activity::new(Instant::now());
        assert_eq!(a.deadline(&timeouts(100, 50, 0)), None);
    }

    // Tests for the open (relaying) phase

    #[test]
    fn idle_deadline_counts_from_the_last_transfer() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        a.connecting_since = None;
        let t = timeouts(100, 50, 30);
        assert_eq!(a.expired(&t, t0 + ms(100)), Some(Expiry::Idle));
        // A transfer is a timestamp store; the deadline moves with it.
        a.last_active = t0 + ms(60);
        assert_eq!(a.expired(&t, t0 + ms(100)), None);
        assert_eq!(a.expired(&t, t0 + ms(159)), None);
        assert_eq!(a.expired(&t, t0 + ms(160)), Some(Expiry::Idle));
    }

    #[test]
    fn idle_zero_disables_the_deadline() {
        let mut a = Activity::new(Instant::now());
        a.connecting_since = None;
        assert_eq!(a.deadline(&timeouts(0, 50, 30)), None);
    }

    #[test]
    fn an_unrepresentable_deadline_is_none_not_a_panic() {
        let mut a = Activity::new(Instant::now());
        a.connecting_since = None;
        let t = Timeouts {
            idle: Some(Duration::MAX),
            fin: None,
            connect: None,
        };
        assert_eq!(a.deadline(&t), None);
        a.half_closed = true;
        assert_eq!(a.deadline(&t), None);
    }

    // Tests for the half-closed phase

    #[test]
    fn half_closed_uses_the_shorter_fin_timeout() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        a.connecting_since = None;
        a.half_closed = true;
        let t = timeouts(100, 50, 30);
        assert_eq!(a.deadline(&t), Some((t0 + ms(50), Expiry::FinTimeout)));
    }

    #[test]
    fn half_closed_never_outlives_the_idle_timeout() {
        let t0 = Instant::now();
        let mut a = Activity::new(t0);
        a.connecting_since = None;
        a.half_closed = true;
        assert_eq!(
            a.deadline(&timeouts(40, 50, 30)),
            Some((t0 + ms(40), Expiry::Idle))
        );
        assert_eq!(
            a.deadline(&timeouts(40, 0, 30)),
            Some((t0 + ms(40), Expiry::Idle))
        );
        assert_eq!(
            a.deadline(&timeouts(0, 50, 30)),
            Some((t0 + ms(50), Expiry::FinTimeout))
        );
        assert_eq!(a.deadline(&timeouts(0, 0, 30)), None);
    }
}
