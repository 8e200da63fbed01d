//! The load generator: client connections in their own threads, so the
//! proxy's worker CPU is measured apart from it.

use std::io::{self, Read, Write};
use std::mem::MaybeUninit;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::upstream::{hello, hello_with, Op};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const IO_TIMEOUT: Duration = Duration::from_secs(5);
const CHUNK: usize = 256 * 1024;

/// Connects and sends the hello for `op`.
pub fn open(addr: SocketAddr, op: Op) -> io::Result<TcpStream> {
    open_with(addr, op, 0)
}

/// Connects and sends the hello for `op` with its parameter.
fn open_with(addr: SocketAddr, op: Op, param: u32) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.write_all(&hello_with(op, param))?;
    Ok(s)
}

/// Which way a bulk load streams.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Way {
    /// Client to upstream.
    Up,
    /// Upstream to client.
    Down,
    /// Both at once.
    Both,
}

/// Streaming connections: each writes (and for duplex also reads) until stopped.
pub struct Bulk {
    stop: Arc<AtomicBool>,
    /// Bytes the clients received (duplex only).
    pub received: Arc<AtomicU64>,
    socks: Vec<TcpStream>,
    threads: Vec<JoinHandle<()>>,
    errors: Arc<AtomicU64>,
}

impl Bulk {
    /// Opens `conns` connections to `addr` and starts streaming at once,
    /// every sender (the load's and the upstream's) in writes of `write`
    /// bytes.
    pub fn start(addr: SocketAddr, conns: usize, way: Way, write: usize) -> io::Result<Bulk> {
        let stop = Arc::new(AtomicBool::new(false));
        let received = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let mut bulk = Bulk {
            stop,
            received,
            socks: Vec::new(),
            threads: Vec::new(),
            errors,
        };
        let op = match way {
            Way::Up => Op::Sink,
            Way::Down => Op::Source,
            Way::Both => Op::Duplex,
        };
        let param = u32::try_from(write).unwrap_or(u32::MAX);
        for _ in 0..conns {
            let s = open_with(addr, op, param)?;
            bulk.socks.push(s.try_clone()?);
            if way != Way::Up {
                let r = s.try_clone()?;
                let (stop, rx) = (Arc::clone(&bulk.stop), Arc::clone(&bulk.received));
                bulk.threads
                    .push(spawn("bench-rx", move || drain(r, &stop, &rx))?);
            }
            if way != Way::Down {
                let (stop, errors) = (Arc::clone(&bulk.stop), Arc::clone(&bulk.errors));
                bulk.threads
                    .push(spawn("bench-tx", move || stream(s, &stop, &errors, write))?);
            }
        }
        Ok(bulk)
    }

    /// Stops every connection and waits for the threads. Returns the write errors seen
    /// before the stop.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Relaxed);
        for s in &self.socks {
            let _ = s.shutdown(Shutdown::Both);
        }
        for t in self.threads {
            let _ = t.join();
        }
        self.errors.load(Relaxed)
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new().name(name.into()).spawn(f)
}

fn stream(mut s: TcpStream, stop: &AtomicBool, errors: &AtomicU64, write: usize) {
    let buf = vec![0xa5u8; write.max(1)];
    while !stop.load(Relaxed) {
        if s.write(&buf).is_err() {
            if !stop.load(Relaxed) {
                errors.fetch_add(1, Relaxed);
            }
            return;
        }
    }
}

fn drain(s: TcpStream, stop: &AtomicBool, rx: &AtomicU64) {
    let mut trunc = vec![MaybeUninit::<u8>::uninit(); CHUNK];
    let sock = socket2::SockRef::from(&s);
    while !stop.load(Relaxed) {
        match sock.recv_with_flags(&mut trunc, libc::MSG_TRUNC) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                rx.fetch_add(n as u64, Relaxed);
            }
        }
    }
}

/// One ping-pong connection: sends a message, waits for all of it to come back.
pub struct PingPong {
    stream: mio::net::TcpStream,
    poll: mio::Poll,
    events: mio::Events,
    msg: Vec<u8>,
    back: Vec<u8>,
}

