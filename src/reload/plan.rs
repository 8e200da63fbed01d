//! Working out a reload before anything changes: which listeners and
//! sockets stay, change, come and go; which process-wide settings a
//! reload cannot change; how a listener's asked addresses pair with the
//! ones bound.

use std::net::SocketAddr;

use crate::config::{Config, ListenerConfig};

/// What becomes of each new listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fate {
    /// The same settings: the running listener goes on as it is.
    Same(usize),
    /// Same name, new settings: a successor of old listener `i`.
    Changed(usize),
    /// A name the old config did not have.
    New,
}

/// A reload worked out from the old listeners and sockets and the new
/// config, before anything changes. Indices are into the old `Active`
/// list and the new config's listeners.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Plan {
    pub(super) fates: Vec<Fate>,
    /// (new listener, asked address) to bind.
    pub(super) bind: Vec<(usize, SocketAddr)>,
    /// (new listener, asked, bound): sockets that stay.
    pub(super) keep: Vec<(usize, SocketAddr, SocketAddr)>,
    /// Bound addresses to close.
    pub(super) close: Vec<SocketAddr>,
    /// Old listeners gone.
    pub(super) removed: Vec<usize>,
}

/// Pure: which listeners and sockets stay, change, come and go.
/// `old` is each old listener's settings and (asked, bound) sockets.
pub(super) fn plan(
    old: &[(&ListenerConfig, &[(SocketAddr, SocketAddr)])],
    new: &[ListenerConfig],
) -> Plan {
    let mut p = Plan::default();
    let mut used = vec![false; old.iter().map(|(_, s)| s.len()).sum()];
    let sockets: Vec<(SocketAddr, SocketAddr)> =
        old.iter().flat_map(|(_, s)| s.iter().copied()).collect();
    for (i, l) in new.iter().enumerate() {
        p.fates
            .push(match old.iter().position(|(o, _)| o.name == l.name) {
                Some(j) if *old[j].0 == *l => Fate::Same(j),
                Some(j) => Fate::Changed(j),
                None => Fate::New,
            });
        for &asked in &l.listen {
            // The address asked before, or (for one asked as port 0) the
            // one it got.
            let same =
                |k: usize| sockets[k].0 == asked || (asked.port() != 0 && sockets[k].1 == asked);
            let kept = (0..sockets.len())
                .find(|&k| !used[k] && sockets[k].0 == asked)
                .or_else(|| (0..sockets.len()).find(|&k| !used[k] && same(k)));
            match kept {
                Some(k) => {
                    used[k] = true;
                    p.keep.push((i, asked, sockets[k].1));
                }
                None => p.bind.push((i, asked)),
            }
        }
    }
    p.close = (0..sockets.len())
        .filter(|&k| !used[k])
        .map(|k| sockets[k].1)
        .collect();
    p.removed = (0..old.len())
        .filter(|&j| !new.iter().any(|l| l.name == old[j].0.name))
        .collect();
    p
}

/// Process-wide settings that differ between `old` and `new`.
pub(super) fn restart_settings(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = Vec::new();
    let mut check = |differs: bool, name| {
        if differs {
            out.push(name);
        }
    };
    check(old.workers != new.workers, "workers");
    check(old.event_loop != new.event_loop, "loop");
    check(old.pipe_size != new.pipe_size, "pipe-size");
    check(
        old.max_pipes_per_worker != new.max_pipes_per_worker,
        "max-pipes",
    );
    check(
        old.max_idle_pipes_per_worker != new.max_idle_pipes_per_worker,
        "max-idle-pipes",
    );
    check(old.pipe_budget != new.pipe_budget, "pipe-budget");
    check(old.copy_buffer_size != new.copy_buffer_size, "copy-buffer");
    check(old.max_relays != new.max_relays, "max-conns (global)");
    check(old.drain_timeout != new.drain_timeout, "drain-timeout");
    // The endpoint's thread and socket are set up once, at start.
    check(old.ops.admin != new.ops.admin, "admin");
    out
}

/// Pairs a listener's asked addresses with its bound ones, which
/// `bind_listeners` gives in the same order (an asked `[::]` without IPv6
/// has no bound address and is left out).
pub(super) fn pair_asked<'a>(
    config: &ListenerConfig,
    bound: impl Iterator<Item = &'a (usize, SocketAddr)>,
) -> Vec<(SocketAddr, SocketAddr)> {
    let mut asked = config.listen.iter().copied();
    let mut out = Vec::new();
    for &(_, b) in bound {
        for a in asked.by_ref() {
            if same_family_and_port(a, b) {
                out.push((a, b));
                break;
            }
        }
    }
    out
}

