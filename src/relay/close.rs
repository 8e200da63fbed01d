//! The close decision: why a relay ends, what becomes of each of its
//! sockets (reset, FIN, or a close after the FIN already went) and of each
//! direction's buffer. Pure: it reads the two directions' states and
//! nothing else. `Relay::close` carries it out on real sockets, the fuzz
//! driver on its scripted engines.

use super::core::Expiry;
use super::direction::{DirState, Direction};
use crate::error::Side;
use crate::stats::CloseReason;

/// The reason a relay closes for when the pump failed on `side`.
pub(crate) fn failure_reason(side: Side) -> CloseReason {
    match side {
        Side::Client => CloseReason::ClientReset,
        Side::Upstream => CloseReason::UpstreamReset,
        Side::Internal => CloseReason::Internal,
    }
}

/// The reason a relay closes for when `expiry` fires; `None` for the
/// connect deadline, which starts the next connect attempt instead.
pub(crate) fn expiry_reason(expiry: Expiry) -> Option<CloseReason> {
    match expiry {
        Expiry::Idle => Some(CloseReason::Idle),
        Expiry::FinTimeout => Some(CloseReason::FinTimeout),
        Expiry::Connect => None,
    }
}

/// What a closing relay does with one of its sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SocketEnd {
    /// `SO_LINGER 0`, then close: the peer reads a reset.
    Reset,
    /// Close, which sends the FIN now: the direction towards this socket
    /// delivered every byte but had not forwarded a FIN.
    Fin,
    /// Close only: the direction towards this socket forwarded its FIN
    /// already, after every byte.
    Close,
}

impl SocketEnd {
    pub(crate) fn is_reset(self) -> bool {
        self == SocketEnd::Reset
    }
}

/// Everything a closing relay does, decided by [`plan`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClosePlan {
    pub(crate) reason: CloseReason,
    pub(crate) client: SocketEnd,
    pub(crate) upstream: SocketEnd,
    /// The bytes the client→upstream direction still holds as its buffer
    /// goes back (a buffer holding any is closed, never pooled).
    pub(crate) pending_c2u: usize,
    /// The same for the upstream→client direction.
    pub(crate) pending_u2c: usize,
}

#[cfg(test)]
impl ClosePlan {
    /// Which sockets are reset.
    pub(crate) fn resets(&self) -> Resets {
        Resets {
            client: self.client.is_reset(),
            upstream: self.upstream.is_reset(),
        }
    }
}

/// The close of a relay whose directions are `c2u` and `u2c`, for `reason`:
/// who is reset (see [`resets`]), who gets a FIN from the close, and what
/// each buffer still holds.
pub(crate) fn plan(reason: CloseReason, c2u: &Direction, u2c: &Direction) -> ClosePlan {
    let reset = resets(reason, c2u, u2c);
    let end = |reset: bool, toward: &Direction| {
        if reset {
            SocketEnd::Reset
        } else if toward.state() == DirState::Shut {
            SocketEnd::Close
        } else {
            SocketEnd::Fin
        }
    };
    ClosePlan {
        reason,
        // The client receives what u2c carries; the upstream what c2u carries.
        client: end(reset.client, u2c),
        upstream: end(reset.upstream, c2u),
        pending_c2u: c2u.pending(),
        pending_u2c: u2c.pending(),
    }
}

/// Which sockets a closing relay resets (SO_LINGER 0) instead of closing
/// with a FIN.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Resets {
    pub(crate) client: bool,
    pub(crate) upstream: bool,
}

/// How a close reason decides who is reset: every [`CloseReason`] falls in
/// exactly one class (the match in [`CloseClass::of`] has no catch-all, so
/// a new reason must pick one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloseClass {
    /// A socket reset or failed, or spliced itself did: both sides are reset.
    Failure,
    /// spliced cut a relay that had not ended (the drain deadline, a server
    /// down under `on-down = "kill"`, an abort): each side whose opposite
    /// peer has not sent a FIN that reached it, after every byte, is reset.
    /// Whether bytes are in flight at that instant does not matter: the
    /// peer did not close, so the side must not read a clean EOF.
    Cut,
    /// The relay ended by itself (both FINs forwarded) or lapsed (idle or
    /// FIN timeout, no upstream connected): only a side that lacks bytes its
    /// direction accepted, or a FIN its peer sent, is reset; the rest close
    /// with FIN, as HAProxy's and nginx's timeouts do.
    Lapse,
}

