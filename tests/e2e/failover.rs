//! Real failovers through spliced's active checks, judged by what clients
//! see: which server answers, whether an old client is reset, how long new
//! clients wait for the new primary.
//!
//! - PostgreSQL: a primary and a streaming replica behind a
//!   `role = "primary"`, `on-down = "kill"` listener. The primary hangs
//!   (every process of it SIGSTOPped) and spliced resets its client; then
//!   it is stopped and the replica promoted, new connections reach the new
//!   primary within interval × fall + 1 s, and pgbench runs again. Cancel
//!   routing: `SELECT pg_sleep(30)` through a two-server round-robin pool,
//!   cancelled by psql on SIGINT, ends within 5 s, every time.
//! - Redis: a master and a replica switched with REPLICAOF: the old
//!   master's client is reset (server-down), new connections reach the new
//!   master within the same bound.
//! - MariaDB behind a `mysql` check: up, no probe failing, queries pass
//!   through; once it stops it is marked down, with its reason in the log.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::common::{exit_within, wait_until};
use crate::fixture::{
    free_port, loopback, pg_bin, pgbench, psql_args, redis_bin, run_limited, Mariadb, Pg, PgConn,
    Proxy, Redis, RespConn, TempDir, CLIENT_USER,
};

const INTERVAL_MS: u64 = 300;
const FALL: u64 = 2;

/// The longest new clients may wait for the new primary.
fn bound() -> Duration {
    Duration::from_millis(INTERVAL_MS * FALL + 1000)
}

/// `[listener.pool.health]` lines of these scenarios.
fn health(check: &str, role: &str, extra: &str) -> String {
    format!(
        "[listener.pool.health]\ncheck = \"{check}\"\n{role}interval = \"{INTERVAL_MS}ms\"\n\
         timeout = \"250ms\"\nfall = {FALL}\n{extra}\n",
        role = if role.is_empty() {
            String::new()
        } else {
            format!("role = \"{role}\"\n")
        }
    )
}

/// Polls `cond` every 20 ms for up to `limit`: how long until it held,
/// or `None`.
fn time_until(limit: Duration, mut cond: impl FnMut() -> bool) -> Option<Duration> {
    let t0 = Instant::now();
    loop {
        if cond() {
            return Some(t0.elapsed());
        }
        if t0.elapsed() > limit {
            return None;
        }
        crate::common::pace(Duration::from_millis(20));
    }
}

/// "false PORT" if a new connection through `via` reaches a primary on PORT.
fn pg_via(via: SocketAddr) -> Option<String> {
    PgConn::connect(via, CLIENT_USER, None, Duration::from_secs(2))
        .and_then(|mut c| {
            c.query_line("SELECT pg_is_in_recovery()::text || ' ' || current_setting('port')")
        })
        .ok()
}

/// Six new connections in a row through `via` reach a primary on `port`.
fn all_reach_pg(via: SocketAddr, port: u16) -> bool {
    let want = format!("false {port}");
    (0..6).all(|_| pg_via(via).as_deref() == Some(want.as_str()))
}

