//! Byte-exact relaying through the in-process proxy, both engines: bulk both
//! ways at once, half-close in either order, and the pipe pool afterwards.

#[macro_use]
mod common;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use spliced::{CloseReason, Mode};

both_engines!(
    bulk_64mib_both_ways,
    client_half_closes_then_trickled_reply,
    upstream_half_closes_first_client_keeps_sending,
    pipes_return_to_the_pool,
    each_listener_counts_its_own_relays,
);

const BULK: usize = 64 * MIB;
const CLIENT_SEED: u64 = 0xC11E;
const UPSTREAM_SEED: u64 = 0x5EED;

/// An upstream that, on each connection, sends its own `len`-byte stream and
/// at the same time reads the client's to EOF; it reports what it received.
/// The two streams are independent, so a direction mix-up cannot pass.
fn two_stream_upstream(len: usize, seed: u64) -> (Server, mpsc::Receiver<Digested>) {
    let (tx, rx) = mpsc::channel();
    let server = serve(move |mut s: TcpStream| {
        let mut w = s.try_clone().unwrap();
        let writer = thread::spawn(move || {
            send_stream(&mut w, seed, len, 128 * 1024, None).expect("upstream send");
            w.shutdown(Shutdown::Write).expect("upstream half-close");
        });
        let got = digest_to_eof(&mut s, Duration::from_secs(60)).expect("upstream receive");
        writer.join().unwrap();
        tx.send(got).unwrap();
    });
    (server, rx)
}

fn bulk_64mib_both_ways(mode: Mode) {
    let (up, received) = two_stream_upstream(BULK, UPSTREAM_SEED);
    let h = proxy(mode, vec![up.addr], |_| {});

    let mut client = connect(h.local_addr());
    let mut w = client.try_clone().unwrap();
    let started = Instant::now();
    let writer = thread::spawn(move || {
        let sent = send_stream(&mut w, CLIENT_SEED, BULK, 128 * 1024, None).expect("client send");
        w.shutdown(Shutdown::Write).expect("client half-close");
        sent
    });
    let client_got = digest_to_eof(&mut client, Duration::from_secs(60)).expect("client receive");
    let client_sent = writer.join().unwrap();
    let upstream_got = received
        .recv_timeout(Duration::from_secs(60))
        .expect("upstream finished");
    eprintln!("{mode}: 2 x 64 MiB in {:?}", started.elapsed());

    assert_eq!(upstream_got, client_sent, "client→upstream stream differs");
    assert_eq!(
        client_got,
        expected_digest(UPSTREAM_SEED, BULK),
        "upstream→client stream differs"
    );

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.relays_accepted, 1);
    assert_eq!(s.closed(CloseReason::Eof), 1, "{s:#?}");
    assert_eq!(
        s.bytes_spliced + s.bytes_copied,
        2 * BULK as u64,
        "byte counters: {s:#?}"
    );
    if mode == Mode::Splice {
        assert!(s.bytes_spliced > 0, "splice mode spliced nothing: {s:#?}");
    }
}

fn client_half_closes_then_trickled_reply(mode: Mode) {
    const REQUEST: usize = 256 * 1024;
    const REPLY: usize = MIB;
    const STEPS: usize = 40; // 40 x 50 ms ≈ 2 s
    let (tx, upstream_saw) = mpsc::channel();
    let up = serve(move |mut s: TcpStream| {
        // The reply starts only once the client's EOF has arrived: if the
        // proxy held the FIN back, this would never start.
        let request = read_to_eof(&mut s, Duration::from_secs(10)).expect("upstream: request");
        let reply = pattern(UPSTREAM_SEED, REPLY);
        for chunk in reply.chunks(REPLY / STEPS + 1) {
            s.write_all(chunk).expect("upstream: trickle");
            pace(Duration::from_millis(50));
        }
        s.shutdown(Shutdown::Write).unwrap();
        tx.send(request).unwrap();
    });
    let h = proxy(mode, vec![up.addr], |_| {});

    let mut client = connect(h.local_addr());
    let request = pattern(CLIENT_SEED, REQUEST);
    client.write_all(&request).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let started = Instant::now();
    let reply = read_to_eof(&mut client, Duration::from_secs(10)).expect("client: reply to EOF");
    let took = started.elapsed();

    let got_request = upstream_saw.recv_timeout(Duration::from_secs(5)).unwrap();
    assert_eq!(
        got_request.len(),
        REQUEST,
        "upstream saw EOF at the wrong place"
    );
    assert!(got_request == request, "request bytes differ");
    assert_eq!(reply.len(), REPLY, "client saw EOF at the wrong place");
    assert!(reply == pattern(UPSTREAM_SEED, REPLY), "reply bytes differ");
    assert!(
        took >= Duration::from_millis(1500),
        "the reply was trickled over ~2 s but arrived in {took:?}"
    );

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::Eof), 1, "{s:#?}");
}

