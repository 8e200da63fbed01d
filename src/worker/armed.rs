//! The uring loop's waiting and its armed receives.
//!
//! On the uring loop the worker waits in `io_uring_enter`, which submits
//! what the turn queued (armed receives, cancellations, the poll of the
//! worker's epoll fd) and waits for the first answer in the same call;
//! epoll is read only when its fd fired. A `copy` listener's relays read
//! through receives armed on the ring: each waits in the kernel for its
//! source's bytes, into a buffer of the ring's own, and its answer is
//! copied into the direction's copy buffer and staged for the pump, so the
//! direction's state machine is the one the epoll loop runs. Their sockets
//! are registered without EPOLLIN, so a message wakes the loop once, as an
//! answer, and not also as an epoll event.
//!
//! A receive is armed only while its direction holds no bytes, and one at
//! a time, so every byte the relay took from the kernel is in its own copy
//! buffer: backpressure, half-close, the close rule and a live upgrade's
//! images see the same bytes as on the epoll loop. Before a relay closes
//! its receives are cancelled; before it leaves in a live upgrade they are
//! cancelled and answered ([`Worker::settle_reads`]).

use std::io;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Token};

use super::{Worker, RELAY_INTEREST};
use crate::error::{Op, RelayError, Side};
use crate::relay::Relay;
use crate::stats::{CloseReason, CounterBlock};
use crate::sys::uring::RECV_BUFFER_SIZE;
use crate::token::{self, Owner, RelayRef};

/// A ring-reading relay's sockets: the armed receives tell readability,
/// and an EPOLLIN interest would wake the loop again for every message.
const RING_READ_INTEREST: Interest = Interest::WRITABLE;

/// How long a live upgrade's freeze waits for the cancelled receives of
/// the relays it takes to be answered; a relay still waiting stays here.
#[cfg(feature = "service")]
const SETTLE_WITHIN: Duration = Duration::from_secs(1);

impl Worker {
    /// The interest a relay's sockets register with. A relay that
    /// negotiates with its server reads the answer itself, so its sockets
    /// keep EPOLLIN (the armed receives then make those events moot).
    pub(super) fn relay_interest(&self, relay: &Relay) -> Interest {
        if self.ring.is_some() && relay.reads_on_ring() && !relay.is_negotiating() {
            RING_READ_INTEREST
        } else {
            RELAY_INTEREST
        }
    }

    /// Waits for the turn's events, at most `timeout`: epoll's, or on the
    /// uring loop the ring's, with epoll read when its fd fired.
    /// A worker none of whose relays ever read through the ring (only
    /// `auto` and `splice` listeners) waits in epoll_wait, as the epoll
    /// loop does: nothing it waits for would come through the ring.
    pub(super) fn wait(
        &mut self,
        events: &mut Events,
        timeout: Option<Duration>,
    ) -> io::Result<()> {
        let Some(ring) = self.ring.as_mut().filter(|_| self.ring_waits) else {
            return self.poll.poll(events, timeout);
        };
        if let Err(e) = ring.wait(timeout) {
            self.ring_failed(&e, Instant::now());
            return self.poll.poll(events, Some(Duration::ZERO));
        }
        if !ring.take_epoll_ready() {
            events.clear();
            return Ok(());
        }
        self.poll.poll(events, Some(Duration::ZERO))?;
        if events.iter().count() >= events.capacity() {
            // More may wait than one read takes; the fd will not fire again
            // for them.
            ring.epoll_has_more();
        }
        Ok(())
    }

    /// The armed receives' answers: each one's bytes go into its
    /// direction's copy buffer, and its relay is queued for the pump.
    pub(super) fn take_received(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let mut received = std::mem::take(&mut self.received);
        ring.take_received(&mut received);
        CounterBlock::add(&self.counters.ring_receives, received.len() as u64);
        let len = ring_read_len(self.config.copy_buffer_size);
        for answer in received.drain(..) {
            let tag = usize::try_from(answer.tag).unwrap_or(usize::MAX);
            if let Owner::Relay(this, from) = token::decode(Token(tag)) {
                let relay = self.relays.get_mut(this.key).filter(|r| this.is(r.id()));
                // A relay that closed meanwhile: the answer is dropped.
                if let Some(relay) = relay {
                    let filled = u32::try_from(answer.result) == Ok(len);
                    let bytes = ring.bytes(&answer);
                    relay.received(from, &mut self.pools, bytes, answer.result, filled);
                    if relay.queue() {
                        self.ready.push(RelayRef {
                            key: this.key,
                            id: relay.id(),
                        });
                    }
                }
            }
            ring.recycle(answer);
        }
        self.received = received;
    }

