//! PostgreSQL clients through spliced: pgbench, the TPC-B ledger, COPY
//! both ways, and the idle timeout.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{all_closed_clean, closed, listener, stops_cleanly};
use crate::common::wait_until;
use crate::fixture::{
    free_port, knob, loopback, pg_bin, pgbench, psql_args, run_limited, Pg, Proxy, TempDir,
};

/// pgbench's scale: 100 000 accounts per unit.
const SCALE: u64 = 2;
/// Seconds of each timed pgbench run.
fn bench_secs() -> u64 {
    knob("E2E_PGBENCH_SECS", 3)
}
/// The idle timeout of the `pg-idle` listener, in seconds.
const IDLE_S: f64 = 2.0;

/// Rows of the COPY stream (600 000: about 45 MB).
pub fn copy_rows() -> u64 {
    knob("E2E_COPY_ROWS", 600_000)
}

/// A COPY TO STDOUT of `rows` generated rows (about 76 bytes each).
pub fn copy_query(rows: u64) -> String {
    format!(
        "COPY (SELECT i, md5(i::text), repeat(chr(65 + i % 26), 24), '2020-01-01'::date + i % 3650 \
         FROM generate_series(1, {rows}) i) TO STDOUT"
    )
}

/// `psql -At -c sql` against `addr` (spliced or the server), under a limit;
/// panics with its output unless it exits 0.
/// The TPC-B ledger pgbench left, read through `addr`: every balance sum
/// equals the sum of the deltas, and the history has a row per transaction
/// pgbench saw commit (`committed`), and at most one more per client (one
/// may have been in flight at the `-T` deadline).
pub fn assert_ledger(bin: &Path, addr: SocketAddr, committed: u64, clients: u64, what: &str) {
    let row = psql_ok(
        bin,
        addr,
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(bbalance) FROM pgbench_branches), \
         (SELECT sum(tbalance) FROM pgbench_tellers), (SELECT coalesce(sum(delta), 0) FROM pgbench_history), \
         (SELECT count(*) FROM pgbench_history)",
        "ledger",
    );
    let row = String::from_utf8_lossy(&row).trim().to_string();
    let v: Vec<&str> = row.split('|').collect();
    assert_eq!(v.len(), 5, "{what} ledger row: {row}");
    assert!(
        !v[0].is_empty() && v[0] == v[1] && v[1] == v[2] && v[2] == v[3],
        "{what} balances disagree: sum(abalance), sum(bbalance), sum(tbalance), sum(delta) = {row}"
    );
    let history: u64 = v[4].parse().unwrap();
    assert!(
        history >= committed && history <= committed + clients,
        "{what} history has {history} rows but pgbench committed {committed}"
    );
}

pub fn psql_ok(bin: &Path, addr: SocketAddr, sql: &str, what: &str) -> Vec<u8> {
    let ran = run_limited(
        psql_args(bin, addr, &["-At", "-c", sql]),
        None,
        Duration::from_secs(120),
    );
    assert!(ran.ok(), "{what}: psql failed: {}", ran.show());
    ran.stdout
}

fn sha256(bytes: &[u8]) -> String {
    format!("{:x}", Sha256::digest(bytes))
}

/// `pgbench -i -s SCALE` through `addr`; then `pgbench_accounts` holds
/// SCALE × 100 000 rows.
pub fn init(bin: &Path, addr: SocketAddr, what: &str) {
    let ran = run_limited(
        crate::fixture::pgbench_command(bin, addr, &["-i", "-q", "-s", &SCALE.to_string()]),
        None,
        Duration::from_secs(120),
    );
    assert!(ran.ok(), "{what}: pgbench -i failed: {}", ran.show());
    let rows = psql_ok(bin, addr, "SELECT count(*) FROM pgbench_accounts", what);
    assert_eq!(
        String::from_utf8_lossy(&rows).trim(),
        (SCALE * 100_000).to_string(),
        "{what}: pgbench_accounts rows"
    );
}