fn upstream_half_closes_first_client_keeps_sending(mode: Mode) {
    const GREETING: usize = 64 * 1024;
    const UPLOAD: usize = 4 * MIB;
    let (tx, upstream_saw) = mpsc::channel();
    let up = serve(move |mut s: TcpStream| {
        s.write_all(&pattern(UPSTREAM_SEED, GREETING)).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        // Still reading: the client→upstream direction must stay open.
        let got = digest_to_eof(&mut s, Duration::from_secs(20)).expect("upstream: upload");
        tx.send(got).unwrap();
    });
    let h = proxy(mode, vec![up.addr], |_| {});

    let mut client = connect(h.local_addr());
    let greeting = read_to_eof(&mut client, Duration::from_secs(10)).expect("client: greeting");
    assert_eq!(
        greeting.len(),
        GREETING,
        "client saw EOF at the wrong place"
    );
    assert!(
        greeting == pattern(UPSTREAM_SEED, GREETING),
        "greeting differs"
    );

    // The upstream has half-closed; keep sending in paced bursts.
    let mut rng = Prng::new(CLIENT_SEED);
    let mut chunk = vec![0u8; UPLOAD / 16];
    for _ in 0..16 {
        rng.fill(&mut chunk);
        client
            .write_all(&chunk)
            .expect("client: send after upstream EOF");
        pace(Duration::from_millis(20));
    }
    client.shutdown(Shutdown::Write).unwrap();

    let got = upstream_saw.recv_timeout(Duration::from_secs(20)).unwrap();
    assert_eq!(got, expected_digest(CLIENT_SEED, UPLOAD), "upload differs");
    // Nothing more after the EOF the client already saw.
    let more = read_to_eof(&mut client, Duration::from_secs(5)).unwrap();
    assert!(more.is_empty(), "{} bytes after EOF", more.len());

    let s = assert_quiescent(&h, mode);
    assert_eq!(s.closed(CloseReason::Eof), 1, "{s:#?}");
}

fn pipes_return_to_the_pool(mode: Mode) {
    const LEN: usize = 8 * MIB;
    let up = echo_server();
    let h = proxy(mode, vec![up.addr], |_| {});

    for round in 0..5u64 {
        let mut client = connect(h.local_addr());
        let mut w = client.try_clone().unwrap();
        let writer = thread::spawn(move || {
            let d = send_stream(&mut w, round, LEN, 256 * 1024, None).unwrap();
            w.shutdown(Shutdown::Write).unwrap();
            d
        });
        let got = digest_to_eof(&mut client, Duration::from_secs(30)).unwrap();
        let sent = writer.join().unwrap();
        assert_eq!(got, sent, "round {round}: echoed stream differs");

        let s = assert_quiescent(&h, mode);
        assert_eq!(s.closed(CloseReason::Eof), round + 1, "{s:#?}");
        match mode {
            Mode::Splice | Mode::Auto => {
                assert!(s.bytes_spliced > 0, "nothing spliced: {s:#?}");
                if mode == Mode::Auto {
                    // A stream: both directions switch to splice early on.
                    assert!(s.bytes_spliced > 10 * s.bytes_copied, "{s:#?}");
                    assert!(s.engine_switches >= 2 * (round + 1), "{s:#?}");
                }
                // Every pipe ever created is back in the pool (none was
                // closed with bytes in it: the relay ended cleanly).
                let s = wait_stats(&h, Duration::from_secs(5), "every pipe is pooled", |s| {
                    s.pipes_in_use == 0 && s.pipes_idle > 0 && s.pipes_idle == s.pipes_created
                });
                // One worker, one relay at a time, two directions: never
                // more than 2 pipes in use at once, so with pooling no more
                // than 2 are ever created, however many relays run.
                assert!(
                    (1..=2).contains(&s.pipes_created),
                    "round {round}: pooled pipes were not reused: {s:#?}"
                );
            }
            Mode::Copy => {
                assert_eq!(s.pipes_idle, 0, "{s:#?}");
                assert!(s.bytes_copied >= 2 * LEN as u64, "{s:#?}");
            }
        }
    }
}

/// The data generator itself: chunking must not change the stream, or the
/// hash comparisons above would compare different things.
#[test]
fn prng_stream_is_independent_of_chunking() {
    let whole = pattern(42, 10_000);
    let mut rng = Prng::new(42);
    let mut pieces = Vec::new();
    for size in [1usize, 3, 7, 8, 13, 64, 999].iter().cycle() {
        let n = (*size).min(whole.len() - pieces.len());
        if n == 0 {
            break;
        }
        let mut buf = vec![0u8; n];
        rng.fill(&mut buf);
        pieces.extend_from_slice(&buf);
    }
    assert!(pieces == whole, "chunked generation differs");
    assert_ne!(pattern(1, 64), pattern(2, 64), "seeds give the same stream");
    assert_eq!(expected_digest(42, 10_000), digest(&whole));
}

