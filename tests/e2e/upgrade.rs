//! Live upgrades (`spliced upgrade --name NAME --binary PATH`) under real
//! clients, once per engine, judged by what the clients see and by which
//! server-side session served them:
//!
//! - pgbench (TPC-B-like, 8 clients, 30 s) through three upgrades spread
//!   over its run: it exits 0 with no failed transaction, each upgrade
//!   exits 0, the ledger adds up and every relay closes at eof in the last
//!   process.
//! - A psql session inside an open transaction (BEGIN, INSERT, upgrade,
//!   INSERT, COMMIT): it commits both rows, on the same backend and in
//!   the same transaction.
//! - A redis-cli SUBSCRIBE client receives, in order, every message
//!   published through spliced before, during and after an upgrade, on
//!   the same server connection.
//! - A streaming replica whose `primary_conninfo` names spliced keeps
//!   streaming: rows inserted after the upgrade reach it, through the
//!   same walsender and walreceiver.
//!
//! Each upgrade runs a fresh copy of the binary and the fixture follows
//! the pid file to the new process ([`Proxy::upgrade_ok`]); every test
//! ends with SIGTERM to the process serving then, exit status 0, and no
//! process of the binaries left.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::common::{pace, wait_until};
use crate::fixture::{
    free_port, loopback, pg_bin, pgbench, redis_bin, redis_cli, Binary, Interactive, Pg, Proxy,
    PsqlSession, Redis, Resp, RespConn, TempDir,
};
use crate::relay::pg::{assert_ledger, init};
use crate::relay::{all_closed_clean, listener};

crate::every_engine!(
    failed_upgrades_keep_serving,
    pgbench_across_three_upgrades,
    transaction_across_upgrade,
    subscriber_across_upgrade,
    streaming_replica_across_upgrade,
);

/// pgbench's run, in seconds, and the upgrades spread evenly over it.
const BENCH_SECS: u32 = 30;
const UPGRADES: u32 = 3;
const BENCH_CLIENTS: u32 = 8;

/// Live relays of `listener`, by /metrics.
fn active(proxy: &Proxy, listener: &str) -> f64 {
    proxy.metric_sum("spliced_connections_active", &[("listener", listener)])
}

