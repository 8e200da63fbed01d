//! Reloading a running proxy in-process (`Reloader::reload`): live relays
//! carry on byte for byte, kept addresses never refuse a client, a failed
//! reload changes nothing, removed listeners drain, and new settings apply
//! to new connections only.

mod common;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::*;
use spliced::{Config, ListenerConfig, Mode};

const T: Duration = Duration::from_secs(10);

fn listener(name: &str, upstream: SocketAddr) -> ListenerConfig {
    let mut l = ListenerConfig::new("127.0.0.1:0".parse().unwrap(), vec![upstream], Mode::Auto);
    l.name = name.into();
    l
}

fn config(listeners: Vec<ListenerConfig>) -> Config {
    let mut c = Config::single("127.0.0.1:0".parse().unwrap(), vec![], Mode::Auto);
    c.workers = 2;
    c.listeners = listeners;
    c
}

/// The address listener `name` is bound to now.
fn addr_of(reloader: &spliced::Reloader, name: &str) -> SocketAddr {
    reloader
        .local_addrs()
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("listener {name} has no address"))
        .1
}

#[test]
fn a_relay_lives_through_three_reloads_with_every_byte_intact() {
    let a = echo_server();
    let b = echo_server();
    let h = spliced::start(config(vec![listener("db", a.addr)])).unwrap();
    let reloader = h.reloader();
    let addr = h.local_addr();
    let mut client = connect(addr);
    let data = pattern(7, 3 * MIB);
    let chunks: Vec<&[u8]> = data.chunks(data.len() / 4).collect();
    round_trip(&mut client, chunks[0], T);

    // 1: the pool moves to b; 2: a second listener; 3: limits and timeouts.
    let mut next = config(vec![listener("db", b.addr)]);
    let r = reloader.reload(next.clone()).expect("reload 1");
    assert_eq!(r.changed, vec!["db".to_string()]);
    round_trip(&mut client, chunks[1], T);
    next.listeners.push(listener("other", b.addr));
    let r = reloader.reload(next.clone()).expect("reload 2");
    assert_eq!(r.added, vec!["other".to_string()]);
    round_trip(&mut client, chunks[2], T);
    next.listeners[0].max_conns = Some(50);
    next.listeners[0].timeouts.idle = Some(Duration::from_secs(30));
    reloader.reload(next).expect("reload 3");
    round_trip(&mut client, chunks[3], T);

    assert_eq!(
        addr_of(&reloader, "db"),
        addr,
        "the kept address kept its socket"
    );
    client.shutdown(Shutdown::Write).unwrap();
    let (rest, ending) = read_until_closed(&mut client, T);
    assert!(rest.is_empty() && ending == Ending::Eof, "{ending:?}");
    assert_eq!(a.accepted(), 1, "the old relay stayed on its upstream");
    assert_eq!(b.accepted(), 0, "no relay moved");
    let stats = h.listener_stats();
    assert_eq!(stats[0].1.relays_accepted, 1, "counters survive a reload");
}

#[test]
fn a_changed_pool_applies_to_new_connections_only() {
    let a = echo_server();
    let b = echo_server();
    let h = spliced::start(config(vec![listener("db", a.addr)])).unwrap();
    let mut old = connect(h.local_addr());
    round_trip(&mut old, b"before", T);
    h.reloader()
        .reload(config(vec![listener("db", b.addr)]))
        .unwrap();
    let mut new = connect(h.local_addr());
    round_trip(&mut new, b"after", T);
    round_trip(&mut old, b"still on a", T);
    assert_eq!((a.accepted(), b.accepted()), (1, 1));
}

#[test]
fn a_failed_reload_keeps_the_old_config_serving() {
    let up = echo_server();
    let h = spliced::start(config(vec![listener("db", up.addr)])).unwrap();
    let reloader = h.reloader();
    let mut live = connect(h.local_addr());
    round_trip(&mut live, b"one", T);

    // Invalid: no server.
    let mut bad = config(vec![listener("db", up.addr)]);
    bad.listeners[0].pool.servers.clear();
    let e = reloader.reload(bad).unwrap_err().to_string();
    assert!(e.contains("no upstream"), "{e}");
    // Valid, but a new address is taken by someone else: nothing changes,
    // not even the listener that could have been added.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut clash = config(vec![listener("db", up.addr), listener("new", up.addr)]);
    clash.listeners[1].listen = vec![taken.local_addr().unwrap()];
    let e = reloader.reload(clash).unwrap_err().to_string();
    assert!(e.contains("cannot listen on"), "{e}");
    // A loop back into the proxy.
    let mut looped = config(vec![listener("db", up.addr)]);
    looped.listeners[0].set_upstreams(&[h.local_addr()]);
    looped.listeners[0].listen = vec![h.local_addr()];
    let e = reloader.reload(looped).unwrap_err().to_string();
    assert!(e.contains("loop"), "{e}");

    assert_eq!(reloader.local_addrs().len(), 1);
    round_trip(&mut live, b"two", T);
    let mut fresh = connect(h.local_addr());
    round_trip(&mut fresh, b"three", T);
    assert_eq!(up.accepted(), 2);
}

