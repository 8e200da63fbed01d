//! The log's writer: lines are appended to a buffer in memory by the thread
//! that logs them (a worker, for the line each relay logs as it closes) and
//! written to stderr by a thread of their own, many lines per write(2).
//!
//! A thread pays for formatting its line and copying it into the buffer,
//! under a lock no other thread holds for longer than a swap: no system
//! call, no allocation once the buffer has grown. A relay's `relay closed`
//! line costs its worker less: with the text format, the worker queues the
//! line's fields as they are ([`QueuedClose`], its names copied into one
//! shared string) and the writer thread formats the queued lines in a
//! batch, where that code stays warm, into the bytes the event would have
//! had (`logfmt::write_closed_line`), each in its place among the other
//! lines. The writer thread looks at the buffer every [`TICK`] while lines
//! come, and writes what gathered; after [`PARK_AFTER`] ticks without a
//! line it sleeps until the next one, whose logger wakes it (one system
//! call, the only one a line can cost its logger). An idle proxy has no
//! timer running for its log.
//!
//! Nothing is dropped: past [`HIGH_WATER`] bytes not yet written (stderr
//! blocks, say, on a full pipe to a stopped journal reader), the logging
//! thread waits for room, as it would have waited in write(2) itself.
//! The buffer is written at exit ([`Flush`]'s drop, or [`flush`] before
//! `std::process::exit`); a process killed with SIGKILL loses at most the
//! last [`TICK`] of lines.

use std::io::{self, Write};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tracing_subscriber::fmt::MakeWriter;

use super::logfmt;
use crate::error::RelayError;
use crate::relay::report::{self, ClosedLine, Traffic};
use crate::stats::CloseReason;

/// The name of the writer thread (the bench adds its CPU time to the
/// proxy's).
pub const THREAD_NAME: &str = "spliced-log";
/// How often the writer looks for lines while they come: the most a line
/// waits before it is written.
pub const TICK: Duration = Duration::from_millis(5);
/// Ticks without a line after which the writer sleeps until woken.
const PARK_AFTER: u32 = 200;
/// Bytes waiting past which a logging thread waits for the writer.
const HIGH_WATER: usize = 1 << 20;
/// What a queued close line counts for against [`HIGH_WATER`]: about
/// the bytes it becomes.
const QUEUED_CLOSE_BYTES: usize = 256;

/// A relay's close line as its worker queued it: the fields of its
/// [`ClosedLine`], its names kept in its [`Batch`]'s `names`.
struct QueuedClose {
    /// How many of the batch's `bytes` were logged before it.
    at: usize,
    /// When it was logged.
    time: SystemTime,
    relay: u64,
    client: Option<SocketAddr>,
    listener: Range<usize>,
    upstream: Option<SocketAddr>,
    traffic: Option<Traffic>,
    route: Option<usize>,
    server_name: Option<Range<usize>>,
    reason: CloseReason,
    /// A copy (`RelayError::duplicate`: no allocation for an OS error).
    error: Option<RelayError>,
}

impl QueuedClose {
    fn line<'a>(&'a self, names: &'a str) -> ClosedLine<'a> {
        ClosedLine {
            relay: self.relay,
            client: self.client,
            listener: &names[self.listener.clone()],
            upstream: self.upstream,
            traffic: self.traffic,
            route: self.route,
            server_name: self.server_name.clone().map(|r| &names[r]),
            reason: self.reason,
            error: self.error.as_ref(),
        }
    }
}

