//! A real Prometheus (the Debian package, on 127.0.0.1 under the test's
//! temp dir) scrapes spliced's admin endpoint every second while pgbench
//! runs through it. Afterwards the counters read back through
//! Prometheus's HTTP API must equal what the clients moved: the sums of
//! `bytes_c2u` / `bytes_u2c` over the per-relay close lines (each relay's
//! own count of what it delivered, kept apart from the counter blocks,
//! and the only per-client account spliced gives). `spliced stats`, read
//! from the stats file, must show the same accepted count.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::common::wait_until;
use crate::fixture::{free_port, loopback, pg_bin, pgbench, Pg, Proxy, TempDir};
use crate::relay::listener;
use crate::servers::{command, find_bin, Proc};

/// The value of an instant query, if it has a result.
fn query(prom: SocketAddr, expr: &str) -> Option<String> {
    let mut enc = String::new();
    for b in expr.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            enc.push(b as char);
        } else {
            enc += &format!("%{b:02X}");
        }
    }
    let mut s = TcpStream::connect_timeout(&prom, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET /api/v1/query?query={enc} HTTP/1.0\r\nHost: e2e\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    v["data"]["result"][0]["value"][1]
        .as_str()
        .map(str::to_string)
}

/// Sum of `field=N` over spliced's `relay closed` lines.
fn close_sum(lines: &[String], field: &str) -> u64 {
    let key = format!("{field}=");
    lines
        .iter()
        .filter(|l| l.contains("relay closed"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|t| t.strip_prefix(&key))
                .and_then(|v| v.trim_matches('"').parse::<u64>().ok())
        })
        .sum()
}

fn prometheus_counts_what_clients_moved(mode: &str) {
    let test = format!("prometheus_counts_what_clients_moved({mode})");
    let Some(bin) = pg_bin(&test) else { return };
    let Some(prometheus) = find_bin(&test, &["prometheus"], &[]) else {
        return;
    };
    let dir = TempDir::new(&format!("e2e-prom-{mode}"));
    let pg = Pg::primary(&bin, &dir, "pg", "monitor-pw");
    crate::relay::pg::init(&bin, pg.addr(), "direct: pgbench -i");
    let port = free_port();
    let proxy = Proxy::start(
        &dir,
        &format!("prom-{mode}"),
        &listener("pg", port, pg.port, mode, ""),
    );

    let prom = loopback(free_port());
    let yml = dir.join("prometheus.yml");
    std::fs::write(
        &yml,
        format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             scrape_configs:\n  - job_name: spliced\n    static_configs: [ {{ targets: [\"{}\"] }} ]\n",
            proxy.admin
        ),
    )
    .unwrap();
    let mut c = command(&prometheus);
    c.arg(format!("--config.file={}", yml.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("prom-data").display()
        ))
        .arg(format!("--web.listen-address={prom}"))
        .arg("--log.level=warn");
    let server = Proc::start("prometheus", c, dir.join("prometheus.log"), prom);
    wait_until(
        Duration::from_secs(30),
        "prometheus has scraped spliced (up == 1)",
        || query(prom, "up{job=\"spliced\"}").as_deref() == Some("1"),
    );

    pgbench(
        &bin,
        loopback(port),
        &["-n", "-S", "-c", "4", "-j", "2", "-T", "3"],
        Duration::from_secs(63),
        &format!("[{mode}] pgbench -S under a Prometheus scrape"),
    );
    let closes_logged = || {
        proxy
            .logs()
            .iter()
            .filter(|l| l.contains("relay closed"))
            .count() as u64
    };
    // pgbench's 4 relays (and the one it counts branches on) closed, each
    // with its line written.
    wait_until(
        Duration::from_secs(10),
        "pgbench's relays closed, each with its line",
        || {
            let closed = proxy.metric_sum("spliced_connections_closed_total", &[]) as u64;
            proxy.metric_sum("spliced_connections_active", &[]) == 0.0
                && closed >= 4
                && closes_logged() == closed
        },
    );
    let logs = proxy.logs();
    let closes = closes_logged();
    let (c2u, u2c) = (close_sum(&logs, "bytes_c2u"), close_sum(&logs, "bytes_u2c"));
    eprintln!("[{mode}] clients moved (close lines): {closes} relays, client->upstream {c2u} B, upstream->client {u2c} B");
    assert!(c2u > 0 && u2c > 0, "[{mode}] no bytes in the close lines");

    // A scrape taken after the last close, then every figure.
    let total = |expr: &str| query(prom, expr);
    let want_closes = closes.to_string();
    wait_until(
        Duration::from_secs(15),
        "prometheus has scraped every close",
        || total("sum(spliced_connections_closed_total)").as_deref() == Some(want_closes.as_str()),
    );
    let got = |expr: &str| total(expr).unwrap_or_else(|| "none".into());
    assert_eq!(
        got("sum(spliced_bytes_total{direction=\"client_to_upstream\"})"),
        c2u.to_string(),
        "[{mode}] client_to_upstream: prometheus vs clients"
    );
    assert_eq!(
        got("sum(spliced_bytes_total{direction=\"upstream_to_client\"})"),
        u2c.to_string(),
        "[{mode}] upstream_to_client: prometheus vs clients"
    );
    let engines: &[&str] = match mode {
        "splice" => &["splice"],
        "copy" => &["copy"],
        // auto moves each direction by either engine as it goes.
        _ => &["splice", "copy"],
    };
    let by_engine: u64 = engines
        .iter()
        .map(|e| {
            total(&format!("sum(spliced_bytes_total{{engine=\"{e}\"}})"))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum();
    assert_eq!(
        by_engine,
        c2u + u2c,
        "[{mode}] engine(s) {engines:?} carry {by_engine} B of {}",
        c2u + u2c
    );
    assert_eq!(
        got("sum(spliced_connections_accepted_total)"),
        want_closes,
        "[{mode}] accepted"
    );
    assert_eq!(
        got("sum(spliced_upstream_connect_duration_seconds_count)"),
        want_closes,
        "[{mode}] connect latency count"
    );

    // The same instance through its stats file, no network.
    let (st, out, err) = proxy.cli(&["stats"]);
    eprintln!("{out}");
    assert!(st.success(), "spliced stats: {st}\n{err}");
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .by_ref()
        .find(|l| l.split_whitespace().next() == Some("LISTENER"))
        .unwrap_or_else(|| panic!("no LISTENER header in:\n{out}"))
        .split_whitespace()
        .collect();
    let row: Vec<&str> = lines
        .find(|l| l.split_whitespace().next() == Some("pg"))
        .unwrap_or_else(|| panic!("no row for listener pg in:\n{out}"))
        .split_whitespace()
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name).map(|i| row[i]);
    assert_eq!(
        (col("ACTIVE"), col("ACCEPTED")),
        (Some("0"), Some(want_closes.as_str())),
        "[{mode}] spliced stats does not show {closes} accepted:\n{out}"
    );

    drop(server);
    crate::relay::stops_cleanly(proxy);
}

crate::every_engine!(prometheus_counts_what_clients_moved);
