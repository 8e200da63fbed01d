//! One direction of a relay: the pure state machine.
//!
//! It fills from the source while the source is open and readable, drains to
//! the destination while bytes are pending and it is writable, and forwards
//! FIN (`shutdown(SHUT_WR)`) once the source hit EOF and nothing is pending.
//! It owns the only count of pending bytes, which is what gives EAGAIN its
//! meaning: from `fill` with bytes pending, the buffer may be full, so wait
//! for the destination; with none pending, the source is empty, so wait for
//! it to become readable.
//!
//! Readiness is remembered here (edge-triggered epoll reports a change once):
//! the source's readable bit and the destination's writable bit each belong to
//! exactly one direction, and are cleared only when an operation says
//! WouldBlock.

use std::io;

use crate::engine::{Endpoints, FillError, Transfer};
use crate::error::{Op, RelayError, Side};

/// Where a direction is in its life, named after what it may still do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DirState {
    /// The source may send more.
    Open,
    /// The source sent FIN; pending bytes are still being written.
    SourceEof,
    /// FIN was forwarded to the destination; nothing more will move.
    Shut,
}

/// A direction's books, handed to a live upgrade's new process: its state,
/// the bytes its buffer holds, and its counts.
#[cfg(feature = "service")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct DirectionImage {
    pub(crate) state: DirState,
    pub(crate) pending: usize,
    pub(crate) bytes_in: u64,
    pub(crate) bytes_out: u64,
}

/// What a pump call achieved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pumped {
    /// Bytes written to the destination (what resets the idle deadline).
    pub(crate) moved: usize,
    /// The state changed (EOF seen or FIN forwarded).
    pub(crate) state_changed: bool,
    /// The budget ran out while work was still possible.
    pub(crate) exhausted: bool,
}

#[derive(Debug)]
pub(crate) struct Direction {
    from: Side,
    to: Side,
    state: DirState,
    pending: usize,
    src_readable: bool,
    /// A FIN may wait behind the source's data with no edge left to
    /// announce it (an edge came with RDHUP/HUP, or edges may have been
    /// missed before the direction could move): reading goes on until a
    /// read says EAGAIN or EOF, instead of stopping after a short read.
    src_unsure: bool,
    dst_writable: bool,
    bytes_in: u64,
    bytes_out: u64,
}

impl Direction {
    /// A direction from `from` to the other side. Readiness starts optimistic:
    /// one spurious WouldBlock is cheaper than a missed edge.
    pub(crate) fn new(from: Side, to: Side) -> Direction {
        Direction {
            from,
            to,
            state: DirState::Open,
            pending: 0,
            src_readable: true,
            // Every socket's registration raises an edge with its state
            // then (RDHUP included), so a new direction needs no doubt.
            src_unsure: false,
            dst_writable: true,
            bytes_in: 0,
            bytes_out: 0,
        }
    }

    /// Where the direction stands, for a live upgrade's new process.
    #[cfg(feature = "service")]
    pub(crate) fn image(&self) -> DirectionImage {
        DirectionImage {
            state: self.state,
            pending: self.pending,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
        }
    }

    /// A direction as another process left it. Its readiness is unknown
    /// here (edges went to the old process's epoll set), so reading goes
    /// on until EAGAIN or EOF and writing is tried.
    #[cfg(feature = "service")]
    pub(crate) fn from_image(from: Side, to: Side, image: DirectionImage) -> Direction {
        Direction {
            from,
            to,
            state: image.state,
            pending: image.pending,
            src_readable: true,
            src_unsure: true,
            dst_writable: true,
            bytes_in: image.bytes_in,
            bytes_out: image.bytes_out,
        }
    }

    /// Counts `n` bytes the buffer holds from the start as accepted from
    /// the source.
    pub(crate) fn preload(&mut self, n: usize) {
        self.pending += n;
        self.bytes_in += n as u64;
    }

    pub(crate) fn state(&self) -> DirState {
        self.state
    }

    pub(crate) fn pending(&self) -> usize {
        self.pending
    }

    /// The destination still lacks something the source gave: accepted
    /// bytes not yet written, or a FIN not yet forwarded.
    pub(crate) fn undelivered(&self) -> bool {
        self.pending > 0 || self.state == DirState::SourceEof
    }

    pub(crate) fn bytes_out(&self) -> u64 {
        self.bytes_out
    }