/// Two listeners served by two workers:
/// each counts only the relays, bytes and closes of its own clients, and
/// the proxy's totals are their sum.
fn each_listener_counts_its_own_relays(mode: Mode) {
    let echo = echo_server();
    let h = proxy(mode, vec![echo.addr], |c| {
        c.workers = 2;
        let mut second = c.listeners[0].clone();
        second.name = "second".into();
        c.listeners.push(second);
    });
    let (first, second) = (h.local_addrs()[0], h.local_addrs()[1]);
    let exchange = |addr, len: usize, seed| {
        let mut c = connect(addr);
        let msg = pattern(seed, len);
        c.write_all(&msg).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let (got, ending) = read_until_closed(&mut c, Duration::from_secs(10));
        assert_eq!((got.len(), ending), (len, Ending::Eof));
    };
    exchange(first, 1000, 1);
    for seed in 0..3 {
        exchange(second, 70_000, seed);
    }
    let total = assert_quiescent(&h, mode);
    let per: Vec<_> = h.listener_stats().into_iter().map(|(_, s)| s).collect();
    assert_eq!(per.len(), 2);
    let moved = |s: &spliced::Stats| s.bytes_spliced + s.bytes_copied;
    assert_eq!((per[0].relays_accepted, moved(&per[0])), (1, 2 * 1000));
    assert_eq!(
        (per[1].relays_accepted, moved(&per[1])),
        (3, 3 * 2 * 70_000)
    );
    assert_eq!(per[0].closed(CloseReason::Eof), 1);
    assert_eq!(per[1].closed(CloseReason::Eof), 3);
    assert_eq!(total.relays_accepted, 4);
    assert_eq!(moved(&total), moved(&per[0]) + moved(&per[1]));
    // Pipes and buffers belong to workers, not listeners.
    assert!(per.iter().all(|s| s.pipes_created == 0));
}

/// `auto` copies small request/response messages, splices once a direction
/// streams, and goes back to copying when the messages are small again;
/// every switch happens with the direction's buffer empty, so the echoed
/// bytes stay exact throughout.
#[test]
fn auto_copies_messages_and_splices_streams() {
    let up = echo_server();
    let h = proxy(Mode::Auto, vec![up.addr], |_| {});
    let mut client = connect(h.local_addr());
    for i in 0..50u64 {
        round_trip(&mut client, &pattern(i, 64), Duration::from_secs(5));
    }
    // The counter follows the write the client has already seen.
    let s = wait_stats(&h, Duration::from_secs(5), "every echo counted", |s| {
        s.bytes_copied == 2 * 50 * 64
    });
    assert_eq!((s.bytes_spliced, s.engine_switches), (0, 0), "{s:#?}");

    // A stream: both directions switch to splice.
    let mut w = client.try_clone().unwrap();
    let writer = thread::spawn(move || send_stream(&mut w, 7, 16 * MIB, 256 * 1024, None));
    let back = read_exact_within(&mut client, 16 * MIB, Duration::from_secs(30)).unwrap();
    assert!(back == pattern(7, 16 * MIB), "streamed bytes differ");
    writer.join().unwrap().unwrap();
    let streamed = h.stats();
    assert!(streamed.bytes_spliced > 30 * MIB as u64, "{streamed:#?}");
    assert!(streamed.engine_switches >= 2, "{streamed:#?}");

    // Small messages again: back to copy.
    for i in 0..50u64 {
        round_trip(&mut client, &pattern(i, 64), Duration::from_secs(5));
    }
    let before = wait_stats(&h, Duration::from_secs(5), "every echo counted", |s| {
        s.bytes_spliced + s.bytes_copied == 2 * (50 * 64 + 16 * MIB as u64 + 50 * 64)
    });
    for i in 0..50u64 {
        round_trip(&mut client, &pattern(i, 64), Duration::from_secs(5));
    }
    let after = wait_stats(&h, Duration::from_secs(5), "every echo counted", |s| {
        s.bytes_copied == before.bytes_copied + 2 * 50 * 64
    });
    assert_eq!(after.bytes_spliced, before.bytes_spliced, "{after:#?}");
    assert!(after.engine_switches >= 4, "{after:#?}");
    client.shutdown(Shutdown::Write).unwrap();
    read_to_eof(&mut client, Duration::from_secs(5)).unwrap();
    assert_quiescent(&h, Mode::Auto);
}
