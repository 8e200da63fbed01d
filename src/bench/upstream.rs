//! The embedded upstream: one mio event loop on loopback that is a sink, a
//! source, both at once, or an echo server, as each connection asks.
//!
//! A connection says what it wants in an 8-byte hello ([`hello`]); until then
//! it costs the server nothing but its slab entry, so idle relays stay cheap
//! on the load side. A TLS handshake record ahead of the hello (a
//! ClientHello) is echoed whole before the hello is read: its first byte
//! answers a router's wait for the server's TLS record, as a ServerHello
//! would. The sink discards with `recv(MSG_TRUNC)`, which drops the
//! bytes in the kernel without copying them, so the load generator spends as
//! little CPU as it can and the proxy's share stands out.

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token, Waker};

use super::clienthello::TLS_HANDSHAKE;

/// What a connection asks of the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read and discard until EOF.
    Sink = 1,
    /// Write until the peer goes away.
    Source = 2,
    /// Sink and source at once.
    Duplex = 3,
    /// Write back whatever arrives.
    Echo = 4,
    /// Write back the number of bytes the hello names, then close (the server
    /// closes first, as in HTTP/1.0, so no TIME_WAIT piles up on the client's
    /// ephemeral ports).
    Reply = 5,
}

const MAGIC: [u8; 2] = *b"SB";

/// The hello a connection sends first.
pub fn hello(op: Op) -> [u8; 8] {
    hello_with(op, 0)
}

/// A hello with a parameter: the byte count of [`Op::Reply`], the size of
/// each write of [`Op::Source`] and [`Op::Duplex`] (0: [`DEFAULT_WRITE`]).
pub fn hello_with(op: Op, param: u32) -> [u8; 8] {
    let p = param.to_le_bytes();
    [MAGIC[0], MAGIC[1], op as u8, 0, p[0], p[1], p[2], p[3]]
}

fn parse_hello(h: &[u8; 8]) -> Option<Op> {
    if h[..2] != MAGIC {
        return None;
    }
    Some(match h[2] {
        1 => Op::Sink,
        2 => Op::Source,
        3 => Op::Duplex,
        4 => Op::Echo,
        5 => Op::Reply,
        _ => return None,
    })
}

/// Counters the load generator reads.
#[derive(Debug, Default)]
pub struct UpstreamCounters {
    /// Bytes the sink received (discarded).
    pub sunk: AtomicU64,
    /// Bytes the source wrote.
    pub sourced: AtomicU64,
    /// Bytes echoed back.
    pub echoed: AtomicU64,
    /// Connections accepted so far.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub open: AtomicU64,
}

