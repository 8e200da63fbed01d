//! Routes over loopback: named pools behind one listener, chosen by a
//! PostgreSQL client's startup parameters or a TLS ClientHello's server
//! name and ALPN (after an SSLRequest spliced answers `S` to, or sent at
//! once). Fake servers tag their answers, so each test sees which pool a
//! client reached, and record what they received, so it sees exactly
//! what was forwarded.

#[macro_use]
mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use spliced::config::{parse_str, FlagDefaults};
use spliced::{Mode, ProxyHandle};

const T: Duration = Duration::from_secs(5);

/// What a fake server does with a connection.
#[derive(Clone, Copy, Debug)]
enum Script {
    /// Its tag, then an echo of everything.
    Plain,
    /// Reads the 8 bytes of an SSLRequest and answers this byte; after
    /// `S`, its tag and an echo of everything.
    SslAnswer(u8),
    /// At the first bytes, a TLS handshake byte (0x16) and its tag, then an
    /// echo of everything.
    TlsReply,
}

/// Per connection: the SSLRequest it read (classic TLS), then every byte
/// it read after it.
type Received = Arc<Mutex<Vec<(Vec<u8>, Vec<u8>)>>>;

/// A fake server: what each connection sent it, in order.
struct Fake {
    server: Server,
    received: Received,
}

impl Fake {
    fn new(tag: u8, script: Script) -> Fake {
        let received: Received = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&received);
        let server = serve(move |mut s: TcpStream| {
            let slot = {
                let mut log = log.lock().unwrap();
                log.push((Vec::new(), Vec::new()));
                log.len() - 1
            };
            let mut buf = vec![0u8; 64 * 1024];
            match script {
                Script::Plain => {
                    if s.write_all(&[tag]).is_err() {
                        return;
                    }
                }
                Script::SslAnswer(answer) => {
                    let mut request = [0u8; 8];
                    if s.read_exact(&mut request).is_err() {
                        return;
                    }
                    log.lock().unwrap()[slot].0 = request.to_vec();
                    if s.write_all(&[answer]).is_err() || answer != b'S' {
                        let _ = s.read(&mut buf);
                        return;
                    }
                    if s.write_all(&[tag]).is_err() {
                        return;
                    }
                }
                Script::TlsReply => {}
            }
            let mut first = true;
            loop {
                let n = match s.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                log.lock().unwrap()[slot].1.extend_from_slice(&buf[..n]);
                if first && matches!(script, Script::TlsReply) && s.write_all(&[0x16, tag]).is_err()
                {
                    return;
                }
                first = false;
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        });
        Fake { server, received }
    }

    fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    /// Connection `i`'s (SSLRequest, bytes after it), once it has `n`
    /// bytes after it.
    fn received(&self, i: usize, n: usize) -> (Vec<u8>, Vec<u8>) {
        wait_until(T, "the server received the bytes", || {
            self.received
                .lock()
                .unwrap()
                .get(i)
                .is_some_and(|(_, b)| b.len() >= n)
        });
        self.received.lock().unwrap()[i].clone()
    }
}

/// A proxy from a config file's text, one worker, every listener in `mode`.
fn start_text(mode: Mode, text: &str) -> ProxyHandle {
    let mut c = parse_str(text, &FlagDefaults::default())
        .unwrap_or_else(|e| panic!("{text}\n{e:?}"))
        .config;
    c.workers = 1;
    c.event_loop = common::event_loop();
    for l in &mut c.listeners {
        l.mode = mode;
    }
    spliced::start(c).unwrap_or_else(|e| panic!("start: {e}"))
}

/// `[[pool]]` tables, one per (name, server).
fn pools(named: &[(&str, SocketAddr)]) -> String {
    named
        .iter()
        .map(|(name, addr)| format!("[[pool]]\nname = \"{name}\"\nservers = [\"{addr}\"]\n\n"))
        .collect()
}

/// A listener on 127.0.0.1:0 with `protocol` and these route tables.
fn listener(name: &str, protocol: &str, routes: &str) -> String {
    format!(
        "[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\nfirst-packet-timeout = \"500ms\"\n{routes}\n"
    )
}

fn route(key: &str, value: &str, pool: &str) -> String {
    format!("[[listener.route]]\n{key} = \"{value}\"\npool = \"{pool}\"\n")
}

fn default_route(pool: &str) -> String {
    format!("[[listener.route]]\npool = \"{pool}\"\n")
}

