//! Redis: two masters at once, relays from before a reload killed on
//! demotion, least-conn counting relays from before a reload.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    failover_bound, first, ms, probe_lag, settle_on, tally, ClientLoop, ListenerToml, Seen,
    CLIENT_TIMEOUT, INTERVAL,
};
use crate::common::{measure_window, wait_until};
use crate::fixture::{free_port, loopback, redis_bin, Proxy, Redis, RespConn, TempDir};

/// The port of the server a fresh connection through `addr` reaches.
fn port_via(addr: SocketAddr) -> Option<u16> {
    RespConn::connect(addr, CLIENT_TIMEOUT)
        .and_then(|mut c| c.server_port())
        .ok()
}

/// A relay held open through `addr`, named `name` (CLIENT SETNAME), and
/// the port of the server it reached.
fn open_relay(addr: SocketAddr, name: &str) -> (RespConn, u16) {
    let mut c = RespConn::connect(addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("relay {name}: {e}"));
    c.cmd(&["CLIENT", "SETNAME", name])
        .unwrap_or_else(|e| panic!("relay {name}: {e}"));
    let port = c
        .server_port()
        .unwrap_or_else(|e| panic!("relay {name}: {e}"));
    (c, port)
}

fn settle(addr: SocketAddr, want: u16, what: &str) {
    settle_on(Duration::from_secs(10), 6, what, || {
        let got = RespConn::connect(addr, CLIENT_TIMEOUT).and_then(|mut c| c.server_port());
        match got {
            Ok(p) if p == want => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

fn listener(port: u16, servers: &[u16], role: &str, pool_extra: &str) -> String {
    ListenerToml {
        name: "redis",
        port,
        servers,
        check: "redis",
        role,
        pool_extra,
        health_extra: "timeout = \"150ms\"",
    }
    .render()
}

fn with_defaults(connect_timeout: &str, listener: &str) -> String {
    format!("[defaults]\nconnect-timeout = \"{connect_timeout}\"\n\n{listener}")
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn redis_promote_then_demote_holds_both_claimants() {
    let Some(bin) = redis_bin("redis_promote_then_demote_holds_both_claimants") else {
        return;
    };
    let dir = TempDir::new("e2e-redis-2masters");
    let a = Redis::master(&bin, &dir, "redis-a", None);
    let b = Redis::replica_of(&bin, &dir, "redis-b", &a);
    let port = free_port();
    let _proxy = Proxy::start(
        &dir,
        "redis-2masters",
        &listener(port, &[a.port, b.port], "primary", "on-down = \"kill\""),
    );
    let addr = loopback(port);
    settle(addr, a.port, "the listener reaches master A");

    // A writer: a fresh connection per SET, answered with the server's port.
    let n = Arc::new(AtomicU64::new(0));
    let writes = ClientLoop::spawn(Duration::from_millis(5), move || {
        let key = format!("k{}", n.fetch_add(1, Ordering::SeqCst));
        let r = RespConn::connect(addr, CLIENT_TIMEOUT).and_then(|mut c| {
            let replies = c.pipeline(&[&["INFO", "server"], &["SET", &key, "v"]])?;
            let port = crate::fixture::info_field(&replies[0].text(), "tcp_port");
            Ok(port.unwrap_or_default())
        });
        Seen::of(r)
    });
    measure_window(Duration::from_millis(500));
    b.promote();
    let promoted = Instant::now();
    measure_window(Duration::from_secs(1));
    a.cmd(&["REPLICAOF", "127.0.0.1", &b.port.to_string()]);
    let demoted = Instant::now();
    measure_window(failover_bound() + Duration::from_millis(500));
    let writes = writes.finish();

    let (pa, pb) = (a.port.to_string(), b.port.to_string());
    // The window with no client served: from the first attempt after the
    // promotion that was not served to the next one that was.
    let after: Vec<_> = writes.iter().filter(|w| w.start > promoted).collect();
    let gap_from = after.iter().position(|w| w.seen.served().is_none());
    let gap = gap_from.map(|i| {
        let until = after[i..].iter().find(|w| w.seen.served().is_some());
        (
            ms(promoted, after[i].start),
            until.map(|w| ms(promoted, w.end)),
        )
    });
    let first_on_b = after
        .iter()
        .find(|w| w.seen.served() == Some(pb.as_str()))
        .map(|w| ms(promoted, w.end));
    let last_on_a = writes
        .iter()
        .rev()
        .find(|w| w.seen.served() == Some(pa.as_str()))
        .map(|w| ms(promoted, w.end));
    eprintln!(
        "redis two masters: {}; B promoted at 0 ms, A demoted at {} ms; no client served from/until \
         {gap:?} ms; last SET acknowledged by A at {last_on_a:?} ms, first SET on B at \
         {first_on_b:?} ms",
        tally(&writes),
        ms(promoted, demoted)
    );
    // spliced hears of B's promotion at B's next probe: one probe lag.
    let seen_both = promoted + probe_lag();
    let acked_by_a: Vec<_> = writes
        .iter()
        .filter(|w| w.start > seen_both && w.seen.served() == Some(pa.as_str()))
        .map(|w| ms(promoted, w.end))
        .collect();
    assert!(
        acked_by_a.is_empty(),
        "A acknowledged {} SETs after B was promoted (ms after the promotion): {:?}",
        acked_by_a.len(),
        first(&acked_by_a)
    );
    let served_in_window: Vec<_> = writes
        .iter()
        .filter(|w| w.start > seen_both && w.end < demoted && w.seen.served().is_some())
        .map(|w| (ms(promoted, w.start), w.seen.clone()))
        .collect();
    assert!(
        served_in_window.is_empty(),
        "{} relays were served while A and B both claimed master: {:?}",
        served_in_window.len(),
        first(&served_in_window)
    );
    // A wrong role takes A out at the probe that sees it (no waiting for
    // `fall`): no SET reaches the demoted A later than one probe lag.
    let read_only: Vec<_> = writes
        .iter()
        .filter(|w| w.start > demoted + probe_lag() && matches!(w.seen, Seen::ReadOnly(_)))
        .map(|w| ms(demoted, w.start))
        .collect();
    assert!(
        read_only.is_empty(),
        "{} SETs reached the demoted A (READONLY) later than one probe after the demotion (ms after it): {:?}",
        read_only.len(),
        first(&read_only)
    );
    let first_on_b = first_on_b.expect("no SET reached B after the switch");
    assert!(
        first_on_b as u128 <= (demoted - promoted + failover_bound()).as_millis(),
        "B took {first_on_b} ms to get writes"
    );
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn redis_relays_accepted_before_a_reload_are_killed_on_demotion() {
    let Some(bin) = redis_bin("redis_relays_accepted_before_a_reload_are_killed_on_demotion")
    else {
        return;
    };
    let dir = TempDir::new("e2e-redis-reload-kill");
    let a = Redis::master(&bin, &dir, "redis-a", None);
    let b = Redis::replica_of(&bin, &dir, "redis-b", &a);
    let port = free_port();
    let text = |t: &str| {
        with_defaults(
            t,
            &listener(port, &[a.port, b.port], "primary", "on-down = \"kill\""),
        )
    };
    let proxy = Proxy::start(&dir, "redis-reload-kill", &text("5s"));
    let addr = loopback(port);
    settle(addr, a.port, "the listener reaches master A");

    let mut relays: Vec<RespConn> = (0..10)
        .map(|i| {
            let (c, p) = open_relay(addr, &format!("relay-{i}"));
            assert_eq!(p, a.port, "relay {i} reached port {p}, not master A");
            c
        })
        .collect();
    assert_eq!(a.clients_named("relay-"), 10);
    proxy.reload(&text("4s"));
    for (i, r) in relays.iter_mut().enumerate() {
        let pong = r
            .cmd(&["PING"])
            .unwrap_or_else(|e| panic!("relay {i} after the reload: {e}"));
        assert_eq!(pong.text(), "PONG");
    }

    b.promote();
    a.cmd(&["REPLICAOF", "127.0.0.1", &b.port.to_string()]);
    let demoted = Instant::now();
    let deadline = demoted + failover_bound();
    let mut closed = Vec::new();
    for (i, r) in relays.iter_mut().enumerate() {
        let left = deadline.saturating_duration_since(Instant::now());
        closed.push((
            i,
            r.closed_within(left).map(|_| ms(demoted, Instant::now())),
        ));
    }
    eprintln!(
        "redis reload then demotion: relays closed at (ms after A's demotion) {closed:?}; bound {:?}",
        failover_bound()
    );
    let open: Vec<_> = closed
        .iter()
        .filter(|(_, c)| c.is_none())
        .map(|(i, _)| i)
        .collect();
    assert!(
        open.is_empty(),
        "relays {open:?} to the demoted A (accepted before a reload) were still open {:?} after the demotion",
        failover_bound()
    );
    // A is out for its role, and its last answer's role shows while it is.
    let server = a.addr().to_string();
    let sample = |name: &str, label: (&'static str, &'static str)| {
        proxy.metric(name, &[("listener", "redis"), ("server", &server), label])
    };
    wait_until(
        Duration::from_secs(2),
        "A shows state wrong-role and role replica",
        || {
            sample("spliced_server_state", ("state", "wrong-role")) == Some(1.0)
                && sample("spliced_server_role", ("role", "replica")) == Some(1.0)
        },
    );
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn redis_new_server_waits_for_its_role() {
    let Some(bin) = redis_bin("redis_new_server_waits_for_its_role") else {
        return;
    };
    let dir = TempDir::new("e2e-redis-new-server");
    let a = Redis::master(&bin, &dir, "redis-a", None);
    let b = Redis::replica_of(&bin, &dir, "redis-b", &a);
    let port = free_port();
    let kill = "on-down = \"kill\"";
    let proxy = Proxy::start(
        &dir,
        "redis-new-server",
        &listener(port, &[a.port], "primary", kill),
    );
    let addr = loopback(port);
    settle(addr, a.port, "the listener reaches master A");
    let reads = ClientLoop::spawn(Duration::from_millis(2), move || {
        Seen::of(
            RespConn::connect(addr, CLIENT_TIMEOUT)
                .and_then(|mut c| c.server_port())
                .map(|p| p.to_string()),
        )
    });
    // The replica joins the primary pool: no relay may reach it, not even
    // before its first probe.
    let reloaded = Instant::now();
    proxy.reload(&listener(port, &[a.port, b.port], "primary", kill));
    measure_window(INTERVAL * 5);
    let reads = reads.finish();
    let (pa, pb) = (a.port.to_string(), b.port.to_string());
    let on_b: Vec<_> = reads
        .iter()
        .filter(|r| r.seen.served() == Some(pb.as_str()))
        .map(|r| ms(reloaded, r.start))
        .collect();
    eprintln!(
        "redis new server: {}; {} reached the replica B added by the reload",
        tally(&reads),
        on_b.len()
    );
    assert!(
        on_b.is_empty(),
        "{} relays reached the replica B added to a primary pool (ms after the reload): {:?}",
        on_b.len(),
        first(&on_b)
    );
    let failed: Vec<_> = reads
        .iter()
        .filter(|r| r.seen.served() != Some(pa.as_str()))
        .map(|r| (ms(reloaded, r.start), r.seen.clone()))
        .collect();
    assert!(
        failed.is_empty(),
        "clients of A failed across the reload: {:?}",
        first(&failed)
    );
}

#[test]
#[ignore = "starts real servers: make e2e"]
fn redis_least_conn_counts_relays_from_before_a_reload() {
    let Some(bin) = redis_bin("redis_least_conn_counts_relays_from_before_a_reload") else {
        return;
    };
    let dir = TempDir::new("e2e-redis-leastconn");
    let a = Redis::master(&bin, &dir, "redis-a", None);
    let mut b = Redis::on_port(&bin, &dir, "redis-b", free_port(), None);
    let port = free_port();
    let text = |t: &str| {
        with_defaults(
            t,
            &listener(port, &[a.port, b.port], "any", "balance = \"least-conn\""),
        )
    };
    let proxy = Proxy::start(&dir, "redis-leastconn", &text("5s"));
    let addr = loopback(port);
    settle(addr, a.port, "the listener reaches A (B does not run)");

    let mut old = Vec::new();
    for i in 0..10 {
        let (c, p) = open_relay(addr, &format!("old-{i}"));
        assert_eq!(p, a.port, "relay old-{i} reached port {p}, not A");
        old.push(c);
    }
    proxy.reload(&text("4s"));
    b.start();
    let started = Instant::now();
    wait_until(
        failover_bound() + Duration::from_secs(1),
        "a relay reaches B",
        || port_via(addr) == Some(b.port),
    );
    let up_after = started.elapsed();
    // The connections of that wait are closed; let spliced count them out.
    let b_label = b.addr().to_string();
    wait_until(
        Duration::from_secs(5),
        "spliced counts no relay on B",
        || {
            proxy.metric(
                "spliced_server_connections_active",
                &[("listener", "redis"), ("server", &b_label)],
            ) == Some(0.0)
        },
    );
    let mut new = Vec::new();
    let mut ports = Vec::new();
    for i in 0..10 {
        let (c, p) = open_relay(addr, &format!("new-{i}"));
        ports.push(p);
        new.push(c);
    }
    let (on_a, on_b) = (a.clients_named("new-"), b.clients_named("new-"));
    eprintln!(
        "redis least-conn across a reload: B took relays {up_after:?} after it started; of 10 new \
         relays, CLIENT LIST counts {on_a} on A and {on_b} on B (ports {ports:?}); A holds {} old",
        a.clients_named("old-")
    );
    assert_eq!(
        (on_a, on_b),
        (0, 10),
        "least-conn must count A's 10 relays from before the reload"
    );
    drop(old);
}
