//! Health probes against real servers: Redis (primary, replica, password),
//! PostgreSQL (trust, md5 and SCRAM-SHA-256 logins; primary and a streaming
//! replica) and MariaDB. Each server is started by hand on 127.0.0.1 under a
//! temp dir and stopped by PID.
//!
//! They are ignored (with a reason) in a plain `cargo test` (they need the packages and
//! take a few seconds); `make health-real` installs the packages and runs
//! them with `--ignored` and SPLICED_REAL_SERVERS=1, under which a missing
//! binary fails the test. Run by hand without that variable, a test whose
//! binary is missing prints SKIPPED and why, and passes.

mod common;
#[path = "health_real/servers.rs"]
mod servers;

use std::time::{Duration, Instant};

use servers::{command, find_bin, free_port, loopback, pg_bin_dirs, run, Mariadb, Proc, TempDir};
use spliced::health::{probe_blocking, CheckSpec, Kind, Role, Verdict, WantRole};

const TIMEOUT: Duration = Duration::from_secs(5);

fn spec(kind: Kind, role: WantRole) -> CheckSpec {
    CheckSpec {
        role,
        ..CheckSpec::new(kind)
    }
}

fn with_login(mut s: CheckSpec, user: &str, password: Option<&str>) -> CheckSpec {
    s.user = Some(user.into());
    s.password = password.map(Into::into);
    s
}

fn reason(v: Verdict) -> String {
    match v {
        Verdict::Down { reason } => reason,
        up => panic!("expected down, got {up:?}"),
    }
}

/// The reason of a check error: the check's own login or setup was
/// refused, which says nothing about the server.
fn check_error(v: Verdict) -> String {
    match v {
        Verdict::CheckError { reason } => reason,
        other => panic!("expected a check error, got {other:?}"),
    }
}

const UP: Verdict = Verdict::Up { role: None };
const PRIMARY: Verdict = Verdict::Up {
    role: Some(Role::Primary),
};
const REPLICA: Verdict = Verdict::Up {
    role: Some(Role::Replica),
};

#[test]
#[ignore = "starts real servers: make health-real"]
fn redis() {
    let Some(bin) = find_bin("redis", &["redis-server"], &[]) else {
        return;
    };
    let dir = TempDir::new("redis");
    let start = |name: &str, port: u16, extra: &[String]| {
        let mut c = command(&bin);
        c.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&dir.0)
            .args(extra);
        Proc::start(name, c, dir.join(&format!("{name}.log")), loopback(port))
    };
    let (p1, p2) = (free_port(), free_port());
    let _primary = start("primary", p1, &["--requirepass".into(), "s3cret".into()]);
    let _replica = start(
        "replica",
        p2,
        &[
            "--replicaof".into(),
            "127.0.0.1".into(),
            p1.to_string(),
            "--masterauth".into(),
            "s3cret".into(),
            "--requirepass".into(),
            "s3cret".into(),
        ],
    );
    let (a1, a2) = (loopback(p1), loopback(p2));
    let auth = |role| CheckSpec {
        password: Some("s3cret".into()),
        ..spec(Kind::Redis, role)
    };

    assert_eq!(
        probe_blocking(&spec(Kind::Tcp, WantRole::Any), a1, TIMEOUT),
        UP
    );
    let r = check_error(probe_blocking(
        &spec(Kind::Redis, WantRole::Any),
        a1,
        TIMEOUT,
    ));
    assert!(r.contains("NOAUTH"), "{r}");
    let mut wrong = auth(WantRole::Any);
    wrong.password = Some("nope".into());
    let r = check_error(probe_blocking(&wrong, a1, TIMEOUT));
    assert!(r.contains("refused AUTH") && r.contains("WRONGPASS"), "{r}");
    assert_eq!(probe_blocking(&auth(WantRole::Any), a1, TIMEOUT), UP);
    assert_eq!(
        probe_blocking(&auth(WantRole::Primary), a1, TIMEOUT),
        PRIMARY
    );
    assert_eq!(
        reason(probe_blocking(&auth(WantRole::Replica), a1, TIMEOUT)),
        "role is primary, want replica"
    );
    // INFO says role:slave as soon as replicaof is set, linked or not.
    assert_eq!(
        probe_blocking(&auth(WantRole::Replica), a2, TIMEOUT),
        REPLICA
    );
    assert_eq!(
        reason(probe_blocking(&auth(WantRole::Primary), a2, TIMEOUT)),
        "role is replica, want primary"
    );
}

