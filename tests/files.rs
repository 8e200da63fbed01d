//! The files another local user could touch: the pid directory and pid
//! file (`/tmp/spliced-UID` without `XDG_RUNTIME_DIR`), a second instance
//! under a live name, and the stats file's mode and group.
//!
//! The non-root cases run the binary as `nobody` (uid/gid set on the
//! command, without XDG_RUNTIME_DIR or RUNTIME_DIRECTORY) while the test,
//! as root, plants directories and files as another user. Without root
//! they are skipped, saying so.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use nix::unistd::{Group, User};

use common::*;

const T: Duration = Duration::from_secs(10);

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn nobody() -> User {
    User::from_name("nobody").unwrap().expect("a 'nobody' user")
}

/// `nobody`'s pid directory when it has no XDG_RUNTIME_DIR. The tests
/// that use it hold [`serial`] for their whole run.
fn nobody_tmp_dir() -> PathBuf {
    PathBuf::from(format!("/tmp/spliced-{}", nobody().uid))
}

/// What a test that runs spliced as `nobody` in its pid directory holds:
/// [`serial`] for its whole run, the user, and the directory (none yet).
struct AsNobody {
    _serial: std::sync::MutexGuard<'static, ()>,
    user: User,
    dir: PathBuf,
}

/// `None`, saying the test is skipped, unless the test runs as root.
fn as_nobody() -> Option<AsNobody> {
    if !is_root() {
        println!("skipped: running spliced as nobody needs the test to run as root");
        return None;
    }
    let serial = serial();
    let dir = nobody_tmp_dir();
    let _ = std::fs::remove_dir_all(&dir);
    Some(AsNobody {
        _serial: serial,
        user: nobody(),
        dir,
    })
}

/// A fresh directory for one test's files, 0755 and root's.
fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spliced-files-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    chmod(&dir, 0o755);
    dir
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn chown(path: &Path, user: &User) {
    std::os::unix::fs::chown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw())).unwrap();
}

/// `spliced ARGS` as `user`, without XDG_RUNTIME_DIR or RUNTIME_DIRECTORY
/// (so the pid directory is /tmp/spliced-UID) or any other variable
/// spliced reads. Removed rather than cleared: the child helpers see the
/// removal and set no directory of their own.
fn spliced_as(user: &User, args: &[&str]) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    for var in [
        "XDG_RUNTIME_DIR",
        "RUNTIME_DIRECTORY",
        "NOTIFY_SOCKET",
        "LISTEN_FDS",
        "LISTEN_PID",
        "SPLICED_NAME",
        "SPLICED_CONFIG",
    ] {
        cmd.env_remove(var);
    }
    cmd.env("HOME", "/")
        .current_dir("/")
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw());
    cmd
}

/// `sleep 60` as `user`: a live process that is not spliced.
fn sleeper(user: &User) -> Child {
    Command::new("sleep")
        .arg("60")
        .uid(user.uid.as_raw())
        .gid(user.gid.as_raw())
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn sleep")
}

/// Kills and reaps a child, if it still runs.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The status of a command that must end by itself within `T`, and its
/// stderr, which must be one line.
fn refused(cmd: Command) -> (ExitStatus, String) {
    let (status, _, err) = run_cmd(cmd, T);
    let status = status.unwrap_or_else(|| panic!("still running after {T:?}; stderr:\n{err}"));
    assert_eq!(err.lines().count(), 1, "one line:\n{err}");
    (status, err)
}

fn write_pid_file(dir: &Path, name: &str, pid: u32, owner: &User) {
    let path = dir.join(format!("spliced-{name}.pid"));
    std::fs::write(&path, format!("{pid}\n")).unwrap();
    chown(&path, owner);
}

fn alive(child: &mut Child) -> bool {
    child.try_wait().expect("try_wait").is_none()
}

