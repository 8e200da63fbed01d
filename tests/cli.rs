//! The `spliced` binary: help and version, one-line errors on bad input,
//! the SIGTERM drain (every engine) and SIGHUP (`cli/signals.rs`), and
//! `spliced bench --quick` (`cli/bench.rs`).

#[macro_use]
mod common;

use std::net::{SocketAddr, TcpListener};
use std::process::Command;
use std::time::Duration;

use common::*;

#[path = "cli/bench.rs"]
mod bench;
#[path = "cli/signals.rs"]
mod signals;

#[test]
fn help_and_version_exit_zero() {
    for args in [
        &["--help"][..],
        &["run", "--help"],
        &["bench", "--help"],
        &["--version"],
    ] {
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

/// Runs `spliced ARGS`, which must exit 2 at once with exactly one stderr
/// line, `spliced: error: ...`, containing every one of `needles`
/// (case-insensitive). Returns the line.
fn assert_error_line(args: &[&str], needles: &[&str]) -> String {
    let (status, _stdout, stderr) = run_bin(args, Duration::from_secs(10));
    let status = status.unwrap_or_else(|| panic!("`spliced {args:?}` kept running"));
    assert_eq!(
        status.code(),
        Some(2),
        "`spliced {args:?}` exited {status}; stderr:\n{stderr}"
    );
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "`spliced {args:?}`: expected exactly one stderr line, got:\n{stderr}"
    );
    let line = lines[0];
    assert!(
        line.starts_with("spliced: error: "),
        "`spliced {args:?}`: the line does not start with 'spliced: error: ': {line}"
    );
    let lower = line.to_lowercase();
    for n in needles {
        assert!(
            lower.contains(&n.to_lowercase()),
            "`spliced {args:?}`: the error does not name '{n}': {line}"
        );
    }
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    assert!(!stderr.contains("backtrace"), "backtrace: {stderr}");
    line.to_string()
}

/// [`assert_error_line`] for `spliced run ARGS`.
fn assert_one_line_error(args: &[&str], needles: &[&str]) {
    let mut full = vec!["run"];
    full.extend_from_slice(args);
    assert_error_line(&full, needles);
}

#[test]
fn usage_errors_carry_clap_details_on_one_line() {
    // The missing argument is named, and the line says where help is.
    assert_error_line(
        &["run"],
        &[
            "the following required arguments were not provided: --listen <ADDR>",
            "spliced run --help",
        ],
    );
    // No command: the commands are named, not the crate description.
    let line = assert_error_line(&[], &["run", "bench", "--help"]);
    assert!(
        !line.contains("zero-copy"),
        "the description as an error: {line}"
    );
    // clap's suggestions stay, on the same line.
    assert_error_line(
        &["runn"],
        &[
            "unrecognized subcommand 'runn'",
            "tip: a similar subcommand exists: 'run'",
        ],
    );
    assert_error_line(
        &["run", "--listne", "127.0.0.1:1"],
        &["'--listne'", "tip: a similar argument exists: '--listen'"],
    );
    assert_error_line(
        &["bench", "--workloads", "bogus"],
        &["'bogus'", "possible values: bulk", "spliced bench --help"],
    );
    assert_error_line(
        &["bench", "--engines", "bogus"],
        &["unknown engine 'bogus'"],
    );
}

#[test]
fn help_shows_defaults_in_whole_sentences() {
    for args in [&["run", "--help"][..], &["bench", "--help"]] {
        let (status, stdout, stderr) = run_bin(args, Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "{args:?}: {status:?}; stderr: {stderr}"
        );
        for line in stdout.lines() {
            let line = line.trim_end();
            // A description cut before its noun ("keeps the kernel's").
            assert!(
                !line.ends_with("'s") && !line.ends_with("...") && !line.ends_with(','),
                "{args:?}: a help line ends mid-sentence: {line}"
            );
        }
    }
    let (_, stdout, _) = run_bin(&["run", "--help"], Duration::from_secs(10));
    let flag_line = |flag: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(flag))
            .unwrap_or_else(|| panic!("run --help has no {flag} line:\n{stdout}"))
            .to_string()
    };
    assert!(
        flag_line("--pipe-size").contains("[default: 1m]"),
        "{}",
        flag_line("--pipe-size")
    );
    assert!(
        flag_line("--max-pipes").contains("[default: 4096]"),
        "{}",
        flag_line("--max-pipes")
    );
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

