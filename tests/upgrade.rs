//! `spliced upgrade`: a new process takes every listening socket and every
//! connected relay over, no client is refused meanwhile, the relays alive
//! at the upgrade finish byte-exact (in the new process; `relays` tests
//! every kind), and a failed upgrade changes nothing.

mod common;
#[path = "upgrade/later.rs"]
mod later;
#[path = "upgrade/relays.rs"]
mod relays;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use spliced::Mode;

const T: Duration = Duration::from_secs(20);

fn temp_dir(name: &str) -> PathBuf {
    // A case runs on each loop, at once: each has its own directory.
    let dir = std::env::temp_dir().join(format!(
        "spliced-upgrade-{name}-{}-{}",
        event_loop(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Splice => "splice",
        Mode::Copy => "copy",
        Mode::Auto => "auto",
    }
}

/// A running instance under test, and the processes upgrades started,
/// killed when the test ends (they are not this test's children).
struct Instance {
    name: String,
    dir: PathBuf,
    successors: Vec<i32>,
}

impl Instance {
    fn start(
        name: &str,
        mode: Mode,
        upstream: SocketAddr,
        fault: Option<&str>,
    ) -> (Spliced, Instance) {
        Instance::start_with(name, mode, upstream, fault, &[])
    }

    fn start_with(
        name: &str,
        mode: Mode,
        upstream: SocketAddr,
        fault: Option<&str>,
        extra: &[&str],
    ) -> (Spliced, Instance) {
        let dir = temp_dir(name);
        let mut cmd = Command::new(bin());
        cmd.args([
            "run",
            "--name",
            name,
            "--listen",
            "127.0.0.1:0",
            "--workers",
            "2",
        ])
        .args(["--mode", mode_name(mode), "--upstream"])
        .arg(upstream.to_string())
        .args(extra)
        .env("RUNTIME_DIRECTORY", &dir);
        if let Some(fault) = fault {
            cmd.env("SPLICED_UPGRADE_FAULT", fault);
        }
        let s = Spliced::spawn(cmd);
        let instance = Instance {
            name: name.into(),
            dir,
            successors: Vec::new(),
        };
        (s, instance)
    }

    /// An instance from a config file of `text`.
    fn start_config(name: &str, mode: Mode, text: &str) -> (Spliced, Instance) {
        let dir = temp_dir(name);
        let file = dir.join("spliced.toml");
        std::fs::write(&file, text).unwrap();
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--name", name, "--workers", "2", "--config"])
            .arg(&file)
            .args(["--mode", mode_name(mode)])
            .env("RUNTIME_DIRECTORY", &dir);
        let s = Spliced::spawn(cmd);
        let instance = Instance {
            name: name.into(),
            dir,
            successors: Vec::new(),
        };
        (s, instance)
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join(format!("spliced-{}.pid", self.name))
    }

    fn pid(&self) -> i32 {
        std::fs::read_to_string(self.pid_file())
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// `spliced upgrade --name NAME [--binary PATH]`: exit success, stdout, stderr.
    fn upgrade(&mut self, binary: Option<&Path>) -> (bool, String, String) {
        let before = self.pid();
        let mut cmd = Command::new(bin());
        cmd.args(["upgrade", "--name", &self.name])
            .env("RUNTIME_DIRECTORY", &self.dir);
        if let Some(b) = binary {
            cmd.arg("--binary").arg(b);
        }
        let (status, out, err) = run_cmd(cmd, T);
        let ok = status.expect("spliced upgrade answers").success();
        let after = self.pid();
        if after != before {
            // Killed at the end whatever the test finds: it holds the
            // test's pipes.
            self.successors.push(after);
        }
        if ok {
            assert_ne!(
                after, before,
                "a successful upgrade names the new pid in the pid file"
            );
        } else {
            assert_eq!(after, before, "a failed upgrade leaves the pid file alone");
        }
        (ok, out, err)
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        for &pid in &self.successors {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The old process's exit, once its relays closed. (Not `wait_exit`: its
/// stderr stays open in the new process.)
fn old_exit(s: &mut Spliced) -> std::process::ExitStatus {
    let until = std::time::Instant::now() + T;
    loop {
        if let Some(status) = s.try_wait() {
            return status;
        }
        assert!(
            std::time::Instant::now() < until,
            "the old process has not exited once its relays closed; its log and the new one's:\n{}",
            s.logs().join("\n")
        );
        poll_pause();
    }
}

/// Fresh clients, one after another, each a full echo to EOF, until told
/// to stop: every one must succeed, whichever process accepts it.
fn fresh_clients(addr: SocketAddr) -> (Arc<AtomicBool>, std::thread::JoinHandle<usize>) {
    let stop = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&stop);
    let worker = std::thread::spawn(move || {
        let mut n = 0;
        while !flag.load(Ordering::Relaxed) {
            let len = 1000 + n % 5000;
            let back = echo_once(addr, n as u64, len, T);
            assert_eq!(
                digest(&back),
                expected_digest(n as u64, len),
                "fresh client {n}"
            );
            n += 1;
        }
        n
    });
    (stop, worker)
}

/// Relays alive across the upgrade: echo ping-pong ones, and bulk ones
/// both ways (streaming and half-closed from the start of the stream's
/// end, the reply still flowing) with checksums.
struct Live {
    pingpong: Vec<std::net::TcpStream>,
    bulk: Vec<std::thread::JoinHandle<()>>,
}

fn open_live(addr: SocketAddr, pingpong: usize, bulk: usize) -> Live {
    let mut streams = Vec::new();
    for i in 0..pingpong {
        let mut c = connect(addr);
        round_trip(&mut c, format!("hello {i}").as_bytes(), T);
        streams.push(c);
    }
    let started = Arc::new(AtomicUsize::new(0));
    let bulk: Vec<std::thread::JoinHandle<()>> = (0..bulk)
        .map(|i| {
            let started = Arc::clone(&started);
            std::thread::spawn(move || {
                let len = 24 * MIB;
                let seed = 1000 + i as u64;
                let mut c = connect(addr);
                let mut w = c.try_clone().unwrap();
                let writer = std::thread::spawn(move || {
                    let data = pattern(seed, len);
                    for chunk in data.chunks(256 * 1024) {
                        use std::io::Write;
                        w.write_all(chunk).unwrap();
                        pace(Duration::from_millis(10));
                    }
                    w.shutdown(std::net::Shutdown::Write).unwrap();
                });
                started.fetch_add(1, Ordering::Relaxed);
                let back =
                    digest_to_eof(&mut c, Duration::from_secs(60)).expect("bulk echo to EOF");
                writer.join().unwrap();
                assert_eq!(
                    back,
                    expected_digest(seed, len),
                    "bulk relay {i} byte-exact"
                );
            })
        })
        .collect();
    wait_until(T, "every bulk stream started", || {
        started.load(Ordering::Relaxed) == bulk.len()
    });
    Live {
        pingpong: streams,
        bulk,
    }
}

impl Live {
    /// Every ping-pong relay answers again, then half-closes and reads the
    /// echo's FIN; every bulk stream completes byte-exact.
    fn finish(self) {
        for (i, mut c) in self.pingpong.into_iter().enumerate() {
            round_trip(&mut c, format!("again {i}").as_bytes(), T);
            c.shutdown(std::net::Shutdown::Write).unwrap();
            let (rest, ending) = read_until_closed(&mut c, T);
            assert!(rest.is_empty());
            assert_eq!(
                ending,
                Ending::Eof,
                "relay {i} ends with a FIN, not a reset"
            );
        }
        for b in self.bulk {
            b.join().unwrap();
        }
    }
}

fn upgrade_under_load(mode: Mode) {
    let up = echo_server();
    let name = format!("up-{}", mode_name(mode));
    let (mut s, mut instance) = Instance::start(&name, mode, up.addr, None);
    let old = s.pid();
    let live = open_live(s.addr, 100, 4);
    let (stop, fresh) = fresh_clients(s.addr);
    pace(Duration::from_millis(100));
    let (ok, out, err) = instance.upgrade(None);
    assert!(ok, "upgrade failed: {out}{err}");
    assert!(out.contains("serves now"), "{out}");
    pace(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    let served = fresh.join().unwrap();
    assert!(served > 0);
    // New clients meet the new process.
    let back = echo_once(s.addr, 7, 100_000, T);
    assert_eq!(digest(&back), expected_digest(7, 100_000));
    live.finish();
    // The old process drained its relays and exited; the new one serves on.
    let status = old_exit(&mut s);
    assert!(status.success(), "the old process exits cleanly: {status}");
    assert_ne!(instance.pid(), old);
    let back = echo_once(s.addr, 8, 10_000, T);
    assert_eq!(digest(&back), expected_digest(8, 10_000));
}

fn three_upgrades_in_a_row(mode: Mode) {
    let up = echo_server();
    let name = format!("three-{}", mode_name(mode));
    let (mut s, mut instance) = Instance::start(&name, mode, up.addr, None);
    let (stop, fresh) = fresh_clients(s.addr);
    let mut lives = Vec::new();
    for round in 0..3 {
        lives.push(open_live(s.addr, 20, 1));
        let (ok, out, err) = instance.upgrade(None);
        assert!(ok, "upgrade {round} failed: {out}{err}");
    }
    stop.store(true, Ordering::Relaxed);
    assert!(fresh.join().unwrap() > 0);
    for live in lives {
        live.finish();
    }
    old_exit(&mut s);
    let back = echo_once(s.addr, 9, 10_000, T);
    assert_eq!(digest(&back), expected_digest(9, 10_000));
}

/// An upgrade that cannot happen: the command fails with the reason, and
/// the instance serves on as if nothing was tried.
fn failed_upgrade(name: &str, fault: Option<&str>, binary: Option<&Path>, reason: &str) {
    let up = echo_server();
    let (mut s, mut instance) = Instance::start(name, Mode::Splice, up.addr, fault);
    let live = open_live(s.addr, 20, 1);
    let (stop, fresh) = fresh_clients(s.addr);
    let (ok, out, err) = instance.upgrade(binary);
    assert!(!ok, "the upgrade should have failed: {out}");
    assert!(err.contains(reason), "the reason is said: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(s.try_wait().is_none(), "the instance still runs");
    assert_eq!(instance.pid(), s.pid());
    stop.store(true, Ordering::Relaxed);
    assert!(fresh.join().unwrap() > 0);
    live.finish();
    let back = echo_once(s.addr, 11, 50_000, T);
    assert_eq!(digest(&back), expected_digest(11, 50_000));
    if fault.is_none() {
        // Nothing was left half done: a real upgrade works afterwards.
        let (ok, out, err) = instance.upgrade(None);
        assert!(ok, "{out}{err}");
        old_exit(&mut s);
    }
}

#[test]
fn upgrade_to_a_binary_that_exits_at_once() {
    failed_upgrade(
        "false",
        None,
        Some(Path::new("/bin/false")),
        "exit status: 1",
    );
}

#[test]
fn upgrade_to_a_missing_binary() {
    failed_upgrade(
        "missing",
        None,
        Some(Path::new("/nonexistent/spliced")),
        "cannot start /nonexistent/spliced",
    );
}

#[test]
fn upgrade_whose_new_process_exits_at_start() {
    failed_upgrade(
        "at-start",
        Some("exit-at-start"),
        None,
        "the new process ended",
    );
}

#[test]
fn upgrade_whose_new_process_dies_after_half_the_sockets() {
    failed_upgrade(
        "half",
        Some("die-after-half"),
        None,
        "the new process ended",
    );
}

#[test]
fn upgrade_of_an_instance_that_does_not_run() {
    let dir = temp_dir("none");
    let (status, _, err) = run_cmd(
        {
            let mut c = Command::new(bin());
            c.args(["upgrade", "--name", "nobody"])
                .env("RUNTIME_DIRECTORY", &dir);
            c
        },
        T,
    );
    assert!(!status.unwrap().success());
    assert!(err.contains("no running instance named 'nobody'"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The sum of a counter family's members on `/metrics`.
fn scrape(admin: SocketAddr, family: &str) -> f64 {
    use std::io::{Read, Write};
    let mut c = connect(admin);
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    c.set_read_timeout(Some(T)).unwrap();
    c.read_to_string(&mut body).unwrap();
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
    body.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

/// The listener counters (not gauges) in the stats file, summed.
fn file_counters(instance: &Instance) -> Vec<(&'static str, u64)> {
    use spliced::stats::{Kind, Values};
    let path = instance.dir.join(format!("{}.stats", instance.name));
    let snap = spliced::shm::StatsFile::open(&path)
        .unwrap()
        .snapshot()
        .unwrap();
    let total = snap
        .listeners
        .iter()
        .map(|l| l.total())
        .fold(spliced::Stats::default(), |a, b| a + b);
    spliced::stats::COUNTERS
        .counters
        .iter()
        .zip(total.values())
        .filter(|(c, _)| c.kind == Kind::Counter)
        .map(|(c, v)| (c.name, v))
        .collect()
}

#[test]
fn counters_carry_on_across_the_upgrade() {
    let up = echo_server();
    let admin = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    let admin_arg = admin.to_string();
    let (mut s, mut instance) = Instance::start_with(
        "counters",
        Mode::Splice,
        up.addr,
        None,
        &["--admin", &admin_arg],
    );
    for i in 0..10 {
        assert_eq!(echo_once(s.addr, i, 20_000, T).len(), 20_000);
    }
    wait_until(T, "the relays closed", || {
        scrape(admin, "spliced_connections_closed_total") >= 10.0
    });
    let before_file = file_counters(&instance);
    let before_metric = scrape(admin, "spliced_connections_accepted_total");
    assert!(before_metric >= 10.0);
    let server_family = "spliced_server_connections_closed_total";
    let before_server = scrape(admin, server_family);
    assert!(before_server >= 10.0);
    let (ok, out, err) = instance.upgrade(None);
    assert!(ok, "{out}{err}");
    old_exit(&mut s);
    let after_file = file_counters(&instance);
    for ((name, before), (_, after)) in before_file.iter().zip(&after_file) {
        assert!(
            after >= before,
            "{name}: {before} before the upgrade, {after} after"
        );
    }
    let after_metric = scrape(admin, "spliced_connections_accepted_total");
    assert!(
        after_metric >= before_metric,
        "/metrics accepted: {before_metric} before, {after_metric} after"
    );
    let after_server = scrape(admin, server_family);
    assert!(
        after_server >= before_server,
        "/metrics per server: {before_server} closed before, {after_server} after"
    );
    assert_eq!(echo_once(s.addr, 99, 1000, T).len(), 1000);
    let later = scrape(admin, "spliced_connections_accepted_total");
    assert!(later > after_metric, "the new process counts on top");
}

/// A listener on 127.0.0.1:0 whose pool of `servers` wants a primary,
/// checked with `redis` every `interval`.
fn primary_pool(servers: &[SocketAddr], interval: &str, timeout: &str, queue: &str) -> String {
    let list: Vec<String> = servers.iter().map(|a| format!("\"{a}\"")).collect();
    format!(
        "[[listener]]\nname = \"rw\"\nlisten = \"127.0.0.1:0\"\n\
         [listener.pool]\nservers = [{}]\nqueue-timeout = \"{queue}\"\n\
         [listener.pool.health]\ncheck = \"redis\"\nrole = \"primary\"\n\
         interval = \"{interval}\"\ntimeout = \"{timeout}\"\nrise = 1\nfall = 1\n",
        list.join(", ")
    )
}

/// A client's bytes come back within `within`, behind the server's tag:
/// the tag, or the error.
fn relayed_tag(addr: SocketAddr, within: Duration) -> std::io::Result<u8> {
    use std::io::Write;
    let mut c = connect(addr);
    c.write_all(b"hello")?;
    let got = read_exact_within(&mut c, 6, within)?;
    assert_eq!(&got[1..], b"hello");
    Ok(got[0])
}

/// The old process's confirmed primary is the new one's from its start:
/// a new client is relayed at once, though the new process's first probe
/// gets no answer (its server stalls it, and the check waits 30 s).
fn a_role_pool_relays_to_its_primary_at_once_after_the_upgrade(mode: Mode) {
    let primary = fake_redis(b'p', true);
    let text = primary_pool(&[primary.server.addr], "60s", "30s", "10s");
    let name = format!("role-{}", mode_name(mode));
    let (mut s, mut instance) = Instance::start_config(&name, mode, &text);
    assert_eq!(
        relayed_tag(s.addr, T).expect("the old process relays to its primary"),
        b'p'
    );
    primary.stalled.store(true, Ordering::SeqCst);
    let (ok, out, err) = instance.upgrade(None);
    assert!(ok, "upgrade failed: {out}{err}");
    // Not held (queue-timeout 10 s), not refused: relayed within 2 s.
    let tag = relayed_tag(s.addr, Duration::from_secs(2));
    primary.stalled.store(false, Ordering::SeqCst);
    match tag {
        Ok(tag) => assert_eq!(tag, b'p'),
        Err(e) => panic!(
            "a new client is not relayed at once after the upgrade ({e}); the logs:\n{}",
            s.logs().join("\n")
        ),
    }
    wait_until(T, "the new process says it carried the health over", || {
        s.logs()
            .iter()
            .any(|l| l.contains("health of 1 servers carried over"))
    });
    old_exit(&mut s);
}

/// A server the old process had down (its checks stopped answering after
/// it had confirmed it primary) is down in the new process too: no client
/// reaches it until a probe of the new process answers.
fn a_server_down_before_the_upgrade_stays_unused_after_it(mode: Mode) {
    let server = fake_redis(b'd', true);
    let text = primary_pool(&[server.server.addr], "300ms", "200ms", "0");
    let name = format!("down-{}", mode_name(mode));
    let (mut s, mut instance) = Instance::start_config(&name, mode, &text);
    assert_eq!(relayed_tag(s.addr, T).expect("relayed while primary"), b'd');
    server.stalled.store(true, Ordering::SeqCst);
    wait_until(T, "the old process marked it down", || {
        s.logs().iter().any(|l| l.contains("server marked down"))
    });
    let clients_before = server.first_bytes.lock().unwrap().len();
    let (ok, out, err) = instance.upgrade(None);
    assert!(ok, "upgrade failed: {out}{err}");
    // Refused (queue-timeout 0), never relayed to the down server.
    {
        use std::io::Write;
        let mut c = connect(s.addr);
        let _ = c.write_all(b"hello");
        let (rest, _) = read_until_closed(&mut c, T);
        assert!(rest.is_empty(), "a client got bytes from a down server");
    }
    assert_eq!(
        server.first_bytes.lock().unwrap().len(),
        clients_before,
        "no client reached the server the old process had down"
    );
    // The new process's probes carry on: once it answers, it serves.
    server.stalled.store(false, Ordering::SeqCst);
    let tag = wait_for(T, "relayed once the server answers again", || {
        relayed_tag(s.addr, T).ok()
    });
    assert_eq!(tag, b'd');
    old_exit(&mut s);
}

both_engines!(
    upgrade_under_load,
    three_upgrades_in_a_row,
    a_role_pool_relays_to_its_primary_at_once_after_the_upgrade,
    a_server_down_before_the_upgrade_stays_unused_after_it
);