/// Sends `opening` and expects `tag` then the opening echoed, byte for
/// byte; returns the client for more.
fn expect_routed(proxy: SocketAddr, opening: &[u8], tag: u8) -> TcpStream {
    let mut c = connect(proxy);
    c.write_all(opening).unwrap();
    let got = read_exact_within(&mut c, 1 + opening.len(), T).expect("tag and echo");
    assert_eq!(got[0], tag, "reached the wrong pool");
    assert_eq!(&got[1..], opening, "forwarded bytes differ");
    c
}

fn plain_text_routes_by_database_then_user_then_default(mode: Mode) {
    let (a, b, d) = (
        Fake::new(b'a', Script::Plain),
        Fake::new(b'b', Script::Plain),
        Fake::new(b'd', Script::Plain),
    );
    let routes = [
        route("database", "analytics", "olap"),
        route("user", "bob", "bobs"),
        default_route("rest"),
    ]
    .concat();
    let text = pools(&[("olap", a.addr()), ("bobs", b.addr()), ("rest", d.addr())])
        + &listener("pg", "postgres", &routes);
    let h = start_text(mode, &text);
    let to_a = startup_message(&[("user", "eve"), ("database", "analytics")]);
    expect_routed(h.local_addr(), &to_a, b'a');
    assert_eq!(
        a.received(0, to_a.len()).1,
        to_a,
        "the startup packet as sent"
    );
    // No database: PostgreSQL's default is the user's name.
    let to_b = startup_message(&[("user", "bob")]);
    expect_routed(h.local_addr(), &to_b, b'b');
    let to_d = startup_message(&[("user", "eve"), ("database", "app")]);
    let mut c = expect_routed(h.local_addr(), &to_d, b'd');
    round_trip(&mut c, b"Q after the startup", T);
    assert_eq!(h.stats().refused_no_route, 0);
}

fn without_a_default_route_an_unmatched_client_is_reset_and_counted(mode: Mode) {
    let a = Fake::new(b'a', Script::Plain);
    let text = pools(&[("olap", a.addr())])
        + &listener("pg", "postgres", &route("database", "analytics", "olap"));
    let h = start_text(mode, &text);
    let mut c = connect(h.local_addr());
    c.write_all(&startup_message(&[("user", "eve"), ("database", "app")]))
        .unwrap();
    let (ending, _) = expect_closed(&mut c, T);
    assert_eq!(ending, Ending::Reset);
    wait_stats(&h, T, "the unmatched client is counted", |s| {
        s.refused_no_route == 1
    });
    assert_eq!(a.server.accepted(), 0, "no server was contacted");
}

/// A routed PostgreSQL listener with pools `a` (server name
/// `a.db.example`) and `wild` (`*.db.example`), whose servers run `script`.
fn sni_routed(mode: Mode, script: Script) -> (ProxyHandle, Fake, Fake) {
    let (a, w) = (Fake::new(b'a', script), Fake::new(b'w', script));
    let routes = [
        route("server-name", "a.db.example", "a"),
        route("server-name", "*.db.example", "wild"),
    ]
    .concat();
    let text = pools(&[("a", a.addr()), ("wild", w.addr())]) + &listener("pg", "postgres", &routes);
    (start_text(mode, &text), a, w)
}

fn classic_tls_is_routed_by_server_name(mode: Mode) {
    let (h, a, w) = sni_routed(mode, Script::SslAnswer(b'S'));
    for (name, tag, fake) in [("a.db.example", b'a', &a), ("X.DB.example", b'w', &w)] {
        let mut c = connect(h.local_addr());
        c.write_all(&ssl_request()).unwrap();
        let s = read_exact_within(&mut c, 1, T).expect("the answer to the SSLRequest");
        assert_eq!(s, b"S", "spliced answers S on the server's behalf");
        let hello = client_hello(Some(name), &["postgresql"], 0);
        c.write_all(&hello).unwrap();
        let got = read_exact_within(&mut c, 1 + hello.len(), T).expect("tag and echo");
        assert_eq!(got[0], tag, "{name} reached the wrong pool");
        assert_eq!(&got[1..], &hello[..]);
        round_trip(&mut c, b"application data both ways", T);
        let (request, after) = fake.received(0, hello.len());
        assert_eq!(
            request,
            ssl_request(),
            "the server got exactly an SSLRequest first"
        );
        assert!(after.starts_with(&hello), "then the hello, byte for byte");
    }
    assert_eq!(a.server.accepted(), 1);
    assert_eq!(w.server.accepted(), 1);
}

