//! Per-worker counters, summed on demand.
//!
//! Each worker owns one [`WorkerCounters`] and is its only writer, so the
//! relaxed atomics never contend; readers (bench, tests, later metrics and
//! `spliced stats`) sum a [`Stats`] snapshot from all workers.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a relay ended; one of these is logged per relay at close.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloseReason {
    /// Both directions forwarded their FIN.
    Eof,
    /// No byte moved for the idle timeout.
    Idle,
    /// A half-closed relay was inactive for the FIN timeout.
    FinTimeout,
    /// The client reset or failed; the upstream was reset too.
    ClientReset,
    /// The upstream reset or failed; the client was reset too.
    UpstreamReset,
    /// No upstream could be connected within the connect timeout.
    ConnectFailed,
    /// The drain timeout ran out during shutdown.
    Shutdown,
    /// The proxy itself failed (no buffer, the event loop); both sides
    /// were reset.
    Internal,
}

impl CloseReason {
    pub const ALL: [CloseReason; 8] = [
        CloseReason::Eof,
        CloseReason::Idle,
        CloseReason::FinTimeout,
        CloseReason::ClientReset,
        CloseReason::UpstreamReset,
        CloseReason::ConnectFailed,
        CloseReason::Shutdown,
        CloseReason::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Eof => "eof",
            CloseReason::Idle => "idle",
            CloseReason::FinTimeout => "fin-timeout",
            CloseReason::ClientReset => "client-reset",
            CloseReason::UpstreamReset => "upstream-reset",
            CloseReason::ConnectFailed => "connect-failed",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Internal => "internal-error",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

impl std::fmt::Display for CloseReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Live counters of one worker. Gauges (`*_active`, `pipes_*`) go up and down.
#[derive(Debug, Default)]
pub struct WorkerCounters {
    pub relays_accepted: AtomicU64,
    pub relays_active: AtomicU64,
    pub bytes_spliced: AtomicU64,
    pub bytes_copied: AtomicU64,
    /// Directions that fell back from splice to copy (no pipe, or splice refused).
    pub splice_fallbacks: AtomicU64,
    pub pipes_in_use: AtomicU64,
    pub pipes_idle: AtomicU64,
    pub pipes_created: AtomicU64,
    pub buffers_in_use: AtomicU64,
    /// Times accept was paused because the process or system ran out of fds.
    pub accept_pauses: AtomicU64,
    pub upstream_connect_failures: AtomicU64,
    /// Entries in the worker's deadline heap (live and not yet swept).
    pub timer_entries: AtomicU64,
    closed: [AtomicU64; CloseReason::ALL.len()],
}

impl WorkerCounters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub(crate) fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Relaxed);
    }

    pub(crate) fn closed(&self, reason: CloseReason) {
        self.closed[reason.index()].fetch_add(1, Relaxed);
    }
}

/// A sum over all workers at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    pub relays_accepted: u64,
    pub relays_active: u64,
    pub bytes_spliced: u64,
    pub bytes_copied: u64,
    pub splice_fallbacks: u64,
    pub pipes_in_use: u64,
    pub pipes_idle: u64,
    pub pipes_created: u64,
    pub buffers_in_use: u64,
    pub accept_pauses: u64,
    pub upstream_connect_failures: u64,
    pub timer_entries: u64,
    /// Relays closed, by reason (indexed like [`CloseReason::ALL`]).
    pub closed: [u64; CloseReason::ALL.len()],
}

impl Stats {
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()]
    }

    pub fn closed_total(&self) -> u64 {
        self.closed.iter().sum()
    }

    pub(crate) fn sum<'a>(workers: impl IntoIterator<Item = &'a WorkerCounters>) -> Stats {
        let mut s = Stats::default();
        for w in workers {
            s.relays_accepted += w.relays_accepted.load(Relaxed);
            s.relays_active += w.relays_active.load(Relaxed);
            s.bytes_spliced += w.bytes_spliced.load(Relaxed);
            s.bytes_copied += w.bytes_copied.load(Relaxed);
            s.splice_fallbacks += w.splice_fallbacks.load(Relaxed);
            s.pipes_in_use += w.pipes_in_use.load(Relaxed);
            s.pipes_idle += w.pipes_idle.load(Relaxed);
            s.pipes_created += w.pipes_created.load(Relaxed);
            s.buffers_in_use += w.buffers_in_use.load(Relaxed);
            s.accept_pauses += w.accept_pauses.load(Relaxed);
            s.upstream_connect_failures += w.upstream_connect_failures.load(Relaxed);
            s.timer_entries += w.timer_entries.load(Relaxed);
            for (sum, c) in s.closed.iter_mut().zip(&w.closed) {
                *sum += c.load(Relaxed);
            }
        }
        s
    }
}
