//! Checks shared by both drivers.

use crate::error::{Op, RelayError, Side};
use crate::relay::{ClosePlan, DirState, Direction, SocketEnd};
use crate::stats::CloseReason;

use super::engine::{Call, Discard, Engine};

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

/// The direction's part of the relay close, with the `pending` bytes the
/// close plan says it holds: the buffer goes back (pooled only if empty);
/// nothing stays held.
pub(super) fn close_direction(pending: usize, io: &mut Engine) -> Discard {
    assert_eq!(
        pending, io.buffered,
        "the close plan's pending differs from the bytes buffered"
    );
    let done = io.discard(pending);
    assert!(!io.holding);
    if pending > 0 {
        assert_eq!(
            done,
            Discard::Closed,
            "a buffer holding bytes went back to the pool"
        );
    }
    done
}

/// The core's close plan, checked against the engines' books rather than
/// the directions' states. `toward_client` is the upstream→client engine,
/// `toward_upstream` the client→upstream one. A side reads a clean EOF
/// only if its direction's source really sent FIN and it was forwarded
/// after every byte; beyond that, a failure resets both sides, a cut by
/// spliced every side whose peer has not finished, and a lapse (both FINs
/// forwarded, an inactivity deadline) only a side lacking bytes or a FIN.
/// A side not reset gets its FIN from the close unless one was forwarded.
pub(crate) fn check_close_plan(plan: &ClosePlan, toward_client: &Engine, toward_upstream: &Engine) {
    let reason = plan.reason;
    for (end, io, side) in [
        (plan.client, toward_client, "client"),
        (plan.upstream, toward_upstream, "upstream"),
    ] {
        let reset = end == SocketEnd::Reset;
        let all_delivered = io.drained == io.filled;
        let fin_through = io.source_eof && io.shutdowns == 1 && all_delivered;
        let lacking = !all_delivered || (io.source_eof && !fin_through);
        let expected = match reason {
            CloseReason::ClientReset | CloseReason::UpstreamReset | CloseReason::Internal => true,
            CloseReason::Shutdown | CloseReason::ServerDown | CloseReason::Aborted => !fin_through,
            CloseReason::Eof
            | CloseReason::Idle
            | CloseReason::FinTimeout
            | CloseReason::ConnectFailed
            | CloseReason::NoServer
            | CloseReason::LocalError => lacking,
        };
        if lacking {
            assert!(
                reset,
                "{reason}: the {side} lacks bytes or a FIN but is not reset"
            );
        }
        assert_eq!(
            reset, expected,
            "{reason}: the {side} (delivered {} of {}, source EOF {}, FINs {}) reset: {reset}",
            io.drained, io.filled, io.source_eof, io.shutdowns
        );
        if !reset {
            let fin_forwarded = io.shutdowns == 1;
            let expected = if fin_forwarded {
                SocketEnd::Close
            } else {
                SocketEnd::Fin
            };
            assert_eq!(
                end, expected,
                "{reason}: the {side} (FINs {})",
                io.shutdowns
            );
        }
    }
}
