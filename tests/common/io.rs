//! Reading and writing test sockets, every wait bounded by a deadline.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use socket2::SockRef;

use super::data::Digested;

fn remaining(deadline: Instant) -> io::Result<Duration> {
    let now = Instant::now();
    if now >= deadline {
        return Err(io::Error::new(ErrorKind::TimedOut, "deadline passed"));
    }
    Ok(deadline - now)
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// Reads until EOF; fails with `TimedOut` if EOF is not seen within `timeout`.
pub fn read_to_eof(stream: &mut TcpStream, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut buf) {
            Ok(0) => return Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    format!("no EOF within {timeout:?} ({} bytes read)", out.len()),
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads until EOF, hashing instead of keeping the bytes.
pub fn digest_to_eof(stream: &mut TcpStream, timeout: Duration) -> io::Result<Digested> {
    let deadline = Instant::now() + timeout;
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut buf) {
            Ok(0) => {
                return Ok(Digested {
                    len,
                    sha256: hasher.finalize().into(),
                })
            }
            Ok(n) => {
                hasher.update(&buf[..n]);
                len += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    format!("no EOF within {timeout:?} ({len} bytes read)"),
                ))
            }
            Err(e) => return Err(e),
        }
    }
}

/// Reads exactly `len` bytes within `timeout`.
pub fn read_exact_within(
    stream: &mut TcpStream,
    len: usize,
    timeout: Duration,
) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let mut out = vec![0u8; len];
    let mut got = 0;
    while got < len {
        stream.set_read_timeout(Some(remaining(deadline)?))?;
        match stream.read(&mut out[got..]) {
            Ok(0) => {
                return Err(io::Error::new(
                    ErrorKind::UnexpectedEof,
                    format!("EOF after {got} of {len} bytes"),
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    format!("only {got} of {len} bytes within {timeout:?}"),
                ))
            }
            Err(e) => return Err(e),
        }
    }
    Ok(out)
}

/// How a connection ended, seen by a reader that expects no more data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Eof,
    Reset,
}

/// Waits for the peer to close: returns how (clean EOF or reset) and how long
/// it took. Panics if data arrives, on another error, or on timeout.
pub fn expect_closed(stream: &mut TcpStream, timeout: Duration) -> (Ending, Duration) {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut buf = [0u8; 4096];
    loop {
        let left = remaining(deadline)
            .unwrap_or_else(|_| panic!("connection still open after {timeout:?}"));
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return (Ending::Eof, start.elapsed()),
            Ok(n) => panic!("expected the connection to close, got {n} bytes"),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return (Ending::Reset, start.elapsed())
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => panic!("connection still open after {timeout:?}"),
            Err(e) => panic!("unexpected error while waiting for close: {e}"),
        }
    }
}

/// Sets SO_LINGER 0 so that dropping the socket sends a RST.
pub fn set_linger_zero(stream: &TcpStream) {
    SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .expect("SO_LINGER 0");
}

/// Connects with a bounded connect and sensible timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    s.set_nodelay(true).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// One echo round trip: sends `msg`, expects it back within `timeout`.
pub fn round_trip(stream: &mut TcpStream, msg: &[u8], timeout: Duration) {
    stream.write_all(msg).unwrap();
    let back = read_exact_within(stream, msg.len(), timeout)
        .unwrap_or_else(|e| panic!("echo of {} bytes: {e}", msg.len()));
    assert_eq!(back, msg, "echoed bytes differ");
}

/// One connection through an echo: writes `pattern(seed, len)` beside the
/// reads (so the echo never waits on a full buffer), half-closes, and
/// returns what came back before EOF.
pub fn echo_once(addr: SocketAddr, seed: u64, len: usize, timeout: Duration) -> Vec<u8> {
    let mut c = connect(addr);
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&super::data::pattern(seed, len)).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let back = read_to_eof(&mut c, timeout).expect("echo to EOF");
    writer.join().unwrap();
    back
}

/// Reads whatever arrives until the peer closes; returns the bytes read and
/// how the connection ended. Panics on another error or on timeout.
pub fn read_until_closed(stream: &mut TcpStream, timeout: Duration) -> (Vec<u8>, Ending) {
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let left = remaining(deadline).unwrap_or_else(|_| {
            panic!(
                "connection still open after {timeout:?} ({} bytes read)",
                out.len()
            )
        });
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return (out, Ending::Eof),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return (out, Ending::Reset),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if timed_out(&e) => panic!(
                "connection still open after {timeout:?} ({} bytes read)",
                out.len()
            ),
            Err(e) => panic!("unexpected error after {} bytes: {e}", out.len()),
        }
    }
}
