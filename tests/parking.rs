//! Held clients (`queue-timeout`) over loopback: a primary pool whose
//! servers are all replicas (fake Redis servers whose role the test sets)
//! holds its new clients; they connect the moment a server is promoted,
//! their first bytes intact; they are refused at their timeout, past
//! `max-queued` and at a drain; one that gives up is dropped at once.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;
use spliced::config::{Check, PoolConfig, Role, ServerConfig};
use spliced::{CloseReason, Config, Mode, ProxyHandle};

const T: Duration = Duration::from_secs(5);
/// The check period: a promotion is seen within one.
const INTERVAL: Duration = Duration::from_millis(100);

/// A proxy whose one listener wants a primary among `servers` (Redis
/// checks every [`INTERVAL`]) and holds clients up to `queue_timeout`.
fn holding(
    mode: Mode,
    servers: &[&FakeRedis],
    queue_timeout: Option<Duration>,
    tweak: impl FnOnce(&mut Config),
) -> ProxyHandle {
    let addrs = servers.iter().map(|s| s.server.addr).collect();
    proxy(mode, addrs, |c| {
        wants_a_primary(&mut c.listeners[0].pool, queue_timeout);
        tweak(c)
    })
}

/// `pool` wants a primary (Redis checks every [`INTERVAL`], one answer
/// decides), never retries and holds clients up to `queue_timeout`.
fn wants_a_primary(pool: &mut PoolConfig, queue_timeout: Option<Duration>) {
    let h = &mut pool.health;
    h.check = Some(Check::Redis);
    h.role = Role::Primary;
    h.interval = INTERVAL;
    h.timeout = INTERVAL;
    h.fall = 1;
    h.rise = 1;
    pool.retries = Some(0);
    pool.queue_timeout = queue_timeout;
}

/// Connects and sends `hello`; the client waits for its tag and echo.
fn send_hello(proxy: SocketAddr, hello: &[u8]) -> TcpStream {
    let mut c = TcpStream::connect(proxy).unwrap();
    c.write_all(hello).unwrap();
    c
}

/// Reads the server's tag and the echo of `hello`, byte for byte.
fn expect_echo(c: &mut TcpStream, tag: u8, hello: &[u8]) {
    let got = read_exact_within(c, 1 + hello.len(), T)
        .unwrap_or_else(|e| panic!("no tag and echo through the proxy: {e}"));
    assert_eq!(got[0], tag, "reached the wrong server");
    assert_eq!(&got[1..], hello, "the first bytes changed on the way");
}

fn wait_held(h: &ProxyHandle, n: u64) -> spliced::Stats {
    wait_stats(h, T, &format!("{n} clients held"), |s| s.clients_held == n)
}

fn probed(h: &ProxyHandle) {
    wait_until(T, "the servers probed", || h.stats().health_probes >= 2);
}

/// Held clients connect when a replica is promoted, their first bytes
/// intact, each once; nothing was refused.
fn held_clients_connect_when_a_server_becomes_eligible(mode: Mode) {
    let a = fake_redis(b'a', false);
    let b = fake_redis(b'b', false);
    let h = holding(mode, &[&a, &b], Some(Duration::from_secs(20)), |_| {});
    probed(&h);
    let hellos: Vec<Vec<u8>> = (0..4)
        .map(|i| format!("hello {i}\n").into_bytes())
        .collect();
    let mut clients: Vec<TcpStream> = hellos
        .iter()
        .map(|m| send_hello(h.local_addr(), m))
        .collect();
    wait_held(&h, 4);
    assert_eq!(
        a.server.accepted() + b.server.accepted(),
        h.stats().health_probes as usize,
        "a held client connected before any server was eligible"
    );
    b.master.store(true, Ordering::SeqCst);
    for (c, m) in clients.iter_mut().zip(&hellos) {
        expect_echo(c, b'b', m);
    }
    let s = wait_stats(&h, T, "no client held", |s| s.clients_held == 0);
    assert_eq!(s.clients_held_total, 4);
    assert_eq!(s.held_waits, 4);
    assert_eq!(s.closed(CloseReason::NoServer), 0);
    assert_eq!(s.held_timeouts, 0);
    drop(clients);
    assert_quiescent(&h, mode);
}