/// Lines not yet written, in the order they were logged.
#[derive(Default)]
struct Batch {
    /// Formatted lines.
    bytes: Vec<u8>,
    /// Close lines not yet formatted, each to go after the first `at` of
    /// `bytes`, in the order logged.
    closes: Vec<QueuedClose>,
    /// The listener and server names of `closes`.
    names: String,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.bytes.is_empty() && self.closes.is_empty()
    }

    /// About the bytes the batch will write.
    fn size(&self) -> usize {
        self.bytes.len() + self.closes.len() * QUEUED_CLOSE_BYTES
    }

    fn clear(&mut self) {
        self.bytes.clear();
        self.closes.clear();
        self.names.clear();
    }

    /// Queues `line`, logged at `time`, after the lines queued so far.
    fn push_close(&mut self, line: &ClosedLine<'_>, time: SystemTime, error: Option<RelayError>) {
        let listener = self.push_name(line.listener);
        let server_name = line.server_name.map(|name| self.push_name(name));
        self.closes.push(QueuedClose {
            at: self.bytes.len(),
            time,
            relay: line.relay,
            client: line.client,
            listener,
            upstream: line.upstream,
            traffic: line.traffic,
            route: line.route,
            server_name,
            reason: line.reason,
            error,
        });
    }

    fn push_name(&mut self, name: &str) -> Range<usize> {
        let start = self.names.len();
        self.names.push_str(name);
        start..self.names.len()
    }

    /// Writes every line to `out` with one `write_all`, formatting the
    /// close lines through `text` and `joined` (kept for the next batch).
    fn write_to(&self, out: &mut impl Write, text: &mut String, joined: &mut Vec<u8>) {
        if self.closes.is_empty() {
            // Where stderr cannot be written, there is nowhere to say so.
            let _ = out.write_all(&self.bytes);
            return;
        }
        joined.clear();
        let mut written = 0;
        for close in &self.closes {
            joined.extend_from_slice(&self.bytes[written..close.at]);
            written = close.at;
            text.clear();
            // Formatting into a String fails only if a Display impl does;
            // the line is then written as far as it got.
            let _ = logfmt::write_closed_line(text, close.time, &close.line(&self.names));
            joined.extend_from_slice(text.as_bytes());
        }
        joined.extend_from_slice(&self.bytes[written..]);
        let _ = out.write_all(joined);
    }
}

#[derive(Default)]
struct Pending {
    batch: Batch,
    /// The writer thread writes what is left and stops.
    closing: bool,
    /// No writer thread (it stopped, or could not start): each line is
    /// written by the thread that logs it, as plain stderr would be.
    direct: bool,
    /// The writer sleeps until a line wakes it.
    parked: bool,
}

struct Inner {
    pending: Mutex<Pending>,
    /// The writer waits here for lines.
    lines: Condvar,
    /// Logging threads wait here for room past the high water mark.
    room: Condvar,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A thread that panicked holding the lock left whole lines behind it
        // (extend_from_slice does not unwind midway): keep using them.
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append(&self, line: &[u8]) {
        let mut pending = self.lock();
        if pending.direct {
            // Under the lock, so lines keep their order.
            let _ = io::stderr().lock().write_all(line);
            return;
        }
        pending = self.wait_for_room(pending);
        pending.batch.bytes.extend_from_slice(line);
        self.wake_writer(pending);
    }

    /// Queues a relay's close line to be formatted by the writer thread.
    fn append_close(&self, line: &ClosedLine<'_>) {
        let time = SystemTime::now();
        let error = line.error.map(RelayError::duplicate);
        let mut pending = self.lock();
        if pending.direct {
            let mut text = String::new();
            let _ = logfmt::write_closed_line(&mut text, time, line);
            let _ = io::stderr().lock().write_all(text.as_bytes());
            return;
        }
        pending = self.wait_for_room(pending);
        pending.batch.push_close(line, time, error);
        self.wake_writer(pending);
    }

    fn wait_for_room<'a>(&self, mut pending: MutexGuard<'a, Pending>) -> MutexGuard<'a, Pending> {
        while pending.batch.size() >= HIGH_WATER && !pending.closing {
            pending = self.room.wait(pending).unwrap_or_else(|p| p.into_inner());
        }
        pending
    }

    fn wake_writer(&self, mut pending: MutexGuard<'_, Pending>) {
        let wake = std::mem::take(&mut pending.parked);
        drop(pending);
        if wake {
            self.lines.notify_one();
        }
    }

    /// The writer thread: looks for lines every tick, writes them, and
    /// parks when none came for a while.
    fn run(&self) {
        let mut spare = Batch::default();
        let (mut text, mut joined) = (String::new(), Vec::new());
        let mut idle = 0;
        loop {
            let mut pending = self.lock();
            if pending.batch.is_empty() && !pending.closing {
                if idle < PARK_AFTER {
                    idle += 1;
                    drop(self.lines.wait_timeout(pending, TICK));
                    continue;
                }
                pending.parked = true;
                while pending.parked && !pending.closing {
                    pending = self.lines.wait(pending).unwrap_or_else(|p| p.into_inner());
                }
                pending.parked = false;
                idle = 0;
                continue;
            }
            idle = 0;
            let closing = pending.closing;
            std::mem::swap(&mut pending.batch, &mut spare);
            drop(pending);
            self.room.notify_all();
            spare.write_to(&mut io::stderr().lock(), &mut text, &mut joined);
            spare.clear();
            if closing && self.lock().batch.is_empty() {
                return;
            }
        }
    }

    /// Writes what is pending now, from the calling thread; with `direct`,
    /// every later line too.
    fn flush(&self, direct: bool) {
        let mut pending = self.lock();
        pending.direct |= direct;
        let (mut text, mut joined) = (String::new(), Vec::new());
        pending
            .batch
            .write_to(&mut io::stderr().lock(), &mut text, &mut joined);
        pending.batch.clear();
        drop(pending);
        self.room.notify_all();
    }
}

