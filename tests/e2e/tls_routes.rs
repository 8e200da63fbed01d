//! Routes of one listener, judged by the server that answers each real
//! client (psycopg on libpq 18): TLS clients told apart by the server name
//! of their hello, without spliced terminating TLS (classic TLS after an
//! SSLRequest to PostgreSQL 15 tenants, direct TLS to PostgreSQL 17
//! ones), each client verifying its tenant's certificate (verify-full);
//! an encrypted cancel reaching the tenant; a name no route names taking
//! the default route or, without one, refused; plain-text clients routed
//! by the database of their startup packet.
//!
//! Every pool is role-checked (`check = "postgres"`, `role = "primary"`
//! unless said otherwise) over a primary and its streaming replica, so a
//! client that lands on its tenant's primary was routed to the right pool
//! and balanced within it.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::fixture::{
    free_port, loopback, pg17_bin, pg_bin, primary_and_replica_named, tls_who, write_secret,
    Answer, Certs, Conninfo, Job, Negotiation, Pg, Psycopg, Reply, TempDir, TLS_WHO,
};
use crate::routing::{loopback_servers, pg_login, FALL, INTERVAL, PROBE_TIMEOUT};

use Negotiation::{Direct, Postgres};

/// How long routing may take to settle after start: the first probes of
/// every server.
const SETTLE: Duration = Duration::from_secs(20);
/// The most a client refused for want of a route may wait for it.
const REFUSED_WITHIN: Duration = Duration::from_secs(3);
/// Fresh sessions per client case once settled: every one must land right.
const ROUNDS: usize = 3;

/// A `[[pool]]` of `servers` whose health is a PostgreSQL login by the
/// monitor (password in `password_file`) asking the role.
fn pool(name: &str, servers: &[&Pg], role: &str, password_file: &Path) -> String {
    let ports: Vec<u16> = servers.iter().map(|pg| pg.port).collect();
    format!(
        "[[pool]]\n\
         name = \"{name}\"\n\
         servers = [{servers}]\n\
         [pool.health]\n\
         check = \"postgres\"\n\
         role = \"{role}\"\n\
         interval = \"{interval}ms\"\n\
         fall = {FALL}\n\
         rise = 1\n\
         {login}\n\n",
        servers = loopback_servers(&ports),
        interval = INTERVAL.as_millis(),
        login = pg_login(password_file, &format!("{}ms", PROBE_TIMEOUT.as_millis())),
    )
}

/// One `[[listener.route]]`: `key = "value"` (none for the default
/// route) to `pool`.
struct Route<'a> {
    key: Option<(&'a str, &'a str)>,
    pool: &'a str,
}

fn by(key: &'static str, value: &'static str, pool: &'static str) -> Route<'static> {
    Route {
        key: Some((key, value)),
        pool,
    }
}

fn default_route(pool: &str) -> Route<'_> {
    Route { key: None, pool }
}

/// A `[[listener]]` speaking `protocol` on `port` with `routes`, in order.
fn listener(name: &str, port: u16, protocol: &str, mode: &str, routes: &[Route]) -> String {
    let mut text = format!(
        "[[listener]]\n\
         name = \"{name}\"\n\
         listen = \"127.0.0.1:{port}\"\n\
         protocol = \"{protocol}\"\n\
         mode = \"{mode}\"\n"
    );
    for r in routes {
        text += "[[listener.route]]\n";
        if let Some((key, value)) = r.key {
            text += &format!("{key} = \"{value}\"\n");
        }
        text += &format!("pool = \"{}\"\n", r.pool);
    }
    text + "\n"
}

/// A client case: what it connects with, and the answer to [`TLS_WHO`]
/// (or [`PLAIN_WHO`]) it must get.
struct Case {
    what: &'static str,
    conninfo: Conninfo,
    sql: &'static str,
    want: String,
}

/// Which server answered, its major version, whether in recovery, and the
/// database the session is on: for plain-text sessions.
const PLAIN_WHO: &str = "SELECT current_setting('port'), \
     current_setting('server_version_num')::int / 10000, pg_is_in_recovery(), current_database()";

