//! `spliced upgrade`: the control socket a running instance answers
//! upgrade requests on (`spliced-NAME.upgrade` beside its pid file, 0600),
//! SIGUSR2 (the same, the outcome in the log only), and the command that
//! asks.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use spliced::service::{self, PidFileError};
use spliced::upgrade::{Request, Upgrader};

use super::fail;

/// How long `spliced upgrade` waits for the answer: the new process reads
/// its config and the old waits up to 30 s for each of its answers.
const ANSWER_WITHIN: Duration = Duration::from_secs(120);

/// Where instance `name`'s control socket is: beside its pid file.
pub(super) fn socket_path(name: &str) -> PathBuf {
    service::pid_dir().join(format!("spliced-{name}.upgrade"))
}

/// The control socket at `path`, 0600, made before the listeners are
/// bound (so its descriptor is there from the start, as the pid file is).
/// A previous instance's socket (or the one an upgrade replaces) goes; the
/// pid file already told whether a live one holds the name.
pub(super) fn bind(path: &Path) -> Option<UnixListener> {
    let _ = std::fs::remove_file(path);
    let listener = match UnixListener::bind(path) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no upgrade socket: 'spliced upgrade' cannot reach this instance (SIGUSR2 still upgrades)");
            return None;
        }
    };
    if let Err(e) = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        tracing::warn!(path = %path.display(), error = %e, "cannot make the upgrade socket 0600; closing it");
        let _ = std::fs::remove_file(path);
        return None;
    }
    Some(listener)
}

/// A running instance's side: one upgrade at a time, from the control
/// socket or SIGUSR2.
#[derive(Clone)]
pub(super) struct Upgrades {
    upgrader: Upgrader,
    /// The binary this instance was started from (captured at start, so
    /// a binary replaced on disk since is the one started) and its
    /// arguments.
    binary: PathBuf,
    args: Vec<OsString>,
    busy: Arc<Mutex<()>>,
    /// Held while an upgrade runs and its outcome is answered or logged:
    /// the process does not exit before (it may be done at once, every
    /// relay handed over).
    answering: Arc<Mutex<()>>,
    /// Set once a new process took over: the control socket's path is its
    /// own then, never removed by this one.
    pub(super) handed: Arc<AtomicBool>,
    /// Where the control socket is, once served: bound again after an
    /// upgrade that failed past the commit (the new process had replaced
    /// it by its own).
    path: Arc<Mutex<Option<PathBuf>>>,
    /// The instance's name, and its pid file as written again after such
    /// a failure (the new process had taken it over).
    name: String,
    pid_file: Arc<Mutex<Option<service::PidFile>>>,
}

impl Upgrades {
    pub(super) fn new(
        upgrader: Upgrader,
        name: &str,
        binary: PathBuf,
        args: Vec<OsString>,
    ) -> Upgrades {
        Upgrades {
            upgrader,
            binary,
            args,
            busy: Arc::new(Mutex::new(())),
            answering: Arc::new(Mutex::new(())),
            path: Arc::new(Mutex::new(None)),
            name: name.to_string(),
            pid_file: Arc::new(Mutex::new(None)),
            handed: Arc::new(AtomicBool::new(false)),
        }
    }

    /// One upgrade to `binary` (this instance's own by default): the
    /// line to answer with, logged too.
    pub(super) fn run(&self, binary: Option<PathBuf>) -> Result<String, String> {
        let Ok(_one) = self.busy.try_lock() else {
            return Err("an upgrade is already under way".into());
        };
        if self.handed.load(Ordering::Relaxed) {
            return Err("this instance has already handed over to a new process".into());
        }
        let request = Request {
            binary: binary.unwrap_or_else(|| self.binary.clone()),
            args: self.args.clone(),
        };
        tracing::info!(binary = %request.binary.display(), "upgrade: starting the new process");
        let me = std::process::id();
        let handed = &self.handed;
        let outcome = self.upgrader.hand_over(
            &request,
            |pid| {
                // From the commit the new process owns the control socket's
                // path: this one must not remove it when it exits, which
                // may be at once (every relay handed over).
                handed.store(true, Ordering::Relaxed);
                service::notify_main_pid(pid, "upgrading")
            },
            || {
                handed.store(false, Ordering::Relaxed);
                self.take_name_back();
                service::notify_main_pid(me, "serving; the upgrade failed (see the log)")
            },
        );
        match outcome {
            Ok(h) => {
                self.handed.store(true, Ordering::Relaxed);
                let ms = h.elapsed.as_secs_f64() * 1000.0;
                let r = h.relays;
                let us = |v: u64| v as f64 / 1000.0;
                tracing::info!(
                    pid = h.pid,
                    sockets = h.sockets,
                    relays = r.relays,
                    kept = h.kept,
                    total_ms = ms,
                    pause_p50_us = r.p50_us,
                    pause_p99_us = r.p99_us,
                    pause_max_us = r.max_us,
                    "upgrade: pid {} serves now; this process stopped accepting, keeps the relays it declined and hands over the ones still connecting as they connect",
                    h.pid
                );
                Ok(format!(
                    "upgraded: pid {} serves now ({} listening sockets and {} live relays handed over in {ms:.1} ms; relay pause p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms); pid {me} keeps {} declined relays and hands over the ones still connecting as they connect",
                    h.pid, h.sockets, r.relays, us(r.p50_us), us(r.p99_us), us(r.max_us), h.kept
                ))
            }
            Err(e) => {
                tracing::error!(error = %e, "upgrade failed; still serving");
                Err(format!("upgrade failed, pid {me} still serves: {e}"))
            }
        }
    }

