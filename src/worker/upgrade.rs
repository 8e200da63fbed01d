//! A worker's part of a binary upgrade (see `crate::upgrade`): lending its
//! listening sockets, freezing and giving up its relays, taking them back
//! when the upgrade fails, and, in the new process, resuming relays handed
//! over.

use std::sync::mpsc::Sender;

use super::*;
use crate::control::Frozen;
use crate::relay::frozen::Parcel;
use crate::sys::fdpass;

impl Worker {
    /// A duplicate of every listening socket this worker accepts on.
    pub(super) fn listening(&mut self, reply: Sender<Vec<(SocketAddr, std::net::TcpListener)>>) {
        let mut out = Vec::new();
        for slot in &self.listeners {
            let (Some(socket), Some(addr)) = (&slot.socket, slot.addr) else {
                continue;
            };
            match SockRef::from(socket).try_clone() {
                Ok(dup) => out.push((addr, dup.into())),
                Err(e) => tracing::error!(
                    worker = self.index,
                    address = %addr,
                    error = %e,
                    "upgrade: cannot duplicate a listening socket"
                ),
            }
        }
        let _ = reply.send(out);
    }

    /// Stops accepting (clients wait in the backlog) and gives up every
    /// relay that can be handed over: its sockets leave the epoll set
    /// before anything else, and it leaves the worker whole, so a failed
    /// upgrade can give it back unchanged.
    pub(super) fn freeze(&mut self, reply: Sender<Frozen>, now: Instant) {
        self.frozen = true;
        for slot in &mut self.listeners {
            slot.backlog = false;
        }
        let mut waiting = self.prefaces.len();
        let keys: Vec<usize> = self.relays.iter().map(|(k, _)| k).collect();
        let mut relays = Vec::with_capacity(keys.len());
        for key in keys {
            if !self.relays[key].transferable() {
                waiting += 1;
                continue;
            }
            let mut relay = self.relays.remove(key);
            let registry = self.poll.registry();
            // Failures mean the socket is no longer registered: just as well.
            let _ = registry.deregister(&mut relay.client);
            let _ = registry.deregister(&mut relay.upstream);
            relay.armed_at = None;
            relay.queued = false;
            CounterBlock::sub(&relay.listener.counters(self.index).relays_active, 1);
            self.shared.relays_live.fetch_sub(1, Ordering::Relaxed);
            relays.push((relay, fdpass::monotonic_ns()));
        }
        let _ = now;
        let frozen = Frozen {
            worker: self.index,
            relays,
            waiting,
        };
        if let Err(unsent) = reply.send(frozen) {
            // Nobody waits for them any more: they stay here.
            let relays = unsent.0.relays.into_iter().map(|(r, _)| r).collect();
            self.thaw(relays, true, now);
        }
    }

    /// Takes relays back (a failed upgrade, or ones it could not hand),
    /// and with `accept` accepts again.
    pub(super) fn thaw(&mut self, relays: Vec<Relay>, accept: bool, now: Instant) {
        if accept {
            self.frozen = false;
            for slot in &mut self.listeners {
                // Clients may have queued meanwhile.
                slot.backlog = slot.socket.is_some();
            }
        }
        for relay in relays {
            if let Some(key) = self.admit(relay, now) {
                // Readiness that arrived while it was away is unknown.
                let relay = &mut self.relays[key];
                relay.ready(
                    Peer::Client,
                    Readiness {
                        readable: true,
                        writable: true,
                        hung_up: true,
                        urgent: false,
                    },
                );
                relay.ready(
                    Peer::Upstream,
                    Readiness {
                        readable: true,
                        writable: true,
                        hung_up: true,
                        urgent: false,
                    },
                );
                self.run_relay(key, now);
            }
        }
    }

    /// Registers relays handed over by the process this one replaces and
    /// pumps each at once; replies with each one's pause (from when the
    /// old process froze it to now). A relay that cannot be rebuilt here
    /// is reset on both sides, logged and counted as internal.
    pub(super) fn resume(&mut self, parcels: Vec<Parcel>, reply: Sender<Vec<u64>>, now: Instant) {
        let mut pauses = Vec::with_capacity(parcels.len());
        for parcel in parcels {
            let frozen_ns = parcel.state.frozen_ns;
            let id = parcel.state.id;
            // Ids stay unique in this process: new relays count on from the last.
            super::NEXT_RELAY_ID.fetch_max(id + 1, Ordering::Relaxed);
            let Some(listener) = self.listener_named(&parcel.state.listener) else {
                tracing::error!(
                    relay = id,
                    "upgrade: no listener to resume a relay under; its sockets are closed"
                );
                continue;
            };
            let now_ns = fdpass::monotonic_ns();
            match Relay::resume(parcel, Arc::clone(&listener), &mut self.pools, now, now_ns) {
                Ok(relay) => {
                    if let Some(key) = self.admit(relay, now) {
                        self.run_relay(key, now);
                    }
                    pauses.push(fdpass::monotonic_ns().saturating_sub(frozen_ns));
                }
                Err(e) => {
                    listener.counters(self.index).closed(CloseReason::Internal);
                    tracing::error!(relay = id, error = %e, "upgrade: cannot resume a relay handed over; its sockets are closed");
                }
            }
        }
        let _ = reply.send(pauses);
    }

    /// The listener in force named `name`; a relay whose listener the new
    /// config no longer has counts under the first listener's settings.
    fn listener_named(&self, name: &str) -> Option<Arc<Listener>> {
        if let Some(slot) = self
            .listeners
            .iter()
            .find(|s| s.runtime.config.name == name)
        {
            return Some(Arc::clone(&slot.runtime));
        }
        tracing::warn!(
            listener = name,
            "upgrade: a relay's listener is gone from the config; it carries on under another listener's settings"
        );
        self.listeners.first().map(|s| Arc::clone(&s.runtime))
    }
}
