//! Per-worker counters, summed on demand.
//!
//! Each worker owns its [`CounterBlock`]s and is their only writer, so the
//! relaxed atomics never contend. The blocks live in the runtime's shared
//! mapping (the stats file, [`crate::shm`]); readers (bench, tests, the
//! admin endpoint, `spliced stats`) sum a [`Stats`] snapshot from them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Why a relay ended; one of these is logged per relay at close.
///
/// The reason decides who is reset (`SO_LINGER 0`) instead of closed with a
/// FIN: a failure (`ClientReset`, `UpstreamReset`, `Internal`) resets both
/// sides; a cut by spliced (`Shutdown`, `ServerDown`, `Aborted`) resets each
/// side whose peer has not sent a FIN that reached it after every byte; the
/// rest reset only a side that lacks bytes or a FIN its peer sent.
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
    /// No server of the pool took new relays (none answers, none in the
    /// pool's role, or several claim primary): none was tried.
    NoServer,
    /// The upstream connect failed for the proxy's own want of fds, socket
    /// buffers or memory; no server was blamed.
    LocalError,
    /// The drain timeout ran out during shutdown (or the runtime was
    /// aborted); each side whose peer had not finished was reset.
    Shutdown,
    /// The proxy itself failed (no buffer, the event loop); both sides
    /// were reset.
    Internal,
    /// The program that handed the pair over aborted it; each side whose
    /// peer had not finished was reset (both, mid-stream).
    Aborted,
    /// Its server went down (or lost its role) under `on-down = "kill"`;
    /// each side whose peer had not finished was reset (both, mid-stream).
    ServerDown,
}

impl CloseReason {
    pub const ALL: [CloseReason; 12] = [
        CloseReason::Eof,
        CloseReason::Idle,
        CloseReason::FinTimeout,
        CloseReason::ClientReset,
        CloseReason::UpstreamReset,
        CloseReason::ConnectFailed,
        CloseReason::NoServer,
        CloseReason::LocalError,
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
            CloseReason::NoServer => "no-server",
            CloseReason::LocalError => "local-error",
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
            fallbacks: [AtomicU64; FallbackReason::ALL.len()],
            /// Established upstream connects by how long the attempt took,
            /// one slot per bucket of [`CONNECT_BUCKETS`] plus one past the
            /// last bound.
            connect_buckets: [AtomicU64; CONNECT_BUCKETS.len() + 1],
            /// Held clients by how long they waited, one slot per bucket
            /// of [`WAIT_BUCKETS`] plus one past the last bound.
            wait_buckets: [AtomicU64; WAIT_BUCKETS.len() + 1],
        }

        /// A sum over all workers at one moment.
        #[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
        pub struct Stats {
            $($(#[doc = $help])+ pub $name: u64,)+
            /// Relays closed, by reason (indexed like [`CloseReason::ALL`]).
            pub closed: [u64; CloseReason::ALL.len()],
            /// Directions that fell back to copy, by reason (indexed like
            /// [`FallbackReason::ALL`]).
            pub fallbacks: [u64; FallbackReason::ALL.len()],
            /// Established upstream connects per latency bucket (see
            /// [`CONNECT_BUCKETS`]; the last slot counts the slower ones).
            pub connect_buckets: [u64; CONNECT_BUCKETS.len() + 1],
            /// Held clients per wait bucket (see [`WAIT_BUCKETS`]; the last
            /// slot counts the longer waits).
            pub wait_buckets: [u64; WAIT_BUCKETS.len() + 1],
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
                    add_loaded(&mut s.closed, &w.closed);
                    add_loaded(&mut s.fallbacks, &w.fallbacks);
                    add_loaded(&mut s.connect_buckets, &w.connect_buckets);
                    add_loaded(&mut s.wait_buckets, &w.wait_buckets);
                }
                s
            }
        }

        impl std::ops::Add for Stats {
            type Output = Stats;

