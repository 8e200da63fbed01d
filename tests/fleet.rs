//! The fleet features in a running proxy, over loopback against scripted
//! servers: active checks in the workers (every kind; redis with a role),
//! `on-down` drain and kill when a primary is demoted, PROXY headers in
//! (v1, v2, malformed, untrusted) and out (`fleet/proxy_header.rs`), and
//! PostgreSQL cancel requests sent to every server of a pool. Real servers
//! are in tests/e2e/failover.rs.

#[macro_use]
mod common;

#[path = "fleet/proxy_header.rs"]
mod proxy_header;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use spliced::config::{Check, OnDown, Protocol, Role};
use spliced::{Config, Mode, ProxyHandle};

const T: Duration = Duration::from_secs(5);
/// The check period of these tests; a change must show within
/// `INTERVAL × fall` plus a second.
const INTERVAL: Duration = Duration::from_millis(100);

fn checked(mode: Mode, upstreams: Vec<SocketAddr>, tweak: impl FnOnce(&mut Config)) -> ProxyHandle {
    proxy(mode, upstreams, |c| {
        let h = &mut c.listeners[0].pool.health;
        h.interval = INTERVAL;
        h.timeout = INTERVAL;
        h.fall = 2;
        h.rise = 1;
        c.listeners[0].pool.retries = Some(0);
        tweak(c)
    })
}

/// Connects through the proxy and asks the server for its tag.
fn tag_via(proxy: SocketAddr) -> (TcpStream, u8) {
    let mut s = TcpStream::connect(proxy).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"tag?").unwrap();
    let mut reply = [0u8; 5];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[1..], b"tag?", "the server echoes after its tag");
    (s, reply[0])
}

/// The server every new connection reaches, once it is always `want`.
fn wait_for_tag(proxy: SocketAddr, want: u8, within: Duration) -> Duration {
    let start = Instant::now();
    wait_until(
        within,
        &format!("new connections reach server {want}"),
        || {
            (0..4).all(|_| {
                std::net::TcpStream::connect(proxy)
                    .ok()
                    .and_then(|mut s| {
                        s.set_read_timeout(Some(T)).ok()?;
                        s.write_all(b"tag?").ok()?;
                        let mut r = [0u8; 5];
                        s.read_exact(&mut r).ok()?;
                        Some(r[0] == want)
                    })
                    .unwrap_or(false)
            })
        },
    );
    start.elapsed()
}

fn redis_pair(mode: Mode, on_down: OnDown) -> (FakeRedis, FakeRedis, ProxyHandle) {
    let a = fake_redis(b'a', true);
    let b = fake_redis(b'b', false);
    let h = checked(mode, vec![a.server.addr, b.server.addr], |c| {
        let pool = &mut c.listeners[0].pool;
        pool.health.check = Some(Check::Redis);
        pool.health.role = Role::Primary;
        pool.on_down = on_down;
    });
    // The replica is found out by the first probes.
    wait_for_tag(h.local_addr(), b'a', T);
    (a, b, h)
}

/// Demotes a and promotes b as a failover would.
fn switch(a: &FakeRedis, b: &FakeRedis) {
    a.master.store(false, Ordering::SeqCst);
    b.master.store(true, Ordering::SeqCst);
}

// Active checks

/// A primary pool whose every server answers as a replica takes no relay:
/// each client is closed as `no-server`, and no server is tried (no
/// connect is counted against either).
#[test]
fn a_pool_with_no_server_in_its_role_closes_clients_as_no_server() {
    let a = fake_redis(b'a', false);
    let b = fake_redis(b'b', false);
    let h = checked(Mode::Splice, vec![a.server.addr, b.server.addr], |c| {
        let pool = &mut c.listeners[0].pool;
        pool.health.check = Some(Check::Redis);
        pool.health.role = Role::Primary;
    });
    wait_until(T, "both replicas probed", || h.stats().health_probes >= 2);
    for _ in 0..5 {
        // A relay sent to a replica would stay open: this would time out.
        let mut c = TcpStream::connect(h.local_addr()).unwrap();
        expect_closed(&mut c, T);
    }
    let s = wait_stats(&h, T, "five no-server closes", |s| {
        s.closed(spliced::CloseReason::NoServer) == 5
    });
    assert_eq!(s.closed(spliced::CloseReason::ConnectFailed), 0);
    assert_eq!(s.upstream_connect_failures, 0);
}

