//! Which listen addresses can be bound side by side, as
//! `worker::bind_listeners` binds them: a `[::]` takes IPv4 too unless its
//! listener also has an IPv4 address (then it is bound IPV6_V6ONLY) or
//! `net.ipv6.bindv6only` is 1; an IPv4-mapped address (`[::ffff:a.b.c.d]`)
//! takes that IPv4 address, and cannot be bound at all by an IPv6-only
//! socket (EINVAL).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

/// `net.ipv6.bindv6only`: whether a `[::]` listener without IPV6_V6ONLY
/// set explicitly takes IPv6 only.
pub fn bindv6only() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv6/bindv6only").is_ok_and(|s| s.trim() == "1")
}

/// Whether a listener with these addresses binds its IPv6 ones dual-stack
/// (taking IPv4 too): no IPv4 address beside them, and the system default.
pub fn dual_stack(listen: &[SocketAddr], bindv6only: bool) -> bool {
    !listen.iter().any(SocketAddr::is_ipv4) && !bindv6only
}

/// What binding `addr` takes, in canonical form (IPv4-mapped as IPv4): one
/// address, or two for a dual-stack `[::]`. `None`: the bind fails, an
/// IPv4-mapped address on an IPv6-only socket.
pub fn claims(addr: SocketAddr, dual_stack: bool) -> Option<Vec<SocketAddr>> {
    let SocketAddr::V6(v6) = addr else {
        return Some(vec![addr]);
    };
    if let Some(v4) = v6.ip().to_ipv4_mapped() {
        return dual_stack.then(|| vec![SocketAddr::new(IpAddr::V4(v4), addr.port())]);
    }
    if v6.ip().is_unspecified() && dual_stack {
        let any4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), addr.port());
        return Some(vec![addr, any4]);
    }
    Some(vec![addr])
}

/// Two canonical addresses that cannot both be bound: equal, or a wildcard
/// and an address of the same family and port. Port 0 never collides.
pub fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && a.is_ipv4() == b.is_ipv4()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn clash(x: &str, dual_x: bool, y: &str, dual_y: bool) -> bool {
        let (cx, cy) = (claims(a(x), dual_x).unwrap(), claims(a(y), dual_y).unwrap());
        cx.iter().any(|&p| cy.iter().any(|&q| overlaps(p, q)))
    }

    #[test]
    fn mapped_addresses_are_their_ipv4_address() {
        assert!(clash("[::ffff:127.0.0.1]:7", true, "127.0.0.1:7", false));
        assert!(clash("[::ffff:127.0.0.1]:7", true, "0.0.0.0:7", false));
        assert!(!clash("[::ffff:127.0.0.1]:7", true, "127.0.0.2:7", false));
        assert!(!clash("[::ffff:127.0.0.1]:7", true, "127.0.0.1:8", false));
        // An IPv6-only socket cannot bind a mapped address at all.
        assert_eq!(claims(a("[::ffff:127.0.0.1]:7"), false), None);
    }

    #[test]
    fn a_dual_stack_wildcard_takes_ipv4_too() {
        assert!(clash("[::]:7", true, "127.0.0.1:7", false));
        assert!(clash("[::]:7", true, "0.0.0.0:7", false));
        assert!(!clash("[::]:7", false, "127.0.0.1:7", false));
        assert!(!clash("[::]:7", false, "0.0.0.0:7", false));
        assert!(clash("[::]:7", false, "[::1]:7", false));
        assert!(!clash("[::1]:7", true, "127.0.0.1:7", false));
        assert!(!clash("[::]:0", true, "127.0.0.1:0", false));
    }

    #[test]
    fn dual_stack_needs_no_ipv4_beside_and_bindv6only_off() {
        let (any6, lo4) = (a("[::]:7"), a("127.0.0.1:7"));
        assert!(dual_stack(&[any6], false));
        assert!(!dual_stack(&[any6], true));
        assert!(!dual_stack(&[any6, lo4], false));
    }
}
