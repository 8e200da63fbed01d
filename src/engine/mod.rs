//! The one transfer interface both engines sit behind.
//!
//! A direction's in-flight bytes live in a [`Buffer`]: a kernel pipe for the
//! splice engine, an anonymously mapped buffer for the copy engine. Engines only move bytes
//! and report [`Transfer`]; they never decide lifecycle, which is the
//! direction state machine's job (`relay::direction`). [`Wire`] joins a
//! direction's buffer slot to its two sockets and the worker's [`Pools`], and
//! is what the state machine drives in production.

mod auto;
mod batch;
mod copy;
mod pool;
mod splice;
mod stream;

use std::io;
use std::os::fd::AsFd;

pub(crate) use copy::{MappedBuffer, MAX_SIZE as MAX_COPY_BUFFER};
pub(crate) use pool::{PipeFds, Pools};
pub(crate) use splice::PooledPipe;
pub(crate) use stream::Stream;

use self::auto::AutoPolicy;
use self::batch::Batched;
use crate::config::Mode;
use crate::stats::{CounterBlock, FallbackReason, ServerBlock};
use crate::sys;

/// The engine a direction runs now. [`Mode`] is the user's choice; a
/// direction of a `splice` listener may run `Copy` after a fallback.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Engine {
    Splice,
    Copy,
}

impl Engine {
    /// The engine a new direction of a listener with `mode` starts with.
    pub(crate) fn for_mode(mode: Mode) -> Engine {
        match mode {
            Mode::Splice => Engine::Splice,
            // An auto direction starts with small messages in mind.
            Mode::Copy | Mode::Auto => Engine::Copy,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Engine::Splice => "splice",
            Engine::Copy => "copy",
        }
    }
}

/// What one engine call did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transfer {
    Moved(usize),
    /// From `fill`: moved this many bytes and emptied the source's receive
    /// queue (a read shorter than the room it had). Under edge-triggered
    /// epoll, any byte or FIN that arrives later raises a new readable
    /// edge, so reading again now would only return EAGAIN.
    MovedAll(usize),
    /// Nothing moved now; readiness (or room) must change first.
    WouldBlock,
    /// The source sent FIN.
    Eof,
}

/// Why a fill failed, and so whom a relay's close blames.
#[derive(Debug)]
pub(crate) enum FillError {
    /// Reading the source failed: its side's error.
    Source(io::Error),
    /// No pipe or copy buffer could be had (out of memory): the proxy's
    /// own failure, not the source's.
    NoBuffer(io::Error),
}

impl From<io::Error> for FillError {
    fn from(e: io::Error) -> FillError {
        FillError::Source(e)
    }
}

/// The I/O one direction needs, so the state machine can be driven by real
/// sockets ([`Wire`]) or by a scripted engine in tests and fuzzing.
pub(crate) trait Endpoints {
    /// Moves bytes from the source into the buffer, taking one if needed.
    /// `pending` is what the buffer holds now. `WouldBlock` with bytes
    /// pending may mean the buffer is full.
    fn fill(&mut self, pending: usize) -> Result<Transfer, FillError>;
    /// Moves up to `pending` buffered bytes to the destination.
    fn drain(&mut self, pending: usize) -> io::Result<Transfer>;
    /// Forwards FIN: `shutdown(SHUT_WR)` on the destination.
    fn shutdown(&mut self) -> io::Result<()>;
    /// The buffer is empty: give it back to the pool.
    fn release(&mut self);
}

/// In-flight bytes of one direction.
#[derive(Debug)]
pub(crate) enum Buffer {
    Pipe(PooledPipe),
    Mapped(MappedBuffer),
}

/// A direction's engine facts apart from its buffer, handed to a live
/// upgrade's new process.
#[cfg(feature = "service")]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SlotImage {
    pub(crate) engine: Engine,
    pub(crate) spliced_any: bool,
    pub(crate) urgent: bool,
    pub(crate) fell_back: bool,
}

/// The bytes a direction holds as it reaches a live upgrade's new process:
/// in the pipe they were spliced into, or as a copy buffer's contents.
#[cfg(feature = "service")]
#[derive(Debug)]
pub(crate) enum Held {
    Nothing,
    Pipe(sys::Pipe),
    Bytes(Vec<u8>),
}