fn relays_closed(proxy: &Proxy, listener: &str, reason: &str) -> f64 {
    proxy.metric_sum(
        "spliced_connections_closed_total",
        &[("listener", listener), ("reason", reason)],
    )
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn pg_failover_kill_promote_and_cancel() {
    let test = "pg_failover_kill_promote_and_cancel";
    let Some(bin) = pg_bin(test) else { return };
    let dir = TempDir::new("e2e-failover-pg");
    let mut primary = Pg::primary(&bin, &dir, "pg-a", "monitor-pw");
    let replica = Pg::replica_of(&primary, &dir, "pg-b");
    assert_eq!(replica.psql("SELECT pg_is_in_recovery()"), "t");
    let (p1, p2) = (primary.port, replica.port);
    let (via_port, any_port) = (free_port(), free_port());
    let config = format!(
        "[[listener]]\nname = \"pg-primary\"\nlisten = \"127.0.0.1:{via_port}\"\nprotocol = \"postgres\"\n\
         [listener.pool]\non-down = \"kill\"\nservers = [\"127.0.0.1:{p1}\", \"127.0.0.1:{p2}\"]\n{}\n\
         [[listener]]\nname = \"pg-any\"\nlisten = \"127.0.0.1:{any_port}\"\nprotocol = \"postgres\"\n\
         [listener.pool]\nservers = [\"127.0.0.1:{p1}\", \"127.0.0.1:{p2}\"]\n",
        health("postgres", "primary", "user = \"postgres\"\nrise = 1")
    );
    let proxy = Proxy::start(&dir, "failover-pg", &config);
    let (via, any) = (loopback(via_port), loopback(any_port));

    // The replica fails the role check from its first probe: every new
    // connection reaches the primary.
    wait_until(
        Duration::from_secs(10),
        "the primary's first probe passed",
        || {
            proxy.metric(
                "spliced_server_up",
                &[
                    ("listener", "pg-primary"),
                    ("server", &primary.addr().to_string()),
                ],
            ) == Some(1.0)
        },
    );
    assert!(
        all_reach_pg(via, p1),
        "role = primary: not every connection reached the primary: {:?}",
        pg_via(via)
    );

    // Cancel routing through a round-robin pool of both servers: from
    // SIGINT to psql's exit, under 5 s, every time.
    let mut figures = Vec::new();
    for i in 0..4 {
        let mut c = psql_args(&bin, any, &["-c", "SELECT pg_sleep(30)"]);
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start psql");
        let sleeping = |pg: &Pg| {
            pg.try_query_line(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'",
            )
            .as_deref()
                == Some("1")
        };
        wait_until(Duration::from_secs(10), "psql's pg_sleep(30) runs", || {
            sleeping(&primary) || sleeping(&replica)
        });
        let t0 = Instant::now();
        kill(Pid::from_raw(child.id() as i32), Signal::SIGINT).unwrap();
        let status = exit_within(&mut child, Duration::from_secs(10));
        let took = t0.elapsed();
        if status.is_none() {
            let _ = child.kill();
        }
        let out = child.wait_with_output().expect("psql output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        figures.push(took);
        assert!(
            text.contains("canceling statement due to user request") && took < Duration::from_secs(5),
            "cancel {}: pg_sleep(30) through a 2-server pool not cancelled within 5 s ({took:?}): {text}",
            i + 1
        );
    }
    eprintln!("cancel through a 2-server pool, SIGINT to exit: {figures:?}");

    // pgbench through spliced, then the failover.
    let ran = run_limited(
        crate::fixture::pgbench_command(&bin, via, &["-i", "-q", "-s", "1"]),
        None,
        Duration::from_secs(120),
    );
    assert!(ran.ok(), "pgbench -i through spliced: {}", ran.show());

    // The primary hangs (every process stopped, as on a frozen host): it
    // closes nothing itself, so only on-down = kill can end its client's
    // session. Then it is stopped and the replica promoted.
    let mut old = psql_args(&bin, via, &["-c", "SELECT pg_sleep(60)"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the old client");
    wait_until(
        Duration::from_secs(5),
        "the old client's query runs",
        || {
            primary
                .try_query_line(
                    "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)'",
                )
                .as_deref()
                == Some("1")
        },
    );
    let down0 = relays_closed(&proxy, "pg-primary", "server-down");
    primary.signal_all(Signal::SIGSTOP);
    let status = exit_within(&mut old, Duration::from_secs(10));
    if status.is_none() {
        let _ = old.kill();
    }
    let out = old.wait_with_output().expect("old client output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let reset = status.is_some_and(|s| !s.success())
        && (text.to_lowercase().contains("reset")
            || text.contains("closed the connection unexpectedly"));
    // Counted as server-down by the listener whose server it was.
    let counted = time_until(Duration::from_secs(3), || {
        relays_closed(&proxy, "pg-primary", "server-down") > down0
    });
    primary.signal_all(Signal::SIGCONT);
    assert!(
        reset && counted.is_some(),
        "the hung primary's client was not reset by on-down = kill (exit {status:?}, closed as server-down: {counted:?}): {text}"
    );

    primary.stop_immediate();
    replica.promote();
    let took = time_until(bound(), || {
        pg_via(via).as_deref() == Some(format!("false {p2}").as_str())
    });
    eprintln!(
        "new connections reach the promoted replica: {took:?} after promotion (bound {:?})",
        bound()
    );
    assert!(
        took.is_some(),
        "new connections did not reach the promoted replica within {:?}",
        bound()
    );
    pgbench(
        &bin,
        via,
        &["-T", "3", "-c", "2"],
        Duration::from_secs(60),
        "pgbench through spliced on the new primary",
    );

    // The log line is the feature: the down server named, at warn, with
    // its reason.
    let p1_addr = format!("127.0.0.1:{p1}");
    let logs = proxy.logs();
    assert!(
        logs.iter().any(|l| l.contains("WARN")
            && l.contains("server marked down")
            && l.contains(&p1_addr)
            && l.contains(": ")),
        "no warning that {p1_addr} was marked down, with its reason"
    );
}

/// The port of the server a new connection through `via` reaches.
fn redis_via(via: SocketAddr) -> Option<u16> {
    RespConn::connect(via, Duration::from_secs(2))
        .and_then(|mut c| c.server_port())
        .ok()
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn redis_failover_by_replicaof() {
    let test = "redis_failover_by_replicaof";
    let Some(bin) = redis_bin(test) else { return };
    let dir = TempDir::new("e2e-failover-redis");
    let r1 = Redis::master(&bin, &dir, "redis-a", None);
    let r2 = Redis::replica_of(&bin, &dir, "redis-b", &r1);
    let port = free_port();
    let config = format!(
        "[[listener]]\nname = \"redis-master\"\nlisten = \"127.0.0.1:{port}\"\n\
         [listener.pool]\non-down = \"kill\"\nservers = [\"127.0.0.1:{}\", \"127.0.0.1:{}\"]\n{}",
        r1.port,
        r2.port,
        health("redis", "primary", "rise = 1")
    );
    let proxy = Proxy::start(&dir, "failover-redis", &config);
    let via = loopback(port);
    wait_until(
        Duration::from_secs(10),
        "the master's first probe passed",
        || {
            proxy.metric(
                "spliced_server_up",
                &[
                    ("listener", "redis-master"),
                    ("server", &r1.addr().to_string()),
                ],
            ) == Some(1.0)
        },
    );
    assert!(
        (0..6).all(|_| redis_via(via) == Some(r1.port)),
        "role = primary: not every connection reached the master"
    );
    let mut set = RespConn::connect(via, Duration::from_secs(5)).unwrap();
    set.cmd(&["SET", "k", "v"]).expect("SET through spliced");
    drop(set);

    // An old client, held open.
    let mut old = RespConn::connect(via, Duration::from_secs(5)).unwrap();
    assert_eq!(
        old.cmd(&["PING"]).unwrap().text(),
        "PONG",
        "old client PING"
    );
    let down0 = relays_closed(&proxy, "redis-master", "server-down");

    r2.promote();
    r1.cmd(&["REPLICAOF", "127.0.0.1", &r2.port.to_string()]);
    let took = time_until(bound(), || redis_via(via) == Some(r2.port));
    eprintln!(
        "new connections reach the new master: {took:?} after REPLICAOF (bound {:?})",
        bound()
    );
    assert!(
        took.is_some(),
        "new connections did not reach the new master within {:?}",
        bound()
    );
    let closed = old.closed_within(Duration::from_secs(3));
    let counted = time_until(Duration::from_secs(3), || {
        relays_closed(&proxy, "redis-master", "server-down") > down0
    });
    assert!(
        closed.is_some() && counted.is_some(),
        "the old master's client was not reset by on-down = kill (closed: {closed:?}, counted server-down: {counted:?})"
    );
    // Writes through spliced land on the new master.
    let mut w = RespConn::connect(via, Duration::from_secs(5)).unwrap();
    w.cmd(&["SET", "k2", "v2"])
        .expect("SET on the new master through spliced");
    assert_eq!(r2.cmd(&["GET", "k2"]).text(), "v2");
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn mariadb_behind_a_mysql_check() {
    let test = "mariadb_behind_a_mysql_check";
    let dir = TempDir::new("e2e-failover-mariadb");
    // Three failed handshakes would block the probing host: no probe may fail.
    let Some(db) = Mariadb::start(test, &dir, "mariadb", &["--max-connect-errors=3"]) else {
        return;
    };
    let Some(client) = crate::servers::find_bin(test, &["mariadb", "mysql"], &[]) else {
        return;
    };
    let port = free_port();
    let config = format!(
        "[[listener]]\nname = \"mysql\"\nlisten = \"127.0.0.1:{port}\"\n\
         [listener.pool]\nservers = [\"127.0.0.1:{}\"]\n{}",
        db.port,
        health("mysql", "", "")
    );
    let proxy = Proxy::start(&dir, "failover-mariadb", &config);
    let server = db.addr().to_string();
    // A dozen probes: none may fail.
    wait_until(Duration::from_secs(10), "a dozen probes ran", || {
        proxy.metric_sum("spliced_health_probes_total", &[]) >= 12.0
    });
    assert_eq!(
        proxy.metric_sum("spliced_health_probe_failures_total", &[]),
        0.0,
        "a mysql probe failed"
    );
    assert_eq!(
        proxy.metric(
            "spliced_server_up",
            &[("listener", "mysql"), ("server", &server)]
        ),
        Some(1.0)
    );
    assert!(
        !proxy.logs().iter().any(|l| l.contains("marked down")),
        "marked down while it runs"
    );
    let mut c = Command::new(client);
    c.args([
        "-h",
        "127.0.0.1",
        "-P",
        &port.to_string(),
        "-u",
        "root",
        "-N",
        "-e",
        "SELECT 1",
    ]);
    let ran = run_limited(c, None, Duration::from_secs(10));
    assert!(ran.ok(), "SELECT 1 through spliced: {}", ran.show());
    assert_eq!(ran.out().trim(), "1");

    drop(db);
    wait_until(Duration::from_secs(5), "the stopped server is down", || {
        proxy.metric(
            "spliced_server_up",
            &[("listener", "mysql"), ("server", &server)],
        ) == Some(0.0)
    });
    // The log line is the feature: marked down at warn, with its reason.
    wait_until(
        Duration::from_secs(5),
        "spliced warns: marked down, and why",
        || {
            proxy.logs().iter().any(|l| {
                l.contains("WARN")
                    && l.contains("server marked down after failed")
                    && l.contains(&server)
            })
        },
    );
}
