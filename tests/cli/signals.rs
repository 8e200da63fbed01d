//! The SIGTERM drain (every engine): a live relay finishes, an endless
//! one is closed at the drain timeout, a second signal exits at once; and
//! SIGHUP without a config file, which keeps serving.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use spliced::Mode;

use crate::common::*;

both_engines!(
    sigterm_lets_live_relay_finish,
    sigterm_closes_endless_relay_at_drain_timeout,
    second_signal_exits_at_once,
);

/// Waits until connecting to `addr` is refused (the listeners are closed).
fn wait_refused(addr: std::net::SocketAddr) {
    wait_until(
        Duration::from_secs(3),
        "new connections are refused",
        || match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
            Ok(_) => false,
        },
    );
}

fn sigterm_lets_live_relay_finish(mode: Mode) {
    const REPLY: usize = 2 * MIB;
    let (got_tx, got_request) = mpsc::channel();
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let up = serve(move |mut s: TcpStream| {
        let req = read_exact_within(&mut s, 4, Duration::from_secs(10)).unwrap();
        got_tx.send(req).unwrap();
        // Answer only once the test says so (after SIGTERM).
        go_rx
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(20))
            .unwrap();
        s.write_all(&pattern(9, REPLY)).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let _ = read_to_eof(&mut s, Duration::from_secs(10));
    });
    let addr = up.addr.to_string();
    let mut proxy = Spliced::run(&[
        "--upstream",
        &addr,
        "--mode",
        mode.as_str(),
        "--workers",
        "2",
        "--drain-timeout",
        "20s",
    ]);

    let mut client = connect(proxy.addr);
    client.write_all(b"ping").unwrap();
    assert_eq!(
        got_request.recv_timeout(Duration::from_secs(5)).unwrap(),
        b"ping"
    );

    proxy.signal(Signal::SIGTERM);
    wait_refused(proxy.addr);
    assert!(proxy.try_wait().is_none(), "exited with a relay still live");

    go_tx.send(()).unwrap();
    let reply = read_to_eof(&mut client, Duration::from_secs(10)).expect("reply after SIGTERM");
    assert_eq!(reply.len(), REPLY);
    assert!(reply == pattern(9, REPLY), "reply differs");
    client.shutdown(Shutdown::Write).unwrap();
    let ended = Instant::now();

    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .expect("still running after its last relay ended");
    assert!(status.success(), "exit status {status}");
    assert!(
        ended.elapsed() < Duration::from_secs(5),
        "exited {:?} after the relay ended",
        ended.elapsed()
    );
    assert_relay_closed_logged(&proxy, "eof");
}

fn sigterm_closes_endless_relay_at_drain_timeout(mode: Mode) {
    const DRAIN: Duration = Duration::from_secs(1);
    let (_up, mut proxy, mut client) = relaying_to_an_echo(mode, "1s");

    proxy.signal(Signal::SIGTERM);
    let signalled = Instant::now();
    let (_ending, _) = expect_closed(&mut client, Duration::from_secs(5));
    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .expect("still running 5 s after the drain timeout");
    let took = signalled.elapsed();
    assert!(status.success(), "exit status {status}");
    assert!(
        took + Duration::from_millis(50) >= DRAIN,
        "exited after {took:?}, before the {DRAIN:?} drain timeout"
    );
    assert!(
        took <= DRAIN + Duration::from_millis(1500),
        "exited after {took:?}, drain timeout {DRAIN:?}"
    );
    assert_relay_closed_logged(&proxy, "shutdown");
}

/// An echo server, spliced relaying to it with `mode` and `drain` as its
/// drain timeout, and a client whose relay has carried a round trip.
fn relaying_to_an_echo(mode: Mode, drain: &str) -> (Server, Spliced, TcpStream) {
    let up = echo_server();
    let addr = up.addr.to_string();
    let proxy = Spliced::run(&[
        "--upstream",
        &addr,
        "--mode",
        mode.as_str(),
        "--drain-timeout",
        drain,
    ]);
    let mut client = connect(proxy.addr);
    round_trip(&mut client, b"still here", Duration::from_secs(5));
    (up, proxy, client)
}

/// spliced logged a `relay closed` line with `reason`.
fn assert_relay_closed_logged(proxy: &Spliced, reason: &str) {
    let logs = proxy.logs();
    let want = format!("reason={reason}");
    assert!(
        logs.iter()
            .any(|l| l.contains("relay closed") && l.contains(&want)),
        "no 'relay closed ... {want}' line:\n{}",
        logs.join("\n")
    );
}

fn second_signal_exits_at_once(mode: Mode) {
    let (_up, mut proxy, mut client) = relaying_to_an_echo(mode, "30s");

    proxy.signal(Signal::SIGTERM);
    wait_refused(proxy.addr);
    assert!(proxy.try_wait().is_none(), "exited with a relay still live");
    proxy.signal(Signal::SIGINT);
    let status = proxy.wait_exit(Duration::from_secs(2));
    assert!(status.is_some(), "a second signal did not end the process");
    let (_ending, _) = expect_closed(&mut client, Duration::from_secs(2));
}

#[test]
fn sighup_without_a_config_file_keeps_serving() {
    let up = echo_server();
    let addr = up.addr.to_string();
    let mut proxy = Spliced::run(&["--upstream", &addr]);
    let mut before = connect(proxy.addr);
    round_trip(&mut before, b"before", Duration::from_secs(5));

    proxy.signal(Signal::SIGHUP);
    wait_until(
        Duration::from_secs(5),
        "the refused reload is logged",
        || {
            proxy.try_wait().is_none()
                && proxy.logs().iter().any(|l| {
                    l.contains("ERROR")
                        && l.contains("started without --config: there is no file to re-read")
                })
                && proxy
                    .logs()
                    .iter()
                    .any(|l| l.contains("reload refused; still serving the previous config"))
        },
    );
    assert!(proxy.try_wait().is_none(), "SIGHUP ended the process");
    // Both the live relay and a new one still work.
    round_trip(&mut before, b"after", Duration::from_secs(5));
    let mut after = connect(proxy.addr);
    round_trip(&mut after, b"new relay", Duration::from_secs(5));
    assert!(proxy.try_wait().is_none(), "exited after SIGHUP");
    drop((before, after));

    proxy.signal(Signal::SIGTERM);
    let status = proxy
        .wait_exit(Duration::from_secs(5))
        .expect("still running 5 s after SIGTERM");
    assert!(status.success(), "exit status {status} after SIGTERM");
}
