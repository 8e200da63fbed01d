//! `spliced run` as a service: SIGHUP and `spliced reload`, the pid file,
//! sd_notify (READY, RELOADING, STOPPING on a NOTIFY_SOCKET this test
//! holds), socket activation through `systemd-socket-activate`, and
//! `--user` dropping root.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(10);

/// A fresh directory for one test's files.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spliced-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn config_text(listen: &str, upstream: SocketAddr, extra: &str) -> String {
    format!(
        "[global]\nworkers = 2\n\n[[listener]]\nname = \"db\"\nlisten = \"{listen}\"\n\n[listener.pool]\nservers = [\"{upstream}\"]\n{extra}"
    )
}

/// The next datagram on the notify socket, as its `KEY=VALUE` lines.
fn next_notice(socket: &UnixDatagram) -> Vec<String> {
    let mut buf = [0u8; 4096];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the read timeout");
    String::from_utf8_lossy(&buf[..n])
        .lines()
        .map(str::to_string)
        .collect()
}

/// Waits for a notification that holds `line`; returns all it held.
fn expect_notice(socket: &UnixDatagram, line: &str) -> Vec<String> {
    let deadline = Instant::now() + T;
    loop {
        let notice = next_notice(socket);
        if notice.iter().any(|l| l == line) {
            return notice;
        }
        assert!(Instant::now() < deadline, "no {line} notification");
    }
}

fn wait_log(s: &Spliced, what: &str) {
    wait_until(T, &format!("the log says '{what}'"), || {
        s.logs().iter().any(|l| l.contains(what))
    });
}

#[test]
fn sighup_and_spliced_reload_with_sd_notify() {
    let dir = temp_dir("notify");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(T)).unwrap();
    let up = echo_server();
    let config = dir.join("spliced.toml");
    std::fs::write(&config, config_text("127.0.0.1:0", up.addr, "")).unwrap();
    let run_dir = dir.join("run");

    let mut cmd = Command::new(bin());
    cmd.args(["run", "--name", "t1", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &notify_path)
        .env("RUNTIME_DIRECTORY", &run_dir);
    let mut s = Spliced::spawn(cmd);
    expect_notice(&notify, "READY=1");
    let pid_file = run_dir.join("spliced-t1.pid");
    let pid: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, s.pid());
    let mut live = connect(s.addr);
    round_trip(&mut live, b"before", T);

    // A broken file: every problem logged, the old config goes on.
    std::fs::write(&config, "[[listener]]\nname = 1\nidle-timeout = 30\n").unwrap();
    let reload = Command::new(bin())
        .args(["reload", "--name", "t1"])
        .env("RUNTIME_DIRECTORY", &run_dir)
        .output()
        .unwrap();
    assert!(reload.status.success(), "{reload:?}");
    let notice = expect_notice(&notify, "RELOADING=1");
    assert!(
        notice.iter().any(|l| l.starts_with("MONOTONIC_USEC=")),
        "{notice:?}"
    );
    let notice = expect_notice(&notify, "READY=1");
    assert!(
        notice.iter().any(|l| l.contains("last reload failed")),
        "{notice:?}"
    );
    wait_log(&s, "reload refused; still serving the previous config");
    let problems = s.logs().iter().filter(|l| l.contains("reload: ")).count();
    assert!(
        problems >= 2,
        "every problem logged:\n{}",
        s.logs().join("\n")
    );
    round_trip(&mut live, b"after a failed reload", T);
    round_trip(&mut connect(s.addr), b"new clients too", T);

    // A good one, by SIGHUP: the live relay carries on.
    let listen = s.addr.to_string();
    std::fs::write(&config, config_text(&listen, up.addr, "retries = 0\n")).unwrap();
    s.signal(nix::sys::signal::Signal::SIGHUP);
    expect_notice(&notify, "RELOADING=1");
    let notice = expect_notice(&notify, "READY=1");
    assert!(
        notice.iter().any(|l| l.contains("last reload succeeded")),
        "{notice:?}"
    );
    wait_log(&s, "config reloaded");
    round_trip(&mut live, b"after a reload", T);

    s.signal(nix::sys::signal::Signal::SIGTERM);
    expect_notice(&notify, "STOPPING=1");
    drop(live);
    let status = s.wait_exit(T).expect("exits after draining");
    assert!(status.success(), "{status}");
    assert!(!pid_file.exists(), "the pid file is removed at exit");
}

#[test]
fn spliced_reload_without_an_instance_says_so() {
    let dir = temp_dir("noinstance");
    let out = Command::new(bin())
        .args(["reload", "--name", "nobody-here"])
        .env("RUNTIME_DIRECTORY", &dir)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no running instance named 'nobody-here'"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn socket_activation_adopts_the_passed_socket() {
    let Some(tool) = find_tool("systemd-socket-activate") else {
        println!("skipped: systemd-socket-activate is not installed (apt-get install systemd)");
        return;
    };
    let dir = temp_dir("activate");
    let up = echo_server();
    // A free port: bound, read and released for the tool to bind.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let config = dir.join("spliced.toml");
    std::fs::write(&config, config_text(&listen, up.addr, "")).unwrap();
    let mut cmd = Command::new(tool);
    cmd.arg("-l")
        .arg(&listen)
        .args(["-E", "RUST_LOG=info", "-E", "NO_COLOR=1", "-E"])
        .arg(format!("RUNTIME_DIRECTORY={}", dir.join("run").display()))
        .arg(bin())
        .args(["run", "--name", "activated", "--config"])
        .arg(&config);
    // The tool starts spliced at the first connection, which the passed
    // socket holds until spliced accepts it.
    let mut s = Spliced::spawn_unready(cmd);
    let addr: SocketAddr = listen.parse().unwrap();
    let mut first = wait_connect(addr);
    round_trip(&mut first, b"the first client", T);
    wait_log(&s, "using the socket passed by the service manager");
    assert!(
        !s.logs().iter().any(|l| l.contains("matches no listener")),
        "{}",
        s.logs().join("\n")
    );
    // Both workers share it; more clients are served.
    for i in 0..20 {
        round_trip(&mut connect(addr), format!("client {i}").as_bytes(), T);
    }
    s.signal(nix::sys::signal::Signal::SIGTERM);
    drop(first);
    assert!(s.wait_exit(T).expect("exits").success());
}