/// No panic in the log; SIGTERM ends the process serving now with exit
/// status 0 and leaves no process of the binaries running.
fn stops_cleanly(mut proxy: Proxy) {
    let panics = proxy.panic_lines();
    assert!(panics.is_empty(), "spliced panicked: {panics:?}");
    let pid = proxy.pid();
    let status = proxy.terminate(Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "spliced (pid {pid}) after SIGTERM: {status:?} (None: still running after 20 s)"
    );
    assert_eq!(
        proxy.processes(),
        Vec::<i32>::new(),
        "processes of the spliced binaries still running after the stop"
    );
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Joins a client thread, passing on its panic.
fn join<T>(t: thread::JoinHandle<T>) -> T {
    t.join().unwrap_or_else(|e| std::panic::resume_unwind(e))
}

/// A Redis client through spliced: which server answered (its port).
fn served(via: std::net::SocketAddr) -> Result<u16, String> {
    RespConn::connect(via, Duration::from_secs(5))
        .and_then(|mut c| c.server_port())
        .map_err(|e| e.to_string())
}

/// Upgrades that cannot happen (no such binary; a program that exits at
/// once without taking over; a config file the new process refuses) exit
/// non-zero with a one-line reason, and the process serving keeps
/// serving, its live relay included, and its pid file; then an
/// upgrade to a new path and one in place succeed with no client, each
/// new process serves new clients, takes the pid file (`spliced reload
/// --name` reaches it) and the stats file (`spliced stats --name`).
fn failed_upgrades_keep_serving(mode: &str) {
    let test = format!("failed_upgrades_keep_serving({mode})");
    let Some(server) = redis_bin(&test) else {
        return;
    };
    let dir = TempDir::new(&format!("e2e-upgrade-failed-{mode}"));
    let redis = Redis::master(&server, &dir, "redis", None);
    let port = free_port();
    let config = listener("redis", port, redis.port, mode, "");
    let mut proxy = Proxy::start_upgradable(&dir, &format!("upgrade-failed-{mode}"), &config);
    let via = loopback(port);
    let mut live = RespConn::connect(via, Duration::from_secs(5)).unwrap();
    assert_eq!(live.server_port().unwrap(), redis.port);
    let first = proxy.pid();

    let broken = "[[listener]]\nname = \"redis\"\n";
    let cases = [
        (Binary::Given(dir.join("no-such-spliced")), None),
        (Binary::Given("/bin/true".into()), None),
        // The new process reads the config file anew, and refuses it.
        (Binary::NewPath, Some(broken)),
    ];
    for (how, toml) in cases {
        if let Some(toml) = toml {
            proxy.write_config(toml);
        }
        let up = proxy.upgrade(how.clone());
        proxy.write_config(&config);
        let case = format!("[{mode}] an upgrade to {how:?} with config {toml:?}");
        assert!(
            up.status.is_some_and(|s| !s.success()),
            "{case} exits non-zero: {}",
            up.show()
        );
        let said: Vec<&str> = up
            .stderr
            .lines()
            .chain(up.stdout.lines())
            .filter(|l| !l.trim().is_empty())
            .collect();
        assert_eq!(said.len(), 1, "{case} says why in one line: {}", up.show());
        assert_eq!(proxy.processes(), vec![first], "{case}: processes");
        assert_eq!(
            live.server_port().map_err(|e| e.to_string()),
            Ok(redis.port),
            "{case}: the live relay"
        );
        assert_eq!(served(via), Ok(redis.port), "{case}: a new client");
        // The pid file still names the process serving.
        proxy.reload_by_name(&config);
        eprintln!("{case}: {}", said[0]);
    }
    drop(live);

    for how in [Binary::NewPath, Binary::InPlace] {
        let what = format!("[{mode}] upgrade ({how:?}) with no client");
        proxy.upgrade_ok(how, &what);
        assert_eq!(served(via), Ok(redis.port), "{what}: a new client");
        proxy.reload_by_name(&config);
        let (st, out, err) = proxy.cli(&["stats"]);
        assert!(
            st.success() && out.contains("redis"),
            "{what}: spliced stats --name: {st}\n{out}{err}"
        );
    }
    all_closed_clean(&proxy, "redis", 0);
    stops_cleanly(proxy);
}

fn pgbench_across_three_upgrades(mode: &str) {
    let test = format!("pgbench_across_three_upgrades({mode})");
    let Some(bin) = pg_bin(&test) else { return };
    let dir = TempDir::new(&format!("e2e-upgrade-pgbench-{mode}"));
    let pg = Pg::primary(&bin, &dir, "pg", "monitor-pw");
    let port = free_port();
    let mut proxy = Proxy::start_upgradable(
        &dir,
        &format!("upgrade-pgbench-{mode}"),
        &listener("pg", port, pg.port, mode, ""),
    );
    let via = loopback(port);
    init(&bin, via, &format!("[{mode}] pgbench -i via spliced"));

    let what =
        format!("[{mode}] pgbench -c {BENCH_CLIENTS} -T {BENCH_SECS} across {UPGRADES} upgrades");
    let bench = {
        let (bin, what) = (bin.clone(), what.clone());
        let (clients, secs) = (BENCH_CLIENTS.to_string(), BENCH_SECS.to_string());
        thread::spawn(move || {
            let args = ["-c", &clients, "-j", "2", "-T", &secs];
            let limit = Duration::from_secs(u64::from(BENCH_SECS) + 60);
            pgbench(&bin, via, &args, limit, &what)
        })
    };
    // pgbench vacuums on one session, then starts its clients and its
    // clock: the upgrades are spread over the clients' run.
    wait_until(
        Duration::from_secs(30),
        "pgbench's clients are relayed",
        || active(&proxy, "pg") >= f64::from(BENCH_CLIENTS),
    );
    let t0 = Instant::now();
    let mut took = Vec::new();
    for k in 1..=UPGRADES {
        let at = Duration::from_secs(u64::from(BENCH_SECS)) * k / (UPGRADES + 1);
        pace(at.saturating_sub(t0.elapsed()));
        let live = active(&proxy, "pg");
        assert!(
            live >= f64::from(BENCH_CLIENTS),
            "[{mode}] before upgrade {k}: {live} live relays, want pgbench's {BENCH_CLIENTS}"
        );
        // The second writes the new binary over the running one's file.
        let how = if k == 2 {
            Binary::InPlace
        } else {
            Binary::NewPath
        };
        let up = proxy.upgrade_ok(
            how,
            &format!("[{mode}] upgrade {k} of {UPGRADES} under pgbench"),
        );
        took.push(up.took);
    }
    let run = join(bench);
    assert!(
        t0.elapsed() > Duration::from_secs(u64::from(BENCH_SECS) * 3 / 4),
        "{what}: pgbench ended {:?} after its clients started, before its {BENCH_SECS} s",
        t0.elapsed()
    );

    assert_ledger(
        &bin,
        via,
        run.xacts,
        u64::from(BENCH_CLIENTS),
        &format!("[{mode}]"),
    );
    eprintln!(
        "{what}: {} transactions, none failed; the upgrades took {took:?}",
        run.xacts
    );
    all_closed_clean(&proxy, "pg", 0);
    stops_cleanly(proxy);
}

fn transaction_across_upgrade(mode: &str) {
    let test = format!("transaction_across_upgrade({mode})");
    let Some(bin) = pg_bin(&test) else { return };
    let dir = TempDir::new(&format!("e2e-upgrade-tx-{mode}"));
    let pg = Pg::primary(&bin, &dir, "pg", "monitor-pw");
    let port = free_port();
    let mut proxy = Proxy::start_upgradable(
        &dir,
        &format!("upgrade-tx-{mode}"),
        &listener("pg", port, pg.port, mode, ""),
    );
    pg.psql("CREATE TABLE upgrade_tx (v int)");
    let mut psql = PsqlSession::start(&bin, loopback(port), &format!("[{mode}] psql via spliced"));
    let backend = psql.line("SELECT pg_backend_pid();");
    psql.run("BEGIN; INSERT INTO upgrade_tx VALUES (1);");
    let xid = psql.line("SELECT txid_current();");
    // The transaction is open: its row is not visible outside it.
    assert_eq!(pg.psql("SELECT count(*) FROM upgrade_tx"), "0");
    assert_eq!(
        pg.psql(&format!(
            "SELECT state FROM pg_stat_activity WHERE pid = {backend}"
        )),
        "idle in transaction"
    );

    proxy.upgrade_ok(
        Binary::NewPath,
        &format!("[{mode}] upgrade inside a transaction"),
    );

    psql.run("INSERT INTO upgrade_tx VALUES (2);");
    assert_eq!(
        (
            psql.line("SELECT pg_backend_pid();"),
            psql.line("SELECT txid_current();")
        ),
        (backend.clone(), xid.clone()),
        "[{mode}] the backend and transaction after the upgrade"
    );
    psql.run("COMMIT;");
    assert_eq!(
        pg.psql("SELECT string_agg(v::text, ',' ORDER BY v) FROM upgrade_tx"),
        "1,2",
        "[{mode}] rows committed"
    );
    let (status, err) = psql.quit();
    assert!(
        status.is_some_and(|s| s.success()),
        "[{mode}] psql: {status:?}\n{err}"
    );
    eprintln!("[{mode}] transaction {xid} on backend {backend} committed across the upgrade");
    all_closed_clean(&proxy, "pg", 0);
    stops_cleanly(proxy);
}

/// The one client of `redis` subscribed to a channel: its `id=` and
/// `addr=` (the server side of its connection) from CLIENT LIST.
fn subscriber(redis: &Redis) -> String {
    let list = redis.cmd(&["CLIENT", "LIST"]).text();
    let subs: Vec<String> = list
        .lines()
        .filter(|l| l.split(' ').any(|f| f == "sub=1"))
        .map(|l| {
            l.split(' ')
                .filter(|f| f.starts_with("id=") || f.starts_with("addr="))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    assert_eq!(
        subs.len(),
        1,
        "subscribed clients of {}:\n{list}",
        redis.name
    );
    subs.into_iter().next().unwrap()
}

/// Publishes message `n` on `conn`; asserts one subscriber received it.
fn publish(conn: &mut RespConn, channel: &str, n: u64) {
    let got = conn
        .cmd(&["PUBLISH", channel, &format!("m:{n}")])
        .unwrap_or_else(|e| panic!("PUBLISH m:{n}: {e}"));
    assert_eq!(got, Resp::Int(1), "receivers of m:{n}");
}

fn subscriber_across_upgrade(mode: &str) {
    const CHANNEL: &str = "upgrade-news";
    const EACH_SIDE: u64 = 200;
    let test = format!("subscriber_across_upgrade({mode})");
    let Some(server) = redis_bin(&test) else {
        return;
    };
    let dir = TempDir::new(&format!("e2e-upgrade-sub-{mode}"));
    let redis = Redis::master(&server, &dir, "redis", None);
    let port = free_port();
    let mut proxy = Proxy::start_upgradable(
        &dir,
        &format!("upgrade-sub-{mode}"),
        &listener("redis", port, redis.port, mode, ""),
    );
    let via = loopback(port);
    let mut sub = Interactive::spawn(
        &format!("[{mode}] redis-cli SUBSCRIBE via spliced"),
        redis_cli(via, &["SUBSCRIBE", CHANNEL]),
    );
    let t = Duration::from_secs(10);
    let heard = |sub: &mut Interactive| sub.line(t).unwrap_or_else(|e| panic!("{e}"));
    let confirm: Vec<String> = (0..3).map(|_| heard(&mut sub)).collect();
    assert_eq!(confirm, ["subscribe", CHANNEL, "1"]);
    let session = subscriber(&redis);

    // One publisher through spliced, on one connection throughout.
    let mut publisher = RespConn::connect(via, t).unwrap();
    for n in 0..EACH_SIDE {
        publish(&mut publisher, CHANNEL, n);
    }
    // During: a thread publishes back to back while the upgrade runs.
    let next = Arc::new(AtomicU64::new(EACH_SIDE));
    let stop = Arc::new(AtomicBool::new(false));
    // A failing test stops the thread too.
    let _stop = StopOnDrop(Arc::clone(&stop));
    let during = {
        let (next, stop) = (Arc::clone(&next), Arc::clone(&stop));
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                let n = next.load(Ordering::SeqCst);
                publish(&mut publisher, CHANNEL, n);
                next.store(n + 1, Ordering::SeqCst);
            }
            publisher
        })
    };
    wait_until(t, "the publisher runs", || {
        next.load(Ordering::SeqCst) > EACH_SIDE
    });
    let started = next.load(Ordering::SeqCst);
    proxy.upgrade_ok(
        Binary::NewPath,
        &format!("[{mode}] upgrade under a subscriber"),
    );
    let ended = next.load(Ordering::SeqCst);
    stop.store(true, Ordering::SeqCst);
    let mut publisher = join(during);
    assert!(
        ended > started,
        "[{mode}] no message was published while spliced upgrade ran"
    );
    let after = next.load(Ordering::SeqCst);
    for n in after..after + EACH_SIDE {
        publish(&mut publisher, CHANNEL, n);
    }
    let total = after + EACH_SIDE;

    for n in 0..total {
        let got: Vec<String> = (0..3).map(|_| heard(&mut sub)).collect();
        assert_eq!(
            got,
            ["message", CHANNEL, &format!("m:{n}")],
            "[{mode}] message {n} of {total}"
        );
    }
    assert_eq!(
        subscriber(&redis),
        session,
        "[{mode}] the subscriber's server connection after the upgrade"
    );
    eprintln!(
        "[{mode}] {total} messages received in order across the upgrade ({} published while it ran)",
        ended - started
    );
    drop((sub, publisher));
    all_closed_clean(&proxy, "redis", 0);
    stops_cleanly(proxy);
}