/// A replica pool with `max-lag`: the replica whose offset stays behind the
/// master's (the master is probed as a member of the same pool, where its
/// role keeps it out) takes no new relays; once its offset is back within
/// 3/4 of the limit it takes them again. Its relay from before runs on.
#[test]
fn a_replica_behind_the_master_takes_no_new_relays_until_it_caught_up() {
    for mode in [Mode::Splice, Mode::Copy, Mode::Auto] {
        let master = fake_redis(b'm', true);
        let (one, two) = (fake_redis(b'1', false), fake_redis(b'2', false));
        let servers = vec![master.server.addr, one.server.addr, two.server.addr];
        let h = checked(mode, servers, |c| {
            let pool = &mut c.listeners[0].pool;
            pool.health.check = Some(Check::Redis);
            pool.health.role = Role::Replica;
            pool.health.max_lag = Some(1000);
        });
        let proxy = h.local_addr();
        // Both replicas serve: reach replica 1 and keep that relay.
        let mut kept = wait_for(T, "server 1 answers", || {
            try_tag(proxy).filter(|(_, tag)| *tag == b'1')
        })
        .0;
        master.offset.store(5000, Ordering::SeqCst);
        two.offset.store(5000, Ordering::SeqCst);
        wait_for_tag(proxy, b'2', T);
        for _ in 0..8 {
            assert_eq!(
                tag_via(proxy).1,
                b'2',
                "{mode:?}: the lagging replica took a relay"
            );
        }
        kept.write_all(b"ping").unwrap();
        let mut echo = [0u8; 4];
        kept.read_exact(&mut echo).unwrap();
        assert_eq!(&echo, b"ping", "{mode:?}: its live relay runs on");
        // 4100 of 5000: 900 behind, under the limit but over 3/4 of it.
        one.offset.store(4100, Ordering::SeqCst);
        let settled = Instant::now() + INTERVAL * 4;
        while Instant::now() < settled {
            assert_eq!(
                tag_via(proxy).1,
                b'2',
                "{mode:?}: back before 3/4 of the limit"
            );
        }
        one.offset.store(4300, Ordering::SeqCst);
        wait_for(T, "server 1 answers", || {
            try_tag(proxy).filter(|(_, tag)| *tag == b'1')
        });
    }
}

/// [`tag_via`], or `None` when the proxy closed the client (no server).
fn try_tag(proxy: SocketAddr) -> Option<(TcpStream, u8)> {
    let mut s = TcpStream::connect(proxy).ok()?;
    s.set_read_timeout(Some(T)).ok()?;
    s.write_all(b"tag?").ok()?;
    let mut reply = [0u8; 5];
    s.read_exact(&mut reply).ok()?;
    Some((s, reply[0]))
}

#[test]
fn tcp_check_takes_a_server_that_refuses_out_of_the_pool() {
    let live = serve(|mut s: TcpStream| {
        let mut b = [0u8; 4];
        if s.read_exact(&mut b).is_ok() {
            let _ = s.write_all(b"Ltag?");
        }
    });
    let h = checked(Mode::Splice, vec![refused_addr(), live.addr], |c| {
        c.listeners[0].pool.health.check = Some(Check::Tcp);
    });
    wait_for_tag(h.local_addr(), b'L', T);
    let s = h.stats();
    assert!(s.health_probes >= 2, "{s:?}");
    assert!(s.health_probe_failures >= 1, "{s:?}");
}

#[test]
fn http_check_excludes_a_server_whose_agent_answers_503_on_a_role_path() {
    let agent = |status: &'static str| {
        serve(move |mut s: TcpStream| {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf);
            let _ = s.write_all(
                format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            );
        })
    };
    // Each server is its own agent (`port` unset): the probe GETs the
    // server's own port.
    let (ok, bad) = (agent("200 OK"), agent("503 Service Unavailable"));
    let h = checked(Mode::Splice, vec![bad.addr, ok.addr], |c| {
        let hc = &mut c.listeners[0].pool.health;
        hc.check = Some(Check::Http);
        hc.path = Some("/primary".into());
    });
    let p = h.local_addr();
    // A 503 on a role path is an answer ("not primary"), not a failure:
    // it excludes the server at its first probe.
    wait_until(T, "both servers probed", || h.stats().health_probes >= 2);
    assert_eq!(h.stats().health_probe_failures, 0);
    // Every new connection now reaches the 200 server, which answers a
    // request with its status line.
    for _ in 0..4 {
        let mut s = TcpStream::connect(p).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        let reply = read_to_eof(&mut s, T).unwrap();
        assert!(
            reply.starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&reply)
        );
    }
}

