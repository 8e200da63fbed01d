//! loadgen: load, integrity and fault-injection driver for spliced.
//!
//! Two roles, each a single-threaded mio event loop so one process holds tens
//! of thousands of connections:
//!
//! * `loadgen upstream` — the server behind the proxy. In `auto` mode it reads
//!   a 24-byte header (`"LG"`, a kind byte, the seed, the length) and then
//!   echoes (`E`), verifies and acknowledges an upload (`S`), or streams a
//!   download (`D`). `echo` echoes anything (no header); `noaccept` listens
//!   with a full backlog and never accepts, so further SYNs are dropped.
//! * `loadgen clients` — opens relays through the proxy, pushes a
//!   deterministic pseudo-random stream and checks every byte that comes back
//!   (or, for uploads, the upstream's verdict). Per-connection behaviours
//!   (normal, early half-close, reset, slow reader) are drawn from `--mix`.
//!   Prints a one-line JSON summary on stdout and progress lines on stderr.
//!
//! Every byte of the stream is a function of (seed, offset), so any offset is
//! checked without keeping what was sent.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand, ValueEnum};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use serde_json::json;
use socket2::{Domain, Protocol, SockRef, Socket, Type};

const HDR: u64 = 24;
const MAGIC: &[u8; 2] = b"LG";
const SCRATCH: usize = 64 * 1024;

#[derive(Parser)]
#[command(
    name = "loadgen",
    about = "load, integrity and fault driver for spliced"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once at start
enum Cmd {
    /// Run an upstream server (echo / sink / source / never-accepting).
    Upstream(UpArgs),
    /// Open relays through a proxy, push and verify bytes, print a JSON summary.
    Clients(ClientArgs),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum UpMode {
    /// Header-selected: echo, sink (verify + ack) or source (download).
    Auto,
    /// Echo every byte, no header.
    Echo,
    /// Listen with a full accept queue and never accept.
    Noaccept,
    /// Accept, read and discard forever; never write, never close.
    Blackhole,
}

#[derive(Args)]
struct UpArgs {
    /// Address to listen on (repeatable).
    #[arg(long, required = true)]
    listen: Vec<SocketAddr>,
    #[arg(long, value_enum, default_value = "auto")]
    mode: UpMode,
    /// SO_LINGER 0 on accepted sockets: a killed upstream resets its peers.
    #[arg(long)]
    linger0: bool,
    #[arg(long, default_value_t = 4096)]
    backlog: i32,
    /// Echo buffer per connection.
    #[arg(long, default_value_t = 16384)]
    buf: usize,
    /// Self-test of the checkers: flip the byte at this stream offset of every
    /// echoed connection.
    #[arg(long)]
    corrupt_at: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug, ValueEnum)]
enum Pattern {
    /// Send the stream, read the echo back, verify every byte.
    Echo,
    /// Request/response: rr-size bytes, wait for the echo, repeat (pgbench-like).
    Rr,
    /// Send the stream; the upstream verifies it and acknowledges.
    Upload,
    /// The upstream streams; the client verifies.
    Download,
    /// Each connection draws one of the four above.
    Mixed,
}

#[derive(Args)]
struct ClientArgs {
    /// Proxy address (repeatable; round-robin).
    #[arg(long, required = true)]
    target: Vec<SocketAddr>,
    /// Source IPs to bind (repeatable; round-robin), to spread ephemeral ports.
    #[arg(long)]
    bind: Vec<IpAddr>,
    /// Connections in total; 0 = unlimited (needs --duration).
    #[arg(short = 'n', long, default_value_t = 1)]
    n: u64,
    /// Connections open at once (default: n).
    #[arg(short = 'c', long)]
    concurrency: Option<u64>,
    /// Payload bytes per connection (upper bound if --bytes-min is given).
    #[arg(long, default_value_t = 65536)]
    bytes: u64,
    /// Draw each connection's size uniformly in [bytes-min, bytes].
    #[arg(long)]
    bytes_min: Option<u64>,
    #[arg(long, value_enum, default_value = "echo")]
    pattern: Pattern,
    /// Behaviour weights: normal, early-fin, reset, slow (e.g. normal=60,reset=10).
    #[arg(long, default_value = "normal=1")]
    mix: String,
    /// Open all connections, wait until each is established end to end, then
    /// hold (no traffic) before the data phase.
    #[arg(long)]
    barrier: bool,
    /// Seconds to hold idle after the barrier.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// End the hold as soon as this file exists.
    #[arg(long)]
    hold_until: Option<PathBuf>,
    /// Per-connection send rate limit, bytes per second.
    #[arg(long)]
    rate: Option<u64>,
    /// Echo: most bytes sent but not yet echoed back (stops sending when the
    /// far side stalls).
    #[arg(long)]
    window: Option<u64>,
    /// Request size for the rr pattern.
    #[arg(long, default_value_t = 512)]
    rr_size: u64,
    /// A slow reader reads at most this many bytes per tick.
    #[arg(long, default_value_t = 2048)]
    slow_chunk: u64,
    #[arg(long, default_value_t = 20)]
    tick_ms: u64,
    /// Keep opening connections for this many seconds (churn).
    #[arg(long)]
    duration: Option<f64>,
    /// Give up on everything after this many seconds.
    #[arg(long, default_value_t = 300.0)]
    deadline: f64,
    /// Fail a single connection older than this (0 = off).
    #[arg(long, default_value_t = 0.0)]
    conn_deadline: f64,
    /// SO_RCVBUF for client sockets (small values make slow readers push
    /// back on the proxy sooner, with little kernel memory).
    #[arg(long)]
    rcvbuf: Option<usize>,
    /// Most connections in the connecting state at once.
    #[arg(long, default_value_t = 256)]
    max_connecting: u64,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Seconds between progress lines on stderr (0 = none).
    #[arg(long, default_value_t = 1.0)]
    progress: f64,
}