            fn add(mut self, other: Stats) -> Stats {
                $(self.$name += other.$name;)+
                add_values(&mut self.closed, &other.closed);
                add_values(&mut self.fallbacks, &other.fallbacks);
                add_values(&mut self.connect_buckets, &other.connect_buckets);
                add_values(&mut self.wait_buckets, &other.wait_buckets);
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
    /// Bytes written to the upstream by splice(2).
    bytes_c2u_spliced: Counter per Listener,
    /// Bytes written to the upstream from a userspace buffer.
    bytes_c2u_copied: Counter per Listener,
    /// Bytes written to the client by splice(2).
    bytes_u2c_spliced: Counter per Listener,
    /// Bytes written to the client from a userspace buffer.
    bytes_u2c_copied: Counter per Listener,
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
    /// The most pipes held by directions at once since the start.
    pipes_in_use_max: Gauge per Worker,
    /// Copy buffers held by directions now.
    buffers_in_use: Gauge per Worker,
    /// Times accepting paused: out of fds, or at the relay cap.
    accept_pauses: Counter per Worker,
    /// Times accepting paused because the process ran out of fds.
    accept_pauses_fds: Counter per Worker,
    /// Times accepting paused at the relay cap (clients wait in the backlog).
    accept_pauses_cap: Counter per Worker,
    /// Upstream connect attempts that failed.
    upstream_connect_failures: Counter per Listener,
    /// Upstream connects established.
    upstream_connects: Counter per Listener,
    /// Upstream connects that failed for the proxy's own want of fds,
    /// socket buffers or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): counted
    /// against no server.
    local_errors: Counter per Listener,
    /// Microseconds the established upstream connects took, summed.
    upstream_connect_micros: Counter per Listener,
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
    /// Active health probes run (a worker runs those of its share of the
    /// servers, whatever pools name them).
    health_probes: Counter per Worker,
    /// Active health probes that got no answer (refused, reset, timed out,
    /// a reply that is no answer).
    health_probe_failures: Counter per Worker,
    /// Clients held now: no server of the pool took relays (or every
    /// connect attempt failed) and their queue-timeout has not passed.
    clients_held: Gauge per Listener,
    /// Clients held since the start (each counted once, however often it
    /// was held again after a failed connect).
    clients_held_total: Counter per Listener,
    /// Held clients refused because their queue-timeout passed with no
    /// server (closed as no-server).
    held_timeouts: Counter per Listener,
    /// New clients refused because the listener held max-queued clients
    /// already (closed as no-server).
    refused_max_queued: Counter per Listener,
    /// Microseconds held clients waited, summed over every end of a hold
    /// (connected, timed out, gave up, refused at a drain).
    held_wait_micros: Counter per Listener,
}

/// Upper bounds (seconds) of the connect latency histogram's buckets.
pub const CONNECT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Upper bounds (seconds) of the held clients' wait histogram's buckets.
pub const WAIT_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// One server's counters as one worker writes them: a relay remembers the
/// block of the server it connected to and adds its bytes there beside its
/// listener's, so the data path pays one more relaxed add per transfer and
/// no lock. Summed over workers into [`ServerStats`].
#[derive(Debug, Default)]
#[repr(C)]
pub struct ServerBlock {
    /// Connect attempts started to the server.
    pub connect_attempts: AtomicU64,
    /// Connect attempts that failed (refused, unreachable, timed out).
    pub connect_failures: AtomicU64,
    /// Connects established.
    pub connects: AtomicU64,
    /// Microseconds the established connects took, summed.
    pub connect_micros: AtomicU64,
    /// Established connects per latency bucket, as [`CONNECT_BUCKETS`].
    pub connect_buckets: [AtomicU64; CONNECT_BUCKETS.len() + 1],
    pub bytes_c2u_spliced: AtomicU64,
    pub bytes_c2u_copied: AtomicU64,
    pub bytes_u2c_spliced: AtomicU64,
    pub bytes_u2c_copied: AtomicU64,
    /// Relays connected to the server that closed.
    pub relays_closed: AtomicU64,
}

/// The names of [`ServerBlock`]'s counters, in layout order: part of the
/// stats file's fingerprint.
pub(crate) const SERVER_COUNTERS: &[&str] = &[
    "connect_attempts",
    "connect_failures",
    "connects",
    "connect_micros",
    "connect_buckets",
    "bytes_c2u_spliced",
    "bytes_c2u_copied",
    "bytes_u2c_spliced",
    "bytes_u2c_copied",
    "relays_closed",
];

/// A server's counters summed over workers.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServerStats {
    pub connect_attempts: u64,
    pub connect_failures: u64,
    pub connects: u64,
    pub connect_micros: u64,
    pub connect_buckets: [u64; CONNECT_BUCKETS.len() + 1],
    pub bytes_c2u_spliced: u64,
    pub bytes_c2u_copied: u64,
    pub bytes_u2c_spliced: u64,
    pub bytes_u2c_copied: u64,
    pub relays_closed: u64,
}

impl ServerBlock {
    /// Counts an established connect that took `took`.
    pub(crate) fn connected(&self, took: std::time::Duration) {
        self.connect_buckets[bucket_of(took)].fetch_add(1, Relaxed);
        self.connects.fetch_add(1, Relaxed);
        self.connect_micros
            .fetch_add(took.as_micros() as u64, Relaxed);
    }

