//! `/metrics`: the stats mapping read at scrape time and encoded by
//! prometheus-client in the Prometheus text format (0.0.4).
//!
//! Nothing is registered ahead: a [`Collector`] reads one [`Snapshot`] per
//! scrape (plain atomic loads of the blocks the workers write), so a scrape
//! never takes a lock a worker could wait on.

use std::collections::BTreeMap;
use std::fmt::Error;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::shm::{Arena, InstanceState, Snapshot};
use crate::stats::{CloseReason, FallbackReason, ServerStats, Stats, CONNECT_BUCKETS};

type Labels = Vec<(&'static str, String)>;

/// One metric: its name (counters without `_total`, which the encoder
/// adds), help, type, and its labelled values.
struct Family {
    name: &'static str,
    help: &'static str,
    kind: MetricType,
    values: Vec<(Labels, u64)>,
}

fn family(name: &'static str, help: &'static str, kind: MetricType) -> Family {
    Family {
        name,
        help,
        kind,
        values: Vec::new(),
    }
}

impl Family {
    fn encode(&self, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
        let mut metric = encoder.encode_descriptor(self.name, self.help, None, self.kind)?;
        for (labels, v) in &self.values {
            let one = metric.encode_family(labels)?;
            match self.kind {
                MetricType::Counter => ConstCounter::new(*v).encode(one)?,
                _ => ConstGauge::new(i64::try_from(*v).unwrap_or(i64::MAX)).encode(one)?,
            }
        }
        Ok(())
    }
}

/// Encodes every metric of a snapshot.
struct Spliced {
    arena: Arc<Arena>,
    servers: super::ServerSamples,
}

impl std::fmt::Debug for Spliced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spliced").finish_non_exhaustive()
    }
}

impl Collector for Spliced {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        let snap = self.arena.snapshot();
        for f in families(&snap) {
            f.encode(&mut encoder)?;
        }
        for f in server_families(&(self.servers)()) {
            f.encode(&mut encoder)?;
        }
        let servers = server_totals(&snap);
        for f in server_counter_families(&servers) {
            f.encode(&mut encoder)?;
        }
        encode_connect_histogram(&snap, &mut encoder)?;
        encode_server_connect_histogram(&servers, &mut encoder)
    }
}

/// Each server's counters by (listener, address). Two slots with the same
/// labels (a listener removed and added again by reloads, both with relays
/// left) are summed, so no series is written twice.
fn server_totals(snap: &Snapshot) -> BTreeMap<(String, String), ServerStats> {
    let mut out: BTreeMap<(String, String), ServerStats> = BTreeMap::new();
    for s in &snap.servers {
        *out.entry((s.listener.clone(), s.addr.clone())).or_default() += &s.total();
    }
    out
}

/// Per server: connect attempts and failures, bytes each way by engine,
/// relays closed (from the server slots of the stats mapping).
fn server_counter_families(servers: &BTreeMap<(String, String), ServerStats>) -> Vec<Family> {
    use MetricType::Counter;
    let mut attempts = family(
        "spliced_server_connect_attempts",
        "Upstream connects started to the server (each server of a failover counts once).",
        Counter,
    );
    let mut failures = family(
        "spliced_server_connect_failures",
        "Upstream connects to the server that failed (refused, unreachable, timed out).",
        Counter,
    );
    let mut bytes = family(
        "spliced_server_bytes",
        "Bytes relayed through the server's relays, by direction and by engine (splice: through a pipe; copy: through a userspace buffer).",
        Counter,
    );
    let mut closed = family(
        "spliced_server_connections_closed",
        "Relays connected to the server that closed.",
        Counter,
    );
    for ((name, addr), s) in servers {
        let at = with(listener(name), "server", addr);
        attempts.values.push((at.clone(), s.connect_attempts));
        failures.values.push((at.clone(), s.connect_failures));
        closed.values.push((at.clone(), s.relays_closed));
        for (direction, engine, v) in [
            ("client_to_upstream", "splice", s.bytes_c2u_spliced),
            ("client_to_upstream", "copy", s.bytes_c2u_copied),
            ("upstream_to_client", "splice", s.bytes_u2c_spliced),
            ("upstream_to_client", "copy", s.bytes_u2c_copied),
        ] {
            let labels = with(with(at.clone(), "direction", direction), "engine", engine);
            bytes.values.push((labels, v));
        }
    }
    vec![attempts, failures, bytes, closed]
}

