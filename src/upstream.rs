//! Choosing an upstream and connecting to it without blocking.
//!
//! Selection is round-robin per accepted connection over a cursor shared by
//! all workers; attempt `n` of a relay uses the `n`-th server after its first,
//! so a refused or timed-out connect moves on to the next server.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use mio::net::TcpStream;

use crate::relay::ListenerRuntime;

/// Where a relay starts its round of attempts.
pub(crate) fn first_index(listener: &ListenerRuntime) -> usize {
    listener.next_upstream.fetch_add(1, Ordering::Relaxed)
}

/// The server for attempt `attempt`, or `None` once every server was tried.
pub(crate) fn server(
    listener: &ListenerRuntime,
    first: usize,
    attempt: usize,
) -> Option<SocketAddr> {
    let servers = &listener.config.upstreams;
    (attempt < servers.len()).then(|| servers[(first + attempt) % servers.len()])
}

/// Starts a non-blocking connect (mio's recipe: register for WRITABLE, then
/// [`connect_result`] on the event).
pub(crate) fn start_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    TcpStream::connect(addr)
}

/// `Ok(true)` once connected, `Ok(false)` while still connecting (a spurious
/// wakeup), `Err` when the connect failed.
pub(crate) fn connect_result(stream: &TcpStream) -> io::Result<bool> {
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}
