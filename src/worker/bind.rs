//! Listening sockets for the workers: bound here once per worker with
//! SO_REUSEPORT, or adopted from a service manager (socket activation) and
//! shared by every worker.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use mio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::error::StartError;
use crate::listener::Listener;

const LISTEN_BACKLOG: i32 = 4096;

/// Listeners bound for every worker, before any worker starts.
pub(crate) struct Bound {
    /// Every bound address with the index of its listener, in config order.
    pub(crate) local_addrs: Vec<(usize, SocketAddr)>,
    pub(crate) per_worker: Vec<Vec<(TcpListener, Arc<Listener>)>>,
}

/// Listening sockets handed to the process at start (`LISTEN_FDS`), not
/// yet claimed by a listener.
#[derive(Debug, Default)]
pub(crate) struct Inherited {
    sockets: Vec<(std::net::TcpListener, SocketAddr)>,
}

impl Inherited {
    /// Keeps the descriptors that are listening TCP sockets; any other is
    /// closed with a warning, since no listener could use it. (Only
    /// socket activation, feature `service`, passes descriptors.)
    #[cfg_attr(not(feature = "service"), allow(dead_code))]
    pub(crate) fn new(fds: Vec<OwnedFd>) -> Inherited {
        let mut sockets = Vec::new();
        for fd in fds {
            let socket = Socket::from(fd);
            let addr = socket.local_addr().ok().and_then(|a| a.as_socket());
            let listening = socket.is_listener().unwrap_or(false);
            let stream = socket.r#type().is_ok_and(|t| t == Type::STREAM);
            match addr {
                Some(addr) if listening && stream => sockets.push((socket.into(), addr)),
                _ => tracing::warn!(
                    address = ?addr,
                    "an inherited descriptor is not a listening TCP socket; closing it"
                ),
            }
        }
        Inherited { sockets }
    }

    /// The inherited socket bound to exactly `addr`, if any.
    fn take(&mut self, addr: SocketAddr) -> Option<std::net::TcpListener> {
        let at = self.sockets.iter().position(|(_, a)| *a == addr)?;
        Some(self.sockets.swap_remove(at).0)
    }

    /// Closes the sockets no listener claimed, naming each.
    pub(crate) fn close_unclaimed(&mut self) {
        for (_, addr) in self.sockets.drain(..) {
            tracing::warn!(address = %addr, "an inherited socket matches no listener's address; closing it");
        }
    }
}

/// Binds each listener address that `want(index, address)` selects, once
/// per worker with SO_REUSEPORT, so the kernel spreads accepts. The first
/// bind resolves port 0, the others reuse the concrete port. An address a
/// service manager passed a socket for is not bound: every worker registers
/// its own descriptor of that one socket (SO_REUSEPORT cannot be added to a
/// socket that already listens), and whichever worker wakes first accepts.
///
/// SO_REUSEPORT alone would let a second spliced (or anything else that set
/// it) share a port and take half its connections. So each address is first
/// claimed by a probe socket without SO_REUSEPORT: its bind fails with
/// EADDRINUSE while any other process listens there, whatever options that
/// process set. The probe stays bound, not listening, until the workers'
/// sockets listen; SO_REUSEADDR on both lets them coexist.
pub(crate) fn bind_listeners(
    config: &Config,
    runtimes: &[Arc<Listener>],
    want: impl Fn(usize, SocketAddr) -> bool,
    inherited: &mut Inherited,
) -> Result<Bound, StartError> {
    let mut per_worker: Vec<Vec<_>> = (0..config.workers).map(|_| Vec::new()).collect();
    let mut local_addrs = Vec::new();
    for (index, (listener, runtime)) in config.listeners.iter().zip(runtimes).enumerate() {
        let dual_family = listener.listen.iter().any(|a| a.is_ipv4());
        for &asked in listener.listen.iter().filter(|&&a| want(index, a)) {
            let fail = |e| StartError::Listen(asked, e);
            if let Some(socket) = inherited.take(asked) {
                for sockets in per_worker.iter_mut() {
                    let shared = socket.try_clone().map_err(fail)?;
                    shared.set_nonblocking(true).map_err(fail)?;
                    sockets.push((TcpListener::from_std(shared), Arc::clone(runtime)));
                }
                tracing::info!(listener = %listener.name, address = %asked, "using the socket passed by the service manager");
                local_addrs.push((index, asked));
                continue;
            }
            let probe = match claim(asked, dual_family) {
                Ok(probe) => probe,
                Err(e)
                    if asked.is_ipv6()
                        && asked.ip().is_unspecified()
                        && no_ipv6(&e)
                        && dual_family =>
                {
                    tracing::warn!(address = %asked, error = %e, "IPv6 is not available here; listening on IPv4 only");
                    continue;
                }
                Err(e) => return Err(fail(e)),
            };
            let addr = probe.local_addr().and_then(|a| {
                a.as_socket()
                    .ok_or_else(|| io::Error::other("bound address is not an IP address"))
            });
            let addr = addr.map_err(fail)?;
            for sockets in per_worker.iter_mut() {
                let socket = bind_one(addr, dual_family).map_err(fail)?;
                sockets.push((socket, Arc::clone(runtime)));
            }
            local_addrs.push((index, addr));
        }
    }
    Ok(Bound {
        local_addrs,
        per_worker,
    })
}

fn new_socket(addr: SocketAddr, v6_only: bool) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() && v6_only {
        // Beside an IPv4 address of the same listener, `[::]` must not claim
        // IPv4 too, or the two binds would collide.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_cloexec(true)?;
    Ok(socket)
}

/// Binds without SO_REUSEPORT to find out whether the address is free.
fn claim(addr: SocketAddr, v6_only: bool) -> io::Result<Socket> {
    let socket = new_socket(addr, v6_only)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn bind_one(addr: SocketAddr, v6_only: bool) -> io::Result<TcpListener> {
    let socket = new_socket(addr, v6_only)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// The host has no IPv6 (disabled, or no such address family).
fn no_ipv6(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
    )
}
