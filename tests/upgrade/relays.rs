//! Live relays handed to the new process: every kind alive at the upgrade
//! carries on there byte-exact (bulk both ways, ping-pong, half-closed each
//! way with bytes still flowing, bytes waiting in the proxy because a
//! receiver's window is closed), with no reset and no early FIN; their
//! idle and FIN deadlines fall where they would have; and an upgrade that
//! fails while relays are frozen gives every one back.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Mutex;
use std::time::Instant;

use super::*;

/// A reply still flowing to a client that half-closed.
const REPLY: usize = 3 * MIB;
/// A stream still flowing from a client whose server half-closed.
const UPLOAD: usize = 3 * MIB;
/// Bytes sent towards a receiver that does not read until the upgrade is
/// over: more than its small window and the proxy's buffers hold.
const WAITING: usize = 6 * MIB;
/// Pause between 64 KiB chunks of the flowing streams: about 1.4 s each.
const PACE: Duration = Duration::from_millis(30);
const CHUNK: usize = 64 * 1024;

/// What each connection to [`kinds_server`] asks for: its first byte,
/// then a seed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// Echo until EOF.
    Echo = b'E' as isize,
    /// Read to EOF, then a paced reply of [`REPLY`] bytes, then FIN.
    Reply = b'H' as isize,
    /// FIN at once, then read the client's stream to EOF.
    Upload = b'U' as isize,
    /// [`WAITING`] bytes at once (to a client that reads later), FIN, then
    /// read to EOF.
    Flood = b'W' as isize,
    /// Read nothing until told, then to EOF; FIN.
    Held = b'S' as isize,
    /// Read to EOF and keep the connection open until told (a FIN
    /// timeout's case).
    Mute = b'Q' as isize,
}

/// The upstream, with what it saw.
pub(super) struct Kinds {
    pub(super) server: Server,
    /// [`Kind::Held`] connections start reading; [`Kind::Mute`] ones end.
    pub(super) go: Arc<AtomicBool>,
    /// Bytes written so far, summed over [`Kind::Reply`] and
    /// [`Kind::Flood`] connections.
    written: Arc<AtomicUsize>,
    /// Per [`Kind::Upload`] and [`Kind::Held`] connection: its seed and
    /// what it read to EOF.
    received: Arc<Mutex<Vec<(u64, Digested)>>>,
}

fn read_all(s: &mut TcpStream) -> Vec<u8> {
    let mut all = Vec::new();
    s.read_to_end(&mut all).expect("upstream reads to EOF");
    all
}

fn paced_write(s: &mut TcpStream, seed: u64, len: usize, written: &AtomicUsize) {
    for chunk in pattern(seed, len).chunks(CHUNK) {
        s.write_all(chunk).expect("upstream writes");
        written.fetch_add(chunk.len(), Ordering::Relaxed);
        pace(PACE);
    }
}

pub(super) fn kinds_server() -> Kinds {
    let go = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(Mutex::new(Vec::new()));
    let (g, w, r) = (Arc::clone(&go), Arc::clone(&written), Arc::clone(&received));
    let server = serve(move |mut s| {
        let mut head = [0u8; 9];
        if s.read_exact(&mut head).is_err() {
            return;
        }
        let seed = u64::from_be_bytes(head[1..].try_into().unwrap());
        let record = |s: &mut TcpStream| {
            let got = digest(&read_all(s));
            r.lock().unwrap().push((seed, got));
        };
        match head[0] {
            b'E' => echo(s),
            b'H' => {
                read_all(&mut s);
                paced_write(&mut s, seed, REPLY, &w);
                s.shutdown(Shutdown::Write).unwrap();
            }
            b'U' => {
                s.shutdown(Shutdown::Write).unwrap();
                record(&mut s);
            }
            b'W' => {
                for chunk in pattern(seed, WAITING).chunks(CHUNK) {
                    s.write_all(chunk).expect("upstream floods");
                    w.fetch_add(chunk.len(), Ordering::Relaxed);
                }
                s.shutdown(Shutdown::Write).unwrap();
                read_all(&mut s);
            }
            b'S' => {
                while !g.load(Ordering::Relaxed) {
                    poll_pause();
                }
                record(&mut s);
                s.shutdown(Shutdown::Write).unwrap();
            }
            b'Q' => {
                read_all(&mut s);
                // Held open (its FIN never sent) until the test ends.
                let until = Instant::now() + T;
                while !g.load(Ordering::Relaxed) && Instant::now() < until {
                    poll_pause();
                }
            }
            _ => {}
        }
    });
    Kinds {
        server,
        go,
        written,
        received,
    }
}

