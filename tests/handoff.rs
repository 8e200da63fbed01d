//! Handing connected pairs to an in-process runtime, both engines: either
//! order, half-close both ways, abort, a failing side, read-ahead bytes,
//! Unix to TCP, many pairs from many threads, refusal once shutting down,
//! and the outcome as a future under tokio.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::thread;
use std::time::Duration;

use common::*;
use spliced::handoff::{End, Ending as PairEnding, Refusal};
use spliced::{Mode, Runtime};

both_engines!(
    either_order_relays_both_ways,
    half_close_both_ways,
    abort_resets_both_peers_mid_transfer,
    abort_spares_a_peer_that_has_every_byte_and_the_fin,
    a_failing_side_ends_the_pair_and_is_named,
    read_ahead_bytes_go_first,
    read_ahead_of_every_size_up_to_the_limit_arrives_whole,
    read_ahead_one_byte_over_the_limit_is_refused_and_given_back,
    unix_to_tcp,
    a_hundred_pairs_from_several_threads,
    handoff_while_shutting_down_gives_the_sockets_back,
    the_outcome_is_a_future_tokio_can_await,
    handoffs_run_beside_accepted_relays,
);

const WAIT: Duration = Duration::from_secs(20);

fn runtime(mode: Mode) -> Runtime {
    Runtime::builder()
        .workers(2)
        .event_loop(common::event_loop())
        .mode(mode)
        .start()
        .unwrap_or_else(|e| panic!("start the runtime: {e}"))
}

/// A connected TCP pair: (the program's end, the end handed over).
fn tcp_pair(l: &TcpListener) -> (TcpStream, TcpStream) {
    let kept = connect(l.local_addr().unwrap());
    let (handed, _) = l.accept().unwrap();
    (kept, handed)
}

/// Two pairs whose handed-over ends go to the runtime: returns the outer
/// ends (the "client" facing `a`, the "server" facing `b`) and the inner ones.
fn two_pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    (tcp_pair(&l), tcp_pair(&l))
}

/// Sends `len` pattern bytes on `w` and half-closes it, from a thread.
fn send_and_fin(mut w: TcpStream, seed: u64, len: usize) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        w.write_all(&pattern(seed, len)).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    })
}

fn either_order_relays_both_ways(mode: Mode) {
    let rt = runtime(mode);
    for swap in [false, true] {
        let ((mut client, a), (mut server, b)) = two_pairs();
        let pair = if swap {
            rt.handoff(b, a).unwrap()
        } else {
            rt.handoff(a, b).unwrap()
        };
        let up = send_and_fin(client.try_clone().unwrap(), 1, 3 * MIB);
        let down = send_and_fin(server.try_clone().unwrap(), 2, MIB + 7);
        let (got_server, end_s) = read_until_closed(&mut server, WAIT);
        let (got_client, end_c) = read_until_closed(&mut client, WAIT);
        up.join().unwrap();
        down.join().unwrap();
        assert_eq!((end_s, end_c), (Ending::Eof, Ending::Eof));
        assert!(got_server == pattern(1, 3 * MIB) && got_client == pattern(2, MIB + 7));
        let out = pair.wait();
        assert_eq!(out.ending, PairEnding::Completed, "{out:?}");
        assert!(out.error.is_none());
        // The byte counts are named by the order of the handoff.
        let (to_server, to_client) = (3 * MIB as u64, MIB as u64 + 7);
        if swap {
            assert_eq!((out.b_to_a, out.a_to_b), (to_server, to_client));
        } else {
            assert_eq!((out.a_to_b, out.b_to_a), (to_server, to_client));
        }
    }
    let s = rt.handoff_stats();
    assert_eq!(s.relays_accepted, 2);
    assert_eq!(s.bytes_spliced + s.bytes_copied, 2 * (4 * MIB as u64 + 7));
    if mode == Mode::Copy {
        assert_eq!(s.bytes_spliced, 0);
    }
}

