//! Health probes over loopback against scripted servers: the non-blocking
//! driver (`ProbeConn`) through `probe_blocking`, and several probes on one
//! mio `Poll` as a worker would run them.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{black_hole, echo_server, refused_addr, serve, startup_message, Server};
use spliced::health::{probe_blocking, CheckSpec, Kind, ProbeConn, Role, Verdict, WantRole};

const TIMEOUT: Duration = Duration::from_secs(5);

/// One step of a scripted server: read exactly `expect`, then write `reply`.
type Exchange = (Vec<u8>, Vec<u8>);

/// A server that plays `script` on every connection, then reads to EOF and
/// reports (on the channel) whether the script held and what came after.
fn scripted(script: Vec<Exchange>) -> (Server, mpsc::Receiver<Result<Vec<u8>, String>>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let server = serve(move |mut s: TcpStream| {
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let outcome = play(&mut s, &script);
        let _ = tx.lock().unwrap().send(outcome);
    });
    (server, rx)
}

fn play(s: &mut TcpStream, script: &[Exchange]) -> Result<Vec<u8>, String> {
    for (i, (expect, reply)) in script.iter().enumerate() {
        let mut got = vec![0u8; expect.len()];
        s.read_exact(&mut got)
            .map_err(|e| format!("step {i}: read: {e}"))?;
        if &got != expect {
            return Err(format!(
                "step {i}: got {:?}, want {:?}",
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(expect)
            ));
        }
        s.write_all(reply)
            .map_err(|e| format!("step {i}: write: {e}"))?;
    }
    let mut rest = Vec::new();
    match s.read_to_end(&mut rest) {
        Ok(_) => Ok(rest),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => Ok(rest),
        Err(e) => Err(format!("after the script: {e}")),
    }
}

/// Runs the probe and returns the verdict and the server's report.
fn run(spec: &CheckSpec, script: Vec<Exchange>) -> (Verdict, Vec<u8>) {
    let (server, rx) = scripted(script);
    let v = probe_blocking(spec, server.addr, TIMEOUT);
    let report = rx
        .recv_timeout(TIMEOUT)
        .expect("the server saw no connection")
        .unwrap_or_else(|e| panic!("script broken: {e}"));
    (v, report)
}

fn spec(kind: Kind, role: WantRole) -> CheckSpec {
    CheckSpec {
        role,
        ..CheckSpec::new(kind)
    }
}

