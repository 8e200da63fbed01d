//! A listener's limits and access list over loopback: at max-conns clients
//! wait in the backlog, past max-conns-per-source and outside allow/deny
//! they are reset before any upstream connect, and every refusal is
//! counted.

#[macro_use]
mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use common::*;
use socket2::{Domain, Socket, Type};
use spliced::Mode;

const T: Duration = Duration::from_secs(5);

fn try_connect_from(proxy: SocketAddr, ip: [u8; 4]) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(IpAddr::from(ip), 0).into())
        .unwrap();
    s.connect_timeout(&proxy.into(), T)?;
    let c: TcpStream = s.into();
    c.set_read_timeout(Some(T)).unwrap();
    Ok(c)
}

fn connect_from(proxy: SocketAddr, ip: [u8; 4]) -> TcpStream {
    try_connect_from(proxy, ip).unwrap_or_else(|e| panic!("connect from {ip:?}: {e}"))
}

/// Whether the proxy reset (or closed) a client from `ip` without
/// relaying. The reset may come so soon that the connect reports it.
fn refused(proxy: SocketAddr, ip: [u8; 4]) -> bool {
    let mut c = match try_connect_from(proxy, ip) {
        Ok(c) => c,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => return true,
        Err(e) => panic!("connect from {ip:?}: {e}"),
    };
    let _ = c.write_all(b"hello");
    let mut buf = [0u8; 5];
    match c.read(&mut buf) {
        Ok(0) => true,
        Err(e) if e.kind() == ErrorKind::ConnectionReset => true,
        Ok(_) => false,
        Err(e) => panic!("neither echo nor close: {e}"),
    }
}

#[test]
fn at_max_conns_clients_wait_in_the_backlog() {
    let echo = echo_server();
    let h = proxy(Mode::Splice, vec![echo.addr], |c| {
        c.listeners[0].max_conns = Some(2)
    });
    let mut held: Vec<TcpStream> = (0..2).map(|_| connect(h.local_addr())).collect();
    for c in &mut held {
        round_trip(c, b"in", T);
    }
    // The third connects (the kernel queues it) but is not served...
    let mut waiting = connect(h.local_addr());
    waiting.write_all(b"queued").unwrap();
    waiting
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 6];
    let early = waiting.read(&mut buf);
    assert!(
        matches!(&early, Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::TimedOut),
        "served past max-conns: {early:?}"
    );
    let s = h.stats();
    assert_eq!(s.relays_accepted, 2);
    assert!(s.listener_limit_pauses >= 1, "{s:?}");
    // ...until a relay ends; then it is, bytes and all.
    drop(held.pop());
    waiting.set_read_timeout(Some(T)).unwrap();
    waiting.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"queued");
    assert_eq!(echo.accepted(), 3);
}

#[test]
fn past_max_conns_per_source_new_clients_are_reset_and_counted() {
    let echo = echo_server();
    let h = proxy(Mode::Splice, vec![echo.addr], |c| {
        c.listeners[0].max_conns_per_source = Some(2)
    });
    let mut a: Vec<TcpStream> = (0..2)
        .map(|_| connect_from(h.local_addr(), [127, 0, 2, 1]))
        .collect();
    for c in &mut a {
        round_trip(c, b"ok", T);
    }
    assert!(
        refused(h.local_addr(), [127, 0, 2, 1]),
        "a third relay from one address"
    );
    // Another address is not affected.
    let mut other = connect_from(h.local_addr(), [127, 0, 2, 2]);
    round_trip(&mut other, b"ok", T);
    let s = wait_stats(&h, T, "the refusal is counted", |s| {
        s.refused_max_conns_per_source == 1
    });
    assert_eq!(s.relays_accepted, 3, "a refused client is no relay");
    assert_eq!(
        echo.accepted(),
        3,
        "no upstream connect for the refused client"
    );
    // Room again once one of its relays ends.
    drop(a.pop());
    wait_stats(&h, T, "the relay closed", |s| s.relays_active == 2);
    let mut again = connect_from(h.local_addr(), [127, 0, 2, 1]);
    round_trip(&mut again, b"ok", T);
}

#[test]
fn allow_and_deny_are_checked_before_any_upstream_connect() {
    let echo = echo_server();
    let h = proxy(Mode::Copy, vec![echo.addr], |c| {
        let l = &mut c.listeners[0];
        l.access.allow = vec!["127.0.3.0/24".parse().unwrap()];
        l.access.deny = vec!["127.0.3.9/32".parse().unwrap()];
    });
    assert!(refused(h.local_addr(), [127, 0, 0, 1]), "not in allow");
    assert!(refused(h.local_addr(), [127, 0, 3, 9]), "in deny");
    let mut inside = connect_from(h.local_addr(), [127, 0, 3, 1]);
    round_trip(&mut inside, b"welcome", T);
    let s = wait_stats(&h, T, "both refusals counted", |s| s.refused_denied == 2);
    assert_eq!(s.relays_accepted, 1);
    assert_eq!(
        echo.accepted(),
        1,
        "refused clients never reach an upstream"
    );
    assert_eq!(s.upstream_connect_failures, 0);
}
