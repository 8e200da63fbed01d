//! The real-server fixture of the end-to-end tests: PostgreSQL (a primary
//! and streaming replicas), Redis (masters and replicas), MariaDB, and the
//! spliced child on a TOML config file, all on 127.0.0.1 under one temp dir
//! ([`TempDir`], removed on drop), each server run as an unprivileged user
//! when the tests run as root and stopped by PID when dropped.
//!
//! What it offers:
//! - [`TempDir::new`], [`free_port`], [`loopback`]: the place and the ports.
//! - [`pg_bin`], [`Pg::primary`], [`Pg::replica_of`] (or
//!   [`primary_and_replica`]): PostgreSQL with `wal_level = replica`,
//!   `hot_standby = on`, a [`MONITOR_USER`] role logging in by SCRAM with
//!   its password, every other login trusted ([`CLIENT_USER`] is the one
//!   clients use); [`Pg::replica_through`] streams through a proxy;
//!   [`Pg::promote`], [`Pg::stop_immediate`], [`Pg::start`]
//!   (again), [`Pg::psql`] (output of psql -At), [`Pg::timeline`].
//! - TLS: [`Certs::new`] (a test CA and a certificate per server name,
//!   made with the openssl command); [`Pg::primary_with_tls`] and
//!   [`primary_and_replica_named`] serve TLS with one (`ssl = on`, plain
//!   logins still allowed); [`pg17_bin`] finds the PostgreSQL 17 server
//!   (direct TLS) that scripts/install-deps.sh unpacks into [`PG17_DIR`].
//! - [`Psycopg`]: psycopg 3 on libpq 18 (from [`PSYCOPG_VENV`]) running
//!   [`Job`]s on a [`Conninfo`] (verify-full TLS by SNI name, classic or
//!   direct [`Negotiation`], or plain), each [`Answer`] saying what the
//!   client saw; a job can cancel its query with `cancel_safe()`.
//! - [`redis_bin`], [`Redis::master`], [`Redis::replica_of`],
//!   [`Redis::on_port`] + [`Redis::start`] (a server named in a config
//!   before it runs), [`Redis::promote`] (REPLICAOF NO ONE),
//!   [`Redis::replicaof`], [`Redis::stop`], [`Redis::clients_named`].
//! - [`Mariadb::start`].
//! - [`patroni_bin`], [`Patroni::start`]: PostgreSQL nodes under Patroni
//!   (Raft DCS); [`Patroni::wait_ready`], [`Patroni::switchover`],
//!   [`Patroni::crash`]; [`Haproxy::for_patroni_primary`] beside them.
//! - [`Proxy::start`]: `spliced run --config FILE --admin ... --workers 2`;
//!   [`Proxy::reload`] rewrites the file and SIGHUPs, returning once the
//!   reload is logged ([`Proxy::reload_by_name`]: by `spliced reload
//!   --name`); [`Proxy::metric`] reads one sample of /metrics;
//!   [`Proxy::cli`] runs `spliced stats` and friends beside it;
//!   [`Proxy::check`] runs `spliced check`.
//! - Live upgrades: [`Proxy::start_upgradable`] runs a copy of the
//!   binary; [`Proxy::upgrade`] runs `spliced upgrade --name` to a fresh
//!   copy ([`Binary::NewPath`] by `--binary`, [`Binary::InPlace`] over the
//!   running one's file) and follows the pid file to the new process
//!   (adopted: the test process is a child subreaper meanwhile), so
//!   [`Proxy::pid`], [`Proxy::signal`], [`Proxy::terminate`] and the drop
//!   reach the process serving now; [`Proxy::upgrade_ok`] asserts a clean
//!   one; [`Proxy::processes`] lists every process of the copies.
//! - [`PgConn`] and [`RespConn`]: clients that tell which server answered
//!   (`current_setting('port')`, `INFO server`'s `tcp_port`) and how a
//!   failure looked ([`WireError::is_refused`], [`WireError::is_read_only`]).
//! - [`write_secret`]: a password file.
//! - [`run_limited`]: a client program (psql, pgbench, redis-cli...) run
//!   to completion under a time limit ([`Ran`]); [`Interactive`] keeps one
//!   running (stdin written, stdout read line by line) and
//!   [`PsqlSession`] is one psql session driven statement by statement; [`pgbench`] and
//!   [`redis_benchmark`] also assert a clean run and parse its summary;
//!   [`Proxy::metric_sum`] sums a family over listeners,
//!   [`Proxy::terminate`] stops spliced by SIGTERM and returns its status;
//!   [`Pg::signal_all`] hangs (SIGSTOP) or resumes a whole server.
//! - [`every_engine!`]: one ignored test per engine (splice, copy, auto),
//!   and copy and auto again on the uring loop (`uring_copy`, `uring_auto`).
//!
//! A test whose binaries are missing gets `None` from [`pg_bin`] /
//! [`redis_bin`] / [`Mariadb::start`] (after printing SKIPPED and why)
//! and returns; under SPLICED_REAL_SERVERS=1 that is a failure instead.
// Each test file uses a different part of the fixture.
#![allow(dead_code, unused_imports)]