    /// Counts `n` bytes written to the client (`to_client`) or the server.
    pub(crate) fn moved(&self, to_client: bool, spliced: bool, n: u64) {
        let counter = match (to_client, spliced) {
            (false, true) => &self.bytes_c2u_spliced,
            (false, false) => &self.bytes_c2u_copied,
            (true, true) => &self.bytes_u2c_spliced,
            (true, false) => &self.bytes_u2c_copied,
        };
        counter.fetch_add(n, Relaxed);
    }
}

impl ServerStats {
    pub(crate) fn sum<'a>(blocks: impl IntoIterator<Item = &'a ServerBlock>) -> ServerStats {
        let mut s = ServerStats::default();
        for b in blocks {
            s.connect_attempts += b.connect_attempts.load(Relaxed);
            s.connect_failures += b.connect_failures.load(Relaxed);
            s.connects += b.connects.load(Relaxed);
            s.connect_micros += b.connect_micros.load(Relaxed);
            add_loaded(&mut s.connect_buckets, &b.connect_buckets);
            s.bytes_c2u_spliced += b.bytes_c2u_spliced.load(Relaxed);
            s.bytes_c2u_copied += b.bytes_c2u_copied.load(Relaxed);
            s.bytes_u2c_spliced += b.bytes_u2c_spliced.load(Relaxed);
            s.bytes_u2c_copied += b.bytes_u2c_copied.load(Relaxed);
            s.relays_closed += b.relays_closed.load(Relaxed);
        }
        s
    }

    /// Bytes client→server, both engines.
    pub fn bytes_c2u(&self) -> u64 {
        self.bytes_c2u_spliced + self.bytes_c2u_copied
    }

    /// Bytes server→client, both engines.
    pub fn bytes_u2c(&self) -> u64 {
        self.bytes_u2c_spliced + self.bytes_u2c_copied
    }
}

/// Adds another sum of the same server (another worker's, or another
/// listener's view of the address) field by field.
impl std::ops::AddAssign<&ServerStats> for ServerStats {
    fn add_assign(&mut self, other: &ServerStats) {
        self.connect_attempts += other.connect_attempts;
        self.connect_failures += other.connect_failures;
        self.connects += other.connects;
        self.connect_micros += other.connect_micros;
        for (a, b) in self.connect_buckets.iter_mut().zip(&other.connect_buckets) {
            *a += b;
        }
        self.bytes_c2u_spliced += other.bytes_c2u_spliced;
        self.bytes_c2u_copied += other.bytes_c2u_copied;
        self.bytes_u2c_spliced += other.bytes_u2c_spliced;
        self.bytes_u2c_copied += other.bytes_u2c_copied;
        self.relays_closed += other.relays_closed;
    }
}

