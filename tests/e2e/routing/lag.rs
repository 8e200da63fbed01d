//! Replication lag (`max-lag`): a replica that falls behind its primary
//! takes no new relays while its live relays keep running, and takes them
//! again once it caught up. The primary is named by another listener's
//! pool only: its position counts for every pool of the process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use super::{
    ms, pg_login, probe_lag, settle_on, tally, Attempt, ListenerToml, Seen, CLIENT_TIMEOUT,
};
use crate::common::wait_until;
use crate::fixture::{
    free_port, loopback, pg_bin, write_secret, Pg, PgConn, Proxy, TempDir, CLIENT_USER,
};

/// "t|PORT": in recovery, and which server answered.
const WHO: &str = "SELECT pg_is_in_recovery(), inet_server_port()";

fn ask(addr: SocketAddr) -> Seen {
    Seen::of(
        PgConn::connect(addr, CLIENT_USER, None, CLIENT_TIMEOUT)
            .and_then(|mut c| c.query_line(WHO)),
    )
}

fn on(pg: &Pg) -> String {
    format!("t|{}", pg.port)
}

/// A served read through `addr` every 50 ms until `until` holds for the
/// attempts so far (or `timeout` passes).
fn reads_until(
    addr: SocketAddr,
    timeout: Duration,
    what: &str,
    mut until: impl FnMut(&[Attempt]) -> bool,
) -> Vec<Attempt> {
    let mut out = Vec::new();
    wait_until(timeout, what, || {
        let start = Instant::now();
        let seen = ask(addr);
        out.push(Attempt {
            start,
            end: Instant::now(),
            seen,
        });
        std::thread::sleep(Duration::from_millis(50));
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
    reads_until(
        ro_addr,
        Duration::from_secs(15),
        "pg-ro reaches both replicas",
        |a| served_by(a, &on(&behind)) > 0 && served_by(a, &on(&current)) > 0,
    );
    // A session on the replica that is about to fall behind.
    let mut session = loop {
        let mut c = PgConn::connect(ro_addr, CLIENT_USER, None, CLIENT_TIMEOUT).unwrap();
        if c.query_line(WHO).unwrap() == on(&behind) {
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

    // Spliced sees it within a probe of each server; from then on no new
    // relay reaches the paused replica.
    let mut attempts = reads_until(
        ro_addr,
        Duration::from_secs(20),
        "pg-ro left the paused replica out long enough",
        |a| {
            a.last()
                .is_some_and(|l| l.start > written + Duration::from_secs(3))
        },
    );
    let late: Vec<&Attempt> = attempts
        .iter()
        .filter(|a| a.start > written + 2 * probe_lag())
        .collect();
    let to_behind: Vec<i64> = late
        .iter()
        .filter(|a| a.seen.served() == Some(on(&behind).as_str()))
        .map(|a| ms(written, a.start))
        .collect();
    eprintln!(
        "pg lag: while lagging, {}; relays to the paused replica at {to_behind:?} ms",
        tally(&attempts)
    );
    assert!(
        to_behind.is_empty(),
        "relays reached the lagging replica at {to_behind:?} ms after the writes"
    );
    assert!(
        served_by(&attempts, &on(&current)) >= 10,
        "the other replica serves: {}",
        tally(&attempts)
    );
    assert_eq!(
        session.query_line(WHO).unwrap(),
        on(&behind),
        "a live relay to the lagging replica keeps running"
    );
    let metrics = proxy.metrics();
    eprintln!(
        "pg lag: /metrics while lagging:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("lag") || l.contains("spliced_server_state"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    behind.psql("SELECT pg_wal_replay_resume()");
    let resumed = Instant::now();
    attempts = reads_until(
        ro_addr,
        Duration::from_secs(20),
        "pg-ro reaches the caught-up replica again",
        |a| served_by(a, &on(&behind)) > 0,
    );
    eprintln!(
        "pg lag: back {} ms after the replay resumed; {}",
        ms(resumed, attempts.last().unwrap().end),
        tally(&attempts)
    );
    settle_on(Duration::from_secs(15), 1, "both replicas serve", || {
        let a = reads_until(ro_addr, Duration::from_secs(10), "ten reads", |a| {
            a.len() >= 10
        });
        match (served_by(&a, &on(&behind)), served_by(&a, &on(&current))) {
            (b, c) if b > 0 && c > 0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(session.query_line(WHO).unwrap(), on(&behind));
}
