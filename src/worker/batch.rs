//! The uring loop's turn: the relays an epoll wakeup reported are read in
//! one batch before they are pumped, and the bytes their drains left are
//! sent in one batch before the worker sleeps again.
//!
//! A batch is run to completion in one call ([`Ring::run`]), so no relay
//! can close while the kernel holds its buffer; every result is consumed by
//! the pump that follows it in the same turn.

use std::io;
use std::time::Instant;

use super::Worker;
use crate::engine::MappedBuffer;
use crate::error::{Op, RelayError, Side};
use crate::relay::Peer;
use crate::stats::{CloseReason, CounterBlock};
use crate::sys::uring::{IoOp, Ring, RingFailed};
use crate::token::RelayRef;

/// Send batches a turn runs (each followed by the pumps they allow) before
/// the rest waits for the next turn, so one busy pair cannot hold the loop.
const SEND_ROUNDS: usize = 4;

/// The relays and directions a batch's operations belong to, in order.
type Owners = Vec<(RelayRef, Peer)>;

/// The vectors a turn's batches are built in, kept between turns so that
/// a busy loop does not allocate them anew every turn.
#[derive(Debug, Default)]
pub(super) struct BatchRoom {
    ops: Vec<IoOp<MappedBuffer>>,
    owners: Owners,
    sending: Vec<RelayRef>,
}

impl Worker {
    /// Reads, in one batch, every relay direction on the ready list whose
    /// pump would start with a read into an empty copy buffer.
    pub(super) fn read_ahead(&mut self, now: Instant) {
        if self.ring.is_none() || self.ready.is_empty() {
            return;
        }
        let mut ops = std::mem::take(&mut self.batch_room.ops);
        let mut owners = std::mem::take(&mut self.batch_room.owners);
        for &this in &self.ready {
            let Some(relay) = self.relays.get_mut(this.key).filter(|r| this.is(r.id())) else {
                continue;
            };
            for from in [Peer::Client, Peer::Upstream] {
                if let Some(op) = relay.stage_read(from, &mut self.pools) {
                    ops.push(op);
                    owners.push((this, from));
                }
            }
        }
        if let Some(mut ops) = self.run_batch(ops, &owners, now) {
            for (op, &(this, from)) in ops.drain(..).zip(&owners) {
                self.relays[this.key].staged_read(from, op);
            }
            self.batch_room.ops = ops;
        }
        owners.clear();
        self.batch_room.owners = owners;
    }

    /// Sends what the relays' drains left, in batches, pumping the relays
    /// each batch served; past [`SEND_ROUNDS`], the rest goes with the
    /// next turn (which then does not sleep).
    pub(super) fn flush_sends(&mut self, now: Instant) {
        for _ in 0..SEND_ROUNDS {
            if self.ring.is_none() || self.sending.is_empty() {
                return;
            }
            let mut ops = std::mem::take(&mut self.batch_room.ops);
            let mut owners = std::mem::take(&mut self.batch_room.owners);
            let spare = std::mem::take(&mut self.batch_room.sending);
            let mut sending = std::mem::replace(&mut self.sending, spare);
            for this in sending.drain(..) {
                let Some(relay) = self.relays.get_mut(this.key).filter(|r| this.is(r.id())) else {
                    continue;
                };
                for from in [Peer::Client, Peer::Upstream] {
                    if let Some(op) = relay.take_send(from) {
                        ops.push(op);
                        owners.push((this, from));
                    }
                }
            }
            self.batch_room.sending = sending;
            if let Some(mut ops) = self.run_batch(ops, &owners, now) {
                for (op, &(this, from)) in ops.drain(..).zip(&owners) {
                    let relay = &mut self.relays[this.key];
                    relay.sent(from, op);
                    if relay.queue() {
                        self.ready.push(this);
                    }
                }
                self.batch_room.ops = ops;
            }
            owners.clear();
            self.batch_room.owners = owners;
            self.run_ready(now);
        }
    }

    /// Runs one batch on the ring. If the ring broke, the batch's buffers
    /// are lost to the kernel: their relays close, and this worker goes on
    /// with the epoll loop alone.
    fn run_batch(
        &mut self,
        ops: Vec<IoOp<MappedBuffer>>,
        owners: &Owners,
        now: Instant,
    ) -> Option<Vec<IoOp<MappedBuffer>>> {
        if ops.is_empty() {
            // Nothing to run: the vector goes back for the next batch.
            return Some(ops);
        }
        let ring: &mut Ring = self.ring.as_mut()?;
        if ops.len() > 1 {
            // A single call is made as itself (`Ring::run`), uncounted.
            CounterBlock::add(&self.counters.ring_batches, 1);
            CounterBlock::add(&self.counters.ring_calls, ops.len() as u64);
        }
        match ring.run(ops) {
            Ok(ops) => Some(ops),
            Err(RingFailed(e)) => {
                // The batch's relays close first: the kernel may still hold
                // their buffers, which were leaked.
                let error = RelayError::new(
                    Side::Internal,
                    Op::Buffer,
                    io::Error::new(e.kind(), e.to_string()),
                );
                for &(this, _) in owners {
                    if self.relays.get(this.key).is_some_and(|r| this.is(r.id())) {
                        self.close(this.key, CloseReason::Internal, Some(&error), now);
                    }
                }
                self.ring_failed(&e, now);
                None
            }
        }
    }
}
