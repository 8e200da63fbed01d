//! Every value of the counter tables is shown: set one at a time, it moves
//! `/metrics` (in the family the table names) or `spliced stats` (in the
//! column the table names), and a counter that neither shows fails here.

use std::time::Duration;

use super::*;
use crate::shm::{ListenerSnapshot, ServerSnapshot};
use crate::stats::Stats;

#[derive(Debug)]
struct Fixed(Snapshot);

impl Collector for Fixed {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), Error> {
        encode(&self.0, &[], &[], &mut encoder)
    }
}

fn snapshot() -> Snapshot {
    Snapshot {
        pid: 42,
        started_unix: 0,
        state: InstanceState::Running,
        workers: vec![Stats::default()],
        listeners: vec![ListenerSnapshot {
            name: "127.0.0.1:6432".into(),
            workers: vec![Stats::default()],
        }],
        servers: vec![ServerSnapshot {
            listener: "127.0.0.1:6432".into(),
            addr: "10.0.0.5:5432".into(),
            generation: 1,
            up: true,
            state: "up",
            reason: "",
            checked_unix_ms: 0,
            role: "primary",
            backup: false,
            active: 0,
            lag: None,
            workers: vec![ServerStats::default()],
        }],
    }
}

fn metrics(snap: &Snapshot) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Fixed(snap.clone())));
    render(&registry)
}

fn table_view(snap: &Snapshot) -> String {
    crate::cli::stats::render(snap, "x", None, Duration::from_secs(100), false)
}

/// Each word of a table's snapshot, in [`Values::words_mut`] order: the
/// name it belongs to, its scope, and the counter's row (none for a word of
/// a per-reason array or of a histogram's buckets).
fn words(table: &Table) -> Vec<(&'static str, Scope, Option<usize>)> {
    let mut out: Vec<_> = (table.counters.iter().enumerate())
        .map(|(i, c)| (c.name, c.scope, Some(i)))
        .collect();
    for r in table.by_reason {
        out.extend(r.reasons.iter().map(|_| (r.name, r.scope, None)));
    }
    for h in table.histograms {
        out.extend((0..=h.bounds.len()).map(|_| (h.name, h.scope, None)));
    }
    out
}

/// The lines of `after` that `before` lacks.
fn changed(before: &str, after: &str) -> Vec<String> {
    let old: std::collections::HashSet<&str> = before.lines().collect();
    (after.lines().filter(|l| !old.contains(l)))
        .map(str::to_string)
        .collect()
}

const MARK: u64 = 7_777_777;

fn check(name: &str, row: Option<usize>, table: &Table, base: (&str, &str), snap: &Snapshot) {
    let (metrics_now, view_now) = (metrics(snap), table_view(snap));
    let in_metrics = changed(base.0, &metrics_now);
    let in_view = changed(base.1, &view_now);
    assert!(
        !in_metrics.is_empty() || !in_view.is_empty(),
        "{name} is shown nowhere: neither /metrics nor `spliced stats` moves with it"
    );
    let Some(row) = row else { return };
    let shown = table.counters[row].shown;
    if let Some(m) = shown.metric {
        assert!(
            in_metrics.iter().any(|l| l.starts_with(m.family)),
            "{name} is not in {}: {in_metrics:?}",
            m.family
        );
    }
    if let Some(column) = shown.column {
        assert!(view_now.contains(column), "no column {column} for {name}");
        assert!(!in_view.is_empty(), "{name} does not move `spliced stats`");
    }
}

