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

use std::io;
use std::ops::Range;
use std::os::fd::RawFd;

use io_uring::{opcode, types, IoUring};

/// Submission queue entries of a worker's ring; a longer batch is run in
/// chunks of this many.
const ENTRIES: u32 = 256;

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

/// One worker's ring. Not shared: the worker thread alone submits.
pub struct Ring {
    ring: IoUring,
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
    pub fn new() -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_coop_taskrun()
            .build(ENTRIES)
            // COOP_TASKRUN is 5.19+: an older kernel takes a plain ring.
            .or_else(|_| IoUring::new(ENTRIES))?;
        Ok(Ring { ring })
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
                if unsafe { sq.push(&entry.user_data(i as u64)) }.is_err() {
                    op.result = -libc::EBUSY;
                }
            }
        }
        let mut waiting = ops.iter().filter(|op| op.result == i32::MIN).count();
        while waiting > 0 {
            match self.ring.submit_and_wait(waiting) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EINTR | libc::EAGAIN | libc::EBUSY)
                    ) => {}
                Err(e) => return Err(e),
            }
            for cqe in self.ring.completion() {
                if let Some(op) = ops.get_mut(cqe.user_data() as usize) {
                    if op.result == i32::MIN {
                        op.result = cqe.result();
                        waiting -= 1;
                    }
                }
            }
        }
        Ok(())
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
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    fn ring() -> Option<Ring> {
        match Ring::new() {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("io_uring unavailable here ({e}): nothing to test");
                None
            }
        }
    }

    #[test]
    fn a_batch_reads_and_writes_many_sockets_in_one_call() {
        let Some(mut ring) = ring() else { return };
        let pairs: Vec<_> = (0..300).map(|_| UnixStream::pair().unwrap()).collect();
        for (i, (a, _)) in pairs.iter().enumerate() {
            a.set_nonblocking(true).unwrap();
            (&*a).write_all(format!("m{i}").as_bytes()).unwrap();
        }
        // Reads on the far ends: every one has its message; the last pair
        // gets no message and answers EAGAIN, as a non-blocking read does.
        let ops = pairs
            .iter()
            .map(|(_, b)| IoOp {
                fd: b.as_raw_fd(),
                kind: IoKind::Recv,
                buf: vec![0u8; 16],
                range: 0..16,
                result: 0,
            })
            .collect();
        let ops = ring.run(ops).unwrap();
        for (i, op) in ops.iter().enumerate() {
            let want = format!("m{i}");
            assert_eq!(op.result, want.len() as i32, "op {i}");
            assert_eq!(&op.buf[..want.len()], want.as_bytes());
        }
        let again = vec![IoOp {
            fd: pairs[0].1.as_raw_fd(),
            kind: IoKind::Recv,
            buf: vec![0u8; 4],
            range: 0..4,
            result: 0,
        }];
        pairs[0].1.set_nonblocking(true).unwrap();
        let again = ring.run(again).unwrap();
        assert_eq!(again[0].result, -libc::EAGAIN);
        // Writes of a part of each buffer.
        let ops = pairs
            .iter()
            .map(|(a, _)| IoOp {
                fd: a.as_raw_fd(),
                kind: IoKind::Send,
                buf: b"xxhello".to_vec(),
                range: 2..7,
                result: 0,
            })
            .collect();
        let ops = ring.run(ops).unwrap();
        assert!(ops.iter().all(|op| op.result == 5));
        let (_, b) = &pairs[7];
        b.set_nonblocking(false).unwrap();
        let mut got = [0u8; 5];
        (&*b).read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hello");
    }

    fn op(fd: RawFd, kind: IoKind, buf: Vec<u8>, range: Range<usize>) -> IoOp<Vec<u8>> {
        IoOp {
            fd,
            kind,
            buf,
            range,
            result: 0,
        }
    }

    /// Each answer as one call of a batch and as a single plain call.
    fn both_ways(ring: &mut Ring, make: impl Fn() -> IoOp<Vec<u8>>) -> [IoOp<Vec<u8>>; 2] {
        let mut batch = ring.run(vec![make(), make()]).unwrap();
        let single = ring.run(vec![make()]).unwrap().remove(0);
        [batch.remove(0), single]
    }

    #[test]
    fn a_range_outside_the_buffer_is_refused_not_submitted() {
        let Some(mut ring) = ring() else { return };
        let (a, _b) = UnixStream::pair().unwrap();
        for answer in both_ways(&mut ring, || {
            op(a.as_raw_fd(), IoKind::Send, vec![0u8; 4], 2..9)
        }) {
            assert_eq!(answer.result, -libc::EINVAL);
        }
    }

    /// A batch of one is a plain call, with the same results.
    #[test]
    fn a_single_call_answers_as_a_batch_would() {
        let Some(mut ring) = ring() else { return };
        let (a, b) = UnixStream::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        let recv = || op(b.as_raw_fd(), IoKind::Recv, vec![0u8; 8], 0..8);
        for answer in both_ways(&mut ring, recv) {
            assert_eq!(answer.result, -libc::EAGAIN);
        }
        (&a).write_all(b"one").unwrap();
        let single = ring.run(vec![recv()]).unwrap().remove(0);
        assert_eq!((single.result, &single.buf[..3]), (3, &b"one"[..]));
        drop(a);
        for answer in both_ways(&mut ring, recv) {
            assert_eq!(answer.result, 0, "EOF");
        }
    }

    #[test]
    fn a_closed_peer_is_an_error_result_not_a_signal() {
        let Some(mut ring) = ring() else { return };
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        for answer in both_ways(&mut ring, || {
            op(a.as_raw_fd(), IoKind::Send, vec![1u8; 4], 0..4)
        }) {
            assert_eq!(answer.result, -libc::EPIPE);
        }
    }
}