/// A port no socket of this host uses, on any address of either family:
/// bound once on the dual-stack wildcard without SO_REUSEADDR (which the
/// kernel grants only on a port nothing uses), then released.
fn free_port() -> u16 {
    use socket2::{Domain, Socket, Type};
    let dual = || -> std::io::Result<Socket> {
        let s = Socket::new(Domain::IPV6, Type::STREAM, None)?;
        s.set_only_v6(false)?;
        s.bind(&SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0)).into())?;
        Ok(s)
    };
    let socket = dual().unwrap_or_else(|_| {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        s.bind(&SocketAddr::from(([0, 0, 0, 0], 0)).into()).unwrap();
        s
    });
    let addr = socket.local_addr().unwrap().as_socket().unwrap();
    addr.port()
}

#[test]
fn upstream_that_is_the_listen_address_is_refused() {
    let port = free_port();
    let own = format!("127.0.0.1:{port}");
    assert_one_line_error(
        &["--listen", &own, "--upstream", &own],
        &[
            &format!("upstream {own} is this proxy's own listen address"),
            "loop",
        ],
    );
    // A wildcard listener takes loopback and unspecified upstreams of its port.
    let any = format!("0.0.0.0:{port}");
    assert_one_line_error(&["--listen", &any, "--upstream", &own], &[&own, "loop"]);
    assert_one_line_error(&["--listen", &own, "--upstream", &any], &[&any, "loop"]);
    // One looping upstream among others is refused too.
    let elsewhere = format!("127.0.0.1:{}", free_port());
    assert_one_line_error(
        &[
            "--listen",
            &own,
            "--upstream",
            &elsewhere,
            "--upstream",
            &own,
        ],
        &[&own, "loop"],
    );
    // The same port on another loopback address is no loop.
    let mut cmd = Command::new(bin());
    cmd.args([
        "run",
        "--listen",
        &own,
        "--upstream",
        &format!("127.0.0.2:{port}"),
    ]);
    let proxy = Spliced::spawn(cmd);
    assert_eq!(proxy.addr.port(), port);
}