/// A direction's engine choice and (lazily held) buffer.
#[derive(Debug)]
pub(crate) struct Slot {
    engine: Engine,
    buffer: Option<Buffer>,
    /// Whether splice ever moved a byte; decides if EINVAL may fall back.
    spliced_any: bool,
    /// The source signalled urgent data (EPOLLPRI): splice may stall at
    /// its mark, so a splice that finds nothing looks for the mark.
    urgent: bool,
    /// Splice was refused or no pipe could be had: copy for good.
    fell_back: bool,
    /// In `auto` mode (until a fallback), what the reads have looked like.
    auto: Option<AutoPolicy>,
    /// The uring loop's batched calls for this direction.
    batch: Batched,
}

impl Slot {
    pub(crate) fn new(mode: Mode) -> Slot {
        Slot {
            engine: Engine::for_mode(mode),
            buffer: None,
            spliced_any: false,
            urgent: false,
            fell_back: false,
            auto: (mode == Mode::Auto).then(AutoPolicy::new),
            batch: Batched::IDLE,
        }
    }

    /// Its engine facts, for a live upgrade.
    #[cfg(feature = "service")]
    pub(crate) fn image(&self) -> SlotImage {
        SlotImage {
            engine: self.engine,
            spliced_any: self.spliced_any,
            urgent: self.urgent,
            fell_back: self.fell_back,
        }
    }

    /// The buffer it holds now, if any.
    #[cfg(feature = "service")]
    pub(crate) fn buffer(&self) -> Option<&Buffer> {
        self.buffer.as_ref()
    }

    /// A slot as another process left it, holding `held`. A listener of
    /// `mode` auto keeps choosing its engine (from scratch) unless the
    /// direction fell back. Fails only when no copy buffer can be mapped.
    #[cfg(feature = "service")]
    pub(crate) fn from_image(
        mode: Mode,
        image: SlotImage,
        held: Held,
        pools: &mut Pools,
    ) -> io::Result<Slot> {
        let buffer = match held {
            Held::Nothing => None,
            Held::Pipe(pipe) => Some(Buffer::Pipe(pools.adopt_pipe(pipe))),
            Held::Bytes(bytes) => Some(pools.mapped_holding(&bytes)?),
        };
        Ok(Slot {
            engine: image.engine,
            buffer,
            spliced_any: image.spliced_any,
            urgent: image.urgent,
            fell_back: image.fell_back,
            auto: (mode == Mode::Auto && !image.fell_back).then(AutoPolicy::new),
            batch: Batched::IDLE,
        })
    }

    /// Whether this direction was forced to copy (splice refused, no pipe,
    /// urgent data).
    pub(crate) fn fell_back(&self) -> bool {
        self.fell_back
    }

    /// In `auto` mode, switches to the engine the policy wants. Called only
    /// with no buffer held, so nothing buffered can be reordered.
    fn follow_policy(&mut self, counters: &CounterBlock) {
        if let Some(auto) = &self.auto {
            let wanted = auto.wanted();
            if wanted != self.engine {
                self.engine = wanted;
                CounterBlock::add(&counters.engine_switches, 1);
            }
        }
    }

    /// A slot whose direction starts with `bytes` to deliver before any
    /// the source sends (bytes the caller already read from it), held in a
    /// copy buffer from `pools`. A splice direction takes its pipe once
    /// they are written.
    pub(crate) fn preloaded(
        mode: Mode,
        bytes: &[u8],
        pools: &mut Pools,
        counters: &CounterBlock,
    ) -> io::Result<Slot> {
        let mut slot = Slot::new(mode);
        if !bytes.is_empty() {
            let mut engine = Engine::Copy;
            let mut buffer = pools.take(&mut engine, counters)?;
            let Buffer::Mapped(mapped) = &mut buffer else {
                unreachable!("a copy direction takes a mapped buffer")
            };
            if let Err(e) = mapped.preload(bytes) {
                pools.give(buffer, true);
                return Err(e);
            }
            slot.buffer = Some(buffer);
        }
        Ok(slot)
    }

    /// Takes back the bytes a [`preloaded`](Self::preloaded) slot still
    /// holds (none were sent: its relay never connected) and gives its
    /// buffer back.
    pub(crate) fn take_preloaded(&mut self, pools: &mut Pools) -> Vec<u8> {
        let bytes = match &self.buffer {
            Some(Buffer::Mapped(mapped)) => mapped.unsent().to_vec(),
            _ => Vec::new(),
        };
        if let Some(buffer) = self.buffer.take() {
            pools.give(buffer, true);
        }
        bytes
    }