    pub(crate) fn source_readable(&mut self) {
        self.src_readable = true;
    }

    /// The source's readable edge came with a hang-up, or edges may have
    /// gone by unseen: read until EAGAIN or EOF.
    pub(crate) fn source_unsure(&mut self) {
        self.src_readable = true;
        self.src_unsure = true;
    }

    pub(crate) fn destination_writable(&mut self) {
        self.dst_writable = true;
    }

    /// Whether the next pump starts by reading the source into an empty
    /// buffer (what the uring loop may read ahead of it, batched).
    pub(crate) fn reads_into_empty(&self) -> bool {
        self.state == DirState::Open && self.src_readable && self.pending == 0
    }

    /// Whether the direction waits for its source's next bytes with none
    /// pending (readiness aside): the uring loop's `copy` relays arm a
    /// receive for it.
    pub(crate) fn awaits_source(&self) -> bool {
        self.state == DirState::Open && self.pending == 0
    }

    /// Whether a pump could make progress now.
    pub(crate) fn has_work(&self) -> bool {
        (self.state == DirState::Open && self.src_readable)
            || (self.pending > 0 && self.dst_writable)
            || (self.state == DirState::SourceEof && self.pending == 0)
    }

    /// Moves as much as readiness and `budget` (engine calls) allow.
    pub(crate) fn pump(
        &mut self,
        io: &mut impl Endpoints,
        budget: &mut u32,
    ) -> Result<Pumped, RelayError> {
        let mut done = Pumped::default();
        loop {
            if *budget == 0 {
                done.exhausted = self.has_work();
                return Ok(done);
            }
            let mut progressed = false;
            if self.pending > 0 && self.dst_writable {
                *budget -= 1;
                match io
                    .drain(self.pending)
                    .map_err(|e| self.dst_error(Op::Write, e))?
                {
                    Transfer::Moved(n) | Transfer::MovedAll(n) => {
                        let n = n.min(self.pending);
                        self.pending -= n;
                        self.bytes_out += n as u64;
                        done.moved += n;
                        progressed = true;
                    }
                    Transfer::WouldBlock => self.dst_writable = false,
                    Transfer::Eof => {
                        return Err(self.dst_error(Op::Write, io::ErrorKind::WriteZero.into()))
                    }
                }
            }
            if self.state == DirState::Open && self.src_readable && *budget > 0 {
                *budget -= 1;
                match io.fill(self.pending).map_err(|e| self.fill_error(e))? {
                    Transfer::Moved(n) => {
                        self.pending += n;
                        self.bytes_in += n as u64;
                        progressed = true;
                    }
                    Transfer::MovedAll(n) => {
                        self.pending += n;
                        self.bytes_in += n as u64;
                        progressed = true;
                        // The queue is empty: wait for the next edge instead
                        // of a read that would say EAGAIN.
                        if !self.src_unsure {
                            self.src_readable = false;
                        }
                    }
                    // With nothing pending the source is empty; with bytes
                    // pending the buffer may just be full, so keep the bit.
                    Transfer::WouldBlock if self.pending == 0 => {
                        self.src_readable = false;
                        // Empty and no FIN: whatever comes next raises an edge.
                        self.src_unsure = false;
                    }
                    Transfer::WouldBlock => {}
                    Transfer::Eof => {
                        self.state = DirState::SourceEof;
                        done.state_changed = true;
                        progressed = true;
                    }
                }
            }
            if self.pending == 0 {
                io.release();
                if self.state == DirState::SourceEof {
                    io.shutdown().map_err(|e| self.dst_error(Op::Shutdown, e))?;
                    self.state = DirState::Shut;
                    done.state_changed = true;
                }
            }
            if !progressed {
                done.exhausted = *budget == 0 && self.has_work();
                return Ok(done);
            }
        }
    }

    /// A source's read failure is its side's; a buffer that could not be
    /// had is the proxy's own.
    fn fill_error(&self, e: FillError) -> RelayError {
        match e {
            FillError::Source(e) => RelayError::new(self.from, Op::Read, e),
            FillError::NoBuffer(e) => RelayError::new(Side::Internal, Op::Buffer, e),
        }
    }

