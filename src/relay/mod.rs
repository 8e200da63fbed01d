//! A relay: one client, one upstream, two [`Direction`]s.
//!
//! The relay owns both sockets and the two directions' buffer slots, and
//! keeps its timing facts in [`Activity`], which is pure and takes `now`.
//! Every transfer costs one timestamp store (`last_active`); the worker's
//! timer re-arms lazily when a deadline fires early.

pub(crate) mod direction;
#[cfg(test)]
mod props;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use socket2::SockRef;

pub(crate) use direction::{DirState, Direction};

use crate::config::{ListenerConfig, Mode, Timeouts};
use crate::engine::{Endpoints, Pools, Slot, Wire};
use crate::error::{RelayError, Side};
use crate::stats::CloseReason;

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

/// A listener's settings plus the state its workers share.
#[derive(Debug)]
pub(crate) struct ListenerRuntime {
    pub(crate) config: ListenerConfig,
    /// Round-robin cursor over upstreams, shared by all workers.
    pub(crate) next_upstream: std::sync::atomic::AtomicUsize,
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
    fn io(&mut self, from: Side) -> Self::Io<'_>;
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
    let a = c2u.pump(&mut io.io(Side::Client), &mut c2u_budget)?;
    let b = u2c.pump(&mut io.io(Side::Upstream), &mut u2c_budget)?;
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

/// A relay's sockets, slots and the worker's pools, as [`PairIo`].
struct RelayIo<'r> {
    client: &'r TcpStream,
    upstream: &'r TcpStream,
    c2u_slot: &'r mut Slot,
    u2c_slot: &'r mut Slot,
    pools: &'r mut Pools,
}

impl PairIo for RelayIo<'_> {
    type Io<'a>
        = Wire<'a>
    where
        Self: 'a;

    fn io(&mut self, from: Side) -> Wire<'_> {
        match from {
            Side::Client => Wire {
                slot: self.c2u_slot,
                src: self.client,
                dst: self.upstream,
                pools: self.pools,
            },
            _ => Wire {
                slot: self.u2c_slot,
                src: self.upstream,
                dst: self.client,
                pools: self.pools,
            },
        }
    }
}

/// Which sockets a closing relay resets (SO_LINGER 0) instead of closing
/// with a FIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Resets {
    pub(crate) client: bool,
    pub(crate) upstream: bool,
}

/// The close decision. A reset on either side resets both, so the peer of
/// the side that did not fail learns it was no clean close. Whatever the
/// reason, a destination that has not received every byte its direction
/// accepted, or has not had a FIN forwarded that its source sent, is reset:
/// a cut stream never ends with a clean FIN. A relay with nothing in flight
/// closes normally (an idle timeout, a drain deadline).
pub(crate) fn resets(reason: CloseReason, c2u: &Direction, u2c: &Direction) -> Resets {
    let both = matches!(
        reason,
        CloseReason::ClientReset | CloseReason::UpstreamReset | CloseReason::Internal
    );
    Resets {
        client: both || u2c.undelivered(),
        upstream: both || c2u.undelivered(),
    }
}

pub(crate) struct Relay {
    pub(crate) id: u64,
    pub(crate) listener: Arc<ListenerRuntime>,
    pub(crate) client: TcpStream,
    pub(crate) upstream: TcpStream,
    pub(crate) upstream_addr: SocketAddr,
    /// Connect attempts made so far (the first is attempt 0).
    pub(crate) attempt: usize,
    /// Index of the first upstream tried, from the round-robin cursor.
    pub(crate) first_upstream: usize,
    pub(crate) activity: Activity,
    /// The deadline this relay currently has an entry for in the timer heap.
    pub(crate) armed_at: Option<Instant>,
    /// On the worker's ready list (ran out of budget with work left).
    pub(crate) queued: bool,
    c2u: Direction,
    u2c: Direction,
    c2u_slot: Slot,
    u2c_slot: Slot,
    span: tracing::Span,
}

