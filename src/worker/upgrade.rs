//! A worker's part of a live upgrade: duplicates of its listening sockets
//! for the new process, which accepts on the same sockets (and so the same
//! accept queues) once the old one stops.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc::Sender;

use super::Worker;

/// A worker's listening sockets, duplicated, each with its address.
pub(crate) type ListeningSockets = std::io::Result<Vec<(SocketAddr, OwnedFd)>>;

impl Worker {
    /// Sends a duplicate of every socket this worker accepts on. A worker
    /// that is draining accepts on none and sends none.
    /// One that cannot be duplicated fails the whole answer: a socket left
    /// behind would reset its queued clients when this process exits.
    pub(super) fn send_listening_sockets(&self, answer: &Sender<ListeningSockets>) {
        let sockets = self
            .listeners
            .iter()
            .filter_map(|slot| Some((slot.socket.as_ref()?, slot.addr?)))
            .map(|(socket, addr)| Ok((addr, socket.as_fd().try_clone_to_owned()?)))
            .collect();
        // The asker may have given up waiting; the duplicates then close.
        let _ = answer.send(sockets);
    }
}

#[cfg(feature = "service")]
mod relays {
    use std::sync::mpsc::Sender;
    use std::sync::Arc;
    use std::time::Instant;

    use super::Worker;
    use crate::control::{Adopted, Fate};
    use crate::error::{Op, RelayError, Side};
    use crate::relay::image::{Inbound, Outbound, Placing, RelayImage};
    use crate::relay::Relay;
    use crate::stats::CloseReason;
    use crate::token::RelayRef;
    use crate::upstream::Round;

    impl Worker {
        /// Stops every relay a live upgrade can hand over (connected
        /// pairs; see `Relay::can_hand_over`) and sends them out: each
        /// leaves the slab and the epoll set, so nothing moves its bytes
        /// until it comes back ([`Worker::end_freeze`]). The others go on
        /// here.
        pub(in crate::worker) fn freeze_relays(
            &mut self,
            answer: &Sender<(Vec<Outbound>, usize)>,
            now: Instant,
        ) {
            let frozen_at = crate::sys::monotonic_ns();
            let can_go = |w: &Worker| -> Vec<usize> {
                w.relays
                    .iter()
                    .filter(|(_, r)| r.can_hand_over())
                    .map(|(k, _)| k)
                    .collect()
            };
            // On the uring loop, nothing of theirs may be left in the ring.
            let unsettled = self.settle_reads(&can_go(self), now);
            let keys: Vec<usize> = can_go(self)
                .into_iter()
                .filter(|k| !unsettled.contains(k))
                .collect();
            let mut out = Vec::with_capacity(keys.len());
            for key in keys {
                let mut relay = self.take_relay(key);
                let registry = self.poll.registry();
                let (client, upstream) = relay.sockets_mut();
                let _ = registry.deregister(client);
                let _ = registry.deregister(upstream);
                match relay.freeze(now, frozen_at) {
                    Ok(outbound) => out.push(outbound),
                    Err(kept) => {
                        let (relay, e) = *kept;
                        tracing::warn!(relay = relay.id(), error = %e, "upgrade: this relay stays with the old process");
                        self.resume_relay(relay, now);
                    }
                }
            }
            self.frozen_out += out.len();
            // Clients that may become relays to hand over: connecting or
            // negotiating, or still sending their first bytes.
            let later = self
                .relays
                .iter()
                .filter(|(_, r)| r.can_hand_over_later())
                .count()
                + self.prefaces.clients();
            if let Err(unsent) = answer.send((out, later)) {
                // The upgrade gave up waiting: carry on with them.
                for outbound in unsent.0 .0 {
                    self.frozen_out -= 1;
                    self.resume_relay(outbound.relay, now);
                }
            }
        }