    fn dst_error(&self, op: Op, e: io::Error) -> RelayError {
        RelayError::new(self.to, op, e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzzing::{Engine, Step};

    fn dir() -> Direction {
        Direction::new(Side::Client, Side::Upstream)
    }

    /// The fuzzers' scripted engine, which also panics on any call no real
    /// engine could see (a FIN with bytes pending, a read after EOF, ...).
    fn script(fills: &[Step], drains: &[Step]) -> Engine {
        Engine {
            fills: fills.iter().cloned().collect(),
            drains: drains.iter().cloned().collect(),
            ..Engine::default()
        }
    }

    fn pump(d: &mut Direction, io: &mut Engine) -> Result<Pumped, RelayError> {
        d.pump(io, &mut 1000)
    }

    // Tests for the Open state

    #[test]
    fn open_moves_bytes_and_releases_the_buffer_when_empty() {
        let mut d = dir();
        let mut io = script(&[Step::Moved(100), Step::WouldBlock], &[Step::Moved(100)]);
        let p = pump(&mut d, &mut io).unwrap();
        assert_eq!(p.moved, 100);
        assert_eq!(d.pending(), 0);
        assert_eq!(d.state(), DirState::Open);
        assert!(!io.holding, "an idle direction must hold no buffer");
        assert!(!d.has_work(), "source empty: wait for readable");
    }

    #[test]
    fn open_full_buffer_waits_for_destination_not_source() {
        let mut d = dir();
        let mut io = script(&[Step::Moved(10), Step::WouldBlock], &[Step::WouldBlock]);
        pump(&mut d, &mut io).unwrap();
        assert_eq!(d.pending(), 10);
        assert!(io.holding, "a buffer with bytes is kept");
        // Source bit stays set: EAGAIN with bytes pending meant "full".
        d.destination_writable();
        io.drains.push_back(Step::Moved(10));
        io.fills.push_back(Step::Moved(5));
        io.drains.push_back(Step::Moved(5));
        let p = pump(&mut d, &mut io).unwrap();
        assert_eq!(p.moved, 15);
        assert_eq!(d.pending(), 0);
    }

    #[test]
    fn open_a_short_read_ends_reading_until_the_next_edge() {
        let mut d = dir();
        // A short read emptied the queue: no read that could only say EAGAIN.
        let mut io = script(&[Step::MovedAll(64), Step::Moved(1)], &[Step::Moved(64)]);
        pump(&mut d, &mut io).unwrap();
        assert_eq!(io.fills.len(), 1, "no second read after a short one");
        assert!(!d.has_work());
        // While unsure (an edge carried RDHUP), it reads on until EAGAIN.
        d.source_unsure();
        let mut io = script(&[Step::MovedAll(10), Step::WouldBlock], &[Step::Moved(10)]);
        pump(&mut d, &mut io).unwrap();
        assert!(io.fills.is_empty(), "read until EAGAIN");
        // EAGAIN settled it: short reads end reading again.
        d.source_readable();
        let mut io = script(&[Step::MovedAll(5), Step::Moved(1)], &[Step::Moved(5)]);
        pump(&mut d, &mut io).unwrap();
        assert_eq!(io.fills.len(), 1);
    }

    #[test]
    fn open_a_hang_up_reads_on_to_the_fin() {
        let mut d = dir();
        let mut io = script(&[Step::WouldBlock], &[]);
        pump(&mut d, &mut io).unwrap();
        // The edge says RDHUP: the FIN waits behind the data.
        d.source_unsure();
        let mut io = script(&[Step::MovedAll(64), Step::Eof], &[Step::Moved(64)]);
        pump(&mut d, &mut io).unwrap();
        assert_eq!(d.state(), DirState::Shut);
        assert_eq!(io.shutdowns, 1);
    }

    #[test]
    fn open_partial_drains_keep_the_rest_pending() {
        let mut d = dir();
        let mut io = script(&[Step::Moved(100)], &[Step::Moved(30), Step::WouldBlock]);
        pump(&mut d, &mut io).unwrap();
        assert_eq!(d.pending(), 70);
        assert_eq!(d.bytes_out(), 30);
        assert!(io.holding);
    }

    #[test]
    fn open_read_error_names_the_source() {
        let mut d = dir();
        let mut io = script(&[Step::Fail(io::ErrorKind::ConnectionReset)], &[]);
        let e = pump(&mut d, &mut io).unwrap_err();
        assert_eq!((e.side, e.op), (Side::Client, Op::Read));
    }

    #[test]
    fn a_buffer_that_cannot_be_had_blames_neither_peer() {
        /// A fill that finds no buffer to take (out of memory).
        struct NoBuffer;
        impl Endpoints for NoBuffer {
            fn fill(&mut self, _: usize) -> Result<Transfer, FillError> {
                Err(FillError::NoBuffer(io::ErrorKind::OutOfMemory.into()))
            }
            fn drain(&mut self, _: usize) -> io::Result<Transfer> {
                unreachable!("nothing was filled")
            }
            fn shutdown(&mut self) -> io::Result<()> {
                unreachable!("the source never ended")
            }
            fn release(&mut self) {}
        }
        let mut d = dir();
        let e = d.pump(&mut NoBuffer, &mut 10).unwrap_err();
        assert_eq!((e.side, e.op), (Side::Internal, Op::Buffer));
        assert_eq!(e.source.kind(), io::ErrorKind::OutOfMemory);
    }

    #[test]
    fn open_write_error_names_the_destination() {
        let mut d = dir();
        let mut io = script(&[Step::Moved(1)], &[Step::Fail(io::ErrorKind::BrokenPipe)]);
        let e = pump(&mut d, &mut io).unwrap_err();
        assert_eq!((e.side, e.op), (Side::Upstream, Op::Write));
    }

    #[test]
    fn open_zero_byte_drain_is_an_error_not_a_stall() {
        let mut d = dir();
        let mut io = script(&[Step::Moved(1)], &[Step::Eof]);
        assert!(pump(&mut d, &mut io).is_err());
    }

    #[test]
    fn open_budget_bounds_the_work_and_says_so() {
        let mut d = dir();
        let mut io = script(&[Step::Moved(1); 50], &[Step::Moved(1); 50]);
        let p = d.pump(&mut io, &mut 4).unwrap();
        assert!(p.exhausted);
        assert!(d.has_work());
    }

    // Tests for the SourceEof state

    #[test]
    fn source_eof_forwards_fin_only_after_every_byte() {
        let mut d = dir();
        let mut io = script(
            &[Step::Moved(50), Step::Eof],
            &[Step::Moved(20), Step::WouldBlock],
        );
        pump(&mut d, &mut io).unwrap();
        assert_eq!(d.state(), DirState::SourceEof);
        assert_eq!(io.shutdowns, 0, "30 bytes still pending");
        d.destination_writable();
        io.drains.push_back(Step::Moved(30));
        let p = pump(&mut d, &mut io).unwrap();
        assert!(p.state_changed);
        assert_eq!(d.state(), DirState::Shut);
        // The engine panics on a FIN with bytes still buffered.
        assert_eq!(io.shutdowns, 1);
        assert_eq!(io.buffered, 0);
        assert_eq!(d.bytes_out(), 50);
    }

    #[test]
    fn source_eof_with_nothing_pending_shuts_at_once() {
        let mut d = dir();
        let mut io = script(&[Step::Eof], &[]);
        pump(&mut d, &mut io).unwrap();
        assert_eq!(d.state(), DirState::Shut);
        assert_eq!(io.shutdowns, 1);
    }

    #[test]
    fn source_eof_stops_reading_the_source() {
        let mut d = dir();
        let mut io = script(
            &[Step::Moved(5), Step::Eof, Step::Moved(99)],
            &[Step::WouldBlock],
        );
        pump(&mut d, &mut io).unwrap();
        d.source_readable();
        pump(&mut d, &mut io).unwrap();
        assert_eq!(io.fills.len(), 1, "no read after EOF");
        assert_eq!(d.pending(), 5);
    }

    #[test]
    fn source_eof_shutdown_error_names_the_destination() {
        let mut d = dir();
        let mut io = Engine {
            shutdown_fails: Some(io::ErrorKind::NotConnected),
            ..script(&[Step::Eof], &[])
        };
        let e = d.pump(&mut io, &mut 10).unwrap_err();
        assert_eq!((e.side, e.op), (Side::Upstream, Op::Shutdown));
    }

    // Tests for the Shut state

    #[test]
    fn shut_does_nothing_more() {
        let mut d = dir();
        let mut io = script(&[Step::Eof], &[]);
        pump(&mut d, &mut io).unwrap();
        d.source_readable();
        d.destination_writable();
        assert!(!d.has_work());
        let p = pump(&mut d, &mut io).unwrap();
        assert_eq!(p, Pumped::default());
        assert_eq!(io.shutdowns, 1, "FIN is forwarded exactly once");
    }
}
