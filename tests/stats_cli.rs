//! `spliced stats` against a live instance, a dead one and none at all.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(10);

/// A directory of its own for one test's stats files.
fn runtime_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "spliced-stats-{test}-{}-{}",
        event_loop(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn start(dir: &Path, name: &str, upstream: std::net::SocketAddr) -> Spliced {
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--listen", "127.0.0.1:0", "--workers", "2"])
        .args(["--upstream", &upstream.to_string(), "--name", name])
        .env("RUNTIME_DIRECTORY", dir);
    Spliced::spawn(cmd)
}

fn stats(dir: &Path, name: &str) -> Output {
    Command::new(bin())
        .args(["stats", "--name", name])
        .env("RUNTIME_DIRECTORY", dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("run spliced stats")
}

/// The row of `listener` in the table: its columns.
fn row(out: &str, listener: &str) -> Vec<String> {
    let line = out
        .lines()
        .find(|l| l.starts_with(listener))
        .unwrap_or_else(|| panic!("no row for {listener} in:\n{out}"));
    line.split_whitespace().map(String::from).collect()
}

#[test]
fn a_live_instance_shows_its_relays() {
    let dir = runtime_dir("live");
    let upstream = echo_server();
    let proxy = start(&dir, "live", upstream.addr);
    // Two finished relays and one held open.
    for _ in 0..2 {
        let mut c = connect(proxy.addr);
        round_trip(&mut c, &pattern(1, 10_000), T);
    }
    let mut held = connect(proxy.addr);
    round_trip(&mut held, b"still here", T);
    // A listener from flags is named by its --listen text.
    let listener = "127.0.0.1:0".to_string();
    let mut last = String::new();
    wait_until(T, "spliced stats shows 3 accepted, 1 active", || {
        let out = stats(&dir, "live");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        last = String::from_utf8(out.stdout).unwrap();
        let cols = row(&last, &listener);
        cols[1] == "1" && cols[2] == "3"
    });
    assert!(last.contains(&format!("pid {}", proxy.pid())), "{last}");
    assert!(last.contains("running"), "{last}");
    // Two workers, each with its row.
    assert!(last.lines().any(|l| l.starts_with("1 ")), "{last}");
    drop(held);
}

/// Per server of the pool: two live ones share the relays, the refusing
/// one shows failures and no connect; state, relays held and bytes/s.
fn servers_have_rows(mode: spliced::Mode) {
    let dir = runtime_dir(&format!("servers-{mode}"));
    let (a, b) = (echo_server(), echo_server());
    let dead = refused_addr();
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--listen", "127.0.0.1:0", "--workers", "2"])
        .args(["--mode", &mode.to_string(), "--name", "pool"])
        .env("RUNTIME_DIRECTORY", &dir);
    for server in [a.addr, b.addr, dead] {
        cmd.args(["--upstream", &server.to_string()]);
    }
    let proxy = Spliced::spawn(cmd);
    for i in 0..4 {
        let mut c = connect(proxy.addr);
        round_trip(&mut c, &pattern(i, 10_000), T);
    }
    let mut held = connect(proxy.addr);
    round_trip(&mut held, b"still here", T);
    let column = |cols: &[String], i: usize| cols[i].parse::<u64>().unwrap();
    let mut last = String::new();
    wait_until(T, "spliced stats shows 5 connects, 1 relay held", || {
        let out = stats(&dir, "pool");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        last = String::from_utf8(out.stdout).unwrap();
        let sum = |i| -> u64 {
            [a.addr, b.addr]
                .iter()
                .map(|s| column(&row(&last, &format!("{s} ")), i))
                .sum()
        };
        // Every relay but the held one closed.
        sum(7) == 5 && sum(6) == 1
    });
    assert!(
        last.contains("SERVER") && last.contains("CONNECTS"),
        "{last}"
    );
    for server in [a.addr, b.addr] {
        // SERVER LISTENER STATE ROLE REASON CHECK ACTIVE CONNECTS FAILS
        // C>U/s U>C/s
        let cols = row(&last, &format!("{server} "));
        assert_eq!(&cols[1..6], ["127.0.0.1:0", "up", "-", "-", "-"], "{last}");
        assert_eq!(column(&cols, 8), 0, "no failure: {last}");
        if column(&cols, 7) > 0 {
            assert_ne!(cols[9..11], ["0", "B"], "bytes/s of a used server: {last}");
        }
    }
    let cols = row(&last, &format!("{dead} "));
    assert_eq!(column(&cols, 7), 0, "{last}");
    assert!(
        column(&cols, 8) >= 1,
        "the refusing server's failures: {last}"
    );
    drop(held);
}

both_engines!(servers_have_rows);

#[test]
fn a_dead_instance_is_named_dead() {
    let dir = runtime_dir("dead");
    let upstream = echo_server();
    let mut proxy = start(&dir, "gone", upstream.addr);
    let mut c = connect(proxy.addr);
    round_trip(&mut c, b"hello", T);
    drop(c);
    let pid = proxy.pid();
    // SIGKILL: no chance to remove the file.
    proxy.signal(nix::sys::signal::Signal::SIGKILL);
    proxy.wait_exit(T).expect("spliced exits on SIGKILL");
    assert!(
        dir.join("gone.stats").exists(),
        "the file outlives a killed process"
    );
    let out = stats(&dir, "gone");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("belongs to a dead process"), "{err}");
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("DEAD"), "{table}");
}

#[test]
fn no_instance_is_said_plainly() {
    let dir = runtime_dir("none");
    let out = stats(&dir, "absent");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("no running instance 'absent'"), "{err}");
    assert!(
        !err.contains('\n') || err.trim_end().lines().count() == 1,
        "{err}"
    );
    // Something that is not a stats file is refused, not misread.
    std::fs::File::create(dir.join("junk.stats"))
        .unwrap()
        .write_all(&[1u8; 512])
        .unwrap();
    let out = stats(&dir, "junk");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a spliced stats file"));
}

#[test]
fn a_clean_exit_removes_the_file() {
    let dir = runtime_dir("clean");
    let upstream = echo_server();
    let mut proxy = start(&dir, "clean", upstream.addr);
    let file = dir.join("clean.stats");
    assert!(file.exists());
    proxy.signal(nix::sys::signal::Signal::SIGTERM);
    let status = proxy.wait_exit(T).expect("spliced exits on SIGTERM");
    assert!(status.success(), "{status}");
    assert!(!file.exists(), "stats file left behind after a clean exit");
}
