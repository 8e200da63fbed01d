//! How a relay reports its end: the one `relay closed` line every relay
//! logs, and for a relay that someone waits for (a handed-off pair) a slot
//! filled once at close, a condvar for threads that block, and a task
//! waker for a future. Nothing here knows an async runtime.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::task::Waker;
use std::time::Duration;

use super::RouteTag;
use crate::error::RelayError;
use crate::stats::CloseReason;

/// The `relay closed` line, logged once per relay by [`ClosedLine::log`],
/// whether the relay ever connected or not. A field that is `None` is not
/// logged.
pub(crate) struct ClosedLine<'a> {
    pub(crate) relay: u64,
    pub(crate) client: Option<SocketAddr>,
    pub(crate) listener: &'a str,
    pub(crate) upstream: Option<SocketAddr>,
    /// What the relay moved; `None` for one that never started.
    pub(crate) traffic: Option<Traffic>,
    pub(crate) route: Option<&'a RouteTag>,
    pub(crate) reason: CloseReason,
    pub(crate) error: Option<&'a RelayError>,
}

/// What a relay moved, for its close line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Traffic {
    pub(crate) bytes_c2u: u64,
    pub(crate) bytes_u2c: u64,
    pub(crate) duration_ms: u64,
    pub(crate) engine_c2u: &'static str,
    pub(crate) engine_u2c: &'static str,
}

impl ClosedLine<'_> {
    pub(crate) fn log(&self) {
        let traffic = self.traffic.as_ref();
        tracing::info!(
            target: super::LOG_TARGET,
            relay = self.relay,
            client = self.client.map(tracing::field::display),
            listener = %self.listener,
            upstream = self.upstream.map(tracing::field::display),
            bytes_c2u = traffic.map(|t| t.bytes_c2u),
            bytes_u2c = traffic.map(|t| t.bytes_u2c),
            duration_ms = traffic.map(|t| t.duration_ms),
            engine_c2u = traffic.map(|t| tracing::field::display(t.engine_c2u)),
            engine_u2c = traffic.map(|t| tracing::field::display(t.engine_u2c)),
            route = self.route.map(|r| r.position),
            server_name = self
                .route
                .and_then(|r| r.server_name.as_deref())
                .map(tracing::field::display),
            reason = %self.reason,
            error = self.error.map(tracing::field::display),
            "relay closed"
        );
    }
}

/// What a relay did, filled in when it closed.
#[derive(Clone, Debug)]
pub(crate) struct RelayReport {
    /// Bytes written to the upstream side (from the client side).
    pub(crate) bytes_c2u: u64,
    /// Bytes written to the client side (from the upstream side).
    pub(crate) bytes_u2c: u64,
    pub(crate) duration: Duration,
    pub(crate) engine_c2u: &'static str,
    pub(crate) engine_u2c: &'static str,
    pub(crate) reason: CloseReason,
    /// The failure that ended it: the side, the operation, the error.
    pub(crate) error: Option<Arc<RelayError>>,
}

#[derive(Debug, Default)]
struct State {
    report: Option<RelayReport>,
    waker: Option<Waker>,
}

/// The shared end of one watched relay.
#[derive(Debug, Default)]
pub(crate) struct Reporter {
    state: Mutex<State>,
    done: Condvar,
    /// The relay's slab key in its worker, once placed there.
    key: AtomicUsize,
}

impl Reporter {
    /// Records where the worker keeps the relay (for an abort).
    pub(crate) fn place(&self, key: usize) {
        self.key.store(key, Ordering::Relaxed);
    }

    pub(crate) fn key(&self) -> usize {
        self.key.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half
        // written: each field is set by one assignment.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called once, by the worker, at close.
    pub(crate) fn finish(&self, report: RelayReport) {
        let waker = {
            let mut state = self.lock();
            state.report = Some(report);
            state.waker.take()
        };
        self.done.notify_all();
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    pub(crate) fn try_report(&self) -> Option<RelayReport> {
        self.lock().report.clone()
    }

    /// Blocks until the relay has closed.
    pub(crate) fn wait(&self) -> RelayReport {
        let mut state = self.lock();
        loop {
            if let Some(report) = &state.report {
                return report.clone();
            }
            state = self.done.wait(state).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The report if the relay has closed; otherwise `waker` is woken when
    /// it does.
    pub(crate) fn poll_report(&self, waker: &Waker) -> Option<RelayReport> {
        let mut state = self.lock();
        if state.report.is_none() {
            match &mut state.waker {
                Some(w) if w.will_wake(waker) => {}
                slot => *slot = Some(waker.clone()),
            }
        }
        state.report.clone()
    }
}
