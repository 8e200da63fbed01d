//! Per-worker counters, summed on demand.
//!
//! Each worker owns one [`CounterBlock`] and is its only writer, so the
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
    /// The program that handed the pair over aborted it; both sides were
    /// reset.
    Aborted,
    /// Its server went down (or lost its role) under `on-down = "kill"`;
    /// both sides were reset.
    ServerDown,
}

impl CloseReason {
    pub const ALL: [CloseReason; 10] = [
        CloseReason::Eof,
        CloseReason::Idle,
        CloseReason::FinTimeout,
        CloseReason::ClientReset,
        CloseReason::UpstreamReset,
        CloseReason::ConnectFailed,
        CloseReason::Shutdown,
        CloseReason::Internal,
        CloseReason::Aborted,
        CloseReason::ServerDown,
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
            CloseReason::Aborted => "aborted",
            CloseReason::ServerDown => "server-down",
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

/// Whether a value only grows or goes up and down.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Counter,
    Gauge,
}

/// What a counter is kept for: each listener (relays, bytes, closes) or
/// each worker (pipes, buffers, timers, which relays of every listener
/// share).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Listener,
    Worker,
}

/// One row of the counter table: what a value is called and means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CounterInfo {
    pub name: &'static str,
    pub kind: Kind,
    pub scope: Scope,
    pub help: &'static str,
}

/// Declares every counter once. From the one table come the live counter
/// block (a fixed `repr(C)` layout of plain atomics, so blocks can later
/// live in a shared-memory file), the summed [`Stats`] snapshot, and
/// [`COUNTERS`], the names, kinds, scopes and help texts an exposition is
/// made from.
///
/// Every worker has one block for its worker-scoped counters, and every
/// listener one block per worker for its listener-scoped ones; a block's
/// counters of the other scope stay zero, so any sum of blocks is right.
macro_rules! counter_table {
    ($($(#[doc = $help:literal])+ $name:ident: $kind:ident per $scope:ident,)+) => {
        /// Live counters written by one worker, the block's only writer, so
        /// the relaxed atomics never contend.
        #[derive(Debug, Default)]
        #[repr(C)]
        pub struct CounterBlock {
            $($(#[doc = $help])+ pub $name: AtomicU64,)+
            closed: [AtomicU64; CloseReason::ALL.len()],
        }

        /// A sum over all workers at one moment.
        #[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
        pub struct Stats {
            $($(#[doc = $help])+ pub $name: u64,)+
            /// Relays closed, by reason (indexed like [`CloseReason::ALL`]).
            pub closed: [u64; CloseReason::ALL.len()],
        }

        /// Every counter of [`Stats`], in declaration order.
        pub const COUNTERS: &[CounterInfo] = &[
            $(CounterInfo {
                name: stringify!($name),
                kind: Kind::$kind,
                scope: Scope::$scope,
                help: concat!($($help),+),
            },)+
        ];

        impl Stats {
            pub(crate) fn sum<'a>(blocks: impl IntoIterator<Item = &'a CounterBlock>) -> Stats {
                let mut s = Stats::default();
                for w in blocks {
                    $(s.$name += w.$name.load(Relaxed);)+
                    for (sum, c) in s.closed.iter_mut().zip(&w.closed) {
                        *sum += c.load(Relaxed);
                    }
                }
                s
            }
        }

        impl std::ops::Add for Stats {
            type Output = Stats;

            fn add(mut self, other: Stats) -> Stats {
                $(self.$name += other.$name;)+
                for (sum, c) in self.closed.iter_mut().zip(other.closed) {
                    *sum += c;
                }
                self
            }
        }

        impl Stats {
            /// Each counter's value, in the order of [`COUNTERS`].
            pub fn values(&self) -> Vec<u64> {
                vec![$(self.$name),+]
            }
        }
    };
}

counter_table! {
    /// Connections accepted.
    relays_accepted: Counter per Listener,
    /// Relays alive now.
    relays_active: Gauge per Listener,
    /// Bytes written to a destination by splice(2).
    bytes_spliced: Counter per Listener,
    /// Bytes written to a destination from a userspace buffer.
    bytes_copied: Counter per Listener,
    /// Directions that fell back from splice to copy (no pipe, splice
    /// refused, urgent data).
    splice_fallbacks: Counter per Listener,
    /// Times an auto-mode direction switched engines (always with its
    /// buffer empty).
    engine_switches: Counter per Listener,
    /// Pipes held by directions now.
    pipes_in_use: Gauge per Worker,
    /// Empty pipes kept for reuse.
    pipes_idle: Gauge per Worker,
    /// Pipes created.
    pipes_created: Counter per Worker,
    /// Copy buffers held by directions now.
    buffers_in_use: Gauge per Worker,
    /// Times accepting paused: out of fds, or at the relay cap.
    accept_pauses: Counter per Worker,
    /// Upstream connect attempts that failed.
    upstream_connect_failures: Counter per Listener,
    /// Entries in the workers' deadline heaps (live and not yet swept).
    timer_entries: Gauge per Worker,
    /// Connections reset because the listener's allow/deny list refused
    /// the client.
    refused_denied: Counter per Listener,
    /// Connections reset because their client IP was at the listener's
    /// max-conns-per-source.
    refused_max_conns_per_source: Counter per Listener,
    /// Times a listener stopped accepting at its own max-conns.
    listener_limit_pauses: Counter per Listener,
    /// Connections reset under accept-proxy: an untrusted source, a
    /// malformed header, or none within the deadline.
    refused_proxy_header: Counter per Listener,
    /// PostgreSQL CancelRequests sent on to every server of the pool.
    pg_cancel_requests: Counter per Listener,
    /// Active health probes run.
    health_probes: Counter per Listener,
    /// Active health probes that judged their server down.
    health_probe_failures: Counter per Listener,
}

impl CounterBlock {
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

impl Stats {
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()]
    }

    pub fn closed_total(&self) -> u64 {
        self.closed.iter().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_names_every_counter_once_with_help() {
        let mut names: Vec<&str> = COUNTERS.iter().map(|c| c.name).collect();
        assert_eq!(names.len(), Stats::default().values().len());
        names.sort();
        names.dedup();
        assert_eq!(names.len(), COUNTERS.len(), "a counter is declared twice");
        assert!(COUNTERS.iter().all(|c| !c.help.trim().is_empty()));
        // Closes are counted per listener, beside the table.
        assert!(COUNTERS.iter().any(|c| c.scope == Scope::Worker));
    }

    #[test]
    fn sums_add_workers_and_keep_the_table_order() {
        let (a, b) = (CounterBlock::default(), CounterBlock::default());
        CounterBlock::add(&a.bytes_spliced, 5);
        CounterBlock::add(&b.bytes_spliced, 7);
        CounterBlock::add(&b.relays_active, 2);
        CounterBlock::sub(&b.relays_active, 1);
        b.closed(CloseReason::Idle);
        let s = Stats::sum([&a, &b]);
        assert_eq!(s.bytes_spliced, 12);
        assert_eq!(s.relays_active, 1);
        assert_eq!(s.closed(CloseReason::Idle), 1);
        assert_eq!(s.closed_total(), 1);
        let at = |name| COUNTERS.iter().position(|c| c.name == name).unwrap();
        assert_eq!(s.values()[at("bytes_spliced")], 12);
        assert_eq!(COUNTERS[at("relays_active")].kind, Kind::Gauge);
    }
}