fn same_family_and_port(asked: SocketAddr, bound: SocketAddr) -> bool {
    asked.is_ipv4() == bound.is_ipv4() && (asked.port() == 0 || asked.port() == bound.port())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Mode;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn listener(name: &str, listen: &[&str], upstream: &str) -> ListenerConfig {
        let mut l = ListenerConfig::new(addr(listen[0]), vec![addr(upstream)], Mode::Splice);
        l.name = name.into();
        l.listen = listen.iter().map(|a| addr(a)).collect();
        l
    }

    /// The old side of a plan: each listener bound where it asked.
    fn bound(ls: &[ListenerConfig]) -> Vec<Vec<(SocketAddr, SocketAddr)>> {
        ls.iter()
            .map(|l| l.listen.iter().map(|&a| (a, a)).collect())
            .collect()
    }

    fn plan_of(old: &[ListenerConfig], new: &[ListenerConfig]) -> Plan {
        let sockets = bound(old);
        let old: Vec<_> = old
            .iter()
            .zip(&sockets)
            .map(|(l, s)| (l, s.as_slice()))
            .collect();
        plan(&old, new)
    }

    #[test]
    fn the_same_config_keeps_everything() {
        let a = listener("a", &["127.0.0.1:7000", "127.0.0.1:7001"], "127.0.0.1:5432");
        let p = plan_of(std::slice::from_ref(&a), std::slice::from_ref(&a));
        assert_eq!(p.fates, vec![Fate::Same(0)]);
        assert!(p.bind.is_empty() && p.close.is_empty() && p.removed.is_empty());
        assert_eq!(p.keep.len(), 2);
    }

    #[test]
    fn new_settings_keep_the_sockets() {
        let a = listener("a", &["127.0.0.1:7000"], "127.0.0.1:5432");
        let mut b = a.clone();
        b.set_upstreams(&[addr("127.0.0.1:5433")]);
        b.max_conns = Some(3);
        let p = plan_of(&[a], &[b]);
        assert_eq!(p.fates, vec![Fate::Changed(0)]);
        assert_eq!(
            p.keep,
            vec![(0, addr("127.0.0.1:7000"), addr("127.0.0.1:7000"))]
        );
        assert!(p.bind.is_empty() && p.close.is_empty());
    }

    #[test]
    fn a_moved_address_binds_the_new_and_closes_the_old() {
        let a = listener("a", &["127.0.0.1:7000", "127.0.0.1:7001"], "127.0.0.1:5432");
        let b = listener("a", &["127.0.0.1:7001", "127.0.0.1:7002"], "127.0.0.1:5432");
        let p = plan_of(&[a], &[b]);
        assert_eq!(p.fates, vec![Fate::Changed(0)]);
        assert_eq!(p.bind, vec![(0, addr("127.0.0.1:7002"))]);
        assert_eq!(p.close, vec![addr("127.0.0.1:7000")]);
    }

    #[test]
    fn added_and_removed_listeners() {
        let a = listener("a", &["127.0.0.1:7000"], "127.0.0.1:5432");
        let b = listener("b", &["127.0.0.1:7001"], "127.0.0.1:5432");
        let c = listener("c", &["127.0.0.1:7002"], "127.0.0.1:5432");
        let p = plan_of(&[a.clone(), b], &[c, a]);
        assert_eq!(p.fates, vec![Fate::New, Fate::Same(0)]);
        assert_eq!(p.removed, vec![1]);
        assert_eq!(p.bind, vec![(0, addr("127.0.0.1:7002"))]);
        assert_eq!(p.close, vec![addr("127.0.0.1:7001")]);
    }

    #[test]
    fn an_address_passed_to_another_listener_keeps_its_socket() {
        // Renaming a listener: the address never stops accepting.
        let a = listener("old", &["127.0.0.1:7000"], "127.0.0.1:5432");
        let b = listener("new", &["127.0.0.1:7000"], "127.0.0.1:5432");
        let p = plan_of(&[a], &[b]);
        assert_eq!(p.fates, vec![Fate::New]);
        assert_eq!(p.removed, vec![0]);
        assert_eq!(p.keep.len(), 1);
        assert!(p.bind.is_empty() && p.close.is_empty());
    }

    #[test]
    fn a_port_zero_socket_is_kept_under_the_port_it_got() {
        let a = listener("a", &["127.0.0.1:0"], "127.0.0.1:5432");
        let b = listener("a", &["127.0.0.1:40000"], "127.0.0.1:5432");
        let sockets = [(addr("127.0.0.1:0"), addr("127.0.0.1:40000"))];
        let p = plan(&[(&a, &sockets)], &[b]);
        assert_eq!(
            p.keep,
            vec![(0, addr("127.0.0.1:40000"), addr("127.0.0.1:40000"))]
        );
        assert!(p.bind.is_empty() && p.close.is_empty());
    }

    #[test]
    fn process_settings_need_a_restart() {
        let old = Config::single(addr("127.0.0.1:1"), vec![], Mode::Splice);
        let mut new = old.clone();
        assert!(restart_settings(&old, &new).is_empty());
        new.workers += 1;
        new.drain_timeout = None;
        new.ops.admin = Some(addr("127.0.0.1:9187"));
        assert_eq!(
            restart_settings(&old, &new),
            vec!["workers", "drain-timeout", "admin"]
        );
    }

    #[test]
    fn asked_addresses_pair_with_bound_ones_in_order() {
        let l = listener("a", &["127.0.0.1:0", "[::1]:0"], "127.0.0.1:5432");
        let bound = [(0, addr("127.0.0.1:40000")), (0, addr("[::1]:40001"))];
        assert_eq!(
            pair_asked(&l, bound.iter()),
            vec![
                (addr("127.0.0.1:0"), addr("127.0.0.1:40000")),
                (addr("[::1]:0"), addr("[::1]:40001"))
            ]
        );
    }
}