#[path = "fixture/clients.rs"]
mod clients;
#[path = "fixture/haproxy.rs"]
mod haproxy;
#[path = "fixture/patroni.rs"]
mod patroni;
#[path = "fixture/pg.rs"]
mod pg;
#[path = "fixture/proxy.rs"]
mod proxy;
#[path = "fixture/psycopg.rs"]
mod psycopg;
#[path = "fixture/redis.rs"]
mod redis;
#[path = "fixture/tls.rs"]
mod tls;
#[path = "fixture/wire.rs"]
mod wire;

use std::path::PathBuf;

pub use self::clients::{
    knob, pgbench, pgbench_command, psql_args, redis_benchmark, redis_cli, run_limited,
    Interactive, Pgbench, PsqlSession, Ran,
};
pub use self::haproxy::{haproxy_bin, Haproxy};
pub use self::patroni::{patroni_bin, rest_status, Patroni, PatroniBin, PatroniNode, PATRONI_VENV};
pub use self::pg::{
    pg_bin, primary_and_replica, primary_and_replica_named, psql_command, Pg, CLIENT_USER,
    MONITOR_USER,
};
pub use self::proxy::{sample, sample_sum, Binary, Proxy, Upgrade};
pub use self::psycopg::{Answer, Conninfo, Job, Negotiation, Psycopg, Reply, PSYCOPG_VENV};
pub use self::redis::{redis_bin, Redis};
pub use self::tls::{pg17_bin, Certs, ServerTls, PG17_DIR};
pub use self::wire::{info_field, PgConn, Resp, RespConn, Rows, WireError};
pub use crate::servers::Mariadb;
pub use crate::servers::{free_port, loopback, TempDir};

/// Runs a real-server case once per engine: `every_engine!(case)` makes
/// ignored tests `case::splice`, `case::copy` and `case::auto` calling
/// `case("splice")` and so on (the `mode` a listener is given), and
/// `case::uring_copy` and `case::uring_auto`, whose spliced processes run
/// the uring loop (`SPLICED_LOOP`, set by `Spliced::spawn`).
#[macro_export]
macro_rules! every_engine {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                #[ignore = "starts real servers: make e2e"]
                fn splice() {
                    super::$name("splice")
                }
                #[test]
                #[ignore = "starts real servers: make e2e"]
                fn copy() {
                    super::$name("copy")
                }
                #[test]
                #[ignore = "starts real servers: make e2e"]
                fn auto() {
                    super::$name("auto")
                }
                #[test]
                #[ignore = "starts real servers: make e2e"]
                fn uring_copy() {
                    $crate::common::on_loop(spliced::EventLoop::Uring);
                    super::$name("copy")
                }
                #[test]
                #[ignore = "starts real servers: make e2e"]
                fn uring_auto() {
                    $crate::common::on_loop(spliced::EventLoop::Uring);
                    super::$name("auto")
                }
            }
        )*
    };
}