    /// Arms a receive for each direction of relay `key` that waits for
    /// its source (uring loop, ring-reading relays). While a live upgrade
    /// settles the relays it takes, those get none.
    pub(super) fn arm_reads(&mut self, key: usize) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let Some(relay) = self.relays.get_mut(key) else {
            return;
        };
        #[cfg(feature = "service")]
        let leaving = self.settling && relay.can_hand_over();
        #[cfg(not(feature = "service"))]
        let leaving = self.settling;
        if !relay.reads_on_ring() || leaving {
            return;
        }
        let this = RelayRef {
            key,
            id: relay.id(),
        };
        let len = ring_read_len(self.config.copy_buffer_size);
        let mut tried = false;
        relay.arm_reads(|fd, from| {
            tried = true;
            let tag = token::relay(this, from).0 as u64;
            ring.arm_recv(fd, tag, len).is_ok()
        });
        // From now on the wait must be the ring's, which their answers end;
        // a ring that could not take the receive fails that wait, which
        // closes this relay rather than leave it without readiness.
        self.ring_waits |= tried;
    }

    /// Cancels relay `key`'s unanswered receives, before it closes: the
    /// ring holds its sockets until they are answered (with the next
    /// submission, at the end of this turn).
    pub(super) fn disarm_reads(&mut self, key: usize) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        let Some(relay) = self.relays.get(key) else {
            return;
        };
        let this = RelayRef {
            key,
            id: relay.id(),
        };
        for from in relay.armed() {
            // A cancellation the ring cannot take leaves the receive to be
            // answered when its socket closes.
            let _ = ring.cancel_recv(token::relay(this, from).0 as u64);
        }
    }

    /// Before relays leave in a live upgrade: the receives armed for
    /// `keys` are cancelled and answered, and the bytes answers brought are
    /// pumped on, so nothing of theirs is in the kernel's hands when they
    /// go. The relays still armed after [`SETTLE_WITHIN`] are returned:
    /// they stay here.
    #[cfg(feature = "service")]
    pub(super) fn settle_reads(&mut self, keys: &[usize], now: Instant) -> Vec<usize> {
        if self.ring.is_none() {
            return Vec::new();
        }
        let armed = |w: &Worker| -> Vec<usize> {
            keys.iter()
                .copied()
                .filter(|&k| w.relays.get(k).is_some_and(|r| r.armed().next().is_some()))
                .collect()
        };
        for key in armed(self) {
            self.disarm_reads(key);
        }
        self.settling = true;
        let deadline = Instant::now() + SETTLE_WITHIN;
        let mut left = armed(self);
        while !left.is_empty() && Instant::now() < deadline {
            let Some(ring) = self.ring.as_mut() else {
                break;
            };
            if let Err(e) = ring.wait(Some(Duration::from_millis(10))) {
                self.ring_failed(&e, Instant::now());
                break;
            }
            self.take_received();
            left = armed(self);
        }
        self.run_ready(now);
        self.flush_sends(now);
        self.settling = false;
        armed(self)
    }

    /// The ring broke: this worker runs the epoll loop from now on. The
    /// relays that read through it close: their receives will never be
    /// answered, and their sockets have no EPOLLIN interest.
    pub(super) fn ring_failed(&mut self, error: &io::Error, now: Instant) {
        tracing::error!(worker = self.index, error = %error, "internal: io_uring failed; closing the relays that read through it and running the epoll loop");
        self.ring = None;
        let keys: Vec<usize> = self
            .relays
            .iter()
            .filter(|(_, r)| r.reads_on_ring())
            .map(|(k, _)| k)
            .collect();
        let e = RelayError::new(
            Side::Internal,
            Op::Read,
            io::Error::new(error.kind(), error.to_string()),
        );
        for key in keys {
            self.close(key, CloseReason::Internal, Some(&e), now);
        }
    }
}

/// The length of an armed receive: the copy buffer's size, at most a
/// provided buffer's.
fn ring_read_len(copy_buffer_size: usize) -> u32 {
    u32::try_from(copy_buffer_size.min(RECV_BUFFER_SIZE)).unwrap_or(u32::MAX)
}