static WRITER: OnceLock<Arc<Inner>> = OnceLock::new();

/// The `MakeWriter` the log's subscriber writes through.
#[derive(Clone)]
pub struct Writer(Arc<Inner>);

/// One formatted line's writer (the fmt layer writes each event with one
/// `write_all`).
pub struct LineWriter<'a>(&'a Inner);

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.append(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for Writer {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.0)
    }
}

/// Writes what is left when dropped, and stops the writer thread.
pub struct Flush {
    inner: Arc<Inner>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Flush {
    fn drop(&mut self) {
        self.inner.lock().closing = true;
        self.inner.lines.notify_one();
        self.inner.room.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        // Lines logged after the thread's last look, and any later.
        self.inner.flush(true);
    }
}

/// Starts the writer thread. Without one (the thread cannot be spawned),
/// lines are written by the thread that logs them, as stderr would be.
pub fn start() -> (Writer, Flush) {
    let inner = Arc::new(Inner {
        pending: Mutex::new(Pending::default()),
        lines: Condvar::new(),
        room: Condvar::new(),
    });
    let _ = WRITER.set(Arc::clone(&inner));
    let runner = Arc::clone(&inner);
    let thread = std::thread::Builder::new()
        .name(THREAD_NAME.into())
        .spawn(move || runner.run())
        .ok();
    if thread.is_none() {
        inner.lock().direct = true;
    }
    (Writer(Arc::clone(&inner)), Flush { inner, thread })
}

/// Has relays queue their close lines' fields for the writer thread to
/// format, instead of logging them as `tracing` events: for the text
/// format, after [`start`] and once the subscriber is installed (which
/// still decides whether a close line is logged). `false` if there is no
/// writer or the lines went elsewhere already.
pub fn queue_closed_lines() -> bool {
    WRITER.get().is_some() && report::divert_closed_lines(queue_closed_line)
}

fn queue_closed_line(line: &ClosedLine<'_>) {
    if let Some(inner) = WRITER.get() {
        inner.append_close(line);
    }
}

/// Writes every pending line now: for a path that leaves with
/// `std::process::exit`, which runs no destructor.
pub fn flush() {
    if let Some(inner) = WRITER.get() {
        inner.flush(false);
    }
}

#[cfg(test)]
mod tests;

/// For `benches/logline.rs`: a queue with no writer thread.
#[doc(hidden)]
pub struct BenchQueue {
    inner: Inner,
    text: String,
    joined: Vec<u8>,
}

#[doc(hidden)]
impl BenchQueue {
    pub fn new() -> BenchQueue {
        BenchQueue {
            inner: Inner {
                pending: Mutex::new(Pending::default()),
                lines: Condvar::new(),
                room: Condvar::new(),
            },
            text: String::new(),
            joined: Vec::new(),
        }
    }

    /// Queues the bench's close line, as a worker does.
    pub fn queue(&self, relay: u64, client: SocketAddr, upstream: SocketAddr) {
        self.inner.append_close(&ClosedLine {
            relay,
            client: Some(client),
            listener: "127.0.0.1:6432",
            upstream: Some(upstream),
            traffic: Some(Traffic {
                bytes_c2u: 72,
                bytes_u2c: 64,
                duration_ms: 1,
                engine_c2u: "splice",
                engine_u2c: "splice",
            }),
            route: None,
            server_name: None,
            reason: CloseReason::Eof,
            error: None,
        });
    }

    pub fn len(&self) -> usize {
        self.inner.lock().batch.closes.len()
    }

    /// Formats what is queued into `out`, as the writer thread does, and
    /// empties the queue.
    pub fn write_to(&mut self, out: &mut Vec<u8>) {
        let mut pending = self.inner.pending.lock().unwrap();
        pending
            .batch
            .write_to(out, &mut self.text, &mut self.joined);
        pending.batch.clear();
    }

    pub fn clear(&self) {
        self.inner.lock().batch.clear();
    }
}