impl Relay {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        id: u64,
        listener: Arc<ListenerRuntime>,
        client: TcpStream,
        client_addr: SocketAddr,
        upstream: TcpStream,
        upstream_addr: SocketAddr,
        first_upstream: usize,
        now: Instant,
    ) -> Relay {
        let mode = listener.config.mode;
        Relay {
            id,
            span: tracing::info_span!("relay", id, client = %client_addr),
            listener,
            client,
            upstream,
            upstream_addr,
            attempt: 0,
            first_upstream,
            activity: Activity::new(now),
            armed_at: None,
            queued: false,
            c2u: Direction::new(Side::Client, Side::Upstream),
            u2c: Direction::new(Side::Upstream, Side::Client),
            c2u_slot: Slot::new(mode),
            u2c_slot: Slot::new(mode),
        }
    }

    pub(crate) fn timeouts(&self) -> &Timeouts {
        &self.listener.config.timeouts
    }

    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.activity.deadline(self.timeouts()).map(|(at, _)| at)
    }

    pub(crate) fn is_connecting(&self) -> bool {
        self.activity.connecting_since.is_some()
    }

    /// The upstream connect finished; bytes may flow.
    pub(crate) fn connected(&mut self, now: Instant) {
        self.activity.connecting_since = None;
        self.activity.last_active = now;
        // Readiness edges that arrived while connecting are not lost: the
        // directions start optimistic and the first call tells the truth.
        self.c2u.destination_writable();
        self.u2c.source_readable();
    }

    /// A new connect attempt replaced the upstream socket.
    pub(crate) fn retry_upstream(&mut self, upstream: TcpStream, addr: SocketAddr, now: Instant) {
        self.upstream = upstream;
        self.upstream_addr = addr;
        self.attempt += 1;
        self.activity.connecting_since = Some(now);
    }

    /// Records readiness reported for one socket. `urgent` is EPOLLPRI:
    /// out-of-band data arrived, which splice cannot step over.
    pub(crate) fn ready(&mut self, side: Side, readable: bool, writable: bool, urgent: bool) {
        let (reading, writing, reading_slot) = match side {
            Side::Client => (&mut self.c2u, &mut self.u2c, &mut self.c2u_slot),
            _ => (&mut self.u2c, &mut self.c2u, &mut self.u2c_slot),
        };
        if urgent {
            reading_slot.urgent_data();
        }
        if readable || urgent {
            reading.source_readable();
        }
        if writable {
            writing.destination_writable();
        }
    }

    /// The socket error epoll hinted at, if the socket really has one.
    pub(crate) fn socket_error(&self, side: Side) -> Option<RelayError> {
        let socket = match side {
            Side::Client => &self.client,
            _ => &self.upstream,
        };
        match socket.take_error() {
            Ok(Some(e)) | Err(e) => Some(RelayError::new(side, crate::error::Op::Read, e)),
            Ok(None) => None,
        }
    }

    /// Pumps both directions within the budget.
    pub(crate) fn pump(&mut self, now: Instant, pools: &mut Pools) -> Result<Next, RelayError> {
        let mut io = RelayIo {
            client: &self.client,
            upstream: &self.upstream,
            c2u_slot: &mut self.c2u_slot,
            u2c_slot: &mut self.u2c_slot,
            pools,
        };
        let pumped = pump_pair(&mut self.c2u, &mut self.u2c, &mut io)?;
        // A FIN seen or forwarded is activity too: the half-closed limit
        // counts from it, not from the last byte before it.
        if pumped.moved > 0 || pumped.state_changed {
            self.activity.last_active = now;
        }
        if pumped.state_changed {
            self.activity.half_closed = true;
            tracing::trace!(parent: &self.span, c2u = ?self.c2u.state(), u2c = ?self.u2c.state(), "half-close");
        }
        Ok(pumped.next)
    }

    /// Closes both sockets, giving buffers back, and logs the one line per
    /// relay. Which side gets a reset instead of a FIN is [`resets`]'s call.
    pub(crate) fn close(
        mut self,
        reason: CloseReason,
        error: Option<&RelayError>,
        now: Instant,
        pools: &mut Pools,
    ) {
        let reset = resets(reason, &self.c2u, &self.u2c);
        // A failed setsockopt only means the socket is already gone.
        if reset.client {
            let _ = SockRef::from(&self.client).set_linger(Some(Duration::ZERO));
        }
        if reset.upstream {
            let _ = SockRef::from(&self.upstream).set_linger(Some(Duration::ZERO));
        }
        self.c2u_slot.discard(pools, self.c2u.pending());
        self.u2c_slot.discard(pools, self.u2c.pending());
        let _enter = self.span.enter();
        let duration_ms = now
            .saturating_duration_since(self.activity.started)
            .as_millis() as u64;
        let engine_c2u = self.engine_label(Side::Client);
        let engine_u2c = self.engine_label(Side::Upstream);
        tracing::info!(
            upstream = %self.upstream_addr,
            bytes_c2u = self.c2u.bytes_out(),
            bytes_u2c = self.u2c.bytes_out(),
            duration_ms,
            engine_c2u = %engine_c2u,
            engine_u2c = %engine_u2c,
            reason = %reason,
            // Recorded only when there is one: `None` adds no field.
            error = error.map(tracing::field::display),
            "relay closed"
        );
    }

    /// The engine a direction ended with (`splice`, `copy`, or `copy` after a
    /// fallback from splice).
    fn engine_label(&self, from: Side) -> &'static str {
        let slot = match from {
            Side::Client => &self.c2u_slot,
            _ => &self.u2c_slot,
        };
        match (self.listener.config.mode, slot.engine()) {
            (Mode::Splice, Mode::Copy) => "copy-fallback",
            (_, engine) => engine.as_str(),
        }
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

    // Tests for the close decision

    use super::direction::tests::{Scripted, Step};

    /// A direction that accepted `accepted` bytes, delivered `delivered`, and
    /// saw EOF if `eof`.
    fn direction_with(accepted: usize, delivered: usize, eof: bool) -> Direction {
        let mut d = Direction::new(Side::Client, Side::Upstream);
        let mut fills = vec![Step::Moved(accepted)];
        if eof {
            fills.push(Step::Eof);
        }
        let mut io = Scripted {
            fills: fills.into(),
            drains: [Step::Moved(delivered), Step::WouldBlock].into(),
            ..Scripted::default()
        };
        let mut budget = PUMP_BUDGET;
        d.pump(&mut io, &mut budget).unwrap();
        d
    }

    fn done() -> Direction {
        let d = direction_with(5, 5, true);
        assert_eq!(d.state(), DirState::Shut);
        d
    }

    #[test]
    fn a_relay_with_nothing_in_flight_closes_with_fins() {
        let quiet = direction_with(5, 5, false);
        for reason in [
            CloseReason::Idle,
            CloseReason::FinTimeout,
            CloseReason::Shutdown,
        ] {
            let r = resets(reason, &quiet, &direction_with(0, 0, false));
            assert_eq!(
                r,
                Resets {
                    client: false,
                    upstream: false
                },
                "{reason}"
            );
        }
        assert_eq!(
            resets(CloseReason::Eof, &done(), &done()),
            Resets {
                client: false,
                upstream: false
            }
        );
    }

    #[test]
    fn bytes_in_flight_reset_only_their_destination() {
        let stuck = direction_with(100, 40, false);
        assert!(stuck.undelivered());
        for reason in [
            CloseReason::Idle,
            CloseReason::FinTimeout,
            CloseReason::Shutdown,
        ] {
            let towards_client = resets(reason, &done(), &stuck);
            assert_eq!(
                towards_client,
                Resets {
                    client: true,
                    upstream: false
                },
                "{reason}"
            );
            let towards_upstream = resets(reason, &stuck, &done());
            assert_eq!(
                towards_upstream,
                Resets {
                    client: false,
                    upstream: true
                },
                "{reason}"
            );
        }
    }

    #[test]
    fn an_unforwarded_fin_resets_its_destination() {
        let fin_pending = direction_with(10, 0, true);
        assert_eq!(fin_pending.state(), DirState::SourceEof);
        let r = resets(
            CloseReason::FinTimeout,
            &fin_pending,
            &direction_with(0, 0, false),
        );
        assert_eq!(
            r,
            Resets {
                client: false,
                upstream: true
            }
        );
    }

    #[test]
    fn a_reset_on_either_side_resets_both() {
        for reason in [
            CloseReason::ClientReset,
            CloseReason::UpstreamReset,
            CloseReason::Internal,
        ] {
            assert_eq!(
                resets(reason, &done(), &done()),
                Resets {
                    client: true,
                    upstream: true
                }
            );
        }
    }
}
