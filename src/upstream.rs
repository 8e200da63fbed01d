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

/// Where a non-blocking connect stands.
#[derive(Debug)]
pub(crate) enum Connect {
    /// Still in the handshake (a spurious wakeup).
    Pending,
    Established,
    /// The handshake completed, then the server reset the connection before
    /// the connect event was handled: a connection that failed, not a
    /// failed connect, so it must not fail over.
    Lost(io::Error),
    /// The handshake failed (refused, unreachable, timed out): try the next
    /// server.
    Failed(io::Error),
}

/// Reads a connect's outcome after an event on its socket.
pub(crate) fn connect_result(stream: &TcpStream) -> Connect {
    match stream.take_error() {
        Ok(Some(e)) | Err(e) if established_then_lost(&e) => return Connect::Lost(e),
        Ok(Some(e)) | Err(e) => return Connect::Failed(e),
        Ok(None) => {}
    }
    match stream.peer_addr() {
        Ok(_) => Connect::Established,
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Connect::Pending,
        Err(e) => Connect::Failed(e),
    }
}

/// Errors a socket only gets after its handshake completed: a reset (a
/// reset during the handshake reads as ECONNREFUSED) or a write to a closed
/// connection.
fn established_then_lost(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNRESET) | Some(libc::EPIPE))
}