// ---------------------------------------------------------------- stream ----

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn header(kind: u8, seed: u64, len: u64) -> [u8; 24] {
    let mut h = [0u8; 24];
    h[..2].copy_from_slice(MAGIC);
    h[2] = kind;
    h[8..16].copy_from_slice(&seed.to_le_bytes());
    h[16..24].copy_from_slice(&len.to_le_bytes());
    h
}

/// Bytes `off..off+buf.len()` of the stream: the header, then PRNG words.
fn fill(hdr: &[u8; 24], seed: u64, off: u64, buf: &mut [u8]) {
    let mut i = 0usize;
    while i < buf.len() {
        let pos = off + i as u64;
        if pos < HDR {
            let take = ((HDR - pos) as usize).min(buf.len() - i);
            buf[i..i + take].copy_from_slice(&hdr[pos as usize..pos as usize + take]);
            i += take;
            continue;
        }
        let w = mix64(seed ^ (pos / 8).wrapping_mul(0xD1B5_4A32_D192_ED03)).to_le_bytes();
        let start = (pos % 8) as usize;
        let take = (8 - start).min(buf.len() - i);
        buf[i..i + take].copy_from_slice(&w[start..start + take]);
        i += take;
    }
}

/// Index of the first byte of `got` that differs from the stream at `off`.
fn check(hdr: &[u8; 24], seed: u64, off: u64, got: &[u8], scratch: &mut [u8]) -> Option<usize> {
    let exp = &mut scratch[..got.len()];
    fill(hdr, seed, off, exp);
    if exp == got {
        None
    } else {
        got.iter().zip(exp.iter()).position(|(a, b)| a != b)
    }
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(1);
        mix64(self.0)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
}

fn epoch_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 0,
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted
    )
}

// -------------------------------------------------------------- upstream ----

#[derive(Clone, Copy, PartialEq, Eq)]
enum UKind {
    Blackhole,
    Undecided,
    Echo,
    Sink,
    Source,
}

struct UConn {
    sock: TcpStream,
    kind: UKind,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    peer_fin: bool,
    hdr: [u8; 24],
    seed: u64,
    len: u64,
    /// Source: bytes sent after the header offset. Sink: bytes received.
    done: u64,
    bad: u64,
    shut: bool,
    ack: Vec<u8>,
    /// Echo: bytes already written back.
    echoed: u64,
    flipped: bool,
}