/// A connection through the proxy asking for `kind`, with a receive
/// buffer of `rcvbuf` bytes if given (a small window).
pub(super) fn open(addr: SocketAddr, kind: Kind, seed: u64, rcvbuf: Option<usize>) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(size) = rcvbuf {
        socket.set_recv_buffer_size(size).unwrap();
    }
    socket
        .connect_timeout(&addr.into(), Duration::from_secs(5))
        .unwrap();
    let mut s: TcpStream = socket.into();
    s.set_nodelay(true).unwrap();
    s.set_write_timeout(Some(T)).unwrap();
    let mut head = vec![kind as u8];
    head.extend_from_slice(&seed.to_be_bytes());
    s.write_all(&head).unwrap();
    s
}

/// A bulk echo both ways through the proxy: 24 MiB out, paced, and the
/// same back, checked to EOF.
fn bulk_both_ways(addr: SocketAddr, seed: u64) -> std::thread::JoinHandle<()> {
    let mut c = open(addr, Kind::Echo, seed, None);
    std::thread::spawn(move || {
        let len = 24 * MIB;
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            for chunk in pattern(seed, len).chunks(256 * 1024) {
                w.write_all(chunk).unwrap();
                pace(Duration::from_millis(10));
            }
            w.shutdown(Shutdown::Write).unwrap();
        });
        let back = digest_to_eof(&mut c, Duration::from_secs(60)).expect("bulk echo to EOF");
        writer.join().unwrap();
        assert_eq!(
            back,
            expected_digest(seed, len),
            "bulk relay {seed} byte-exact"
        );
    })
}