/// A pid directory another user made (root's, 0755, with a pid file
/// naming a process of the victim): `spliced run` and `spliced reload`
/// refuse it by name, and the victim's process lives.
#[test]
fn a_pid_directory_owned_by_another_user_is_refused() {
    if !is_root() {
        println!("skipped: planting another user's directory needs the test to run as root");
        return;
    }
    let _serial = serial();
    let victim = nobody();
    let dir = nobody_tmp_dir();
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    chmod(&dir, 0o755);
    let mut target = Reaped(sleeper(&victim));
    write_pid_file(&dir, "planted", target.0.id(), &victim);

    let (status, err) = refused(spliced_as(&victim, &["reload", "--name", "planted"]));
    assert_eq!(status.code(), Some(2), "{err}");
    let expected = format!("refusing the pid directory {}", dir.display());
    assert!(err.contains(&expected), "{err}");
    assert!(err.contains("owned by root (uid 0)"), "{err}");
    assert!(alive(&mut target.0), "the planted pid was signalled");

    let up = echo_server();
    let upstream = up.addr.to_string();
    let run = ["run", "--name", "planted", "--listen", "127.0.0.1:0"];
    let (status, err) = refused(spliced_as(
        &victim,
        &[&run[..], &["--upstream", &upstream]].concat(),
    ));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains(&expected), "{err}");
    assert!(!err.contains("listening on"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The user's own directory, but open to everyone (0777): refused.
#[test]
fn a_world_writable_pid_directory_is_refused() {
    let Some(AsNobody { _serial, user, dir }) = as_nobody() else {
        return;
    };
    std::fs::create_dir(&dir).unwrap();
    chown(&dir, &user);
    chmod(&dir, 0o777);
    let up = echo_server();
    let upstream = up.addr.to_string();
    let args = [
        "run",
        "--name",
        "open",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        &upstream,
    ];
    let (status, err) = refused(spliced_as(&user, &args));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("refusing the pid directory {}", dir.display())),
        "{err}"
    );
    assert!(err.contains("mode 0777"), "{err}");

    let (status, err) = refused(spliced_as(&user, &["reload", "--name", "open"]));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("mode 0777"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Without a directory, `spliced run` makes /tmp/spliced-UID 0700.
#[test]
fn the_pid_directory_is_made_owner_only() {
    let Some(AsNobody { _serial, user, dir }) = as_nobody() else {
        return;
    };
    let up = echo_server();
    let upstream = up.addr.to_string();
    let mut cmd = spliced_as(
        &user,
        &["run", "--name", "fresh", "--listen", "127.0.0.1:0"],
    );
    cmd.args(["--upstream", &upstream]);
    let s = Spliced::spawn(cmd);
    let meta = std::fs::metadata(&dir).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o700);
    assert_eq!(meta.uid(), user.uid.as_raw());
    let pid = std::fs::read_to_string(dir.join("spliced-fresh.pid")).unwrap();
    assert_eq!(pid.trim(), s.pid().to_string());
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A pid file naming a live process of the same user that is not
/// spliced: `spliced reload` refuses it, and the process lives.
#[test]
fn reload_does_not_signal_a_pid_that_is_not_spliced() {
    let Some(AsNobody { _serial, user, dir }) = as_nobody() else {
        return;
    };
    std::fs::create_dir(&dir).unwrap();
    chown(&dir, &user);
    chmod(&dir, 0o700);
    let mut target = Reaped(sleeper(&user));
    write_pid_file(&dir, "x", target.0.id(), &user);

    let (status, err) = refused(spliced_as(&user, &["reload", "--name", "x"]));
    assert_eq!(status.code(), Some(2), "{err}");
    let expected = format!("names pid {}, which is /", target.0.id());
    assert!(err.contains(&expected), "{err}");
    assert!(
        err.contains("sleep, not spliced: not signalling it"),
        "{err}"
    );
    assert!(alive(&mut target.0), "the sleep was signalled");
    let _ = std::fs::remove_dir_all(&dir);
}

fn run_named(dir: &Path, name: &str, upstream: std::net::SocketAddr) -> Command {
    let mut cmd = Command::new(bin());
    cmd.args(["run", "--name", name, "--listen", "127.0.0.1:0"])
        .args(["--upstream", &upstream.to_string()])
        .env("RUNTIME_DIRECTORY", dir);
    cmd
}

/// A second `spliced run` under the name of a live instance exits at once
/// with one line naming it and its pid; the first keeps serving and keeps
/// its pid file.
#[test]
fn a_second_instance_under_a_live_name_is_refused() {
    let dir = temp_dir("second");
    let up = echo_server();
    let first = Spliced::spawn(run_named(&dir, "dup", up.addr));
    let mut held = connect(first.addr);
    round_trip(&mut held, b"first", T);

    let (status, err) = refused(run_named(&dir, "dup", up.addr));
    assert_eq!(status.code(), Some(2), "{err}");
    let expected = format!("instance 'dup' is already running (pid {}", first.pid());
    assert!(err.contains(&expected), "{err}");

    round_trip(&mut held, b"still served", T);
    round_trip(&mut connect(first.addr), b"new clients too", T);
    let pid = std::fs::read_to_string(dir.join("spliced-dup.pid")).unwrap();
    assert_eq!(pid.trim(), first.pid().to_string());
    let stats = spliced::shm::StatsFile::open(&dir.join("dup.stats")).unwrap();
    assert_eq!(stats.pid(), first.pid() as u32);
}

/// Pid files naming a dead process, or a live one that is not spliced,
/// are replaced with a log line; the process named lives on.
#[test]
fn a_stale_pid_file_is_replaced() {
    let dir = temp_dir("stale");
    let up = echo_server();
    let me = User::from_uid(nix::unistd::geteuid()).unwrap().unwrap();
    let mut dead = Command::new("true").spawn().unwrap();
    let dead_pid = dead.id();
    dead.wait().unwrap();
    let mut target = Reaped(sleeper(&me));
    for (name, pid) in [("dead", dead_pid), ("other", target.0.id())] {
        write_pid_file(&dir, name, pid, &me);
        let s = Spliced::spawn(run_named(&dir, name, up.addr));
        let replaced = format!("replacing a stale pid file: pid {pid}");
        wait_until(T, &format!("the log says '{replaced}'"), || {
            s.logs().iter().any(|l| l.contains(&replaced))
        });
        let written = std::fs::read_to_string(dir.join(format!("spliced-{name}.pid"))).unwrap();
        assert_eq!(written.trim(), s.pid().to_string(), "{name}");
        round_trip(&mut connect(s.addr), name.as_bytes(), T);
    }
    assert!(alive(&mut target.0), "the sleep was signalled");
}

/// By default the stats file is its owner's alone, and `spliced stats` of
/// the same user (not root) still reads it.
#[test]
fn the_stats_file_is_owner_only() {
    let dir = temp_dir("owner-only");
    let up = echo_server();
    let s = Spliced::spawn(run_named(&dir, "private", up.addr));
    let path = dir.join("private.stats");
    assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o600);
    drop(s);

    if !is_root() {
        println!("skipped the non-root half: running spliced as nobody needs root");
        return;
    }
    let user = nobody();
    let dir = temp_dir("owner-only-nobody");
    chown(&dir, &user);
    chmod(&dir, 0o700);
    let mut cmd = spliced_as(&user, &["run", "--name", "mine", "--listen", "127.0.0.1:0"]);
    cmd.args(["--upstream", &up.addr.to_string()])
        .env("RUNTIME_DIRECTORY", &dir);
    let s = Spliced::spawn(cmd);
    let meta = std::fs::metadata(dir.join("mine.stats")).unwrap();
    assert_eq!(meta.mode() & 0o7777, 0o600);
    assert_eq!(meta.uid(), user.uid.as_raw());
    let mut stats = spliced_as(&user, &["stats", "--name", "mine"]);
    stats.env("RUNTIME_DIRECTORY", &dir);
    let (status, out, err) = run_cmd(stats, T);
    assert!(status.is_some_and(|s| s.success()), "{out}\n{err}");
    assert!(out.contains("spliced instance 'mine'"), "{out}");
    drop(s);
}

/// A group other than root's own, for the group tests.
fn monitoring_group() -> Group {
    Group::from_name("nogroup")
        .unwrap()
        .or_else(|| Group::from_name("adm").unwrap())
        .expect("a 'nogroup' or 'adm' group")
}

/// `stats-group` (in [global], or --stats-group): the file is 0640 and
/// that group's; a member reads it, another user cannot.
#[test]
fn stats_group_makes_the_file_group_readable() {
    if !is_root() {
        println!("skipped: giving a file to a group root is not in needs the test to run as root");
        return;
    }
    let group = monitoring_group();
    let up = echo_server();
    let dir = temp_dir("group");
    let config = dir.join("spliced.toml");
    std::fs::write(
        &config,
        format!(
            "[global]\nworkers = 1\nstats-group = \"{}\"\n\n[[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\n\n[listener.pool]\nservers = [\"{}\"]\n",
            group.name, up.addr
        ),
    )
    .unwrap();
    let mut from_file = Command::new(bin());
    from_file
        .args(["run", "--name", "by-file", "--config"])
        .arg(&config)
        .env("RUNTIME_DIRECTORY", &dir);
    let mut by_flag = run_named(&dir, "by-flag", up.addr);
    by_flag.args(["--stats-group", &group.name]);
    for (name, cmd) in [("by-file", from_file), ("by-flag", by_flag)] {
        let s = Spliced::spawn(cmd);
        let path = dir.join(format!("{name}.stats"));
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640, "{name}");
        assert_eq!(meta.gid(), group.gid.as_raw(), "{name}");
        // A reader in the group (and not the owner) reads it...
        let reader = User::from_name("cloudsdk").unwrap().unwrap_or_else(nobody);
        let mut member = spliced_as(&reader, &["stats", "--file"]);
        member.arg(&path).gid(group.gid.as_raw());
        let (status, out, err) = run_cmd(member, T);
        assert!(status.is_some_and(|s| s.success()), "{name}: {out}\n{err}");
        assert!(out.contains(&format!("pid {}  running", s.pid())), "{out}");
        // ...one outside it cannot.
        let mut outsider = spliced_as(&reader, &["stats", "--file"]);
        outsider.arg(&path);
        if reader.gid == group.gid {
            outsider.gid(0);
        }
        let (status, out, err) = run_cmd(outsider, T);
        assert!(!status.unwrap().success(), "{name}: {out}");
        assert!(
            err.to_lowercase().contains("permission denied"),
            "{name}: {err}"
        );
        drop(s);
    }
    // `spliced check` shows the key with the other [global] ones.
    let (status, out, err) = run_bin(&["check", "--config", config.to_str().unwrap()], T);
    assert!(status.unwrap().success(), "{err}");
    let expected = format!("stats-group = \"{}\"", group.name);
    assert!(out.contains(&expected), "{out}");
}

