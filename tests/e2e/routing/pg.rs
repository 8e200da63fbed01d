//! PostgreSQL: reloads under load, split brain, monitor password rotation
//! and a wrong monitor password, prefer-replica through a failover.

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{
    failover_bound, first, longest_outage, ms, pg_login, probe_lag, settle_on, tally, Attempt,
    ClientLoop, ListenerToml, Seen, CLIENT_TIMEOUT, INTERVAL,
};
use crate::common::{exit_within, measure_window, wait_until};
use crate::fixture::{
    free_port, loopback, pg_bin, primary_and_replica, write_secret, Pg, PgConn, Proxy, TempDir,
    CLIENT_USER,
};

/// `SELECT` on a fresh connection through `addr`: the first row, columns
/// joined by `|`.
fn ask(addr: SocketAddr, sql: &str) -> Result<String, crate::fixture::WireError> {
    PgConn::connect(addr, CLIENT_USER, None, CLIENT_TIMEOUT)?.query_line(sql)
}

/// "t|PORT" or "f|PORT": in recovery, and which server answered.
const WHO: &str = "SELECT pg_is_in_recovery(), current_setting('port')";

fn who(pg: &Pg, recovery: bool) -> String {
    format!("{}|{}", if recovery { "t" } else { "f" }, pg.port)
}

/// Waits until six fresh connections in a row through `addr` are answered
/// by `want` ("t|PORT"/"f|PORT").
fn settle(addr: SocketAddr, want: &str, what: &str) {
    settle_on(Duration::from_secs(15), 6, what, || match ask(addr, WHO) {
        Ok(v) if v == want => Ok(()),
        other => Err(format!("{other:?}")),
    });
}

