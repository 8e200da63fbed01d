//! Around the relays an upgrade hands over: clients that were still
//! connecting or sending their first bytes follow in later rounds, a relay
//! whose listener the new config drops stays behind, an instance that
//! dropped root upgrades the same way, and the service manager hears the
//! new main pid.

use std::io::Write;
use std::net::Shutdown;
use std::time::Instant;

use super::relays::{handed_count, kinds_server, open, Kind};
use super::*;

/// A client still reading its PostgreSQL first packet at the upgrade stays
/// with the old process until its relay connects; a later round then
/// hands the relay to the new process and the old one exits, while the
/// session runs on to a clean end.
fn a_client_reading_its_first_packet_is_handed_over_once_connected(mode: Mode) {
    let up = echo_server();
    let text = format!(
        "[[listener]]\nname = \"pg\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"postgres\"\n\
         [listener.pool]\nservers = [\"{}\"]\n",
        up.addr
    );
    let name = format!("preface-{}", mode_name(mode));
    let (mut s, mut instance) = Instance::start_config(&name, mode, &text);
    let mut early = connect(s.addr);
    // A connected relay beside it goes in the first round.
    let mut connected = connect(s.addr);
    let hello = startup_message(&[("user", "u"), ("database", "d")]);
    round_trip(&mut connected, &hello, T);
    let (ok, out, err) = instance.upgrade(None);
    assert!(ok, "upgrade failed: {out}{err}");
    assert_eq!(handed_count(&out), 1, "only the connected relay: {out}");
    round_trip(&mut early, &hello, T);
    // Its relay connected in the old process, which hands it over and
    // exits: what follows goes through the new one.
    let status = old_exit(&mut s);
    assert!(status.success(), "{status}");
    round_trip(&mut early, b"after the upgrade", T);
    round_trip(&mut connected, b"after the upgrade", T);
    for mut c in [early, connected] {
        c.shutdown(Shutdown::Write).unwrap();
        let (rest, ending) = read_until_closed(&mut c, T);
        assert!(rest.is_empty());
        assert_eq!(ending, Ending::Eof);
    }
}

both_engines!(a_client_reading_its_first_packet_is_handed_over_once_connected);

/// A relay still connecting to a slow server at the upgrade (its SYN
/// dropped by a full accept queue) connects in the old process once the
/// server makes room; a later round hands it to the new process, and the
/// old one exits while the pair carries on.
fn a_relay_connecting_at_the_upgrade_is_handed_over_once_connected(mode: Mode) {
    let (slow, filler, up_addr) = black_hole();
    let name = format!("connecting-{}", mode_name(mode));
    let (mut s, mut instance) =
        Instance::start_with(&name, mode, up_addr, None, &["--connect-timeout", "20s"]);
    let mut c = connect(s.addr);
    // The proxy counts the client accepted as it starts its connect (a
    // client still in the backlog would simply meet the new process).
    wait_until(T, "the proxy accepted the client", || {
        file_counters(&instance)
            .iter()
            .any(|&(name, n)| name == "relays_accepted" && n == 1)
    });
    let (ok, out, err) = instance.upgrade(None);
    assert!(ok, "upgrade failed: {out}{err}");
    assert_eq!(handed_count(&out), 0, "nothing was connected yet: {out}");
    assert!(
        s.try_wait().is_none(),
        "the old process keeps its connecting relay"
    );
    // Room in the queue: the proxy's next SYN gets in.
    drop(slow.accept().unwrap());
    drop(filler);
    slow.set_nonblocking(true).unwrap();
    let mut server = wait_for(T, "the proxy's connect", || slow.accept().ok()).0;
    server.set_nonblocking(false).unwrap();
    let status = old_exit(&mut s);
    assert!(status.success(), "{status}");
    c.write_all(b"ping").unwrap();
    assert_eq!(read_exact_within(&mut server, 4, T).unwrap(), b"ping");
    server.write_all(b"pong").unwrap();
    assert_eq!(read_exact_within(&mut c, 4, T).unwrap(), b"pong");
    c.shutdown(Shutdown::Write).unwrap();
    let (rest, ending) = read_until_closed(&mut server, T);
    assert!(rest.is_empty());
    assert_eq!(ending, Ending::Eof, "the client's FIN reaches the server");
    server.shutdown(Shutdown::Write).unwrap();
    let (rest, ending) = read_until_closed(&mut c, T);
    assert!(rest.is_empty());
    assert_eq!(ending, Ending::Eof, "the server's FIN reaches the client");
}

