//! How relays end, both engines: a cut stream is never a clean end. Urgent
//! data, deadlines and drains with bytes in flight, a drain deadline that
//! cuts a peer still sending (a reset, even with nothing in flight) and
//! spares a side whose peer finished, the FIN timeout counted from the FIN,
//! upstreams that reset right after accepting, clients that reset while the
//! upstream connect is in flight, and relay slots reused within one event
//! batch.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{mpsc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use socket2::SockRef;
use spliced::{CloseReason, Mode};

both_engines!(
    urgent_data_moves_every_normal_byte,
    idle_timeout_with_bytes_in_flight_resets_the_reader,
    fin_timeout_with_bytes_in_flight_resets_the_reader,
    drain_deadline_with_bytes_in_flight_resets_the_reader,
    drain_deadline_with_a_still_sending_upstream_resets_both_sides,
    drain_deadline_with_a_still_sending_client_resets_the_upstream,
    drain_deadline_spares_a_side_whose_peer_finished,
    idle_timeout_with_nothing_in_flight_closes_both_sides_with_fins,
    fin_timeout_counts_from_the_client_fin,
    fin_timeout_counts_from_the_upstream_fin,
    upstream_reset_right_after_accept_is_a_reset,
    a_server_that_accepted_is_never_failed_over,
    client_reset_during_connect_ends_the_relay,
    closed_relays_leave_no_timer_entries_behind,
);

const BIG: usize = 16 * MIB;

fn urgent_data_moves_every_normal_byte(mode: Mode) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let up = serve(move |mut s: TcpStream| {
        let got = read_to_eof(&mut s, Duration::from_secs(10));
        tx.lock()
            .unwrap()
            .send(got.map_err(|e| e.to_string()))
            .unwrap();
    });
    let h = proxy(mode, vec![up.addr], |_| {});

    let before = pattern(1, 1000);
    let after = pattern(2, 1000);
    let mut client = connect(h.local_addr());
    client.write_all(&before).unwrap();
    let sent = SockRef::from(&client).send_out_of_band(b"!").unwrap();
    assert_eq!(sent, 1);
    client.write_all(&after).unwrap();
    client.shutdown(Shutdown::Write).unwrap();

    let got = rx
        .recv_timeout(Duration::from_secs(15))
        .unwrap()
        .unwrap_or_else(|e| panic!("the upstream never saw EOF: {e}"));
    let normal: Vec<u8> = [before, after].concat();
    assert_eq!(
        got.len(),
        normal.len(),
        "normal bytes lost or urgent byte inlined"
    );
    assert!(got == normal, "the bytes differ");
    let (ending, _) = expect_closed(&mut client, Duration::from_secs(5));
    assert_eq!(ending, Ending::Eof);
    assert_quiescent(&h, mode);
}

/// An upstream that writes `BIG` bytes and then waits for the client's EOF,
/// never closing first.
fn firehose_then_wait() -> Server {
    serve(|mut s: TcpStream| {
        let mut w = s.try_clone().unwrap();
        let _ = send_stream(&mut w, 7, BIG, 256 * 1024, None);
        let mut sink = [0u8; 1024];
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    })
}

/// The client stops reading, the relay ends with bytes in flight towards
/// it: once it reads again it must find a reset, never a clean end.
fn assert_cut_is_a_reset(client: &mut TcpStream) {
    let (got, ending) = read_until_closed(client, Duration::from_secs(10));
    assert!(
        got.len() < BIG,
        "the whole stream arrived; the test proves nothing"
    );
    assert_eq!(
        ending,
        Ending::Reset,
        "a cut stream ({} of {BIG} bytes) ended with a clean EOF",
        got.len()
    );
}

fn idle_timeout_with_bytes_in_flight_resets_the_reader(mode: Mode) {
    let up = firehose_then_wait();
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].timeouts.idle = Some(Duration::from_millis(300))
    });
    let mut client = connect(h.local_addr());
    client.write_all(b"go").unwrap();
    // The client reads nothing until the relay has been closed for idling.
    wait_stats(&h, Duration::from_secs(10), "idle close", |s| {
        s.closed(CloseReason::Idle) == 1
    });
    assert_cut_is_a_reset(&mut client);
    assert_quiescent(&h, mode);
}

