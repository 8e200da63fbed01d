//! io_uring as a batch of socket reads and writes: one `io_uring_enter`
//! submits every operation of a batch and collects every result.
//!
//! The `uring` worker loop uses it to read the sockets an epoll wakeup
//! reported and to write what its relays queued, many connections per
//! system call instead of one call per socket. Every operation carries
//! `MSG_DONTWAIT`, so none waits for readiness: each completes while it is
//! submitted (with `-EAGAIN` where a plain non-blocking call would say
//! EAGAIN), and readiness stays epoll's business.
//!
//! A batch of one operation is made as a plain recv(2) or send(2): one
//! system call either way, and the plain one is cheaper.
//!
//! [`Ring::run`] owns the operations' buffers for the whole call and
//! returns only once the kernel has answered every operation it was given,
//! so no buffer can be freed or moved while the kernel may still use it.
//! If the ring itself fails past the point where operations were handed to
//! the kernel, the batch is leaked rather than freed ([`RingFailed`]).
//!
//! The ring also carries the loop's waiting ([`Ring::wait`]): it polls the
//! worker's epoll fd and holds receives that wait for data
//! ([`Ring::arm_recv`]), each into a buffer of the ring's own provided-buffer
//! group, so the kernel never writes into memory a relay owns. Their
//! completions wait in the ring ([`Ring::take_received`]) until the worker
//! copies each buffer out and gives it back ([`Ring::recycle`]).

use std::io;
use std::ops::Range;
use std::os::fd::RawFd;

use std::time::Duration;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

mod recv_buffers;
use recv_buffers::RecvBuffers;
pub use recv_buffers::RECV_BUFFER_SIZE;

/// Submission queue entries of a worker's ring; a longer batch is run in
/// chunks of this many.
const ENTRIES: u32 = 256;

/// The provided-buffer group's id.
const GROUP: u16 = 0;

/// What a completion's `user_data` says it answers: with the top bit
/// clear, an armed receive (the caller's tag: the worker's relay tokens
/// have that bit clear too); with it set, bits 61..63 name a batch's
/// operation (its index in the low bits), the epoll fd's poll or a
/// cancellation.
const OURS: u64 = 1 << 63;
const KIND: u64 = OURS | (3 << 61);
const BATCH: u64 = OURS;
const EPOLL: u64 = OURS | (1 << 61);
const CANCEL: u64 = OURS | (2 << 61);
const INDEX: u64 = (1 << 61) - 1;
/// The bits of an armed receive's tag.
pub const TAG_BITS: u64 = !OURS;

/// What one operation does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// recv(2) into `buf[range]`.
    Recv,
    /// send(2) of `buf[range]` (`MSG_NOSIGNAL`).
    Send,
}

/// One operation of a batch. `result` is what the call returned: the bytes
/// moved, or a negated errno.
#[derive(Debug)]
pub struct IoOp<B> {
    pub fd: RawFd,
    pub kind: IoKind,
    pub buf: B,
    pub range: Range<usize>,
    pub result: i32,
}

/// The ring failed after operations were handed to the kernel: their
/// buffers were leaked (the kernel may still write into them), and the ring
/// must not be used again.
#[derive(Debug)]
pub struct RingFailed(pub io::Error);

/// An armed receive's answer: the caller's tag, the recv's return (bytes,
/// 0 for EOF, or a negated errno) and the provided buffer holding the bytes.
#[derive(Debug)]
pub struct Received {
    pub tag: u64,
    pub result: i32,
    buffer: Option<u16>,
}

/// One worker's ring. Not shared: the worker thread alone submits.
pub struct Ring {
    // Dropped first: the kernel lets go of the buffers below with the ring.
    ring: IoUring,
    /// The provided-buffer group armed receives fill.
    buffers: RecvBuffers,
    /// Receives answered and not yet taken.
    received: Vec<Received>,
    /// The epoll fd polled (multishot), whether that poll is armed, and
    /// whether it fired since the worker last read epoll.
    epoll: Option<RawFd>,
    epoll_armed: bool,
    epoll_ready: bool,
    /// Made disabled, not yet enabled by the thread that uses it.
    disabled: bool,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").finish_non_exhaustive()
    }
}

impl Ring {
    /// io_uring_setup(2). Fails where io_uring cannot be used: the
    /// `kernel.io_uring_disabled` sysctl, a seccomp profile that forbids
    /// it (EPERM, ENOSYS), a kernel without it, or no memory to lock.
    /// Also registers the provided-buffer group (5.19+). The ring runs
    /// its task work (what answers an armed receive or the epoll poll)
    /// only when its thread waits in it (`DEFER_TASKRUN`, 6.1+), so the
    /// kernel never interrupts a busy worker to post a completion; such a
    /// ring is made disabled and taken by the first thread that uses it
    /// (`SINGLE_ISSUER`). An older kernel gets a plain ring.
    pub fn new() -> io::Result<Ring> {
        Ring::with(true).or_else(|_| Ring::with(false))
    }

