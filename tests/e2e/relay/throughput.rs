//! Throughput through spliced beside a direct connection: rounds over
//! direct and each engine (the order rotated each round so that no target
//! always runs first), every command of a round checked as in the other
//! scenarios, and a table of medians and ratios printed. There is no
//! pass/fail on speed: on two shared cores the servers, the clients and
//! spliced compete for CPU.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use super::pg::{copy_query, copy_rows, init, psql_ok};
use super::{all_closed_clean, listener, stops_cleanly};
use crate::fixture::{
    free_port, knob, loopback, pg_bin, pgbench, redis_benchmark, redis_bin, Pg, Proxy, Redis,
    TempDir,
};

/// The engines compared with direct. auto (a mix of the two) is left out
/// of these rounds to keep `make e2e` short; its correctness runs in the
/// other scenarios.
const ENGINES: [&str; 2] = ["splice", "copy"];

/// Figures of each (workload, target) over the rounds.
type Figures = BTreeMap<(String, String), Vec<f64>>;

fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// One round against one target: the figures of the table. Every command
/// must still succeed.
fn round(bin: &Path, target: &str, pg: SocketAddr, redis: SocketAddr, figures: &mut Figures) {
    let secs = knob::<u64>("E2E_PERF_SECS", 3).to_string();
    let limit = Duration::from_secs(90);
    let mut put = |workload: &str, v: f64| {
        figures
            .entry((workload.to_string(), target.to_string()))
            .or_default()
            .push(v);
    };
    let what = |w: &str| format!("[perf] {target}: {w}");
    let s = pgbench(
        bin,
        pg,
        &["-n", "-S", "-c", "4", "-j", "2", "-T", &secs],
        limit,
        &what("pgbench -S"),
    );
    put("pgbench -S tps (c4 j2)", s.tps);
    let b = pgbench(
        bin,
        pg,
        &["-n", "-c", "4", "-j", "2", "-T", &secs],
        limit,
        &what("pgbench TPC-B"),
    );
    put("pgbench TPC-B tps (c4 j2)", b.tps);
    let c = pgbench(
        bin,
        pg,
        &["-n", "-S", "-C", "-c", "2", "-j", "2", "-T", "2"],
        limit,
        &what("pgbench -S -C"),
    );
    put("pgbench -S -C tps (c2, conn/xact)", c.tps);
    for (name, rate) in redis_benchmark(
        redis,
        "set,get",
        &["-n", "20000", "-c", "20"],
        &what("redis-benchmark"),
    ) {
        put(&format!("redis-benchmark {name} ops/s (c20)"), rate);
    }
    for (name, rate) in redis_benchmark(
        redis,
        "set,get",
        &["-n", "100000", "-c", "20", "-P", "16"],
        &what("redis-benchmark -P 16"),
    ) {
        put(&format!("redis-benchmark {name} ops/s (c20 P16)"), rate);
    }
    let rows = copy_rows() / 3;
    let t0 = std::time::Instant::now();
    let out = psql_ok(bin, pg, &copy_query(rows), &what("COPY"));
    let took = t0.elapsed().as_secs_f64();
    let lines = out.iter().filter(|b| **b == b'\n').count() as u64;
    assert_eq!(lines, rows, "{}: COPY returned {lines} rows", what("COPY"));
    put("psql COPY TO STDOUT, MB/s", out.len() as f64 / took / 1e6);
}

