//! The admin endpoint under clients that try to stall or exhaust it: a
//! pipeliner that never reads, huge request heads, hundreds of idle
//! connections. Throughout each attack `/livez` must answer within 100 ms,
//! and the relays must keep their fds. Also: what a bad request gets.
#![cfg(feature = "admin")]

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(10);
/// How fast `/livez` must answer while an attack is on.
const PROBE_LIMIT: Duration = Duration::from_millis(100);
/// The endpoint's bounds, as documented.
const MAX_CONNECTIONS: usize = 64;
const MAX_HEAD_BYTES: usize = 8 * 1024;
const MAX_HEADERS: usize = 32;
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// `spliced run` with an admin endpoint (and an echo upstream); returns the
/// child and the admin address.
fn start(nofile: Option<u32>, upstream: SocketAddr) -> (Spliced, SocketAddr) {
    let up = upstream.to_string();
    let args = [
        "--upstream",
        &up,
        "--admin",
        "127.0.0.1:0",
        "--workers",
        "1",
    ];
    let s = match nofile {
        Some(n) => Spliced::run_with_nofile(n, &args),
        None => Spliced::run(&args),
    };
    let mut admin = None;
    wait_until(T, "the admin endpoint's address is logged", || {
        admin = s.logs().iter().find_map(|l| {
            let rest = &l[l.find("admin endpoint on http://")? + 25..];
            rest.split('/').next()?.parse().ok()
        });
        admin.is_some()
    });
    (s, admin.unwrap())
}

/// Sends `request` and reads the answer until the endpoint closes: (status,
/// whole text, how it ended).
fn exchange(admin: SocketAddr, request: &[u8]) -> (u16, String, Ending) {
    let mut s = connect(admin);
    s.write_all(request).expect("send the request");
    let (bytes, ending) = read_until_closed(&mut s, T);
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text, ending)
}

/// One `GET path`: its status and how long the whole exchange took.
fn timed_get(admin: SocketAddr, path: &str) -> (u16, Duration) {
    let start = Instant::now();
    let request = format!("GET {path} HTTP/1.0\r\n\r\n");
    let (status, _, _) = exchange(admin, request.as_bytes());
    (status, start.elapsed())
}

/// Probes `/livez` (and now and then `/healthz` and `/metrics`) until
/// `done` holds and `at_least` has passed; every answer must be a 200
/// within [`PROBE_LIMIT`]. Returns how many probes ran and the slowest.
fn probe_throughout(
    admin: SocketAddr,
    at_least: Duration,
    mut done: impl FnMut() -> bool,
    mut each: impl FnMut(),
) -> (usize, Duration) {
    let start = Instant::now();
    let (mut probes, mut slowest) = (0, Duration::ZERO);
    while start.elapsed() < at_least || !done() {
        assert!(start.elapsed() < T + at_least, "the attack never got going");
        let path = match probes % 10 {
            3 => "/healthz",
            7 => "/metrics",
            _ => "/livez",
        };
        let (status, took) = timed_get(admin, path);
        assert_eq!(status, 200, "{path} during the attack");
        assert!(
            took < PROBE_LIMIT,
            "{path} took {took:?} during the attack (probe {probes})"
        );
        probes += 1;
        slowest = slowest.max(took);
        each();
        poll_pause();
    }
    (probes, slowest)
}

/// Waits until the endpoint has closed `s` (EOF or reset seen as readiness,
/// without reading what it sent); returns how long that took.
fn closed_by_endpoint(s: &TcpStream, timeout: Duration) -> Duration {
    use mio::{Events, Interest, Poll, Token};
    let start = Instant::now();
    let mut poll = Poll::new().unwrap();
    let clone = s.try_clone().unwrap();
    clone.set_nonblocking(true).unwrap();
    let mut watched = mio::net::TcpStream::from_std(clone);
    poll.registry()
        .register(&mut watched, Token(0), Interest::READABLE)
        .unwrap();
    let mut events = Events::with_capacity(4);
    loop {
        let left = timeout
            .checked_sub(start.elapsed())
            .unwrap_or_else(|| panic!("the endpoint kept the connection past {timeout:?}"));
        poll.poll(&mut events, Some(left)).unwrap();
        if events.iter().any(|e| e.is_read_closed() || e.is_error()) {
            return start.elapsed();
        }
    }
}