    fn with(deferred: bool) -> io::Result<Ring> {
        let ring = if deferred {
            IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .setup_taskrun_flag()
                .setup_r_disabled()
                .build(ENTRIES)?
        } else {
            IoUring::new(ENTRIES)?
        };
        let buffers = RecvBuffers::register(&ring, GROUP)?;
        Ok(Ring {
            ring,
            buffers,
            received: Vec::new(),
            epoll: None,
            epoll_armed: false,
            epoll_ready: false,
            disabled: deferred,
        })
    }

    /// Enables a ring made disabled, for the calling thread: the only one
    /// that may submit to it from then on.
    fn start(&mut self) -> io::Result<()> {
        if self.disabled {
            self.ring.submitter().register_enable_rings()?;
            self.disabled = false;
        }
        Ok(())
    }

    /// Waits on the worker's epoll fd too: [`wait`](Self::wait) returns
    /// when it has events, and [`take_epoll_ready`](Self::take_epoll_ready)
    /// says so.
    pub fn watch_epoll(&mut self, epfd: RawFd) {
        self.epoll = Some(epfd);
        self.epoll_armed = false;
        self.epoll_ready = true;
    }

    /// The worker read epoll and more events may wait: the next wait
    /// does not sleep.
    pub fn epoll_has_more(&mut self) {
        self.epoll_ready = true;
    }

    /// Whether the epoll fd fired since the last call.
    pub fn take_epoll_ready(&mut self) -> bool {
        std::mem::take(&mut self.epoll_ready)
    }

    /// Queues a receive of at most `len` bytes from `fd` into one of the
    /// group's buffers, which waits for data; its answer comes back with
    /// `tag` (within [`TAG_BITS`]) from [`take_received`](Self::take_received).
    /// Submitted with the next [`wait`](Self::wait).
    pub fn arm_recv(&mut self, fd: RawFd, tag: u64, len: u32) -> io::Result<()> {
        let len = len.min(RECV_BUFFER_SIZE as u32);
        let entry = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), len)
            .buf_group(GROUP)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(tag & TAG_BITS);
        self.push(&entry)
    }

    /// Queues the cancellation of the receive armed with `tag`; its answer
    /// (`-ECANCELED`, or the bytes it got first) still comes back.
    pub fn cancel_recv(&mut self, tag: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(tag & TAG_BITS)
            .build()
            .user_data(CANCEL);
        self.push(&entry)
    }

    /// Submits what is queued and waits, at most `timeout` (`None`: no
    /// limit), for a receive's answer or an epoll event, unless one is
    /// already there.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.start()?;
        if let (Some(epfd), false) = (self.epoll, self.epoll_armed) {
            let entry = opcode::PollAdd::new(types::Fd(epfd), libc::POLLIN as u32)
                .multi(true)
                .build()
                .user_data(EPOLL);
            self.push(&entry)?;
            self.epoll_armed = true;
        }
        let ready = !self.received.is_empty() || self.epoll_ready;
        let submitted = match timeout {
            _ if ready => self.ring.submit(),
            Some(t) if t.is_zero() => self.ring.submit(),
            Some(t) => {
                let ts = types::Timespec::from(t);
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submit_and_wait(1),
        };
        // ETIME: the wait ended at its timeout.
        not_now(submitted, &[libc::ETIME])?;
        self.reap_others::<Vec<u8>>(&mut []);
        Ok(())
    }

    /// The receives answered since the last call, into `into` (emptied
    /// first; the two vectors swap, so neither allocates once grown).
    pub fn take_received(&mut self, into: &mut Vec<Received>) {
        into.clear();
        std::mem::swap(into, &mut self.received);
    }

    /// The bytes an answered receive put in its buffer.
    pub fn bytes(&self, received: &Received) -> &[u8] {
        match (received.buffer, usize::try_from(received.result)) {
            (Some(bid), Ok(n)) => self.buffers.bytes(bid, n),
            _ => &[],
        }
    }

    /// Gives an answered receive's buffer back to the group.
    pub fn recycle(&mut self, received: Received) {
        if let Some(bid) = received.buffer {
            self.buffers.provide(bid);
        }
    }

    /// Queues `entry`, submitting what is queued first when the queue is
    /// full.
    fn push(&mut self, entry: &squeue::Entry) -> io::Result<()> {
        self.start()?;
        loop {
            // SAFETY: an armed receive points at no memory of ours (the
            // kernel picks a buffer of the registered group); a poll and a
            // cancellation point at none at all.
            if unsafe { self.ring.submission().push(entry) }.is_ok() {
                return Ok(());
            }
            not_now(self.ring.submit(), &[])?;
            self.reap_others::<Vec<u8>>(&mut []);
        }
    }

    /// Takes every completion there is: a batch's into `batch` (by index;
    /// returns how many), the others into the ring's own state.
    fn reap_others<B>(&mut self, batch: &mut [IoOp<B>]) -> usize {
        let mut answered = 0;
        for cqe in self.ring.completion() {
            let data = cqe.user_data();
            if data & OURS == 0 {
                self.received.push(Received {
                    tag: data,
                    result: cqe.result(),
                    buffer: cqueue::buffer_select(cqe.flags()),
                });
                continue;
            }
            match data & KIND {
                BATCH => {
                    if let Some(op) = batch.get_mut((data & INDEX) as usize) {
                        if op.result == i32::MIN {
                            op.result = cqe.result();
                            answered += 1;
                        }
                    }
                }
                EPOLL => {
                    self.epoll_ready = true;
                    if !cqueue::more(cqe.flags()) {
                        self.epoll_armed = false;
                    }
                }
                // A cancellation's own answer says nothing the receive's
                // answer does not.
                _ => {}
            }
        }
        answered
    }

    /// Runs every operation and records each one's result. `Err` only when
    /// the ring broke: then nothing of the batch is given back.
    pub fn run<B: AsMut<[u8]>>(
        &mut self,
        mut ops: Vec<IoOp<B>>,
    ) -> Result<Vec<IoOp<B>>, RingFailed> {
        if let [op] = ops.as_mut_slice() {
            // One call costs less as itself than as a submission.
            op.result = plain_call(op);
            return Ok(ops);
        }
        let chunk = ENTRIES as usize;
        let mut first = 0;
        while first < ops.len() {
            let last = (first + chunk).min(ops.len());
            if let Err(e) = self.run_chunk(&mut ops[first..last]) {
                // The kernel may still hold pointers into these buffers.
                std::mem::forget(ops);
                return Err(RingFailed(e));
            }
            first = last;
        }
        Ok(ops)
    }

    /// Submits `ops` (at most [`ENTRIES`]) and waits for all their
    /// completions. On `Err`, some may still be in the kernel's hands.
    fn run_chunk<B: AsMut<[u8]>>(&mut self, ops: &mut [IoOp<B>]) -> io::Result<()> {
        self.start()?;
        // Armed receives and polls queued since the last submission go
        // first, so the chunk has the whole queue.
        while !self.ring.submission().is_empty() {
            not_now(self.ring.submit(), &[])?;
            self.reap_others::<B>(&mut []);
        }
        {
            let mut sq = self.ring.submission();
            for (i, op) in ops.iter_mut().enumerate() {
                let len = op.range.len();
                let Some(bytes) = op.buf.as_mut().get_mut(op.range.clone()) else {
                    op.result = -libc::EINVAL;
                    continue;
                };
                let len = u32::try_from(len).unwrap_or(u32::MAX);
                let entry = match op.kind {
                    IoKind::Recv => opcode::Recv::new(types::Fd(op.fd), bytes.as_mut_ptr(), len)
                        .flags(libc::MSG_DONTWAIT)
                        .build(),
                    IoKind::Send => opcode::Send::new(types::Fd(op.fd), bytes.as_ptr(), len)
                        .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                        .build(),
                };
                op.result = i32::MIN;
                // SAFETY: the entry points into `op.buf`, which `ops` keeps
                // borrowed, unmoved and alive until this function returns,
                // and this function returns `Ok` only after the kernel
                // answered every entry (below); on `Err` the caller leaks
                // the buffers. The queue has room: it holds at most one
                // chunk, and every earlier chunk was submitted.
                if unsafe { sq.push(&entry.user_data(BATCH | i as u64)) }.is_err() {
                    op.result = -libc::EBUSY;
                }
            }
        }
        let mut waiting = ops.iter().filter(|op| op.result == i32::MIN).count();
        while waiting > 0 {
            not_now(self.ring.submit_and_wait(waiting), &[libc::EAGAIN])?;
            waiting -= self.reap_others(ops);
        }
        Ok(())
    }
}

