//! The uring loop's batched calls, as one relay takes part in them: a recv
//! run ahead of the pump into an empty copy buffer, and the sends its
//! drains left for the batch. Every result goes back into the direction's
//! slot, where the fill or drain of the pump that follows consumes it, so
//! the direction's state machine is the same in both loops.
//!
//! A relay of a `copy` listener reads through receives armed on the ring
//! instead: each waits in the kernel for its source's bytes, and its answer
//! is staged the same way.

use std::os::fd::{AsFd, AsRawFd};

use super::{Peer, Relay};
use crate::config::Mode;
use crate::engine::{MappedBuffer, Pools, Slot, Stream};
use crate::sys::uring::{IoKind, IoOp};

impl Relay {
    /// The slot of the direction whose source is `from`, its source and
    /// its destination.
    fn way(&mut self, from: Peer) -> (&mut Slot, &Stream, &Stream) {
        match from {
            Peer::Client => (&mut self.c2u_slot, &self.client, &self.upstream),
            Peer::Upstream => (&mut self.u2c_slot, &self.upstream, &self.client),
        }
    }

    /// Whether this relay reads through receives armed on the ring (on the
    /// uring loop): a `copy` listener's relays do.
    pub(crate) fn reads_on_ring(&self) -> bool {
        self.session.listener.config.mode == Mode::Copy
    }

    /// Arms a receive, through `arm` (its source's fd and direction; false
    /// when the ring could not take it), for each direction that waits for
    /// its source's bytes with none pending and nothing armed or staged.
    pub(crate) fn arm_reads(&mut self, mut arm: impl FnMut(std::os::fd::RawFd, Peer) -> bool) {
        if self.core.is_connecting() {
            return;
        }
        for from in [Peer::Client, Peer::Upstream] {
            if !self.core.direction(from).awaits_source() {
                continue;
            }
            let (slot, src, _) = self.way(from);
            let fd = src.as_fd().as_raw_fd();
            if slot.arm() && !arm(fd, from) {
                slot.disarm();
            }
        }
    }

    /// The directions whose armed receive is unanswered.
    pub(crate) fn armed(&self) -> impl Iterator<Item = Peer> + '_ {
        [
            (Peer::Client, &self.c2u_slot),
            (Peer::Upstream, &self.u2c_slot),
        ]
        .into_iter()
        .filter(|(_, slot)| slot.is_armed())
        .map(|(from, _)| from)
    }

    /// The answer to the direction from `from`'s armed receive (see
    /// `Slot::received`); the source counts as readable, so the next pump
    /// takes it.
    pub(crate) fn received(
        &mut self,
        from: Peer,
        pools: &mut Pools,
        bytes: &[u8],
        result: i32,
        filled: bool,
    ) {
        let listener = std::sync::Arc::clone(&self.session.listener);
        let counters = listener.counters(pools.worker);
        self.way(from)
            .0
            .received(pools, counters, bytes, result, filled);
        self.core.ready(from, true, false, false);
    }

    /// A batched recv for the direction from `from`, when its next pump
    /// would start by reading its source into an empty copy buffer.
    pub(crate) fn stage_read(
        &mut self,
        from: Peer,
        pools: &mut Pools,
    ) -> Option<IoOp<MappedBuffer>> {
        if self.core.is_connecting() || !self.core.direction(from).reads_into_empty() {
            return None;
        }
        let listener = std::sync::Arc::clone(&self.session.listener);
        let counters = listener.counters(pools.worker);
        let (slot, src, _) = self.way(from);
        let fd = src.as_fd().as_raw_fd();
        let (buf, range) = slot.stage_read(pools, counters)?;
        Some(IoOp {
            fd,
            kind: IoKind::Recv,
            buf,
            range,
            result: 0,
        })
    }

    /// Gives the direction from `from` its batched recv back.
    pub(crate) fn staged_read(&mut self, from: Peer, op: IoOp<MappedBuffer>) {
        self.way(from).0.staged_read(op.buf, op.result);
    }

    /// Whether a drain left bytes for the next batched send.
    pub(crate) fn wants_send(&self) -> bool {
        self.c2u_slot.wants_send() || self.u2c_slot.wants_send()
    }

    /// The batched send the direction from `from` asked for, if any.
    pub(crate) fn take_send(&mut self, from: Peer) -> Option<IoOp<MappedBuffer>> {
        let (slot, _, dst) = self.way(from);
        let fd = dst.as_fd().as_raw_fd();
        let (buf, range) = slot.take_send()?;
        Some(IoOp {
            fd,
            kind: IoKind::Send,
            buf,
            range,
            result: 0,
        })
    }

    /// Gives the direction from `from` its batched send back; its
    /// destination counts as writable until the drain that consumes the
    /// result says otherwise.
    pub(crate) fn sent(&mut self, from: Peer, op: IoOp<MappedBuffer>) {
        self.way(from).0.sent(op.buf, op.result);
        let to = match from {
            Peer::Client => Peer::Upstream,
            Peer::Upstream => Peer::Client,
        };
        self.core.ready(to, false, true, false);
    }
}