fn a_server_answering_n_gets_the_tls_client_reset(mode: Mode) {
    let (h, a, _w) = sni_routed(mode, Script::SslAnswer(b'N'));
    let mut c = connect(h.local_addr());
    c.write_all(&ssl_request()).unwrap();
    assert_eq!(read_exact_within(&mut c, 1, T).unwrap(), b"S");
    c.write_all(&client_hello(Some("a.db.example"), &[], 0))
        .unwrap();
    let (bytes, ending) = read_until_closed(&mut c, T);
    assert_eq!(bytes, b"", "nothing of the server's reaches the client");
    assert_eq!(ending, Ending::Reset);
    assert_eq!(a.received(0, 0).0, ssl_request());
}

fn direct_tls_written_a_byte_at_a_time_is_routed(mode: Mode) {
    let (h, a, _w) = sni_routed(mode, Script::TlsReply);
    let hello = client_hello(Some("a.db.example"), &["postgresql"], 0);
    let mut c = connect(h.local_addr());
    for b in &hello {
        c.write_all(&[*b]).unwrap();
        c.flush().unwrap();
        pace(Duration::from_millis(1));
    }
    let got = read_exact_within(&mut c, 2 + hello.len(), T).expect("the answer");
    assert_eq!(&got[..2], &[0x16, b'a']);
    assert_eq!(&got[2..], &hello[..]);
    assert_eq!(
        a.received(0, hello.len()).1,
        hello,
        "the hello, byte for byte"
    );
    round_trip(&mut c, b"more", T);
}

/// A server that answers a direct hello in plain text (a PostgreSQL 16 or
/// older server reading it as a broken startup packet) gets the client
/// reset, and nothing of its answer reaches the client.
fn a_server_answering_a_direct_hello_without_tls_gets_the_client_reset(mode: Mode) {
    let (h, a, _w) = sni_routed(mode, Script::Plain);
    let hello = client_hello(Some("a.db.example"), &["postgresql"], 0);
    let mut c = connect(h.local_addr());
    c.write_all(&hello).unwrap();
    let (bytes, ending) = read_until_closed(&mut c, T);
    assert_eq!((bytes.len(), ending), (0, Ending::Reset));
    assert_eq!(a.server.accepted(), 1, "the server was asked");
    wait_stats(&h, T, "closed as upstream-reset", |s| {
        s.closed(spliced::CloseReason::UpstreamReset) == 1
    });
}

fn a_hello_larger_than_a_packet_is_read_whole(mode: Mode) {
    let (h, _a, w) = sni_routed(mode, Script::TlsReply);
    let hello = client_hello(Some("big.db.example"), &["postgresql"], 3000);
    assert!(hello.len() >= 3000);
    let mut c = connect(h.local_addr());
    c.write_all(&hello).unwrap();
    let got = read_exact_within(&mut c, 2 + hello.len(), T).expect("the answer");
    assert_eq!(&got[..2], &[0x16, b'w']);
    assert_eq!(w.received(0, hello.len()).1, hello);
}

fn a_broken_or_truncated_hello_is_reset_and_nothing_forwarded(mode: Mode) {
    let (h, a, w) = sni_routed(mode, Script::TlsReply);
    // A handshake record holding a ServerHello (type 2), not a ClientHello.
    let mut wrong = client_hello(Some("a.db.example"), &[], 0);
    wrong[5] = 2;
    // Half a hello, then nothing more within the first-packet timeout.
    let whole = client_hello(Some("a.db.example"), &[], 0);
    let half = &whole[..whole.len() / 2];
    for opening in [&wrong[..], half] {
        let mut c = connect(h.local_addr());
        c.write_all(opening).unwrap();
        let (bytes, ending) = read_until_closed(&mut c, T);
        assert_eq!((bytes.len(), ending), (0, Ending::Reset));
    }
    wait_stats(&h, T, "both counted", |s| s.refused_no_route == 2);
    assert_eq!(a.server.accepted() + w.server.accepted(), 0);
}

fn a_gssenc_request_hears_n_and_the_startup_is_routed(mode: Mode) {
    let a = Fake::new(b'a', Script::Plain);
    let text = pools(&[("olap", a.addr())])
        + &listener("pg", "postgres", &route("database", "analytics", "olap"));
    let h = start_text(mode, &text);
    let mut c = connect(h.local_addr());
    c.write_all(&gssenc_request()).unwrap();
    assert_eq!(read_exact_within(&mut c, 1, T).unwrap(), b"N");
    let startup = startup_message(&[("user", "eve"), ("database", "analytics")]);
    c.write_all(&startup).unwrap();
    let got = read_exact_within(&mut c, 1 + startup.len(), T).unwrap();
    assert_eq!((got[0], &got[1..]), (b'a', &startup[..]));
    assert_eq!(
        a.received(0, startup.len()).1,
        startup,
        "the GSSENCRequest stays with spliced"
    );
}

