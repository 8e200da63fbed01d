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
    /// Passed by the instance a live upgrade replaces, not by a service
    /// manager: a listener asked on port 0 then adopts the port the old
    /// instance was given.
    upgrade: bool,
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
        Inherited {
            sockets,
            upgrade: false,
        }
    }

    /// The listening sockets a live upgrade passed (see [`Inherited::new`]).
    #[cfg_attr(not(feature = "service"), allow(dead_code))]
    pub(crate) fn handed_over(fds: Vec<OwnedFd>) -> Inherited {
        Inherited {
            upgrade: true,
            ..Inherited::new(fds)
        }
    }

    fn passer(&self) -> &'static str {
        if self.upgrade {
            "the instance this one upgrades"
        } else {
            "the service manager"
        }
    }

    /// Every inherited socket bound to exactly `addr`: one from a service
    /// manager, or each of the old process's SO_REUSEPORT sockets in a
    /// live upgrade (each has its own accept queue, so none may close).
    /// In an upgrade, an address asked with port 0 takes the sockets of the
    /// first passed address with its IP: the port the old process was given.
    fn take(&mut self, addr: SocketAddr) -> Vec<std::net::TcpListener> {
        let addr = match self.sockets.iter().find(|(_, a)| *a == addr) {
            Some(_) => addr,
            None if self.upgrade && addr.port() == 0 => {
                match self.sockets.iter().find(|(_, a)| a.ip() == addr.ip()) {
                    Some(&(_, a)) => a,
                    None => return Vec::new(),
                }
            }
            None => return Vec::new(),
        };
        let (taken, kept) = std::mem::take(&mut self.sockets)
            .into_iter()
            .partition(|(_, a)| *a == addr);
        self.sockets = kept;
        taken.into_iter().map(|(s, _)| s).collect()
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
            let passed = inherited.take(asked);
            if !passed.is_empty() {
                // Every worker accepts on every passed socket of the
                // address, whatever the two processes' worker counts.
                for socket in &passed {
                    for sockets in per_worker.iter_mut() {
                        let shared = socket.try_clone().map_err(fail)?;
                        shared.set_nonblocking(true).map_err(fail)?;
                        let shared = TcpListener::from_std(shared);
                        accepted_without_delay(&shared).map_err(fail)?;
                        sockets.push((shared, Arc::clone(runtime)));
                    }
                }
                let addr = passed[0].local_addr().map_err(fail)?;
                let by = inherited.passer();
                tracing::info!(listener = %listener.name, address = %addr, sockets = passed.len(), "using the socket passed by {by}");
                local_addrs.push((index, addr));
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
                accepted_without_delay(&socket).map_err(fail)?;
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

/// Sets TCP_NODELAY on a listening socket, which every socket it accepts
/// inherits: database traffic is small request/response, never to be held
/// back for an ACK (with Nagle a reply's last segment waits for the
/// client's delayed ACK, about 40 ms). One setsockopt per listening socket
/// instead of one per client. Every listening socket a worker gets, at
/// start or at a reload, bound here or passed by a service manager, comes
/// through [`bind_listeners`] and so through this.
fn accepted_without_delay(socket: &TcpListener) -> io::Result<()> {
    socket2::SockRef::from(socket).set_nodelay(true)
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

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;
    use crate::config::Mode;
    use crate::listener::ListenerId;
    use crate::upstream::Fleet;

    /// Every listening socket a worker gets has TCP_NODELAY, so every client
    /// socket it accepts does: bound here, and passed by a service manager.
    #[test]
    fn every_listening_socket_hands_nodelay_to_what_it_accepts() {
        let passed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let passed_addr = passed.local_addr().unwrap();
        let mut config = Config::single("127.0.0.1:0".parse().unwrap(), vec![], Mode::Splice);
        config.workers = 2;
        let mut second = config.listeners[0].clone();
        second.name = "passed".into();
        second.listen = vec![passed_addr];
        config.listeners.push(second);
        let names: Vec<String> = config.listeners.iter().map(|l| l.name.clone()).collect();
        let arena = crate::shm::Arena::new(1, &names, 0);
        let fleet = Fleet::new();
        let runtimes: Vec<Arc<Listener>> = config
            .listeners
            .iter()
            .enumerate()
            .map(|(i, l)| {
                Arc::new(Listener::new(
                    ListenerId(i as u32),
                    l.clone(),
                    arena.listener_counters(i),
                    &fleet,
                ))
            })
            .collect();
        let mut inherited = Inherited::new(vec![OwnedFd::from(passed)]);
        let bound = bind_listeners(&config, &runtimes, |_, _| true, &mut inherited).unwrap();
        assert_eq!(bound.local_addrs.len(), 2);
        for &(_, addr) in &bound.local_addrs {
            // The workers' sockets of one address: a SO_REUSEPORT group (the
            // kernel picks which one accepts) or clones of a passed socket.
            let group: Vec<&TcpListener> = bound
                .per_worker
                .iter()
                .map(|sockets| {
                    let (socket, _) = sockets
                        .iter()
                        .find(|(s, _)| s.local_addr().unwrap() == addr)
                        .expect("every worker has a socket for every address");
                    assert!(socket2::SockRef::from(socket).nodelay().unwrap());
                    socket
                })
                .collect();
            let clients: Vec<TcpStream> = (0..group.len())
                .map(|_| TcpStream::connect(addr).unwrap())
                .collect();
            for accepted in accept_all(&group, clients.len(), Duration::from_secs(5)) {
                assert!(
                    accepted.nodelay().unwrap(),
                    "accepted on {addr} without TCP_NODELAY"
                );
            }
        }
    }

    /// Accepts `n` connections from any socket of `group`, polling until the
    /// deadline.
    fn accept_all(group: &[&TcpListener], n: usize, limit: Duration) -> Vec<mio::net::TcpStream> {
        let until = std::time::Instant::now() + limit;
        let mut accepted = Vec::new();
        while accepted.len() < n {
            for socket in group {
                match socket.accept() {
                    Ok((s, _)) => accepted.push(s),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("accept: {e}"),
                }
            }
            assert!(
                std::time::Instant::now() < until,
                "{} of {n} connections accepted in {limit:?}",
                accepted.len()
            );
            std::thread::yield_now();
        }
        accepted
    }
}
