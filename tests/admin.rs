//! The admin endpoint: metrics after known traffic, checked by name, label
//! and value; readiness while accepting and while draining.
#![cfg(feature = "admin")]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use spliced::Mode;

const T: Duration = Duration::from_secs(10);

/// `GET path` over HTTP/1.0: (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect to the admin endpoint");
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the answer to EOF");
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// Samples of the text format: `name{labels}` → value, plus `# TYPE` lines
/// as `TYPE name` → kind.
fn parse(body: &str) -> (HashMap<String, f64>, HashMap<String, String>) {
    let (mut samples, mut types) = (HashMap::new(), HashMap::new());
    for line in body.lines() {
        if let Some(t) = line.strip_prefix("# TYPE ") {
            let (name, kind) = t.split_once(' ').expect("TYPE name kind");
            types.insert(name.to_string(), kind.to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let (key, value) = line.rsplit_once(' ').expect("sample: key value");
            let value: f64 = value
                .parse()
                .unwrap_or_else(|_| panic!("value in {line:?}"));
            assert!(
                samples.insert(key.to_string(), value).is_none(),
                "{key} twice"
            );
        }
    }
    (samples, types)
}

fn known_traffic(mode: Mode) {
    let upstream = echo_server();
    let proxy = proxy(mode, vec![upstream.addr], |c| {
        c.ops.admin = Some("127.0.0.1:0".parse().unwrap());
        c.listeners[0].name = "echo".into();
    });
    let admin = proxy.admin_addr().expect("an admin endpoint");
    // Metrics name a listener by its name.
    let listener = "echo";
    let sizes = [1usize, 4096, 300_000];
    for (i, &n) in sizes.iter().enumerate() {
        let back = echo_once(proxy.local_addr(), i as u64, n, T);
        assert_eq!(back, pattern(i as u64, n));
    }
    wait_stats(&proxy, T, "every relay closed", |s| s.closed_total() == 3);
    let (status, body) = get(admin, "/metrics");
    assert_eq!(status, 200, "{body}");
    let (m, types) = parse(&body);
    let at = |name: &str, labels: &str| -> f64 {
        let key = format!("{name}{{listener=\"{listener}\"{labels}}}");
        *m.get(&key)
            .unwrap_or_else(|| panic!("no sample {key} in:\n{body}"))
    };
    let total: usize = sizes.iter().sum();
    let engine = if mode == Mode::Splice {
        "splice"
    } else {
        "copy"
    };
    let other = if mode == Mode::Splice {
        "copy"
    } else {
        "splice"
    };
    for direction in ["client_to_upstream", "upstream_to_client"] {
        let labels = |e| format!(",direction=\"{direction}\",engine=\"{e}\"");
        if mode == Mode::Auto {
            // Small messages copy, the stream splices: together, every byte.
            let both = at("spliced_bytes_total", &labels("splice"))
                + at("spliced_bytes_total", &labels("copy"));
            assert_eq!(both, total as f64);
            continue;
        }
        assert_eq!(at("spliced_bytes_total", &labels(engine)), total as f64);
        assert_eq!(at("spliced_bytes_total", &labels(other)), 0.0);
    }
    assert_eq!(at("spliced_connections_accepted_total", ""), 3.0);
    assert_eq!(at("spliced_connections_active", ""), 0.0);
    assert_eq!(
        at("spliced_connections_closed_total", ",reason=\"eof\""),
        3.0
    );
    assert_eq!(
        at("spliced_connections_closed_total", ",reason=\"idle\""),
        0.0
    );
    assert_eq!(
        at("spliced_upstream_connect_duration_seconds_count", ""),
        3.0
    );
    assert_eq!(
        at(
            "spliced_upstream_connect_duration_seconds_bucket",
            ",le=\"+Inf\""
        ),
        3.0
    );
    assert!(at("spliced_upstream_connect_duration_seconds_sum", "") > 0.0);
    assert_eq!(at("spliced_upstream_connect_failures_total", ""), 0.0);
    assert_eq!(at("spliced_local_errors_total", ",op=\"connect\""), 0.0);
    assert_eq!(m["spliced_worker_relays{worker=\"0\"}"], 0.0);
    assert_eq!(m["spliced_draining"], 0.0);
    if mode == Mode::Splice {
        assert!(m["spliced_pipes_in_use_max{worker=\"0\"}"] >= 1.0, "{body}");
        assert!(m["spliced_pipes_created_total{worker=\"0\"}"] >= 1.0);
    }
    for (name, kind) in [
        ("spliced_bytes_total", "counter"),
        ("spliced_connections_active", "gauge"),
        ("spliced_upstream_connect_duration_seconds", "histogram"),
        ("spliced_pipes_in_use_max", "gauge"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
    // Every family is named by Prometheus conventions.
    for name in types.keys() {
        assert!(name.starts_with("spliced_"), "{name}");
        let counter = types[name] == "counter";
        assert_eq!(counter, name.ends_with("_total"), "{name}");
    }
}

both_engines!(known_traffic);

#[test]
fn healthz_turns_503_while_draining_and_livez_stays_200() {
    let upstream = echo_server();
    let proxy = proxy(Mode::Splice, vec![upstream.addr], |c| {
        c.ops.admin = Some("127.0.0.1:0".parse().unwrap());
        c.drain_timeout = Some(Duration::from_secs(30));
    });
    let admin = proxy.admin_addr().unwrap();
    assert_eq!(get(admin, "/healthz"), (200, "ok\n".to_string()));
    assert_eq!(get(admin, "/livez").0, 200);
    assert_eq!(get(admin, "/nothing").0, 404);
    // A live relay keeps the drain going while we look.
    let mut held = connect(proxy.local_addr());
    round_trip(&mut held, b"ping", T);
    proxy.shutdown();
    assert_eq!(get(admin, "/healthz"), (503, "draining\n".to_string()));
    assert_eq!(get(admin, "/livez").0, 200);
    let (_, body) = get(admin, "/metrics");
    assert!(body.contains("\nspliced_draining 1\n"), "{body}");
    drop(held);
    proxy.join();
}

/// `/healthz/LISTENER`: 200 while the listener has a server that takes
/// relays, 503 once none does (and while draining), 404 for a name that is
/// no listener's.
#[test]
fn per_listener_readiness_follows_its_servers() {
    let refused = refused_addr();
    let down = proxy(Mode::Splice, vec![refused], |c| {
        c.ops.admin = Some("127.0.0.1:0".parse().unwrap());
        c.listeners[0].name = "db".into();
        let h = &mut c.listeners[0].pool.health;
        h.check = Some(spliced::config::Check::Tcp);
        h.interval = Duration::from_millis(100);
        h.timeout = Duration::from_millis(100);
        h.fall = 1;
    });
    let admin = down.admin_addr().unwrap();
    wait_until(T, "the refusing server is out", || {
        get(admin, "/healthz/db").0 == 503
    });
    assert_eq!(
        get(admin, "/healthz/db"),
        (503, "0 of 1 servers take new relays\n".to_string())
    );
    assert_eq!(get(admin, "/healthz/nope").0, 404);
    assert_eq!(get(admin, "/healthz").0, 200, "the process is ready");
    // The probes count per worker, the failed ones too; cancels per listener.
    let (m, _) = parse(&get(admin, "/metrics").1);
    let sum = |name: &str| -> f64 {
        m.iter()
            .filter(|(k, _)| k.starts_with(&format!("{name}{{worker=")))
            .map(|(_, v)| v)
            .sum()
    };
    assert!(sum("spliced_health_probes_total") >= 1.0, "{m:?}");
    assert!(sum("spliced_health_probe_failures_total") >= 1.0, "{m:?}");
    assert_eq!(
        m.get("spliced_pg_cancel_requests_total{listener=\"db\"}"),
        Some(&0.0)
    );
    drop(down);

    let live = echo_server();
    let proxy = proxy(Mode::Splice, vec![live.addr], |c| {
        c.ops.admin = Some("127.0.0.1:0".parse().unwrap());
        c.listeners[0].name = "db".into();
        c.drain_timeout = Some(Duration::from_secs(30));
    });
    let admin = proxy.admin_addr().unwrap();
    assert_eq!(
        get(admin, "/healthz/db"),
        (200, "1 of 1 servers take new relays\n".to_string())
    );
    let mut held = connect(proxy.local_addr());
    round_trip(&mut held, b"ping", T);
    proxy.shutdown();
    assert_eq!(get(admin, "/healthz/db"), (503, "draining\n".to_string()));
    drop(held);
    proxy.join();
}

/// Per server: a tcp check takes the server that refuses out of the pool
/// (`spliced_server_up` 0), the live one stays up and counts the relay it
/// holds; no check tells roles, so both are `unknown`.
#[test]
fn servers_show_their_health_and_relays() {
    let live = echo_server();
    let refused = refused_addr();
    let proxy = proxy(Mode::Splice, vec![refused, live.addr], |c| {
        c.ops.admin = Some("127.0.0.1:0".parse().unwrap());
        c.listeners[0].name = "pool".into();
        let h = &mut c.listeners[0].pool.health;
        h.check = Some(spliced::config::Check::Tcp);
        h.interval = Duration::from_millis(100);
        h.timeout = Duration::from_millis(100);
        h.fall = 2;
        h.rise = 1;
    });
    let admin = proxy.admin_addr().expect("an admin endpoint");
    let sample = |server: SocketAddr, name: &str, extra: &str| -> Option<f64> {
        let (_, body) = get(admin, "/metrics");
        let (m, _) = parse(&body);
        m.get(&format!(
            "{name}{{listener=\"pool\",server=\"{server}\"{extra}}}"
        ))
        .copied()
    };
    wait_until(T, "the refusing server is marked down", || {
        sample(refused, "spliced_server_up", "") == Some(0.0)
    });
    assert_eq!(sample(live.addr, "spliced_server_up", ""), Some(1.0));
    // With one server down, every new relay goes to the live one.
    let mut held = connect(proxy.local_addr());
    round_trip(&mut held, b"held", T);
    assert_eq!(
        sample(live.addr, "spliced_server_connections_active", ""),
        Some(1.0)
    );
    assert_eq!(
        sample(refused, "spliced_server_connections_active", ""),
        Some(0.0)
    );
    for server in [live.addr, refused] {
        assert_eq!(
            sample(server, "spliced_server_role", ",role=\"unknown\""),
            Some(1.0)
        );
        assert_eq!(sample(server, "spliced_server_backup", ""), Some(0.0));
    }
}

/// An echo server that counts the bytes it echoed.
fn counting_echo() -> (Server, Arc<AtomicU64>) {
    let echoed = Arc::new(AtomicU64::new(0));
    let count = Arc::clone(&echoed);
    let server = serve(move |mut s| {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                    count.fetch_add(n as u64, Ordering::SeqCst);
                }
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
    });
    (server, echoed)
}

/// Per server, after known traffic through a pool of two live servers and
/// a dead one: bytes each way match what each server echoed, split by
/// engine; the dead one has failures and no connect; every connect is in
/// the latency histogram and every relay's close is counted.
fn per_server_counters(mode: Mode) {
    let (a, a_bytes) = counting_echo();
    let (b, b_bytes) = counting_echo();
    let dead = refused_addr();
    let proxy = proxy(mode, vec![a.addr, b.addr, dead], |c| {
        c.ops.admin = Some("127.0.0.1:0".parse().unwrap());
        c.listeners[0].name = "two".into();
    });
    let admin = proxy.admin_addr().expect("an admin endpoint");
    let sizes = [10usize, 5000, 70_000, 300_000, 1, 123_456];
    for (i, &n) in sizes.iter().enumerate() {
        let back = echo_once(proxy.local_addr(), i as u64, n, T);
        assert_eq!(back.len(), n);
    }
    wait_stats(&proxy, T, "every relay closed", |s| {
        s.closed_total() == sizes.len() as u64
    });
    let total: u64 = sizes.iter().map(|&n| n as u64).sum();
    let (a_bytes, b_bytes) = (
        a_bytes.load(Ordering::SeqCst),
        b_bytes.load(Ordering::SeqCst),
    );
    assert_eq!(a_bytes + b_bytes, total);
    let (_, body) = get(admin, "/metrics");
    let (m, types) = parse(&body);
    let at = |server: SocketAddr, name: &str, labels: &str| -> f64 {
        let key = format!("{name}{{listener=\"two\",server=\"{server}\"{labels}}}");
        *m.get(&key)
            .unwrap_or_else(|| panic!("no sample {key} in:\n{body}"))
    };
    let bytes = |server, direction: &str, engine: &str| {
        let labels = format!(",direction=\"{direction}\",engine=\"{engine}\"");
        at(server, "spliced_server_bytes_total", &labels)
    };
    let mut connects = 0.0;
    for (server, echoed) in [(a.addr, a_bytes), (b.addr, b_bytes)] {
        for direction in ["client_to_upstream", "upstream_to_client"] {
            let (spliced, copied) = (
                bytes(server, direction, "splice"),
                bytes(server, direction, "copy"),
            );
            assert_eq!(spliced + copied, echoed as f64, "{server} {direction}");
            match mode {
                Mode::Splice => assert_eq!(copied, 0.0, "{server} {direction}"),
                Mode::Copy => assert_eq!(spliced, 0.0, "{server} {direction}"),
                Mode::Auto => {}
            }
        }
        let count = at(server, "spliced_server_connect_duration_seconds_count", "");
        let inf = ",le=\"+Inf\"";
        assert_eq!(
            at(
                server,
                "spliced_server_connect_duration_seconds_bucket",
                inf
            ),
            count
        );
        assert_eq!(at(server, "spliced_server_connect_failures_total", ""), 0.0);
        assert_eq!(
            at(server, "spliced_server_connect_attempts_total", ""),
            count
        );
        assert_eq!(
            at(server, "spliced_server_connections_closed_total", ""),
            count
        );
        connects += count;
    }
    assert_eq!(connects, sizes.len() as f64, "one connect per relay");
    let failures = at(dead, "spliced_server_connect_failures_total", "");
    assert!(failures >= 1.0, "the dead server was tried: {body}");
    assert_eq!(
        at(dead, "spliced_server_connect_attempts_total", ""),
        failures
    );
    assert_eq!(
        at(dead, "spliced_server_connect_duration_seconds_count", ""),
        0.0
    );
    assert_eq!(
        at(
            dead,
            "spliced_server_bytes_total",
            ",direction=\"client_to_upstream\",engine=\"splice\""
        ),
        0.0
    );
    for (name, kind) in [
        ("spliced_server_bytes_total", "counter"),
        ("spliced_server_connect_attempts_total", "counter"),
        ("spliced_server_connect_duration_seconds", "histogram"),
    ] {
        assert_eq!(types.get(name).map(String::as_str), Some(kind), "{name}");
    }
}

both_engines!(per_server_counters);
