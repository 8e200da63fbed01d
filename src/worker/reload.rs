//! A worker's part of a reload: new settings for kept sockets, new sockets,
//! closed sockets, and the deadline of relays whose listener is gone.
//! Relays alive at the reload are not touched: each holds the listener it
//! was accepted by, settings and pool included.

use std::sync::Arc;
use std::time::Instant;

use mio::Interest;

use super::{ListenerSlot, Worker};
use crate::control::WorkerReload;
use crate::stats::CloseReason;
use crate::token;

impl Worker {
    /// Applies `reload` at once. Sockets are closed before new ones are
    /// added, so a slot (and its token) freed by one may be reused by the
    /// other; a stale event on a reused token only costs an accept that
    /// finds nothing.
    pub(super) fn reload(&mut self, mut reload: WorkerReload, now: Instant) {
        if self.draining {
            // Stopping already: new sockets are dropped (closed) unused.
            return;
        }
        for (addr, listener) in std::mem::take(&mut reload.retarget) {
            for slot in self.listeners.iter_mut().filter(|s| s.addr == Some(addr)) {
                slot.runtime = Arc::clone(&listener);
                // A full_until of the old settings no longer holds.
                slot.full_until = None;
                slot.backlog = true;
            }
        }
        for addr in std::mem::take(&mut reload.close) {
            for slot in self.listeners.iter_mut().filter(|s| s.addr == Some(addr)) {
                if let Some(mut socket) = slot.socket.take() {
                    // Deregistered explicitly: an inherited socket has other
                    // descriptors that would keep it in the epoll set.
                    let _ = self.poll.registry().deregister(&mut socket);
                }
                slot.addr = None;
                slot.backlog = false;
                slot.full_until = None;
            }
        }
        for (mut socket, listener) in std::mem::take(&mut reload.add) {
            let free = self.listeners.iter().position(|s| s.socket.is_none());
            let index = free.unwrap_or(self.listeners.len());
            let registered = self.poll.registry().register(
                &mut socket,
                token::listener(index),
                Interest::READABLE,
            );
            if let Err(e) = registered {
                tracing::error!(
                    worker = self.index,
                    listener = %listener.label(),
                    error = %e,
                    "internal: cannot register a new listening socket; this worker does not accept on it"
                );
                continue;
            }
            let slot = ListenerSlot {
                addr: socket.local_addr().ok(),
                socket: Some(socket),
                runtime: listener,
                // Clients may have queued between bind and registration.
                backlog: true,
                full_until: None,
            };
            match free {
                Some(i) => self.listeners[i] = slot,
                None => self.listeners.push(slot),
            }
        }
        let removed: Vec<_> = reload.retire.iter().map(|&(id, _)| id).collect();
        for (id, deadline) in std::mem::take(&mut reload.retire) {
            if let Some(at) = deadline {
                self.retiring.push((id, at));
            }
        }
        self.rehome_held(&removed, now);
        self.close_retired(now);
        self.checks.rescan();
        if let Some(applied) = reload.applied {
            let _ = applied.send(());
        }
    }

    /// Closes the relays of removed listeners whose drain deadline passed.
    pub(super) fn close_retired(&mut self, now: Instant) {
        if !self.retiring.iter().any(|&(_, at)| at <= now) {
            return;
        }
        let due: Vec<_> = self
            .retiring
            .iter()
            .filter(|&&(_, at)| at <= now)
            .map(|&(id, _)| id)
            .collect();
        self.retiring.retain(|&(_, at)| at > now);
        let keys: Vec<usize> = self
            .relays
            .iter()
            .filter(|(_, r)| due.contains(&r.listener_id()))
            .map(|(k, _)| k)
            .collect();
        if !keys.is_empty() {
            tracing::info!(
                worker = self.index,
                relays = keys.len(),
                "drain timeout of a removed listener: closing its relays"
            );
        }
        for key in keys {
            self.close(key, CloseReason::Shutdown, None, now);
        }
    }
}