impl CloseClass {
    pub(crate) fn of(reason: CloseReason) -> CloseClass {
        match reason {
            CloseReason::ClientReset | CloseReason::UpstreamReset | CloseReason::Internal => {
                CloseClass::Failure
            }
            CloseReason::Shutdown | CloseReason::ServerDown | CloseReason::Aborted => {
                CloseClass::Cut
            }
            CloseReason::Eof
            | CloseReason::Idle
            | CloseReason::FinTimeout
            | CloseReason::ConnectFailed
            | CloseReason::NoServer
            | CloseReason::LocalError => CloseClass::Lapse,
        }
    }
}

/// The close decision, by the reason's [`CloseClass`]. Whatever the reason,
/// a destination that has not received every byte its direction accepted,
/// or has not had a FIN forwarded that its source sent, is reset: a cut
/// stream never ends with a clean FIN. A side reads a clean EOF only when
/// its peer really sent FIN and every byte before it was delivered.
pub(crate) fn resets(reason: CloseReason, c2u: &Direction, u2c: &Direction) -> Resets {
    // The client receives what u2c carries; the upstream what c2u carries.
    let reset = |toward: &Direction| match CloseClass::of(reason) {
        CloseClass::Failure => true,
        CloseClass::Cut => toward.state() != DirState::Shut,
        CloseClass::Lapse => toward.undelivered(),
    };
    Resets {
        client: reset(u2c),
        upstream: reset(c2u),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{Engine, Step};
    use crate::relay::PUMP_BUDGET;

    /// A direction that accepted `accepted` bytes, delivered `delivered`, and
    /// saw EOF if `eof`.
    fn direction_with(accepted: usize, delivered: usize, eof: bool) -> Direction {
        let mut d = Direction::new(Side::Client, Side::Upstream);
        let mut fills = vec![Step::Moved(accepted)];
        if eof {
            fills.push(Step::Eof);
        }
        // The engine moves at least a byte per `Moved`: none is no step.
        let mut drains = vec![Step::Moved(delivered), Step::WouldBlock];
        if delivered == 0 {
            drains.remove(0);
        }
        let mut io = Engine {
            fills: fills.into(),
            drains: drains.into(),
            ..Engine::default()
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

    const LAPSES: [CloseReason; 6] = [
        CloseReason::Eof,
        CloseReason::Idle,
        CloseReason::FinTimeout,
        CloseReason::ConnectFailed,
        CloseReason::NoServer,
        CloseReason::LocalError,
    ];
    const CUTS: [CloseReason; 3] = [
        CloseReason::Shutdown,
        CloseReason::ServerDown,
        CloseReason::Aborted,
    ];
    const FAILURES: [CloseReason; 3] = [
        CloseReason::ClientReset,
        CloseReason::UpstreamReset,
        CloseReason::Internal,
    ];

    fn neither() -> Resets {
        Resets {
            client: false,
            upstream: false,
        }
    }

    /// A direction still open with nothing in flight (a quiet moment of a
    /// stream, or an idle connection).
    fn quiet() -> Direction {
        let d = direction_with(5, 5, false);
        assert!(!d.undelivered());
        assert_eq!(d.state(), DirState::Open);
        d
    }

    #[test]
    fn every_close_reason_has_one_class() {
        for reason in CloseReason::ALL {
            let class = CloseClass::of(reason);
            let listed = [
                (LAPSES.contains(&reason), CloseClass::Lapse),
                (CUTS.contains(&reason), CloseClass::Cut),
                (FAILURES.contains(&reason), CloseClass::Failure),
            ];
            assert_eq!(
                listed.iter().filter(|(yes, _)| *yes).count(),
                1,
                "{reason} is in no list or several"
            );
            assert!(listed.contains(&(true, class)), "{reason}: {class:?}");
        }
    }

    // Lapses: the relay ended by itself, or for inactivity

    #[test]
    fn a_lapse_with_nothing_in_flight_closes_with_fins() {
        for reason in LAPSES {
            assert_eq!(resets(reason, &quiet(), &quiet()), neither(), "{reason}");
            assert_eq!(resets(reason, &done(), &quiet()), neither(), "{reason}");
            assert_eq!(resets(reason, &quiet(), &done()), neither(), "{reason}");
        }
        assert_eq!(resets(CloseReason::Eof, &done(), &done()), neither());
    }

    #[test]
    fn a_lapse_resets_only_the_destination_of_bytes_in_flight() {
        let stuck = direction_with(100, 40, false);
        assert!(stuck.undelivered());
        for reason in LAPSES {
            let towards_client = resets(reason, &done(), &stuck);
            assert_eq!(
                towards_client,
                Resets {
                    client: true,
                    upstream: false
                },
                "{reason}"
            );
            let towards_upstream = resets(reason, &stuck, &quiet());
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
    fn a_lapse_resets_the_destination_of_an_unforwarded_fin() {
        let fin_pending = direction_with(10, 0, true);
        assert_eq!(fin_pending.state(), DirState::SourceEof);
        for reason in LAPSES {
            let r = resets(reason, &fin_pending, &quiet());
            assert_eq!(
                r,
                Resets {
                    client: false,
                    upstream: true
                },
                "{reason}"
            );
        }
    }

    // Cuts: spliced ended a relay its peers had not ended

    #[test]
    fn a_cut_resets_both_sides_of_a_relay_open_both_ways() {
        for reason in CUTS {
            let expected = Resets {
                client: true,
                upstream: true,
            };
            // Nothing in flight at the instant of the cut: still a reset.
            assert_eq!(resets(reason, &quiet(), &quiet()), expected, "{reason}");
            let stuck = direction_with(100, 40, false);
            assert_eq!(resets(reason, &quiet(), &stuck), expected, "{reason}");
        }
    }

    #[test]
    fn a_cut_spares_a_side_whose_peer_finished_and_was_delivered() {
        for reason in CUTS {
            // The upstream sent FIN and every byte reached the client; the
            // client still sends.
            assert_eq!(
                resets(reason, &quiet(), &done()),
                Resets {
                    client: false,
                    upstream: true
                },
                "{reason}"
            );
            // The other way round.
            assert_eq!(
                resets(reason, &done(), &quiet()),
                Resets {
                    client: true,
                    upstream: false
                },
                "{reason}"
            );
        }
    }

    #[test]
    fn a_cut_resets_a_side_whose_peer_fin_is_not_delivered() {
        let fin_pending = direction_with(10, 0, true);
        assert_eq!(fin_pending.state(), DirState::SourceEof);
        for reason in CUTS {
            assert_eq!(
                resets(reason, &done(), &fin_pending),
                Resets {
                    client: true,
                    upstream: false
                },
                "{reason}"
            );
        }
    }

    // The plan: what becomes of each socket and buffer

    #[test]
    fn a_side_not_reset_gets_a_fin_from_the_close_unless_one_went_already() {
        let plan = plan(CloseReason::Idle, &done(), &quiet());
        assert_eq!(plan.reason, CloseReason::Idle);
        // c2u forwarded the client's FIN to the upstream; u2c sent nothing
        // the client lacks, but no FIN either.
        assert_eq!(plan.upstream, SocketEnd::Close);
        assert_eq!(plan.client, SocketEnd::Fin);
        assert_eq!(plan.resets(), neither());
    }

    #[test]
    fn the_plan_resets_whom_resets_names_and_reports_what_each_buffer_holds() {
        for reason in CloseReason::ALL {
            let (c2u, u2c) = (quiet(), direction_with(100, 40, false));
            let p = plan(reason, &c2u, &u2c);
            assert_eq!(p.resets(), resets(reason, &c2u, &u2c), "{reason}");
            assert_eq!((p.pending_c2u, p.pending_u2c), (0, 60), "{reason}");
        }
    }

    #[test]
    fn failures_and_expiries_name_their_reasons() {
        assert_eq!(failure_reason(Side::Client), CloseReason::ClientReset);
        assert_eq!(failure_reason(Side::Upstream), CloseReason::UpstreamReset);
        assert_eq!(failure_reason(Side::Internal), CloseReason::Internal);
        assert_eq!(expiry_reason(Expiry::Idle), Some(CloseReason::Idle));
        assert_eq!(
            expiry_reason(Expiry::FinTimeout),
            Some(CloseReason::FinTimeout)
        );
        assert_eq!(expiry_reason(Expiry::Connect), None);
    }

    // Failures: a socket (or spliced) failed

    #[test]
    fn a_failure_resets_both_sides_whatever_was_delivered() {
        for reason in FAILURES {
            let both = Resets {
                client: true,
                upstream: true,
            };
            assert_eq!(resets(reason, &done(), &done()), both, "{reason}");
            assert_eq!(resets(reason, &quiet(), &done()), both, "{reason}");
        }
    }
}