#[test]
fn user_drops_root_after_binding() {
    if !nix::unistd::geteuid().is_root() {
        println!("skipped: dropping privileges needs the test to run as root");
        return;
    }
    let nobody = nix::unistd::User::from_name("nobody")
        .unwrap()
        .expect("a 'nobody' user");
    let dir = temp_dir("user");
    let up = echo_server();
    let config = dir.join("spliced.toml");
    std::fs::write(&config, config_text("127.0.0.1:0", up.addr, "")).unwrap();
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // Not there yet: spliced makes it and hands it to the user.
    let run_dir = dir.join("run");
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--name", "dropped", "--user", "nobody", "--config"])
        .arg(&config)
        .env("RUNTIME_DIRECTORY", &run_dir);
    let mut s = Spliced::spawn(cmd);
    wait_log(&s, "dropped root");
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    let ids = |key: &str| -> Vec<u32> {
        let line = status.lines().find(|l| l.starts_with(key)).unwrap();
        line.split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect()
    };
    assert_eq!(ids("Uid:"), vec![nobody.uid.as_raw(); 4], "{status}");
    assert_eq!(ids("Gid:"), vec![nobody.gid.as_raw(); 4], "{status}");
    assert_eq!(ids("Groups:"), vec![nobody.gid.as_raw()], "{status}");
    // Every thread, the workers included.
    for task in std::fs::read_dir(format!("/proc/{}/task", s.pid())).unwrap() {
        let st = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap();
        let uid = st.lines().find(|l| l.starts_with("Uid:")).unwrap();
        assert!(
            uid.split_whitespace()
                .skip(1)
                .all(|v| v == nobody.uid.to_string()),
            "{uid}"
        );
    }
    round_trip(&mut connect(s.addr), b"served as nobody", T);
    s.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(s.wait_exit(T).expect("exits").success());
    assert!(
        !run_dir.join("spliced-dropped.pid").exists(),
        "removed as nobody"
    );
}

#[test]
fn user_needs_root() {
    let Some(setpriv) = find_tool("setpriv").filter(|_| nix::unistd::geteuid().is_root()) else {
        println!("skipped: needs root and setpriv to start spliced as another user");
        return;
    };
    let up = echo_server();
    let listen = "127.0.0.1:0".to_string();
    let upstream = up.addr.to_string();
    let out = Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(bin())
        .args(["run", "--listen", &listen, "--upstream", &upstream])
        .args(["--user", "nobody"])
        .env("RUNTIME_DIRECTORY", temp_dir("needsroot").join("run"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("dropping privileges needs root"), "{err}");
}

fn find_tool(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/bin", "/bin", "/usr/sbin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Connects once the address accepts (the tool binds it after start).
fn wait_connect(addr: SocketAddr) -> std::net::TcpStream {
    let mut stream = None;
    wait_until(T, &format!("{addr} accepts connections"), || {
        stream = std::net::TcpStream::connect(addr).ok();
        stream.is_some()
    });
    let s = stream.unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

#[test]
fn a_reload_that_changes_admin_warns_that_it_needs_a_restart() {
    let dir = temp_dir("admin-reload");
    let up = echo_server();
    let admin = TcpListener::bind("127.0.0.1:0").unwrap();
    let first = admin.local_addr().unwrap();
    drop(admin);
    let config = dir.join("spliced.toml");
    let text = |admin: &str, listen: &str| {
        format!("admin = \"{admin}\"\n{}", config_text(listen, up.addr, ""))
    };
    std::fs::write(&config, text(&first.to_string(), "127.0.0.1:0")).unwrap();
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--name", "adminreload", "--config"])
        .arg(&config)
        .env("RUNTIME_DIRECTORY", dir.join("run"));
    let mut s = Spliced::spawn(cmd);
    wait_log(&s, &format!("admin endpoint on http://{first}/metrics"));
    let listen = s.addr.to_string();
    std::fs::write(&config, text("127.0.0.1:1", &listen)).unwrap();
    s.signal(nix::sys::signal::Signal::SIGHUP);
    wait_log(&s, "config reloaded");
    let warning = s
        .logs()
        .into_iter()
        .find(|l| l.contains("admin changed in the config but takes effect only after a restart"));
    assert!(
        warning.as_ref().is_some_and(|l| l.contains("WARN")),
        "{}",
        s.logs().join("\n")
    );
    // The running endpoint stays where it was.
    std::net::TcpStream::connect(first).expect("the admin endpoint still answers at its address");
    s.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(s.wait_exit(T).expect("exits").success());
}