both_engines!(a_relay_connecting_at_the_upgrade_is_handed_over_once_connected);

/// An instance that dropped root (`--user nobody`) upgrades as well: the
/// new process it starts runs as that user, takes the relay and the pid
/// file, and upgrades again the same way. Needs root to drop from.
#[test]
fn an_instance_that_dropped_root_hands_its_relays_over() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("SKIPPED: dropping to nobody needs root");
        return;
    }
    let up = kinds_server();
    let (mut s, mut instance) = Instance::start_with(
        "user",
        Mode::Splice,
        up.server.addr,
        None,
        &["--user", "nobody"],
    );
    let mut c = open(s.addr, Kind::Echo, 1, None);
    round_trip(&mut c, b"before", T);
    for round in 0..2 {
        let (ok, out, err) = instance.upgrade(None);
        assert!(ok, "upgrade {round} failed: {out}{err}");
        assert_eq!(handed_count(&out), 1, "{out}");
        round_trip(&mut c, format!("after upgrade {round}").as_bytes(), T);
    }
    old_exit(&mut s);
    let status = std::fs::read_to_string(format!("/proc/{}/status", instance.pid())).unwrap();
    let uid = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    assert!(
        uid.contains("65534"),
        "the new process runs as nobody: {uid}"
    );
    c.shutdown(Shutdown::Write).unwrap();
    let (rest, ending) = read_until_closed(&mut c, T);
    assert!(rest.is_empty());
    assert_eq!(ending, Ending::Eof);
}

/// The next notification on `socket` holding `line`, as its lines.
fn expect_notice(socket: &std::os::unix::net::UnixDatagram, line: &str) -> Vec<String> {
    let deadline = Instant::now() + T;
    let mut buf = vec![0u8; 4096];
    loop {
        let n = socket.recv(&mut buf).expect("a notification");
        let notice: Vec<String> = String::from_utf8_lossy(&buf[..n])
            .lines()
            .map(String::from)
            .collect();
        if notice.iter().any(|l| l == line) {
            return notice;
        }
        assert!(Instant::now() < deadline, "no {line} notification");
    }
}

/// Under a service manager (`NOTIFY_SOCKET`, as `Type=notify` gives),
/// the old process names the new one the main process (`MAINPID=`) before
/// the commit, and the new one says `READY=1` once it serves; the relay
/// carries on in it.
#[test]
fn the_service_manager_hears_the_new_main_pid() {
    let up = kinds_server();
    let dir = temp_dir("notify");
    let notify_path = dir.join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(T)).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--name", "notify", "--listen", "127.0.0.1:0"])
        .args(["--workers", "2", "--upstream"])
        .arg(up.server.addr.to_string())
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUNTIME_DIRECTORY", &dir);
    let mut s = Spliced::spawn(cmd);
    let mut instance = Instance {
        name: "notify".into(),
        dir: dir.clone(),
        successors: Vec::new(),
    };
    expect_notice(&notify, "READY=1");
    let mut c = open(s.addr, Kind::Echo, 1, None);
    round_trip(&mut c, b"before", T);
    let (ok, out, err) = instance.upgrade(None);
    assert!(ok, "{out}{err}");
    let new = instance.pid();
    expect_notice(&notify, &format!("MAINPID={new}"));
    expect_notice(&notify, "READY=1");
    old_exit(&mut s);
    round_trip(&mut c, b"after", T);
    c.shutdown(Shutdown::Write).unwrap();
    let (_, ending) = read_until_closed(&mut c, T);
    assert_eq!(ending, Ending::Eof);
}