        /// The relays a freeze sent out, back with their fates.
        pub(in crate::worker) fn end_freeze(&mut self, relays: Vec<(Relay, Fate)>, now: Instant) {
            let (mut handed, mut resumed, mut reset) = (0, 0, 0);
            for (relay, fate) in relays {
                self.frozen_out = self.frozen_out.saturating_sub(1);
                match fate {
                    Fate::Handed => {
                        handed += 1;
                        let listener = relay.listener_id();
                        relay.hand_away(&mut self.pools);
                        self.room_freed(listener, now);
                    }
                    Fate::Resume => {
                        resumed += 1;
                        self.resume_relay(relay, now);
                    }
                    Fate::Reset => {
                        reset += 1;
                        if let Some(key) = self.admit(relay, now) {
                            self.relays[key].reset_both_on_close();
                            let e = RelayError::new(
                                Side::Internal,
                                Op::Upgrade,
                                std::io::Error::other(
                                    "the new process ended after taking this relay",
                                ),
                            );
                            self.close(key, CloseReason::Internal, Some(&e), now);
                        }
                    }
                }
            }
            tracing::info!(
                worker = self.index,
                handed,
                resumed,
                reset,
                "upgrade: relays handed over {handed}, resumed here {resumed}, reset {reset}"
            );
        }

        /// A relay back in the slab and the epoll set, pumped at once (its
        /// sockets' edges went by while it was out).
        fn resume_relay(&mut self, relay: Relay, now: Instant) {
            if let Some(key) = self.admit(relay, now) {
                self.queue_relay(key);
            }
        }

        fn queue_relay(&mut self, key: usize) {
            let relay = &mut self.relays[key];
            if relay.queue() {
                self.ready.push(RelayRef {
                    key,
                    id: relay.id(),
                });
            }
        }

        /// Takes relays another process froze: each is rebuilt, registered
        /// and pumped at once. One whose listener is gone, or that cannot
        /// be rebuilt or registered, is declined: its descriptors close
        /// here, untouched, and the old process carries on with it.
        pub(in crate::worker) fn adopt_relays(
            &mut self,
            relays: Vec<Inbound>,
            answer: &Sender<Adopted>,
            now: Instant,
        ) {
            let mut report = Adopted::default();
            for inbound in relays {
                let (id, frozen_at) = (inbound.image.id, inbound.image.frozen_at);
                let Some(placing) = self.placing(&inbound.image) else {
                    let why = format!(
                        "listener '{}' is not in this config",
                        inbound.image.listener
                    );
                    report.declined.push((id, why));
                    continue;
                };
                let relay = match Relay::thawed(inbound, placing, &mut self.pools, now) {
                    Ok(relay) => relay,
                    Err(e) => {
                        report.declined.push((id, e.to_string()));
                        continue;
                    }
                };
                match self.place(relay, now) {
                    Ok(key) => {
                        report
                            .pauses
                            .push(crate::sys::monotonic_ns().saturating_sub(frozen_at));
                        self.queue_relay(key);
                    }
                    Err(refused) => {
                        let (relay, e) = *refused;
                        relay.hand_away(&mut self.pools);
                        report.declined.push((id, e.to_string()));
                    }
                }
            }
            // The asker may have given up; the relays are served anyway.
            let _ = answer.send(report);
        }

        /// The listener, pool, lease and room a relay of `image` gets here;
        /// `None` when its listener is gone from this config.
        fn placing(&self, image: &RelayImage) -> Option<Placing> {
            let listener = self
                .listeners
                .iter()
                .map(|slot| &slot.runtime)
                .find(|l| l.label() == image.listener)?;
            let listener = Arc::clone(listener);
            let leased = image.upstream_addr.and_then(|addr| {
                listener
                    .pools
                    .iter()
                    .find_map(|pool| Some((Arc::clone(pool), pool.lease_of(addr)?)))
            });
            let (pool, round) = match leased {
                Some((pool, lease)) => (pool, Round::holding(lease)),
                None => (Arc::clone(listener.pools.first()?), Round::empty()),
            };
            let admission = listener.admit_carried(image.client_addr.map(|a| a.ip()));
            Some(Placing {
                listener,
                pool,
                round,
                admission,
                worker: self.index,
            })
        }
    }
}