// ---------------------------------------------------------------------------
// Attacks.

/// A client pipelines `GET /metrics` and never reads: the endpoint stops
/// reading it once an answer is pending, serves everyone else meanwhile,
/// and closes it at its write deadline.
#[test]
fn a_pipeliner_that_never_reads_stalls_only_itself() {
    let _serial = serial();
    let upstream = echo_server();
    let (proxy, admin) = start(None, upstream.addr);
    let attacker = connect(admin);
    let stalled = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let writer = {
        let mut w = attacker.try_clone().unwrap();
        let (stalled, sent) = (Arc::clone(&stalled), Arc::clone(&sent));
        thread::spawn(move || {
            w.set_write_timeout(Some(Duration::from_millis(300)))
                .unwrap();
            let requests = b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\n".repeat(64);
            loop {
                match w.write(&requests) {
                    Ok(n) => sent.fetch_add(n, Ordering::Relaxed),
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                        // Every buffer between us is full: the endpoint
                        // stopped reading this client.
                        stalled.store(true, Ordering::Release);
                        return Instant::now();
                    }
                    Err(e) => panic!("the endpoint cut the pipeliner before it stalled: {e}"),
                };
            }
        })
    };
    let attack_start = Instant::now();
    let (probes, slowest) = probe_throughout(
        admin,
        Duration::from_secs(1),
        || stalled.load(Ordering::Acquire),
        || {},
    );
    let stalled_after = writer.join().unwrap() - attack_start;
    // Stalled, and everyone else is still served.
    let (more, slowest_stalled) = probe_throughout(admin, Duration::from_secs(1), || true, || {});
    eprintln!(
        "pipeliner stalled after {stalled_after:?} ({} bytes of requests); {} probes, slowest {:?}",
        sent.load(Ordering::Relaxed),
        probes + more,
        slowest.max(slowest_stalled)
    );
    // The stuck client is closed by the write deadline of its pending
    // answer, which began before the stall.
    closed_by_endpoint(&attacker, WRITE_TIMEOUT + Duration::from_secs(5));
    let closed_at = attack_start.elapsed();
    assert!(
        closed_at <= stalled_after + WRITE_TIMEOUT + Duration::from_secs(2),
        "closed {closed_at:?} into the attack, the stall began at {stalled_after:?}"
    );
    assert_eq!(timed_get(admin, "/livez").0, 200);
    drop(proxy);
}

/// Clients send request heads of 64 MiB: each is cut after the 8 KiB head
/// bound (and a bounded linger), the process does not grow, and probes are
/// answered throughout.
#[test]
fn huge_request_heads_are_cut_and_memory_stays_flat() {
    const HEAD: usize = 64 * MIB;
    const ATTACKERS: usize = 4;
    let _serial = serial();
    let upstream = echo_server();
    let (proxy, admin) = start(None, upstream.addr);
    // Settle: one answer of each kind, then the baseline.
    for path in ["/livez", "/healthz", "/metrics"] {
        assert_eq!(timed_get(admin, path).0, 200);
    }
    let baseline = proxy.rss_kib();
    let stop = Arc::new(AtomicBool::new(false));
    let cut = Arc::new(AtomicUsize::new(0));
    let attackers: Vec<_> = (0..ATTACKERS)
        .map(|_| {
            let (stop, cut) = (Arc::clone(&stop), Arc::clone(&cut));
            thread::spawn(move || {
                let chunk = vec![b'a'; MIB];
                while !stop.load(Ordering::Relaxed) {
                    let mut s = connect(admin);
                    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
                    let mut sent = 0;
                    let mut ended = s
                        .write_all(b"GET /metrics HTTP/1.1\r\nHost: a\r\nX-Big: ")
                        .is_err();
                    while !ended && sent < HEAD && !stop.load(Ordering::Relaxed) {
                        match s.write(&chunk) {
                            Ok(n) => sent += n,
                            Err(_) => ended = true,
                        }
                    }
                    if ended {
                        cut.fetch_add(1, Ordering::Relaxed);
                    } else {
                        assert!(
                            stop.load(Ordering::Relaxed),
                            "the endpoint took a {HEAD}-byte head"
                        );
                    }
                }
            })
        })
        .collect();
    let mut peak = baseline;
    let (probes, slowest) = probe_throughout(
        admin,
        Duration::from_secs(2),
        || cut.load(Ordering::Relaxed) >= 2 * ATTACKERS,
        || peak = peak.max(proxy.rss_kib()),
    );
    stop.store(true, Ordering::Relaxed);
    for a in attackers {
        a.join().unwrap();
    }
    peak = peak.max(proxy.rss_kib());
    eprintln!(
        "huge heads: {} cut, {probes} probes, slowest {slowest:?}, RSS {baseline} KiB -> peak {peak} KiB",
        cut.load(Ordering::Relaxed)
    );
    // Every connection holds at most one 8 KiB head: 64 of them are half a
    // MiB. Allow for allocator slack, far below one attacker's 64 MiB.
    assert!(
        peak < baseline + 16 * 1024,
        "RSS grew from {baseline} KiB to {peak} KiB under huge heads"
    );
}