fn pg_clients_through_spliced(mode: &str) {
    let test = format!("pg_clients_through_spliced({mode})");
    let Some(bin) = pg_bin(&test) else { return };
    let dir = TempDir::new(&format!("e2e-relay-pg-{mode}"));
    let pg = Pg::primary(&bin, &dir, "pg", "monitor-pw");
    let (port, idle_port) = (free_port(), free_port());
    let config = listener("pg", port, pg.port, mode, "")
        + &listener(
            "pg-idle",
            idle_port,
            pg.port,
            mode,
            &format!("idle-timeout = \"{IDLE_S}s\""),
        );
    let proxy = Proxy::start(&dir, &format!("relay-pg-{mode}"), &config);
    let (via, via_idle) = (loopback(port), loopback(idle_port));
    let secs = bench_secs().to_string();
    let limit = Duration::from_secs(bench_secs() + 60);

    // pgbench: init, select-only, TPC-B-like.
    init(&bin, via, &format!("[{mode}] pgbench -i via spliced"));
    pgbench(
        &bin,
        via,
        &["-n", "-S", "-c", "4", "-j", "2", "-T", &secs],
        limit,
        &format!("[{mode}] pgbench -S"),
    );
    let tpcb = pgbench(
        &bin,
        via,
        &["-c", "4", "-j", "2", "-T", &secs],
        limit,
        &format!("[{mode}] pgbench TPC-B"),
    );

    assert_ledger(&bin, via, tpcb.xacts, 4, &format!("[{mode}]"));

    // A connection per transaction: each relay closes, every one at eof
    // (pgbench ends each connection with Terminate, then a close).
    // The baseline is two reads: first every relay of the steps before
    // (the ledger's psql, pgbench's last sessions) must have closed, or
    // one closing between the reads counts as eof but not as closed.
    crate::common::wait_until(
        Duration::from_secs(10),
        "the pg listener has no live relay before the churn",
        || proxy.metric_sum("spliced_connections_active", &[("listener", "pg")]) == 0.0,
    );
    let (before, eof0) = (
        closed(&proxy, "pg", None),
        closed(&proxy, "pg", Some("eof")),
    );
    let churn = pgbench(
        &bin,
        via,
        &["-n", "-S", "-C", "-c", "2", "-j", "2", "-T", "3"],
        Duration::from_secs(63),
        &format!("[{mode}] pgbench -S -C"),
    );
    wait_until(
        Duration::from_secs(10),
        "a relay closed per pgbench -C transaction",
        || closed(&proxy, "pg", None) >= before + churn.xacts,
    );
    let n = closed(&proxy, "pg", None) - before;
    let eof = closed(&proxy, "pg", Some("eof")) - eof0;
    assert_eq!(
        n - eof,
        0,
        "[{mode}] of {n} relays closed for {} transactions, {} closed with a reason other than eof; /metrics:\n{}",
        churn.xacts,
        n - eof,
        super::closes_of(&proxy)
    );

    // COPY TO STDOUT, 45 MB: the same bytes as read directly.
    let rows = copy_rows();
    let query = copy_query(rows);
    let direct = psql_ok(&bin, pg.addr(), &query, "direct COPY");
    assert!(
        direct.len() > 20_000_000 || rows < 600_000,
        "the reference COPY is only {} bytes",
        direct.len()
    );
    assert_eq!(
        direct.iter().filter(|b| **b == b'\n').count() as u64,
        rows,
        "reference COPY row count"
    );
    let want = sha256(&direct);
    let through = psql_ok(&bin, via, &query, "COPY via spliced");
    assert_eq!(
        (through.len(), sha256(&through)),
        (direct.len(), want.clone()),
        "[{mode}] COPY TO STDOUT via spliced differs from the direct one (bytes, sha256)"
    );
    drop(through);

    // COPY FROM STDIN of the same bytes through spliced, read back directly.
    let file = dir.join("copy.tsv");
    std::fs::write(&file, &direct).unwrap();
    drop(direct);
    psql_ok(
        &bin,
        pg.addr(),
        "CREATE TABLE upload (i int, h text, pad text, d date)",
        "create upload",
    );
    let ran = run_limited(
        psql_args(&bin, via, &["-c", "COPY upload FROM STDIN"]),
        Some(&file),
        Duration::from_secs(120),
    );
    assert!(
        ran.ok(),
        "[{mode}] COPY FROM STDIN via spliced: {}",
        ran.show()
    );
    assert_eq!(
        ran.out().trim(),
        format!("COPY {rows}"),
        "[{mode}] psql's answer"
    );
    let back = psql_ok(
        &bin,
        pg.addr(),
        "COPY (SELECT * FROM upload ORDER BY i) TO STDOUT",
        "read back",
    );
    assert_eq!(
        sha256(&back),
        want,
        "[{mode}] the uploaded table differs from the uploaded file"
    );
    drop(back);
    let _ = std::fs::remove_file(&file);

    // Idle timeout: a query silent for longer than it is cut at it...
    let sleep_s = IDLE_S * 2.0 + 1.0;
    let idle0 = closed(&proxy, "pg-idle", Some("idle"));
    let ran = run_limited(
        psql_args(
            &bin,
            via_idle,
            &["-At", "-c", &format!("SELECT pg_sleep({sleep_s})")],
        ),
        None,
        Duration::from_secs(60),
    );
    let el = ran.took.as_secs_f64();
    eprintln!(
        "[{mode}] pg_sleep({sleep_s}) through idle-timeout {IDLE_S}s: {:?} after {el:.3}s",
        ran.status
    );
    assert!(
        !ran.ok(),
        "[{mode}] psql succeeded: the silent connection was not closed at the idle timeout"
    );
    assert!(
        el < sleep_s - 0.5,
        "[{mode}] closed only after {el:.3}s, not at the idle timeout"
    );
    assert!(
        el >= IDLE_S - 0.2,
        "[{mode}] closed after {el:.3}s, before the idle timeout"
    );
    wait_until(
        Duration::from_secs(5),
        "spliced counts the relay closed as idle",
        || closed(&proxy, "pg-idle", Some("idle")) > idle0,
    );
    // ...a shorter one completes...
    let out = psql_ok(
        &bin,
        via_idle,
        &format!("SELECT 'slept', pg_sleep({IDLE_S} / 4.0)"),
        "short sleep",
    );
    assert_eq!(
        String::from_utf8_lossy(&out).trim(),
        "slept|",
        "[{mode}] short sleep"
    );
    // ...and a session longer than the timeout, with shorter gaps, lives:
    // idle is inactivity, not session age.
    let gap = IDLE_S * 0.3;
    let mut args = vec!["-At".to_string()];
    for i in 1..=6 {
        args.push("-c".into());
        args.push(format!("SELECT {i}, pg_sleep({gap})"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ran = run_limited(
        psql_args(&bin, via_idle, &args),
        None,
        Duration::from_secs(60),
    );
    assert!(ran.ok(), "[{mode}] session of short sleeps: {}", ran.show());
    assert_eq!(
        ran.out().lines().collect::<Vec<_>>(),
        ["1|", "2|", "3|", "4|", "5|", "6|"],
        "[{mode}] session did not survive (gaps {gap}s < idle {IDLE_S}s)"
    );

    all_closed_clean(&proxy, "pg", 0);
    all_closed_clean(&proxy, "pg-idle", 1);
    stops_cleanly(proxy);
}

crate::every_engine!(pg_clients_through_spliced);