    /// The source has urgent (out-of-band) data on the way.
    pub(crate) fn urgent_data(&mut self) {
        self.urgent = true;
    }

    /// The engine this direction uses now (splice may have fallen back to copy).
    pub(crate) fn engine(&self) -> Engine {
        self.engine
    }

    /// Gives the buffer back at relay close; a pipe still holding bytes is
    /// closed rather than pooled.
    pub(crate) fn discard(&mut self, pools: &mut Pools, pending: usize) {
        if let Some(buffer) = self.buffer.take() {
            pools.give(buffer, pending == 0);
        }
    }

    /// Switches to copy for the rest of the direction's life. Only called
    /// with the buffer empty, so no byte can be reordered or lost.
    fn fall_back_to_copy(
        &mut self,
        pools: &mut Pools,
        counters: &CounterBlock,
        why: FallbackReason,
    ) {
        self.engine = Engine::Copy;
        self.fell_back = true;
        self.auto = None;
        if let Some(buffer) = self.buffer.take() {
            pools.give(buffer, true);
        }
        pools.count_fallback(counters, why, why.as_str());
    }
}

/// A direction's slot wired to its source, destination and the worker's pools.
pub(crate) struct Wire<'a> {
    pub(crate) slot: &'a mut Slot,
    pub(crate) src: &'a Stream,
    pub(crate) dst: &'a Stream,
    pub(crate) pools: &'a mut Pools,
    /// The counters of the relay's listener, as this worker writes them.
    pub(crate) counters: &'a CounterBlock,
    /// This direction writes to the client (else to the upstream); bytes
    /// are counted per direction.
    pub(crate) to_client: bool,
    /// The counters of the server the relay is connected to, as this
    /// worker writes them (none for a handed-off pair).
    pub(crate) server: Option<&'a ServerBlock>,
    /// The uring loop's: a copy buffer's drain leaves its bytes for the
    /// worker's next batched send instead of writing them itself.
    pub(crate) batched: bool,
}

impl Wire<'_> {
    /// Whether splice found nothing (EAGAIN, or 0 once the FIN arrived)
    /// because the source sits at an urgent mark, with normal bytes possibly
    /// behind it. Asked only after EPOLLPRI: a socket with urgent data
    /// unread reports EPOLLPRI with every event (the worker passes it on,
    /// from a connecting upstream too), so a direction never told of it
    /// has no mark to stall at, and a plain EOF costs no `ioctl`.
    fn stalled_at_urgent_mark(&self) -> bool {
        self.slot.urgent && sys::at_urgent_mark(self.src.as_fd()).unwrap_or(false)
    }
}