fn down_reason(v: Verdict) -> String {
    match v {
        Verdict::Down { reason } => reason,
        up => panic!("expected down, got {up:?}"),
    }
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

// tcp

#[test]
fn tcp_up_refused_and_timed_out() {
    let echo = echo_server();
    let s = spec(Kind::Tcp, WantRole::Any);
    assert_eq!(
        probe_blocking(&s, echo.addr, TIMEOUT),
        Verdict::Up { role: None }
    );

    let r = down_reason(probe_blocking(&s, refused_addr(), TIMEOUT));
    assert!(
        r.contains("connect to 127.0.0.1:") && r.contains("refused"),
        "{r}"
    );

    let (_l, _filler, addr) = black_hole();
    let t0 = Instant::now();
    let r = down_reason(probe_blocking(&s, addr, Duration::from_millis(300)));
    assert!(r.contains("timed out after 300 ms while connecting"), "{r}");
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

// redis

const PING: &str = "*1\r\n$4\r\nPING\r\n";
const INFO: &str = "*2\r\n$4\r\nINFO\r\n$11\r\nreplication\r\n";

fn info(role: &str) -> Vec<u8> {
    let body = format!("# Replication\r\nrole:{role}\r\nconnected_slaves:0\r\n");
    format!("${}\r\n{body}\r\n", body.len()).into_bytes()
}

#[test]
fn redis_pong_is_up() {
    let (v, rest) = run(
        &spec(Kind::Redis, WantRole::Any),
        vec![(b(PING), b("+PONG\r\n"))],
    );
    assert_eq!(v, Verdict::Up { role: None });
    assert!(rest.is_empty());
}

#[test]
fn redis_roles() {
    let (v, _) = run(
        &spec(Kind::Redis, WantRole::Primary),
        vec![(b(PING), b("+PONG\r\n")), (b(INFO), info("master"))],
    );
    assert_eq!(
        v,
        Verdict::Up {
            role: Some(Role::Primary)
        }
    );
    let (v, _) = run(
        &spec(Kind::Redis, WantRole::Primary),
        vec![(b(PING), b("+PONG\r\n")), (b(INFO), info("slave"))],
    );
    assert_eq!(down_reason(v), "role is replica, want primary");
}

#[test]
fn redis_auth_and_noauth() {
    let mut s = spec(Kind::Redis, WantRole::Any);
    s.password = Some("pw".into());
    let (v, _) = run(
        &s,
        vec![
            (b("*2\r\n$4\r\nAUTH\r\n$2\r\npw\r\n"), b("+OK\r\n")),
            (b(PING), b("+PONG\r\n")),
        ],
    );
    assert!(v.is_up(), "{v:?}");
    let (v, _) = run(
        &spec(Kind::Redis, WantRole::Any),
        vec![(b(PING), b("-NOAUTH Authentication required.\r\n"))],
    );
    // The check lacks credentials: a check error, not a dead server.
    assert!(
        matches!(&v, Verdict::CheckError { reason } if reason.contains("NOAUTH")),
        "{v:?}"
    );
}

#[test]
fn redis_silent_server_times_out_naming_the_phase() {
    let (server, _rx) = scripted(vec![(b(PING), Vec::new())]);
    let r = down_reason(probe_blocking(
        &spec(Kind::Redis, WantRole::Any),
        server.addr,
        Duration::from_millis(300),
    ));
    assert!(
        r.contains("timed out after 300 ms while waiting for +PONG"),
        "{r}"
    );
}

#[test]
fn redis_server_closing_early_is_down() {
    let server = serve(|s: TcpStream| drop(s));
    let r = down_reason(probe_blocking(
        &spec(Kind::Redis, WantRole::Any),
        server.addr,
        TIMEOUT,
    ));
    // A close before our PING arrives may surface as EOF or as a reset.
    assert!(
        r.contains("closed the connection") || r.contains("reset"),
        "{r}"
    );
}

// postgres

fn pg_msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// The startup packet of the check's login.
fn startup(user: &str, database: Option<&str>) -> Vec<u8> {
    startup_message(&[
        ("user", user),
        ("database", database.unwrap_or("postgres")),
        ("application_name", "spliced-health"),
    ])
}

fn pg_welcome() -> Vec<u8> {
    let mut out = pg_msg(b'R', &0u32.to_be_bytes());
    out.extend(pg_msg(b'S', b"in_hot_standby\0off\0"));
    out.extend(pg_msg(b'Z', b"I"));
    out
}

fn pg_answer(value: &[u8]) -> Vec<u8> {
    let mut desc = 1u16.to_be_bytes().to_vec();
    desc.extend_from_slice(b"pg_is_in_recovery\0");
    desc.extend_from_slice(&[
        0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0, 1, 255, 255, 255, 255, 0, 0,
    ]);
    let mut row = 1u16.to_be_bytes().to_vec();
    row.extend_from_slice(&(value.len() as u32).to_be_bytes());
    row.extend_from_slice(value);
    let mut out = pg_msg(b'T', &desc);
    out.extend(pg_msg(b'D', &row));
    out.extend(pg_msg(b'C', b"SELECT 1\0"));
    out.extend(pg_msg(b'Z', b"I"));
    out
}

const TERMINATE: &[u8] = b"X\0\0\0\x04";

#[test]
fn postgres_liveness_on_an_auth_request() {
    let (v, rest) = run(
        &spec(Kind::Postgres, WantRole::Any),
        vec![(
            startup("postgres", None),
            pg_msg(b'R', &[0, 0, 0, 5, 1, 2, 3, 4]),
        )],
    );
    assert_eq!(v, Verdict::Up { role: None });
    assert!(rest.is_empty(), "no session, no Terminate: {rest:?}");
}

#[test]
fn postgres_md5_login_and_recovery_answer_then_terminate() {
    let mut s = spec(Kind::Postgres, WantRole::Replica);
    s.user = Some("probe".into());
    s.password = Some("pw".into());
    s.database = Some("app".into());
    let salt = [9, 8, 7, 6];
    let mut hash = postgres_protocol::authentication::md5_hash(b"probe", b"pw", salt).into_bytes();
    hash.push(0);
    let mut query = spliced::health::POSTGRES_ROLE_QUERY.as_bytes().to_vec();
    query.push(0);
    let query = pg_msg(b'Q', &query);
    // A replica's conversation: md5 login, then `t` to the role query.
    let replica = || {
        vec![
            (
                startup("probe", Some("app")),
                pg_msg(b'R', &[0, 0, 0, 5, 9, 8, 7, 6]),
            ),
            (pg_msg(b'p', &hash), pg_welcome()),
            (query.clone(), pg_answer(b"t")),
        ]
    };
    let (v, rest) = run(&s, replica());
    assert_eq!(
        v,
        Verdict::Up {
            role: Some(Role::Replica)
        }
    );
    assert_eq!(rest, TERMINATE, "the session ends politely");

    s.role = WantRole::Primary;
    let (v, rest) = run(&s, replica());
    assert_eq!(down_reason(v), "role is replica, want primary");
    assert_eq!(rest, TERMINATE);
}

#[test]
fn postgres_starting_up_is_down() {
    let err = pg_msg(
        b'E',
        b"SFATAL\0C57P03\0Mthe database system is starting up\0\0",
    );
    let (v, _) = run(
        &spec(Kind::Postgres, WantRole::Any),
        vec![(startup("postgres", None), err)],
    );
    assert!(down_reason(v).contains("57P03"));
}

// mysql

fn mysql_packet(payload: &[u8]) -> Vec<u8> {
    let mut out = (payload.len() as u32).to_le_bytes()[..3].to_vec();
    out.push(0);
    out.extend_from_slice(payload);
    out
}

#[test]
fn mysql_handshake_and_error() {
    let mut hs = vec![0x0a];
    hs.extend_from_slice(b"8.0.36\0\x07\0\0\0abcdefgh\0\xff\xf7");
    let (v, _) = run(
        &spec(Kind::Mysql, WantRole::Any),
        vec![(Vec::new(), mysql_packet(&hs))],
    );
    assert_eq!(v, Verdict::Up { role: None });

    let mut err = vec![0xff, 0x10, 0x04];
    err.extend_from_slice(b"Too many connections");
    let (v, _) = run(
        &spec(Kind::Mysql, WantRole::Any),
        vec![(Vec::new(), mysql_packet(&err))],
    );
    assert!(down_reason(v).ends_with("error 1040: Too many connections"));
}

// http

/// An HTTP server answering `status` to any request on the side port.
fn http_server(status: &'static str) -> (Server, mpsc::Receiver<String>) {
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let server = serve(move |mut s: TcpStream| {
        s.set_read_timeout(Some(TIMEOUT)).unwrap();
        let mut req = Vec::new();
        let mut buf = [0u8; 1024];
        while !req.ends_with(b"\r\n\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
        let _ =
            s.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 2\r\n\r\n{{}}").as_bytes());
        let _ = tx
            .lock()
            .unwrap()
            .send(String::from_utf8_lossy(&req).into_owned());
    });
    (server, rx)
}

#[test]
fn http_side_port_200_on_a_role_path_is_that_role_and_503_is_not() {
    let (patroni, rx) = http_server("200 OK");
    let mut s = spec(Kind::Http, WantRole::Any);
    s.http_path = "/primary".into();
    s.http_port = Some(patroni.addr.port());
    // The server address names the database port; the probe goes to the side port.
    let db: SocketAddr = SocketAddr::new(patroni.addr.ip(), 5432);
    assert_eq!(
        probe_blocking(&s, db, TIMEOUT),
        Verdict::Up {
            role: Some(Role::Primary)
        }
    );
    let req = rx.recv_timeout(TIMEOUT).unwrap();
    assert!(req.starts_with("GET /primary HTTP/1.1\r\n"), "{req}");

    let (patroni, _rx) = http_server("503 Service Unavailable");
    s.http_port = Some(patroni.addr.port());
    // An answer ("not primary"), not a failure.
    assert_eq!(
        probe_blocking(&s, db, TIMEOUT),
        Verdict::NotRole {
            role: Role::Primary
        }
    );
}

// Several probes on one Poll, as a worker runs them.

#[test]
fn many_probes_share_one_poll() {
    use mio::{Events, Interest, Poll, Token};

    let (redis, _rx1) = scripted(vec![(b(PING), b("+PONG\r\n"))]);
    let (silent, _rx2) = scripted(vec![(b(PING), Vec::new())]);
    let echo = echo_server();
    let targets = [
        (Kind::Redis, redis.addr),
        (Kind::Redis, silent.addr),
        (Kind::Tcp, echo.addr),
        (Kind::Tcp, refused_addr()),
    ];
    let mut poll = Poll::new().unwrap();
    let now = Instant::now();
    let mut conns: Vec<Option<ProbeConn>> = Vec::new();
    let mut verdicts: Vec<Option<Verdict>> = vec![None; targets.len()];
    for (i, (kind, addr)) in targets.iter().enumerate() {
        match ProbeConn::connect(
            &spec(*kind, WantRole::Any),
            *addr,
            now,
            Duration::from_millis(500),
        ) {
            Ok(mut c) => {
                poll.registry()
                    .register(
                        c.stream(),
                        Token(i),
                        Interest::READABLE | Interest::WRITABLE,
                    )
                    .unwrap();
                conns.push(Some(c));
            }
            Err(v) => {
                verdicts[i] = Some(v);
                conns.push(None);
            }
        }
    }
    let mut events = Events::with_capacity(16);
    let end = now + TIMEOUT;
    while conns.iter().any(Option::is_some) {
        assert!(Instant::now() < end, "probes did not finish: {verdicts:?}");
        let next = conns
            .iter()
            .flatten()
            .map(ProbeConn::deadline)
            .min()
            .unwrap();
        poll.poll(
            &mut events,
            Some(next.saturating_duration_since(Instant::now())),
        )
        .unwrap();
        let now = Instant::now();
        for ev in events.iter() {
            let i = ev.token().0;
            if let Some(v) = conns[i].as_mut().and_then(|c| c.on_ready(now)) {
                let mut c = conns[i].take().unwrap();
                poll.registry().deregister(c.stream()).unwrap();
                verdicts[i] = Some(v);
            }
        }
        for (i, slot) in conns.iter_mut().enumerate() {
            if let Some(v) = slot.as_mut().and_then(|c| c.on_deadline(now)) {
                let mut c = slot.take().unwrap();
                poll.registry().deregister(c.stream()).unwrap();
                verdicts[i] = Some(v);
            }
        }
    }
    let verdicts: Vec<Verdict> = verdicts.into_iter().map(Option::unwrap).collect();
    assert_eq!(verdicts[0], Verdict::Up { role: None });
    assert!(
        down_reason(verdicts[1].clone()).contains("timed out after 500 ms while waiting for +PONG")
    );
    assert_eq!(verdicts[2], Verdict::Up { role: None });
    assert!(down_reason(verdicts[3].clone()).contains("refused"));
}
