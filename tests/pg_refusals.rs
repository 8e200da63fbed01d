//! A `protocol = "postgres"` listener that refuses a client tells it why,
//! as a PostgreSQL server would: `N` to an SSLRequest, then a FATAL
//! ErrorResponse once the startup packet is whole, then a clean close.
//! Raw clients over loopback check the exact bytes and the ending; psql,
//! when installed, checks that a real client prints the sentence.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use spliced::config::{Check, Protocol, Role};
use spliced::{CloseReason, Config, Mode, ProxyHandle};

const T: Duration = Duration::from_secs(5);
const LISTENER: &str = "pg-rw";

/// An ErrorResponse written out by hand: `E`, the length, severity FATAL
/// (twice: `S` and `V`), the SQLSTATE, the message, and the final NUL.
fn error_response(sqlstate: &str, message: &str) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(b"SFATAL\0VFATAL\0C");
    body.extend_from_slice(sqlstate.as_bytes());
    body.extend_from_slice(b"\0M");
    body.extend_from_slice(message.as_bytes());
    body.extend_from_slice(b"\0\0");
    let mut out = vec![b'E'];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend(body);
    out
}

fn ssl_request() -> Vec<u8> {
    [8u32.to_be_bytes(), 80_877_103u32.to_be_bytes()].concat()
}

/// A protocol 3.0 StartupMessage for user and database `app`.
fn startup() -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    body.extend_from_slice(b"user\0app\0database\0app\0\0");
    let mut out = (body.len() as u32 + 4).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// A postgres listener named [`LISTENER`] in front of `servers`.
fn pg_listener(
    mode: Mode,
    servers: Vec<SocketAddr>,
    tweak: impl FnOnce(&mut Config),
) -> ProxyHandle {
    proxy(mode, servers, |c| {
        let l = &mut c.listeners[0];
        l.name = LISTENER.into();
        l.protocol = Protocol::Postgres;
        tweak(c)
    })
}

/// A postgres listener whose pool wants a primary and has none: its one
/// server accepts (in the kernel's backlog) and never answers the check,
/// and a role pool uses only a server whose answer confirmed the role. No
/// client is sent anywhere. Keep the returned listener while the proxy
/// runs.
fn no_primary(mode: Mode, tweak: impl FnOnce(&mut Config)) -> (ProxyHandle, std::net::TcpListener) {
    let silent = bind_listener();
    let h = pg_listener(mode, vec![silent.local_addr().unwrap()], |c| {
        let h = &mut c.listeners[0].pool.health;
        h.check = Some(Check::Postgres);
        h.role = Role::Primary;
        h.user = Some("probe".into());
        tweak(c)
    });
    (h, silent)
}

fn no_primary_error() -> Vec<u8> {
    error_response("57P03", "spliced: no primary for listener pg-rw")
}

fn connect_to(h: &ProxyHandle) -> TcpStream {
    let c = connect(h.local_addr());
    c.set_read_timeout(Some(T)).unwrap();
    c
}

/// What the proxy sends before it closes, and whether the close was clean.
fn answer(c: &mut TcpStream) -> (Vec<u8>, Ending) {
    read_until_closed(c, T)
}

fn an_ssl_request_hears_n_then_the_error_then_eof(mode: Mode) {
    let (h, _silent) = no_primary(mode, |_| {});
    let mut c = connect_to(&h);
    c.write_all(&ssl_request()).unwrap();
    let mut n = [0u8; 1];
    c.read_exact(&mut n).unwrap();
    assert_eq!(&n, b"N", "no TLS, as a server without it answers");
    c.write_all(&startup()).unwrap();
    let (bytes, ending) = answer(&mut c);
    assert_eq!(bytes, no_primary_error());
    assert_eq!(ending, Ending::Eof, "a clean close, not a reset");
    let s = wait_stats(&h, T, "the no-server close is counted", |s| {
        s.closed(CloseReason::NoServer) == 1
    });
    assert_eq!(s.upstream_connect_failures, 0, "no server was tried");
}

fn a_startup_message_alone_hears_the_error(mode: Mode) {
    let (h, _silent) = no_primary(mode, |_| {});
    let mut c = connect_to(&h);
    // In two pieces: the answer waits for the whole packet.
    let s = startup();
    c.write_all(&s[..5]).unwrap();
    c.flush().unwrap();
    pace(Duration::from_millis(50));
    c.write_all(&s[5..]).unwrap();
    let (bytes, ending) = answer(&mut c);
    assert_eq!(bytes, no_primary_error());
    assert_eq!(ending, Ending::Eof);
}

