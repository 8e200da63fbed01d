//! Shared helpers of the loopback integration tests.
//!
//! Everything here talks to 127.0.0.1 only. Waiting is always bounded by a
//! deadline: reads use `set_read_timeout`, conditions are polled with
//! [`wait_until`]. The only deliberate sleeps are [`pace`] (a trickling or
//! slow peer) and [`measure_window`] (a fixed window over which CPU use is
//! measured).
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use socket2::{Domain, SockRef, Socket, Type};
use spliced::{start, Config, Mode, ProxyHandle, Stats};

/// Runs a case once per engine: `both_engines!(case_a, case_b)` makes
/// `case_a::splice` and `case_a::copy` tests calling `case_a(Mode)`.
#[macro_export]
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn splice() {
                    super::$name(spliced::Mode::Splice)
                }
                #[test]
                fn copy() {
                    super::$name(spliced::Mode::Copy)
                }
            }
        )*
    };
}

pub const MIB: usize = 1 << 20;

// ---------------------------------------------------------------------------
// Serialising timing-sensitive tests inside one test binary.

static SERIAL: Mutex<()> = Mutex::new(());

/// Held for a whole test whose timing or CPU measurements must not compete
/// with other tests of the same binary (the machine has 2 cores).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

// ---------------------------------------------------------------------------
// Deterministic data.

/// xorshift64*: deterministic, fast, good enough to catch any reordering,
/// duplication or loss of bytes.
#[derive(Clone)]
pub struct Prng {
    state: u64,
    word: [u8; 8],
    used: usize,
}

impl Prng {
    pub fn new(seed: u64) -> Prng {
        Prng {
            // Never zero, and different seeds give unrelated streams.
            state: seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1,
            word: [0; 8],
            used: 8,
        }
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fills `buf` with the next bytes of the stream; chunking never changes
    /// the stream.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut i = 0;
        while i < buf.len() && self.used < 8 {
            buf[i] = self.word[self.used];
            self.used += 1;
            i += 1;
        }
        let mut chunks = buf[i..].chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            self.word = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&self.word[..n]);
            self.used = n;
        }
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.fill(&mut v);
        v
    }
}

/// `len` bytes of the stream of `seed`.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    Prng::new(seed).bytes(len)
}

/// Length and SHA-256 of a byte stream.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Digested {
    pub len: u64,
    pub sha256: [u8; 32],
}

impl std::fmt::Debug for Digested {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} bytes, sha256 ", self.len)?;
        for b in &self.sha256[..8] {
            write!(f, "{b:02x}")?;
        }
        f.write_str("…")
    }
}

/// Length and hash of `len` bytes of the stream of `seed`, without sending them.
pub fn expected_digest(seed: u64, len: usize) -> Digested {
    let mut rng = Prng::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        hasher.update(&buf[..n]);
        left -= n;
    }
    Digested {
        len: len as u64,
        sha256: hasher.finalize().into(),
    }
}

pub fn digest(bytes: &[u8]) -> Digested {
    Digested {
        len: bytes.len() as u64,
        sha256: Sha256::digest(bytes).into(),
    }
}

/// Writes `len` bytes of the stream of `seed` in `chunk`-sized writes; returns
/// what was written. `progress` (if any) counts bytes as they are accepted.
pub fn send_stream(
    stream: &mut TcpStream,
    seed: u64,
    len: usize,
    chunk: usize,
    progress: Option<&AtomicUsize>,
) -> io::Result<Digested> {
    let mut rng = Prng::new(seed);
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; chunk.max(1)];
    let mut left = len;
    while left > 0 {
        let n = left.min(buf.len());
        rng.fill(&mut buf[..n]);
        stream.write_all(&buf[..n])?;
        hasher.update(&buf[..n]);
        if let Some(p) = progress {
            p.fetch_add(n, Ordering::Relaxed);
        }
        left -= n;
    }
    Ok(Digested {
        len: len as u64,
        sha256: hasher.finalize().into(),
    })
}

// ---------------------------------------------------------------------------
// Bounded waiting.

/// Sleeps on purpose to pace a trickling or slow peer. Never used to wait for
/// something to happen.
pub fn pace(d: Duration) {
    thread::sleep(d);
}

/// Sleeps on purpose for a fixed measurement window (e.g. CPU used over 2 s).
pub fn measure_window(d: Duration) {
    thread::sleep(d);
}