/// A group that does not exist is a config error naming the key; one this
/// user cannot give the file to (not a member) a one-line start error.
#[test]
fn a_stats_group_that_cannot_be_used_is_refused() {
    let dir = temp_dir("badgroup");
    let up = echo_server();
    let config = dir.join("spliced.toml");
    std::fs::write(
        &config,
        format!(
            "[global]\nstats-group = \"no-such-group-here\"\n\n[[listener]]\nname = \"db\"\nlisten = \"127.0.0.1:0\"\n\n[listener.pool]\nservers = [\"{}\"]\n",
            up.addr
        ),
    )
    .unwrap();
    let (status, _, err) = run_bin(&["check", "--config", config.to_str().unwrap()], T);
    assert_eq!(status.unwrap().code(), Some(1), "{err}");
    assert!(
        err.contains("line 2: global.stats-group: no group named 'no-such-group-here'"),
        "{err}"
    );
    let mut cmd = run_named(&dir, "badflag", up.addr);
    cmd.args(["--stats-group", "no-such-group-here"]);
    let (status, err) = refused(cmd);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("--stats-group: no group named 'no-such-group-here'"),
        "{err}"
    );

    if !is_root() {
        println!("skipped the non-member half: running spliced as nobody needs root");
        return;
    }
    let user = nobody();
    let own = temp_dir("badgroup-nobody");
    chown(&own, &user);
    chmod(&own, 0o700);
    let mut cmd = spliced_as(
        &user,
        &["run", "--name", "nonmember", "--listen", "127.0.0.1:0"],
    );
    cmd.args(["--upstream", &up.addr.to_string(), "--stats-group", "root"])
        .env("RUNTIME_DIRECTORY", &own);
    let (status, err) = refused(cmd);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("give the stats file"), "{err}");
    assert!(err.contains("to group 'root'"), "{err}");
    assert!(!own.join("nonmember.stats").exists(), "no stats file left");
}