/// Hundreds of idle connections: the endpoint holds at most 64 (a new one
/// takes the place of the quietest), probes are answered throughout, and
/// under a low fd limit every relay still gets its fds.
#[test]
fn idle_connections_past_the_bound_leave_probes_and_relays_working() {
    const IDLE: usize = 500;
    let _serial = serial();
    let upstream = echo_server();
    // 256 fds: an eighth (32) and 4 for the one worker are kept for loops
    // and listeners, and 68 for the admin endpoint; of the 152 left, relays
    // get 2/5 (two sockets each plus a pipe per four relays): 60. 500 admin
    // connections alone would take every fd if they were not bounded.
    let (proxy, admin) = start(Some(256), upstream.addr);
    let relay_cap = (256 - 32 - 4 - (MAX_CONNECTIONS + 4)) * 2 / 5;
    let logged = format!("at most {relay_cap} relays at once");
    assert!(
        proxy.logs().iter().any(|l| l.contains(&logged)),
        "no {logged:?} in:\n{}",
        proxy.logs().join("\n")
    );
    let idle = {
        thread::spawn(move || {
            (0..IDLE)
                .map(|_| {
                    let s = connect(admin);
                    s.set_nonblocking(true).unwrap();
                    s
                })
                .collect::<Vec<_>>()
        })
    };
    let (probes, slowest) =
        probe_throughout(admin, Duration::from_secs(1), || idle.is_finished(), || {});
    let mut idle = idle.join().unwrap();
    // The endpoint keeps at most its bound of them.
    let mut open = vec![true; IDLE];
    wait_until(T, "the endpoint holds at most its bound", || {
        for (s, open) in idle.iter_mut().zip(open.iter_mut()) {
            if *open {
                let mut b = [0u8; 1];
                *open = matches!(s.read(&mut b), Err(e) if e.kind() == ErrorKind::WouldBlock);
            }
        }
        open.iter().filter(|&&o| o).count() <= MAX_CONNECTIONS
    });
    // While they are held: more probes, and relays through the proxy.
    let (more, slowest_held) = probe_throughout(admin, Duration::from_millis(500), || true, || {});
    // Every relay the cap allows, held at once.
    let mut relays: Vec<TcpStream> = (0..relay_cap).map(|_| connect(proxy.addr)).collect();
    for round in 0..2u8 {
        for (i, r) in relays.iter_mut().enumerate() {
            round_trip(r, format!("relay {i} round {round}").as_bytes(), T);
        }
    }
    let (after, slowest_relays) =
        probe_throughout(admin, Duration::from_millis(200), || true, || {});
    eprintln!(
        "idle: {} of {IDLE} still open; {} probes, slowest {:?}; {relay_cap} relays held; {} fds of 256 in use",
        open.iter().filter(|&&o| o).count(),
        probes + more + after,
        slowest.max(slowest_held).max(slowest_relays),
        proxy.fd_count()
    );
    let logs = proxy.logs().join("\n");
    assert!(
        !logs.contains("Too many open files") && !logs.contains("EMFILE"),
        "the proxy ran out of fds:\n{logs}"
    );
    drop(relays);
    drop(idle);
}