/// Runs every case until each gives its answer (the first probes have
/// marked the servers), then [`ROUNDS`] more times, each time a fresh
/// session: every answer must be the one wanted.
fn settle_and_check(py: &Psycopg, cases: &[Case]) {
    let jobs: Vec<Job> = cases
        .iter()
        .map(|c| Job::query(&c.conninfo, c.sql))
        .collect();
    let deadline = Instant::now() + SETTLE;
    loop {
        let answers = py.run(&jobs, Duration::from_secs(60));
        let wrong = mismatches(cases, &answers);
        if wrong.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not settled within {SETTLE:?}:\n{}",
            wrong.join("\n")
        );
        crate::common::poll_pause();
    }
    for round in 0..ROUNDS {
        let answers = py.run(&jobs, Duration::from_secs(60));
        let wrong = mismatches(cases, &answers);
        assert!(wrong.is_empty(), "round {round}:\n{}", wrong.join("\n"));
    }
    for c in cases {
        eprintln!("{}: {} ({} rounds)", c.what, c.want, ROUNDS + 1);
    }
}

fn mismatches(cases: &[Case], answers: &[Answer]) -> Vec<String> {
    cases
        .iter()
        .zip(answers)
        .filter(|(c, a)| a.line().as_deref() != Ok(c.want.as_str()))
        .map(|(c, a)| {
            format!(
                "{}: want {}, got {:?} ({})",
                c.what,
                c.want,
                a.line(),
                c.conninfo.text()
            )
        })
        .collect()
}

/// [`Psycopg::cancel_within_a_second`], said on stderr.
fn cancel_within_a_second(py: &Psycopg, conninfo: &Conninfo, what: &str) {
    let after = py.cancel_within_a_second(conninfo, what);
    eprintln!("{what}: cancelled {after:?} after cancel_safe()");
}

/// Each of `conninfos` gets no session, within [`REFUSED_WITHIN`].
fn refused(py: &Psycopg, conninfos: &[(&str, Conninfo)]) {
    let jobs: Vec<Job> = conninfos
        .iter()
        .map(|(_, c)| Job::query(c, TLS_WHO))
        .collect();
    for ((what, c), got) in conninfos.iter().zip(py.run(&jobs, Duration::from_secs(60))) {
        assert!(
            matches!(got.reply, Reply::NoSession(_)),
            "{what}: a session without a route: {got:?} ({})",
            c.text()
        );
        assert!(
            got.took < REFUSED_WITHIN,
            "{what}: refused only after {:?}",
            got.took
        );
        eprintln!("{what}: refused in {:?}: {:?}", got.took, got.reply);
    }
}

