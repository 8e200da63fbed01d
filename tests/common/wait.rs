//! Bounded waiting: polling with a deadline, and the deliberate sleeps.

use std::thread;
use std::time::{Duration, Instant};

use spliced::{Mode, ProxyHandle, Stats};

/// Sleeps on purpose to pace a trickling or slow peer. Never used to wait for
/// something to happen.
pub fn pace(d: Duration) {
    thread::sleep(d);
}

/// Sleeps on purpose for a fixed measurement window (e.g. CPU used over 2 s).
pub fn measure_window(d: Duration) {
    thread::sleep(d);
}

/// The pause between two looks of a loop that polls against a deadline.
pub fn poll_pause() {
    thread::sleep(Duration::from_millis(5));
}

/// Waits up to `timeout` for `child` to exit; `None` if it still runs.
pub fn exit_within(
    child: &mut std::process::Child,
    timeout: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        poll_pause();
    }
}

/// Polls `cond` every few milliseconds until it holds; panics naming `what`
/// if it does not within `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    wait_for(timeout, what, || cond().then_some(()))
}

/// Polls `f` every few milliseconds until it gives a value, and returns
/// it; panics naming `what` if it gives none within `timeout`.
pub fn wait_for<V>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<V>) -> V {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        poll_pause();
    }
}

/// Like [`wait_until`] but on the proxy's stats; returns the stats that
/// satisfied `cond`, and shows the last ones on timeout.
pub fn wait_stats(
    h: &ProxyHandle,
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut(&Stats) -> bool,
) -> Stats {
    let deadline = Instant::now() + timeout;
    loop {
        let s = h.stats();
        if cond(&s) {
            return s;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}; last stats: {s:#?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until every relay has ended and every pipe and buffer is back, then
/// checks the engine-specific counters. Returns the final stats.
pub fn assert_quiescent(h: &ProxyHandle, mode: Mode) -> Stats {
    let s = wait_stats(
        h,
        Duration::from_secs(5),
        "every accepted relay is closed (with one reason) and no pipe or buffer is in use",
        |s| {
            s.relays_active == 0
                && s.pipes_in_use == 0
                && s.buffers_in_use == 0
                && s.closed_total() == s.relays_accepted
        },
    );
    if mode == Mode::Copy {
        assert_eq!(s.bytes_spliced, 0, "copy mode spliced bytes: {s:#?}");
        assert_eq!(s.pipes_created, 0, "copy mode created pipes: {s:#?}");
    }
    s
}