/// Writes `secret` and a newline to `DIR/name` (replacing it) and returns
/// the path: a `password-file` for a health check.
pub fn write_secret(dir: &TempDir, name: &str, secret: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{secret}\n")).unwrap();
    p
}

/// The fixture itself: every server starts, answers as it should, changes
/// role on request and stops; spliced starts, reloads and serves /metrics.
/// Independent of the routing rules.
#[test]
#[ignore = "starts real servers: make e2e"]
fn fixture_starts_and_stops_every_server() {
    use std::time::Duration;
    let test = "fixture_starts_and_stops_every_server";
    let (Some(pg), Some(redis)) = (pg_bin(test), redis_bin(test)) else {
        return;
    };
    let dir = TempDir::new("e2e-fixture");

    let (mut primary, replica) = primary_and_replica(&pg, &dir, "mon-pw");
    assert_eq!(primary.psql("SELECT pg_is_in_recovery()"), "f");
    assert_eq!(replica.psql("SELECT pg_is_in_recovery()"), "t");
    let t = Duration::from_secs(5);
    let mut monitor = PgConn::connect(replica.addr(), MONITOR_USER, Some("mon-pw"), t)
        .expect("the monitor logs in by SCRAM");
    assert_eq!(
        monitor.query_line("SELECT current_user").unwrap(),
        "monitor"
    );
    let wrong = PgConn::connect(primary.addr(), MONITOR_USER, Some("nope"), t);
    assert_eq!(
        wrong
            .err()
            .and_then(|e| e.code().map(String::from))
            .as_deref(),
        Some("28P01")
    );
    replica.promote();
    replica.psql("CHECKPOINT");
    assert_eq!(replica.psql("SELECT pg_is_in_recovery()"), "f");
    assert_eq!((primary.timeline(), replica.timeline()), (Some(1), Some(2)));
    primary.stop_immediate();
    assert!(std::net::TcpStream::connect(primary.addr()).is_err());
    primary.start();
    assert_eq!(primary.psql("SELECT 1"), "1");

    let master = Redis::master(&redis, &dir, "redis-m", Some("pw"));
    let copy = Redis::replica_of(&redis, &dir, "redis-r", &master);
    assert_eq!(
        (master.role(), copy.role()),
        ("master".into(), "slave".into())
    );
    let mut named = master.connect().unwrap();
    named.cmd(&["CLIENT", "SETNAME", "probe-1"]).unwrap();
    assert_eq!(named.server_port().unwrap(), master.port);
    assert_eq!(master.clients_named("probe-"), 1);
    copy.promote();
    assert_eq!(copy.role(), "master");

    if let Some(db) = Mariadb::start(test, &dir, "mariadb", &[]) {
        assert!(std::net::TcpStream::connect(db.addr()).is_ok());
    }

    let port = free_port();
    let config = |timeout: &str| {
        format!(
            "[defaults]\nconnect-timeout = \"{timeout}\"\n\
             [[listener]]\nname = \"r\"\nlisten = \"127.0.0.1:{port}\"\n\
             [listener.pool]\nservers = [\"127.0.0.1:{}\"]\n\
             [listener.pool.health]\ncheck = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\n",
            master.port
        )
    };
    let proxy = Proxy::start(&dir, "fixture", &config("5s"));
    proxy.reload(&config("4s"));
    proxy.reload_by_name(&config("3s"));
    let mut via = RespConn::connect(loopback(port), t).unwrap();
    via.cmd(&["AUTH", "pw"]).unwrap();
    assert_eq!(via.server_port().unwrap(), master.port);
    let server = master.addr().to_string();
    assert_eq!(
        proxy.metric(
            "spliced_server_up",
            &[("listener", "r"), ("server", &server)]
        ),
        Some(1.0)
    );
    let (st, stats, err) = proxy.cli(&["stats"]);
    assert!(
        st.success() && !stats.is_empty(),
        "spliced stats: {st}\n{err}"
    );
}

/// What a TLS test asks a server: which one answered (port), its major
/// version, whether it is in recovery, and whether this session is TLS.
pub const TLS_WHO: &str = "SELECT current_setting('port'), \
     current_setting('server_version_num')::int / 10000, pg_is_in_recovery(), ssl \
     FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

