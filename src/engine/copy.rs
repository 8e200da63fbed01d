//! The copy engine: read(2)/write(2) through a userspace buffer. It is the
//! fallback when no pipe can be had, and the honest baseline for benchmarks.

use std::io::{self, Read, Write};
use std::ops::Range;

use memmap2::MmapMut;

use super::{transfer, Stream, Transfer};

/// A fixed-size buffer, an anonymous mapping, with the unsent bytes at
/// `start..end`. An empty buffer has `start == end == 0`: every write that
/// empties it rewinds it, so a buffer given back to the pool offers its
/// whole size to whoever takes it next (read-ahead bytes of up to the
/// buffer size are preloaded into a pooled buffer).
///
/// Each buffer is its own anonymous mapping rather than a malloc block:
/// glibc keeps freed 64 KiB blocks in its arenas, so after a burst of slow
/// readers RSS would stay at the peak. A dropped mapping goes back to the
/// OS at once (measured: 379 MB stayed resident after 9 000 relays closed).
#[derive(Debug)]
pub(crate) struct MappedBuffer {
    bytes: MmapMut,
    // u32: a buffer is at most `MAX_SIZE`, and every relay holds two
    // slots whose size is most of an idle relay's memory.
    start: u32,
    end: u32,
}

/// The largest copy buffer (`Config::copy_buffer_size` is checked against it).
pub(crate) const MAX_SIZE: usize = 1 << 30;