fn fin_timeout_with_bytes_in_flight_resets_the_reader(mode: Mode) {
    let up = firehose_then_wait();
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].timeouts.idle = Some(Duration::from_secs(30));
        c.listeners[0].timeouts.fin = Some(Duration::from_millis(300));
    });
    let mut client = connect(h.local_addr());
    client.write_all(b"go").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    wait_stats(&h, Duration::from_secs(10), "FIN-timeout close", |s| {
        s.closed(CloseReason::FinTimeout) == 1
    });
    assert_cut_is_a_reset(&mut client);
    assert_quiescent(&h, mode);
}

fn drain_deadline_with_bytes_in_flight_resets_the_reader(mode: Mode) {
    let up = firehose_then_wait();
    let h = proxy(mode, vec![up.addr], |c| {
        c.drain_timeout = Some(Duration::from_millis(300))
    });
    let mut client = connect(h.local_addr());
    client.write_all(b"go").unwrap();
    wait_stats(&h, Duration::from_secs(10), "bytes flowing", |s| {
        s.bytes_spliced + s.bytes_copied > 0
    });
    h.shutdown();
    wait_until(Duration::from_secs(10), "the drain to end", || {
        h.is_finished()
    });
    assert_eq!(h.stats().closed(CloseReason::Shutdown), 1);
    assert_cut_is_a_reset(&mut client);
}

/// Writes 4 KiB every 20 ms until a write fails; returns how it failed.
fn send_until_cut(mut w: TcpStream) -> std::io::ErrorKind {
    let chunk = pattern(11, 4096);
    loop {
        if let Err(e) = w.write_all(&chunk) {
            return e.kind();
        }
        pace(Duration::from_millis(20));
    }
}

/// A write failed because the proxy reset the connection (ECONNRESET, or
/// EPIPE once an earlier call took the reset).
fn assert_write_cut_by_reset(kind: std::io::ErrorKind, who: &str) {
    assert!(
        matches!(
            kind,
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "the {who}'s writes ended with {kind:?}, not a reset"
    );
}

/// A proxy with a 300 ms drain timeout; `tweak` adjusts the rest.
fn draining_proxy(mode: Mode, up: &Server) -> spliced::ProxyHandle {
    proxy(mode, vec![up.addr], |c| {
        c.drain_timeout = Some(Duration::from_millis(300));
        c.listeners[0].timeouts.idle = Some(Duration::from_secs(30));
        c.listeners[0].timeouts.fin = Some(Duration::from_secs(30));
    })
}

/// Shuts the proxy down and waits for the drain deadline to cut the relay.
fn cut_by_the_drain_deadline(h: &spliced::ProxyHandle) {
    h.shutdown();
    wait_until(Duration::from_secs(10), "the drain to end", || {
        h.is_finished()
    });
    assert_eq!(h.stats().closed(CloseReason::Shutdown), 1);
}

/// The upstream never finishes; the client reads everything, so at the
/// deadline little or nothing is in flight. Neither peer sent FIN: both
/// must see a reset, never the EOF of an upstream that did not close.
fn drain_deadline_with_a_still_sending_upstream_resets_both_sides(mode: Mode) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let up = serve(move |s: TcpStream| {
        let kind = send_until_cut(s);
        tx.lock().unwrap().send(kind).unwrap();
    });
    let h = draining_proxy(mode, &up);
    let mut client = connect(h.local_addr());
    read_exact_within(&mut client, 16 * 1024, Duration::from_secs(10)).unwrap();
    cut_by_the_drain_deadline(&h);
    let (_, ending) = read_until_closed(&mut client, Duration::from_secs(10));
    assert_eq!(ending, Ending::Reset, "the client read a clean EOF");
    let kind = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_write_cut_by_reset(kind, "upstream");
}