fn half_close_both_ways(mode: Mode) {
    let rt = runtime(mode);
    // The client finishes first and the server keeps answering, then the
    // other way round.
    for client_first in [true, false] {
        let ((mut client, a), (mut server, b)) = two_pairs();
        let pair = rt.handoff(a, b).unwrap();
        let (first, second) = if client_first {
            (&mut client, &mut server)
        } else {
            (&mut server, &mut client)
        };
        first.write_all(b"request").unwrap();
        first.shutdown(Shutdown::Write).unwrap();
        let (got, ending) = read_until_closed(second, WAIT);
        assert_eq!((got.as_slice(), ending), (&b"request"[..], Ending::Eof));
        // The half-closed side still receives.
        second.write_all(&pattern(5, 200_000)).unwrap();
        second.shutdown(Shutdown::Write).unwrap();
        let (got, ending) = read_until_closed(first, WAIT);
        assert_eq!(ending, Ending::Eof);
        assert!(got == pattern(5, 200_000));
        assert_eq!(pair.wait().ending, PairEnding::Completed);
    }
}

fn abort_resets_both_peers_mid_transfer(mode: Mode) {
    let rt = runtime(mode);
    let ((mut client, a), (server, b)) = two_pairs();
    let pair = rt.handoff(a, b).unwrap();
    // The server streams without end; the client reads some of it.
    let writer = {
        let mut w = server.try_clone().unwrap();
        thread::spawn(move || send_stream(&mut w, 3, 1 << 40, 64 * 1024, None))
    };
    read_exact_within(&mut client, 4 * MIB, WAIT).unwrap();
    assert!(pair.try_result().is_none(), "still running");
    pair.abort();
    let out = pair.wait();
    assert_eq!(out.ending, PairEnding::Aborted);
    assert!(out.b_to_a >= 4 * MIB as u64);
    let (_, ending) = read_until_closed(&mut client, WAIT);
    assert_eq!(ending, Ending::Reset, "the client must see a reset");
    // The server's endless write fails on the reset (ECONNRESET, or
    // EPIPE once the reset was taken by an earlier call).
    let written = writer.join().unwrap();
    let kind = written.as_ref().map_err(|e| e.kind());
    assert!(
        matches!(
            kind,
            Err(std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
        ),
        "the server must see a reset: {written:?}"
    );
    drop(server);
}

/// `b`'s peer answered and sent FIN, and `a`'s peer read it all; `a`'s
/// peer never sent FIN. The abort resets `b`'s peer, whose own peer did not
/// finish, and leaves `a`'s peer its clean EOF.
fn abort_spares_a_peer_that_has_every_byte_and_the_fin(mode: Mode) {
    let rt = runtime(mode);
    let ((mut client, a), (mut server, b)) = two_pairs();
    let pair = rt.handoff(a, b).unwrap();
    client.write_all(b"request").unwrap();
    assert_eq!(read_exact_within(&mut server, 7, WAIT).unwrap(), b"request");
    server.write_all(&pattern(4, 200_000)).unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    let (got, ending) = read_until_closed(&mut client, WAIT);
    assert_eq!(ending, Ending::Eof);
    assert!(got == pattern(4, 200_000));
    pair.abort();
    assert_eq!(pair.wait().ending, PairEnding::Aborted);
    let (_, ending) = read_until_closed(&mut server, WAIT);
    assert_eq!(ending, Ending::Reset, "the server's peer never finished");
    // `a` was closed before `b`, whose reset has arrived: a reset of the
    // client would have too. After an EOF it shows as a pending error.
    let pending = client.take_error().unwrap();
    assert!(pending.is_none(), "the client was reset: {pending:?}");
}

fn a_failing_side_ends_the_pair_and_is_named(mode: Mode) {
    let rt = runtime(mode);
    let ((mut client, a), (mut server, b)) = two_pairs();
    let pair = rt.handoff(a, b).unwrap();
    // `b`'s peer resets: the pair ends, `a`'s peer is reset too.
    set_linger_zero(&server);
    server.write_all(b"x").unwrap();
    drop(server);
    let out = pair.wait();
    assert_eq!(out.ending, PairEnding::Reset(End::B), "{out:?}");
    let error = out.error.expect("the failure is reported");
    assert_eq!(error.end, End::B);
    let message = error.to_string();
    assert!(message.contains("failed"), "{message}");
    assert!(std::error::Error::source(&error).is_some(), "{error:?}");
    let (_, ending) = read_until_closed(&mut client, WAIT);
    assert_eq!(ending, Ending::Reset);
}

fn read_ahead_bytes_go_first(mode: Mode) {
    let rt = runtime(mode);
    let ((mut client, mut a), (mut server, mut b)) = two_pairs();
    // The program read a header from each side before handing over.
    client.write_all(b"HEADER-FROM-CLIENT|").unwrap();
    server.write_all(b"HEADER-FROM-SERVER|").unwrap();
    let mut ahead_a = vec![0u8; 19];
    let mut ahead_b = vec![0u8; 19];
    a.read_exact(&mut ahead_a).unwrap();
    b.read_exact(&mut ahead_b).unwrap();
    // More bytes are already queued in the sockets behind them.
    client.write_all(&pattern(7, 300_000)).unwrap();
    server.write_all(&pattern(8, 300_000)).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    let pair = rt.handoff_with_read(a, ahead_a, b, ahead_b).unwrap();
    let (to_server, e1) = read_until_closed(&mut server, WAIT);
    let (to_client, e2) = read_until_closed(&mut client, WAIT);
    assert_eq!((e1, e2), (Ending::Eof, Ending::Eof));
    let mut want_server = b"HEADER-FROM-CLIENT|".to_vec();
    want_server.extend(pattern(7, 300_000));
    let mut want_client = b"HEADER-FROM-SERVER|".to_vec();
    want_client.extend(pattern(8, 300_000));
    assert!(to_server == want_server, "client bytes out of order");
    assert!(to_client == want_client, "server bytes out of order");
    let out = pair.wait();
    assert_eq!((out.a_to_b, out.b_to_a), (300_019, 300_019));
    let s = rt.stats();
    assert_eq!((s.buffers_in_use, s.pipes_in_use), (0, 0));
}

/// The copy buffer size: the most read-ahead bytes one side may hand over.
const READ_AHEAD_MAX: usize = 64 * 1024;

/// Read-ahead sizes from one byte to the limit: each power of two and its
/// neighbours, the limit itself, and sizes past a default pipe's worth of
/// pages.
fn read_ahead_sizes() -> Vec<usize> {
    let mut sizes = vec![1, 2, 3, 24_000, READ_AHEAD_MAX - 1, READ_AHEAD_MAX];
    for k in 2..=16 {
        let p = 1usize << k;
        sizes.extend([p - 1, p, p + 1]);
    }
    sizes.retain(|&n| (1..=READ_AHEAD_MAX).contains(&n));
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// One pair whose program read `ahead_a` bytes from `a`'s peer and
/// `ahead_b` from `b`'s: each side must get the other's read-ahead bytes,
/// then what followed them, then a clean EOF, and the pair completes.
fn read_ahead_round(rt: &Runtime, ahead_a: usize, ahead_b: usize, seed: u64) {
    let ((client, a), (server, b)) = two_pairs();
    let (head_a, tail_a) = (pattern(seed, ahead_a), pattern(seed + 1, 3000));
    let (head_b, tail_b) = (pattern(seed + 2, ahead_b), pattern(seed + 3, 5000));
    let pair = rt
        .handoff_with_read(a, head_a.clone(), b, head_b.clone())
        .unwrap_or_else(|e| panic!("{ahead_a}/{ahead_b} read-ahead bytes refused: {e}"));
    let (mut client_r, mut server_r) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    // Written beside the reads; a write fails only if the pair was cut,
    // which the outcome below names.
    let send = |mut w: TcpStream, tail: Vec<u8>| {
        thread::spawn(move || {
            w.write_all(&tail)?;
            w.shutdown(Shutdown::Write)
        })
    };
    let (up, down) = (send(client, tail_a), send(server, tail_b));
    let (to_server, end_s) = read_until_closed(&mut server_r, WAIT);
    let (to_client, end_c) = read_until_closed(&mut client_r, WAIT);
    let out = pair.wait();
    let what = format!("{ahead_a} bytes read from a, {ahead_b} from b: {out:?}");
    assert_eq!(out.ending, PairEnding::Completed, "{what}");
    up.join().unwrap().unwrap();
    down.join().unwrap().unwrap();
    assert_eq!((end_s, end_c), (Ending::Eof, Ending::Eof), "{what}");
    let want_server = [head_a, pattern(seed + 1, 3000)].concat();
    let want_client = [head_b, pattern(seed + 3, 5000)].concat();
    assert_eq!(to_server.len(), want_server.len(), "{what}");
    assert!(to_server == want_server, "bytes to b differ; {what}");
    assert_eq!(to_client.len(), want_client.len(), "{what}");
    assert!(to_client == want_client, "bytes to a differ; {what}");
    assert_eq!(
        (out.a_to_b, out.b_to_a),
        (want_server.len() as u64, want_client.len() as u64),
        "{what}"
    );
}

/// Read-ahead bytes of every size the API accepts arrive whole and first,
/// from either side and from both at once.
fn read_ahead_of_every_size_up_to_the_limit_arrives_whole(mode: Mode) {
    let rt = runtime(mode);
    for (i, n) in read_ahead_sizes().into_iter().enumerate() {
        let seed = 100 + 16 * i as u64;
        read_ahead_round(&rt, n, 0, seed);
        read_ahead_round(&rt, 0, n, seed + 4);
        read_ahead_round(&rt, n, n, seed + 8);
        read_ahead_round(&rt, n, READ_AHEAD_MAX + 1 - n, seed + 12);
    }
    let s = rt.stats();
    assert_eq!((s.buffers_in_use, s.pipes_in_use), (0, 0));
    let s = rt.handoff_stats();
    assert_eq!(s.closed_total(), s.relays_accepted);
    assert_eq!(s.closed(spliced::CloseReason::Eof), s.relays_accepted);
}

/// One byte past the limit, from either side, is refused with both sockets
/// and both read-ahead buffers given back whole.
fn read_ahead_one_byte_over_the_limit_is_refused_and_given_back(mode: Mode) {
    let rt = runtime(mode);
    for over_on_a in [true, false] {
        let ((mut client, a), (mut server, b)) = two_pairs();
        let (ahead_a, ahead_b) = if over_on_a {
            (pattern(1, READ_AHEAD_MAX + 1), pattern(2, 10))
        } else {
            (pattern(1, 10), pattern(2, READ_AHEAD_MAX + 1))
        };
        let err = rt
            .handoff_with_read(a, ahead_a.clone(), b, ahead_b.clone())
            .unwrap_err();
        match err.refusal {
            Refusal::ReadAheadTooLarge { len, max } => {
                assert_eq!((len, max), (READ_AHEAD_MAX + 1, READ_AHEAD_MAX))
            }
            ref other => panic!("refused for another reason: {other:?}"),
        }
        assert!(err.to_string().contains("65537"), "{err}");
        assert!(err.read_from_a == ahead_a && err.read_from_b == ahead_b);
        let (spliced::Socket::Tcp(mut a), spliced::Socket::Tcp(mut b)) = (err.a, err.b) else {
            panic!("TCP sockets come back as TCP");
        };
        a.set_nonblocking(false).unwrap();
        b.set_nonblocking(false).unwrap();
        a.write_all(b"a is still mine").unwrap();
        assert_eq!(
            read_exact_within(&mut client, 15, WAIT).unwrap(),
            b"a is still mine"
        );
        b.write_all(b"b too").unwrap();
        assert_eq!(read_exact_within(&mut server, 5, WAIT).unwrap(), b"b too");
    }
    assert_eq!(rt.handoff_stats().relays_accepted, 0);
}

fn unix_to_tcp(mode: Mode) {
    let rt = runtime(mode);
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut client, a) = tcp_pair(&l);
    let (mut local_server, b) = UnixStream::pair().unwrap();
    let pair = rt.handoff(a, b).unwrap();
    let server = thread::spawn(move || {
        // An echo server on the Unix socket.
        local_server.set_read_timeout(Some(WAIT)).unwrap();
        let mut all = Vec::new();
        local_server.read_to_end(&mut all).unwrap();
        local_server.write_all(&all).unwrap();
        local_server.shutdown(Shutdown::Write).unwrap();
        all.len()
    });
    let msg = pattern(9, 2 * MIB + 3);
    let writer = send_and_fin(client.try_clone().unwrap(), 9, msg.len());
    let (back, ending) = read_until_closed(&mut client, WAIT);
    writer.join().unwrap();
    assert_eq!(server.join().unwrap(), msg.len());
    assert_eq!(ending, Ending::Eof);
    assert!(back == msg);
    let out = pair.wait();
    assert_eq!(out.ending, PairEnding::Completed);
    assert_eq!(
        (out.a_to_b, out.b_to_a),
        (msg.len() as u64, msg.len() as u64)
    );
}

fn a_hundred_pairs_from_several_threads(mode: Mode) {
    let rt = std::sync::Arc::new(runtime(mode));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let rt = std::sync::Arc::clone(&rt);
            thread::spawn(move || {
                let mut pairs = Vec::new();
                for i in 0..25u64 {
                    let ((client, a), (server, b)) = two_pairs();
                    pairs.push((rt.handoff(a, b).unwrap(), client, server, t * 100 + i));
                }
                for (pair, mut client, mut server, seed) in pairs {
                    let len = 1000 + seed as usize * 37;
                    client.write_all(&pattern(seed, len)).unwrap();
                    client.shutdown(Shutdown::Write).unwrap();
                    let (got, ending) = read_until_closed(&mut server, WAIT);
                    assert_eq!(ending, Ending::Eof);
                    assert!(got == pattern(seed, len));
                    server.shutdown(Shutdown::Write).unwrap();
                    let (_, ending) = read_until_closed(&mut client, WAIT);
                    assert_eq!(ending, Ending::Eof);
                    assert_eq!(pair.wait().a_to_b, len as u64);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let s = rt.handoff_stats();
    assert_eq!(s.relays_accepted, 100);
    assert_eq!(s.closed(spliced::CloseReason::Eof), 100);
}

fn handoff_while_shutting_down_gives_the_sockets_back(mode: Mode) {
    let rt = runtime(mode);
    let ((mut client, a), (mut server, b)) = two_pairs();
    rt.shutdown();
    let err = rt
        .handoff_with_read(a, b"ahead".to_vec(), b, Vec::new())
        .unwrap_err();
    assert!(matches!(err.refusal, Refusal::ShuttingDown), "{err}");
    assert!(err.to_string().contains("shutting down"), "{err}");
    assert_eq!(err.read_from_a, b"ahead");
    // Both sockets come back whole and still work.
    let (spliced::Socket::Tcp(mut a), spliced::Socket::Tcp(mut b)) = (err.a, err.b) else {
        panic!("TCP sockets come back as TCP");
    };
    a.set_nonblocking(false).unwrap();
    b.set_nonblocking(false).unwrap();
    a.write_all(b"still mine").unwrap();
    assert_eq!(
        read_exact_within(&mut client, 10, WAIT).unwrap(),
        b"still mine"
    );
    b.write_all(b"mine too").unwrap();
    assert_eq!(
        read_exact_within(&mut server, 8, WAIT).unwrap(),
        b"mine too"
    );
    rt.join();
}

fn the_outcome_is_a_future_tokio_can_await(mode: Mode) {
    let rt = runtime(mode);
    let tokio_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio_rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (a, _) = l.accept().await.unwrap();
        let mut server = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (b, _) = l.accept().await.unwrap();
        let pair = rt
            .handoff(a.into_std().unwrap(), b.into_std().unwrap())
            .unwrap();
        client.write_all(b"hello through spliced").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello through spliced");
        server.shutdown().await.unwrap();
        let out = tokio::time::timeout(WAIT, pair.finished()).await.unwrap();
        assert_eq!(out.ending, PairEnding::Completed);
        assert_eq!((out.a_to_b, out.b_to_a), (21, 0));
    });
}

/// A running proxy takes handoffs too, beside its accepted relays.
fn handoffs_run_beside_accepted_relays(mode: Mode) {
    let echo = echo_server();
    let h = proxy(mode, vec![echo.addr], |_| {});
    let mut accepted = connect(h.local_addr());
    let ((mut client, a), (mut server, b)) = two_pairs();
    let pair = h.runtime().handoff(a, b).unwrap();
    round_trip(&mut accepted, b"through the listener", WAIT);
    client.write_all(b"handed over").unwrap();
    assert_eq!(
        read_exact_within(&mut server, 11, WAIT).unwrap(),
        b"handed over"
    );
    drop(accepted);
    client.shutdown(Shutdown::Write).unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    assert_eq!(pair.wait().ending, PairEnding::Completed);
    let per_listener = h.listener_stats();
    assert_eq!(per_listener[0].1.relays_accepted, 1);
    assert_eq!(h.runtime().handoff_stats().relays_accepted, 1);
    assert_quiescent(&h, mode);
}