/// The count `spliced upgrade` printed: "... and N live relays handed over".
pub(super) fn handed_count(out: &str) -> usize {
    let before = out
        .split(" live relays handed over")
        .next()
        .unwrap_or_default();
    before
        .rsplit(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no relay count in {out:?}"))
}

fn every_kind_of_relay_carries_on(mode: Mode) {
    let up = kinds_server();
    let name = format!("relays-{}", mode_name(mode));
    let (mut s, mut instance) = Instance::start(&name, mode, up.server.addr, None);
    let addr = s.addr;
    let (echoes, replies, uploads, floods, held) = (300, 50, 50, 40, 40);
    let mut seed = 0u64;
    let mut next = || {
        seed += 1;
        seed
    };

    let mut pingpong: Vec<TcpStream> = (0..echoes)
        .map(|i| {
            let mut c = open(addr, Kind::Echo, next(), None);
            round_trip(&mut c, format!("hello {i}").as_bytes(), T);
            c
        })
        .collect();
    let bulk: Vec<_> = (0..4).map(|i| bulk_both_ways(addr, 9000 + i)).collect();
    // Half-closed by the client, the reply still flowing.
    let reply_readers: Vec<_> = (0..replies)
        .map(|_| {
            let seed = next();
            let mut c = open(addr, Kind::Reply, seed, None);
            c.write_all(b"the request").unwrap();
            c.shutdown(Shutdown::Write).unwrap();
            std::thread::spawn(move || {
                let (back, ending) = read_until_closed(&mut c, Duration::from_secs(60));
                assert_eq!(ending, Ending::Eof, "a reply ends with a FIN");
                assert_eq!(digest(&back), expected_digest(seed, REPLY), "reply {seed}");
            })
        })
        .collect();
    // Half-closed by the server, the client's stream still flowing.
    let uploaded = Arc::new(AtomicUsize::new(0));
    let upload_writers: Vec<_> = (0..uploads)
        .map(|_| {
            let seed = next();
            let mut c = open(addr, Kind::Upload, seed, None);
            let uploaded = Arc::clone(&uploaded);
            std::thread::spawn(move || {
                let (early, ending) = read_until_closed(&mut c, T);
                assert!(early.is_empty());
                assert_eq!(ending, Ending::Eof, "the server's FIN reaches the client");
                paced_write(&mut c, seed, UPLOAD, &uploaded);
                c.shutdown(Shutdown::Write).unwrap();
                seed
            })
        })
        .collect();
    // Bytes waiting for a client that does not read: in the proxy's pipe
    // or copy buffer and the sockets' queues.
    let flooded: Vec<(u64, TcpStream)> = (0..floods)
        .map(|_| {
            let seed = next();
            (seed, open(addr, Kind::Flood, seed, Some(4096)))
        })
        .collect();
    // Bytes waiting for a server that does not read.
    let pushed = Arc::new(AtomicUsize::new(0));
    let held_writers: Vec<_> = (0..held)
        .map(|_| {
            let seed = next();
            let mut c = open(addr, Kind::Held, seed, None);
            let pushed = Arc::clone(&pushed);
            std::thread::spawn(move || {
                let mut w = c.try_clone().unwrap();
                for chunk in pattern(seed, WAITING).chunks(CHUNK) {
                    w.write_all(chunk).unwrap();
                    pushed.fetch_add(chunk.len(), Ordering::Relaxed);
                }
                w.shutdown(Shutdown::Write).unwrap();
                let (rest, ending) = read_until_closed(&mut c, Duration::from_secs(60));
                assert!(rest.is_empty());
                assert_eq!(ending, Ending::Eof);
                seed
            })
        })
        .collect();
    let total = echoes + 4 + replies + uploads + floods + held;
    wait_until(T, "the upstream accepted every relay", || {
        up.server.accepted() >= total
    });
    // Every stream is under way, and the stalled ones have filled what
    // the proxy holds for them.
    wait_until(T, "the stalled streams filled the proxy", || {
        pushed.load(Ordering::Relaxed) >= held * MIB
            && up.written.load(Ordering::Relaxed) >= floods * MIB
            && uploaded.load(Ordering::Relaxed) >= uploads * 4 * CHUNK
    });

    let (ok, out, err) = instance.upgrade(None);
    assert!(ok, "upgrade failed: {out}{err}");
    let handed = handed_count(&out);
    assert!(
        handed >= echoes + floods + held,
        "every relay that could not have finished was handed over: {out}"
    );

    // The old process let go of every relay it handed over: it exits
    // while they carry on in the new one.
    let status = old_exit(&mut s);
    assert!(status.success(), "the old process exits cleanly: {status}");
    up.go.store(true, Ordering::Relaxed);
    for (i, c) in pingpong.iter_mut().enumerate() {
        round_trip(c, format!("again {i}").as_bytes(), T);
    }
    for (seed, mut c) in flooded {
        let (back, ending) = read_until_closed(&mut c, Duration::from_secs(60));
        assert_eq!(ending, Ending::Eof, "flood {seed} ends with a FIN");
        assert_eq!(
            digest(&back),
            expected_digest(seed, WAITING),
            "flood {seed}"
        );
        c.shutdown(Shutdown::Write).unwrap();
    }
    let mut sent: Vec<u64> = Vec::new();
    for w in upload_writers.into_iter().chain(held_writers) {
        sent.push(w.join().unwrap());
    }
    for r in reply_readers {
        r.join().unwrap();
    }
    for b in bulk {
        b.join().unwrap();
    }
    for (i, mut c) in pingpong.into_iter().enumerate() {
        c.shutdown(Shutdown::Write).unwrap();
        let (rest, ending) = read_until_closed(&mut c, T);
        assert!(rest.is_empty());
        assert_eq!(ending, Ending::Eof, "echo relay {i} ends with a FIN");
    }
    let received = up.received.lock().unwrap().clone();
    assert_eq!(
        received.len(),
        sent.len(),
        "every upload reached the server"
    );
    for (seed, got) in received {
        let len = if seed <= (echoes + replies + uploads) as u64 {
            UPLOAD
        } else {
            WAITING
        };
        assert_eq!(got, expected_digest(seed, len), "upload {seed} byte-exact");
    }
}

both_engines!(every_kind_of_relay_carries_on);

/// A relay's idle and FIN deadlines count from its last byte, across the
/// upgrade: the new process neither restarts nor forgets them.
fn deadlines_run_on(mode: Mode) {
    let up = kinds_server();
    let name = format!("deadlines-{}", mode_name(mode));
    let (mut s, mut instance) = Instance::start_with(
        &name,
        mode,
        up.server.addr,
        None,
        &["--idle-timeout", "4s", "--fin-timeout", "2s"],
    );
    let mut idle = open(s.addr, Kind::Echo, 1, None);
    round_trip(&mut idle, b"last words", T);
    let mut half = open(s.addr, Kind::Mute, 2, None);
    half.shutdown(Shutdown::Write).unwrap();
    let t0 = Instant::now();
    wait_until(T, "the upstream accepted both", || {
        up.server.accepted() >= 2
    });
    pace(Duration::from_millis(1200));
    let (ok, out, err) = instance.upgrade(None);
    assert!(ok, "upgrade failed: {out}{err}");
    assert_eq!(handed_count(&out), 2, "{out}");
    old_exit(&mut s);
    let (_, _) = read_until_closed(&mut half, T);
    let fin_at = t0.elapsed();
    let (_, _) = read_until_closed(&mut idle, T);
    let idle_at = t0.elapsed();
    // Restarted at the upgrade they would end 1.2 s later than this.
    assert!(
        fin_at >= Duration::from_millis(1900) && fin_at < Duration::from_millis(2900),
        "the FIN timeout of 2 s ended the half-closed relay after {fin_at:?}"
    );
    assert!(
        idle_at >= Duration::from_millis(3900) && idle_at < Duration::from_millis(4900),
        "the idle timeout of 4 s ended the idle relay after {idle_at:?}"
    );
    up.go.store(true, Ordering::Relaxed);
}

both_engines!(deadlines_run_on);

/// An upgrade whose new process dies after it acknowledged half of the
/// relays: the old process takes every relay back and carries on.
fn relays_survive_a_new_process_that_dies(mode: Mode) {
    let up = kinds_server();
    let name = format!("dies-{}", mode_name(mode));
    let (mut s, mut instance) =
        Instance::start(&name, mode, up.server.addr, Some("die-after-half-relays"));
    let mut pingpong: Vec<TcpStream> = (0..200)
        .map(|i| {
            let mut c = open(s.addr, Kind::Echo, i, None);
            round_trip(&mut c, b"before", T);
            c
        })
        .collect();
    let flooded: Vec<TcpStream> = (0..10)
        .map(|i| open(s.addr, Kind::Flood, 1000 + i, Some(4096)))
        .collect();
    wait_until(T, "the floods filled the proxy", || {
        up.written.load(Ordering::Relaxed) >= 10 * MIB
    });
    let bulk: Vec<_> = (0..2).map(|i| bulk_both_ways(s.addr, 9000 + i)).collect();
    let (ok, out, err) = instance.upgrade(None);
    assert!(!ok, "the upgrade should have failed: {out}");
    assert!(
        err.contains("before it acknowledged every relay"),
        "the reason is said: {err}"
    );
    assert!(s.try_wait().is_none(), "the instance still runs");
    for (i, c) in pingpong.iter_mut().enumerate() {
        round_trip(c, format!("after {i}").as_bytes(), T);
    }
    for (i, mut c) in flooded.into_iter().enumerate() {
        let (back, ending) = read_until_closed(&mut c, Duration::from_secs(60));
        assert_eq!(ending, Ending::Eof);
        assert_eq!(digest(&back), expected_digest(1000 + i as u64, WAITING));
        c.shutdown(Shutdown::Write).unwrap();
    }
    for b in bulk {
        b.join().unwrap();
    }
    for mut c in pingpong {
        c.shutdown(Shutdown::Write).unwrap();
        let (_, ending) = read_until_closed(&mut c, T);
        assert_eq!(ending, Ending::Eof);
    }
}

both_engines!(relays_survive_a_new_process_that_dies);