/// The same the other way: the client never finishes sending.
fn drain_deadline_with_a_still_sending_client_resets_the_upstream(mode: Mode) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let up = serve(move |mut s: TcpStream| {
        let (got, ending) = read_until_closed(&mut s, Duration::from_secs(20));
        tx.lock().unwrap().send((got.len(), ending)).unwrap();
    });
    let h = draining_proxy(mode, &up);
    let client = connect(h.local_addr());
    let writer = {
        let w = client.try_clone().unwrap();
        thread::spawn(move || send_until_cut(w))
    };
    wait_stats(&h, Duration::from_secs(10), "bytes flowing", |s| {
        s.bytes_spliced + s.bytes_copied >= 16 * 1024
    });
    cut_by_the_drain_deadline(&h);
    let (got, ending) = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert!(got >= 16 * 1024, "only {got} bytes reached the upstream");
    assert_eq!(ending, Ending::Reset, "the upstream read a clean EOF");
    assert_write_cut_by_reset(writer.join().unwrap(), "client");
}

/// The upstream answered and sent FIN, and the client read every byte and
/// the EOF; the client never sent FIN. At the deadline the client keeps its
/// clean EOF (its peer really closed), while the upstream, whose peer did
/// not, is reset.
fn drain_deadline_spares_a_side_whose_peer_finished(mode: Mode) {
    let reply = pattern(12, 300_000);
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let answer = reply.clone();
    let up = serve(move |mut s: TcpStream| {
        let request = read_exact_within(&mut s, 7, Duration::from_secs(10)).unwrap();
        assert_eq!(request, b"request");
        s.write_all(&answer).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let (_, ending) = read_until_closed(&mut s, Duration::from_secs(20));
        tx.lock().unwrap().send(ending).unwrap();
    });
    let h = draining_proxy(mode, &up);
    let mut client = connect(h.local_addr());
    client.write_all(b"request").unwrap();
    let got = read_to_eof(&mut client, Duration::from_secs(10)).unwrap();
    assert!(got == reply, "the reply differs ({} bytes)", got.len());
    cut_by_the_drain_deadline(&h);
    let ending = rx.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(ending, Ending::Reset, "the upstream read a clean EOF");
    // The client's socket was closed before the upstream's, whose reset has
    // arrived: so would one sent to the client. A client that already read
    // EOF still reads EOF after a reset (Linux notes it as a pending EPIPE
    // in CLOSE_WAIT), so the pending error is what tells them apart.
    let (ending, _) = expect_closed(&mut client, Duration::from_secs(5));
    assert_eq!(ending, Ending::Eof);
    let pending = client.take_error().unwrap();
    assert!(
        pending.is_none(),
        "a client with every byte and the FIN was reset: {pending:?}"
    );
}

/// An inactivity close keeps the old rule: with nothing in flight both
/// sides get a FIN (the idle timeout with bytes in flight is above).
fn idle_timeout_with_nothing_in_flight_closes_both_sides_with_fins(mode: Mode) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let up = serve(move |mut s: TcpStream| {
        let request = read_exact_within(&mut s, 4, Duration::from_secs(10)).unwrap();
        s.write_all(&request).unwrap();
        let (_, ending) = read_until_closed(&mut s, Duration::from_secs(20));
        tx.lock().unwrap().send(ending).unwrap();
    });
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].timeouts.idle = Some(Duration::from_millis(300))
    });
    let mut client = connect(h.local_addr());
    round_trip(&mut client, b"ping", Duration::from_secs(5));
    let (ending, _) = expect_closed(&mut client, Duration::from_secs(10));
    assert_eq!(ending, Ending::Eof, "an idle client was reset");
    let ending = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    assert_eq!(ending, Ending::Eof, "an idle upstream was reset");
    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::Idle), 1, "{s:#?}");
}

const QUIET: Duration = Duration::from_millis(1000);
const FIN: Duration = Duration::from_millis(500);
const LATE_ANSWER: Duration = Duration::from_millis(250);

fn fin_timeout_counts_from_the_client_fin(mode: Mode) {
    let up = serve(|mut s: TcpStream| {
        let request = read_to_eof(&mut s, Duration::from_secs(10)).unwrap();
        assert_eq!(request, b"request");
        // The answer comes a little after the client's FIN, well inside the
        // FIN timeout counted from that FIN.
        pace(LATE_ANSWER);
        let _ = s.write_all(b"answer");
    });
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].timeouts.idle = Some(Duration::from_secs(30));
        c.listeners[0].timeouts.fin = Some(FIN);
    });
    let mut client = connect(h.local_addr());
    client.write_all(b"request").unwrap();
    pace(QUIET);
    client.shutdown(Shutdown::Write).unwrap();
    let answer = read_to_eof(&mut client, Duration::from_secs(5)).unwrap();
    assert_eq!(answer, b"answer", "the answer after the FIN was lost");
    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::Eof), 1, "{s:#?}");
}

