//! The copy engine: read(2)/write(2) through a userspace buffer. It is the
//! fallback when no pipe can be had, and the honest baseline for benchmarks.

use std::io::{self, Read, Write};

use memmap2::MmapMut;

use super::{transfer, Stream, Transfer};

/// A fixed-size buffer, an anonymous mapping, with the unsent bytes at
/// `start..end`.
///
/// Each buffer is its own anonymous mapping rather than a malloc block:
/// glibc keeps freed 64 KiB blocks in its arenas, so after a burst of slow
/// readers RSS would stay at the peak. A dropped mapping goes back to the
/// OS at once (measured: 379 MB stayed resident after 9 000 relays closed).
#[derive(Debug)]
pub(crate) struct MappedBuffer {
    bytes: MmapMut,
    start: usize,
    end: usize,
}

impl MappedBuffer {
    pub(crate) fn new(size: usize) -> io::Result<MappedBuffer> {
        Ok(MappedBuffer {
            bytes: MmapMut::map_anon(size)?,
            start: 0,
            end: 0,
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Bytes the next fill may read.
    pub(crate) fn room(&self) -> usize {
        if self.start == self.end {
            self.bytes.len()
        } else {
            self.bytes.len() - self.end
        }
    }

    /// Starts the buffer with `bytes`, which must fit.
    pub(crate) fn preload(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.len() > self.bytes.len() - self.end {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes handed over with a socket exceed the {}-byte copy buffer",
                    bytes.len(),
                    self.bytes.len()
                ),
            ));
        }
        self.bytes[self.end..self.end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len();
        Ok(())
    }

    /// Socket → buffer. A full buffer answers `WouldBlock` without a syscall.
    pub(crate) fn fill(&mut self, mut src: &Stream) -> io::Result<Transfer> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        if self.end == self.bytes.len() {
            return Ok(Transfer::WouldBlock);
        }
        let room = &mut self.bytes[self.end..];
        let asked = room.len();
        let moved = transfer(|| src.read(room), Transfer::Eof)?;
        Ok(match moved {
            Transfer::Moved(n) => {
                self.end += n;
                // A stream socket's read stops short only when its receive
                // queue ran dry (or at an urgent mark, which the caller
                // knows about).
                if n < asked {
                    Transfer::MovedAll(n)
                } else {
                    moved
                }
            }
            other => other,
        })
    }

    /// Buffer → socket.
    pub(crate) fn drain(&mut self, mut dst: &Stream) -> io::Result<Transfer> {
        let unsent = &self.bytes[self.start..self.end];
        // A zero-byte write reads as `Eof`: the state machine treats it as an error.
        let moved = transfer(|| dst.write(unsent), Transfer::Eof)?;
        if let Transfer::Moved(n) = moved {
            self.start += n;
        }
        Ok(moved)
    }
}
