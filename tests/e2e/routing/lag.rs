//! Replication lag (`max-lag`), PostgreSQL and Redis: a replica that falls
//! behind its primary takes no new relays while its live relays keep
//! running, and takes them again once it caught up. The primary is named
//! by another listener's pool only: its position counts for every pool of
//! the process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{
    ms, pg_login, probe_lag, settle_on, tally, Attempt, ListenerToml, Seen, CLIENT_TIMEOUT,
};
use crate::common::wait_until;
use crate::fixture::{
    free_port, loopback, pg_bin, redis_bin, write_secret, Pg, PgConn, Proxy, Redis, RespConn,
    TempDir, CLIENT_USER,
};

/// "t|PORT": in recovery, and which server answered.
const WHO: &str = "SELECT pg_is_in_recovery(), inet_server_port()";

fn ask_pg(addr: SocketAddr) -> Seen {
    Seen::of(
        PgConn::connect(addr, CLIENT_USER, None, CLIENT_TIMEOUT)
            .and_then(|mut c| c.query_line(WHO)),
    )
}

fn on(pg: &Pg) -> String {
    format!("t|{}", pg.port)
}

/// A read (`ask`) every 50 ms until `until` holds for the attempts so far
/// (a panic once `timeout` passed).
fn reads_until(
    ask: &dyn Fn() -> Seen,
    timeout: Duration,
    what: &str,
    mut until: impl FnMut(&[Attempt]) -> bool,
) -> Vec<Attempt> {
    let mut out = Vec::new();
    wait_until(timeout, what, || {
        let start = Instant::now();
        let seen = ask();
        out.push(Attempt {
            start,
            end: Instant::now(),
            seen,
        });
        // Paces the probes through the proxy; the deadline is wait_until's.
        crate::common::pace(Duration::from_millis(50));
        until(&out)
    });
    out
}

fn served_by(attempts: &[Attempt], who: &str) -> usize {
    attempts
        .iter()
        .filter(|a| a.seen.served() == Some(who))
        .count()
}

/// What both scenarios check once a replica fell behind at `written`
/// (`behind` and `current` are what a read through the listener answers
/// on each replica): from two probe lags on, no new relay reaches it and
/// the other replica serves; the log says it left, measured against the
/// primary (named by another listener only).
fn no_relay_while_lagging(
    ask: &dyn Fn() -> Seen,
    written: Instant,
    behind: &str,
    current: &str,
    proxy: &Proxy,
    what: &str,
) {
    let attempts = reads_until(
        ask,
        Duration::from_secs(20),
        "the read pool left the lagging replica out for 3 s",
        |a| {
            a.last()
                .is_some_and(|l| l.start > written + Duration::from_secs(3))
        },
    );
    let to_behind: Vec<i64> = attempts
        .iter()
        .filter(|a| a.start > written + 2 * probe_lag())
        .filter(|a| a.seen.served() == Some(behind))
        .map(|a| ms(written, a.start))
        .collect();
    eprintln!(
        "{what}: while lagging, {}; relays to the lagging replica at {to_behind:?} ms",
        tally(&attempts)
    );
    assert!(
        to_behind.is_empty(),
        "{what}: relays reached the lagging replica at {to_behind:?} ms after the writes"
    );
    assert!(
        served_by(&attempts, current) >= 10,
        "{what}: the other replica serves: {}",
        tally(&attempts)
    );
    let left: Vec<String> = proxy
        .logs()
        .into_iter()
        .filter(|l| l.contains("replication lag") && l.contains("leaves"))
        .collect();
    eprintln!("{what}: {left:?}");
    assert!(
        left.iter().any(|l| l.contains("behind the primary")),
        "{what}: the lag is measured against the primary: {left:?}"
    );
}