fn upstream(a: UpArgs) -> io::Result<()> {
    let limit = raise_nofile();
    let mut poll = Poll::new()?;
    let mut listeners = Vec::new();
    for (i, addr) in a.listen.iter().enumerate() {
        let s = Socket::new(
            Domain::for_address(*addr),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        s.set_reuse_address(true)?;
        s.bind(&(*addr).into())?;
        let backlog = if a.mode == UpMode::Noaccept {
            0
        } else {
            a.backlog
        };
        s.listen(backlog)?;
        s.set_nonblocking(true)?;
        let std_l: std::net::TcpListener = s.into();
        let local = std_l.local_addr()?;
        let mut l = TcpListener::from_std(std_l);
        if a.mode == UpMode::Noaccept {
            fill_backlog(local);
        } else {
            poll.registry()
                .register(&mut l, Token(i), Interest::READABLE)?;
        }
        eprintln!(
            "loadgen upstream listening on {local} mode={:?} nofile={limit}",
            a.mode
        );
        listeners.push(l);
    }
    if a.mode == UpMode::Noaccept {
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    let base = listeners.len();
    let mut conns: Vec<Option<UConn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut events = Events::with_capacity(4096);
    let mut scratch = vec![0u8; SCRATCH];
    let mut accept_pending = false;
    loop {
        let timeout = if accept_pending {
            Some(Duration::from_millis(50))
        } else {
            None
        };
        if let Err(e) = poll.poll(&mut events, timeout) {
            if e.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let mut ready: Vec<usize> = Vec::new();
        let mut accept_now = accept_pending;
        for ev in events.iter() {
            if ev.token().0 < base {
                accept_now = true;
            } else {
                ready.push(ev.token().0 - base);
            }
        }
        if accept_now {
            accept_pending = false;
            for l in &listeners {
                loop {
                    match l.accept() {
                        Ok((mut sock, _)) => {
                            if a.linger0 {
                                let _ = SockRef::from(&sock).set_linger(Some(Duration::ZERO));
                            }
                            let _ = sock.set_nodelay(true);
                            let idx = free.pop().unwrap_or_else(|| {
                                conns.push(None);
                                conns.len() - 1
                            });
                            poll.registry().register(
                                &mut sock,
                                Token(base + idx),
                                Interest::READABLE | Interest::WRITABLE,
                            )?;
                            conns[idx] = Some(UConn {
                                sock,
                                kind: match a.mode {
                                    UpMode::Echo => UKind::Echo,
                                    UpMode::Blackhole => UKind::Blackhole,
                                    _ => UKind::Undecided,
                                },
                                buf: Vec::new(),
                                start: 0,
                                end: 0,
                                peer_fin: false,
                                hdr: [0; 24],
                                seed: 0,
                                len: 0,
                                done: 0,
                                bad: u64::MAX,
                                shut: false,
                                ack: Vec::new(),
                                echoed: 0,
                                flipped: false,
                            });
                            ready.push(idx);
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
                        Err(e) => {
                            eprintln!("loadgen upstream: accept: {e}");
                            accept_pending = true;
                            break;
                        }
                    }
                }
            }
        }
        for idx in ready {
            let finished = match conns.get_mut(idx).and_then(|c| c.as_mut()) {
                Some(c) => upump(c, a.buf, a.corrupt_at, &mut scratch),
                None => false,
            };
            if finished {
                if let Some(mut c) = conns[idx].take() {
                    let _ = poll.registry().deregister(&mut c.sock);
                }
                free.push(idx);
            }
        }
    }
}

/// Connects to our own never-accepting listener until the accept queue is full.
fn fill_backlog(local: SocketAddr) {
    let mut held = Vec::new();
    for _ in 0..8 {
        let s = match Socket::new(
            Domain::for_address(local),
            Type::STREAM,
            Some(Protocol::TCP),
        ) {
            Ok(s) => s,
            Err(_) => break,
        };
        match s.connect_timeout(&local.into(), Duration::from_millis(300)) {
            Ok(()) => held.push(s),
            Err(_) => break,
        }
    }
    eprintln!(
        "loadgen upstream: accept queue filled with {} connection(s)",
        held.len()
    );
    std::mem::forget(held);
}

/// Drives one upstream connection; true when it is finished.
fn upump(c: &mut UConn, bufsize: usize, corrupt_at: Option<u64>, scratch: &mut [u8]) -> bool {
    loop {
        let mut progress = false;
        match c.kind {
            UKind::Blackhole => loop {
                match c.sock.read(scratch) {
                    Ok(0) => return false,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return true,
                }
            },
            UKind::Undecided | UKind::Echo => {
                if c.buf.is_empty() {
                    c.buf = vec![0u8; bufsize.max(64)];
                }
                // Write what is buffered (only once the kind is known).
                while c.kind == UKind::Echo && c.start < c.end {
                    if let Some(at) = corrupt_at {
                        let pending = (c.end - c.start) as u64;
                        if !c.flipped && at >= c.echoed && at < c.echoed + pending {
                            let i = c.start + (at - c.echoed) as usize;
                            c.buf[i] ^= 0x5a;
                            c.flipped = true;
                        }
                    }
                    match c.sock.write(&c.buf[c.start..c.end]) {
                        Ok(0) => return true,
                        Ok(n) => {
                            c.start += n;
                            c.echoed += n as u64;
                            progress = true;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return true,
                    }
                }
                if c.start == c.end {
                    c.start = 0;
                    c.end = 0;
                }
                while !c.peer_fin && c.end < c.buf.len() {
                    match c.sock.read(&mut c.buf[c.end..]) {
                        Ok(0) => {
                            c.peer_fin = true;
                            progress = true;
                        }
                        Ok(n) => {
                            c.end += n;
                            progress = true;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return true,
                    }
                }
                if c.kind == UKind::Undecided && (c.end >= HDR as usize || c.peer_fin) {
                    decide(c);
                    continue;
                }
                if c.kind == UKind::Echo && c.peer_fin && c.start == c.end {
                    let _ = c.sock.shutdown(Shutdown::Write);
                    return true;
                }
            }
            UKind::Sink => {
                while !c.peer_fin {
                    let n = scratch.len() / 2;
                    let (rb, sc) = scratch.split_at_mut(n);
                    match c.sock.read(rb) {
                        Ok(0) => {
                            c.peer_fin = true;
                            c.ack = Vec::with_capacity(16);
                            c.ack.extend_from_slice(&c.done.to_le_bytes());
                            c.ack.extend_from_slice(&c.bad.to_le_bytes());
                            progress = true;
                        }
                        Ok(k) => {
                            if c.bad == u64::MAX {
                                if let Some(p) = check(&c.hdr, c.seed, HDR + c.done, &rb[..k], sc) {
                                    c.bad = c.done + p as u64;
                                }
                            }
                            c.done += k as u64;
                            progress = true;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return true,
                    }
                }
                if c.peer_fin {
                    while !c.ack.is_empty() {
                        match c.sock.write(&c.ack) {
                            Ok(n) => {
                                c.ack.drain(..n);
                            }
                            Err(e) if e.kind() == ErrorKind::WouldBlock => return false,
                            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                            Err(_) => return true,
                        }
                    }
                    let _ = c.sock.shutdown(Shutdown::Write);
                    return true;
                }
            }
            UKind::Source => {
                while c.done < c.len {
                    let n = ((c.len - c.done) as usize).min(scratch.len());
                    fill(&c.hdr, c.seed, HDR + c.done, &mut scratch[..n]);
                    match c.sock.write(&scratch[..n]) {
                        Ok(k) => {
                            c.done += k as u64;
                            progress = true;
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return true,
                    }
                }
                if c.done == c.len && !c.shut {
                    let _ = c.sock.shutdown(Shutdown::Write);
                    c.shut = true;
                }
                // Drain (and ignore) what the client sends; its FIN ends us.
                loop {
                    match c.sock.read(scratch) {
                        Ok(0) => {
                            c.peer_fin = true;
                            break;
                        }
                        Ok(_) => progress = true,
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                        Err(_) => return true,
                    }
                }
                if c.peer_fin && c.shut {
                    return true;
                }
            }
        }
        if !progress {
            return false;
        }
    }
}

fn decide(c: &mut UConn) {
    let b = &c.buf[..c.end];
    if b.len() < HDR as usize || &b[..2] != MAGIC {
        c.kind = UKind::Echo;
        return;
    }
    c.hdr.copy_from_slice(&b[..24]);
    c.seed = u64::from_le_bytes(c.hdr[8..16].try_into().unwrap_or([0; 8]));
    c.len = u64::from_le_bytes(c.hdr[16..24].try_into().unwrap_or([0; 8]));
    match c.hdr[2] {
        b'S' => {
            let rest = c.buf[24..c.end].to_vec();
            c.kind = UKind::Sink;
            let mut sc = vec![0u8; rest.len()];
            if let Some(p) = check(&c.hdr, c.seed, HDR, &rest, &mut sc) {
                c.bad = p as u64;
            }
            c.done = rest.len() as u64;
            c.buf = Vec::new();
            c.start = 0;
            c.end = 0;
            if c.peer_fin {
                c.ack = [c.done.to_le_bytes(), c.bad.to_le_bytes()].concat();
            }
        }
        b'D' => {
            c.kind = UKind::Source;
            c.buf = Vec::new();
            c.start = 0;
            c.end = 0;
        }
        _ => c.kind = UKind::Echo,
    }
}

// --------------------------------------------------------------- clients ----

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Behavior {
    Normal,
    EarlyFin,
    Reset,
    Slow,
}

impl Behavior {
    fn name(self) -> &'static str {
        match self {
            Behavior::Normal => "normal",
            Behavior::EarlyFin => "early-fin",
            Behavior::Reset => "reset",
            Behavior::Slow => "slow",
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Outcome {
    Ok,
    RstSent,
    Corrupt,
    Reset,
    EofEarly,
    ConnectFailed,
    Timeout,
    Error,
}

const OUTCOMES: [(Outcome, &str); 8] = [
    (Outcome::Ok, "ok"),
    (Outcome::RstSent, "rst_sent"),
    (Outcome::Corrupt, "corrupt"),
    (Outcome::Reset, "reset"),
    (Outcome::EofEarly, "eof_early"),
    (Outcome::ConnectFailed, "connect_failed"),
    (Outcome::Timeout, "timeout"),
    (Outcome::Error, "error"),
];

struct Conn {
    sock: TcpStream,
    pat: Pattern,
    beh: Behavior,
    hdr: [u8; 24],
    seed: u64,
    len: u64,
    tx: u64,
    tx_total: u64,
    rx: u64,
    rx_base: u64,
    rx_total: u64,
    cut: u64,
    shut: bool,
    connected: bool,
    established: bool,
    started: Instant,
    ack: Vec<u8>,
    rr_sent: Option<Instant>,
    slow_budget: u64,
}

struct Ctx {
    gate: Option<Instant>,
    rate: Option<u64>,
    window: Option<u64>,
    est_ms_min: u64,
    est_ms_max: u64,
    rr_size: u64,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    scratch: Vec<u8>,
    bytes_sent: u64,
    bytes_verified: u64,
    rr_lat_us: Vec<u32>,
    rr_ops: u64,
    connect_ms_max: u64,
    detail: String,
}

fn tx_limit(c: &Conn, ctx: &Ctx, now: Instant) -> u64 {
    let gate = match ctx.gate {
        Some(g) => g.max(c.started),
        None => {
            return match c.pat {
                Pattern::Echo | Pattern::Rr => HDR.min(c.tx_total),
                _ => 0,
            }
        }
    };
    let mut lim = match c.pat {
        Pattern::Rr => {
            if c.rx < HDR {
                HDR
            } else {
                let d = c.rx - HDR;
                HDR + c.len.min(d - d % ctx.rr_size + ctx.rr_size)
            }
        }
        _ => c.tx_total,
    };
    if let (Some(r), Pattern::Echo | Pattern::Upload) = (ctx.rate, c.pat) {
        let allowed = HDR + (r as f64 * now.saturating_duration_since(gate).as_secs_f64()) as u64;
        lim = lim.min(allowed.max(HDR));
    }
    if let (Some(w), Pattern::Echo) = (ctx.window, c.pat) {
        lim = lim.min(c.rx + w.max(1));
    }
    lim.min(c.tx_total)
}

fn should_shut(c: &Conn) -> bool {
    let tx_done = c.tx == c.tx_total;
    let rx_done = c.rx == c.rx_total;
    match (c.pat, c.beh) {
        (Pattern::Upload, _) => tx_done,
        (_, Behavior::EarlyFin) => tx_done,
        (Pattern::Download, _) => rx_done,
        _ => tx_done && rx_done,
    }
}

/// Drives one client connection; `Some` when it ended.
fn pump(c: &mut Conn, ctx: &mut Ctx, now: Instant) -> Option<Outcome> {
    if !c.connected {
        match c.sock.take_error() {
            Ok(Some(e)) | Err(e) => {
                ctx.detail = format!("connect: {e}");
                return Some(Outcome::ConnectFailed);
            }
            Ok(None) => {}
        }
        match c.sock.peer_addr() {
            Ok(_) => {
                c.connected = true;
                let ms = c.started.elapsed().as_millis() as u64;
                ctx.connect_ms_max = ctx.connect_ms_max.max(ms);
            }
            Err(e) if e.kind() == ErrorKind::NotConnected => return None,
            Err(e) => {
                ctx.detail = format!("connect: {e}");
                return Some(Outcome::ConnectFailed);
            }
        }
    }
    loop {
        let mut progress = false;
        let lim = tx_limit(c, ctx, now);
        while c.tx < lim {
            let n = ((lim - c.tx) as usize).min(SCRATCH);
            fill(&c.hdr, c.seed, c.tx, &mut ctx.wbuf[..n]);
            match c.sock.write(&ctx.wbuf[..n]) {
                Ok(0) => break,
                Ok(k) => {
                    if c.pat == Pattern::Rr && c.rr_sent.is_none() && c.tx >= HDR {
                        c.rr_sent = Some(Instant::now());
                    }
                    c.tx += k as u64;
                    ctx.bytes_sent += k as u64;
                    progress = true;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    ctx.detail = format!("write at {}: {e}", c.tx);
                    return Some(if is_reset(&e) {
                        Outcome::Reset
                    } else {
                        Outcome::Error
                    });
                }
            }
        }
        if c.beh == Behavior::Reset && c.tx >= c.cut && ctx.gate.is_some() {
            let _ = SockRef::from(&c.sock).set_linger(Some(Duration::ZERO));
            return Some(Outcome::RstSent);
        }
        if !c.shut && should_shut(c) {
            if let Err(e) = c.sock.shutdown(Shutdown::Write) {
                ctx.detail = format!("shutdown: {e}");
                return Some(if is_reset(&e) {
                    Outcome::Reset
                } else {
                    Outcome::Error
                });
            }
            c.shut = true;
            progress = true;
        }
        loop {
            let cap = if c.beh == Behavior::Slow {
                (c.slow_budget as usize).min(SCRATCH)
            } else {
                SCRATCH
            };
            if cap == 0 {
                break;
            }
            match c.sock.read(&mut ctx.rbuf[..cap]) {
                Ok(0) => return Some(on_eof(c, ctx)),
                Ok(k) => {
                    progress = true;
                    if c.beh == Behavior::Slow {
                        c.slow_budget = c.slow_budget.saturating_sub(k as u64);
                    }
                    if c.pat == Pattern::Upload {
                        if c.ack.len() + k > 16 {
                            ctx.detail = "upload: more than 16 ack bytes".into();
                            return Some(Outcome::Corrupt);
                        }
                        c.ack.extend_from_slice(&ctx.rbuf[..k]);
                        continue;
                    }
                    if c.rx + k as u64 > c.rx_total {
                        ctx.detail = format!(
                            "{:?}: {} bytes past the expected {}",
                            c.pat,
                            c.rx + k as u64 - c.rx_total,
                            c.rx_total
                        );
                        return Some(Outcome::Corrupt);
                    }
                    let got = &ctx.rbuf[..k];
                    if let Some(p) = check(&c.hdr, c.seed, c.rx_base + c.rx, got, &mut ctx.scratch)
                    {
                        ctx.detail = format!(
                            "{:?}/{}: byte {} of {} differs (seed {:#x})",
                            c.pat,
                            c.beh.name(),
                            c.rx + p as u64,
                            c.rx_total,
                            c.seed
                        );
                        return Some(Outcome::Corrupt);
                    }
                    let before = c.rx;
                    c.rx += k as u64;
                    let data_new = c.rx.saturating_sub(HDR.max(before)).min(k as u64);
                    ctx.bytes_verified += if c.pat == Pattern::Download {
                        k as u64
                    } else {
                        data_new
                    };
                    if c.pat == Pattern::Rr && c.rx > HDR {
                        let d = c.rx - HDR;
                        if (d % ctx.rr_size == 0 || c.rx == c.rx_total) && c.rx == c.tx {
                            if let Some(t) = c.rr_sent.take() {
                                ctx.rr_ops += 1;
                                if ctx.rr_lat_us.len() < 2_000_000 {
                                    ctx.rr_lat_us.push(t.elapsed().as_micros() as u32);
                                }
                            }
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    ctx.detail = format!("read at {}: {e}", c.rx);
                    return Some(if is_reset(&e) {
                        Outcome::Reset
                    } else {
                        Outcome::Error
                    });
                }
            }
        }
        if !progress {
            return None;
        }
    }
}

fn on_eof(c: &mut Conn, ctx: &mut Ctx) -> Outcome {
    if c.pat == Pattern::Upload {
        if c.ack.len() < 16 {
            ctx.detail = format!("upload: EOF after {} ack bytes", c.ack.len());
            return Outcome::EofEarly;
        }
        let total = u64::from_le_bytes(c.ack[..8].try_into().unwrap_or([0; 8]));
        let bad = u64::from_le_bytes(c.ack[8..16].try_into().unwrap_or([0; 8]));
        if total != c.len || bad != u64::MAX {
            ctx.detail = format!(
                "upload: upstream saw {total} of {} bytes, first bad byte {bad}",
                c.len
            );
            return Outcome::Corrupt;
        }
        ctx.bytes_verified += c.len;
        return Outcome::Ok;
    }
    if c.rx == c.rx_total {
        Outcome::Ok
    } else {
        ctx.detail = format!(
            "{:?}/{}: EOF after {} of {} bytes",
            c.pat,
            c.beh.name(),
            c.rx,
            c.rx_total
        );
        Outcome::EofEarly
    }
}

fn parse_mix(s: &str) -> Result<Vec<(Behavior, u64)>, String> {
    let mut v = Vec::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let (name, w) = part.split_once('=').unwrap_or((part, "1"));
        let b = match name.trim() {
            "normal" => Behavior::Normal,
            "early-fin" | "halfclose" => Behavior::EarlyFin,
            "reset" => Behavior::Reset,
            "slow" => Behavior::Slow,
            other => return Err(format!("unknown behaviour '{other}'")),
        };
        let w: u64 = w
            .trim()
            .parse()
            .map_err(|_| format!("bad weight in '{part}'"))?;
        v.push((b, w));
    }
    if v.iter().map(|x| x.1).sum::<u64>() == 0 {
        return Err("--mix has no positive weight".into());
    }
    Ok(v)
}

fn open(
    a: &ClientArgs,
    idx: u64,
    rng: &mut Rng,
    mix: &[(Behavior, u64)],
) -> Result<Conn, (io::Error, Pattern, Behavior)> {
    let total_w: u64 = mix.iter().map(|x| x.1).sum();
    let mut pick = rng.below(total_w);
    let mut beh = Behavior::Normal;
    for (b, w) in mix {
        if pick < *w {
            beh = *b;
            break;
        }
        pick -= w;
    }
    let pat = match a.pattern {
        Pattern::Mixed => [
            Pattern::Echo,
            Pattern::Rr,
            Pattern::Upload,
            Pattern::Download,
        ][rng.below(4) as usize],
        p => p,
    };
    let len = match a.bytes_min {
        Some(min) if min < a.bytes => min + rng.below(a.bytes - min + 1),
        _ => a.bytes,
    };
    let seed = mix64(a.seed.wrapping_mul(0x1000_0000_01B3) ^ idx) | 1;
    let kind = match pat {
        Pattern::Upload => b'S',
        Pattern::Download => b'D',
        _ => b'E',
    };
    let hdr = header(kind, seed, len);
    let (tx_total, rx_total, rx_base) = match pat {
        Pattern::Upload => (HDR + len, 16, 0),
        Pattern::Download => (HDR, len, HDR),
        _ => (HDR + len, HDR + len, 0),
    };
    let cut = if tx_total > HDR + 1 {
        HDR + 1 + rng.below(tx_total - HDR - 1)
    } else {
        tx_total
    };
    let target = a.target[(idx % a.target.len() as u64) as usize];
    let connect = || -> io::Result<TcpStream> {
        let s = Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        s.set_nonblocking(true)?;
        s.set_nodelay(true)?;
        if let Some(r) = a.rcvbuf {
            s.set_recv_buffer_size(r)?;
        }
        if !a.bind.is_empty() {
            let ip = a.bind[(idx % a.bind.len() as u64) as usize];
            s.bind(&SocketAddr::new(ip, 0).into())?;
        }
        match s.connect(&target.into()) {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(e) => return Err(e),
        }
        Ok(TcpStream::from_std(s.into()))
    };
    let sock = connect().map_err(|e| (e, pat, beh))?;
    Ok(Conn {
        sock,
        pat,
        beh,
        hdr,
        seed,
        len,
        tx: 0,
        tx_total,
        rx: 0,
        rx_base,
        rx_total,
        cut,
        shut: false,
        connected: false,
        established: false,
        started: Instant::now(),
        ack: Vec::new(),
        rr_sent: None,
        slow_budget: 0,
    })
}

#[derive(Default)]
struct Tally {
    counts: [u64; 8],
    by_behavior: std::collections::BTreeMap<String, [u64; 8]>,
    first_bad_ms: u64,
    last_bad_ms: u64,
    last_end_ms: u64,
    details: Vec<String>,
}

impl Tally {
    fn add(&mut self, o: Outcome, pat: Pattern, beh: Behavior, detail: &str) {
        let i = OUTCOMES.iter().position(|x| x.0 == o).unwrap_or(7);
        self.counts[i] += 1;
        let key = format!("{:?}/{}", pat, beh.name()).to_lowercase();
        self.by_behavior.entry(key).or_insert([0; 8])[i] += 1;
        let now = epoch_ms();
        self.last_end_ms = now;
        if !matches!(o, Outcome::Ok | Outcome::RstSent) {
            if self.first_bad_ms == 0 {
                self.first_bad_ms = now;
            }
            self.last_bad_ms = now;
            if self.details.len() < 8 && !detail.is_empty() {
                self.details.push(format!("{o:?}: {detail}"));
            }
        }
    }
    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
    fn bad(&self) -> u64 {
        self.counts[2..].iter().sum()
    }
}

fn clients(a: ClientArgs) -> io::Result<()> {
    let mix = parse_mix(&a.mix).map_err(io::Error::other)?;
    if a.n == 0 && a.duration.is_none() {
        return Err(io::Error::other("-n 0 needs --duration"));
    }
    let limit = raise_nofile();
    let conc = a.concurrency.unwrap_or(a.n).max(1);
    let gated = a.barrier || a.hold > 0.0 || a.hold_until.is_some();
    let mut poll = Poll::new()?;
    let mut events = Events::with_capacity(8192);
    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut rng = Rng(a.seed ^ 0x5EED);
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(a.deadline);
    let churn_end = a.duration.map(|d| start + Duration::from_secs_f64(d));
    let tick = Duration::from_millis(a.tick_ms.max(1));
    let mut ctx = Ctx {
        gate: if gated { None } else { Some(start) },
        rate: a.rate,
        window: a.window,
        est_ms_min: u64::MAX,
        est_ms_max: 0,
        rr_size: a.rr_size.max(1),
        wbuf: vec![0; SCRATCH],
        rbuf: vec![0; SCRATCH],
        scratch: vec![0; SCRATCH],
        bytes_sent: 0,
        bytes_verified: 0,
        rr_lat_us: Vec::new(),
        rr_ops: 0,
        connect_ms_max: 0,
        detail: String::new(),
    };
    let mut tally = Tally::default();
    let (mut started, mut active, mut connecting, mut established, mut tcp_connected) =
        (0u64, 0u64, 0u64, 0u64, 0u64);
    let mut established_at: Option<Instant> = None;
    let mut last_tick = Instant::now();
    let mut last_progress = Instant::now();
    let mut timed_out = false;
    eprintln!(
        "loadgen clients: n={} concurrency={conc} bytes={} pattern={:?} mix={} nofile={limit}",
        a.n, a.bytes, a.pattern, a.mix
    );
    loop {
        let now = Instant::now();
        // Open new connections.
        let may_open = |started: u64| -> bool {
            if let Some(end) = churn_end {
                now < end && (a.n == 0 || started < a.n)
            } else {
                started < a.n
            }
        };
        while may_open(started)
            && active < conc
            && connecting < a.max_connecting
            && (!gated || ctx.gate.is_none())
        {
            let idx = started;
            started += 1;
            match open(&a, idx, &mut rng, &mix) {
                Ok(mut c) => {
                    let slot = free.pop().unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    poll.registry().register(
                        &mut c.sock,
                        Token(slot),
                        Interest::READABLE | Interest::WRITABLE,
                    )?;
                    conns[slot] = Some(c);
                    active += 1;
                    connecting += 1;
                }
                Err((e, pat, beh)) => {
                    tally.add(Outcome::ConnectFailed, pat, beh, &format!("connect: {e}"));
                }
            }
        }
        let all_opened = !may_open(started);
        if active == 0 && all_opened {
            break;
        }
        if now >= deadline {
            timed_out = true;
            break;
        }
        let wait = tick.saturating_sub(now.saturating_duration_since(last_tick));
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() != ErrorKind::Interrupted {
                return Err(e);
            }
        }
        let now = Instant::now();
        let mut todo: Vec<usize> = events.iter().map(|e| e.token().0).collect();
        let is_tick = now.saturating_duration_since(last_tick) >= tick;
        if is_tick {
            last_tick = now;
            let gate_changed;
            // Gate: release after the barrier (everyone established) and the hold.
            if ctx.gate.is_none() {
                if established_at.is_none() && all_opened && connecting == 0 {
                    let pending_probe = conns.iter().flatten().filter(|c| !c.established).count();
                    if pending_probe == 0 {
                        established_at = Some(now);
                        eprintln!(
                            "ESTABLISHED established={established} active={active} failed={} t={:.3}",
                            tally.bad(),
                            start.elapsed().as_secs_f64()
                        );
                    }
                }
                if let Some(at) = established_at {
                    let by_file = a.hold_until.as_ref().is_some_and(|p| p.exists());
                    let by_time = a.hold > 0.0 && now.duration_since(at).as_secs_f64() >= a.hold;
                    let no_hold = a.hold <= 0.0 && a.hold_until.is_none();
                    if by_file || by_time || no_hold {
                        ctx.gate = Some(now);
                        eprintln!("RELEASED t={:.3}", start.elapsed().as_secs_f64());
                    }
                }
                gate_changed = ctx.gate.is_some();
            } else {
                gate_changed = false;
            }
            for (i, slot) in conns.iter_mut().enumerate() {
                if let Some(c) = slot {
                    let mut wake = gate_changed;
                    if c.beh == Behavior::Slow {
                        c.slow_budget = a.slow_chunk;
                        wake = true;
                    }
                    if ctx.rate.is_some() || c.pat == Pattern::Rr {
                        wake = true;
                    }
                    if a.conn_deadline > 0.0
                        && now.duration_since(c.started).as_secs_f64() > a.conn_deadline
                    {
                        wake = true;
                    }
                    if wake {
                        todo.push(i);
                    }
                }
            }
        }
        todo.sort_unstable();
        todo.dedup();
        for i in todo {
            let Some(c) = conns.get_mut(i).and_then(|c| c.as_mut()) else {
                continue;
            };
            let was_connected = c.connected;
            ctx.detail.clear();
            let mut res = pump(c, &mut ctx, now);
            if !was_connected && (c.connected || res.is_some()) {
                connecting -= 1;
                if c.connected {
                    tcp_connected += 1;
                }
            }
            if !c.established && c.connected {
                let up = match c.pat {
                    Pattern::Echo | Pattern::Rr => c.rx >= HDR.min(c.rx_total),
                    _ => true,
                };
                if up {
                    c.established = true;
                    established += 1;
                    let ms = now.duration_since(c.started).as_millis() as u64;
                    ctx.est_ms_min = ctx.est_ms_min.min(ms);
                    ctx.est_ms_max = ctx.est_ms_max.max(ms);
                }
            }
            if res.is_none()
                && a.conn_deadline > 0.0
                && now.duration_since(c.started).as_secs_f64() > a.conn_deadline
            {
                ctx.detail = format!(
                    "{:?}/{}: still open after {:.1}s (tx {}/{} rx {}/{})",
                    c.pat,
                    c.beh.name(),
                    a.conn_deadline,
                    c.tx,
                    c.tx_total,
                    c.rx,
                    c.rx_total
                );
                res = Some(Outcome::Timeout);
            }
            if let Some(o) = res {
                if let Some(mut c) = conns[i].take() {
                    let _ = poll.registry().deregister(&mut c.sock);
                    tally.add(o, c.pat, c.beh, &ctx.detail);
                }
                free.push(i);
                active -= 1;
            }
        }
        if a.progress > 0.0 && last_progress.elapsed().as_secs_f64() >= a.progress {
            last_progress = Instant::now();
            eprintln!(
                "progress t={:.1} started={started} connected={tcp_connected} established={established} active={active} ok={} bad={} verified={}",
                start.elapsed().as_secs_f64(),
                tally.counts[0] + tally.counts[1],
                tally.bad(),
                ctx.bytes_verified
            );
        }
    }
    if timed_out {
        for slot in conns.iter_mut() {
            if let Some(c) = slot.take() {
                let d = format!(
                    "{:?}/{}: open at the deadline (tx {}/{} rx {}/{})",
                    c.pat,
                    c.beh.name(),
                    c.tx,
                    c.tx_total,
                    c.rx,
                    c.rx_total
                );
                tally.add(Outcome::Timeout, c.pat, c.beh, &d);
            }
        }
    }
    let mut lat = std::mem::take(&mut ctx.rr_lat_us);
    lat.sort_unstable();
    let pct = |p: f64| -> u64 {
        if lat.is_empty() {
            0
        } else {
            lat[((lat.len() - 1) as f64 * p) as usize] as u64
        }
    };
    let mut summary = json!({
        "connections": tally.total(),
        "tcp_connected": tcp_connected,
        "established": established,
        "bytes_sent": ctx.bytes_sent,
        "bytes_verified": ctx.bytes_verified,
        "elapsed_ms": start.elapsed().as_millis() as u64,
        "connect_ms_max": ctx.connect_ms_max,
        "est_ms_min": if established == 0 { 0 } else { ctx.est_ms_min },
        "est_ms_max": ctx.est_ms_max,
        "start_ms": epoch_ms() - start.elapsed().as_millis() as u64,
        "first_bad_ms": tally.first_bad_ms,
        "last_bad_ms": tally.last_bad_ms,
        "last_end_ms": tally.last_end_ms,
        "rr_ops": ctx.rr_ops,
        "rr_p50_us": pct(0.5),
        "rr_p99_us": pct(0.99),
        "errors": tally.bad(),
        "deadline_hit": timed_out,
        "details": tally.details,
    });
    for (i, (_, name)) in OUTCOMES.iter().enumerate() {
        summary[*name] = json!(tally.counts[i]);
    }
    let mut by = serde_json::Map::new();
    for (k, v) in &tally.by_behavior {
        let mut m = serde_json::Map::new();
        for (i, (_, name)) in OUTCOMES.iter().enumerate() {
            if v[i] > 0 {
                m.insert((*name).into(), json!(v[i]));
            }
        }
        by.insert(k.clone(), serde_json::Value::Object(m));
    }
    summary["by_kind"] = serde_json::Value::Object(by);
    println!("{summary}");
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Upstream(a) => upstream(a),
        Cmd::Clients(a) => clients(a),
    };
    if let Err(e) = res {
        eprintln!("loadgen: {e}");
        std::process::exit(2);
    }
}
