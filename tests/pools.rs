//! Upstream pools over loopback: weighted round-robin and least-conn
//! spread, source-hash stability when a server joins, backup takeover and
//! giveback, retries, passive health, and re-resolution through a resolver
//! the test controls.

#[macro_use]
mod common;

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use socket2::{Domain, Socket, Type};
use spliced::config::{Balance, ServerConfig};
use spliced::{start_with, CloseReason, Config, Mode, ProxyHandle, Resolve, SystemResolver};

const T: Duration = Duration::from_secs(5);

/// An upstream that sends its tag byte first, then echoes.
fn tagged(tag: u8) -> Server {
    serve(move |mut s: TcpStream| {
        if s.write_all(&[tag]).is_ok() {
            echo(s)
        }
    })
}

/// A tagged upstream on a given address (to stop a server and bring it
/// back on the same port). Dropping it closes its listening socket.
struct TaggedAt {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

fn tagged_at(addr: SocketAddr, tag: u8) -> TaggedAt {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_reuse_address(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s.listen(128).unwrap();
    let l: TcpListener = s.into();
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = Arc::clone(&stop);
    let thread = std::thread::spawn(move || {
        for conn in l.incoming() {
            if stopped.load(Ordering::SeqCst) {
                return;
            }
            let Ok(mut conn) = conn else { continue };
            let _ = conn.write_all(&[tag]);
            std::thread::spawn(move || echo(conn));
        }
    });
    TaggedAt {
        addr,
        stop,
        thread: Some(thread),
    }
}

impl Drop for TaggedAt {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, T);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Connects from `from` (any 127.x.y.z works on Linux loopback) and
/// returns the stream and the tag of the server it reached.
fn via(proxy: SocketAddr, from: Option<IpAddr>) -> (TcpStream, u8) {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    if let Some(ip) = from {
        s.bind(&SocketAddr::new(ip, 0).into()).unwrap();
    }
    s.connect_timeout(&proxy.into(), T).unwrap();
    let mut c: TcpStream = s.into();
    c.set_read_timeout(Some(T)).unwrap();
    let mut tag = [0u8];
    c.read_exact(&mut tag)
        .unwrap_or_else(|e| panic!("no tag from the upstream: {e}"));
    (c, tag[0])
}

fn tag_of(proxy: SocketAddr) -> u8 {
    via(proxy, None).1
}

fn pool_proxy(servers: Vec<ServerConfig>, tweak: impl FnOnce(&mut Config)) -> ProxyHandle {
    pool_proxy_with(servers, Arc::new(SystemResolver), tweak)
}

fn pool_proxy_with(
    servers: Vec<ServerConfig>,
    resolver: Arc<dyn Resolve>,
    tweak: impl FnOnce(&mut Config),
) -> ProxyHandle {
    let mut cfg = Config::single("127.0.0.1:0".parse().unwrap(), vec![], Mode::Splice);
    cfg.workers = 1;
    cfg.listeners[0].pool.servers = servers;
    tweak(&mut cfg);
    start_with(cfg, resolver).unwrap_or_else(|e| panic!("start: {e}"))
}

fn server(addr: SocketAddr, weight: u32, backup: bool) -> ServerConfig {
    ServerConfig {
        weight,
        backup,
        ..ServerConfig::new(addr.to_string())
    }
}

#[test]
fn weighted_round_robin_spreads_by_weight() {
    let (a, b) = (tagged(1), tagged(2));
    let h = pool_proxy(
        vec![server(a.addr, 3, false), server(b.addr, 1, false)],
        |_| {},
    );
    let tags: Vec<u8> = (0..40).map(|_| tag_of(h.local_addr())).collect();
    assert_eq!(tags.iter().filter(|&&t| t == 1).count(), 30, "{tags:?}");
    // Interleaved, not bunched: never four in a row on one server.
    assert!(tags.windows(4).all(|w| w.contains(&2)), "{tags:?}");
}

#[test]
fn least_conn_sends_new_relays_to_the_emptier_server() {
    let (a, b) = (tagged(1), tagged(2));
    let h = pool_proxy(
        vec![server(a.addr, 1, false), server(b.addr, 1, false)],
        |c| {
            c.listeners[0].pool.balance = Balance::LeastConn;
        },
    );
    let held: Vec<(TcpStream, u8)> = (0..4).map(|_| via(h.local_addr(), None)).collect();
    let on_a = held.iter().filter(|(_, t)| *t == 1).count();
    assert_eq!(on_a, 2, "equal servers share evenly");
    // Close the relays on server 1: the next two go there.
    let (to_a, keep): (Vec<_>, Vec<_>) = held.into_iter().partition(|(_, t)| *t == 1);
    drop(to_a);
    wait_stats(&h, T, "two relays closed", |s| s.relays_active == 2);
    let next: Vec<(TcpStream, u8)> = (0..2).map(|_| via(h.local_addr(), None)).collect();
    assert_eq!(next.iter().map(|(_, t)| *t).collect::<Vec<_>>(), [1, 1]);
    drop((keep, next));
}

#[test]
fn source_hash_keeps_clients_and_moves_only_the_new_servers_share() {
    let servers: Vec<Server> = (1..=4).map(tagged).collect();
    let names = TestResolver::new();
    names.set(
        "db.test",
        &servers[..3].iter().map(|s| s.addr).collect::<Vec<_>>(),
    );
    let h = pool_proxy_with(vec![ServerConfig::new("db.test:1")], names.clone(), |c| {
        c.listeners[0].pool.balance = Balance::SourceHash;
        c.listeners[0].pool.resolve_interval = Some(Duration::from_millis(50));
    });
    let clients: Vec<IpAddr> = (1..=60).map(|i| IpAddr::from([127, 0, 1, i])).collect();
    let map = |h: &ProxyHandle| -> Vec<u8> {
        clients
            .iter()
            .map(|&ip| via(h.local_addr(), Some(ip)).1)
            .collect()
    };
    let before = map(&h);
    assert_eq!(
        before,
        map(&h),
        "a stable pool keeps every client on its server"
    );
    assert!((1..=3).all(|t| before.contains(&t)), "{before:?}");
    names.set(
        "db.test",
        &servers.iter().map(|s| s.addr).collect::<Vec<_>>(),
    );
    wait_until(T, "the fourth server joins", || {
        clients
            .iter()
            .any(|&ip| via(h.local_addr(), Some(ip)).1 == 4)
    });
    let after = map(&h);
    let mut moved = 0;
    for (b, a) in before.iter().zip(&after) {
        if b != a {
            assert_eq!(
                *a, 4,
                "a client moved between old servers: {before:?} -> {after:?}"
            );
            moved += 1;
        }
    }
    assert!((5..=30).contains(&moved), "{moved} of 60 moved");
}

#[test]
fn backup_takes_over_and_gives_back() {
    let primary_addr = refused_addr();
    let primary = tagged_at(primary_addr, 1);
    let backup = tagged(2);
    let h = pool_proxy(
        vec![server(primary_addr, 1, false), server(backup.addr, 1, true)],
        |c| {
            c.listeners[0].pool.health.fall = 1;
            c.listeners[0].pool.health.interval = Duration::from_millis(200);
        },
    );
    assert!(
        (0..5).all(|_| tag_of(h.local_addr()) == 1),
        "the backup idles while the primary is up"
    );
    drop(primary);
    assert!((0..5).all(|_| tag_of(h.local_addr()) == 2), "takeover");
    let failures = h.stats().upstream_connect_failures;
    assert!(failures >= 1);
    let _primary = tagged_at(primary_addr, 1);
    wait_until(
        T,
        "the primary gets its trial and takes relays again",
        || tag_of(h.local_addr()) == 1,
    );
    assert!((0..5).all(|_| tag_of(h.local_addr()) == 1), "giveback");
}

#[test]
fn retries_bound_the_servers_tried() {
    let good = tagged(1);
    let (dead1, dead2) = (refused_addr(), refused_addr());
    let servers = vec![
        server(dead1, 1, false),
        server(dead2, 1, false),
        server(good.addr, 1, false),
    ];
    let h = pool_proxy(servers.clone(), |c| c.listeners[0].pool.health.fall = 100);
    assert!(
        (0..6).all(|_| tag_of(h.local_addr()) == 1),
        "default: every server once"
    );
    drop(h);
    let h = pool_proxy(servers, |c| {
        c.listeners[0].pool.health.fall = 100;
        c.listeners[0].pool.retries = Some(0);
    });
    let mut served = 0;
    for _ in 0..6 {
        let mut c = connect(h.local_addr());
        let (bytes, _) = read_until_closed_or_tag(&mut c);
        served += usize::from(bytes == [1]);
    }
    assert_eq!(
        served, 2,
        "with no retry only relays that start on the live server succeed"
    );
    let s = wait_stats(&h, T, "four connect-failed closes", |s| {
        s.closed(CloseReason::ConnectFailed) == 4
    });
    assert_eq!(s.upstream_connect_failures, 4);
}

/// The first byte, or nothing if the proxy closed the client.
fn read_until_closed_or_tag(c: &mut TcpStream) -> (Vec<u8>, ()) {
    c.set_read_timeout(Some(T)).unwrap();
    let mut b = [0u8; 1];
    match c.read(&mut b) {
        Ok(1) => (vec![b[0]], ()),
        Ok(_) => (Vec::new(), ()),
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => (Vec::new(), ()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn passive_health_stops_trying_a_server_after_fall_failures() {
    let good = tagged(1);
    let dead = refused_addr();
    let h = pool_proxy(
        vec![server(dead, 1, false), server(good.addr, 1, false)],
        |c| {
            c.listeners[0].pool.health.fall = 2;
            c.listeners[0].pool.health.interval = Duration::from_secs(60);
        },
    );
    assert!(
        (0..12).all(|_| tag_of(h.local_addr()) == 1),
        "retries hide the dead server"
    );
    assert_eq!(
        h.stats().upstream_connect_failures,
        2,
        "after fall = 2 failures the dead server is no longer tried"
    );
}

/// A resolver whose answers the test sets.
#[derive(Clone, Default)]
struct TestResolver(Arc<Mutex<HashMap<String, Vec<SocketAddr>>>>);

impl TestResolver {
    fn new() -> Arc<TestResolver> {
        Arc::new(TestResolver::default())
    }
    fn set(&self, name: &str, addrs: &[SocketAddr]) {
        self.0.lock().unwrap().insert(name.into(), addrs.to_vec());
    }
}

impl Resolve for TestResolver {
    fn resolve(&self, host: &str, _port: u16) -> io::Result<Vec<SocketAddr>> {
        self.0
            .lock()
            .unwrap()
            .get(host)
            .cloned()
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such name"))
    }
}

#[test]
fn names_are_resolved_again_and_a_missing_name_is_retried() {
    let (a, b) = (tagged(1), tagged(2));
    let names = TestResolver::new();
    // Unknown at start: the proxy starts anyway and refuses relays...
    let h = pool_proxy_with(
        vec![ServerConfig::new("db.test:5432")],
        names.clone(),
        |c| {
            c.listeners[0].pool.resolve_interval = Some(Duration::from_millis(50));
        },
    );
    let mut c = connect(h.local_addr());
    assert_eq!(read_until_closed_or_tag(&mut c).0, Vec::<u8>::new());
    // ...until the name resolves.
    names.set("db.test", &[a.addr]);
    wait_until(T, "the name resolves to server 1", || {
        let mut c = connect(h.local_addr());
        read_until_closed_or_tag(&mut c).0 == [1]
    });
    // The address changes: relays follow, live ones are left alone.
    let (held, _) = via(h.local_addr(), None);
    names.set("db.test", &[b.addr]);
    wait_until(T, "relays go to server 2", || tag_of(h.local_addr()) == 2);
    let mut held = held;
    round_trip(&mut held, b"still here", T);
}
