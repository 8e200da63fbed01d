//! Idle, FIN and connect timeouts, both engines. These tests measure time, so
//! each holds the binary-wide `serial()` lock.

#[macro_use]
mod common;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use spliced::{CloseReason, Mode, ProxyHandle};

both_engines!(
    idle_timeout_closes_silent_relay,
    client_trickle_survives_idle_timeout,
    upstream_trickle_survives_idle_timeout,
    fin_timeout_closes_half_closed_relay,
    connect_timeout_closes_client,
    connect_timeout_moves_to_next_upstream,
);

const IDLE: Duration = Duration::from_millis(400);
/// The idle timeout of the trickle tests: a byte every half of it leaves
/// 300 ms of slack for scheduling on a loaded machine.
const TRICKLE_IDLE: Duration = Duration::from_millis(600);
const FIN: Duration = Duration::from_millis(400);
const CONNECT: Duration = Duration::from_millis(300);
/// How late a deadline may fire: the proxy checks with ~10 ms resolution, the
/// rest is scheduling on a shared 2-core machine.
const LATE: Duration = Duration::from_millis(400);
/// How early it may seem to fire (our clock starts slightly after the proxy's).
const EARLY: Duration = Duration::from_millis(50);

/// Checks that `what` closed the relay `took` after the last activity, given
/// its `limit`; `h`'s stats and the client's view are shown on failure.
fn assert_fired(what: &str, took: Duration, limit: Duration, ending: Ending, h: &ProxyHandle) {
    assert!(
        took + EARLY >= limit,
        "{what}: the client saw {ending:?} after {took:?}, before the {limit:?} limit; stats: {:#?}",
        h.stats()
    );
    assert!(
        took <= limit + LATE,
        "{what}: the client saw {ending:?} after {took:?}, limit {limit:?} + margin {LATE:?}; stats: {:#?}",
        h.stats()
    );
}

fn idle_timeout_closes_silent_relay(mode: Mode) {
    let _serial = serial();
    let up = echo_server();
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].timeouts.idle = Some(IDLE)
    });

    let mut client = connect(h.local_addr());
    round_trip(&mut client, b"last bytes to move", Duration::from_secs(5));
    // From now on nothing moves either way.
    let (ending, took) = expect_closed(&mut client, IDLE * 5);
    assert_fired("idle timeout", took, IDLE, ending, &h);

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::Idle), 1, "{s:#?}");
}

fn client_trickle_survives_idle_timeout(mode: Mode) {
    let _serial = serial();
    const BYTES: usize = 10; // one per TRICKLE_IDLE/2: 5 idle timeouts' worth
    let (tx, upstream_saw) = mpsc::channel();
    let up = serve(move |mut s: TcpStream| {
        let got = read_to_eof(&mut s, Duration::from_secs(20)).unwrap_or_default();
        s.shutdown(Shutdown::Write).unwrap();
        tx.send(got).unwrap();
    });
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].timeouts.idle = Some(TRICKLE_IDLE)
    });

    let mut client = connect(h.local_addr());
    let data = pattern(7, BYTES);
    let started = Instant::now();
    let mut last = started;
    let mut longest_gap = Duration::ZERO;
    for (i, b) in data.iter().enumerate() {
        let now = Instant::now();
        longest_gap = longest_gap.max(now - last);
        last = now;
        if let Err(e) = client.write_all(std::slice::from_ref(b)) {
            panic!(
                "relay closed while trickling: write {i} at {:?} failed ({e}); longest gap \
                 between writes so far {longest_gap:?} (idle timeout {TRICKLE_IDLE:?}); stats: {:#?}",
                started.elapsed(),
                h.stats()
            );
        }
        pace(TRICKLE_IDLE / 2);
    }
    client.shutdown(Shutdown::Write).unwrap();
    let got = upstream_saw.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(got, data, "the trickled bytes did not all arrive");
    let rest = read_to_eof(&mut client, Duration::from_secs(5)).expect("client EOF");
    assert!(rest.is_empty());

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::Idle), 0, "{s:#?}");
    assert_eq!(s.closed(CloseReason::Eof), 1, "{s:#?}");
}