fn bucket_of(took: std::time::Duration) -> usize {
    let secs = took.as_secs_f64();
    CONNECT_BUCKETS
        .iter()
        .position(|&bound| secs <= bound)
        .unwrap_or(CONNECT_BUCKETS.len())
}

/// Why a direction switched from splice to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FallbackReason {
    /// The worker holds `--max-pipes` pipes already, or the pipes of all
    /// workers hold every fd the fd limit leaves them.
    PipeCap,
    /// pipe2(2) failed (EMFILE, ENFILE, ENOMEM).
    NoPipe,
    /// splice(2) refused this pair of sockets (EINVAL, ENOSYS).
    SpliceRefused,
    /// Urgent data: splice cannot step over the mark.
    UrgentData,
}

impl FallbackReason {
    pub const ALL: [FallbackReason; 4] = [
        FallbackReason::PipeCap,
        FallbackReason::NoPipe,
        FallbackReason::SpliceRefused,
        FallbackReason::UrgentData,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            FallbackReason::PipeCap => "pipe-cap",
            FallbackReason::NoPipe => "no-pipe",
            FallbackReason::SpliceRefused => "splice-refused",
            FallbackReason::UrgentData => "urgent-data",
        }
    }
}

fn add_loaded<const N: usize>(sum: &mut [u64; N], live: &[AtomicU64; N]) {
    for (s, c) in sum.iter_mut().zip(live) {
        *s += c.load(Relaxed);
    }
}

fn add_values<const N: usize>(sum: &mut [u64; N], other: &[u64; N]) {
    for (s, c) in sum.iter_mut().zip(other) {
        *s += c;
    }
}

impl CounterBlock {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub(crate) fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Relaxed);
    }

    /// Adds one to a gauge and raises its high-water mark `max` to match.
    pub(crate) fn add_tracking_max(counter: &AtomicU64, max: &AtomicU64) {
        let now = counter.fetch_add(1, Relaxed) + 1;
        max.fetch_max(now, Relaxed);
    }

    pub(crate) fn closed(&self, reason: CloseReason) {
        self.closed[reason.index()].fetch_add(1, Relaxed);
    }

    pub(crate) fn fell_back(&self, reason: FallbackReason) {
        self.fallbacks[reason as usize].fetch_add(1, Relaxed);
    }

    /// Counts an established upstream connect that took `took`.
    pub(crate) fn connected(&self, took: std::time::Duration) {
        self.connect_buckets[bucket_of(took)].fetch_add(1, Relaxed);
        Self::add(&self.upstream_connects, 1);
        Self::add(&self.upstream_connect_micros, took.as_micros() as u64);
    }

    /// Counts the end of a client's hold after `waited`.
    pub(crate) fn held_for(&self, waited: std::time::Duration) {
        let bucket = WAIT_BUCKETS
            .iter()
            .position(|&bound| waited.as_secs_f64() <= bound)
            .unwrap_or(WAIT_BUCKETS.len());
        self.wait_buckets[bucket].fetch_add(1, Relaxed);
        Self::add(&self.held_wait_micros, waited.as_micros() as u64);
    }
}

impl Stats {
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason.index()]
    }

    pub fn closed_total(&self) -> u64 {
        self.closed.iter().sum()
    }

    pub fn fallbacks(&self, reason: FallbackReason) -> u64 {
        self.fallbacks[reason as usize]
    }

    /// Holds that ended (the wait histogram's count).
    pub fn held_waits(&self) -> u64 {
        self.wait_buckets.iter().sum()
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