impl Endpoints for Wire<'_> {
    fn fill(&mut self, pending: usize) -> Result<Transfer, FillError> {
        if self.slot.is_armed() {
            // The ring reads this source; its answer comes as a staged read.
            return Ok(Transfer::WouldBlock);
        }
        loop {
            if self.slot.engine == Engine::Splice {
                if let Some(Buffer::Mapped(preloaded)) = &self.slot.buffer {
                    if !preloaded.is_empty() {
                        // Bytes handed over with the socket go first; the
                        // direction drains them and comes back.
                        return Ok(Transfer::WouldBlock);
                    }
                    self.release();
                }
            }
            if self.slot.buffer.is_none() {
                self.slot.follow_policy(self.counters);
                let asked = self.slot.engine;
                let buffer = self.pools.take(&mut self.slot.engine, self.counters);
                self.slot.buffer = Some(buffer.map_err(FillError::NoBuffer)?);
                if self.slot.engine != asked {
                    // No pipe could be had (counted by the pool).
                    self.slot.fell_back = true;
                    self.slot.auto = None;
                }
            }
            let (result, room) = match self.slot.buffer.as_mut() {
                Some(Buffer::Pipe(pipe)) => (pipe.fill(self.src.as_fd(), pending), None),
                Some(Buffer::Mapped(heap)) => {
                    let room = heap.room();
                    let staged = self.slot.batch.take_read();
                    match staged.and_then(|(r, more)| heap.fill_from(r, more)) {
                        Some(result) => (result, Some(room)),
                        None => (heap.fill(self.src), Some(room)),
                    }
                }
                None => unreachable!("a buffer was just taken"),
            };
            if let (Some(auto), Ok(Transfer::Moved(n) | Transfer::MovedAll(n))) =
                (&mut self.slot.auto, &result)
            {
                auto.observe(self.slot.engine, *n, room == Some(*n));
            }
            // recv(2) also stops short at an urgent mark, with bytes left
            // behind it: no shortcut then.
            let result = match result {
                Ok(Transfer::MovedAll(n)) if self.slot.urgent => Ok(Transfer::Moved(n)),
                other => other,
            };
            match result {
                Err(e) if splice_refused(&e) && !self.slot.spliced_any => {
                    // Nothing moved yet, so nothing can be lost by switching.
                    self.slot.fall_back_to_copy(
                        self.pools,
                        self.counters,
                        FallbackReason::SpliceRefused,
                    );
                }
                Ok(Transfer::Moved(_) | Transfer::MovedAll(_))
                    if self.slot.engine == Engine::Splice =>
                {
                    self.slot.spliced_any = true;
                    return result.map_err(FillError::Source);
                }
                Ok(Transfer::WouldBlock | Transfer::Eof)
                    if self.slot.engine == Engine::Splice && self.stalled_at_urgent_mark() =>
                {
                    if pending > 0 {
                        // Deliver what the pipe holds first; the direction
                        // keeps the source readable and comes back here.
                        return Ok(Transfer::WouldBlock);
                    }
                    // Only recv(2) steps over the mark (dropping the urgent
                    // byte, as a plain reader does), so this direction copies
                    // from here on.
                    self.slot.fall_back_to_copy(
                        self.pools,
                        self.counters,
                        FallbackReason::UrgentData,
                    );
                }
                other => return other.map_err(FillError::Source),
            }
        }
    }

    fn drain(&mut self, pending: usize) -> io::Result<Transfer> {
        let c = self.counters;
        let (moved, total, way) = match self.slot.buffer.as_mut() {
            Some(Buffer::Pipe(pipe)) => (
                pipe.drain(self.dst.as_fd(), pending)?,
                &c.bytes_spliced,
                if self.to_client {
                    &c.bytes_u2c_spliced
                } else {
                    &c.bytes_c2u_spliced
                },
            ),
            Some(Buffer::Mapped(heap)) => (
                match self.slot.batch.take_sent() {
                    Some(sent) => match heap.drained_by(sent) {
                        Some(result) => result?,
                        None => {
                            self.slot.batch.send = Batched::WANTED;
                            Transfer::WouldBlock
                        }
                    },
                    None if self.batched => {
                        self.slot.batch.send = Batched::WANTED;
                        Transfer::WouldBlock
                    }
                    None => {
                        // The ring is gone: what a batch was to send, write.
                        self.slot.batch.send = Batched::NONE;
                        heap.drain(self.dst)?
                    }
                },
                &c.bytes_copied,
                if self.to_client {
                    &c.bytes_u2c_copied
                } else {
                    &c.bytes_c2u_copied
                },
            ),
            None => return Err(io::Error::other("drain with no buffer held")),
        };
        if let Transfer::Moved(n) = moved {
            CounterBlock::add(total, n as u64);
            CounterBlock::add(way, n as u64);
            if let Some(server) = self.server {
                let spliced = matches!(self.slot.buffer, Some(Buffer::Pipe(_)));
                server.moved(self.to_client, spliced, n as u64);
            }
        }
        Ok(moved)
    }

    fn shutdown(&mut self) -> io::Result<()> {
        self.dst.shutdown(std::net::Shutdown::Write)
    }

    fn release(&mut self) {
        if let Some(buffer) = self.slot.buffer.take() {
            self.pools.give(buffer, true);
        }
    }
}

/// splice(2) errors that mean "this pair of fds cannot be spliced" rather
/// than a failed connection.
fn splice_refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS))
}

/// Retries a call interrupted by a signal; maps WouldBlock to [`Transfer`].
fn transfer(mut op: impl FnMut() -> io::Result<usize>, zero: Transfer) -> io::Result<Transfer> {
    loop {
        return match op() {
            Ok(0) => Ok(zero),
            Ok(n) => Ok(Transfer::Moved(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Transfer::WouldBlock),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => Err(e),
        };
    }
}