/// The walsender serving the one streaming replica: pid, client port and
/// start time, from pg_stat_replication on the primary.
fn walsender(primary: &Pg) -> String {
    let rows = primary.psql(
        "SELECT pid, client_port, backend_start FROM pg_stat_replication WHERE state = 'streaming'",
    );
    assert_eq!(rows.lines().count(), 1, "streaming walsenders: {rows:?}");
    rows
}

fn streaming_replica_across_upgrade(mode: &str) {
    let test = format!("streaming_replica_across_upgrade({mode})");
    let Some(bin) = pg_bin(&test) else { return };
    let dir = TempDir::new(&format!("e2e-upgrade-replica-{mode}"));
    let primary = Pg::primary(&bin, &dir, "primary", "monitor-pw");
    let port = free_port();
    let mut proxy = Proxy::start_upgradable(
        &dir,
        &format!("upgrade-replica-{mode}"),
        &listener("pg", port, primary.port, mode, ""),
    );
    let replica = Pg::replica_through(&primary, &dir, "replica", loopback(port));
    let receiver = "SELECT pid, status, sender_port FROM pg_stat_wal_receiver";
    let t = Duration::from_secs(20);
    wait_until(t, "the replica streams through spliced", || {
        replica
            .try_query_line(receiver)
            .is_some_and(|l| l.ends_with(&format!("|streaming|{port}")))
    });
    let streams = (walsender(&primary), replica.psql(receiver));
    let count = |pg: &Pg| pg.try_query_line("SELECT count(*) FROM upgrade_repl");
    primary.psql("CREATE TABLE upgrade_repl (v int); INSERT INTO upgrade_repl SELECT generate_series(1, 1000)");
    wait_until(t, "the replica has the rows before the upgrade", || {
        count(&replica).as_deref() == Some("1000")
    });

    proxy.upgrade_ok(
        Binary::NewPath,
        &format!("[{mode}] upgrade under a streaming replica"),
    );

    // About 10 MB of WAL after the upgrade.
    primary.psql("INSERT INTO upgrade_repl SELECT generate_series(1001, 200000)");
    let lsn = primary.psql("SELECT pg_current_wal_lsn()");
    wait_until(t, "the replica has the rows after the upgrade", || {
        count(&replica).as_deref() == Some("200000")
    });
    assert_eq!(
        replica.psql(&format!(
            "SELECT pg_last_wal_receive_lsn() >= '{lsn}'::pg_lsn"
        )),
        "t"
    );
    assert_eq!(
        (walsender(&primary), replica.psql(receiver)),
        streams,
        "[{mode}] the walsender and walreceiver after the upgrade"
    );
    eprintln!(
        "[{mode}] the replica streamed across the upgrade on one session (walsender {})",
        streams.0
    );
    // Its walreceiver would hold spliced's drain.
    drop(replica);
    stops_cleanly(proxy);
}
