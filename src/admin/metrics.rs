//! `/metrics`: the stats mapping read at scrape time and encoded by
//! prometheus-client in the Prometheus text format (0.0.4).
//!
//! Nothing is registered ahead: a [`Collector`] reads one [`Snapshot`] per
//! scrape (plain atomic loads of the blocks the workers write), so a scrape
//! never takes a lock a worker could wait on. The counter families come
//! from the counter tables ([`COUNTERS`], [`SERVER_COUNTERS`]); written here
//! are only the values no block holds: the pools' view of each server, the
//! relays per worker, and the instance's state.

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
use crate::stats::{Kind, Scope, ServerStats, Table, Values, COUNTERS, SERVER_COUNTERS};

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
    routes: super::RouteSamples,
}

impl std::fmt::Debug for Spliced {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spliced").finish_non_exhaustive()
    }
}

impl Collector for Spliced {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        let snap = self.arena.snapshot();
        encode(&snap, &(self.servers)(), &(self.routes)(), &mut encoder)
    }
}

/// Every family of a snapshot and the pools' view of their servers.
fn encode(
    snap: &Snapshot,
    samples: &[(String, crate::upstream::ServerSample)],
    routes: &[(String, crate::listener::RouteSample)],
    encoder: &mut DescriptorEncoder,
) -> Result<(), Error> {
    let listeners: Vec<(Labels, crate::stats::Stats)> = snap
        .listeners
        .iter()
        .map(|l| (listener(&l.name), l.total()))
        .collect();
    let workers: Vec<(Labels, crate::stats::Stats)> = snap
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| (vec![("worker", i.to_string())], w.clone()))
        .collect();
    let servers: Vec<(Labels, ServerStats)> = server_totals(snap)
        .into_iter()
        .map(|((name, addr), s)| (with(listener(&name), "server", &addr), s))
        .collect();
    let tables = [
        (&COUNTERS, Scope::Listener, &listeners),
        (&COUNTERS, Scope::Worker, &workers),
    ];
    for (table, scope, rows) in tables {
        for f in table_families(table, scope, rows) {
            f.encode(encoder)?;
        }
    }
    for f in instance_families(snap) {
        f.encode(encoder)?;
    }
    for f in server_families(samples) {
        f.encode(encoder)?;
    }
    if !routes.is_empty() {
        route_family(routes).encode(encoder)?;
    }
    for f in table_families(&SERVER_COUNTERS, Scope::Server, &servers) {
        f.encode(encoder)?;
    }
    encode_histograms(&COUNTERS, Scope::Listener, &listeners, encoder)?;
    encode_histograms(&SERVER_COUNTERS, Scope::Server, &servers, encoder)
}

/// The families a counter table declares for one scope, over `rows` (the
/// labels of a listener, worker or server, and its summed values): its
/// counters, grouped into families by name in table order, then its
/// per-reason arrays. Histograms are encoded apart.
fn table_families<S: Values>(table: &Table, scope: Scope, rows: &[(Labels, S)]) -> Vec<Family> {
    let mut out: Vec<Family> = Vec::new();
    let mut members = Vec::new();
    for (i, c) in table.counters.iter().enumerate() {
        let Some(m) = c.shown.metric.filter(|_| c.scope == scope) else {
            continue;
        };
        let at = match out.iter().position(|f| f.name == m.family) {
            Some(at) => at,
            None => {
                let kind = match c.kind {
                    Kind::Counter => MetricType::Counter,
                    Kind::Gauge => MetricType::Gauge,
                };
                out.push(family(m.family, "", kind));
                out.len() - 1
            }
        };
        if let Some(help) = m.help {
            out[at].help = help;
        }
        members.push((at, i, m.labels));
    }
    let reasons: Vec<_> = table
        .by_reason
        .iter()
        .filter(|r| r.scope == scope)
        .collect();
    let first_reason = out.len();
    for r in &reasons {
        out.push(family(r.family, r.help, MetricType::Counter));
    }
    for (labels, s) in rows {
        let values = s.values();
        for &(at, i, extra) in &members {
            let mut l = labels.clone();
            l.extend(extra.iter().map(|&(k, v)| (k, v.to_string())));
            out[at].values.push((l, values[i]));
        }
        let arrays = s.by_reason();
        let in_scope = table
            .by_reason
            .iter()
            .zip(arrays)
            .filter(|(r, _)| r.scope == scope);
        for (n, (r, counts)) in in_scope.enumerate() {
            for (reason, &v) in r.reasons.iter().zip(counts) {
                let l = with(labels.clone(), r.label, reason);
                out[first_reason + n].values.push((l, v));
            }
        }
    }
    out
}