/// Held clients spread over several workers all connect promptly when a
/// server is promoted: the worker that probed it wakes the others.
/// Prints the time from the first probe that found the new primary to
/// each client's first bytes at it.
fn held_clients_of_every_worker_wake_at_once(mode: Mode) {
    let a = fake_redis(b'a', false);
    let h = holding(mode, &[&a], Some(Duration::from_secs(20)), |c| {
        c.workers = 2
    });
    wait_until(T, "the server probed", || h.stats().health_probes >= 1);
    let hellos: Vec<Vec<u8>> = (0..8).map(|i| format!("client {i}").into_bytes()).collect();
    let mut clients: Vec<TcpStream> = hellos
        .iter()
        .map(|m| send_hello(h.local_addr(), m))
        .collect();
    wait_held(&h, 8);
    a.master.store(true, Ordering::SeqCst);
    for (c, m) in clients.iter_mut().zip(&hellos) {
        expect_echo(c, b'a', m);
    }
    let seen = a
        .promoted_seen
        .lock()
        .unwrap()
        .expect("a probe saw the promotion");
    let firsts = a.first_bytes.lock().unwrap().clone();
    let lags: Vec<Duration> = firsts
        .iter()
        .map(|t| t.saturating_duration_since(seen))
        .collect();
    let first = lags.iter().min().unwrap();
    let last = lags.iter().max().unwrap();
    println!("{mode:?}: promotion answered -> first held client's bytes at the server: {first:?}; last of 8: {last:?}");
    // Without the wake-up a worker that runs no probe would sleep until
    // the queue-timeout (20 s).
    assert!(
        *last < Duration::from_secs(1),
        "a held client waited {last:?} after the promotion"
    );
    drop(clients);
    assert_quiescent(&h, mode);
}

/// A client still held at its queue-timeout is refused as no-server.
fn a_held_client_is_refused_at_its_queue_timeout(mode: Mode) {
    let a = fake_redis(b'a', false);
    let h = holding(mode, &[&a], Some(Duration::from_millis(300)), |_| {});
    probed(&h);
    let start = Instant::now();
    let mut c = send_hello(h.local_addr(), b"anyone?");
    let (_, _) = expect_closed(&mut c, T);
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "refused after {took:?}, before its timeout"
    );
    let s = wait_stats(&h, T, "one timeout", |s| s.held_timeouts == 1);
    assert_eq!(s.closed(CloseReason::NoServer), 1);
    assert_eq!(s.clients_held, 0);
    assert_eq!(s.held_waits, 1);
    assert!(s.held_wait_micros >= 300_000, "{}", s.held_wait_micros);
    assert_quiescent(&h, mode);
}

/// A held client that closes (before or after sending), or resets after
/// sending, is dropped at once, long before its queue-timeout.
fn a_held_client_that_gives_up_is_dropped_at_once(mode: Mode) {
    let a = fake_redis(b'a', false);
    let h = holding(mode, &[&a], Some(Duration::from_secs(30)), |_| {});
    probed(&h);
    let quiet = TcpStream::connect(h.local_addr()).unwrap();
    let said = send_hello(h.local_addr(), b"bye soon");
    let talker = send_hello(h.local_addr(), b"bye soon");
    wait_held(&h, 3);
    let start = Instant::now();
    drop(quiet);
    let s = wait_stats(&h, T, "the quiet client dropped", |s| s.clients_held == 2);
    assert_eq!(s.closed(CloseReason::Eof), 1);
    drop(said);
    let s = wait_stats(&h, T, "the client that sent, then closed, dropped", |s| {
        s.clients_held == 1
    });
    assert_eq!(s.closed(CloseReason::Eof), 2);
    set_linger_zero(&talker);
    drop(talker);
    let s = wait_stats(&h, T, "the reset client dropped", |s| s.clients_held == 0);
    assert_eq!(s.closed(CloseReason::ClientReset), 1);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(s.held_timeouts, 0);
    assert_quiescent(&h, mode);
}

/// Past `max-queued` held clients, a new one is refused at once; the
/// held ones stay held.
fn max_queued_refuses_past_the_bound(mode: Mode) {
    let a = fake_redis(b'a', false);
    let h = holding(mode, &[&a], Some(Duration::from_secs(30)), |c| {
        c.listeners[0].max_queued = Some(2)
    });
    probed(&h);
    let held: Vec<TcpStream> = (0..2).map(|_| send_hello(h.local_addr(), b"x")).collect();
    wait_held(&h, 2);
    let mut third = send_hello(h.local_addr(), b"x");
    let (_, took) = expect_closed(&mut third, T);
    assert!(took < Duration::from_secs(3), "{took:?}");
    let s = wait_stats(&h, T, "one refusal", |s| s.refused_max_queued == 1);
    assert_eq!(s.clients_held, 2, "the held ones stay");
    assert_eq!(s.closed(CloseReason::NoServer), 1);
    // A place freed by one that gives up is taken by the next.
    drop(held);
    wait_held(&h, 0);
    let _again = send_hello(h.local_addr(), b"x");
    wait_held(&h, 1);
    assert_eq!(h.stats().refused_max_queued, 1);
}