/// Root trusts a directory it handed to another user (`--user`, systemd's
/// `User=`) inside one only root can write, and starts again in it; the
/// same user's directory directly in /tmp, which anyone can write, is
/// refused.
#[test]
fn root_accepts_another_users_directory_only_inside_its_own() {
    if !is_root() {
        println!("skipped: the root case needs the test to run as root");
        return;
    }
    let user = nobody();
    let up = echo_server();
    let parent = temp_dir("handed");
    let handed = parent.join("run");
    std::fs::create_dir(&handed).unwrap();
    chown(&handed, &user);
    chmod(&handed, 0o755);
    let s = Spliced::spawn(run_named(&handed, "handed", up.addr));
    let pid = std::fs::read_to_string(handed.join("spliced-handed.pid")).unwrap();
    assert_eq!(pid.trim(), s.pid().to_string());
    drop(s);

    // /tmp itself, whatever TMPDIR says: a directory anyone can write.
    let in_tmp = PathBuf::from(format!("/tmp/spliced-files-in-tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&in_tmp);
    std::fs::create_dir(&in_tmp).unwrap();
    chmod(&in_tmp, 0o755);
    chown(&in_tmp, &user);
    let (status, err) = refused(run_named(&in_tmp, "handed", up.addr));
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains(&format!("refusing the pid directory {}", in_tmp.display())),
        "{err}"
    );
    assert!(err.contains("owned by nobody"), "{err}");
    let _ = std::fs::remove_dir_all(&in_tmp);
}