/// initdb, hba for trust/md5/scram users, start, create the users.
fn pg_primary(bin: &std::path::Path, dir: &TempDir, port: u16) -> Proc {
    let data = dir.join("primary");
    let mut c = command(&bin.join("initdb"));
    c.arg("-D")
        .arg(&data)
        .args(["-U", "postgres", "-A", "trust", "--no-sync", "-E", "UTF8"]);
    run(c, "initdb");
    std::fs::write(
        data.join("pg_hba.conf"),
        "host all md5user 127.0.0.1/32 md5\n\
         host all scramuser 127.0.0.1/32 scram-sha-256\n\
         host all all 127.0.0.1/32 trust\n\
         host replication all 127.0.0.1/32 trust\n",
    )
    .unwrap();
    let p = pg_start(bin, dir, "primary", port);
    // It listens before it accepts logins ("starting up", 57P03).
    let live = spec(Kind::Postgres, WantRole::Any);
    common::wait_until(
        Duration::from_secs(30),
        "the primary accepts logins",
        || probe_blocking(&live, loopback(port), TIMEOUT).is_up(),
    );
    let mut c = std::process::Command::new(bin.join("psql"));
    c.args(["-h", "127.0.0.1", "-p", &port.to_string(), "-U", "postgres"])
        .args(["-v", "ON_ERROR_STOP=1", "-q", "-c"])
        .arg(
            "SET password_encryption = 'md5'; \
             CREATE ROLE md5user LOGIN PASSWORD 'md5pw'; \
             SET password_encryption = 'scram-sha-256'; \
             CREATE ROLE scramuser LOGIN PASSWORD 'scrampw'; \
             CREATE ROLE trustuser LOGIN;",
        );
    run(c, "psql: create roles");
    p
}

fn pg_start(bin: &std::path::Path, dir: &TempDir, name: &str, port: u16) -> Proc {
    let mut c = command(&bin.join("postgres"));
    c.arg("-D")
        .arg(dir.join(name))
        .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1"])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", dir.0.display()))
        .args(["-c", "fsync=off", "-c", "log_connections=off"]);
    let mut p = Proc::start(name, c, dir.join(&format!("{name}.log")), loopback(port));
    p.stop_signal = nix::sys::signal::Signal::SIGINT;
    p
}

