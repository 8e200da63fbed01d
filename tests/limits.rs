//! A listener's limits and access list over loopback: at max-conns clients
//! wait in the backlog, past max-conns-per-source and outside allow/deny
//! they are reset before any upstream connect, and every refusal is
//! counted. The process's fd budget under a low RLIMIT_NOFILE: pipes never
//! take an accepted client's upstream socket, and the proxy's own shortage
//! is never blamed on a server.

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

// ---------------------------------------------------------------------------
// The fd budget: sockets of accepted clients come first, pipes share what
// is left, and the proxy's own shortage is never a server's failure.

/// The fd limit of the proxy in the budget tests.
const NOFILE: u32 = 256;
/// Clients opened after the streaming relays, up to the relay cap.
const LATE: usize = 6;
/// Bytes each streaming client sends (and gets back): more than the
/// proxy's socket toward a client that does not read can buffer (its send
/// buffer grows to at most `tcp_wmem`'s 4 MiB), so the rest backs up into
/// the proxy's pipe or copy buffer.
const STREAM: usize = 6 << 20;

/// `spliced run` under `ulimit -n NOFILE` with two workers and an admin
/// endpoint, as `user` if given (root drops to it after binding).
fn proxy_with_nofile(
    mode: Mode,
    upstream: SocketAddr,
    user: Option<&str>,
) -> (Spliced, SocketAddr) {
    let admin = refused_addr();
    let (upstream, admin_arg) = (upstream.to_string(), admin.to_string());
    let mut args = vec![
        "--upstream",
        &upstream,
        "--mode",
        mode.as_str(),
        "--workers",
        "2",
        "--admin",
        &admin_arg,
    ];
    if let Some(user) = user {
        args.extend(["--user", user]);
    }
    (Spliced::run_with_nofile(NOFILE, &args), admin)
}

/// `GET /metrics` from the admin endpoint: `name{labels}` → value.
fn metrics(admin: SocketAddr) -> std::io::Result<std::collections::HashMap<String, f64>> {
    let mut s = TcpStream::connect(admin)?;
    s.set_read_timeout(Some(T))?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n")?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok(body
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').expect("sample: key value");
            (key.to_string(), value.parse().expect("a number"))
        })
        .collect())
}

/// The sum of every sample of `name` whose labels contain `labels`.
fn sum(m: &std::collections::HashMap<String, f64>, name: &str, labels: &str) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            k.split_once('{')
                .is_some_and(|(n, rest)| n == name && rest.contains(labels))
                || k.as_str() == name
        })
        .map(|(_, v)| v)
        .sum()
}

/// How long the budget tests wait for the proxy's counters: eighty relays
/// backing up megabytes each take a while on a busy machine.
const SLOW: Duration = Duration::from_secs(30);

/// Polls `/metrics` until `cond` holds; panics naming `what` with the last
/// relay, pipe and close samples and the proxy's log if it does not within
/// `SLOW`.
fn wait_metrics(
    proxy: &Spliced,
    admin: SocketAddr,
    what: &str,
    mut cond: impl FnMut(&std::collections::HashMap<String, f64>) -> bool,
) -> std::collections::HashMap<String, f64> {
    let deadline = std::time::Instant::now() + SLOW;
    loop {
        let m = metrics(admin);
        if let Ok(m) = &m {
            if cond(m) {
                return m.clone();
            }
        }
        if std::time::Instant::now() >= deadline {
            let shown = match m {
                Ok(m) => {
                    let mut shown: Vec<String> = m
                        .iter()
                        .filter(|(k, v)| {
                            **v != 0.0
                                && ["active", "pipes", "closed", "fallbacks", "pauses", "errors"]
                                    .iter()
                                    .any(|w| k.contains(w))
                        })
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect();
                    shown.sort();
                    shown.join("\n")
                }
                Err(e) => format!("GET /metrics failed: {e}"),
            };
            panic!(
                "timed out after {SLOW:?} waiting until {what}; metrics:\n{shown}\nproxy log:\n{}",
                proxy.logs().join("\n")
            );
        }
        poll_pause();
    }
}