fn a_tls_listener_routes_by_alpn(mode: Mode) {
    let (x, d) = (
        Fake::new(b'x', Script::TlsReply),
        Fake::new(b'd', Script::TlsReply),
    );
    let routes = [route("alpn", "postgresql", "x"), default_route("d")].concat();
    let text = pools(&[("x", x.addr()), ("d", d.addr())]) + &listener("tls", "tls", &routes);
    let h = start_text(mode, &text);
    for (alpn, tag) in [(&["h2", "postgresql"][..], b'x'), (&["h2"][..], b'd')] {
        let hello = client_hello(None, alpn, 0);
        let mut c = connect(h.local_addr());
        c.write_all(&hello).unwrap();
        let got = read_exact_within(&mut c, 2 + hello.len(), T).unwrap();
        assert_eq!(got[1], tag, "{alpn:?}");
    }
}

fn a_cancel_request_reaches_every_pool(mode: Mode) {
    let (a, b) = (
        Fake::new(b'a', Script::Plain),
        Fake::new(b'b', Script::Plain),
    );
    let routes = [route("database", "one", "a"), default_route("b")].concat();
    let text = pools(&[("a", a.addr()), ("b", b.addr())]) + &listener("pg", "postgres", &routes);
    let h = start_text(mode, &text);
    let mut c = connect(h.local_addr());
    c.write_all(&cancel_request(4242, 7)).unwrap();
    let (bytes, _) = read_until_closed(&mut c, T);
    assert!(bytes.is_empty());
    for fake in [&a, &b] {
        assert_eq!(fake.received(0, 16).1, cancel_request(4242, 7));
    }
    assert_eq!(h.stats().refused_no_route, 0);
}

/// A reload that changes a route, then one that changes the servers of a
/// named pool: new clients follow each; a relay from before runs on.
fn a_reload_changes_the_routes_for_new_clients(mode: Mode) {
    let (a, b) = (
        Fake::new(b'a', Script::Plain),
        Fake::new(b'b', Script::Plain),
    );
    let named = pools(&[("a", a.addr()), ("b", b.addr())]);
    let text =
        |pool: &str| named.clone() + &listener("pg", "postgres", &route("user", "bob", pool));
    let h = start_text(mode, &text("a"));
    let startup = startup_message(&[("user", "bob")]);
    let mut before = expect_routed(h.local_addr(), &startup, b'a');
    let mut next = parse_str(&text("b"), &FlagDefaults::default())
        .unwrap()
        .config;
    next.workers = 1;
    next.listeners[0].mode = mode;
    let report = h.reloader().reload(next).expect("reload");
    assert_eq!(report.changed, vec!["pg".to_string()]);
    expect_routed(h.local_addr(), &startup, b'b');
    // The same routes, the named pool's servers changed.
    let c = Fake::new(b'c', Script::Plain);
    let moved = pools(&[("a", a.addr()), ("b", c.addr())])
        + &listener("pg", "postgres", &route("user", "bob", "b"));
    let mut next = parse_str(&moved, &FlagDefaults::default()).unwrap().config;
    next.workers = 1;
    next.listeners[0].mode = mode;
    let report = h.reloader().reload(next).expect("reload");
    assert_eq!(report.changed, vec!["pg".to_string()]);
    expect_routed(h.local_addr(), &startup, b'c');
    round_trip(&mut before, b"the relay from before runs on", T);
}

both_engines!(
    plain_text_routes_by_database_then_user_then_default,
    without_a_default_route_an_unmatched_client_is_reset_and_counted,
    classic_tls_is_routed_by_server_name,
    a_server_answering_n_gets_the_tls_client_reset,
    direct_tls_written_a_byte_at_a_time_is_routed,
    a_server_answering_a_direct_hello_without_tls_gets_the_client_reset,
    a_hello_larger_than_a_packet_is_read_whole,
    a_broken_or_truncated_hello_is_reset_and_nothing_forwarded,
    a_gssenc_request_hears_n_and_the_startup_is_routed,
    a_tls_listener_routes_by_alpn,
    a_cancel_request_reaches_every_pool,
    a_reload_changes_the_routes_for_new_clients,
);