/// A submission's outcome, with the errors that only mean "not now" as
/// `Ok`: a signal (EINTR), a completion queue too full to take more
/// (EBUSY: reaping makes room), and those in `also`.
fn not_now(submitted: io::Result<usize>, also: &[i32]) -> io::Result<()> {
    match submitted {
        Err(e)
            if e.raw_os_error()
                .is_some_and(|n| n == libc::EINTR || n == libc::EBUSY || also.contains(&n)) =>
        {
            Ok(())
        }
        other => other.map(drop),
    }
}

/// The operation as a plain recv(2) or send(2), with the same flags and
/// the same kind of result (bytes, or a negated errno).
fn plain_call<B: AsMut<[u8]>>(op: &mut IoOp<B>) -> i32 {
    let Some(bytes) = op.buf.as_mut().get_mut(op.range.clone()) else {
        return -libc::EINVAL;
    };
    let n = match op.kind {
        // SAFETY: `bytes` is a live, writable slice of its length for the
        // call; the fd is the caller's open socket.
        IoKind::Recv => unsafe {
            libc::recv(
                op.fd,
                bytes.as_mut_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT,
            )
        },
        // SAFETY: `bytes` is a live slice of its length for the call.
        IoKind::Send => unsafe {
            libc::send(
                op.fd,
                bytes.as_ptr().cast(),
                bytes.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        },
    };
    if n < 0 {
        -io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        i32::try_from(n).unwrap_or(i32::MAX)
    }
}

#[cfg(test)]
mod tests;