/// Polls `cond` every few milliseconds until it holds; panics naming `what`
/// if it does not within `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Like [`wait_until`] but on the proxy's stats; returns the stats that
/// satisfied `cond`, and shows the last ones on timeout.
pub fn wait_stats(
    h: &ProxyHandle,
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut(&Stats) -> bool,
) -> Stats {
    let deadline = Instant::now() + timeout;
    loop {
        let s = h.stats();
        if cond(&s) {
            return s;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting until {what}; last stats: {s:#?}");
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until every relay has ended and every pipe and buffer is back, then
/// checks the engine-specific counters. Returns the final stats.
pub fn assert_quiescent(h: &ProxyHandle, mode: Mode) -> Stats {
    let s = wait_stats(
        h,
        Duration::from_secs(5),
        "every accepted relay is closed (with one reason) and no pipe or buffer is in use",
        |s| {
            s.relays_active == 0
                && s.pipes_in_use == 0
                && s.buffers_in_use == 0
                && s.closed_total() == s.relays_accepted
        },
    );
    if mode == Mode::Copy {
        assert_eq!(s.bytes_spliced, 0, "copy mode spliced bytes: {s:#?}");
        assert_eq!(s.pipes_created, 0, "copy mode created pipes: {s:#?}");
    }
    s
}

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

// ---------------------------------------------------------------------------
// Fake upstreams.

/// A 127.0.0.1 listener with a large backlog (std uses a small one).
pub fn bind_listener() -> TcpListener {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    let addr: SocketAddr = "127.0.0.1:0".parse().unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(4096).unwrap();
    s.into()
}

/// A loopback address with nothing listening (bound once, then released).
pub fn refused_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    drop(l);
    addr
}

/// A scripted upstream: accepts connections and runs `handler` on each in its
/// own thread. Dropping it stops accepting (live handlers run on).
pub struct Server {
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

pub fn serve<F>(handler: F) -> Server
where
    F: Fn(TcpStream) + Send + Sync + 'static,
{
    let listener = bind_listener();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let handler = Arc::new(handler);
    let thread = {
        let accepted = Arc::clone(&accepted);
        let stop = Arc::clone(&stop);
        thread::Builder::new()
            .name("upstream-accept".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let h = Arc::clone(&handler);
                    thread::Builder::new()
                        .name("upstream-conn".into())
                        .stack_size(256 * 1024)
                        .spawn(move || h(conn))
                        .expect("spawn upstream handler");
                }
            })
            .unwrap()
    };
    Server {
        addr,
        accepted,
        stop,
        thread: Some(thread),
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Echoes every byte; on EOF, half-closes its side after the last byte.
pub fn echo(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => {
                let _ = s.shutdown(Shutdown::Write);
                return;
            }
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

pub fn echo_server() -> Server {
    serve(echo)
}

/// Reads and discards until EOF or error.
pub fn sink(mut s: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    while let Ok(n) = s.read(&mut buf) {
        if n == 0 {
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// The proxy, in-process.

/// A one-listener proxy on 127.0.0.1:0 with one worker; `tweak` adjusts the
/// config before start.
pub fn proxy(
    mode: Mode,
    upstreams: Vec<SocketAddr>,
    tweak: impl FnOnce(&mut Config),
) -> ProxyHandle {
    let mut cfg = Config::single("127.0.0.1:0".parse().unwrap(), upstreams, mode);
    cfg.workers = 1;
    tweak(&mut cfg);
    start(cfg).unwrap_or_else(|e| panic!("start the proxy: {e}"))
}

// ---------------------------------------------------------------------------
// The proxy as a child process (`spliced run`).

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spliced")
}

/// Removes ANSI escape sequences (in case the log is coloured).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The address printed after `listening on` in a log line, if any.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let at = line.find("listening on")?;
    line[at + "listening on".len()..]
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .take(3)
        .find_map(|t| {
            let t = t.rsplit('=').next().unwrap_or(t);
            let t = t.trim_matches(|c: char| c == '"' || c == '\'' || c == '`');
            t.parse().ok()
        })
}

/// A running `spliced run` child. Dropping it kills it.
pub struct Spliced {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
}

impl Spliced {
    /// `spliced run --listen 127.0.0.1:0 <args>`.
    pub fn run(args: &[&str]) -> Spliced {
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--listen", "127.0.0.1:0"]).args(args);
        Spliced::spawn(cmd)
    }

    /// Same, under `ulimit -n <nofile>` (soft and hard).
    pub fn run_with_nofile(nofile: u32, args: &[&str]) -> Spliced {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(bin())
            .args(["run", "--listen", "127.0.0.1:0"])
            .args(args);
        Spliced::spawn(cmd)
    }

    /// Spawns `cmd` and waits for its `listening on ADDR` line.
    pub fn spawn(mut cmd: Command) -> Spliced {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE");
        let mut child = cmd.spawn().expect("spawn spliced");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let logs = Arc::clone(&logs);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    logs.lock().unwrap().push(strip_ansi(&line));
                }
            })
        };
        let mut me = Spliced {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            logs,
            reader: Some(reader),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(addr) = me.logs().iter().find_map(|l| parse_listening(l)) {
                me.addr = addr;
                return me;
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                // Let the reader collect the last lines.
                if let Some(r) = me.reader.take() {
                    let _ = r.join();
                }
                panic!(
                    "spliced exited ({status}) before listening; stderr:\n{}",
                    me.logs().join("\n")
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "spliced printed no 'listening on ADDR' within 10 s; stderr:\n{}",
                    me.logs().join("\n")
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Lines logged to stderr so far (ANSI stripped).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    fn proc_file(&self, name: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/{name}", self.pid()))
            .unwrap_or_else(|e| panic!("read /proc/{}/{name}: {e}", self.pid()))
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = self.proc_file("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// User + system CPU time of the whole process.
    pub fn cpu_time(&self) -> Duration {
        let stat = self.proc_file("stat");
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 (1-based), i.e. 11 and 12 after ") ".
        let rest = &stat[stat.rfind(')').expect("comm in stat") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields[11].parse().unwrap();
        let stime: u64 = fields[12].parse().unwrap();
        let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as u64;
        Duration::from_nanos((utime + stime) * 1_000_000_000 / tck)
    }

    /// Open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)
            .unwrap_or_else(|e| panic!("kill -{sig} {}: {e}", self.pid()));
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit; `None` if it is still running after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = self.try_wait() {
                if let Some(r) = self.reader.take() {
                    let _ = r.join();
                }
                return Some(st);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Runs the binary to completion with `args` (killing it after `timeout`);
/// returns (exit status, stdout, stderr). `None` status means it was killed.
pub fn run_bin(args: &[&str], timeout: Duration) -> (Option<ExitStatus>, String, String) {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LOG")
        .spawn()
        .expect("spawn spliced");
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let stdout = out_t.join().unwrap();
    let stderr = strip_ansi(&err_t.join().unwrap());
    (status, stdout, stderr)
}
