//! Throwaway database servers on 127.0.0.1, each in its own temp dir, run
//! as an unprivileged user when the tests run as root, stopped by PID.
//! Shared by tests/health_real.rs and the fixture of tests/e2e.rs.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::{chown, Pid, User};

use crate::common::wait_until;

/// The first of `names` found in `extra_dirs` or on PATH. When none is:
/// a failure under SPLICED_REAL_SERVERS=1 (the packages were installed
/// for this run), else a printed SKIPPED.
pub fn find_bin(test: &str, names: &[&str], extra_dirs: &[PathBuf]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    // The package's own directories first: PATH may hold wrappers.
    let dirs: Vec<PathBuf> = extra_dirs
        .iter()
        .cloned()
        .chain(std::env::split_paths(&path))
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .collect();
    for name in names {
        for d in &dirs {
            let p = d.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let why =
        format!("none of {names:?} is installed (bash scripts/install-deps.sh installs them)");
    if std::env::var("SPLICED_REAL_SERVERS").is_ok_and(|v| v == "1") {
        panic!("{test}: {why}");
    }
    eprintln!("{test}: SKIPPED: {why}");
    None
}

/// PostgreSQL's versioned bin directories, newest first.
pub fn pg_bin_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| rd.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    dirs.reverse();
    dirs
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// The unprivileged account servers run as when we are root.
fn service_user() -> Option<User> {
    if !nix::unistd::geteuid().is_root() {
        return None;
    }
    for name in ["cloudsdk", "nobody"] {
        if let Ok(Some(u)) = User::from_name(name) {
            return Some(u);
        }
    }
    panic!("running as root and neither cloudsdk nor nobody exists to run servers as");
}

/// `program args...`, as the service user when we are root.
pub fn command(program: &Path) -> Command {
    match service_user() {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.arg(format!("--reuid={}", u.uid))
                .arg(format!("--regid={}", u.gid))
                .arg("--clear-groups")
                .arg("--")
                .arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Runs to completion; panics with its output if it fails.
pub fn run(mut c: Command, what: &str) -> Output {
    let out = c
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A directory owned by the service user, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "spliced-real-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&p).unwrap();
        if let Some(u) = service_user() {
            chown(&p, Some(u.uid), Some(u.gid)).unwrap();
        }
        TempDir(p)
    }

    pub fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A server process; stopped by PID (its stop signal, then SIGKILL) on
/// drop. The exit is polled: a server that ignores the signal must not
/// hang the test run.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
    /// Postgres wants SIGINT (fast shutdown): SIGTERM waits for clients.
    pub stop_signal: Signal,
}

impl Proc {
    /// Starts `c` with output to `log` and waits until `addr` accepts.
    pub fn start(name: &str, mut c: Command, log: PathBuf, addr: SocketAddr) -> Proc {
        let f = std::fs::File::create(&log).unwrap();
        let child = c
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap_or_else(|e| panic!("start {name}: {e}"));
        let mut p = Proc {
            name: name.into(),
            child,
            log,
            stop_signal: Signal::SIGTERM,
        };
        let mut exited = None;
        wait_until(
            Duration::from_secs(60),
            &format!("{name} listens on {addr}"),
            || {
                if let Ok(Some(st)) = p.child.try_wait() {
                    exited = Some(st);
                    return true;
                }
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            },
        );
        if let Some(st) = exited {
            panic!("{name} exited at start ({st}):\n{}", p.log_text());
        }
        p
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        let pid = Pid::from_raw(self.child.id() as i32);
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let _ = kill(pid, self.stop_signal);
        for _ in 0..2 {
            if crate::common::exit_within(&mut self.child, Duration::from_secs(10)).is_some() {
                return;
            }
            let _ = kill(pid, Signal::SIGKILL);
        }
        eprintln!("{}: pid {} did not exit", self.name, pid);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One mariadbd on 127.0.0.1 with its own data dir, socket and pid file,
/// run as the service user, stopped by PID when dropped.
pub struct Mariadb {
    pub port: u16,
    _proc: Proc,
}

impl Mariadb {
    /// mariadb-install-db, then mariadbd on a free port with `extra`
    /// server options; `None` (after printing SKIPPED, or a panic under
    /// SPLICED_REAL_SERVERS=1) when MariaDB is not installed.
    pub fn start(test: &str, dir: &TempDir, name: &str, extra: &[&str]) -> Option<Mariadb> {
        let server = find_bin(test, &["mariadbd", "mysqld"], &[])?;
        let install = find_bin(test, &["mariadb-install-db", "mysql_install_db"], &[])?;
        let data = dir.join(name);
        let mut c = command(&install);
        c.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .args(["--auth-root-authentication-method=normal", "--skip-test-db"]);
        run(c, "mariadb-install-db");
        let port = free_port();
        let mut c = command(&server);
        c.arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg(format!(
                "--socket={}",
                dir.join(&format!("{name}.sock")).display()
            ))
            .arg(format!(
                "--pid-file={}",
                dir.join(&format!("{name}.pid")).display()
            ))
            .args(["--bind-address=127.0.0.1", &format!("--port={port}")])
            .arg("--skip-name-resolve")
            .args(extra);
        let log = dir.join(&format!("{name}.log"));
        let proc = Proc::start(name, c, log, loopback(port));
        Some(Mariadb { port, _proc: proc })
    }

    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }
}