fn served_values(attempts: &[Attempt]) -> Vec<&str> {
    attempts.iter().filter_map(|a| a.seen.served()).collect()
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn pg_reloads_keep_writes_on_primary_and_reads_on_replica() {
    let Some(bin) = pg_bin("pg_reloads_keep_writes_on_primary_and_reads_on_replica") else {
        return;
    };
    let dir = TempDir::new("e2e-pg-reloads");
    let (primary, replica) = primary_and_replica(&bin, &dir, "monitor-pw");
    primary.psql("CREATE TABLE writes (id bigserial PRIMARY KEY, at timestamptz DEFAULT now())");
    let mut init = Command::new(bin.join("pgbench"));
    init.args(["-i", "-q", "-s", "1", "-h", "127.0.0.1"]).args([
        "-p",
        &primary.port.to_string(),
        "-U",
        CLIENT_USER,
        "postgres",
    ]);
    crate::servers::run(init, "pgbench -i");
    wait_until(
        Duration::from_secs(20),
        "the replica has replayed pgbench -i",
        || {
            replica
                .try_query_line("SELECT count(*) FROM pgbench_accounts")
                .as_deref()
                == Some("100000")
        },
    );

    let pass = write_secret(&dir, "monitor.pass", "monitor-pw");
    let (rw, ro, extra) = (free_port(), free_port(), free_port());
    let servers = [primary.port, replica.port];
    let config = |i: usize| {
        let timeout = if (i / 2) % 2 == 0 { "150ms" } else { "140ms" };
        let mut text = format!(
            "[defaults]\nconnect-timeout = \"{}\"\n\n",
            if i % 2 == 0 { "5s" } else { "4s" }
        );
        for (name, port, role) in [("pg-rw", rw, "primary"), ("pg-ro", ro, "replica")] {
            text += &ListenerToml {
                name,
                port,
                servers: &servers,
                check: "postgres",
                role,
                pool_extra: "on-down = \"kill\"",
                health_extra: &pg_login(&pass, timeout),
            }
            .render();
        }
        if i % 4 >= 2 {
            text += &ListenerToml {
                name: "pg-extra",
                port: extra,
                servers: &servers,
                check: "postgres",
                role: "any",
                pool_extra: "",
                health_extra: &pg_login(&pass, timeout),
            }
            .render();
        }
        text
    };
    let proxy = Proxy::start(&dir, "pg-reloads", &config(0));
    let (rw_addr, ro_addr) = (loopback(rw), loopback(ro));
    settle(rw_addr, &who(&primary, false), "pg-rw reaches the primary");
    settle(ro_addr, &who(&replica, true), "pg-ro reaches the replica");

    let mut bench = Command::new(bin.join("pgbench"));
    bench
        .args([
            "-n",
            "-S",
            "-T",
            "6",
            "-c",
            "2",
            "-j",
            "1",
            "-h",
            "127.0.0.1",
        ])
        .args(["-p", &ro.to_string(), "-U", CLIENT_USER, "postgres"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // About as long as the 50 reloads take.
    let bench = bench.spawn().expect("start pgbench");
    let writes = ClientLoop::spawn(Duration::from_millis(5), move || {
        Seen::of(ask(
            rw_addr,
            "INSERT INTO writes DEFAULT VALUES RETURNING current_setting('port')",
        ))
    });
    let reads = ClientLoop::spawn(Duration::from_millis(5), move || {
        Seen::of(ask(ro_addr, WHO))
    });

    let t0 = Instant::now();
    for i in 1..=50 {
        if i % 3 == 0 {
            // The same password, the file written again.
            write_secret(&dir, "monitor.pass", "monitor-pw");
        }
        proxy.reload(&config(i));
        crate::common::pace(Duration::from_millis(100));
    }
    let reload_time = t0.elapsed();
    let mut bench = bench;
    let status = exit_within(&mut bench, Duration::from_secs(30));
    let writes = writes.finish();
    let reads = reads.finish();
    let out = bench.wait_with_output().expect("pgbench output");
    let bench_out = String::from_utf8_lossy(&out.stdout);
    let bench_err = String::from_utf8_lossy(&out.stderr);
    let tps = bench_out
        .lines()
        .filter(|l| l.starts_with("tps"))
        .collect::<Vec<_>>();
    eprintln!(
        "pg reloads: 50 reloads in {reload_time:?}; pgbench -S via pg-ro: {status:?} {tps:?}"
    );
    eprintln!("pg reloads: INSERT via pg-rw: {}", tally(&writes));
    eprintln!("pg reloads: reads via pg-ro: {}", tally(&reads));

    let read_only: Vec<_> = writes
        .iter()
        .filter(|a| matches!(a.seen, Seen::ReadOnly(_)))
        .collect();
    assert!(
        read_only.is_empty(),
        "{} INSERTs reached a read-only server through pg-rw: {:?}",
        read_only.len(),
        read_only.first()
    );
    let primary_port = primary.port.to_string();
    let served = served_values(&writes);
    assert!(
        served.len() >= 20,
        "too few INSERTs landed: {}",
        tally(&writes)
    );
    let elsewhere: Vec<_> = served.iter().filter(|p| **p != primary_port).collect();
    assert!(
        elsewhere.is_empty(),
        "INSERTs landed on {:?}",
        first(&elsewhere)
    );
    let want = who(&replica, true);
    let off: Vec<_> = served_values(&reads)
        .into_iter()
        .filter(|v| *v != want)
        .collect();
    assert!(
        off.is_empty(),
        "reads through pg-ro not on the replica: {off:?}"
    );
    // Health survives reloads: no client is refused or held by one.
    for (what, attempts) in [("INSERT via pg-rw", &writes), ("read via pg-ro", &reads)] {
        let failed: Vec<_> = attempts
            .iter()
            .filter(|a| a.seen.served().is_none())
            .map(|a| (ms(t0, a.start), &a.seen))
            .collect();
        assert!(
            failed.is_empty(),
            "{what} failed during the reloads: {failed:?}"
        );
    }
    assert!(
        status.is_some_and(|s| s.success()),
        "pgbench -S through pg-ro failed ({status:?}):\n{bench_out}\n{bench_err}"
    );
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn pg_split_brain_goes_to_the_highest_timeline() {
    let Some(bin) = pg_bin("pg_split_brain_goes_to_the_highest_timeline") else {
        return;
    };
    let dir = TempDir::new("e2e-pg-split");
    let (old, new) = primary_and_replica(&bin, &dir, "monitor-pw");
    let pass = write_secret(&dir, "monitor.pass", "monitor-pw");
    let rw = free_port();
    let listener = ListenerToml {
        name: "pg-rw",
        port: rw,
        servers: &[old.port, new.port],
        check: "postgres",
        role: "primary",
        pool_extra: "on-down = \"kill\"",
        health_extra: &pg_login(&pass, "150ms"),
    };
    let proxy = Proxy::start(&dir, "pg-split", &listener.render());
    let rw_addr = loopback(rw);
    settle(rw_addr, &who(&old, false), "pg-rw reaches the primary");

    // The replica is promoted while the old primary still runs.
    new.promote();
    let promoted = Instant::now();
    new.psql("CHECKPOINT");
    wait_until(
        Duration::from_secs(10),
        "the promoted server's checkpoint is on timeline 2",
        || new.timeline() == Some(2),
    );
    eprintln!(
        "pg split brain: timelines old {:?}, promoted {:?}",
        old.timeline(),
        new.timeline()
    );

    let sql = "SELECT pg_is_in_recovery(), \
               (SELECT timeline_id FROM pg_control_checkpoint()), current_setting('port')";
    let want = format!("f|2|{}", new.port);
    let mut before_switch = Vec::new();
    wait_until(
        failover_bound() + Duration::from_secs(2),
        "pg-rw reaches the promoted server",
        || {
            let seen = Seen::of(ask(rw_addr, sql));
            let done = seen.served() == Some(want.as_str());
            before_switch.push((ms(promoted, Instant::now()), seen));
            done
        },
    );
    let switched = promoted.elapsed();
    let late_to_old: Vec<_> = before_switch
        .iter()
        .filter(|(t, s)| {
            *t > probe_lag().as_millis() as i64 && s.served().is_some_and(|v| v != want)
        })
        .collect();
    let mut attempts = Vec::new();
    for _ in 0..100 {
        let start = Instant::now();
        let seen = Seen::of(ask(rw_addr, sql));
        attempts.push(Attempt {
            start,
            end: Instant::now(),
            seen,
        });
    }
    eprintln!(
        "pg split brain: first relay to the promoted server {switched:?} after the promotion; \
         {} relays to the old primary later than one probe after it; then {}",
        late_to_old.len(),
        tally(&attempts)
    );
    if let Some(v) = proxy.metric(
        "spliced_server_state",
        &[("server", &old.addr().to_string())],
    ) {
        eprintln!("pg split brain: old primary's state sample {v}");
    }
    assert!(
        late_to_old.is_empty(),
        "relays reached the old primary (timeline 1) after the promoted one answered: {late_to_old:?}"
    );
    let wrong: Vec<_> = attempts
        .iter()
        .filter(|a| a.seen.served() != Some(want.as_str()))
        .map(|a| &a.seen)
        .collect();
    assert!(
        wrong.is_empty(),
        "of 100 fresh connections through pg-rw, {} did not reach the promoted server ({want}): {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(5)]
    );
}

/// A pg-rw listener (primary and replica, role primary, on-down kill)
/// with the monitor login from `pass`.
fn rw_config(rw: u16, servers: &[u16], pass: &std::path::Path) -> String {
    ListenerToml {
        name: "pg-rw",
        port: rw,
        servers,
        check: "postgres",
        role: "primary",
        pool_extra: "on-down = \"kill\"",
        health_extra: &pg_login(pass, "150ms"),
    }
    .render()
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn pg_monitor_password_rotation_keeps_sessions_and_clients() {
    let Some(bin) = pg_bin("pg_monitor_password_rotation_keeps_sessions_and_clients") else {
        return;
    };
    let dir = TempDir::new("e2e-pg-rotate");
    let (primary, replica) = primary_and_replica(&bin, &dir, "old-pw");
    let pass = write_secret(&dir, "monitor.pass", "old-pw");
    let rw = free_port();
    let proxy = Proxy::start(
        &dir,
        "pg-rotate",
        &rw_config(rw, &[primary.port, replica.port], &pass),
    );
    let rw_addr = loopback(rw);
    settle(rw_addr, &who(&primary, false), "pg-rw reaches the primary");

    // One session that queries all along; its first failure ends it.
    let mut session = PgConn::connect(rw_addr, CLIENT_USER, None, CLIENT_TIMEOUT).expect("session");
    let session = ClientLoop::spawn(Duration::from_millis(20), move || {
        Seen::of(session.query_line("SELECT current_setting('port')"))
    });
    let fresh = ClientLoop::spawn(Duration::from_millis(10), move || {
        Seen::of(ask(rw_addr, WHO))
    });

    let t0 = Instant::now();
    primary.psql("ALTER ROLE monitor PASSWORD 'new-pw'");
    // The checks now fail to log in, for several intervals.
    measure_window(INTERVAL * 6);
    let state = proxy.metric(
        "spliced_server_state",
        &[
            ("server", &primary.addr().to_string()),
            ("state", "check-error"),
        ],
    );
    write_secret(&dir, "monitor.pass", "new-pw");
    let rewritten = t0.elapsed();
    proxy.sighup();
    let reloaded = t0.elapsed();
    measure_window(INTERVAL * 6);
    let session = session.finish();
    let fresh = fresh.finish();
    eprintln!(
        "pg password rotation: ALTER ROLE at 0 ms, file rewritten at {rewritten:?}, reloaded at \
         {reloaded:?}; primary's check-error sample before the reload: {state:?}"
    );
    eprintln!("pg password rotation: open session: {}", tally(&session));
    eprintln!("pg password rotation: new clients: {}", tally(&fresh));

    let broken: Vec<_> = session
        .iter()
        .filter(|a| a.seen.served() != Some(primary.port.to_string().as_str()))
        .map(|a| (ms(t0, a.start), &a.seen))
        .collect();
    assert!(
        broken.is_empty(),
        "the open session failed ({} times, first at [ms, outcome]): {:?}",
        broken.len(),
        first(&broken)
    );
    assert!(
        session.len() >= 20,
        "the session ran only {} queries",
        session.len()
    );
    let want = who(&primary, false);
    let failed: Vec<_> = fresh
        .iter()
        .filter(|a| a.seen.served() != Some(want.as_str()))
        .map(|a| (ms(t0, a.start), &a.seen))
        .collect();
    assert!(
        failed.is_empty(),
        "{} new clients through pg-rw were refused or misrouted during the rotation, first at [ms, outcome]: {:?}",
        failed.len(),
        first(&failed)
    );
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn pg_wrong_monitor_password_is_check_error_and_refuses() {
    let Some(bin) = pg_bin("pg_wrong_monitor_password_is_check_error_and_refuses") else {
        return;
    };
    let dir = TempDir::new("e2e-pg-wrongpw");
    let (primary, replica) = primary_and_replica(&bin, &dir, "right-pw");
    let pass = write_secret(&dir, "monitor.pass", "wrong-pw");
    let rw = free_port();
    let servers = [primary.port, replica.port];
    let config = rw_config(rw, &servers, &pass);

    let started = Instant::now();
    let proxy = Proxy::start(&dir, "pg-wrongpw", &config);
    let rw_addr = loopback(rw);
    let clients = ClientLoop::spawn(Duration::from_millis(20), move || {
        Seen::of(ask(rw_addr, WHO))
    });
    measure_window(Duration::from_millis(1500));
    let clients = clients.finish();
    eprintln!("pg wrong password: clients of pg-rw: {}", tally(&clients));
    let served: Vec<_> = clients
        .iter()
        .filter_map(|a| {
            a.seen
                .served()
                .map(|v| (ms(started, a.start), v.to_string()))
        })
        .collect();
    assert!(
        served.is_empty(),
        "clients were served by a server no check confirmed: {:?}",
        first(&served)
    );
    // Refused or held (a held client counts after CLIENT_TIMEOUT): at
    // least one attempt ran.
    assert!(!clients.is_empty(), "no client attempt ran");

    // Logged, but about once per interval per server at most, not a
    // flood per probe per worker.
    let elapsed = started.elapsed();
    let lines: Vec<String> = proxy
        .logs()
        .into_iter()
        .filter(|l| l.contains("28P01") || l.contains("password authentication failed"))
        .collect();
    let most = servers.len() as u128 * (elapsed.as_millis() / INTERVAL.as_millis() + 2);
    eprintln!(
        "pg wrong password: {} log lines about the failed login in {elapsed:?} (at most {most} allowed)",
        lines.len()
    );
    assert!(!lines.is_empty(), "the failed check login is never logged");
    assert!(
        lines.len() as u128 <= most,
        "{} lines in {elapsed:?}, more than one per server per interval:\n{}",
        lines.len(),
        first(&lines).join("\n")
    );

    // `spliced check` judges the password file: present passes, missing
    // or unreadable (a directory) fails.
    let check_file = dir.join("check.toml");
    std::fs::write(&check_file, &config).unwrap();
    let (st, _, err) = Proxy::check(&check_file);
    assert!(
        st.is_some_and(|s| s.success()),
        "spliced check of a good file: {st:?} {err}"
    );
    std::fs::create_dir_all(dir.join("a-directory.pass")).unwrap();
    for (what, path) in [
        ("missing", dir.join("no-such.pass")),
        ("unreadable", dir.join("a-directory.pass")),
    ] {
        std::fs::write(&check_file, rw_config(rw, &servers, &path)).unwrap();
        let (st, _, err) = Proxy::check(&check_file);
        eprintln!(
            "pg wrong password: spliced check with a {what} password file: {st:?} {}",
            err.trim()
        );
        assert!(
            st.is_some_and(|s| !s.success()),
            "spliced check passed a config whose password file is {what}: {st:?} {err}"
        );
    }

    for pg in [&primary, &replica] {
        let server = pg.addr().to_string();
        wait_until(
            Duration::from_secs(3),
            &format!("{server} shows state check-error"),
            || {
                proxy.metric(
                    "spliced_server_state",
                    &[
                        ("listener", "pg-rw"),
                        ("server", &server),
                        ("state", "check-error"),
                    ],
                ) == Some(1.0)
            },
        );
    }
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn pg_prefer_replica_serves_reads_through_a_failover() {
    let Some(bin) = pg_bin("pg_prefer_replica_serves_reads_through_a_failover") else {
        return;
    };
    let dir = TempDir::new("e2e-pg-prefer");
    let (primary, mut replica) = primary_and_replica(&bin, &dir, "monitor-pw");
    let pass = write_secret(&dir, "monitor.pass", "monitor-pw");
    let port = free_port();
    let listener = ListenerToml {
        name: "pg-read",
        port,
        servers: &[primary.port, replica.port],
        check: "postgres",
        role: "prefer-replica",
        pool_extra: "",
        health_extra: &pg_login(&pass, "150ms"),
    };
    let _proxy = Proxy::start(&dir, "pg-prefer", &listener.render());
    let addr = loopback(port);
    settle(addr, &who(&replica, true), "pg-read reaches the replica");

    let reads = ClientLoop::spawn(Duration::from_millis(10), move || Seen::of(ask(addr, WHO)));
    measure_window(Duration::from_secs(1));
    let stopped = Instant::now();
    replica.stop_immediate();
    measure_window(failover_bound() + Duration::from_millis(600));
    let reads = reads.finish();
    let outage = longest_outage(&reads);
    let to_primary = reads
        .iter()
        .find(|a| a.start > stopped && a.seen.served() == Some(who(&primary, false).as_str()))
        .map(|a| ms(stopped, a.end));
    eprintln!(
        "pg prefer-replica: {}; longest outage {outage:?} (bound {:?}); first read on the \
         primary {to_primary:?} ms after the replica stopped",
        tally(&reads),
        failover_bound()
    );
    let early: Vec<_> = reads
        .iter()
        .filter(|a| a.end < stopped && a.seen.served() != Some(who(&replica, true).as_str()))
        .map(|a| &a.seen)
        .collect();
    assert!(
        early.is_empty(),
        "while the replica was eligible, {} reads went elsewhere or failed: {:?}",
        early.len(),
        first(&early)
    );
    assert!(
        outage <= failover_bound(),
        "reads failed for {outage:?}, over interval × fall + 1 s"
    );
    assert_eq!(
        reads.last().map(|a| a.seen.clone()),
        Some(Seen::Served(who(&primary, false))),
        "after the replica stopped, reads end on the primary"
    );
}
