//! Refusing a config whose upstreams lead back into the proxy itself.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::config::Config;
use crate::error::StartError;

/// Refuses an upstream that leads back into this proxy: one of its own
/// listen addresses, directly or through the proxy's other listeners. Every
/// relay to it would open another relay until the relay cap is used up.
///
/// An upstream reaches a bound address when both are equal, or when the
/// bound address is a wildcard (`0.0.0.0`, `[::]`) of the same port and the
/// upstream's IP is this host's: loopback, unspecified (which connects to
/// loopback) or an interface address. A dual-stack `[::]` also takes IPv4.
pub(crate) fn refuse_loops(
    config: &Config,
    upstreams: &[Vec<SocketAddr>],
    bound: &[(usize, SocketAddr)],
) -> Result<(), StartError> {
    let mut host_ips: Option<Vec<IpAddr>> = None;
    let mut is_host_ip = |ip: IpAddr| {
        ip.is_loopback()
            || host_ips
                .get_or_insert_with(interface_ips)
                .iter()
                .any(|&a| canonical(a) == ip)
    };
    let v6only = crate::config::listen::bindv6only();
    let dual_stack: Vec<bool> = config
        .listeners
        .iter()
        .map(|l| crate::config::listen::dual_stack(&l.listen, v6only))
        .collect();
    // edges[i]: (upstream, listener it reaches) for each upstream of listener i.
    let mut edges: Vec<Vec<(SocketAddr, usize)>> = vec![Vec::new(); config.listeners.len()];
    for (i, ups) in upstreams.iter().enumerate() {
        for &up in ups {
            let ip = match canonical(up.ip()) {
                IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
                ip => ip,
            };
            for &(j, addr) in bound {
                if addr.port() != up.port() || edges[i].iter().any(|&(u, k)| u == up && k == j) {
                    continue;
                }
                let reached = match canonical(addr.ip()) {
                    IpAddr::V4(b) if b.is_unspecified() => ip.is_ipv4() && is_host_ip(ip),
                    IpAddr::V6(b) if b.is_unspecified() => {
                        (ip.is_ipv6() || dual_stack[j]) && is_host_ip(ip)
                    }
                    b => b == ip,
                };
                if reached {
                    edges[i].push((up, j));
                }
            }
        }
    }
    for (i, out) in edges.iter().enumerate() {
        for &(up, j) in out {
            if reaches(&edges, j, i) {
                return Err(StartError::Loop(up));
            }
        }
    }
    Ok(())
}

/// Whether listener `to` is `from` or can be reached from it along `edges`.
fn reaches(edges: &[Vec<(SocketAddr, usize)>], from: usize, to: usize) -> bool {
    let mut seen = vec![false; edges.len()];
    let mut stack = vec![from];
    while let Some(at) = stack.pop() {
        if at == to {
            return true;
        }
        if !std::mem::replace(&mut seen[at], true) {
            stack.extend(edges[at].iter().map(|&(_, next)| next));
        }
    }
    false
}

/// An IPv4-mapped IPv6 address as the IPv4 address it stands for.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The addresses of this host's network interfaces (none if they cannot be read).
fn interface_ips() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| {
            let a = a.address?;
            if let Some(v4) = a.as_sockaddr_in() {
                Some(IpAddr::V4(v4.ip()))
            } else {
                a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// Listeners `(listen, upstreams)`, bound at their listen addresses.
    fn loops(listeners: &[(&[&str], &[&str])]) -> Result<(), SocketAddr> {
        let mut c = Config::single(addr("127.0.0.1:1"), vec![], Mode::Splice);
        c.listeners = listeners
            .iter()
            .map(|(listen, ups)| {
                let mut l = crate::config::ListenerConfig::new(
                    addr(listen[0]),
                    ups.iter().map(|u| addr(u)).collect(),
                    Mode::Splice,
                );
                l.listen = listen.iter().map(|a| addr(a)).collect();
                l
            })
            .collect();
        let bound: Vec<(usize, SocketAddr)> = c
            .listeners
            .iter()
            .enumerate()
            .flat_map(|(i, l)| l.listen.iter().map(move |&a| (i, a)))
            .collect();
        let ups: Vec<Vec<SocketAddr>> = listeners
            .iter()
            .map(|(_, ups)| ups.iter().map(|u| addr(u)).collect())
            .collect();
        match refuse_loops(&c, &ups, &bound) {
            Ok(()) => Ok(()),
            Err(StartError::Loop(up)) => Err(up),
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn an_upstream_back_into_the_proxy_is_a_loop() {
        let own = addr("127.0.0.1:6432");
        assert_eq!(
            loops(&[(&["127.0.0.1:6432"], &["127.0.0.1:6432"])]),
            Err(own)
        );
        // Among other upstreams too.
        assert_eq!(
            loops(&[(&["127.0.0.1:6432"], &["127.0.0.1:5432", "127.0.0.1:6432"])]),
            Err(own)
        );
        // A wildcard takes loopback, unspecified and mapped addresses of its port.
        for up in ["127.0.0.9:6432", "0.0.0.0:6432", "[::ffff:127.0.0.1]:6432"] {
            assert_eq!(loops(&[(&["0.0.0.0:6432"], &[up])]), Err(addr(up)), "{up}");
        }
        assert_eq!(
            loops(&[(&["[::]:6432"], &["[::1]:6432"])]),
            Err(addr("[::1]:6432"))
        );
        // Through another listener.
        assert_eq!(
            loops(&[
                (&["127.0.0.1:7000"], &["127.0.0.1:7001"]),
                (&["127.0.0.1:7001"], &["127.0.0.1:7000"]),
            ]),
            Err(addr("127.0.0.1:7001"))
        );
    }

    #[test]
    fn other_servers_are_no_loop() {
        // Another port, another loopback address, a host that is not this one.
        assert!(loops(&[(&["127.0.0.1:6432"], &["127.0.0.1:5432"])]).is_ok());
        assert!(loops(&[(&["127.0.0.1:6432"], &["127.0.0.2:6432"])]).is_ok());
        assert!(loops(&[(&["0.0.0.0:6432"], &["198.51.100.7:6432"])]).is_ok());
        // An IPv6-only wildcard beside an IPv4 address does not take IPv4.
        assert!(loops(&[(&["127.0.0.1:6432", "[::]:6432"], &["127.0.0.2:6432"])]).is_ok());
        // A chain that ends outside the proxy.
        assert!(loops(&[
            (&["127.0.0.1:7000"], &["127.0.0.1:7001"]),
            (&["127.0.0.1:7001"], &["127.0.0.1:5432"]),
        ])
        .is_ok());
    }
}