/// The kernel's TCP counters that tell of memory pressure (segments
/// dropped on receive, recovered by retransmission timeouts), whole machine.
fn tcp_counters() -> BTreeMap<String, i64> {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| l.starts_with("TcpExt:")).collect();
    let mut out = BTreeMap::new();
    if let [keys, values] = lines[..] {
        for (k, v) in keys
            .split_whitespace()
            .zip(values.split_whitespace())
            .skip(1)
        {
            if matches!(
                k,
                "TCPMemoryPressures" | "TCPMemoryPressuresChrono" | "TCPRcvQDrop" | "TCPTimeouts"
            ) {
                out.insert(k.to_string(), v.parse().unwrap_or(0));
            }
        }
    }
    out
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn throughput_through_spliced_vs_direct() {
    let test = "throughput_through_spliced_vs_direct";
    let (Some(pgbin), Some(redisbin)) = (pg_bin(test), redis_bin(test)) else {
        return;
    };
    let dir = TempDir::new("e2e-throughput");
    let pg = Pg::primary(&pgbin, &dir, "pg", "monitor-pw");
    let redis = Redis::master(&redisbin, &dir, "redis", None);
    init(&pgbin, pg.addr(), "[perf] direct: pgbench -i");

    let mut config = String::new();
    let mut targets = vec![("direct".to_string(), pg.addr(), redis.addr())];
    for mode in ENGINES {
        let (p, r) = (free_port(), free_port());
        config += &listener(&format!("pg-{mode}"), p, pg.port, mode, "");
        config += &listener(&format!("redis-{mode}"), r, redis.port, mode, "");
        targets.push((mode.to_string(), loopback(p), loopback(r)));
    }
    let proxy = Proxy::start(&dir, "throughput", &config);

    let rounds = knob("E2E_PERF_ROUNDS", 3usize);
    let mut figures = Figures::new();
    let tcp_before = tcp_counters();
    for r in 0..rounds {
        for i in 0..targets.len() {
            let (name, pg_at, redis_at) = &targets[(i + r) % targets.len()];
            eprintln!("[perf] round {}/{rounds}: {name}", r + 1);
            round(&pgbin, name, *pg_at, *redis_at, &mut figures);
        }
    }
    let tcp_after = tcp_counters();

    // The table: medians, and each engine's ratio to direct.
    let mut table = format!(
        "Throughput through spliced vs direct: median of {rounds} rounds (informational, no pass/fail;\n\
         {} cores shared by postgres/redis, the clients and spliced)\n{:<38} {:>10}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        "workload",
        "direct"
    );
    for m in ENGINES {
        table += &format!(" {m:>10} {:>6}", "ratio");
    }
    // In the order a round runs them.
    let workloads = [
        "pgbench -S tps (c4 j2)",
        "pgbench TPC-B tps (c4 j2)",
        "pgbench -S -C tps (c2, conn/xact)",
        "redis-benchmark SET ops/s (c20)",
        "redis-benchmark SET ops/s (c20 P16)",
        "redis-benchmark GET ops/s (c20)",
        "redis-benchmark GET ops/s (c20 P16)",
        "psql COPY TO STDOUT, MB/s",
    ];
    for w in workloads {
        for t in &targets {
            let n = figures
                .get(&(w.to_string(), t.0.clone()))
                .map_or(0, Vec::len);
            assert_eq!(n, rounds, "{w} via {}: {n} figures of {rounds} rounds", t.0);
        }
        let get = |t: &str| {
            median(
                figures
                    .get(&(w.to_string(), t.to_string()))
                    .map_or(&[][..], |v| v),
            )
        };
        let d = get("direct");
        let fmt = |v: Option<f64>| {
            v.map_or("-".into(), |v| {
                if v < 100.0 {
                    format!("{v:.1}")
                } else {
                    format!("{v:.0}")
                }
            })
        };
        table += &format!("\n{w:<38} {:>10}", fmt(d));
        for m in ENGINES {
            let v = get(m);
            let ratio = match (v, d) {
                (Some(v), Some(d)) if d > 0.0 => format!("{:.2}", v / d),
                _ => "-".into(),
            };
            table += &format!(" {:>10} {ratio:>6}", fmt(v));
        }
    }
    let delta: Vec<String> = tcp_after
        .iter()
        .map(|(k, v)| format!("{k} +{}", v - tcp_before.get(k).copied().unwrap_or(0)))
        .collect();
    table += &format!(
        "\nkernel TCP counters during the rounds (whole machine): {}",
        delta.join(" ")
    );
    let pressure = ["TCPMemoryPressures", "TCPMemoryPressuresChrono"]
        .iter()
        .any(|k| tcp_after.get(*k) != tcp_before.get(*k));
    if pressure {
        table += "\n  note: the host was under TCP memory pressure: receivers dropped segments; figures are not representative";
    }
    eprintln!("\n{table}\n");

    for mode in ENGINES {
        all_closed_clean(&proxy, &format!("pg-{mode}"), 0);
        all_closed_clean(&proxy, &format!("redis-{mode}"), 0);
    }
    stops_cleanly(proxy);
}