fn encode_server_connect_histogram(
    servers: &BTreeMap<(String, String), ServerStats>,
    encoder: &mut DescriptorEncoder,
) -> Result<(), Error> {
    let mut metric = encoder.encode_descriptor(
        "spliced_server_connect_duration_seconds",
        "Time from starting a connect to the server to its establishment, per attempt that succeeded.",
        None,
        MetricType::Histogram,
    )?;
    for ((name, addr), s) in servers {
        let sum = s.connect_micros as f64 / 1e6;
        let labels = with(listener(name), "server", addr);
        metric
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(
                sum,
                s.connects,
                &histogram_buckets(&s.connect_buckets),
                None,
            )?;
    }
    Ok(())
}

/// Per-bucket counts (not cumulative; the encoder adds them up) with their
/// upper bounds, the last one +Inf.
fn histogram_buckets(counts: &[u64; CONNECT_BUCKETS.len() + 1]) -> Vec<(f64, u64)> {
    let mut buckets: Vec<(f64, u64)> = CONNECT_BUCKETS
        .iter()
        .zip(counts)
        .map(|(&bound, &n)| (bound, n))
        .collect();
    buckets.push((f64::INFINITY, counts[CONNECT_BUCKETS.len()]));
    buckets
}

/// Per server of each listener's pool: whether it takes new relays, its
/// state as the pool judges it, the role its last answer reported (also
/// while down), when its last check ended, the relays it holds, and a
/// replica's replication lag.
fn server_families(servers: &[(String, crate::upstream::ServerSample)]) -> Vec<Family> {
    use MetricType::Gauge;
    let mut up = family(
        "spliced_server_up",
        "1 while a pool server takes new connections (it answers, in the pool's role), else 0.",
        Gauge,
    );
    let mut state = family(
        "spliced_server_state",
        "1 for the server's state as its pool judges it (up, down, wrong-role, check-error, unknown, standby, lagging), 0 for the others.",
        Gauge,
    );
    let mut role = family(
        "spliced_server_role",
        "1 for the role the server's last answer reported (primary, replica or unknown), also while it is down.",
        Gauge,
    );
    let mut checked = family(
        "spliced_server_last_check_timestamp_seconds",
        "When the server's last active check ended (Unix time); absent before the first.",
        Gauge,
    );
    let mut active = family(
        "spliced_server_connections_active",
        "Relays connected to the server now.",
        Gauge,
    );
    let mut backup = family(
        "spliced_server_backup",
        "1 for a backup server (used only while no other server is up).",
        Gauge,
    );
    let mut lag = family(
        "spliced_server_replication_lag_bytes",
        "A replica's replication lag behind its primary in bytes (WAL or replication stream), as the health checks measured it; absent while not measured.",
        Gauge,
    );
    for (name, s) in servers {
        let at = with(listener(name), "server", &s.addr.to_string());
        up.values.push((at.clone(), u64::from(s.up)));
        for st in crate::upstream::eligible::State::ALL {
            state.values.push((
                with(at.clone(), "state", st.name()),
                u64::from(st == s.state),
            ));
        }
        if let Some(t) = s.last_check {
            let secs = t
                .duration_since(std::time::SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            checked.values.push((at.clone(), secs));
        }
        let r = match s.role {
            Some(crate::health::Role::Primary) => "primary",
            Some(crate::health::Role::Replica) => "replica",
            None => "unknown",
        };
        role.values.push((with(at.clone(), "role", r), 1));
        active.values.push((at.clone(), s.live as u64));
        if let Some(bytes) = s.lag {
            lag.values.push((at.clone(), bytes));
        }
        backup.values.push((at, u64::from(s.backup)));
    }
    vec![up, state, role, checked, active, backup, lag]
}

fn listener(name: &str) -> Labels {
    vec![("listener", name.to_string())]
}

fn with(mut labels: Labels, key: &'static str, value: &str) -> Labels {
    labels.push((key, value.to_string()));
    labels
}

/// Every counter and gauge but the histogram, in the order of
/// docs/OPERATIONS.md.
fn families(snap: &Snapshot) -> Vec<Family> {
    use MetricType::{Counter, Gauge};
    let mut accepted = family(
        "spliced_connections_accepted",
        "Client connections accepted (or pairs handed over).",
        Counter,
    );
    let mut active = family("spliced_connections_active", "Relays alive now.", Gauge);
    let mut closed = family(
        "spliced_connections_closed",
        "Relays closed, by reason.",
        Counter,
    );
    let mut bytes = family(
        "spliced_bytes",
        "Bytes written to a destination, by direction and by engine (splice: through a pipe; copy: through a userspace buffer).",
        Counter,
    );
    let mut fallbacks = family(
        "spliced_splice_fallbacks",
        "Directions that switched from splice to copy, by reason.",
        Counter,
    );
    let mut connect_failures = family(
        "spliced_upstream_connect_failures",
        "Upstream connect attempts that failed (each failed server of a failover counts).",
        Counter,
    );
    let mut local_errors = family(
        "spliced_local_errors",
        "Operations that failed for the proxy's own want of fds, socket buffers or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM), by operation; counted against no server. op=connect: an upstream connect, whose client was closed (reason local-error).",
        Counter,
    );
    let mut refused = family(
        "spliced_connections_refused",
        "Client connections reset before any upstream connect, by limit: allow-deny (the listener's access lists), max-conns-per-source, or proxy-header (accept-proxy: untrusted source, bad or missing header).",
        Counter,
    );
    let mut limit_pauses = family(
        "spliced_listener_limit_pauses",
        "Times a listener stopped accepting at its own max-conns (clients wait in the backlog).",
        Counter,
    );
    let mut cancels = family(
        "spliced_pg_cancel_requests",
        "PostgreSQL CancelRequests sent on to every server of the pool (protocol = \"postgres\").",
        Counter,
    );
    let mut switches = family(
        "spliced_engine_switches",
        "Times a direction of an auto-mode listener switched between copy and splice.",
        Counter,
    );
    for l in &snap.listeners {
        let s = l.total();
        let at = listener(&l.name);
        refused
            .values
            .push((with(at.clone(), "limit", "allow-deny"), s.refused_denied));
        refused.values.push((
            with(at.clone(), "limit", "max-conns-per-source"),
            s.refused_max_conns_per_source,
        ));
        refused.values.push((
            with(at.clone(), "limit", "proxy-header"),
            s.refused_proxy_header,
        ));
        limit_pauses
            .values
            .push((at.clone(), s.listener_limit_pauses));
        switches.values.push((at.clone(), s.engine_switches));
        cancels.values.push((at.clone(), s.pg_cancel_requests));
        accepted.values.push((at.clone(), s.relays_accepted));
        active.values.push((at.clone(), s.relays_active));
        connect_failures
            .values
            .push((at.clone(), s.upstream_connect_failures));
        local_errors
            .values
            .push((with(at.clone(), "op", "connect"), s.local_errors));
        for reason in CloseReason::ALL {
            closed.values.push((
                with(at.clone(), "reason", reason.as_str()),
                s.closed(reason),
            ));
        }
        for reason in FallbackReason::ALL {
            fallbacks.values.push((
                with(at.clone(), "reason", reason.as_str()),
                s.fallbacks(reason),
            ));
        }
        for (direction, engine, v) in [
            ("client_to_upstream", "splice", s.bytes_c2u_spliced),
            ("client_to_upstream", "copy", s.bytes_c2u_copied),
            ("upstream_to_client", "splice", s.bytes_u2c_spliced),
            ("upstream_to_client", "copy", s.bytes_u2c_copied),
        ] {
            let labels = with(with(at.clone(), "direction", direction), "engine", engine);
            bytes.values.push((labels, v));
        }
    }
    let mut relays = family(
        "spliced_worker_relays",
        "Relays a worker holds now, over all its listeners.",
        Gauge,
    );
    let mut pipes_in_use = family(
        "spliced_pipes_in_use",
        "Pipes held by directions now.",
        Gauge,
    );
    let mut pipes_idle = family("spliced_pipes_pooled", "Empty pipes kept for reuse.", Gauge);
    let mut pipes_max = family(
        "spliced_pipes_in_use_max",
        "The most pipes held by directions at once since the start.",
        Gauge,
    );
    let mut pipes_created = family("spliced_pipes_created", "Pipes created.", Counter);
    let mut buffers = family(
        "spliced_copy_buffers_in_use",
        "Userspace copy buffers held by directions now.",
        Gauge,
    );
    let mut pauses = family(
        "spliced_accept_pauses",
        "Times a worker paused accepting, by reason (fds: out of file descriptors; relay-cap: at --max-conns, clients wait in the backlog).",
        Counter,
    );
    let mut probes = family(
        "spliced_health_probes",
        "Active health probes a worker ran (each server is probed by one worker).",
        Counter,
    );
    let mut probe_failures = family(
        "spliced_health_probe_failures",
        "Of those, the probes that got no answer (refused, reset, timed out, a reply that is no answer); role answers and check errors are answers.",
        Counter,
    );
    let mut timers = family(
        "spliced_timer_entries",
        "Entries in a worker's deadline heap (live and not yet swept).",
        Gauge,
    );
    for (i, w) in snap.workers.iter().enumerate() {
        let at: Labels = vec![("worker", i.to_string())];
        let held: u64 = snap
            .listeners
            .iter()
            .map(|l| l.workers[i].relays_active)
            .sum();
        relays.values.push((at.clone(), held));
        pipes_in_use.values.push((at.clone(), w.pipes_in_use));
        pipes_idle.values.push((at.clone(), w.pipes_idle));
        pipes_max.values.push((at.clone(), w.pipes_in_use_max));
        pipes_created.values.push((at.clone(), w.pipes_created));
        buffers.values.push((at.clone(), w.buffers_in_use));
        pauses
            .values
            .push((with(at.clone(), "reason", "fds"), w.accept_pauses_fds));
        pauses
            .values
            .push((with(at.clone(), "reason", "relay-cap"), w.accept_pauses_cap));
        probes.values.push((at.clone(), w.health_probes));
        probe_failures
            .values
            .push((at.clone(), w.health_probe_failures));
        timers.values.push((at, w.timer_entries));
    }
    let mut draining = family(
        "spliced_draining",
        "1 while the instance drains (stopped accepting; /healthz answers 503), else 0.",
        Gauge,
    );
    draining
        .values
        .push((Vec::new(), u64::from(snap.state != InstanceState::Running)));
    let mut started = family(
        "spliced_start_time_seconds",
        "When the instance started, in seconds since the Unix epoch.",
        Gauge,
    );
    started.values.push((Vec::new(), snap.started_unix));
    vec![
        accepted,
        active,
        closed,
        bytes,
        fallbacks,
        connect_failures,
        local_errors,
        refused,
        limit_pauses,
        switches,
        cancels,
        relays,
        pipes_in_use,
        pipes_idle,
        pipes_max,
        pipes_created,
        buffers,
        pauses,
        probes,
        probe_failures,
        timers,
        draining,
        started,
    ]
}

fn encode_connect_histogram(snap: &Snapshot, encoder: &mut DescriptorEncoder) -> Result<(), Error> {
    let mut metric = encoder.encode_descriptor(
        "spliced_upstream_connect_duration_seconds",
        "Time from starting an upstream connect to its establishment, per attempt that succeeded.",
        None,
        MetricType::Histogram,
    )?;
    for l in &snap.listeners {
        let s: Stats = l.total();
        let buckets = histogram_buckets(&s.connect_buckets);
        let sum = s.upstream_connect_micros as f64 / 1e6;
        let labels = listener(&l.name);
        metric
            .encode_family(&labels)?
            .encode_histogram::<NoLabelSet>(sum, s.upstream_connects, &buckets, None)?;
    }
    Ok(())
}

/// The registry `/metrics` encodes: one collector over the arena.
pub(crate) fn registry(arena: Arc<Arena>, servers: super::ServerSamples) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Spliced { arena, servers }));
    registry
}

/// The Prometheus text exposition of everything in `registry`.
pub(crate) fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}