/// Two listeners whose routes lead to one named pool with a tcp check:
/// its server is probed once per interval, not once per listener or route.
#[test]
fn two_listeners_on_one_named_pool_probe_its_server_once_per_interval() {
    let _serial = serial();
    let server = Fake::new(b's', Script::Plain);
    let interval = Duration::from_millis(100);
    let text = format!(
        "[[pool]]\nname = \"shared\"\nservers = [\"{}\"]\n[pool.health]\ncheck = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\n\n",
        server.addr()
    ) + &listener("one", "postgres", &[route("user", "bob", "shared"), default_route("shared")].concat())
        + &listener("two", "tls", &default_route("shared"));
    let start = Instant::now();
    let h = start_text(Mode::Splice, &text);
    let probes = 8;
    wait_until(T, "probes", || h.stats().health_probes >= probes);
    let elapsed = start.elapsed();
    let s = h.stats();
    // One probe starts per interval: at most one per interval passed, plus
    // the first at start (two per interval if each listener probed).
    let most = (elapsed.as_millis() / interval.as_millis()) as u64 + 1;
    assert!(
        s.health_probes <= most,
        "{} probes in {elapsed:?}: more than one per {interval:?}",
        s.health_probes
    );
    // Each probe is one connection to the server; no client came.
    wait_until(T, "the probes' connections", || {
        server.server.accepted() as u64 >= probes
    });
    assert!(server.server.accepted() as u64 <= h.stats().health_probes);
}

/// A client routed to a named pool whose only server is no primary yet is
/// held (the pool's queue-timeout), and connects, its startup packet
/// intact, once the server answers as primary.
fn a_held_client_waits_for_its_routes_pool(mode: Mode) {
    use std::sync::atomic::Ordering;
    let redis = fake_redis(b'r', false);
    let other = Fake::new(b'o', Script::Plain);
    let text = format!(
        "[[pool]]\nname = \"rw\"\nservers = [\"{}\"]\nqueue-timeout = \"20s\"\n[pool.health]\ncheck = \"redis\"\nrole = \"primary\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n\n",
        redis.server.addr
    ) + &pools(&[("other", other.addr())])
        + &listener(
            "pg",
            "postgres",
            &[route("database", "app", "rw"), default_route("other")].concat(),
        );
    let h = start_text(mode, &text);
    wait_until(T, "the replica probed", || h.stats().health_probes >= 1);
    let startup = startup_message(&[("user", "eve"), ("database", "app")]);
    let mut c = connect(h.local_addr());
    c.write_all(&startup).unwrap();
    wait_stats(&h, T, "the client held", |s| s.clients_held == 1);
    redis.master.store(true, Ordering::SeqCst);
    let got = read_exact_within(&mut c, 1 + startup.len(), T).expect("relayed once promoted");
    assert_eq!((got[0], &got[1..]), (b'r', &startup[..]));
    assert_eq!(
        other.server.accepted(),
        0,
        "the default route's pool was not used"
    );
    wait_stats(&h, T, "no client held", |s| s.clients_held == 0);
}

both_engines!(a_held_client_waits_for_its_routes_pool);

/// `/metrics` counts each route's clients, labelled by its position, what
/// it matches and its pool, and the clients no route took.
#[cfg(feature = "admin")]
#[test]
fn metrics_count_clients_per_route_and_unmatched() {
    let a = Fake::new(b'a', Script::Plain);
    let text = "admin = \"127.0.0.1:0\"\n".to_string()
        + &pools(&[("olap", a.addr())])
        + &listener("pg", "postgres", &route("database", "analytics", "olap"));
    let h = start_text(Mode::Splice, &text);
    let routed = startup_message(&[("user", "eve"), ("database", "analytics")]);
    expect_routed(h.local_addr(), &routed, b'a');
    expect_routed(h.local_addr(), &routed, b'a');
    let mut c = connect(h.local_addr());
    c.write_all(&startup_message(&[("user", "eve")])).unwrap();
    expect_closed(&mut c, T);
    wait_stats(&h, T, "the unmatched client", |s| s.refused_no_route == 1);
    let mut s = connect(h.admin_addr().expect("an admin endpoint"));
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")
        .unwrap();
    let body = String::from_utf8(read_to_eof(&mut s, T).unwrap()).unwrap();
    let line = "spliced_route_clients_total{listener=\"pg\",route=\"1\",match=\"database=analytics\",pool=\"olap\"} 2";
    assert!(body.contains(line), "{body}");
    let refused = "spliced_connections_refused_total{listener=\"pg\",limit=\"no-route\"} 1";
    assert!(body.contains(refused), "{body}");
}