fn a_client_that_sends_nothing_is_closed_without_a_word(mode: Mode) {
    let timeout = Duration::from_millis(300);
    let (h, _silent) = no_primary(mode, |c| c.listeners[0].first_packet_timeout = timeout);
    // Before the connect: the deadline runs from the accept, and this
    // thread may wait for the CPU between the two.
    let start = Instant::now();
    let mut c = connect_to(&h);
    let (bytes, ending) = answer(&mut c);
    assert_eq!(bytes, b"", "nothing is said to a client that never asked");
    assert_eq!(ending, Ending::Eof);
    // The first packet's wait, then the answer's.
    assert!(
        start.elapsed() >= 2 * timeout,
        "closed after {:?}",
        start.elapsed()
    );
}

fn a_denied_client_hears_why(mode: Mode) {
    let echo = echo_server();
    let h = pg_listener(mode, vec![echo.addr], |c| {
        c.listeners[0].access.deny = vec!["127.0.0.1/32".parse().unwrap()];
    });
    let mut c = connect_to(&h);
    c.write_all(&ssl_request()).unwrap();
    let mut n = [0u8; 1];
    c.read_exact(&mut n).unwrap();
    assert_eq!(&n, b"N");
    c.write_all(&startup()).unwrap();
    let (bytes, ending) = answer(&mut c);
    assert_eq!(
        bytes,
        error_response(
            "28000",
            "spliced: connections from 127.0.0.1 are not allowed on listener pg-rw"
        )
    );
    assert_eq!(ending, Ending::Eof);
    wait_stats(&h, T, "the refusal is counted", |s| s.refused_denied == 1);
    assert_eq!(echo.accepted(), 0, "no server was contacted");
}

fn a_denied_client_that_sends_nothing_is_closed_at_its_deadline(mode: Mode) {
    let echo = echo_server();
    let timeout = Duration::from_millis(300);
    let h = pg_listener(mode, vec![echo.addr], |c| {
        c.listeners[0].access.deny = vec!["127.0.0.1/32".parse().unwrap()];
        c.listeners[0].first_packet_timeout = timeout;
    });
    let start = Instant::now();
    let mut c = connect_to(&h);
    let (bytes, ending) = answer(&mut c);
    assert_eq!(bytes, b"");
    assert_eq!(ending, Ending::Eof);
    assert!(
        start.elapsed() >= timeout,
        "closed after {:?}",
        start.elapsed()
    );
}

fn a_client_past_max_conns_per_source_hears_too_many_connections(mode: Mode) {
    let echo = echo_server();
    let h = pg_listener(mode, vec![echo.addr], |c| {
        c.listeners[0].max_conns_per_source = Some(1);
    });
    let mut first = connect_to(&h);
    // The echo answers the startup packet with itself: the relay is live.
    round_trip(&mut first, &startup(), T);
    let mut second = connect_to(&h);
    second.write_all(&startup()).unwrap();
    let (bytes, ending) = answer(&mut second);
    assert_eq!(
        bytes,
        error_response(
            "53300",
            "spliced: too many connections from 127.0.0.1 for listener pg-rw"
        )
    );
    assert_eq!(ending, Ending::Eof);
    wait_stats(&h, T, "the refusal is counted", |s| {
        s.refused_max_conns_per_source == 1
    });
    round_trip(&mut first, b"still relayed", T);
}

fn a_client_no_server_accepts_hears_none_is_reachable(mode: Mode) {
    let h = pg_listener(mode, vec![refused_addr(), refused_addr()], |_| {});
    let mut c = connect_to(&h);
    c.write_all(&ssl_request()).unwrap();
    let mut n = [0u8; 1];
    c.read_exact(&mut n).unwrap();
    assert_eq!(&n, b"N", "answered by spliced: no server heard the request");
    c.write_all(&startup()).unwrap();
    let (bytes, ending) = answer(&mut c);
    assert_eq!(
        bytes,
        error_response("57P03", "spliced: no server reachable for listener pg-rw")
    );
    assert_eq!(ending, Ending::Eof);
    let s = wait_stats(&h, T, "the close is counted", |s| {
        s.closed(CloseReason::ConnectFailed) == 1
    });
    assert_eq!(s.upstream_connect_failures, 2, "both servers were tried");
}