#[test]
fn every_counter_is_shown_somewhere() {
    let base = snapshot();
    let (base_metrics, base_view) = (metrics(&base), table_view(&base));
    for (k, (name, scope, row)) in words(&COUNTERS).into_iter().enumerate() {
        let mut snap = base.clone();
        let stats = match scope {
            Scope::Worker => &mut snap.workers[0],
            _ => &mut snap.listeners[0].workers[0],
        };
        *stats.words_mut()[k] = MARK;
        check(name, row, &COUNTERS, (&base_metrics, &base_view), &snap);
    }
    for (k, (name, _, row)) in words(&SERVER_COUNTERS).into_iter().enumerate() {
        let mut snap = base.clone();
        *snap.servers[0].workers[0].words_mut()[k] = MARK;
        check(
            name,
            row,
            &SERVER_COUNTERS,
            (&base_metrics, &base_view),
            &snap,
        );
    }
}

#[test]
fn the_exposition_keeps_its_names_and_labels() {
    let mut snap = snapshot();
    snap.listeners[0].workers[0].refused_proxy_header = 3;
    snap.listeners[0].workers[0].pg_cancel_requests = 4;
    snap.workers[0].accept_pauses_cap = 5;
    snap.workers[0].health_probe_failures = 6;
    snap.servers[0].workers[0].bytes_u2c_copied = 8;
    let text = metrics(&snap);
    for line in [
        "spliced_connections_refused_total{listener=\"127.0.0.1:6432\",limit=\"proxy-header\"} 3",
        "spliced_pg_cancel_requests_total{listener=\"127.0.0.1:6432\"} 4",
        "spliced_accept_pauses_total{worker=\"0\",reason=\"relay-cap\"} 5",
        "spliced_health_probe_failures_total{worker=\"0\"} 6",
        "spliced_server_bytes_total{listener=\"127.0.0.1:6432\",server=\"10.0.0.5:5432\",direction=\"upstream_to_client\",engine=\"copy\"} 8",
        "spliced_connections_closed_total{listener=\"127.0.0.1:6432\",reason=\"server-down\"} 0",
        "spliced_upstream_connect_duration_seconds_bucket{listener=\"127.0.0.1:6432\",le=\"+Inf\"} 0",
        "# HELP spliced_bytes_total Bytes written to a destination, by direction and by engine (splice: through a pipe; copy: through a userspace buffer).",
        "# TYPE spliced_pipes_in_use gauge",
    ] {
        assert!(text.lines().any(|l| l == line), "no line {line} in\n{text}");
    }
    // One HELP and TYPE per family.
    let mut helps: Vec<&str> = text.lines().filter(|l| l.starts_with("# HELP")).collect();
    let n = helps.len();
    helps.sort();
    helps.dedup();
    assert_eq!(helps.len(), n, "a family is written twice");
}

/// A replica's measured lag is a gauge of its own, and `lagging` one of
/// the states; a server whose lag is not measured has no lag sample.
#[test]
fn a_replicas_lag_and_the_lagging_state_are_shown() {
    use crate::upstream::eligible::State;
    use crate::upstream::ServerSample;
    let sample = |port: u16, lag: Option<u64>, state: State| ServerSample {
        addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        up: state == State::Up,
        state,
        role: Some(crate::health::Role::Replica),
        live: 0,
        backup: false,
        last_check: None,
        lag,
    };
    let servers = vec![
        ("ro".to_string(), sample(1, Some(7 << 20), State::Lagging)),
        ("ro".to_string(), sample(2, None, State::Up)),
    ];
    let families = server_families(&servers);
    let lag = families
        .iter()
        .find(|f| f.name == "spliced_server_replication_lag_bytes")
        .expect("the lag family");
    assert_eq!(lag.values.len(), 1, "{:?}", lag.values);
    assert_eq!(lag.values[0].1, 7 << 20);
    assert!(lag.values[0]
        .0
        .contains(&("server", "127.0.0.1:1".to_string())));
    let state = families
        .iter()
        .find(|f| f.name == "spliced_server_state")
        .unwrap();
    let lagging: Vec<_> = state
        .values
        .iter()
        .filter(|(labels, v)| *v == 1 && labels.contains(&("state", "lagging".to_string())))
        .collect();
    assert_eq!(lagging.len(), 1, "{:?}", state.values);
}