/// The histograms a counter table declares for one scope, over `rows`.
fn encode_histograms<S: Values>(
    table: &Table,
    scope: Scope,
    rows: &[(Labels, S)],
    encoder: &mut DescriptorEncoder,
) -> Result<(), Error> {
    for (n, h) in table.histograms.iter().enumerate() {
        if h.scope != scope {
            continue;
        }
        let mut metric =
            encoder.encode_descriptor(h.family, h.help, None, MetricType::Histogram)?;
        for (labels, s) in rows {
            let values = s.histograms()[n];
            // Per-bucket counts (not cumulative; the encoder adds them up)
            // with their upper bounds, the last one +Inf.
            let bounds = h.bounds.iter().copied().chain([f64::INFINITY]);
            let buckets: Vec<(f64, u64)> = bounds.zip(values.buckets.iter().copied()).collect();
            let sum = values.sum_micros as f64 / 1e6;
            metric
                .encode_family(labels)?
                .encode_histogram::<NoLabelSet>(sum, values.count, &buckets, None)?;
        }
    }
    Ok(())
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

/// Per route of each listener with routes: the clients it took.
fn route_family(routes: &[(String, crate::listener::RouteSample)]) -> Family {
    let mut clients = family(
        "spliced_route_clients",
        "Clients a listener's route took, by its position (from 1), what it matches and its pool (a route a reload keeps counts on).",
        MetricType::Counter,
    );
    for (name, r) in routes {
        let at = with(listener(name), "route", &r.position.to_string());
        let at = with(with(at, "match", &r.matches), "pool", &r.pool);
        clients.values.push((at, r.clients));
    }
    clients
}

fn listener(name: &str) -> Labels {
    vec![("listener", name.to_string())]
}

fn with(mut labels: Labels, key: &'static str, value: &str) -> Labels {
    labels.push((key, value.to_string()));
    labels
}

/// The instance's families no counter block holds: the relays each worker
/// holds (a sum over listeners), whether it drains, and when it started.
fn instance_families(snap: &Snapshot) -> Vec<Family> {
    let mut relays = family(
        "spliced_worker_relays",
        "Relays a worker holds now, over all its listeners.",
        MetricType::Gauge,
    );
    for i in 0..snap.workers.len() {
        let held: u64 = snap
            .listeners
            .iter()
            .map(|l| l.workers[i].relays_active)
            .sum();
        relays.values.push((vec![("worker", i.to_string())], held));
    }
    let mut draining = family(
        "spliced_draining",
        "1 while the instance drains (stopped accepting; /healthz answers 503), else 0.",
        MetricType::Gauge,
    );
    draining
        .values
        .push((Vec::new(), u64::from(snap.state != InstanceState::Running)));
    let mut started = family(
        "spliced_start_time_seconds",
        "When the instance started, in seconds since the Unix epoch.",
        MetricType::Gauge,
    );
    started.values.push((Vec::new(), snap.started_unix));
    vec![relays, draining, started]
}

/// The registry `/metrics` encodes: one collector over the arena.
pub(crate) fn registry(
    arena: Arc<Arena>,
    servers: super::ServerSamples,
    routes: super::RouteSamples,
) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Spliced {
        arena,
        servers,
        routes,
    }));
    registry
}

/// The Prometheus text exposition of everything in `registry`.
pub(crate) fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

#[cfg(all(test, feature = "cli"))]
mod tests;
