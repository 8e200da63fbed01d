//! The uring loop's batched calls, as one relay takes part in them: a recv
//! run ahead of the pump into an empty copy buffer, and the sends its
//! drains left for the batch. Every result goes back into the direction's
//! slot, where the fill or drain of the pump that follows consumes it, so
//! the direction's state machine is the same in both loops.

use std::os::fd::{AsFd, AsRawFd};

use super::{Peer, Relay};
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