fn upstream_trickle_survives_idle_timeout(mode: Mode) {
    let _serial = serial();
    const BYTES: usize = 10;
    let up = serve(|mut s: TcpStream| {
        for b in pattern(8, BYTES) {
            if s.write_all(&[b]).is_err() {
                return;
            }
            pace(TRICKLE_IDLE / 2);
        }
        s.shutdown(Shutdown::Write).unwrap();
        let _ = read_to_eof(&mut s, Duration::from_secs(10));
    });
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].timeouts.idle = Some(TRICKLE_IDLE)
    });

    // The client sends nothing: only the upstream→client direction moves.
    let mut client = connect(h.local_addr());
    let got = read_to_eof(&mut client, Duration::from_secs(20)).unwrap_or_else(|e| {
        panic!(
            "relay closed (or stalled) while the upstream trickled: {e}; stats: {:#?}",
            h.stats()
        )
    });
    assert_eq!(
        got,
        pattern(8, BYTES),
        "the trickle was cut short; stats: {:#?}",
        h.stats()
    );
    client.shutdown(Shutdown::Write).unwrap();

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::Idle), 0, "{s:#?}");
    assert_eq!(s.closed(CloseReason::Eof), 1, "{s:#?}");
}

fn fin_timeout_closes_half_closed_relay(mode: Mode) {
    let _serial = serial();
    let (req_tx, upstream_request) = mpsc::channel();
    let (probe_tx, probe_rx) = mpsc::channel::<()>();
    let probe_rx = std::sync::Mutex::new(probe_rx);
    let (tx, upstream_saw) = mpsc::channel();
    let up = serve(move |mut s: TcpStream| {
        let request = read_to_eof(&mut s, Duration::from_secs(10)).unwrap();
        req_tx.send(request).unwrap();
        // Never answer, never close: only the proxy can end this. Once the
        // test says so, check that the proxy closed its side: writes to a
        // closed socket are answered by a reset.
        let _ = probe_rx
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10));
        let started = Instant::now();
        let outcome = loop {
            if let Err(e) = s.write_all(b"x") {
                break Ok(e.kind());
            }
            if started.elapsed() > Duration::from_secs(3) {
                break Err("the upstream can still write 3 s after the relay closed");
            }
            pace(Duration::from_millis(10));
        };
        tx.send(outcome).unwrap();
    });
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].timeouts.idle = Some(Duration::from_secs(30));
        c.listeners[0].timeouts.fin = Some(FIN);
    });

    let mut client = connect(h.local_addr());
    client.write_all(b"request").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (ending, took) = expect_closed(&mut client, Duration::from_secs(5));
    assert_fired("fin timeout", took, FIN, ending, &h);
    let request = upstream_request
        .recv_timeout(Duration::from_secs(5))
        .unwrap();
    assert_eq!(request, b"request");

    probe_tx.send(()).unwrap();
    let outcome = upstream_saw.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(outcome.is_ok(), "{}", outcome.unwrap_err());

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::FinTimeout), 1, "{s:#?}");
}

fn connect_timeout_closes_client(mode: Mode) {
    let _serial = serial();
    let (_l, _filler, hole) = black_hole();
    let h = proxy(mode, vec![hole], |c| {
        c.listeners[0].timeouts.connect = Some(CONNECT)
    });

    let started = Instant::now();
    let mut client = connect(h.local_addr());
    let (ending, _) = expect_closed(&mut client, Duration::from_secs(5));
    assert_fired("connect timeout", started.elapsed(), CONNECT, ending, &h);

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::ConnectFailed), 1, "{s:#?}");
    assert!(s.upstream_connect_failures >= 1, "{s:#?}");
}

fn connect_timeout_moves_to_next_upstream(mode: Mode) {
    let _serial = serial();
    let (_l, _filler, hole) = black_hole();
    let up = echo_server();
    let h = proxy(mode, vec![hole, up.addr], |c| {
        c.listeners[0].timeouts.connect = Some(CONNECT)
    });

    for i in 0..2u64 {
        let mut client = connect(h.local_addr());
        round_trip(
            &mut client,
            &pattern(i, 1000),
            CONNECT + Duration::from_secs(3),
        );
        client.shutdown(Shutdown::Write).unwrap();
        read_to_eof(&mut client, Duration::from_secs(5)).unwrap();
    }

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::Eof), 2, "{s:#?}");
    assert!(
        s.upstream_connect_failures >= 1,
        "round-robin never tried the black hole: {s:#?}"
    );
}