    /// Serves the control socket bound at `path`.
    pub(super) fn serve(&self, listener: UnixListener, path: &Path) {
        *self.path.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.to_path_buf());
        self.serve_listener(listener);
    }

    /// Takes the name back after a new process failed past the commit
    /// (it had taken over the pid file and bound its own control socket):
    /// writes the pid file again and binds and serves the control socket,
    /// so `spliced reload` and `spliced upgrade` reach this process.
    fn take_name_back(&self) {
        let path = self.path.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(path) = path else {
            return;
        };
        match service::PidFile::create(&self.name) {
            Ok(p) => *self.pid_file.lock().unwrap_or_else(|p| p.into_inner()) = Some(p),
            Err(e) => tracing::warn!(error = %e, "upgrade failed: cannot write the pid file again"),
        }
        if let Some(listener) = bind(&path) {
            tracing::info!(
                "upgrade failed: the pid file and the control socket are this process's again"
            );
            self.serve_listener(listener);
        }
    }

    /// Serves the control socket on a thread of its own. The thread waits
    /// in poll(2), not in a blocking accept(2): the kernel gives a blocking
    /// accept its descriptor number before a client comes, which would
    /// take one of the process's descriptors away from the relays for good.
    fn serve_listener(&self, listener: UnixListener) {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        if let Err(e) = listener.set_nonblocking(true) {
            tracing::warn!(error = %e, "no upgrade socket: cannot make it non-blocking (SIGUSR2 still upgrades)");
            return;
        }
        let upgrades = self.clone();
        std::thread::spawn(move || loop {
            let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
            if let Err(e) = poll(&mut fds, PollTimeout::NONE) {
                if e != nix::errno::Errno::EINTR {
                    std::thread::sleep(Duration::from_millis(100));
                }
                continue;
            }
            match listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(false).is_ok() {
                        upgrades.answer(stream);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                // Out of descriptors, say: the client sees its connect
                // wait; look again shortly.
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        });
    }

    /// Runs one upgrade from SIGUSR2; the outcome is logged.
    pub(super) fn run_from_signal(&self) {
        let _answering = self.answering.lock();
        let _ = self.run(None);
    }

    /// Returns once no upgrade is being run or answered.
    pub(super) fn wait_answered(&self) {
        drop(self.answering.lock());
    }

    fn answer(&self, stream: UnixStream) {
        let _answering = self.answering.lock();
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut line = String::new();
        if BufReader::new(&stream).read_line(&mut line).is_err() {
            return;
        }
        let line = line.strip_suffix('\n').unwrap_or(&line);
        let reply = match line.strip_prefix("upgrade ") {
            Some(binary) => {
                let binary = (!binary.is_empty()).then(|| PathBuf::from(binary));
                match self.run(binary) {
                    Ok(done) => format!("ok {done}\n"),
                    Err(why) => format!("error {why}\n"),
                }
            }
            None => "error not an upgrade request\n".to_string(),
        };
        let _ = (&stream).write_all(reply.as_bytes());
    }

    /// Removes the control socket at exit, unless a new process owns the
    /// path now.
    pub(super) fn remove(&self, path: &Path) {
        if !self.handed.load(Ordering::Relaxed) {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// `spliced upgrade --name NAME [--binary PATH]`: asks the instance over
/// its control socket and prints its answer; non-zero with the reason
/// when the upgrade did not happen.
pub(super) fn request(name: &str, binary: Option<&Path>) -> ExitCode {
    let path = socket_path(name);
    let mut stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e) => {
            return match service::read_pid(name) {
                Err(e @ PidFileError::Io { .. }) => {
                    fail(&format!("no running instance named '{name}' found: {e}"))
                }
                Err(e) => fail(&e.to_string()),
                Ok(pid) => fail(&format!(
                    "cannot reach the upgrade socket {} of '{name}' (pid {pid}): {e}",
                    path.display()
                )),
            };
        }
    };
    let binary = match binary.map(std::path::absolute).transpose() {
        Ok(b) => b,
        Err(e) => return fail(&format!("--binary: {e}")),
    };
    let binary = binary
        .map(|b| b.to_string_lossy().into_owned())
        .unwrap_or_default();
    if binary.contains('\n') {
        return fail("--binary: a path with a line break cannot be sent");
    }
    let _ = stream.set_read_timeout(Some(ANSWER_WITHIN));
    if let Err(e) = stream.write_all(format!("upgrade {binary}\n").as_bytes()) {
        return fail(&format!(
            "cannot send the request to {}: {e}",
            path.display()
        ));
    }
    let mut answer = String::new();
    match BufReader::new(&stream).read_line(&mut answer) {
        Ok(0) => fail(&format!(
            "'{name}' closed the upgrade socket without an answer"
        )),
        Ok(_) => match answer.trim_end().split_once(' ') {
            Some(("ok", done)) => {
                println!("spliced: {done}");
                ExitCode::SUCCESS
            }
            Some(("error", why)) => fail(why),
            _ => fail(&format!("unexpected answer: {}", answer.trim_end())),
        },
        Err(e) => fail(&format!("no answer from '{name}': {e}")),
    }
}