/// The whole mapping, as a batched recv or send of the uring loop sees it.
impl AsMut<[u8]> for MappedBuffer {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

impl MappedBuffer {
    pub(crate) fn new(size: usize) -> io::Result<MappedBuffer> {
        if size > MAX_SIZE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a copy buffer of {size} bytes is past the limit of {MAX_SIZE}"),
            ));
        }
        Ok(MappedBuffer {
            bytes: MmapMut::map_anon(size)?,
            start: 0,
            end: 0,
        })
    }

    fn start(&self) -> usize {
        self.start as usize
    }

    fn end(&self) -> usize {
        self.end as usize
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.start() == self.end()
    }

    /// Bytes the next fill may read.
    pub(crate) fn room(&self) -> usize {
        if self.start() == self.end() {
            self.bytes.len()
        } else {
            self.bytes.len() - self.end()
        }
    }

    /// The bytes not sent yet.
    pub(crate) fn unsent(&self) -> &[u8] {
        &self.bytes[self.start()..self.end()]
    }

    /// Starts the buffer with `bytes`, which must fit.
    pub(crate) fn preload(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.rewind_if_empty();
        if bytes.len() > self.bytes.len() - self.end() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "{} bytes handed over with a socket exceed the {}-byte copy buffer",
                    bytes.len(),
                    self.bytes.len()
                ),
            ));
        }
        let end = self.end();
        self.bytes[end..end + bytes.len()].copy_from_slice(bytes);
        self.end += bytes.len() as u32;
        Ok(())
    }

    /// An empty buffer starts over at offset 0.
    fn rewind_if_empty(&mut self) {
        if self.start() == self.end() {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Socket → buffer. A full buffer answers `WouldBlock` without a syscall.
    pub(crate) fn fill(&mut self, mut src: &Stream) -> io::Result<Transfer> {
        self.rewind_if_empty();
        if self.end() == self.bytes.len() {
            return Ok(Transfer::WouldBlock);
        }
        let end = self.end();
        let room = &mut self.bytes[end..];
        let asked = room.len();
        let moved = transfer(|| src.read(room), Transfer::Eof)?;
        Ok(match moved {
            Transfer::Moved(n) => {
                self.end += n as u32;
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

    /// Makes an empty buffer ready for a batched recv into all of it
    /// (`None` if it holds bytes). The recv's result goes to
    /// [`fill_from`](Self::fill_from).
    pub(crate) fn recv_range(&mut self) -> Option<Range<usize>> {
        self.rewind_if_empty();
        self.is_empty().then(|| 0..self.bytes.len())
    }

    /// What a fill makes of a recv the uring loop ran into
    /// [`recv_range`](Self::recv_range): `result` is the call's return
    /// (bytes, or a negated errno). `None` for EINTR: read again.
    /// `more`: the recv asked for less than the room and got all it
    /// asked, so its source may hold more.
    pub(crate) fn fill_from(&mut self, result: i32, more: bool) -> Option<io::Result<Transfer>> {
        let asked = self.room();
        Some(match result {
            n if n > 0 => {
                let n = (n as usize).min(asked);
                self.end += n as u32;
                Ok(if n < asked && !more {
                    Transfer::MovedAll(n)
                } else {
                    Transfer::Moved(n)
                })
            }
            0 => Ok(Transfer::Eof),
            e if -e == libc::EINTR => return None,
            e if -e == libc::EAGAIN => Ok(Transfer::WouldBlock),
            e => Err(io::Error::from_raw_os_error(-e)),
        })
    }

    /// The unsent bytes' place in the buffer, for a batched send.
    pub(crate) fn send_range(&self) -> Range<usize> {
        self.start()..self.end()
    }

    /// What a drain makes of a send the uring loop ran of
    /// [`send_range`](Self::send_range). `None` for EINTR: send again.
    pub(crate) fn drained_by(&mut self, result: i32) -> Option<io::Result<Transfer>> {
        Some(match result {
            n if n > 0 => {
                let n = (n as usize).min(self.end() - self.start());
                self.start += n as u32;
                self.rewind_if_empty();
                Ok(Transfer::Moved(n))
            }
            // A zero-byte write reads as `Eof`, as in `drain`.
            0 => Ok(Transfer::Eof),
            e if -e == libc::EINTR => return None,
            e if -e == libc::EAGAIN => Ok(Transfer::WouldBlock),
            e => Err(io::Error::from_raw_os_error(-e)),
        })
    }

    /// Buffer → socket.
    pub(crate) fn drain(&mut self, mut dst: &Stream) -> io::Result<Transfer> {
        let unsent = &self.bytes[self.start()..self.end()];
        // A zero-byte write reads as `Eof`: the state machine treats it as an error.
        let moved = transfer(|| dst.write(unsent), Transfer::Eof)?;
        if let Transfer::Moved(n) = moved {
            self.start += n as u32;
            self.rewind_if_empty();
        }
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    const SIZE: usize = 64 * 1024;

    /// A connected pair: the buffer's side, non-blocking, and its peer.
    fn pair() -> (Stream, UnixStream) {
        let (ours, peer) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        (Stream::Unix(mio::net::UnixStream::from_std(ours)), peer)
    }

    /// Writes every buffered byte to `dst`, whose peer reads them.
    fn drain_all(buf: &mut MappedBuffer, dst: &Stream, peer: &mut UnixStream, n: usize) {
        let mut out = 0;
        while out < n {
            match buf.drain(dst).unwrap() {
                Transfer::Moved(k) => out += k,
                t => panic!("{t:?} with {} bytes left", n - out),
            }
        }
        let mut got = vec![0u8; n];
        peer.read_exact(&mut got).unwrap();
    }

    #[test]
    fn a_preload_may_take_the_whole_buffer() {
        let mut buf = MappedBuffer::new(SIZE).unwrap();
        buf.preload(&[7u8; SIZE]).unwrap();
        assert_eq!(buf.room(), 0);
        assert!(buf.preload(&[1]).is_err(), "one byte past the size");
    }

    /// A buffer given back to the pool after its last byte was written
    /// must offer its whole size again: read-ahead bytes are preloaded
    /// into pooled buffers without a fill in between.
    #[test]
    fn a_drained_buffer_takes_a_full_preload_again() {
        let (dst, mut peer) = pair();
        let mut buf = MappedBuffer::new(SIZE).unwrap();
        for first in [1, 24_000, SIZE / 2, SIZE] {
            buf.preload(&vec![1u8; first]).unwrap();
            drain_all(&mut buf, &dst, &mut peer, first);
            assert!(buf.is_empty());
            assert_eq!(buf.room(), SIZE, "after draining {first} bytes");
            buf.preload(&vec![2u8; SIZE])
                .unwrap_or_else(|e| panic!("after draining {first} bytes: {e}"));
            drain_all(&mut buf, &dst, &mut peer, SIZE);
        }
    }

    #[test]
    fn a_drained_buffer_fills_from_its_start() {
        let (src, mut peer) = pair();
        let mut buf = MappedBuffer::new(SIZE).unwrap();
        buf.preload(&[3u8; 1000]).unwrap();
        drain_all(&mut buf, &src, &mut peer, 1000);
        peer.write_all(&[4u8; 10]).unwrap();
        assert_eq!(buf.fill(&src).unwrap(), Transfer::MovedAll(10));
        assert_eq!(buf.room(), SIZE - 10);
    }
}
