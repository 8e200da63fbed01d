//! A direction's part in the uring loop's calls: a batched recv into an
//! empty copy buffer, a receive armed on the ring, a batched send of its
//! unsent bytes. Each result is staged in the slot, and the fill or drain
//! of the pump that follows consumes it, so the direction's state machine
//! is the same on both loops.

use super::{Buffer, Engine, MappedBuffer, Pools, Slot};
use crate::stats::CounterBlock;

/// Where a direction's batched calls (the uring loop's) stand, in eight
/// bytes: every relay has two, and an idle relay's memory is mostly its
/// slot. Each result is consumed by the fill or drain that follows it in
/// the same loop turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Batched {
    /// A recv that ran into the (empty) copy buffer: its return value, or
    /// [`Batched::NONE`].
    pub(super) read: i32,
    /// [`Batched::NONE`], [`Batched::WANTED`] (a drain found unsent bytes:
    /// send them with the next batch), or the batch's send's return value.
    pub(super) send: i32,
}

impl Batched {
    /// No return value is this small: bytes are positive, errors -4095 at
    /// the least.
    pub(super) const NONE: i32 = i32::MIN;
    pub(super) const WANTED: i32 = i32::MIN + 1;
    /// `read`: a receive armed on the ring waits for the source's bytes;
    /// nothing else may read the source until it is answered.
    const ARMED: i32 = i32::MIN + 2;
    /// `read`: `FILLED + n`, a ring receive filled its whole length with
    /// `n` bytes, so more may wait (a plain result `n` says the queue ran
    /// dry when it is short of the buffer's room). Below every errno.
    const FILLED: i32 = i32::MIN + 4096;
    pub(super) const IDLE: Batched = Batched {
        read: Batched::NONE,
        send: Batched::NONE,
    };

    /// The staged read's result, and whether more may wait behind it.
    pub(super) fn take_read(&mut self) -> Option<(i32, bool)> {
        match self.read {
            Batched::NONE | Batched::ARMED => None,
            filled if filled > Batched::FILLED && filled < -4095 => {
                self.read = Batched::NONE;
                Some((filled - Batched::FILLED, true))
            }
            read => {
                self.read = Batched::NONE;
                Some((read, false))
            }
        }
    }

    pub(super) fn take_sent(&mut self) -> Option<i32> {
        match self.send {
            Batched::NONE | Batched::WANTED => None,
            sent => {
                self.send = Batched::NONE;
                Some(sent)
            }
        }
    }
}

impl Slot {
    /// For the uring loop: the empty copy buffer a batched recv may fill,
    /// taken out of the slot (taking one from the pool as a fill would),
    /// with its range. `None` when this direction does not copy now, holds
    /// bytes, or its source has urgent data (whose mark only a plain read
    /// handles).
    pub(crate) fn stage_read(
        &mut self,
        pools: &mut Pools,
        counters: &CounterBlock,
    ) -> Option<(MappedBuffer, std::ops::Range<usize>)> {
        if self.urgent || self.batch != Batched::IDLE {
            return None;
        }
        if self.buffer.is_none() {
            self.follow_policy(counters);
            if self.engine != Engine::Copy {
                return None;
            }
            // Failing to map a buffer is the fill's to report.
            self.buffer = Some(pools.take(&mut self.engine, counters).ok()?);
        }
        let Some(Buffer::Mapped(mapped)) = &mut self.buffer else {
            return None;
        };
        if self.engine != Engine::Copy {
            return None;
        }
        let range = mapped.recv_range()?;
        let Some(Buffer::Mapped(mapped)) = self.buffer.take() else {
            unreachable!("matched above")
        };
        Some((mapped, range))
    }

    /// Puts back the buffer [`stage_read`](Self::stage_read) took, with
    /// what the recv returned; the next fill consumes it.
    pub(crate) fn staged_read(&mut self, buffer: MappedBuffer, result: i32) {
        self.buffer = Some(Buffer::Mapped(buffer));
        self.batch.read = result;
    }

    /// For the uring loop's `copy` relays: marks a receive armed on the
    /// ring for this direction, when it copies, holds no bytes and has
    /// nothing staged. False: do not arm one.
    pub(crate) fn arm(&mut self) -> bool {
        let empty = match &self.buffer {
            None => true,
            Some(Buffer::Mapped(mapped)) => mapped.is_empty(),
            Some(Buffer::Pipe(_)) => false,
        };
        if self.engine != Engine::Copy || !empty || self.batch != Batched::IDLE {
            return false;
        }
        self.batch.read = Batched::ARMED;
        true
    }

    /// Forgets a receive marked armed that the ring never took (or whose
    /// answer will never come): the direction reads for itself again.
    pub(crate) fn disarm(&mut self) {
        if self.batch.read == Batched::ARMED {
            self.batch.read = Batched::NONE;
        }
    }

    /// Whether a receive armed on the ring is unanswered.
    pub(crate) fn is_armed(&self) -> bool {
        self.batch.read == Batched::ARMED
    }

    /// The answer to the armed receive: `bytes` (what `result` counted) go
    /// into the copy buffer, taken from the pool as a fill would, for the
    /// next fill to report; EOF and errors are staged as they are.
    /// `filled`: the receive's length was all it could take, so more may
    /// wait. A receive the ring could not serve (no provided buffer,
    /// cancelled) stages nothing, and the direction reads for itself.
    pub(crate) fn received(
        &mut self,
        pools: &mut Pools,
        counters: &CounterBlock,
        bytes: &[u8],
        result: i32,
        filled: bool,
    ) {
        if self.batch.read != Batched::ARMED {
            return;
        }
        self.batch.read = Batched::NONE;
        if result == -libc::ENOBUFS || result == -libc::ECANCELED {
            return;
        }
        if result <= 0 {
            self.batch.read = result;
            return;
        }
        if self.buffer.is_none() {
            match pools.take(&mut self.engine, counters) {
                Ok(buffer) => self.buffer = Some(buffer),
                Err(e) => {
                    // The bytes are gone with the relay, which fails.
                    self.batch.read = -e.raw_os_error().unwrap_or(libc::ENOMEM);
                    return;
                }
            }
        }
        let Some(Buffer::Mapped(mapped)) = &mut self.buffer else {
            self.batch.read = -libc::EINVAL;
            return;
        };
        let Some(range) = mapped.recv_range() else {
            self.batch.read = -libc::EINVAL;
            return;
        };
        let n = bytes.len().min(range.len());
        mapped.as_mut()[range.start..range.start + n].copy_from_slice(&bytes[..n]);
        let n = n as i32;
        self.batch.read = if filled { Batched::FILLED + n } else { n };
    }

    /// Whether a drain left bytes for the next batched send.
    pub(crate) fn wants_send(&self) -> bool {
        self.batch.send == Batched::WANTED
    }

    /// The copy buffer whose unsent bytes a batched send is to write,
    /// taken out of the slot, with their range.
    pub(crate) fn take_send(&mut self) -> Option<(MappedBuffer, std::ops::Range<usize>)> {
        if self.batch.send != Batched::WANTED {
            return None;
        }
        self.batch.send = Batched::NONE;
        let Some(Buffer::Mapped(mapped)) = self.buffer.take() else {
            // Only a copy buffer's drain asks for a batched send.
            return None;
        };
        let range = mapped.send_range();
        Some((mapped, range))
    }

    /// Puts back the buffer [`take_send`](Self::take_send) took, with what
    /// the send returned; the next drain consumes it.
    pub(crate) fn sent(&mut self, buffer: MappedBuffer, result: i32) {
        self.buffer = Some(Buffer::Mapped(buffer));
        self.batch.send = result;
    }
}