/// A client whose receive buffer is small, so what the upstream sends back
/// piles up in the proxy (in a pipe, when it splices).
fn slow_reader(proxy: SocketAddr) -> TcpStream {
    let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    s.set_recv_buffer_size(4096).unwrap();
    s.connect_timeout(&proxy.into(), T).unwrap();
    let c: TcpStream = s.into();
    c.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    c
}

/// Streaming relays fill the relay cap but a few, their directions backed
/// up (holding pipes when they splice); then clients up to the cap. Every
/// accepted client must get its upstream and its bytes back exactly, no
/// client may close as connect-failed or local-error, no pipe2 may run out
/// of fds, and the healthy upstream must stay up.
fn budget_scenario(mode: Mode, user: Option<&str>) {
    let _serial = serial();
    let up = echo_server();
    let (proxy, admin) = proxy_with_nofile(mode, up.addr, user);
    if let Some(user) = user {
        let uid = nix::unistd::User::from_name(user)
            .unwrap()
            .unwrap_or_else(|| panic!("no user {user}"))
            .uid;
        wait_until(T, "the proxy dropped root", || {
            let status = std::fs::read_to_string(format!("/proc/{}/status", proxy.pid())).unwrap();
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .is_some_and(|l| l.split_whitespace().skip(1).all(|v| v == uid.to_string()))
        });
    }
    // The cap line follows the "listening on" line the spawn waited for.
    let cap_line = wait_for(T, "the relay cap line", || {
        proxy
            .logs()
            .into_iter()
            .find(|l| l.contains("relays at once"))
    });
    let cap_line = cap_line.as_str();
    let cap: usize = log_number(cap_line, "max_conns").expect("max_conns=N");
    let pipe_fds: usize = log_number(cap_line, "pipe_fds").expect("pipe_fds=N");
    assert!(
        2 * cap + pipe_fds <= NOFILE as usize,
        "sockets and pipes may pass the limit: {cap_line}"
    );
    let streaming = cap - LATE;

    // Streaming relays: each client writes STREAM bytes and reads nothing
    // yet, so both directions back up inside the proxy.
    let mut clients = Vec::new();
    let mut writers = Vec::new();
    for i in 0..streaming {
        let c = slow_reader(proxy.addr);
        let mut w = c.try_clone().unwrap();
        writers.push(std::thread::spawn(move || {
            let sent = send_stream(&mut w, i as u64, STREAM, 64 * 1024, None);
            let _ = w.shutdown(std::net::Shutdown::Write);
            sent
        }));
        clients.push(c);
    }
    wait_metrics(&proxy, admin, "every streaming relay is live", |m| {
        sum(m, "spliced_connections_active", "") == streaming as f64
    });
    if mode == Mode::Splice {
        // The pipes' share is used up: more directions want one than fit,
        // so some fell back (a pipe-cap fallback is counted only when the
        // share is full). The pipes never hold more than their share. (Their
        // count is not compared with the share for equality: directions
        // that empty their pipe give it back and take another, so at any
        // one scrape a pipe may be between its owners.)
        wait_metrics(&proxy, admin, "the pipes used up their fd share", |m| {
            sum(m, "spliced_splice_fallbacks_total", "reason=\"pipe-cap\"") > 0.0
        });
        let m = metrics(admin).expect("scrape /metrics");
        let pipes = sum(&m, "spliced_pipes_in_use", "") + sum(&m, "spliced_pipes_pooled", "");
        assert!(
            2.0 * pipes <= pipe_fds as f64,
            "{pipes} pipes hold more than the share of {pipe_fds} fds"
        );
    }

    // Clients up to the cap: all held at once, each echoed byte-exact.
    let late: Vec<TcpStream> = (0..LATE).map(|_| connect(proxy.addr)).collect();
    for (i, mut c) in late.into_iter().enumerate() {
        let seed = 1000 + i as u64;
        let mut w = c.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            w.write_all(&pattern(seed, 256 * 1024)).unwrap();
            w.shutdown(std::net::Shutdown::Write).unwrap();
        });
        let back = digest_to_eof(&mut c, SLOW)
            .unwrap_or_else(|e| panic!("late client {i}: {e}\n{}", proxy.logs().join("\n")));
        writer.join().unwrap();
        assert_eq!(back, expected_digest(seed, 256 * 1024), "late client {i}");
    }

    // The streaming relays deliver every byte once read.
    for (i, (mut c, writer)) in clients.into_iter().zip(writers).enumerate() {
        let back = digest_to_eof(&mut c, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("streaming client {i}: {e}"));
        let sent = writer.join().unwrap().expect("streaming client's writes");
        assert_eq!(back, sent, "streaming client {i}");
    }

    let total = (streaming + LATE) as f64;
    let m = wait_metrics(&proxy, admin, "every relay closed", |m| {
        sum(m, "spliced_connections_closed_total", "") == total
    });
    let log = proxy.logs().join("\n");
    let closed = |reason: &str| {
        sum(
            &m,
            "spliced_connections_closed_total",
            &format!("reason=\"{reason}\""),
        )
    };
    assert_eq!(closed("eof"), total, "{log}");
    assert_eq!(closed("connect-failed"), 0.0, "{log}");
    assert_eq!(closed("local-error"), 0.0, "{log}");
    assert_eq!(sum(&m, "spliced_local_errors_total", ""), 0.0, "{log}");
    assert_eq!(sum(&m, "spliced_upstream_connect_failures_total", ""), 0.0);
    assert_eq!(
        sum(&m, "spliced_splice_fallbacks_total", "reason=\"no-pipe\""),
        0.0,
        "pipe2 ran out of fds: the pipes passed their share\n{log}"
    );
    assert_eq!(
        sum(&m, "spliced_accept_pauses_total", "reason=\"fds\""),
        0.0,
        "accept ran out of fds\n{log}"
    );
    assert_eq!(
        sum(&m, "spliced_server_up", ""),
        1.0,
        "the healthy upstream was marked down\n{log}"
    );
    assert_eq!(up.accepted(), streaming + LATE);
    assert!(!log.contains("Too many open files"), "{log}");
}