// ---------------------------------------------------------------------------
// Bad requests.

#[test]
fn an_oversized_request_head_gets_431_and_is_closed() {
    let upstream = echo_server();
    let (_proxy, admin) = start(None, upstream.addr);
    let mut request = b"GET /livez HTTP/1.1\r\nHost: a\r\nX-Big: ".to_vec();
    request.resize(MAX_HEAD_BYTES + 1024, b'a');
    request.extend_from_slice(b"\r\n\r\n");
    let (status, text, ending) = exchange(admin, &request);
    assert_eq!(status, 431, "{text}");
    assert!(text.contains("Connection: close\r\n"), "{text}");
    // The rest of the head was read and dropped: a clean close, no reset
    // under the answer.
    assert_eq!(ending, Ending::Eof);
    // A head just under the bound is served.
    let mut fits = b"GET /livez HTTP/1.1\r\nConnection: close\r\nX-Big: ".to_vec();
    fits.resize(MAX_HEAD_BYTES - 4, b'a');
    fits.extend_from_slice(b"\r\n\r\n");
    assert_eq!(exchange(admin, &fits).0, 200);
}

#[test]
fn too_many_header_lines_get_431_and_close() {
    let upstream = echo_server();
    let (_proxy, admin) = start(None, upstream.addr);
    let request = |lines: usize| {
        let mut r = b"GET /livez HTTP/1.1\r\n".to_vec();
        for i in 0..lines {
            r.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        r.extend_from_slice(b"\r\n");
        r
    };
    let (status, text, ending) = exchange(admin, &request(MAX_HEADERS + 1));
    assert_eq!(status, 431, "{text}");
    assert_eq!(ending, Ending::Eof);
    // Exactly the bound is fine (HTTP/1.1 keeps the connection: half-close
    // ours so that the endpoint closes after the answer).
    let mut s = connect(admin);
    s.write_all(&request(MAX_HEADERS)).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let (bytes, _) = read_until_closed(&mut s, T);
    assert!(bytes.starts_with(b"HTTP/1.1 200 "), "{bytes:?}");
}

#[test]
fn a_malformed_request_gets_400_and_close() {
    let upstream = echo_server();
    let (_proxy, admin) = start(None, upstream.addr);
    for garbage in [
        &b"NOT HTTP AT ALL\r\n\r\n"[..],
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
        b"GET /livez HTTP/1.1\r\nContent-Length: lots\r\n\r\n",
    ] {
        let (status, text, ending) = exchange(admin, garbage);
        assert_eq!(status, 400, "{garbage:?}: {text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert_eq!(ending, Ending::Eof, "{garbage:?}");
    }
    assert_eq!(timed_get(admin, "/livez").0, 200);
}

/// Pipelined requests are answered in order on one connection.
#[test]
fn pipelined_requests_are_answered_in_order() {
    let upstream = echo_server();
    let (_proxy, admin) = start(None, upstream.addr);
    let (_, text, ending) = exchange(
        admin,
        b"GET /livez HTTP/1.1\r\n\r\nHEAD /metrics HTTP/1.1\r\n\r\nPOST /livez HTTP/1.1\r\n\r\nGET /nothing HTTP/1.1\r\nConnection: close\r\n\r\n",
    );
    let statuses: Vec<&str> = text.split("HTTP/1.1 ").skip(1).map(|a| &a[..3]).collect();
    assert_eq!(statuses, ["200", "200", "405", "404"], "{text}");
    assert!(text.contains("Allow: GET, HEAD\r\n"), "{text}");
    assert_eq!(ending, Ending::Eof);
}

/// A client that connects and says nothing is closed at the request
/// deadline.
#[test]
fn a_silent_client_is_closed_at_the_request_deadline() {
    let upstream = echo_server();
    let (_proxy, admin) = start(None, upstream.addr);
    let mut s = connect(admin);
    s.write_all(b"GET /livez HTTP/1.1\r\n").unwrap();
    let (ending, took) = expect_closed(&mut s, REQUEST_TIMEOUT + Duration::from_secs(3));
    assert_eq!(ending, Ending::Eof);
    assert!(
        took >= REQUEST_TIMEOUT - Duration::from_millis(100),
        "closed after {took:?}"
    );
}
