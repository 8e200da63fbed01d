//! The uring loop's own facts: a copy relay's reads really go through
//! receives armed on the ring and its writes through batches (every relay
//! case also runs on it, through `both_engines!`), and splice directions
//! stay with splice(2).

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use spliced::{EventLoop, Mode};

const T: Duration = Duration::from_secs(20);
const CLIENTS: usize = 40;
const ROUNDS: usize = 5;

/// Every client writes its message before any reply is read, so one wakeup
/// reports many sockets; each round trip through a copy relay is four
/// batched calls at least (two reads, two writes).
fn many_clients_round_trip(mode: Mode, event_loop: EventLoop) -> spliced::Stats {
    let up = echo_server();
    let h = proxy(mode, vec![up.addr], |c| c.event_loop = event_loop);
    let mut clients: Vec<_> = (0..CLIENTS).map(|_| connect(h.local_addr())).collect();
    for round in 0..ROUNDS {
        for (i, c) in clients.iter_mut().enumerate() {
            std::io::Write::write_all(c, &pattern((round * CLIENTS + i) as u64, 64)).unwrap();
        }
        for (i, c) in clients.iter_mut().enumerate() {
            let back = read_exact_within(c, 64, T).expect("reply");
            assert_eq!(back, pattern((round * CLIENTS + i) as u64, 64));
        }
    }
    drop(clients);
    wait_until(T, "every relay closed", || h.stats().relays_active == 0);
    h.stats()
}

#[test]
fn the_uring_loop_reads_copy_relays_through_armed_receives_and_batches_their_writes() {
    let s = many_clients_round_trip(Mode::Copy, EventLoop::Uring);
    let messages = (CLIENTS * ROUNDS) as u64;
    eprintln!(
        "{} armed receives answered; {} submissions carried {} sends ({:.1} each) for {messages} round trips",
        s.ring_receives,
        s.ring_batches,
        s.ring_calls,
        s.ring_calls as f64 / s.ring_batches.max(1) as f64
    );
    // Every message, each way, was read by a receive the ring answered,
    // and each relay's two EOFs too, but for the first message each way:
    // the pump that follows the connect reads with plain recv(2) calls
    // before it arms any receive, and the client's first message (and, on
    // a quick server, its echo) may be there for it.
    let first_reads = 2 * CLIENTS as u64;
    assert!(
        s.ring_receives >= 2 * messages + 2 * CLIENTS as u64 - first_reads,
        "{s:#?}"
    );
    // Forty sockets answered at once fill submissions of several sends.
    assert!(s.ring_batches > 0, "{s:#?}");
    assert!(s.ring_calls >= 2 * s.ring_batches, "{s:#?}");
    assert_eq!(s.bytes_copied, 2 * 64 * messages);
}

#[test]
fn the_epoll_loop_uses_no_ring() {
    let s = many_clients_round_trip(Mode::Copy, EventLoop::Epoll);
    assert_eq!(
        (s.ring_batches, s.ring_calls, s.ring_receives),
        (0, 0, 0),
        "{s:#?}"
    );
}

/// auto relays keep epoll's readiness on the uring loop: their directions
/// may splice, and a receive armed on the source would race a splice.
#[test]
fn auto_relays_on_the_uring_loop_arm_no_receive() {
    let s = many_clients_round_trip(Mode::Auto, EventLoop::Uring);
    let messages = (CLIENTS * ROUNDS) as u64;
    assert_eq!(s.ring_receives, 0, "{s:#?}");
    assert_eq!(
        s.bytes_copied + s.bytes_spliced,
        2 * 64 * messages,
        "{s:#?}"
    );
}

#[test]
fn splice_directions_on_the_uring_loop_keep_splicing() {
    let s = many_clients_round_trip(Mode::Splice, EventLoop::Uring);
    let messages = (CLIENTS * ROUNDS) as u64;
    assert_eq!(s.bytes_spliced, 2 * 64 * messages, "{s:#?}");
    assert_eq!(
        (s.ring_calls, s.ring_receives),
        (0, 0),
        "splice is not batched: {s:#?}"
    );
}