fn fd_budget_keeps_every_accepted_clients_upstream(mode: Mode) {
    budget_scenario(mode, None);
}

fn fd_budget_holds_for_an_unprivileged_proxy(mode: Mode) {
    if !nix::unistd::geteuid().is_root() {
        // Already unprivileged: the scenario above is this one.
        return budget_scenario(mode, None);
    }
    budget_scenario(mode, Some("nobody"));
}

/// A proxy out of fds for reasons of its own (clients it holds while it
/// waits for their first packet, which the relay cap does not count) fails
/// the upstream connect of the next client: that client is closed with
/// `local-error`, the failure is counted as the proxy's own, and the healthy
/// server is neither blamed nor marked down.
fn a_local_shortage_closes_the_client_and_blames_no_server(mode: Mode) {
    const LIMIT: usize = 64;
    let _serial = serial();
    let up = echo_server();
    let dir =
        std::env::temp_dir().join(format!("spliced-local-error-{mode}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("spliced.toml");
    std::fs::write(
        &config,
        format!(
            "[global]\nworkers = 1\n\n[[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\n\
             mode = \"{mode}\"\nprotocol = \"postgres\"\nfirst-packet-timeout = \"60s\"\n\n\
             [listener.pool]\nservers = [\"{}\"]\n",
            up.addr
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new("/bin/sh");
    cmd.arg("-c")
        .arg(format!("ulimit -n {LIMIT} && exec \"$0\" \"$@\""))
        .arg(bin())
        .args(["run", "--name", "local", "--config"])
        .arg(&config)
        .env("RUNTIME_DIRECTORY", &dir);
    let proxy = Spliced::spawn(cmd);

    // Clients that send nothing hold the proxy's fds until one is left (a
    // client waiting for its first packet is not counted in the relay cap).
    // Only fd numbers below the limit count: one the proxy inherited above
    // it takes no room.
    let held = || {
        std::fs::read_dir(format!("/proc/{}/fd", proxy.pid()))
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<usize>().ok())
            .filter(|&fd| fd < LIMIT)
            .count()
    };
    let mut silent = Vec::new();
    while held() < LIMIT - 1 {
        let before = held();
        silent.push(connect(proxy.addr));
        wait_until(T, "the silent client is accepted", || held() == before + 1);
    }
    // The next client is accepted on the last fd; its upstream socket
    // cannot be had.
    let mut c = connect(proxy.addr);
    // An SSLRequest: a first packet that is no CancelRequest. No server
    // answers it: spliced does, as a PostgreSQL server without TLS, and
    // after the startup packet tells the client why it is turned away.
    c.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap();
    let n = read_exact_within(&mut c, 1, T).expect("the answer to the SSLRequest");
    assert_eq!(n, b"N");
    let startup = b"\0\0\0\x12\0\x03\0\0user\0app\0\0";
    assert_eq!(startup.len(), 0x12);
    c.write_all(startup).unwrap();
    let (back, ending) = read_until_closed(&mut c, T);
    let message = b"spliced: out of file descriptors or memory for listener db";
    let mut error = b"E\0\0\0\0SFATAL\0VFATAL\0C53000\0M".to_vec();
    error.extend_from_slice(message);
    error.extend_from_slice(b"\0\0");
    let len = (error.len() - 1) as u32;
    error[1..5].copy_from_slice(&len.to_be_bytes());
    assert_eq!(back, error, "{}", String::from_utf8_lossy(&back));
    assert_eq!(ending, Ending::Eof);

    let stats = || {
        let out = std::process::Command::new(bin())
            .args(["stats", "--name", "local"])
            .env("RUNTIME_DIRECTORY", &dir)
            .env_remove("RUST_LOG")
            .output()
            .expect("run spliced stats");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut table = String::new();
    wait_until(T, "the close is counted", || {
        table = stats();
        table.contains("local-error=1")
    });
    // The warning follows the counter: log lines reach stderr through a
    // writer thread, within milliseconds.
    wait_until(T, "the warning naming the proxy's own shortage", || {
        proxy
            .logs()
            .iter()
            .any(|l| l.contains("for the proxy's own want of resources"))
    });
    let log = proxy.logs().join("\n");
    assert!(!table.contains("connect-failed"), "{table}");
    // db: ACTIVE ACCEPTED CONN/s C>U/s U>C/s SPLICE FALLBK CONN-FAIL LOCAL-ERR HELD
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("db "))
        .unwrap_or_else(|| panic!("no row for db:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        row[row.len() - 3..row.len() - 1],
        ["0", "1"],
        "CONN-FAIL, LOCAL-ERR:\n{table}"
    );
    // The server row, its cells found by the header's names (every cell
    // before FAILS is one word here).
    let header: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("SERVER "))
        .unwrap_or_else(|| panic!("no server header:\n{table}"))
        .split_whitespace()
        .collect();
    let column = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let server: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with(&up.addr.to_string()))
        .unwrap_or_else(|| panic!("no row for the server:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(
        server[column("STATE")],
        "up",
        "the server was blamed:\n{table}\n{log}"
    );
    assert_eq!(
        server[column("FAILS")],
        "0",
        "a connect failure was counted:\n{table}"
    );
    assert!(
        log.contains("for the proxy's own want of resources"),
        "no warning naming the proxy's own shortage:\n{log}"
    );
    assert!(!log.contains("marked down"), "{log}");
    assert_eq!(up.accepted(), 0);

    // With fds free again the same server serves.
    drop(silent);
    wait_until(T, "the silent clients' fds are free", || held() < LIMIT / 2);
    let mut ok = connect(proxy.addr);
    ok.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]).unwrap();
    let back = read_exact_within(&mut ok, 8, T).expect("echo through the same server");
    assert_eq!(back, [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f]);
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
}

both_engines!(
    fd_budget_keeps_every_accepted_clients_upstream,
    fd_budget_holds_for_an_unprivileged_proxy,
    a_local_shortage_closes_the_client_and_blames_no_server,
);