#[test]
#[ignore = "starts real servers: make health-real"]
fn postgres() {
    let dirs = pg_bin_dirs();
    let Some(initdb) = find_bin("postgres", &["initdb"], &dirs) else {
        return;
    };
    let bin = initdb.parent().unwrap().to_path_buf();
    let dir = TempDir::new("pg");
    let (p1, p2) = (free_port(), free_port());
    let t0 = Instant::now();
    let primary = pg_primary(&bin, &dir, p1);
    let a1 = loopback(p1);

    // Liveness: any auth request or a trust login is up; no Terminate owed.
    assert_eq!(
        probe_blocking(&spec(Kind::Postgres, WantRole::Any), a1, TIMEOUT),
        UP
    );
    let md5_alive = with_login(spec(Kind::Postgres, WantRole::Any), "md5user", None);
    assert_eq!(probe_blocking(&md5_alive, a1, TIMEOUT), UP);

    // Logins by each method, then the role.
    for (user, pw) in [
        ("trustuser", None),
        ("md5user", Some("md5pw")),
        ("scramuser", Some("scrampw")),
    ] {
        let s = with_login(spec(Kind::Postgres, WantRole::Primary), user, pw);
        let t = Instant::now();
        assert_eq!(probe_blocking(&s, a1, TIMEOUT), PRIMARY, "{user}");
        eprintln!("postgres: {user} login + role probe took {:?}", t.elapsed());
        let s = with_login(spec(Kind::Postgres, WantRole::Replica), user, pw);
        assert_eq!(
            reason(probe_blocking(&s, a1, TIMEOUT)),
            "role is primary, want replica",
            "{user}"
        );
    }
    for (user, pw, words) in [
        ("md5user", Some("wrong"), "28P01"),
        ("scramuser", Some("wrong"), "28P01"),
        ("scramuser", None, "password (SCRAM-SHA-256)"),
        ("md5user", None, "password (md5)"),
    ] {
        let s = with_login(spec(Kind::Postgres, WantRole::Primary), user, pw);
        let r = check_error(probe_blocking(&s, a1, TIMEOUT));
        assert!(r.contains(words), "{user}: {r}");
    }
    let mut nodb = with_login(spec(Kind::Postgres, WantRole::Primary), "trustuser", None);
    nodb.database = Some("nosuchdb".into());
    assert!(check_error(probe_blocking(&nodb, a1, TIMEOUT)).contains("3D000"));

    // A streaming replica answers t.
    let mut c = command(&bin.join("pg_basebackup"));
    c.args([
        "-h",
        "127.0.0.1",
        "-p",
        &p1.to_string(),
        "-U",
        "postgres",
        "-R",
        "-D",
    ])
    .arg(dir.join("replica"));
    run(c, "pg_basebackup");
    let _replica = pg_start(&bin, &dir, "replica", p2);
    let a2 = loopback(p2);
    // A standby listens before it accepts logins: until then the probe
    // rightly says 57P03 "starting up".
    let live = spec(Kind::Postgres, WantRole::Any);
    common::wait_until(
        Duration::from_secs(30),
        "the replica accepts logins",
        || probe_blocking(&live, a2, TIMEOUT).is_up(),
    );
    let s = with_login(
        spec(Kind::Postgres, WantRole::Replica),
        "scramuser",
        Some("scrampw"),
    );
    assert_eq!(probe_blocking(&s, a2, TIMEOUT), REPLICA);
    let s = with_login(
        spec(Kind::Postgres, WantRole::Primary),
        "md5user",
        Some("md5pw"),
    );
    assert_eq!(
        reason(probe_blocking(&s, a2, TIMEOUT)),
        "role is replica, want primary"
    );

    // Every logged-in probe said goodbye: no "unexpected EOF" in the log.
    let log = primary.log_text();
    assert!(
        !log.contains("unexpected EOF") && !log.contains("could not receive data"),
        "{log}"
    );
    eprintln!(
        "postgres: {:?} including initdb and a base backup",
        t0.elapsed()
    );
}

#[test]
#[ignore = "starts real servers: make health-real"]
fn mariadb() {
    let dir = TempDir::new("mariadb");
    let Some(db) = Mariadb::start("mariadb", &dir, "data", &["--max-connect-errors=3"]) else {
        return;
    };
    let addr = db.addr();
    // The probe hangs up after the greeting: that must not count toward
    // max_connect_errors, or the host would be blocked after 3 probes.
    for i in 0..10 {
        assert_eq!(
            probe_blocking(&spec(Kind::Mysql, WantRole::Any), addr, TIMEOUT),
            UP,
            "probe {i}"
        );
    }
    // The greeting is not a Redis reply: a wrong kind is down (as a bad
    // reply, or as the reset MariaDB answers our PING with).
    let r = reason(probe_blocking(
        &spec(Kind::Redis, WantRole::Any),
        addr,
        TIMEOUT,
    ));
    assert!(r.contains("not RESP") || r.contains("reset"), "{r}");
}