/// Two tenants behind one `protocol = "postgres"` listener: a on
/// PostgreSQL 15 (classic TLS), b on PostgreSQL 17 (classic and direct
/// TLS), each a primary and a replica; a default pool on a third server.
/// Each tenant's clients land on their primary; a name no route names and
/// a hello without a name take the default route; `cancel_safe()` cancels
/// on both tenants. A second listener, `protocol = "tls"`, routes direct
/// TLS by the same names.
fn tls_tenants_by_server_name(mode: &str) {
    let test = "tls_tenants_by_server_name";
    let (Some(pg15), Some(pg17), Some(py)) = (pg_bin(test), pg17_bin(test), Psycopg::find(test))
    else {
        return;
    };
    let dir = TempDir::new("e2e-tls-tenants");
    let names = ["a.db.example", "b.db.example", "other.db.example"];
    let certs = Certs::new(&dir, &names);
    let (a, a_replica) =
        primary_and_replica_named(&pg15, &dir, "a", "mon-pw", Some(certs.server(names[0])));
    let (b, b_replica) =
        primary_and_replica_named(&pg17, &dir, "b", "mon-pw", Some(certs.server(names[1])));
    let fallback = Pg::primary_with_tls(
        &pg17,
        &dir,
        "fallback",
        "mon-pw",
        Some(certs.server(names[2])),
    );
    let old = a.major();
    let pass = write_secret(&dir, "monitor.pass", "mon-pw");
    let (pg_port, tls_port) = (free_port(), free_port());
    let routes = [
        by("server-name", "a.db.example", "tenant-a-rw"),
        by("server-name", "b.db.example", "tenant-b-rw"),
        default_route("default"),
    ];
    let config = pool("tenant-a-rw", &[&a, &a_replica], "primary", &pass)
        + &pool("tenant-b-rw", &[&b_replica, &b], "primary", &pass)
        + &pool("default", &[&fallback], "primary", &pass)
        + &listener("pg", pg_port, "postgres", mode, &routes)
        + &listener("tls", tls_port, "tls", mode, &routes);
    let _proxy = crate::fixture::Proxy::start(&dir, "tls-tenants", &config);

    let (pg_addr, tls_addr) = (loopback(pg_port), loopback(tls_port));
    let tenant =
        |addr: SocketAddr, name: &str, how| Conninfo::verify_full(addr, name, &certs.ca, how);
    let cases = [
        Case {
            what: "a, classic TLS",
            conninfo: tenant(pg_addr, "a.db.example", Postgres),
            sql: TLS_WHO,
            want: tls_who(&a, old, false),
        },
        Case {
            what: "b, classic TLS",
            conninfo: tenant(pg_addr, "b.db.example", Postgres),
            sql: TLS_WHO,
            want: tls_who(&b, 17, false),
        },
        Case {
            what: "b, direct TLS",
            conninfo: tenant(pg_addr, "b.db.example", Direct),
            sql: TLS_WHO,
            want: tls_who(&b, 17, false),
        },
        Case {
            what: "b, direct TLS on the tls listener",
            conninfo: tenant(tls_addr, "b.db.example", Direct),
            sql: TLS_WHO,
            want: tls_who(&b, 17, false),
        },
        Case {
            what: "a name no route names, classic TLS",
            conninfo: Conninfo::unverified(pg_addr, "c.db.example", Postgres),
            sql: TLS_WHO,
            want: tls_who(&fallback, 17, false),
        },
        Case {
            what: "a name no route names, direct TLS",
            conninfo: Conninfo::unverified(pg_addr, "c.db.example", Direct),
            sql: TLS_WHO,
            want: tls_who(&fallback, 17, false),
        },
        Case {
            what: "no server name (host is an IP address)",
            conninfo: Conninfo::unverified(pg_addr, "127.0.0.1", Postgres),
            sql: TLS_WHO,
            want: tls_who(&fallback, 17, false),
        },
        Case {
            what: "the default pool verified by its own name, direct TLS on the tls listener",
            conninfo: tenant(tls_addr, "other.db.example", Direct),
            sql: TLS_WHO,
            want: tls_who(&fallback, 17, false),
        },
    ];
    settle_and_check(&py, &cases);
    cancel_within_a_second(&py, &cases[0].conninfo, "a, classic TLS");
    cancel_within_a_second(&py, &cases[2].conninfo, "b, direct TLS");
    cancel_within_a_second(&py, &cases[3].conninfo, "b, direct TLS on the tls listener");
}

/// Without a default route, a client whose hello names no routed server
/// (another name, or none) gets no session, at once; the routed name is
/// still served.
fn tls_names_without_a_route_are_refused(mode: &str) {
    let test = "tls_names_without_a_route_are_refused";
    let (Some(pg15), Some(py)) = (pg_bin(test), Psycopg::find(test)) else {
        return;
    };
    let dir = TempDir::new("e2e-tls-no-default");
    let certs = Certs::new(&dir, &["a.db.example"]);
    let (a, a_replica) = primary_and_replica_named(
        &pg15,
        &dir,
        "a",
        "mon-pw",
        Some(certs.server("a.db.example")),
    );
    let old = a.major();
    let pass = write_secret(&dir, "monitor.pass", "mon-pw");
    let port = free_port();
    let config = pool("tenant-a-rw", &[&a, &a_replica], "primary", &pass)
        + &listener(
            "pg",
            port,
            "postgres",
            mode,
            &[by("server-name", "a.db.example", "tenant-a-rw")],
        );
    let _proxy = crate::fixture::Proxy::start(&dir, "tls-no-default", &config);
    let addr = loopback(port);
    settle_and_check(
        &py,
        &[Case {
            what: "a, classic TLS",
            conninfo: Conninfo::verify_full(addr, "a.db.example", &certs.ca, Postgres),
            sql: TLS_WHO,
            want: tls_who(&a, old, false),
        }],
    );
    refused(
        &py,
        &[
            (
                "another name",
                Conninfo::unverified(addr, "b.db.example", Postgres),
            ),
            (
                "no server name",
                Conninfo::unverified(addr, "127.0.0.1", Postgres),
            ),
            ("plain text", Conninfo::plain(addr, "postgres")),
        ],
    );
}