#[test]
fn effective_limits_are_logged_at_start() {
    let up = echo_server();
    let addr = up.addr.to_string();

    // The relay cap derived from the fd limit, and the pipe size granted.
    // 16 MiB is past the default pipe-max-size: the kernel grants it only
    // with CAP_SYS_RESOURCE. Either way the log must tell.
    const PIPE: u64 = 16 << 20;
    let proxy = Spliced::run(&["--upstream", &addr, "--pipe-size", "16m"]);
    let logs = proxy.logs();
    let cap = logs
        .iter()
        .find(|l| l.contains("INFO") && l.contains("relays at once"))
        .unwrap_or_else(|| panic!("no relay cap line:\n{}", logs.join("\n")));
    assert!(cap.contains("fd limit"), "{cap}");
    let pipe = logs
        .iter()
        .find(|l| l.contains("pipe size") && log_number::<u64>(l, "pipe_size").is_some())
        .unwrap_or_else(|| panic!("no pipe size line:\n{}", logs.join("\n")));
    let granted: u64 = log_number(pipe, "pipe_size").unwrap();
    assert_eq!(
        granted < PIPE,
        pipe.contains("WARN"),
        "granted {granted} of {PIPE}: a warning if and only if less: {pipe}"
    );
    drop(proxy);

    // More relays than the fd limit allows, and a budget below one pipe.
    const ASKED: u64 = 1_000_000_000;
    let proxy = Spliced::run(&[
        "--upstream",
        &addr,
        "--max-conns",
        &ASKED.to_string(),
        "--workers",
        "2",
        "--pipe-budget",
        "1m",
    ]);
    let logs = proxy.logs();
    let lowered = logs
        .iter()
        .find(|l| l.contains("WARN") && l.contains("max_conns lowered"))
        .unwrap_or_else(|| panic!("no warning for --max-conns:\n{}", logs.join("\n")));
    let effective: u64 = log_number(lowered, "max_conns").expect("max_conns=N in the warning");
    assert!(effective < ASKED, "{lowered}");
    assert!(lowered.contains("fd limit"), "{lowered}");
    assert!(
        logs.iter()
            .any(|l| l.contains("WARN") && l.contains("pipe budget")),
        "no warning that a worker's budget share (512 KiB) holds no 1 MiB pipe:\n{}",
        logs.join("\n")
    );
    drop(proxy);

    // A cap within the limit is taken as asked; copy mode checks no pipe.
    let proxy = Spliced::run(&["--upstream", &addr, "--max-conns", "10", "--mode", "copy"]);
    let logs = proxy.logs();
    assert!(
        logs.iter().any(|l| l.contains("INFO")
            && l.contains("at most 10 relays at once")
            && log_number::<u64>(l, "max_conns") == Some(10)),
        "no 'at most 10 relays' line:\n{}",
        logs.join("\n")
    );
    assert!(
        !logs.iter().any(|l| l.contains("pipe size")),
        "copy mode checked pipes:\n{}",
        logs.join("\n")
    );
}

#[test]
fn second_proxy_on_a_taken_port_is_refused() {
    let up = echo_server();
    let addr = up.addr.to_string();
    let first = Spliced::run(&["--upstream", &addr]);
    let taken = first.addr.to_string();
    // The first proxy set SO_REUSEPORT; the second must not share its port.
    assert_one_line_error(
        &["--listen", &taken, "--upstream", &addr],
        &[&taken, "address already in use"],
    );
    let mut client = connect(first.addr);
    round_trip(&mut client, b"first still serves", Duration::from_secs(5));
}

fn ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

#[test]
fn listen_on_port_alone_binds_ipv4_and_ipv6() {
    let up = echo_server();
    let addr = up.addr.to_string();
    for form in [":", "*:"] {
        let port = free_port();
        let mut cmd = Command::new(bin());
        cmd.args([
            "run",
            "--listen",
            &format!("{form}{port}"),
            "--upstream",
            &addr,
        ]);
        let proxy = Spliced::spawn(cmd);
        let mut targets: Vec<SocketAddr> = vec![([127, 0, 0, 1], port).into()];
        if ipv6_loopback() {
            targets.push(format!("[::1]:{port}").parse().unwrap());
        }
        for target in targets {
            let mut client = connect(target);
            round_trip(&mut client, b"hello", Duration::from_secs(5));
        }
        drop(proxy);
    }
}

#[test]
fn check_as_another_user_needs_root() {
    let config = temp_config("cli-check", MINIMAL_CONFIG);
    let root = nix::unistd::geteuid().is_root();
    let mut cmd = if root {
        // As root the test drops to nobody to see the refusal.
        let Some(setpriv) = ["/usr/bin/setpriv", "/bin/setpriv"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
        else {
            println!("skipped: as root this needs setpriv to run check as another user");
            return;
        };
        let mut c = Command::new(setpriv);
        c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(bin());
        c
    } else {
        Command::new(bin())
    };
    let out = cmd
        .args(["check", "--user", "root", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&config);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(out.stdout.is_empty(), "{out:?}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("spliced: error: --user root: testing files as root needs root"),
        "{stderr}"
    );
}