impl PingPong {
    pub fn open(addr: SocketAddr, size: usize) -> io::Result<PingPong> {
        let s = open(addr, Op::Echo)?;
        s.set_nonblocking(true)?;
        let mut stream = mio::net::TcpStream::from_std(s);
        let poll = mio::Poll::new()?;
        poll.registry().register(
            &mut stream,
            mio::Token(0),
            mio::Interest::READABLE | mio::Interest::WRITABLE,
        )?;
        Ok(PingPong {
            stream,
            poll,
            events: mio::Events::with_capacity(4),
            msg: vec![0x3cu8; size.max(1)],
            back: vec![0u8; size.clamp(1, CHUNK)],
        })
    }

    /// One round trip; returns its duration.
    pub fn round_trip(&mut self) -> io::Result<Duration> {
        let size = self.msg.len();
        let t0 = Instant::now();
        let (mut sent, mut got) = (0usize, 0usize);
        loop {
            while sent < size {
                match self.stream.write(&self.msg[sent..]) {
                    Ok(n) => sent += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            loop {
                match self.stream.read(&mut self.back) {
                    Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                    Ok(n) => got += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
                if got >= size {
                    return Ok(t0.elapsed());
                }
            }
            self.poll.poll(&mut self.events, Some(IO_TIMEOUT))?;
            if self.events.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no echo within 5 s",
                ));
            }
        }
    }
}

/// Connection churn: threads that connect, exchange 64 bytes (after an
/// opening, if one is given), close, until stopped.
pub struct Churn {
    stop: Arc<AtomicBool>,
    pub done: Arc<AtomicU64>,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl Churn {
    pub fn start(addr: SocketAddr, threads: usize, opening: &[u8]) -> io::Result<Churn> {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::new();
        for _ in 0..threads {
            let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
            let opening = opening.to_vec();
            let t = std::thread::Builder::new()
                .name("bench-churn".into())
                .spawn(move || {
                    while !stop.load(Relaxed) {
                        request_reply(addr, &opening)?;
                        done.fetch_add(1, Relaxed);
                    }
                    Ok(())
                })?;
            handles.push(t);
        }
        Ok(Churn {
            stop,
            done,
            threads: handles,
        })
    }

    /// Stops and reports the first error a thread hit.
    pub fn stop(self) -> io::Result<()> {
        self.stop.store(true, Relaxed);
        let mut first = Ok(());
        for t in self.threads {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(io::Error::other("a churn thread panicked")));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

/// Connect, send 64 bytes, read them back and the server's FIN, close: one
/// `connect` iteration. The server closes first, so the client's ephemeral
/// ports do not pile up in TIME_WAIT (on loopback they would run out within
/// seconds at tens of thousands of connections a second).
///
/// A non-empty `opening` (a TLS ClientHello) is sent first and read back
/// whole, as the upstream echoes it, before the 64 bytes: the client waits
/// for the server's answer to its hello as a TLS client does.
pub fn request_reply(addr: SocketAddr, opening: &[u8]) -> io::Result<()> {
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    if !opening.is_empty() {
        s.write_all(opening)?;
        let mut echoed = vec![0u8; opening.len()];
        s.read_exact(&mut echoed)?;
        if echoed != opening {
            return Err(io::Error::other("the opening came back changed"));
        }
    }
    let mut msg = [0x42u8; 72];
    msg[..8].copy_from_slice(&hello_with(Op::Reply, 64));
    s.write_all(&msg)?;
    let mut back = [0u8; 65];
    s.read_exact(&mut back[..64])?;
    match s.read(&mut back)? {
        0 => Ok(()),
        _ => Err(io::Error::other("the reply went on past 64 bytes")),
    }
}

/// Connect, send 64 bytes, read them back, close.
pub fn one_exchange(addr: SocketAddr) -> io::Result<()> {
    let s = exchange_and_keep(addr)?;
    drop(s);
    Ok(())
}

/// Like [`one_exchange`] but keeps the connection open (an idle relay).
pub fn exchange_and_keep(addr: SocketAddr) -> io::Result<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut msg = [0x42u8; 72];
    msg[..8].copy_from_slice(&hello(Op::Echo));
    s.write_all(&msg)?;
    let mut back = [0u8; 64];
    s.read_exact(&mut back)?;
    Ok(s)
}
