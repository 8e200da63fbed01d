//! The log's writer: lines are appended to a buffer in memory by the thread
//! that logs them (a worker, for the line each relay logs as it closes) and
//! written to stderr by a thread of their own, many lines per write(2).
//!
//! A worker then pays for formatting its line and copying it into the
//! buffer, under a lock no other thread holds for longer than a swap: no
//! system call, no allocation once the buffer has grown. The writer thread
//! looks at the buffer every [`TICK`] while lines come, and writes what
//! gathered; after [`PARK_AFTER`] ticks without a line it sleeps until the
//! next one, whose logger wakes it (one system call, the only one a line
//! can cost its logger). An idle proxy has no timer running for its log.
//!
//! Nothing is dropped: past [`HIGH_WATER`] bytes not yet written (stderr
//! blocks, say, on a full pipe to a stopped journal reader), the logging
//! thread waits for room, as it would have waited in write(2) itself.
//! The buffer is written at exit ([`Flush`]'s drop, or [`flush`] before
//! `std::process::exit`); a process killed with SIGKILL loses at most the
//! last [`TICK`] of lines.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

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

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
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
        while pending.bytes.len() >= HIGH_WATER && !pending.closing {
            pending = self.room.wait(pending).unwrap_or_else(|p| p.into_inner());
        }
        pending.bytes.extend_from_slice(line);
        let wake = std::mem::take(&mut pending.parked);
        drop(pending);
        if wake {
            self.lines.notify_one();
        }
    }

    /// The writer thread: looks for lines every tick, writes them, and
    /// parks when none came for a while.
    fn run(&self) {
        let mut spare = Vec::new();
        let mut idle = 0;
        loop {
            let mut pending = self.lock();
            if pending.bytes.is_empty() && !pending.closing {
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
            std::mem::swap(&mut pending.bytes, &mut spare);
            drop(pending);
            self.room.notify_all();
            // Where stderr cannot be written, there is nowhere to say so.
            let _ = io::stderr().lock().write_all(&spare);
            spare.clear();
            if closing && self.lock().bytes.is_empty() {
                return;
            }
        }
    }

    /// Writes what is pending now, from the calling thread; with `direct`,
    /// every later line too.
    fn flush(&self, direct: bool) {
        let mut pending = self.lock();
        pending.direct |= direct;
        let _ = io::stderr().lock().write_all(&pending.bytes);
        pending.bytes.clear();
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

/// Writes every pending line now: for a path that leaves with
/// `std::process::exit`, which runs no destructor.
pub fn flush() {
    if let Some(inner) = WRITER.get() {
        inner.flush(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_kept_in_order_and_nothing_is_lost_past_the_high_water_mark() {
        let inner = Inner {
            pending: Mutex::new(Pending::default()),
            lines: Condvar::new(),
            room: Condvar::new(),
        };
        inner.append(b"one\n");
        inner.append(b"two\n");
        assert_eq!(inner.lock().bytes, b"one\ntwo\n");
        // Closing lets a thread past the mark append instead of waiting.
        inner.lock().closing = true;
        let big = vec![b'x'; HIGH_WATER];
        inner.append(&big);
        inner.append(b"three\n");
        assert_eq!(inner.lock().bytes.len(), 8 + HIGH_WATER + 6);
    }
}