#[test]
fn a_removed_listener_stops_accepting_and_its_relays_finish() {
    let up = echo_server();
    let mut c = config(vec![listener("keep", up.addr), listener("gone", up.addr)]);
    c.drain_timeout = None;
    let h = spliced::start(c.clone()).unwrap();
    let reloader = h.reloader();
    let gone = addr_of(&reloader, "gone");
    let mut live = connect(gone);
    round_trip(&mut live, b"before", T);

    c.listeners.pop();
    c.listeners[0].listen = vec![addr_of(&reloader, "keep")];
    let r = reloader.reload(c).unwrap();
    assert_eq!(r.removed, vec!["gone".to_string()]);
    assert_eq!(r.closed, vec![gone]);
    wait_until(T, "the removed address refuses connections", || {
        TcpStream::connect(gone).is_err()
    });
    round_trip(&mut live, b"after", T);
    live.shutdown(Shutdown::Write).unwrap();
    let (rest, ending) = read_until_closed(&mut live, T);
    assert!(rest.is_empty() && ending == Ending::Eof);
    assert_eq!(
        h.stats().relays_accepted,
        1,
        "a retired listener still counts"
    );
}

#[test]
fn a_removed_listeners_relays_close_at_the_drain_timeout() {
    let up = echo_server();
    let mut c = config(vec![listener("keep", up.addr), listener("gone", up.addr)]);
    c.drain_timeout = Some(Duration::from_millis(200));
    let h = spliced::start(c.clone()).unwrap();
    let reloader = h.reloader();
    let mut doomed = connect(addr_of(&reloader, "gone"));
    round_trip(&mut doomed, b"x", T);
    let mut kept = connect(addr_of(&reloader, "keep"));
    round_trip(&mut kept, b"y", T);

    c.listeners.pop();
    c.listeners[0].listen = vec![addr_of(&reloader, "keep")];
    reloader.reload(c).unwrap();
    expect_closed(&mut doomed, T);
    round_trip(&mut kept, b"the kept listener's relay is not touched", T);
}

#[test]
fn no_client_is_refused_while_reloading() {
    let a = echo_server();
    let b = echo_server();
    let h = spliced::start(config(vec![listener("db", a.addr)])).unwrap();
    let reloader = h.reloader();
    let addr = h.local_addr();
    let done = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let clients = {
        let done = Arc::clone(&done);
        let served = Arc::clone(&served);
        thread::spawn(move || {
            let mut n = 0;
            // Bounded: 2000 connections at most, or until the reloads end.
            while !done.load(Ordering::Relaxed) && n < 2000 {
                let mut s = TcpStream::connect_timeout(&addr, T)
                    .unwrap_or_else(|e| panic!("connection {n} refused during reloads: {e}"));
                s.set_read_timeout(Some(T)).unwrap();
                s.write_all(b"ping").unwrap();
                let back = read_exact_within(&mut s, 4, T)
                    .unwrap_or_else(|e| panic!("connection {n}: {e}"));
                assert_eq!(back, b"ping");
                n += 1;
                served.store(n, Ordering::Relaxed);
            }
            n
        })
    };
    for i in 0..20 {
        // Each reload lands between connections of the client thread.
        let before = served.load(Ordering::Relaxed);
        wait_until(T, "the client makes progress", || {
            served.load(Ordering::Relaxed) > before || clients.is_finished()
        });
        let up = if i % 2 == 0 { b.addr } else { a.addr };
        let mut next = config(vec![listener("db", up)]);
        next.listeners[0].max_conns = Some(100 + i);
        reloader.reload(next).unwrap();
    }
    done.store(true, Ordering::Relaxed);
    let served = clients.join().expect("no client failed");
    assert!(served >= 20, "{served} connections");
}

#[test]
fn a_changed_admin_address_needs_a_restart_and_says_so() {
    let up = echo_server();
    let h = spliced::start(config(vec![listener("db", up.addr)])).unwrap();
    let reloader = h.reloader();
    let mut next = config(vec![listener("db", up.addr)]);
    next.ops.admin = Some("127.0.0.1:0".parse().unwrap());
    let r = reloader.reload(next.clone()).unwrap();
    assert_eq!(r.need_restart, vec!["admin"]);
    // The running value stays, so the next reload says it again.
    let r = reloader.reload(next).unwrap();
    assert_eq!(r.need_restart, vec!["admin"]);
    let r = reloader
        .reload(config(vec![listener("db", up.addr)]))
        .unwrap();
    assert!(r.need_restart.is_empty(), "{:?}", r.need_restart);
    round_trip(&mut connect(h.local_addr()), b"still serving", T);
}