// on-down

fn on_down_kill_resets_clients_of_a_demoted_primary(mode: Mode) {
    let (a, b, h) = redis_pair(mode, OnDown::Kill);
    let (mut old, tag) = tag_via(h.local_addr());
    assert_eq!(tag, b'a');
    switch(&a, &b);
    let (ending, took) = expect_closed(&mut old, T);
    assert_eq!(ending, Ending::Reset, "the old client is reset");
    let bound = INTERVAL * 2 + Duration::from_secs(1);
    assert!(took < bound, "reset after {took:?}, want < {bound:?}");
    let moved = wait_for_tag(h.local_addr(), b'b', bound);
    assert!(moved < bound, "{moved:?}");
    wait_until(T, "the kill is counted", || {
        h.stats().closed(spliced::CloseReason::ServerDown) >= 1
    });
}

fn on_down_drain_lets_clients_of_a_demoted_primary_finish(mode: Mode) {
    let (a, b, h) = redis_pair(mode, OnDown::Drain);
    let (mut old, _) = tag_via(h.local_addr());
    switch(&a, &b);
    wait_for_tag(h.local_addr(), b'b', INTERVAL * 2 + Duration::from_secs(1));
    // The old relay still carries bytes both ways.
    round_trip(&mut old, b"still here", T);
    assert_eq!(h.stats().closed(spliced::CloseReason::ServerDown), 0);
}

// PostgreSQL cancel requests

/// A server that reports the first 16 bytes of every connection.
fn first_bytes() -> (Server, mpsc::Receiver<Vec<u8>>) {
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    let server = serve(move |mut s: TcpStream| {
        s.set_read_timeout(Some(T)).unwrap();
        let mut got = vec![0u8; 16];
        if s.read_exact(&mut got).is_ok() {
            let _ = tx.lock().unwrap().send(got);
        }
        let _ = s.write_all(b"N");
    });
    (server, rx)
}

fn cancel_packet(pid: u32, key: u32) -> Vec<u8> {
    let mut b = 16u32.to_be_bytes().to_vec();
    b.extend_from_slice(&80_877_102u32.to_be_bytes());
    b.extend_from_slice(&pid.to_be_bytes());
    b.extend_from_slice(&key.to_be_bytes());
    b
}

fn postgres_listener(mode: Mode, servers: Vec<SocketAddr>) -> ProxyHandle {
    proxy(mode, servers, |c| {
        c.listeners[0].protocol = Protocol::Postgres;
    })
}

#[test]
fn a_cancel_request_reaches_every_server_of_the_pool() {
    let (a, rx_a) = first_bytes();
    let (b, rx_b) = first_bytes();
    let h = postgres_listener(Mode::Splice, vec![a.addr, b.addr]);
    let packet = cancel_packet(4242, 0xdead_beef);
    // Split in two writes: the request is recognised whatever the split.
    let mut c = TcpStream::connect(h.local_addr()).unwrap();
    c.write_all(&packet[..5]).unwrap();
    c.flush().unwrap();
    std::thread::yield_now();
    c.write_all(&packet[5..]).unwrap();
    assert_eq!(rx_a.recv_timeout(T).unwrap(), packet);
    assert_eq!(rx_b.recv_timeout(T).unwrap(), packet);
    let (ending, _) = expect_closed(&mut c, T);
    assert_eq!(
        ending,
        Ending::Eof,
        "the client is closed, as PostgreSQL does"
    );
    assert_eq!(h.stats().pg_cancel_requests, 1);
}

fn other_first_packets_reach_one_server_intact(mode: Mode) {
    let (a, rx_a) = first_bytes();
    let (b, rx_b) = first_bytes();
    let h = postgres_listener(mode, vec![a.addr, b.addr]);
    // An SSLRequest followed by the start of a StartupMessage.
    let mut msg = 8u32.to_be_bytes().to_vec();
    msg.extend_from_slice(&80_877_103u32.to_be_bytes());
    msg.extend_from_slice(b"\x00\x00\x00\x08\x00\x03\x00\x00");
    let mut c = TcpStream::connect(h.local_addr()).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    c.write_all(&msg).unwrap();
    let mut reply = [0u8; 1];
    c.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"N");
    let got = rx_a
        .recv_timeout(Duration::from_millis(200))
        .or_else(|_| rx_b.recv_timeout(T))
        .unwrap();
    assert_eq!(got, msg);
    assert!(
        rx_a.try_recv().is_err() && rx_b.try_recv().is_err(),
        "one server only"
    );
    assert_eq!(h.stats().pg_cancel_requests, 0);
    let _ = c
        .read(&mut reply)
        .map_err(|e| assert_ne!(e.kind(), ErrorKind::WouldBlock));
}