/// Once the replica caught up: reads reach it again, and both serve.
fn back_after_catching_up(ask: &dyn Fn() -> Seen, behind: &str, current: &str, what: &str) {
    let resumed = Instant::now();
    let attempts = reads_until(
        ask,
        Duration::from_secs(20),
        "the read pool reaches the caught-up replica again",
        |a| served_by(a, behind) > 0,
    );
    eprintln!(
        "{what}: back {} ms after it caught up; {}",
        ms(resumed, attempts.last().unwrap().end),
        tally(&attempts)
    );
    settle_on(Duration::from_secs(15), 1, "both replicas serve", || {
        let a = reads_until(ask, Duration::from_secs(10), "ten reads", |a| a.len() >= 10);
        match (served_by(&a, behind), served_by(&a, current)) {
            (b, c) if b > 0 && c > 0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn pg_a_lagging_replica_leaves_the_read_pool_and_returns() {
    let Some(bin) = pg_bin("pg_a_lagging_replica_leaves_the_read_pool_and_returns") else {
        return;
    };
    let dir = TempDir::new("e2e-pg-lag");
    let primary = Pg::primary(&bin, &dir, "pg-primary", "monitor-pw");
    let behind = Pg::replica_of(&primary, &dir, "pg-behind");
    let current = Pg::replica_of(&primary, &dir, "pg-current");
    primary.psql("CREATE TABLE filler (id bigint, pad text)");
    let pass = write_secret(&dir, "monitor.pass", "monitor-pw");
    let (rw, ro) = (free_port(), free_port());
    let login = pg_login(&pass, "150ms");
    let config = format!(
        "{}\n{}",
        ListenerToml {
            name: "pg-rw",
            port: rw,
            servers: &[primary.port],
            check: "postgres",
            role: "primary",
            pool_extra: "",
            health_extra: &login,
        }
        .render(),
        ListenerToml {
            name: "pg-ro",
            port: ro,
            servers: &[behind.port, current.port],
            check: "postgres",
            role: "replica",
            pool_extra: "",
            health_extra: &format!("{login}\nmax-lag = \"1m\""),
        }
        .render()
    );
    let proxy = Proxy::start(&dir, "pg-lag", &config);
    let ro_addr = loopback(ro);
    let ask = move || ask_pg(ro_addr);
    let (on_behind, on_current) = (on(&behind), on(&current));
    reads_until(
        &ask,
        Duration::from_secs(15),
        "pg-ro reaches both replicas",
        |a| served_by(a, &on_behind) > 0 && served_by(a, &on_current) > 0,
    );
    // A session on the replica that is about to fall behind.
    let mut session = loop {
        let mut c = PgConn::connect(ro_addr, CLIENT_USER, None, CLIENT_TIMEOUT).unwrap();
        if c.query_line(WHO).unwrap() == on_behind {
            break c;
        }
    };

    behind.psql("SELECT pg_wal_replay_pause()");
    wait_until(Duration::from_secs(10), "the replay is paused", || {
        behind.psql("SELECT pg_get_wal_replay_pause_state()") == "paused"
    });
    // About 8 MB of WAL: past max-lag, and past 3/4 of it for the whole run.
    primary.psql("INSERT INTO filler SELECT g, repeat('x', 800) FROM generate_series(1, 8000) g");
    let target = primary.psql("SELECT pg_current_wal_lsn()");
    wait_until(
        Duration::from_secs(20),
        "the other replica replayed it",
        || {
            current.psql(&format!(
                "SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"
            )) == "t"
        },
    );
    let written = Instant::now();
    let behind_by = behind.psql(&format!(
        "SELECT pg_wal_lsn_diff('{target}', pg_last_wal_replay_lsn())"
    ));
    eprintln!("pg lag: the paused replica is {behind_by} bytes behind");
    assert!(behind_by.parse::<f64>().unwrap() > 2.0 * 1024.0 * 1024.0);

    no_relay_while_lagging(&ask, written, &on_behind, &on_current, &proxy, "pg lag");
    assert_eq!(
        session.query_line(WHO).unwrap(),
        on_behind,
        "a live relay to the lagging replica keeps running"
    );
    lag_is_shown(&proxy, "pg lag", "pg-ro", behind.addr());

    behind.psql("SELECT pg_wal_replay_resume()");
    back_after_catching_up(&ask, &on_behind, &on_current, "pg lag");
    assert_eq!(session.query_line(WHO).unwrap(), on_behind);
}

/// /metrics and `spliced stats` show the replica of `listener` at
/// `lagging` as such, with its lag (over 1 MiB).
fn lag_is_shown(proxy: &Proxy, what: &str, listener: &str, lagging: SocketAddr) {
    let server = lagging.to_string();
    let at = [("listener", listener), ("server", server.as_str())];
    let lag = proxy.metric("spliced_server_replication_lag_bytes", &at);
    let state = proxy.metric(
        "spliced_server_state",
        &[at[0], at[1], ("state", "lagging")],
    );
    eprintln!("{what}: /metrics lag {lag:?}, lagging {state:?}");
    assert!(
        lag.is_some_and(|b| b > 1024.0 * 1024.0),
        "{what}: lag {lag:?}"
    );
    assert_eq!(state, Some(1.0), "{what}: state lagging");
    let (status, stats, err) = proxy.cli(&["stats"]);
    assert!(status.success(), "{what}: spliced stats failed: {err}");
    let row = stats
        .lines()
        .find(|l| l.starts_with(&server) && l.contains(listener))
        .unwrap_or_else(|| panic!("{what}: no row for {server} in\n{stats}"));
    eprintln!("{what}: spliced stats: {row}");
    assert!(
        row.contains("lagging") && row.contains("replication lag") && row.contains("MiB"),
        "{what}: {row}"
    );
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn redis_a_lagging_replica_leaves_the_read_pool_and_returns() {
    let Some(bin) = redis_bin("redis_a_lagging_replica_leaves_the_read_pool_and_returns") else {
        return;
    };
    let dir = TempDir::new("e2e-redis-lag");
    let master = Redis::master(&bin, &dir, "redis-m", None);
    let behind = Redis::replica_of(&bin, &dir, "redis-behind", &master);
    let current = Redis::replica_of(&bin, &dir, "redis-current", &master);
    let (rw, ro) = (free_port(), free_port());
    let config = format!(
        "{}\n{}",
        ListenerToml {
            name: "redis-rw",
            port: rw,
            servers: &[master.port],
            check: "redis",
            role: "primary",
            pool_extra: "",
            health_extra: "timeout = \"150ms\"",
        }
        .render(),
        ListenerToml {
            name: "redis-ro",
            port: ro,
            servers: &[behind.port, current.port],
            check: "redis",
            role: "replica",
            pool_extra: "",
            health_extra: "timeout = \"150ms\"\nmax-lag = \"1m\"",
        }
        .render()
    );
    let proxy = Proxy::start(&dir, "redis-lag", &config);
    let ro_addr = loopback(ro);
    let ask = move || {
        Seen::of(
            RespConn::connect(ro_addr, CLIENT_TIMEOUT)
                .and_then(|mut c| c.server_port())
                .map(|p| p.to_string()),
        )
    };
    let (on_behind, on_current) = (behind.port.to_string(), current.port.to_string());
    reads_until(
        &ask,
        Duration::from_secs(15),
        "redis-ro reaches both replicas",
        |a| served_by(a, &on_behind) > 0 && served_by(a, &on_current) > 0,
    );
    let mut session = loop {
        let mut c = RespConn::connect(ro_addr, CLIENT_TIMEOUT).unwrap();
        if c.server_port().unwrap() == behind.port {
            break c;
        }
    };

    // A replica's CLIENT PAUSE WRITE holds back what its master sends: it
    // keeps reading the stream (slave_read_repl_offset) but applies none
    // of it (slave_repl_offset), and still answers PING and INFO.
    behind.cmd(&["CLIENT", "PAUSE", "120000", "WRITE"]);
    master.cmd(&[
        "EVAL",
        "for i = 1, 3000 do redis.call('SET', 'k' .. i, string.rep('x', 1000)) end",
        "0",
    ]);
    let offset = |r: &Redis, key: &str| -> u64 {
        r.info_field("replication", key)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let target = offset(&master, "master_repl_offset");
    wait_until(
        Duration::from_secs(20),
        "the other replica applied it",
        || offset(&current, "slave_repl_offset") >= target,
    );
    let written = Instant::now();
    let applied = offset(&behind, "slave_repl_offset");
    eprintln!(
        "redis lag: the paused replica applied {applied} of {target} (read {})",
        offset(&behind, "slave_read_repl_offset")
    );
    assert!(target - applied > 2 * 1024 * 1024);

    no_relay_while_lagging(&ask, written, &on_behind, &on_current, &proxy, "redis lag");
    assert_eq!(
        session.server_port().unwrap(),
        behind.port,
        "a live relay to the lagging replica keeps running"
    );
    lag_is_shown(&proxy, "redis lag", "redis-ro", behind.addr());

    behind.cmd(&["CLIENT", "UNPAUSE"]);
    back_after_catching_up(&ask, &on_behind, &on_current, "redis lag");
    assert_eq!(session.server_port().unwrap(), behind.port);
}