/// `--loop uring` and `[global] loop` reach the workers; the line that says
/// which loop runs is logged once.
#[test]
fn the_cli_and_the_config_file_choose_the_loop() {
    let up = echo_server();
    let upstream = up.addr.to_string();
    let s = Spliced::run(&["--loop", "uring", "--mode", "copy", "--upstream", &upstream]);
    let mut c = connect(s.addr);
    round_trip(&mut c, b"through the ring", T);
    let lines = s.logs();
    let said: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("the workers run the uring loop"))
        .collect();
    assert_eq!(said.len(), 1, "{lines:#?}");

    let dir = std::env::temp_dir().join(format!("spliced-uring-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("spliced.toml");
    std::fs::write(
        &file,
        format!(
            "[global]\nloop = \"uring\"\n\n[[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\nmode = \"copy\"\n\n[listener.pool]\nservers = [\"{upstream}\"]\n"
        ),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(bin());
    cmd.args(["run", "--workers", "1", "--config"])
        .arg(&file)
        .env_remove("SPLICED_LOOP");
    let s = Spliced::spawn(cmd);
    let mut c = connect(s.addr);
    round_trip(&mut c, b"from the file", T);
    assert!(
        s.logs()
            .iter()
            .any(|l| l.contains("the workers run the uring loop")),
        "{:#?}",
        s.logs()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn an_unknown_loop_is_one_clear_line() {
    let (status, _, stderr) = run_bin(
        &[
            "run",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--loop",
            "kqueue",
        ],
        T,
    );
    assert!(!status.unwrap().success());
    assert!(
        stderr.contains("unknown loop 'kqueue' (expected epoll or uring)"),
        "{stderr}"
    );
}

/// Where io_uring is forbidden (here: a seccomp filter answering EPERM to
/// io_uring_setup, as the default profiles of Docker and containerd do),
/// `--loop uring` says so once and relays on the epoll loop. Needs the
/// python3-seccomp package (`make deps`); run by `make e2e`.
#[test]
#[ignore = "needs python3-seccomp: make e2e"]
fn where_io_uring_is_forbidden_the_epoll_loop_runs_and_says_so_once() {
    const DENY: &str = "import errno, os, sys, seccomp\n\
        f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)\n\
        f.add_rule(seccomp.ERRNO(errno.EPERM), 'io_uring_setup')\n\
        f.load()\n\
        os.execv(sys.argv[1], sys.argv[1:])\n";
    // The system Python, which Debian's python3-seccomp is for.
    let probe = std::process::Command::new("/usr/bin/python3")
        .args(["-c", "import seccomp"])
        .status();
    assert!(
        probe.is_ok_and(|s| s.success()),
        "python3 cannot import seccomp: install python3-seccomp (make deps)"
    );
    let up = echo_server();
    let mut cmd = std::process::Command::new("/usr/bin/python3");
    cmd.args(["-c", DENY, bin(), "run", "--listen", "127.0.0.1:0"])
        .args(["--workers", "2", "--mode", "copy", "--loop", "uring"])
        .args(["--upstream", &up.addr.to_string()]);
    let s = Spliced::spawn(cmd);
    for i in 0..4 {
        let mut c = connect(s.addr);
        round_trip(&mut c, &pattern(i, 1000), T);
    }
    let lines = s.logs();
    let fell_back: Vec<_> = lines
        .iter()
        .filter(|l| l.contains("io_uring cannot be used here"))
        .collect();
    assert_eq!(fell_back.len(), 1, "said once: {lines:#?}");
    assert!(
        fell_back[0].contains("Operation not permitted"),
        "{fell_back:?}"
    );
    assert!(
        !lines
            .iter()
            .any(|l| l.contains("the workers run the uring loop")),
        "{lines:#?}"
    );
}