fn a_short_first_packet_is_relayed_when_its_timeout_ends(mode: Mode) {
    let up = echo_server();
    let timeout = Duration::from_millis(300);
    let h = proxy(mode, vec![up.addr], |c| {
        c.listeners[0].protocol = Protocol::Postgres;
        c.listeners[0].first_packet_timeout = timeout;
    });
    let mut c = TcpStream::connect(h.local_addr()).unwrap();
    let start = Instant::now();
    // Half a packet header: too short to tell a CancelRequest.
    c.write_all(&[0, 0, 0]).unwrap();
    c.set_read_timeout(Some(T)).unwrap();
    let mut back = [0u8; 3];
    c.read_exact(&mut back).unwrap();
    let after = start.elapsed();
    assert_eq!(back, [0, 0, 0]);
    assert!(
        after >= timeout && after < spliced::config::DEFAULT_FIRST_PACKET_TIMEOUT,
        "relayed after {after:?}, the timeout is {timeout:?}"
    );
    round_trip(&mut c, b"rest of the session", T);
}

/// A server that greets every connection with `greeting` (a server-first
/// protocol), then keeps it open until the peer closes.
fn greeter(greeting: &'static [u8]) -> Server {
    serve(move |mut s: TcpStream| {
        if s.write_all(greeting).is_ok() {
            sink(s);
        }
    })
}

/// The first `n` bytes a new connection through the proxy receives.
fn greeting_via(proxy: SocketAddr, n: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(proxy).unwrap();
    read_exact_within(&mut s, n, T).unwrap()
}

#[test]
fn mysql_check_downs_a_server_that_greets_with_an_error_packet() {
    let good = greeter(b"\x0a\x00\x00\x00\x0a5.7.0\x00\x01\x00\x00\x00");
    let bad = greeter(b"\x14\x00\x00\x00\xff\x69\x04Host is blocked....");
    let h = checked(Mode::Splice, vec![bad.addr, good.addr], |c| {
        c.listeners[0].pool.health.check = Some(Check::Mysql);
    });
    wait_until(T, "the error-greeting server is down", || {
        h.stats().health_probe_failures >= 1
    });
    for _ in 0..4 {
        assert_eq!(
            greeting_via(h.local_addr(), 5)[4],
            0x0a,
            "a handshake, not an error"
        );
    }
}

#[test]
fn postgres_check_downs_a_server_that_answers_startup_with_an_error() {
    // Without a role the first authentication request means alive.
    let good = serve(|mut s: TcpStream| {
        let mut len = [0u8; 4];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let mut rest = vec![0u8; u32::from_be_bytes(len) as usize - 4];
        if s.read_exact(&mut rest).is_ok() {
            let _ = s.write_all(b"R\x00\x00\x00\x08\x00\x00\x00\x00");
            sink(s);
        }
    });
    let bad = serve(|mut s: TcpStream| {
        let mut buf = [0u8; 512];
        let _ = s.read(&mut buf);
        let _ = s.write_all(b"E\x00\x00\x00\x1dSFATAL\x00C57P03\x00Mstarting\x00\x00");
    });
    let h = checked(Mode::Splice, vec![bad.addr, good.addr], |c| {
        c.listeners[0].pool.health.check = Some(Check::Postgres);
    });
    wait_until(T, "the erroring server is down", || {
        h.stats().health_probe_failures >= 1
    });
    for _ in 0..4 {
        let mut s = TcpStream::connect(h.local_addr()).unwrap();
        s.write_all(b"\x00\x00\x00\x08\x00\x03\x00\x00").unwrap();
        assert_eq!(read_exact_within(&mut s, 1, T).unwrap(), b"R");
    }
}

// Every case that relays bytes, under every engine.
both_engines!(
    on_down_kill_resets_clients_of_a_demoted_primary,
    on_down_drain_lets_clients_of_a_demoted_primary_finish,
    other_first_packets_reach_one_server_intact,
    a_short_first_packet_is_relayed_when_its_timeout_ends,
);