fn fin_timeout_counts_from_the_upstream_fin(mode: Mode) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let up = serve(move |mut s: TcpStream| {
        let request = read_exact_within(&mut s, 7, Duration::from_secs(10)).unwrap();
        assert_eq!(request, b"request");
        pace(QUIET);
        s.shutdown(Shutdown::Write).unwrap();
        let late = read_to_eof(&mut s, Duration::from_secs(10)).map_err(|e| e.to_string());
        tx.lock().unwrap().send(late).unwrap();
    });
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].timeouts.idle = Some(Duration::from_secs(30));
        c.listeners[0].timeouts.fin = Some(FIN);
    });
    let mut client = connect(h.local_addr());
    client.write_all(b"request").unwrap();
    let nothing = read_to_eof(&mut client, Duration::from_secs(5)).unwrap();
    assert!(nothing.is_empty());
    pace(LATE_ANSWER);
    client.write_all(b"late words").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let late = rx.recv_timeout(Duration::from_secs(10)).unwrap().unwrap();
    assert_eq!(
        late, b"late words",
        "bytes after the upstream's FIN were lost"
    );
    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::Eof), 1, "{s:#?}");
}

/// Accepts, greets, and resets at once.
fn greet_and_reset() -> Server {
    serve(|s: TcpStream| {
        let _ = (&s).write_all(b"hello");
        set_linger_zero(&s);
    })
}

const CLIENTS: usize = 200;

