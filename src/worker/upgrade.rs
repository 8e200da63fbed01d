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
