//! Real clients through spliced, once per engine: PostgreSQL (pgbench
//! init, select-only, TPC-B-like and a connection per transaction, the
//! ledger's consistency, 45 MB COPY both ways compared by sha256, the idle
//! timeout under `pg_sleep`) and Redis (redis-benchmark, a 100 000-command
//! `redis-cli --pipe`, sampled GETs compared value by value); and the
//! throughput of both through spliced beside a direct connection
//! (printed, not judged).
//!
//! Judged by what the clients see (exit status, results, bytes) and by
//! spliced's own counters on /metrics: how many relays closed, and why.

#[path = "relay/pg.rs"]
pub mod pg;
#[path = "relay/redis.rs"]
mod redis;
#[path = "relay/throughput.rs"]
mod throughput;

use std::time::Duration;

use crate::fixture::Proxy;

/// One `[[listener]]` with a passive pool of one server, relaying with
/// `mode`; `extra` is added to the listener (e.g. an idle timeout).
pub fn listener(name: &str, port: u16, server: u16, mode: &str, extra: &str) -> String {
    format!(
        "[[listener]]\n\
         name = \"{name}\"\n\
         listen = \"127.0.0.1:{port}\"\n\
         mode = \"{mode}\"\n\
         {extra}\n\
         [listener.pool]\n\
         servers = [\"127.0.0.1:{server}\"]\n"
    )
}

/// Relays of `listener` closed so far with `reason` (all reasons: None).
pub fn closed(proxy: &Proxy, listener: &str, reason: Option<&str>) -> u64 {
    let mut labels = vec![("listener", listener)];
    if let Some(r) = reason {
        labels.push(("reason", r));
    }
    proxy.metric_sum("spliced_connections_closed_total", &labels) as u64
}

/// Waits (up to 10 s) until `listener` has no live relay, then asserts
/// that every relay it ever had closed cleanly: at least one closed, each
/// with reason `eof` but for exactly `idle` closed at the idle timeout.
/// As every client of these scenarios ends its session cleanly, any other
/// reason is a fault of the relay.
pub fn all_closed_clean(proxy: &Proxy, listener: &str, idle: u64) {
    crate::common::wait_until(
        Duration::from_secs(10),
        &format!("{listener} has no live relay"),
        || proxy.metric_sum("spliced_connections_active", &[("listener", listener)]) == 0.0,
    );
    let total = closed(proxy, listener, None);
    let eof = closed(proxy, listener, Some("eof"));
    let idled = closed(proxy, listener, Some("idle"));
    eprintln!("{listener}: {total} relays closed (eof {eof}, idle {idled})");
    assert!(total > 0, "{listener}: no relay closed at all");
    assert_eq!(
        (total - eof - idled, idled),
        (0, idle),
        "{listener}: want every relay closed with reason eof and {idle} with reason idle; /metrics:\n{}",
        closes_of(proxy)
    );
}

/// No panic in spliced's log; SIGTERM ends it with exit status 0.
pub fn stops_cleanly(mut proxy: Proxy) {
    let panics = proxy.panic_lines();
    assert!(panics.is_empty(), "spliced panicked: {panics:?}");
    let status = proxy.terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "spliced after SIGTERM: {status:?} (None: still running after 20 s)"
    );
}

/// The close counters, for a failure message.
pub fn closes_of(proxy: &Proxy) -> String {
    proxy
        .metrics()
        .lines()
        .filter(|l| l.starts_with("spliced_connections_closed_total"))
        .collect::<Vec<_>>()
        .join("\n")
}
