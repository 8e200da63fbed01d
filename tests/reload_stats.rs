//! A listener a reload adds counts where the ones from the start do: in the
//! stats file (so `spliced stats` shows it, with its servers) and in
//! `/metrics`, with every byte it moved.
#![cfg(feature = "admin")]

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;
use spliced::Mode;

const T: Duration = Duration::from_secs(10);

fn config_text(mode: Mode, listeners: &[(&str, SocketAddr)]) -> String {
    let mut text = String::from("[global]\nworkers = 2\n");
    for (name, upstream) in listeners {
        text += &format!(
            "\n[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\nmode = \"{mode}\"\n\n[listener.pool]\nservers = [\"{upstream}\"]\n"
        );
    }
    text
}

/// The samples of `GET /metrics` as (`name{labels}`, value), in order,
/// duplicates kept.
fn samples(admin: SocketAddr) -> Vec<(String, f64)> {
    let mut s = TcpStream::connect(admin).expect("connect to the admin endpoint");
    s.set_read_timeout(Some(T)).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: test\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read the answer to EOF");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (key, value) = l.rsplit_once(' ').expect("sample: key value");
            (key.to_string(), value.parse().expect("a number"))
        })
        .collect()
}

/// The body of `GET /metrics`, as `name{labels}` → value.
fn metrics(admin: SocketAddr) -> HashMap<String, f64> {
    samples(admin).into_iter().collect()
}

/// The first address logged on a line that holds every one of `words`.
fn logged_addr(
    s: &Spliced,
    words: &[&str],
    parse: impl Fn(&str) -> Option<SocketAddr>,
) -> SocketAddr {
    let mut found = None;
    wait_until(T, &format!("a log line with {words:?}"), || {
        found = s
            .logs()
            .iter()
            .filter(|l| words.iter().all(|w| l.contains(w)))
            .find_map(|l| parse(l));
        found.is_some()
    });
    found.unwrap()
}

fn admin_addr(line: &str) -> Option<SocketAddr> {
    let rest = &line[line.find("http://")? + "http://".len()..];
    rest.split('/').next()?.parse().ok()
}