/// A drain refuses held clients at once and the proxy stops.
fn a_drain_refuses_held_clients_at_once(mode: Mode) {
    let a = fake_redis(b'a', false);
    let h = holding(mode, &[&a], Some(Duration::from_secs(30)), |c| {
        c.drain_timeout = Some(Duration::from_secs(30))
    });
    probed(&h);
    let mut clients: Vec<TcpStream> = (0..3).map(|_| send_hello(h.local_addr(), b"x")).collect();
    wait_held(&h, 3);
    let start = Instant::now();
    h.shutdown();
    for c in &mut clients {
        expect_closed(c, T);
    }
    wait_until(T, "the proxy stops", || h.is_finished());
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    let s = h.stats();
    assert_eq!(s.closed(CloseReason::Shutdown), 3);
    assert_eq!(s.clients_held, 0);
}

/// `queue-timeout` unset ("0"): a client no server takes is closed at
/// once, as no-server, and never held.
fn no_queue_timeout_refuses_at_once(mode: Mode) {
    let a = fake_redis(b'a', false);
    let h = holding(mode, &[&a], None, |_| {});
    probed(&h);
    let mut c = send_hello(h.local_addr(), b"x");
    let (_, took) = expect_closed(&mut c, T);
    assert!(took < Duration::from_secs(1), "{took:?}");
    let s = wait_stats(&h, T, "one no-server close", |s| {
        s.closed(CloseReason::NoServer) == 1
    });
    assert_eq!(s.clients_held_total, 0);
    assert_eq!(s.held_waits, 0);
    assert_quiescent(&h, mode);
}

/// A client whose every connect failed while its pool still took relays
/// (no active check: the server was not known down) is held, and
/// connects once the server listens again.
fn a_client_whose_connects_failed_is_held_until_the_server_returns(mode: Mode) {
    let addr = refused_addr();
    let h = proxy(mode, vec![addr], |c| {
        c.listeners[0].pool.queue_timeout = Some(Duration::from_secs(20));
        c.listeners[0].pool.health.interval = Duration::from_millis(200);
    });
    let mut c = send_hello(h.local_addr(), b"still there?");
    wait_held(&h, 1);
    assert!(h.stats().upstream_connect_failures >= 1);
    let listener = std::net::TcpListener::bind(addr).unwrap();
    let (mut up, _) = listener.accept().unwrap();
    up.set_read_timeout(Some(T)).unwrap();
    let mut got = [0u8; 12];
    up.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"still there?");
    up.write_all(b"yes").unwrap();
    assert_eq!(read_exact_within(&mut c, 3, T).unwrap(), b"yes");
    let s = wait_stats(&h, T, "no client held", |s| s.clients_held == 0);
    assert_eq!(s.closed(CloseReason::ConnectFailed), 0);
    drop((c, up));
    assert_quiescent(&h, mode);
}

both_engines!(
    held_clients_connect_when_a_server_becomes_eligible,
    held_clients_of_every_worker_wake_at_once,
    a_held_client_is_refused_at_its_queue_timeout,
    a_held_client_that_gives_up_is_dropped_at_once,
    max_queued_refuses_past_the_bound,
    a_drain_refuses_held_clients_at_once,
    no_queue_timeout_refuses_at_once,
    a_client_whose_connects_failed_is_held_until_the_server_returns,
);

/// A reload that gives the pool an eligible server connects the held
/// clients to it; a reload that removes the listener refuses them.
#[test]
fn a_reload_wakes_held_clients_and_a_removal_refuses_them() {
    let a = fake_redis(b'a', false);
    let b = fake_redis(b'b', true);
    let h = holding(Mode::Splice, &[&a], Some(Duration::from_secs(20)), |_| {});
    probed(&h);
    let mut c = send_hello(h.local_addr(), b"reload me");
    wait_held(&h, 1);
    let reloader = h.reloader();
    let mut cfg = Config::single(h.local_addr(), vec![], Mode::Splice);
    cfg.workers = 1;
    // The same listener (by name) on the same socket, with a new pool.
    cfg.listeners[0].name = "127.0.0.1:0".into();
    {
        let l = &mut cfg.listeners[0];
        l.pool.servers = vec![
            ServerConfig::new(a.server.addr.to_string()),
            ServerConfig::new(b.server.addr.to_string()),
        ];
        wants_a_primary(&mut l.pool, Some(Duration::from_secs(20)));
    }
    reloader.reload(cfg.clone()).unwrap();
    expect_echo(&mut c, b'b', b"reload me");
    drop(c);

    // Only a replica again, then a client held, then the listener removed.
    b.master.store(false, Ordering::SeqCst);
    // Two rounds of probes of both servers after the demotion.
    let before = h.stats().health_probes;
    wait_until(T, "the demotion probed", || {
        h.stats().health_probes >= before + 5
    });
    let mut last = send_hello(h.local_addr(), b"x");
    wait_stats(&h, T, "clients held", |s| s.clients_held >= 1);
    let mut other = Config::single(
        "127.0.0.1:0".parse().unwrap(),
        vec![b.server.addr],
        Mode::Splice,
    );
    other.listeners[0].name = "other".into();
    reloader.reload(other).unwrap();
    expect_closed(&mut last, T);
    wait_until(T, "no client held", || h.stats().clients_held == 0);
}
