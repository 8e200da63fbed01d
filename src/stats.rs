//! Per-worker counters, summed on demand.
//!
//! Each worker owns its [`CounterBlock`]s and is their only writer, so the
//! relaxed atomics never contend. The blocks live in the runtime's shared
//! mapping (the stats file, [`crate::shm`]); readers (bench, tests, the
//! admin endpoint, `spliced stats`) sum a [`Stats`] snapshot from them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Each name of an enum with `ALL` and a `const fn as_str`, in the order
/// of `ALL`: a loop in a const block, since a const fn cannot be handed
/// `as_str`.
macro_rules! names_in_order {
    ($n:literal) => {{
        let mut names = [""; $n];
        let mut i = 0;
        while i < names.len() {
            names[i] = Self::ALL[i].as_str();
            i += 1;
        }
        names
    }};
}

/// Why a relay ended; one of these is logged per relay at close.
///
/// The reason decides who is reset (`SO_LINGER 0`) instead of closed with a
/// FIN: a failure (`ClientReset`, `UpstreamReset`, `Internal`) resets both
/// sides; a cut by spliced (`Shutdown`, `ServerDown`, `Aborted`) resets each
/// side whose peer has not sent a FIN that reached it after every byte; the
/// rest reset only a side that lacks bytes or a FIN its peer sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "kebab-case")
)]
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

    /// Each reason's name, in the order of [`CloseReason::ALL`].
    pub const NAMES: [&'static str; 12] = names_in_order!(12);

    pub const fn as_str(self) -> &'static str {
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

#[macro_use]
mod table;
pub use table::{
    ByReasonInfo, CounterInfo, HistogramInfo, HistogramValues, Kind, Metric, Scope, Shown, Table,
    Values,
};

// Every worker has one block for its worker-scoped counters, and every
// listener one block per worker for its listener-scoped ones; a block's
// counters of the other scope stay zero, so any sum of blocks is right.
counter_table! {
    /// Live counters written by one worker, the block's only writer, so
    /// the relaxed atomics never contend.
    block CounterBlock;
    /// A sum over all workers at one moment.
    sum Stats;
    /// Every listener and worker counter: names, kinds, scopes, help, and
    /// where each is shown.
    table COUNTERS;
    counters {
        /// Connections accepted.
        relays_accepted: Counter per Listener => ["spliced_connections_accepted"
            "Client connections accepted (or pairs handed over).", column "ACCEPTED"],
        /// Relays alive now.
        relays_active: Gauge per Listener => ["spliced_connections_active"
            "Relays alive now.", column "ACTIVE"],
        /// Bytes written to a destination by splice(2).
        bytes_spliced: Counter per Listener => [column "SPLICE"],
        /// Bytes written to a destination from a userspace buffer.
        bytes_copied: Counter per Listener => [column "SPLICE"],
        /// Bytes written to the upstream by splice(2).
        bytes_c2u_spliced: Counter per Listener => ["spliced_bytes"
            {direction = "client_to_upstream", engine = "splice"}
            "Bytes written to a destination, by direction and by engine (splice: through a pipe; copy: through a userspace buffer).",
            column "C>U/s"],
        /// Bytes written to the upstream from a userspace buffer.
        bytes_c2u_copied: Counter per Listener => ["spliced_bytes"
            {direction = "client_to_upstream", engine = "copy"}, column "C>U/s"],
        /// Bytes written to the client by splice(2).
        bytes_u2c_spliced: Counter per Listener => ["spliced_bytes"
            {direction = "upstream_to_client", engine = "splice"}, column "U>C/s"],
        /// Bytes written to the client from a userspace buffer.
        bytes_u2c_copied: Counter per Listener => ["spliced_bytes"
            {direction = "upstream_to_client", engine = "copy"}, column "U>C/s"],
        /// Directions that fell back from splice to copy (no pipe, splice
        /// refused, urgent data).
        splice_fallbacks: Counter per Listener => [column "FALLBK"],
        /// Times an auto-mode direction switched engines (always with its
        /// buffer empty).
        engine_switches: Counter per Listener => ["spliced_engine_switches"
            "Times a direction of an auto-mode listener switched between copy and splice."],
        /// Pipes held by directions now.
        pipes_in_use: Gauge per Worker => ["spliced_pipes_in_use"
            "Pipes held by directions now.", column "PIPES-USE"],
        /// Empty pipes kept for reuse.
        pipes_idle: Gauge per Worker => ["spliced_pipes_pooled"
            "Empty pipes kept for reuse.", column "POOLED"],
        /// Pipes created.
        pipes_created: Counter per Worker => ["spliced_pipes_created" "Pipes created."],
        /// The most pipes held by directions at once since the start.
        pipes_in_use_max: Gauge per Worker => ["spliced_pipes_in_use_max"
            "The most pipes held by directions at once since the start.", column "PIPES-MAX"],
        /// Copy buffers held by directions now.
        buffers_in_use: Gauge per Worker => ["spliced_copy_buffers_in_use"
            "Userspace copy buffers held by directions now.", column "BUFFERS"],
        /// Times accepting paused: out of fds, or at the relay cap.
        accept_pauses: Counter per Worker => [column "PAUSES"],
        /// Times accepting paused because the process ran out of fds.
        accept_pauses_fds: Counter per Worker => ["spliced_accept_pauses" {reason = "fds"}
            "Times a worker paused accepting, by reason (fds: out of file descriptors; relay-cap: at --max-conns, clients wait in the backlog)."],
        /// Times accepting paused at the relay cap (clients wait in the backlog).
        accept_pauses_cap: Counter per Worker => ["spliced_accept_pauses" {reason = "relay-cap"}],
        /// Upstream connect attempts that failed.
        upstream_connect_failures: Counter per Listener => ["spliced_upstream_connect_failures"
            "Upstream connect attempts that failed (each failed server of a failover counts).",
            column "CONN-FAIL"],
        /// Upstream connects established.
        upstream_connects: Counter per Listener => [],
        /// Upstream connects that failed for the proxy's own want of fds,
        /// socket buffers or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM): counted
        /// against no server.
        local_errors: Counter per Listener => ["spliced_local_errors" {op = "connect"}
            "Operations that failed for the proxy's own want of fds, socket buffers or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), by operation; counted against no server. op=connect: an upstream connect, whose client was closed (reason local-error).",
            column "LOCAL-ERR"],
        /// Microseconds the established upstream connects took, summed.
        upstream_connect_micros: Counter per Listener => [],
        /// io_uring submissions the uring loop made (batches of two calls
        /// or more; a single call is made as a plain system call).
        ring_batches: Counter per Worker => ["spliced_uring_batches"
            "io_uring submissions a worker of the uring loop made, each one io_uring_enter for the socket reads or writes of several relays (a batch of one is made as a plain call and not counted)."],
        /// The socket reads and writes those submissions carried.
        ring_calls: Counter per Worker => ["spliced_uring_calls"
            "The socket reads and writes the uring loop's io_uring submissions carried."],
        /// Receives armed on the ring that were answered.
        ring_receives: Counter per Worker => ["spliced_uring_receives"
            "Receives the uring loop armed on its io_uring for copy relays (each waits in the kernel for its socket's bytes) that were answered: with bytes, EOF, an error, or a cancellation."],
        /// Entries in the workers' deadline heaps (live and not yet swept).
        timer_entries: Gauge per Worker => ["spliced_timer_entries"
            "Entries in a worker's deadline heap (live and not yet swept).", column "TIMERS"],
        /// Connections reset because the listener's allow/deny list refused
        /// the client.
        refused_denied: Counter per Listener => ["spliced_connections_refused"
            {limit = "allow-deny"}
            "Client connections reset before any upstream connect, by limit: allow-deny (the listener's access lists), max-conns-per-source, or proxy-header (accept-proxy: untrusted source, bad or missing header)."],
        /// Connections reset because their client IP was at the listener's
        /// max-conns-per-source.
        refused_max_conns_per_source: Counter per Listener => ["spliced_connections_refused"
            {limit = "max-conns-per-source"}],
        /// Times a listener stopped accepting at its own max-conns.
        listener_limit_pauses: Counter per Listener => ["spliced_listener_limit_pauses"
            "Times a listener stopped accepting at its own max-conns (clients wait in the backlog)."],
        /// Connections reset under accept-proxy: an untrusted source, a
        /// malformed header, or none within the deadline.
        refused_proxy_header: Counter per Listener => ["spliced_connections_refused"
            {limit = "proxy-header"}],
        /// PostgreSQL CancelRequests sent on to every server of the pool.
        pg_cancel_requests: Counter per Listener => ["spliced_pg_cancel_requests"
            "PostgreSQL CancelRequests sent on to every server of the pool (protocol = \"postgres\")."],
        /// Active health probes run (a worker runs those of its share of the
        /// servers, whatever pools name them).
        health_probes: Counter per Worker => ["spliced_health_probes"
            "Active health probes a worker ran (each server is probed by one worker)."],
        /// Active health probes that got no answer (refused, reset, timed out,
        /// a reply that is no answer).
        health_probe_failures: Counter per Worker => ["spliced_health_probe_failures"
            "Of those, the probes that got no answer (refused, reset, timed out, a reply that is no answer); role answers and check errors are answers."],
        /// Clients held now: no server of the pool took relays (or every
        /// connect attempt failed) and their queue-timeout has not passed.
        clients_held: Gauge per Listener => ["spliced_clients_held"
            "Clients held now, waiting for a server of the pool to take relays (queue-timeout): no upstream connect, their bytes in the socket.",
            column "HELD"],
        /// Times a client was held (one held again after failed connects
        /// counts again).
        clients_held_total: Counter per Listener => ["spliced_holds"
            "Times a client was held because no server of its pool took it (a client held again after its connects failed counts again)."],
        /// Held clients refused because their queue-timeout passed with no
        /// server (closed as no-server).
        held_timeouts: Counter per Listener => ["spliced_held_timeouts"
            "Held clients refused because their queue-timeout passed with no server (closed as no-server)."],
        /// New clients refused because no server took them and the
        /// listener held max-queued clients already (closed as no-server).
        refused_max_queued: Counter per Listener => ["spliced_connections_refused"
            {limit = "max-queued"}],
        /// Clients of a listener with routes that no route took (no
        /// default route): reset, no upstream contacted.
        refused_no_route: Counter per Listener => ["spliced_connections_refused"
            {limit = "no-route"}],
        /// Holds that ended (connected, timed out, gave up, refused at a
        /// drain or a reload).
        held_waits: Counter per Listener => [],
        /// Microseconds held clients waited, summed over the holds that
        /// ended.
        held_wait_micros: Counter per Listener => [],
    }
    by_reason {
        /// Relays closed, by reason (indexed like [`CloseReason::ALL`]).
        closed[CloseReason]: per Listener
            => "spliced_connections_closed" {reason} "Relays closed, by reason.",
        /// Directions that fell back to copy, by reason (indexed like
        /// [`FallbackReason::ALL`]).
        fallbacks[FallbackReason]: per Listener
            => "spliced_splice_fallbacks" {reason} "Directions that switched from splice to copy, by reason.",
    }
    histograms {
        /// Established upstream connects per latency bucket (see
        /// [`CONNECT_BUCKETS`]; the last slot counts the slower ones).
        connect_buckets[CONNECT_BUCKETS]: per Listener,
            count upstream_connects, micros upstream_connect_micros
            => "spliced_upstream_connect_duration_seconds"
            "Time from starting an upstream connect to its establishment, per attempt that succeeded.",
        /// Held clients per wait bucket (see [`WAIT_BUCKETS`]; the last
        /// slot counts the longer waits).
        wait_buckets[WAIT_BUCKETS]: per Listener,
            count held_waits, micros held_wait_micros
            => "spliced_held_wait_duration_seconds"
            "How long held clients waited, from accept to the end of the hold (connected, timed out, gave up, refused at a drain or a reload).",
    }
}

/// Upper bounds (seconds) of the connect latency histogram's buckets.
pub const CONNECT_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Upper bounds (seconds) of the held clients' wait histogram's buckets.
pub const WAIT_BUCKETS: [f64; 15] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

counter_table! {
    /// One server's counters as one worker writes them: a relay remembers
    /// the block of the server it connected to and adds its bytes there
    /// beside its listener's, so the data path pays one more relaxed add per
    /// transfer and no lock. Summed over workers into [`ServerStats`].
    block ServerBlock;
    /// A server's counters summed over workers.
    sum ServerStats;
    /// Every per-server counter: names, kinds, help, and where each is
    /// shown (labelled by listener and server).
    table SERVER_COUNTERS;
    counters {
        /// Connect attempts started to the server.
        connect_attempts: Counter per Server => ["spliced_server_connect_attempts"
            "Upstream connects started to the server (each server of a failover counts once)."],
        /// Connect attempts that failed (refused, unreachable, timed out).
        connect_failures: Counter per Server => ["spliced_server_connect_failures"
            "Upstream connects to the server that failed (refused, unreachable, timed out).",
            column "FAILS"],
        /// Connects established.
        connects: Counter per Server => [column "CONNECTS"],
        /// Microseconds the established connects took, summed.
        connect_micros: Counter per Server => [],
        /// Bytes written to the server by splice(2).
        bytes_c2u_spliced: Counter per Server => ["spliced_server_bytes"
            {direction = "client_to_upstream", engine = "splice"}
            "Bytes relayed through the server's relays, by direction and by engine (splice: through a pipe; copy: through a userspace buffer).",
            column "C>U/s"],
        /// Bytes written to the server from a userspace buffer.
        bytes_c2u_copied: Counter per Server => ["spliced_server_bytes"
            {direction = "client_to_upstream", engine = "copy"}, column "C>U/s"],
        /// Bytes the server sent, written to the client by splice(2).
        bytes_u2c_spliced: Counter per Server => ["spliced_server_bytes"
            {direction = "upstream_to_client", engine = "splice"}, column "U>C/s"],
        /// Bytes the server sent, written to the client from a userspace
        /// buffer.
        bytes_u2c_copied: Counter per Server => ["spliced_server_bytes"
            {direction = "upstream_to_client", engine = "copy"}, column "U>C/s"],
        /// Relays connected to the server that closed.
        relays_closed: Counter per Server => ["spliced_server_connections_closed"
            "Relays connected to the server that closed."],
    }
    by_reason {}
    histograms {
        /// Established connects per latency bucket, as [`CONNECT_BUCKETS`].
        connect_buckets[CONNECT_BUCKETS]: per Server,
            count connects, micros connect_micros
            => "spliced_server_connect_duration_seconds"
            "Time from starting a connect to the server to its establishment, per attempt that succeeded.",
    }
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
    /// Bytes client→server, both engines.
    pub fn bytes_c2u(&self) -> u64 {
        self.bytes_c2u_spliced + self.bytes_c2u_copied
    }

    /// Bytes server→client, both engines.
    pub fn bytes_u2c(&self) -> u64 {
        self.bytes_u2c_spliced + self.bytes_u2c_copied
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
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize),
    serde(rename_all = "kebab-case")
)]
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

    /// Each reason's name, in the order of [`FallbackReason::ALL`].
    pub const NAMES: [&'static str; 4] = names_in_order!(4);

    pub const fn as_str(self) -> &'static str {
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
        Self::add(&self.held_waits, 1);
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
}

#[cfg(test)]
mod tests;
