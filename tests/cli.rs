//! The `spliced` binary: help and version, one-line errors on bad input, and
//! the SIGTERM drain (both engines).

#[macro_use]
mod common;

use std::io::Write;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use nix::sys::signal::Signal;
use spliced::Mode;

both_engines!(
    sigterm_lets_live_relay_finish,
    sigterm_closes_endless_relay_at_drain_timeout,
    second_signal_exits_at_once,
);

#[test]
fn help_and_version_exit_zero() {
    for args in [&["--help"][..], &["run", "--help"], &["--version"]] {
        let (status, stdout, stderr) = run_bin(args, Duration::from_secs(10));
        let status = status.unwrap_or_else(|| panic!("{args:?} did not exit"));
        assert!(
            status.success(),
            "{args:?} exited {status}; stderr: {stderr}"
        );
        assert!(
            !stdout.trim().is_empty(),
            "{args:?} printed nothing on stdout"
        );
    }
    let (_, stdout, _) = run_bin(&["--version"], Duration::from_secs(10));
    assert!(
        stdout.contains(env!("CARGO_PKG_VERSION")),
        "--version does not show {}: {stdout}",
        env!("CARGO_PKG_VERSION")
    );
    let (_, stdout, _) = run_bin(&["run", "--help"], Duration::from_secs(10));
    for flag in [
        "--listen",
        "--upstream",
        "--mode",
        "--idle-timeout",
        "--drain-timeout",
    ] {
        assert!(stdout.contains(flag), "run --help does not mention {flag}");
    }
}

/// Runs `spliced run ARGS`, which must fail at once with one error line on
/// stderr containing every one of `needles` (case-insensitive).
fn assert_one_line_error(args: &[&str], needles: &[&str]) {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    let (status, _stdout, stderr) = run_bin(&full, Duration::from_secs(10));
    let status = status.unwrap_or_else(|| panic!("`spliced {full:?}` kept running"));
    assert!(!status.success(), "`spliced {full:?}` exited 0");
    assert!(
        status.code().is_some(),
        "`spliced {full:?}` died of a signal ({status})"
    );
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "`spliced {full:?}`: expected exactly one stderr line, got:\n{stderr}"
    );
    let line = lines[0];
    assert!(
        line.starts_with("spliced: error:") || line.starts_with("error:"),
        "`spliced {full:?}`: the line does not start with 'spliced: error:' / 'error:': {line}"
    );
    let lower = line.to_lowercase();
    for n in needles {
        assert!(
            lower.contains(&n.to_lowercase()),
            "`spliced {full:?}`: the error does not name '{n}': {line}"
        );
    }
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(!stderr.contains("backtrace"), "backtrace: {stderr}");
}

#[test]
fn bare_number_duration_is_rejected_naming_the_flag() {
    let up = refused_addr().to_string();
    assert_one_line_error(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up,
            "--idle-timeout",
            "30",
        ],
        &["idle-timeout", "30"],
    );
    assert_one_line_error(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up,
            "--fin-timeout",
            "5x",
        ],
        &["fin-timeout", "5x"],
    );
}

#[test]
fn unparsable_addresses_are_rejected() {
    let up = refused_addr().to_string();
    assert_one_line_error(&["--listen", "nonsense", "--upstream", &up], &["nonsense"]);
    assert_one_line_error(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:notaport",
        ],
        &["notaport"],
    );
}

#[test]
fn missing_upstream_is_rejected() {
    assert_one_line_error(&["--listen", "127.0.0.1:0"], &["upstream"]);
}

#[test]
fn bad_mode_is_rejected() {
    let up = refused_addr().to_string();
    assert_one_line_error(
        &[
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &up,
            "--mode",
            "zerocopy",
        ],
        &["zerocopy"],
    );
}

#[test]
fn port_in_use_is_rejected() {
    // A plain std listener: no SO_REUSEPORT, so the proxy cannot share it.
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let up = refused_addr().to_string();
    assert_one_line_error(&["--listen", &addr, "--upstream", &up], &["in use"]);
    drop(taken);
}

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
    let logs = proxy.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("relay closed") && l.contains("reason=eof")),
        "no 'relay closed ... reason=eof' line:\n{}",
        logs.join("\n")
    );
}

fn sigterm_closes_endless_relay_at_drain_timeout(mode: Mode) {
    const DRAIN: Duration = Duration::from_secs(1);
    let up = echo_server();
    let addr = up.addr.to_string();
    let mut proxy = Spliced::run(&[
        "--upstream",
        &addr,
        "--mode",
        mode.as_str(),
        "--drain-timeout",
        "1s",
    ]);

    let mut client = connect(proxy.addr);
    round_trip(&mut client, b"still here", Duration::from_secs(5));

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
    let logs = proxy.logs();
    assert!(
        logs.iter()
            .any(|l| l.contains("relay closed") && l.contains("reason=shutdown")),
        "no 'relay closed ... reason=shutdown' line:\n{}",
        logs.join("\n")
    );
}

fn second_signal_exits_at_once(mode: Mode) {
    let up = echo_server();
    let addr = up.addr.to_string();
    let mut proxy = Spliced::run(&[
        "--upstream",
        &addr,
        "--mode",
        mode.as_str(),
        "--drain-timeout",
        "30s",
    ]);
    let mut client = connect(proxy.addr);
    round_trip(&mut client, b"still here", Duration::from_secs(5));

    proxy.signal(Signal::SIGTERM);
    wait_refused(proxy.addr);
    assert!(proxy.try_wait().is_none(), "exited with a relay still live");
    proxy.signal(Signal::SIGINT);
    let status = proxy.wait_exit(Duration::from_secs(2));
    assert!(status.is_some(), "a second signal did not end the process");
    let (_ending, _) = expect_closed(&mut client, Duration::from_secs(2));
}