/// A relay whose listener the new config no longer has is declined: it
/// stays with the old process, on its old settings, and runs to its end
/// there; the other listener's relay moves.
fn a_relay_of_a_listener_the_new_config_drops_stays_behind(mode: Mode) {
    let up = echo_server();
    let listener = |name: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nlisten = \"127.0.0.1:0\"\n\
             [listener.pool]\nservers = [\"{}\"]\n",
            up.addr
        )
    };
    let name = format!("dropped-{}", mode_name(mode));
    let (mut s, mut instance) =
        Instance::start_config(&name, mode, &format!("{}{}", listener("a"), listener("b")));
    let a = s.addr;
    let b = wait_for(T, "the second listener's address", || {
        s.logs()
            .iter()
            .filter_map(|l| parse_listening(l))
            .find(|addr| *addr != a)
    });
    let mut on_a = connect(a);
    let mut on_b = connect(b);
    round_trip(&mut on_a, b"a before", T);
    round_trip(&mut on_b, b"b before", T);
    std::fs::write(instance.dir.join("spliced.toml"), listener("a")).unwrap();
    let (ok, out, err) = instance.upgrade(None);
    assert!(ok, "{out}{err}");
    assert_eq!(handed_count(&out), 1, "{out}");
    assert!(out.contains("keeps 1 declined relays"), "{out}");
    round_trip(&mut on_a, b"a after", T);
    round_trip(&mut on_b, b"b after", T);
    assert!(
        s.try_wait().is_none(),
        "the old process serves the declined relay"
    );
    on_b.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut on_b, T).1, Ending::Eof);
    let status = old_exit(&mut s);
    assert!(status.success(), "{status}");
    round_trip(&mut on_a, b"a at the end", T);
    on_a.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut on_a, T).1, Ending::Eof);
}

both_engines!(a_relay_of_a_listener_the_new_config_drops_stays_behind);

/// A new process that cannot start after the commit (an address its
/// config adds is taken) answers `failed`: the old process resumes every
/// relay and serves on, takes its pid file and control socket back, and a
/// later upgrade (the config fixed) hands the relay over.
fn a_new_process_that_fails_after_the_commit_changes_nothing(mode: Mode) {
    let up = kinds_server();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listener = |name: &str, addr: &str| {
        format!(
            "[[listener]]\nname = \"{name}\"\nlisten = \"{addr}\"\n\
             [listener.pool]\nservers = [\"{}\"]\n",
            up.server.addr
        )
    };
    let name = format!("late-fail-{}", mode_name(mode));
    let a = listener("a", "127.0.0.1:0");
    let (mut s, mut instance) = Instance::start_config(&name, mode, &a);
    let mut c = open(s.addr, Kind::Echo, 1, None);
    round_trip(&mut c, b"before", T);
    let config = instance.dir.join("spliced.toml");
    let b = listener("b", &taken.local_addr().unwrap().to_string());
    std::fs::write(&config, format!("{a}{b}")).unwrap();
    let (ok, out, err) = instance.upgrade(None);
    assert!(!ok, "the upgrade should have failed: {out}");
    assert!(err.contains("in use"), "the reason is said: {err}");
    assert!(s.try_wait().is_none(), "the instance still runs");
    round_trip(&mut c, b"after the failed upgrade", T);
    round_trip(&mut open(s.addr, Kind::Echo, 2, None), b"a new client", T);
    std::fs::write(&config, &a).unwrap();
    let (ok, out, err) = instance.upgrade(None);
    assert!(
        ok,
        "the next upgrade reaches the instance again: {out}{err}"
    );
    assert_eq!(handed_count(&out), 1, "{out}");
    old_exit(&mut s);
    round_trip(&mut c, b"in the new process", T);
    c.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_until_closed(&mut c, T).1, Ending::Eof);
}

both_engines!(a_new_process_that_fails_after_the_commit_changes_nothing);
