//! The splice engine: socket → pipe → socket, payload never in userspace.

use std::io;
use std::os::fd::BorrowedFd;

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

    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Socket → pipe. Asks for a full pipe's worth: the kernel moves what
    /// fits, and on loopback (GRO) may even move more than `capacity`, so
    /// callers must never assume `pending <= capacity`.
    pub(crate) fn fill(&mut self, src: BorrowedFd<'_>) -> io::Result<Transfer> {
        let write_end = self.pipe.write_end();
        transfer(|| sys::splice(src, write_end, self.capacity), Transfer::Eof)
    }

    /// Pipe → socket, at most the bytes pending. A zero-byte result (the
    /// pipe was empty after all) reads as `Eof`, which the state machine
    /// treats as an internal error rather than waiting forever.
    pub(crate) fn drain(&mut self, dst: BorrowedFd<'_>, pending: usize) -> io::Result<Transfer> {
        let read_end = self.pipe.read_end();
        transfer(|| sys::splice(read_end, dst, pending), Transfer::Eof)
    }
}