/// A running embedded upstream; dropping it stops the loop.
pub struct Upstream {
    addr: SocketAddr,
    counters: Arc<UpstreamCounters>,
    stop: Arc<AtomicBool>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

const LISTENER: Token = Token(0);
const WAKER: Token = Token(1);
const CHUNK: usize = 256 * 1024;
/// The source's writes unless the hello names a size.
pub const DEFAULT_WRITE: usize = 256 * 1024;
/// The largest write a hello may ask of the source.
pub const MAX_WRITE: usize = 4 << 20;

struct Conn {
    stream: TcpStream,
    hello: [u8; 8],
    hello_len: u8,
    op: Option<Op>,
    /// Echo bytes the client was not ready to take yet.
    pending: Vec<u8>,
    /// Reply: bytes still to echo before closing; then whether the FIN is sent.
    left: u32,
    /// Bytes of a leading TLS record still to echo before the hello.
    record_left: u32,
    fin_sent: bool,
}

impl Upstream {
    /// Binds `addr` (port 0 picks one) and starts the loop.
    pub fn start(addr: SocketAddr) -> io::Result<Upstream> {
        let mut listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let counters = Arc::new(UpstreamCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (Arc::clone(&counters), Arc::clone(&stop));
        let thread = std::thread::Builder::new()
            .name("bench-upstream".into())
            .spawn(move || run_loop(poll, listener, &c, &s))?;
        Ok(Upstream {
            addr,
            counters,
            stop,
            waker,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn counters(&self) -> &Arc<UpstreamCounters> {
        &self.counters
    }

    /// Waits until at most `n` connections are open, up to `limit`. True if reached.
    pub fn wait_open_at_most(&self, n: u64, limit: Duration) -> bool {
        let until = std::time::Instant::now() + limit;
        while self.counters.open.load(Relaxed) > n {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        true
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        let _ = self.waker.wake();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run_loop(mut poll: Poll, listener: TcpListener, c: &UpstreamCounters, stop: &AtomicBool) {
    let mut events = Events::with_capacity(1024);
    let mut conns: slab::Slab<Conn> = slab::Slab::new();
    let mut scratch = vec![0u8; CHUNK];
    let mut trunc = vec![MaybeUninit::<u8>::uninit(); CHUNK];
    let source = vec![0x5au8; MAX_WRITE];
    while !stop.load(Relaxed) {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("bench upstream: poll failed: {e}");
            return;
        }
        for ev in events.iter() {
            match ev.token() {
                LISTENER => accept_all(&poll, &listener, &mut conns, c),
                WAKER => {}
                Token(t) => {
                    let key = t - 2;
                    let Some(conn) = conns.get_mut(key) else {
                        continue;
                    };
                    let keep = drive(conn, c, &mut scratch, &mut trunc, &source).unwrap_or(false);
                    if !keep {
                        let mut conn = conns.remove(key);
                        let _ = poll.registry().deregister(&mut conn.stream);
                        c.open.fetch_sub(1, Relaxed);
                    }
                }
            }
        }
    }
    c.open.fetch_sub(conns.len() as u64, Relaxed);
}

fn accept_all(
    poll: &Poll,
    listener: &TcpListener,
    conns: &mut slab::Slab<Conn>,
    c: &UpstreamCounters,
) {
    let mut errors = 0;
    loop {
        match listener.accept() {
            Ok((mut stream, _)) => {
                let _ = stream.set_nodelay(true);
                let entry = conns.vacant_entry();
                let token = Token(entry.key() + 2);
                if poll
                    .registry()
                    .register(&mut stream, token, Interest::READABLE | Interest::WRITABLE)
                    .is_err()
                {
                    continue;
                }
                entry.insert(Conn {
                    stream,
                    hello: [0; 8],
                    hello_len: 0,
                    op: None,
                    pending: Vec::new(),
                    left: 0,
                    record_left: 0,
                    fin_sent: false,
                });
                c.accepted.fetch_add(1, Relaxed);
                c.open.fetch_add(1, Relaxed);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            // Out of fds: try again on the next event.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => return,
            // A connection reset before it was accepted (ECONNABORTED) and the
            // like: go on, or the ones queued behind it would wait for the next edge.
            Err(_) => {
                errors += 1;
                if errors > 64 {
                    return;
                }
            }
        }
    }
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

/// Moves what can move; `Ok(false)` or an error closes the connection.
fn drive(
    conn: &mut Conn,
    c: &UpstreamCounters,
    scratch: &mut [u8],
    trunc: &mut [MaybeUninit<u8>],
    source: &[u8],
) -> io::Result<bool> {
    let op = loop {
        if let Some(op) = conn.op {
            break op;
        }
        if conn.record_left > 0 || !conn.pending.is_empty() {
            if !echo_record(conn, c, scratch)? {
                return Ok(true);
            }
            continue;
        }
        while (conn.hello_len as usize) < conn.hello.len() {
            match conn.stream.read(&mut conn.hello[conn.hello_len as usize..]) {
                Ok(0) => return Ok(false),
                Ok(n) => conn.hello_len += n as u8,
                Err(e) if would_block(&e) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            let got = conn.hello_len as usize;
            if got >= 5 && conn.hello[0] == TLS_HANDSHAKE {
                let record = 5 + u32::from(u16::from_be_bytes([conn.hello[3], conn.hello[4]]));
                // What was read past a record this short is not a hello either.
                let Some(left) = record.checked_sub(got as u32) else {
                    return Ok(false);
                };
                conn.pending.extend_from_slice(&conn.hello[..got]);
                conn.record_left = left;
                conn.hello_len = 0;
                break;
            }
        }
        if conn.hello_len == 0 {
            continue;
        }
        let Some(op) = parse_hello(&conn.hello) else {
            return Ok(false);
        };
        conn.op = Some(op);
        conn.left =
            u32::from_le_bytes([conn.hello[4], conn.hello[5], conn.hello[6], conn.hello[7]]);
    };
    match op {
        Op::Sink => sink(conn, c, trunc),
        // Reading tells a source when the peer closed.
        Op::Source | Op::Duplex => {
            if !sink(conn, c, trunc)? {
                return Ok(false);
            }
            let write = match conn.left as usize {
                0 => DEFAULT_WRITE,
                n => n.min(MAX_WRITE),
            };
            pump(conn, c, &source[..write])
        }
        Op::Echo | Op::Reply => echo(conn, c, scratch),
    }
}

/// Echoes the rest of a leading TLS record; true once all of it is back.
fn echo_record(conn: &mut Conn, c: &UpstreamCounters, scratch: &mut [u8]) -> io::Result<bool> {
    loop {
        while !conn.pending.is_empty() {
            match conn.stream.write(&conn.pending) {
                Ok(n) => {
                    c.echoed.fetch_add(n as u64, Relaxed);
                    conn.pending.drain(..n);
                }
                Err(e) if would_block(&e) => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if conn.record_left == 0 {
            return Ok(true);
        }
        let want = scratch.len().min(conn.record_left as usize);
        match conn.stream.read(&mut scratch[..want]) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                conn.record_left -= n as u32;
                conn.pending.extend_from_slice(&scratch[..n]);
            }
            Err(e) if would_block(&e) => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn sink(conn: &mut Conn, c: &UpstreamCounters, trunc: &mut [MaybeUninit<u8>]) -> io::Result<bool> {
    let sock = socket2::SockRef::from(&conn.stream);
    loop {
        match sock.recv_with_flags(trunc, libc::MSG_TRUNC) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                c.sunk.fetch_add(n as u64, Relaxed);
            }
            Err(e) if would_block(&e) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn pump(conn: &mut Conn, c: &UpstreamCounters, source: &[u8]) -> io::Result<bool> {
    loop {
        match conn.stream.write(source) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                c.sourced.fetch_add(n as u64, Relaxed);
            }
            Err(e) if would_block(&e) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

fn echo(conn: &mut Conn, c: &UpstreamCounters, scratch: &mut [u8]) -> io::Result<bool> {
    let reply = conn.op == Some(Op::Reply);
    loop {
        if reply && conn.left == 0 && conn.pending.is_empty() {
            if !conn.fin_sent {
                conn.fin_sent = true;
                conn.stream.shutdown(std::net::Shutdown::Write)?;
            }
            // Wait for the client's FIN (read 0), discarding anything else.
            return match conn.stream.read(scratch) {
                Ok(0) => Ok(false),
                Ok(_) => Ok(true),
                Err(e) if would_block(&e) => Ok(true),
                Err(e) => Err(e),
            };
        }
        if !conn.pending.is_empty() {
            match conn.stream.write(&conn.pending) {
                Ok(n) => {
                    c.echoed.fetch_add(n as u64, Relaxed);
                    conn.pending.drain(..n);
                    if !conn.pending.is_empty() {
                        continue;
                    }
                    conn.pending = Vec::new();
                }
                Err(e) if would_block(&e) => return Ok(true),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        let want = if reply {
            scratch.len().min(conn.left as usize)
        } else {
            scratch.len()
        };
        let n = match conn.stream.read(&mut scratch[..want]) {
            Ok(0) => return Ok(false),
            Ok(n) => {
                if reply {
                    conn.left -= n as u32;
                }
                n
            }
            Err(e) if would_block(&e) => return Ok(true),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut off = 0;
        while off < n {
            match conn.stream.write(&scratch[off..n]) {
                Ok(w) => {
                    c.echoed.fetch_add(w as u64, Relaxed);
                    off += w;
                }
                Err(e) if would_block(&e) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if off < n {
            conn.pending.extend_from_slice(&scratch[off..n]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn echo_sink_and_source() {
        let up = Upstream::start(([127, 0, 0, 1], 0).into()).unwrap();
        let mut e = std::net::TcpStream::connect(up.addr()).unwrap();
        let mut msg = hello(Op::Echo).to_vec();
        msg.extend_from_slice(&[7u8; 5000]);
        e.write_all(&msg).unwrap();
        let mut back = vec![0u8; 5000];
        e.read_exact(&mut back).unwrap();
        assert!(back.iter().all(|&b| b == 7));

        let mut s = std::net::TcpStream::connect(up.addr()).unwrap();
        s.write_all(&hello(Op::Sink)).unwrap();
        s.write_all(&[1u8; 100_000]).unwrap();
        drop(s);
        let until = std::time::Instant::now() + Duration::from_secs(5);
        while up.counters().sunk.load(Relaxed) < 100_000 && std::time::Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(up.counters().sunk.load(Relaxed), 100_000);

        let mut src = std::net::TcpStream::connect(up.addr()).unwrap();
        src.write_all(&hello(Op::Source)).unwrap();
        let mut got = vec![0u8; 10_000];
        src.read_exact(&mut got).unwrap();
        drop((e, src));
        assert!(up.wait_open_at_most(0, Duration::from_secs(5)));
        assert_eq!(up.counters().accepted.load(Relaxed), 3);
    }

    #[test]
    fn reply_closes_after_the_named_bytes() {
        let up = Upstream::start(([127, 0, 0, 1], 0).into()).unwrap();
        for _ in 0..3 {
            crate::bench::load::request_reply(up.addr(), &[]).unwrap();
        }
        assert!(up.wait_open_at_most(0, Duration::from_secs(5)));
    }

    #[test]
    fn a_leading_tls_record_is_echoed_before_the_hello() {
        let up = Upstream::start(([127, 0, 0, 1], 0).into()).unwrap();
        let record = crate::bench::clienthello::client_hello(
            Some("a.example"),
            &crate::bench::clienthello::BENCH_ALPN,
            crate::bench::clienthello::OPENSSL_HELLO_LEN,
        );
        for _ in 0..2 {
            crate::bench::load::request_reply(up.addr(), &record).unwrap();
        }
        // Written a byte at a time, the record is still echoed whole.
        let mut c = std::net::TcpStream::connect(up.addr()).unwrap();
        c.set_nodelay(true).unwrap();
        for b in &record {
            c.write_all(&[*b]).unwrap();
        }
        let mut back = vec![0u8; record.len()];
        c.read_exact(&mut back).unwrap();
        assert_eq!(back, record);
        c.write_all(&hello_with(Op::Reply, 3)).unwrap();
        c.write_all(b"abc").unwrap();
        let mut rest = Vec::new();
        c.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"abc");
    }

    #[test]
    fn a_bad_hello_is_closed() {
        let up = Upstream::start(([127, 0, 0, 1], 0).into()).unwrap();
        let mut c = std::net::TcpStream::connect(up.addr()).unwrap();
        c.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(c.read(&mut buf).unwrap_or(0), 0);
    }
}