/// Connects `CLIENTS` clients at once; returns how each connection ended.
fn many_clients(addr: std::net::SocketAddr) -> Vec<(Vec<u8>, Ending)> {
    let threads: Vec<_> = (0..CLIENTS)
        .map(|_| {
            thread::spawn(move || {
                // The proxy may reset before a timed connect has looked at
                // the socket's error: that is the reset the test expects.
                match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                    Ok(mut c) => read_until_closed(&mut c, Duration::from_secs(10)),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                        (Vec::new(), Ending::Reset)
                    }
                    Err(e) => panic!("connect to {addr}: {e}"),
                }
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

fn upstream_reset_right_after_accept_is_a_reset(mode: Mode) {
    let up = greet_and_reset();
    let h = proxy(mode, vec![up.addr], |_| {});
    let endings = many_clients(h.local_addr());
    let clean = endings.iter().filter(|(_, e)| *e == Ending::Eof).count();
    assert_eq!(clean, 0, "{clean} of {CLIENTS} clients saw a clean EOF");
    let s = assert_quiescent(&h, mode);
    assert_eq!(
        s.closed(CloseReason::UpstreamReset),
        CLIENTS as u64,
        "{s:#?}"
    );
    assert_eq!(s.closed(CloseReason::ConnectFailed), 0, "{s:#?}");
}

fn a_server_that_accepted_is_never_failed_over(mode: Mode) {
    let resetting = greet_and_reset();
    let polite = serve(|s: TcpStream| {
        let _ = (&s).write_all(b"polite");
    });
    let h = proxy(mode, vec![resetting.addr, polite.addr], |_| {});
    let endings = many_clients(h.local_addr());
    // Each connection reaches one server: the first it tried.
    wait_until(Duration::from_secs(5), "all accepts counted", || {
        resetting.accepted() + polite.accepted() >= CLIENTS
    });
    let s = assert_quiescent(&h, mode);
    assert_eq!(
        resetting.accepted() + polite.accepted(),
        CLIENTS,
        "a connection was failed over after a server accepted it: {s:#?}"
    );
    let resets = endings.iter().filter(|(_, e)| *e == Ending::Reset).count();
    assert_eq!(resets, resetting.accepted(), "{s:#?}");
    assert_eq!(
        s.closed(CloseReason::UpstreamReset),
        resets as u64,
        "{s:#?}"
    );
}

fn client_reset_during_connect_ends_the_relay(mode: Mode) {
    let _serial = serial();
    let (_l, _filler, hole) = black_hole();
    let h = proxy(mode, vec![hole], |c| {
        c.listeners[0].timeouts.connect = Some(Duration::from_secs(20))
    });
    let client = connect(h.local_addr());
    wait_stats(&h, Duration::from_secs(5), "the relay to start", |s| {
        s.relays_active == 1
    });
    set_linger_zero(&client);
    drop(client);
    let started = Instant::now();
    wait_stats(&h, Duration::from_secs(5), "the relay to end", |s| {
        s.closed(CloseReason::ClientReset) == 1
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_quiescent(&h, mode);
}

fn closed_relays_leave_no_timer_entries_behind(mode: Mode) {
    let up = echo_server();
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].timeouts.idle = Some(Duration::from_secs(3600))
    });
    const RELAYS: usize = 3000;
    let addr = h.local_addr();
    let workers: Vec<_> = (0..4)
        .map(|w| {
            thread::spawn(move || {
                for i in 0..RELAYS / 4 {
                    let mut c = connect(addr);
                    round_trip(
                        &mut c,
                        &pattern((w * RELAYS + i) as u64, 16),
                        Duration::from_secs(5),
                    );
                    c.shutdown(Shutdown::Write).unwrap();
                    read_to_eof(&mut c, Duration::from_secs(5)).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::Eof), RELAYS as u64);
    assert!(
        s.timer_entries <= 1024,
        "{} timer entries left for {} live relays after {RELAYS} closed",
        s.timer_entries,
        s.relays_active
    );
}

/// A relay slot freed and reused within one event batch must not hand the
/// old relay's queued work to the new one. One worker serves two listeners:
/// behind the first, firehose relays that are always out of budget (on the
/// ready list) and whose clients reset; behind the second, clients whose
/// first upstream is black-holed and which half-close at once. Those must
/// always be failed over to the echo server after the connect timeout,
/// never pumped while connecting (which forwards their FIN as a shutdown of
/// a socket that is still connecting, aborting it).
#[test]
fn reused_relay_slots_never_pump_a_connecting_relay() {
    let _serial = serial();
    for mode in [Mode::Splice, Mode::Copy, Mode::Auto] {
        let firehose = serve(|s: TcpStream| {
            let mut w = s;
            let _ = send_stream(&mut w, 9, 1 << 40, 64 * 1024, None);
        });
        let echo = echo_server();
        let (_l, _filler, hole) = black_hole();
        let h = proxy(mode, vec![firehose.addr], |c| {
            let mut second = c.listeners[0].clone();
            second.name = "failover".into();
            second.set_upstreams(&[hole, echo.addr]);
            second.timeouts.connect = Some(Duration::from_millis(200));
            c.listeners.push(second);
        });
        let (busy, failover) = (h.local_addrs()[0], h.local_addrs()[1]);
        let mut failures = Vec::new();
        for round in 0..20 {
            let readers: Vec<_> = (0..4)
                .map(|_| {
                    thread::spawn(move || {
                        let mut c = connect(busy);
                        let _ = read_exact_within(&mut c, 256 * 1024, Duration::from_secs(10));
                        set_linger_zero(&c);
                    })
                })
                .collect();
            let clients: Vec<_> = (0..8)
                .map(|i| {
                    thread::spawn(move || {
                        let mut c = connect(failover);
                        // Half of them send nothing before their FIN.
                        let msg = pattern(i, 64 * (i as usize % 2));
                        c.write_all(&msg).unwrap();
                        c.shutdown(Shutdown::Write).unwrap();
                        let (got, ending) = read_until_closed(&mut c, Duration::from_secs(10));
                        (got == msg && ending == Ending::Eof)
                            .then_some(())
                            .ok_or(ending)
                    })
                })
                .collect();
            for r in readers {
                r.join().unwrap();
            }
            for c in clients {
                if let Err(ending) = c.join().unwrap() {
                    failures.push((round, ending));
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{mode}: clients not failed over: {failures:?}; {:#?}",
            h.stats()
        );
        assert_quiescent(&h, mode);
    }
}