fn a_cancel_request_to_a_refusing_listener_is_closed_without_a_word(mode: Mode) {
    let (h, _silent) = no_primary(mode, |_| {});
    let mut c = connect_to(&h);
    let mut cancel = [16u32.to_be_bytes(), 80_877_102u32.to_be_bytes()].concat();
    cancel.extend_from_slice(&[0, 0, 0, 42, 0, 0, 0, 7]);
    c.write_all(&cancel).unwrap();
    let (bytes, ending) = answer(&mut c);
    assert_eq!(bytes, b"");
    assert_eq!(ending, Ending::Eof);
}

fn a_client_that_keeps_its_side_open_is_closed_after_the_linger(mode: Mode) {
    let (h, _silent) = no_primary(mode, |_| {});
    let mut c = connect_to(&h);
    c.write_all(&startup()).unwrap();
    let got = read_exact_within(&mut c, no_primary_error().len(), T).unwrap();
    assert_eq!(got, no_primary_error());
    // The proxy shut its side: EOF now, while the client still writes.
    let mut rest = [0u8; 1];
    assert_eq!(c.read(&mut rest).unwrap(), 0, "EOF after the answer");
    c.write_all(b"ignored bytes after the error").unwrap();
    // The proxy reads them and closes by its linger (a few seconds) at
    // the latest: writing then fails, or the proxy is gone from `ss`.
    wait_until(T, "the proxy closes its socket", || {
        c.write_all(b"x").is_err()
    });
}

/// No client of a listener without a protocol hears a word: a denied one
/// is reset, as before.
#[test]
fn a_listener_without_a_protocol_still_resets_a_denied_client() {
    let echo = echo_server();
    let h = proxy(Mode::Splice, vec![echo.addr], |c| {
        c.listeners[0].access.deny = vec!["127.0.0.1/32".parse().unwrap()];
    });
    // The reset may come so soon that the connect itself reports it.
    let reset = |e: std::io::Error| {
        assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}");
        (Vec::new(), Ending::Reset)
    };
    let (bytes, ending) = match TcpStream::connect(h.local_addr()) {
        Ok(mut c) => match c.set_read_timeout(Some(T)) {
            // Nothing written: a write would take the reset's error, and
            // the read after it would see a plain EOF.
            Ok(()) => answer(&mut c),
            Err(e) => reset(e),
        },
        Err(e) => reset(e),
    };
    assert_eq!(bytes, b"");
    assert_eq!(ending, Ending::Reset);
}

/// psql (libpq) prints the sentence: it sends an SSLRequest first
/// (`sslmode=prefer`), reads `N`, and goes on in plain text.
#[test]
fn psql_prints_why_it_was_refused() {
    let Ok(out) = Command::new("psql").arg("--version").output() else {
        eprintln!("skipped: psql is not on PATH (bash scripts/install-deps.sh installs it)");
        return;
    };
    assert!(out.status.success());
    let (h, _silent) = no_primary(Mode::Splice, |_| {});
    let conninfo = format!(
        "host=127.0.0.1 port={} sslmode=prefer user=app dbname=app connect_timeout=5",
        h.local_addr().port()
    );
    let mut cmd = Command::new("psql");
    cmd.args([&conninfo, "-w", "-Atc", "SELECT 1"])
        .env("PGPASSWORD", "unused");
    let (status, stdout, stderr) = run_cmd(cmd, Duration::from_secs(20));
    let status = status.expect("psql exits");
    eprintln!("psql printed: {stderr}");
    assert!(!status.success(), "psql must fail: {stdout}");
    assert!(
        stderr.contains("FATAL:  spliced: no primary for listener pg-rw"),
        "psql's stderr: {stderr}"
    );
    assert!(
        !stderr.contains("closed the connection unexpectedly"),
        "psql's stderr: {stderr}"
    );
}

both_engines!(
    an_ssl_request_hears_n_then_the_error_then_eof,
    a_startup_message_alone_hears_the_error,
    a_client_that_sends_nothing_is_closed_without_a_word,
    a_denied_client_hears_why,
    a_denied_client_that_sends_nothing_is_closed_at_its_deadline,
    a_client_past_max_conns_per_source_hears_too_many_connections,
    a_client_no_server_accepts_hears_none_is_reachable,
    a_cancel_request_to_a_refusing_listener_is_closed_without_a_word,
    a_client_that_keeps_its_side_open_is_closed_after_the_linger,
);