fn runtime_dir(mode: Mode) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "spliced-reload-stats-{mode}-{}-{}",
        common::event_loop(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn stats_table(dir: &Path, name: &str) -> String {
    let out = Command::new(bin())
        .args(["stats", "--name", name])
        .env("RUNTIME_DIRECTORY", dir)
        .env_remove("RUST_LOG")
        .output()
        .expect("run spliced stats");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn added_listener_counts_everywhere(mode: Mode) {
    let dir = runtime_dir(mode);
    let (first, second) = (echo_server(), echo_server());
    let config = dir.join("spliced.toml");
    std::fs::write(&config, config_text(mode, &[("first", first.addr)])).unwrap();
    let name = format!("reload-{mode}");
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--config"])
        .arg(&config)
        .args(["--name", &name, "--admin", "127.0.0.1:0"])
        .env("RUNTIME_DIRECTORY", &dir);
    let s = Spliced::spawn(cmd);
    let admin = logged_addr(&s, &["admin endpoint on"], admin_addr);

    let both = config_text(mode, &[("first", first.addr), ("added", second.addr)]);
    std::fs::write(&config, both).unwrap();
    s.signal(nix::sys::signal::Signal::SIGHUP);
    let added = logged_addr(&s, &["listening on", "added"], parse_listening);
    let sizes = [1usize, 70_000, 1_000_000];
    for (i, &n) in sizes.iter().enumerate() {
        let back = echo_once(added, i as u64, n, T);
        assert_eq!(back, pattern(i as u64, n));
    }
    let total: u64 = sizes.iter().map(|&n| n as u64).sum();

    // The stats file, read as `spliced stats` reads it.
    let file = spliced::shm::StatsFile::open(&dir.join(format!("{name}.stats"))).unwrap();
    wait_until(T, "the added listener's relays closed", || {
        let snap = file.snapshot().unwrap();
        snap.listeners
            .iter()
            .find(|l| l.name == "added")
            .is_some_and(|l| l.total().closed_total() == sizes.len() as u64)
    });
    let snap = file.snapshot().unwrap();
    let names: Vec<&str> = snap.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["first", "added", "handoff"]);
    let l = snap.listeners[1].total();
    assert_eq!(l.bytes_c2u_spliced + l.bytes_c2u_copied, total);
    assert_eq!(l.bytes_u2c_spliced + l.bytes_u2c_copied, total);
    let server = snap
        .servers
        .iter()
        .find(|s| s.listener == "added")
        .expect("the added listener's server");
    assert_eq!(server.addr, second.addr.to_string());
    assert_eq!(server.total().bytes_c2u(), total);
    assert_eq!(server.total().bytes_u2c(), total);

    let table = stats_table(&dir, &name);
    let row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with("added "))
        .unwrap_or_else(|| panic!("no row for the added listener:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(row[2], "3", "ACCEPTED: {table}");
    let server_row: Vec<&str> = table
        .lines()
        .find(|l| l.starts_with(&format!("{} ", second.addr)))
        .unwrap_or_else(|| panic!("no row for the added listener's server:\n{table}"))
        .split_whitespace()
        .collect();
    assert_eq!(&server_row[1..3], ["added", "up"], "{table}");
    assert_eq!(server_row[7], "3", "CONNECTS: {table}");

    let m = metrics(admin);
    let sample = |key: String| *m.get(&key).unwrap_or_else(|| panic!("no {key}"));
    assert_eq!(
        sample("spliced_connections_accepted_total{listener=\"added\"}".into()),
        3.0
    );
    for direction in ["client_to_upstream", "upstream_to_client"] {
        let sum = |prefix: &str| -> f64 {
            ["splice", "copy"]
                .iter()
                .map(|e| {
                    sample(format!(
                        "{prefix},direction=\"{direction}\",engine=\"{e}\"}}"
                    ))
                })
                .sum()
        };
        assert_eq!(sum("spliced_bytes_total{listener=\"added\""), total as f64);
        let server = format!(
            "spliced_server_bytes_total{{listener=\"added\",server=\"{}\"",
            second.addr
        );
        assert_eq!(sum(&server), total as f64);
    }
}

both_engines!(added_listener_counts_everywhere);

/// A listener added, removed, added again and refused (its companion's
/// port is taken), a hundred reloads in a row, with a relay of its first
/// life held open throughout: one row in the stats file and one series per
/// label set in `/metrics` at every step, and room left for a new listener
/// at the end.
#[test]
fn a_listener_removed_and_added_again_keeps_one_identity() {
    let mode = Mode::Splice;
    let dir = runtime_dir(mode).with_extension("ghost");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let upstream = echo_server();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    // Taken by the test, without SO_REUSEPORT: binding it fails.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let base = config_text(mode, &[("first", upstream.addr)]);
    let ghost = format!(
        "\n[[listener]]\nname = \"ghost\"\nlisten = \"127.0.0.1:{port}\"\n\n[listener.pool]\nservers = [\"{}\"]\n",
        upstream.addr
    );
    let blocked = format!(
        "\n[[listener]]\nname = \"blocked\"\nlisten = \"{taken_addr}\"\n\n[listener.pool]\nservers = [\"{}\"]\n",
        upstream.addr
    );
    let config = dir.join("spliced.toml");
    std::fs::write(&config, format!("{base}{ghost}")).unwrap();
    let name = "ghost-reloads";
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--config"])
        .arg(&config)
        .args(["--name", name, "--admin", "127.0.0.1:0"])
        .env("RUNTIME_DIRECTORY", &dir);
    let s = Spliced::spawn(cmd);
    let admin = logged_addr(&s, &["admin endpoint on"], admin_addr);
    // A relay of the first life, held open through every reload.
    let mut held = connect(SocketAddr::from(([127, 0, 0, 1], port)));
    round_trip(&mut held, b"first life", T);

    let file = spliced::shm::StatsFile::open(&dir.join(format!("{name}.stats"))).unwrap();
    let outcomes = |s: &Spliced| {
        let logs = s.logs();
        logs.iter()
            .filter(|l| l.contains("config reloaded") || l.contains("reload refused"))
            .count()
    };
    let steps = [
        String::new(),
        ghost.clone(),
        format!("{ghost}{blocked}"),
        ghost.clone(),
    ];
    for i in 0..100 {
        let step = &steps[i % steps.len()];
        std::fs::write(&config, format!("{base}{step}")).unwrap();
        let before = outcomes(&s);
        s.signal(nix::sys::signal::Signal::SIGHUP);
        wait_until(T, "the reload's outcome is logged", || {
            outcomes(&s) > before
        });
        let snap = file.snapshot().unwrap();
        let rows = snap.listeners.iter().filter(|l| l.name == "ghost").count();
        assert!(rows <= 1, "step {i}: {rows} rows named ghost");
        let all = samples(admin);
        let mut seen = std::collections::HashSet::new();
        for (key, _) in &all {
            assert!(seen.insert(key), "step {i}: two series {key}");
        }
    }
    // Its first life's relay still counts under the one identity.
    round_trip(&mut held, b"still here", T);
    let snap = file.snapshot().unwrap();
    let ghosts: Vec<_> = snap
        .listeners
        .iter()
        .filter(|l| l.name == "ghost")
        .collect();
    assert_eq!(ghosts.len(), 1);
    assert!(ghosts[0].total().relays_accepted >= 1);
    // Room is left: a brand-new listener gets a row of its own.
    let fresh = "\n[[listener]]\nname = \"fresh\"\nlisten = \"127.0.0.1:0\"\n\n[listener.pool]\nservers = [\"127.0.0.1:9\"]\n";
    std::fs::write(&config, format!("{base}{ghost}{fresh}")).unwrap();
    let before = outcomes(&s);
    s.signal(nix::sys::signal::Signal::SIGHUP);
    wait_until(T, "the reload's outcome is logged", || {
        outcomes(&s) > before
    });
    let snap = file.snapshot().unwrap();
    assert!(snap.listeners.iter().any(|l| l.name == "fresh"));
    assert!(
        !s.logs().iter().any(|l| l.contains("no room left")),
        "the spare slots ran out"
    );
    drop(taken);
}