/// Plain-text clients routed by the database of their startup packet:
/// `analytics` to a replica pool, every other database to the primary.
fn plain_routes_by_database(mode: &str) {
    let test = "plain_routes_by_database";
    let (Some(pg15), Some(py)) = (pg_bin(test), Psycopg::find(test)) else {
        return;
    };
    let dir = TempDir::new("e2e-plain-routes");
    let (primary, replica) = primary_and_replica_named(&pg15, &dir, "main", "mon-pw", None);
    primary.psql("CREATE DATABASE analytics");
    crate::common::wait_until(
        Duration::from_secs(20),
        "the replica has the analytics database",
        || {
            replica
                .try_query_line("SELECT count(*) FROM pg_database WHERE datname = 'analytics'")
                .as_deref()
                == Some("1")
        },
    );
    let major = primary.major();
    let pass = write_secret(&dir, "monitor.pass", "mon-pw");
    let port = free_port();
    let config = pool("olap", &[&primary, &replica], "replica", &pass)
        + &pool("default", &[&primary, &replica], "primary", &pass)
        + &listener(
            "pg",
            port,
            "postgres",
            mode,
            &[
                by("database", "analytics", "olap"),
                default_route("default"),
            ],
        );
    let _proxy = crate::fixture::Proxy::start(&dir, "plain-routes", &config);
    let addr = loopback(port);
    settle_and_check(
        &py,
        &[
            Case {
                what: "database analytics",
                conninfo: Conninfo::plain(addr, "analytics"),
                sql: PLAIN_WHO,
                want: format!("{}|{major}|t|analytics", replica.port),
            },
            Case {
                what: "database postgres",
                conninfo: Conninfo::plain(addr, "postgres"),
                sql: PLAIN_WHO,
                want: format!("{}|{major}|f|postgres", primary.port),
            },
        ],
    );
}

/// Without routes, TLS passes through a listener untouched: classic and
/// direct TLS clients verify the server's certificate through spliced, land
/// on the pool's primary, and cancel through it.
fn tls_passes_through_a_listener_without_routes(mode: &str) {
    let test = "tls_passes_through_a_listener_without_routes";
    let (Some(pg17), Some(py)) = (pg17_bin(test), Psycopg::find(test)) else {
        return;
    };
    let dir = TempDir::new("e2e-tls-through");
    let certs = Certs::new(&dir, &["b.db.example"]);
    let (b, b_replica) = primary_and_replica_named(
        &pg17,
        &dir,
        "b",
        "mon-pw",
        Some(certs.server("b.db.example")),
    );
    let pass = write_secret(&dir, "monitor.pass", "mon-pw");
    let port = free_port();
    let config = crate::routing::ListenerToml {
        name: "pg",
        port,
        servers: &[b_replica.port, b.port],
        check: "postgres",
        role: "primary",
        pool_extra: "",
        health_extra: &pg_login(&pass, &format!("{}ms", PROBE_TIMEOUT.as_millis())),
    }
    .render()
    .replacen(
        "[listener.pool]",
        &format!("mode = \"{mode}\"\n[listener.pool]"),
        1,
    );
    let _proxy = crate::fixture::Proxy::start(&dir, "tls-through", &config);
    let addr = loopback(port);
    let cases = [
        Case {
            what: "classic TLS through spliced",
            conninfo: Conninfo::verify_full(addr, "b.db.example", &certs.ca, Postgres),
            sql: TLS_WHO,
            want: tls_who(&b, 17, false),
        },
        Case {
            what: "direct TLS through spliced",
            conninfo: Conninfo::verify_full(addr, "b.db.example", &certs.ca, Direct),
            sql: TLS_WHO,
            want: tls_who(&b, 17, false),
        },
    ];
    settle_and_check(&py, &cases);
    for c in &cases {
        cancel_within_a_second(&py, &c.conninfo, c.what);
    }
}

crate::every_engine!(
    tls_passes_through_a_listener_without_routes,
    tls_tenants_by_server_name,
    tls_names_without_a_route_are_refused,
    plain_routes_by_database,
);
