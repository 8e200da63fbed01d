//! The splice engine: socket → pipe → socket, payload never in userspace.

use std::io;
use std::os::fd::BorrowedFd;
use std::sync::OnceLock;

use super::{transfer, Transfer};
use crate::sys::{self, Pipe};

/// A pooled pipe and the capacity the kernel granted it.
#[derive(Debug)]
pub(crate) struct PooledPipe {
    pipe: Pipe,
    capacity: usize,
}

impl PooledPipe {
    pub(crate) fn new(pipe: Pipe, capacity: usize) -> PooledPipe {
        PooledPipe { pipe, capacity }
    }

    /// The pipe itself (a live upgrade passes its ends on).
    #[cfg(feature = "service")]
    pub(crate) fn pipe(&self) -> &Pipe {
        &self.pipe
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The pipe's ring slots: a pipe is limited by slots, not bytes, and
    /// its capacity is its slot count times the page size.
    fn slots(&self) -> usize {
        self.capacity / page_size()
    }

    /// Socket → pipe, asking for a full pipe's worth, but only while the
    /// pipe holds less than its capacity (`pending` bytes): a pipe at or
    /// past it answers `WouldBlock` without a syscall, so it never holds
    /// more than twice its capacity.
    ///
    /// A pipe is bounded by slots, not bytes: on loopback one slot can hold
    /// a whole 64 KiB skb, so a 1 MiB pipe (256 slots) asked for 1 MiB on
    /// every call took in more than 6 MiB, more than the destination's send
    /// buffer could take, and the relay idled on the destination's EPOLLOUT
    /// with megabytes out of TCP's flow control
    /// (docs/benchmarks/pipe-size.md). Asking for the whole capacity rather
    /// than the room left keeps each read large: a read of a few bytes
    /// would take a slot and part of an skb, which frees no receive window.
    ///
    /// A short splice proves the source's queue empty (`MovedAll`) only
    /// when the pipe cannot have run out of slots: every slot holds at least
    /// one byte, so with fewer bytes in the pipe than slots some were free.
    pub(crate) fn fill(&mut self, src: BorrowedFd<'_>, pending: usize) -> io::Result<Transfer> {
        if pending >= self.capacity {
            return Ok(Transfer::WouldBlock);
        }
        let write_end = self.pipe.write_end();
        let asked = self.capacity;
        let moved = transfer(|| sys::splice(src, write_end, asked), Transfer::Eof)?;
        Ok(match moved {
            Transfer::Moved(n) if n < asked && pending + n < self.slots() => Transfer::MovedAll(n),
            other => other,
        })
    }

    /// Pipe → socket, at most the bytes pending. A zero-byte result (the
    /// pipe was empty after all) reads as `Eof`, which the state machine
    /// treats as an internal error rather than waiting forever.
    pub(crate) fn drain(&mut self, dst: BorrowedFd<'_>, pending: usize) -> io::Result<Transfer> {
        let read_end = self.pipe.read_end();
        transfer(|| sys::splice(read_end, dst, pending), Transfer::Eof)
    }
}

/// The page size: a pipe slot's nominal size.
fn page_size() -> usize {
    static PAGE: OnceLock<usize> = OnceLock::new();
    *PAGE.get_or_init(|| {
        nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
            .ok()
            .flatten()
            .and_then(|p| usize::try_from(p).ok())
            .filter(|p| *p > 0)
            .unwrap_or(4096)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::{Duration, Instant};

    /// A connected pair: the writer, and the non-blocking reader.
    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let w = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (r, _) = l.accept().unwrap();
        r.set_nonblocking(true).unwrap();
        (w, r)
    }

    fn pipe(capacity: usize) -> PooledPipe {
        let p = Pipe::new().unwrap();
        sys::set_pipe_size(&p, capacity).unwrap();
        let granted = sys::pipe_size(&p).unwrap();
        PooledPipe::new(p, granted)
    }

    /// Fills until something moved (loopback delivery is not instant).
    fn fill_some(p: &mut PooledPipe, src: &TcpStream, pending: usize) -> Transfer {
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            match p.fill(src.as_fd(), pending).unwrap() {
                Transfer::WouldBlock if Instant::now() < until => std::thread::yield_now(),
                t => return t,
            }
        }
    }

    #[test]
    fn a_few_bytes_into_an_empty_pipe_prove_the_queue_empty() {
        let (mut w, r) = pair();
        let mut p = pipe(1 << 20);
        w.write_all(b"ping").unwrap();
        assert_eq!(fill_some(&mut p, &r, 0), Transfer::MovedAll(4));
    }

    #[test]
    fn as_many_bytes_as_slots_prove_nothing() {
        let (mut w, r) = pair();
        let mut p = pipe(64 * 1024);
        let slots = p.slots();
        w.write_all(&vec![7u8; slots]).unwrap();
        let mut moved = 0;
        while moved < slots {
            match fill_some(&mut p, &r, moved) {
                Transfer::Moved(n) => moved += n,
                Transfer::MovedAll(n) => {
                    moved += n;
                    assert!(
                        moved < slots,
                        "MovedAll with {moved} bytes in {slots} slots"
                    );
                }
                t => panic!("{t:?}"),
            }
        }
    }

    #[test]
    fn a_pipe_at_capacity_takes_nothing_more() {
        let (mut w, r) = pair();
        let mut p = pipe(64 * 1024);
        let cap = p.capacity();
        w.write_all(b"left in the socket").unwrap();
        assert_eq!(p.fill(r.as_fd(), cap).unwrap(), Transfer::WouldBlock);
        // The bytes are still queued in the socket, untouched.
        let mut r = r;
        r.set_nonblocking(false).unwrap();
        let mut got = [0u8; 18];
        r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"left in the socket");
    }

    #[test]
    fn a_fill_below_capacity_asks_for_a_whole_pipe() {
        let (mut w, r) = pair();
        let mut p = pipe(64 * 1024);
        let cap = p.capacity();
        w.write_all(&vec![1u8; 8192]).unwrap();
        let mut moved = 0;
        while moved < 8192 {
            match fill_some(&mut p, &r, cap - 1000) {
                Transfer::Moved(n) | Transfer::MovedAll(n) => moved += n,
                t => panic!("{t:?}"),
            }
        }
        assert_eq!(moved, 8192, "not just the 1000 bytes of room");
    }
}