/// The answer to [`TLS_WHO`] from `pg` over TLS.
pub fn tls_who(pg: &Pg, major: u32, recovery: bool) -> String {
    format!("{}|{major}|{}|t", pg.port, if recovery { "t" } else { "f" })
}

/// The TLS fixture, no proxy: Debian's PostgreSQL serves classic TLS
/// (SSLRequest first), PostgreSQL 17 (primary and streaming replica)
/// classic and direct TLS, to psycopg on libpq 18 checking the certificate
/// of the name it asked for (verify-full, `host=NAME hostaddr=127.0.0.1`).
/// A name the certificate lacks fails verification, direct TLS to the
/// older server fails, and `cancel_safe()` on a TLS session cancels a
/// `pg_sleep(30)` within a second, the CancelRequest itself inside TLS.
#[test]
#[ignore = "starts real servers: make e2e"]
fn fixture_serves_classic_and_direct_tls() {
    use std::time::Duration;
    use Negotiation::{Direct, Postgres};
    let test = "fixture_serves_classic_and_direct_tls";
    let (Some(pg15), Some(pg17), Some(py)) = (pg_bin(test), pg17_bin(test), Psycopg::find(test))
    else {
        return;
    };
    let dir = TempDir::new("e2e-fixture-tls");
    let certs = Certs::new(&dir, &["a.db.example", "b.db.example"]);
    let a = Pg::primary_with_tls(
        &pg15,
        &dir,
        "a",
        "mon-pw",
        Some(certs.server("a.db.example")),
    );
    let old = a.major();
    assert!(old < 17, "{} is PostgreSQL {old}", pg15.display());
    let (b, b_replica) = primary_and_replica_named(
        &pg17,
        &dir,
        "b",
        "mon-pw",
        Some(certs.server("b.db.example")),
    );
    let tls = |pg: &Pg, name: &str, how| Conninfo::verify_full(pg.addr(), name, &certs.ca, how);
    let cases = [
        (tls(&a, "a.db.example", Postgres), tls_who(&a, old, false)),
        (tls(&b, "b.db.example", Postgres), tls_who(&b, 17, false)),
        (tls(&b, "b.db.example", Direct), tls_who(&b, 17, false)),
        (
            tls(&b_replica, "b.db.example", Direct),
            tls_who(&b_replica, 17, true),
        ),
        (
            Conninfo::plain(a.addr(), "postgres"),
            format!("{}|{old}|f|f", a.port),
        ),
    ];
    let jobs: Vec<Job> = cases.iter().map(|(c, _)| Job::query(c, TLS_WHO)).collect();
    let answers = py.run(&jobs, Duration::from_secs(60));
    for ((c, want), got) in cases.iter().zip(&answers) {
        assert_eq!(got.line().as_deref(), Ok(want.as_str()), "{}", c.text());
    }
    eprintln!(
        "psycopg on libpq {}: {} TLS sessions served",
        py.libpq,
        cases.len()
    );

    let refused = py.run(
        &[
            // b's certificate does not name a.db.example.
            Job::query(&tls(&b, "a.db.example", Postgres), TLS_WHO),
            // PostgreSQL 15 does not know a TLS hello as a first packet.
            Job::query(&tls(&a, "a.db.example", Direct), TLS_WHO),
        ],
        Duration::from_secs(30),
    );
    for got in &refused {
        assert!(matches!(got.reply, Reply::NoSession(_)), "{got:?}");
    }
    assert!(
        format!("{:?}", refused[0].reply).contains("does not match host name"),
        "{:?}",
        refused[0]
    );

    for (c, what) in [
        (tls(&b, "b.db.example", Direct), "direct TLS to 17"),
        (tls(&a, "a.db.example", Postgres), "classic TLS to 15"),
    ] {
        let after = py.cancel_within_a_second(&c, what);
        eprintln!("{what}: cancel_safe() ended pg_sleep(30) {after:?} after the request");
    }
}
