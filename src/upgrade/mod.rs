//! Live upgrade: a running instance starts a new binary with the same
//! arguments and hands it every listening socket over a Unix socket pair
//! (`sys::fdpass`), in two phases, so a failure at any step leaves the old
//! process serving as before.
//!
//! 1. The old process ([`hand_over`]) sends a header naming the format
//!    ([`FORMAT`]), then its listening sockets in batches of at most 253
//!    descriptors, each acknowledged.
//!    Then the health of every server of its fleet (up or down, the last
//!    answer's role and timeline, a check error), one `server` message
//!    each, named as the fleet names a server: address and check.
//! 2. The new process ([`Incoming`]) has read its config afresh; it
//!    answers `ready` (or `refuse REASON`) and waits. It accepts nothing
//!    until the old one sends `commit`.
//! 3. On `commit` the new process starts on the passed sockets (every
//!    SO_REUSEPORT socket of an address is adopted, so no accept queue is
//!    closed) and answers `started PID`. Only then does the old process
//!    stop accepting; its live relays stay with it and drain. Before it
//!    accepts, each server of its config that the old process knew starts
//!    in the carried state ([`CarriedHealth`]), so a role pool relays at
//!    once to the primary the old process had confirmed; its probes then
//!    carry on as usual.
//!
//! Until `started`, the old process keeps accepting: if the new binary is
//! missing, exits, refuses or dies, it is killed and reaped and nothing
//! changes. (Feature `service`.)

mod protocol;

use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use protocol::Message;
pub use protocol::{BadMessage, FORMAT};

use std::net::SocketAddr;

use crate::control::{Command as WorkerCommand, WorkerLink};
use crate::sys::fdpass;
use crate::upstream::fleet::{Fleet, ServerHealth};
use crate::Controller;
#[cfg(doc)]
use crate::ProxyHandle;

/// The environment variable naming the channel's descriptor in the new
/// process.
pub const CHANNEL_ENV: &str = "SPLICED_UPGRADE_FD";

/// Test-only fault injection in the new process: `exit-at-start` (exits
/// before reading anything) or `die-after-half` (exits after receiving
/// half of the sockets, acknowledging them). Never set it in production.
pub const FAULT_ENV: &str = "SPLICED_UPGRADE_FAULT";

/// How long the old process waits for each answer of the new one
/// (its config is read before `ready`).
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

/// Sockets per `sockets` message: the kernel's limit per message.
const BATCH: usize = fdpass::MAX_FDS_PER_MESSAGE;

/// What to start.
#[derive(Clone, Debug)]
pub struct Request {
    /// The new binary.
    pub binary: PathBuf,
    /// Its arguments (the running instance's own, without the program).
    pub args: Vec<OsString>,
}

/// A finished handover.
#[derive(Clone, Debug)]
pub struct Handed {
    /// The new process, now serving.
    pub pid: u32,
    /// The listening sockets it adopted.
    pub sockets: usize,
    /// From the request to `started`.
    pub elapsed: Duration,
}

/// Why an upgrade did not happen; the old process serves on.
#[derive(Debug)]
pub enum UpgradeError {
    /// The listening sockets could not be collected from the workers.
    Sockets(io::Error),
    /// The channel could not be made.
    Channel(io::Error),
    /// The new binary could not be started.
    Spawn { binary: PathBuf, source: io::Error },
    /// Talking to the new process failed (`op`: which step).
    Talk { op: &'static str, source: io::Error },
    /// The new process ended the conversation, or exited.
    Ended { stage: &'static str, status: String },
    /// The new process refused (its config, its format) or failed to start.
    Refused(String),
    /// A message out of place.
    Protocol(String),
    /// The old process sent a format this build does not read.
    Format { theirs: u32 },
}

impl fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpgradeError::Sockets(e) => write!(f, "cannot collect the listening sockets: {e}"),
            UpgradeError::Channel(e) => write!(f, "cannot make the handover channel: {e}"),
            UpgradeError::Spawn { binary, source } => {
                write!(f, "cannot start {}: {source}", binary.display())
            }
            UpgradeError::Talk { op, source } => write!(f, "handover: cannot {op}: {source}"),
            UpgradeError::Ended { stage, status } => {
                write!(f, "the new process ended {stage} ({status})")
            }
            UpgradeError::Refused(why) => write!(f, "the new process refused: {why}"),
            UpgradeError::Protocol(what) => write!(f, "handover: {what}"),
            UpgradeError::Format { theirs } => write!(
                f,
                "the running instance sent upgrade format {theirs}; this binary reads format {FORMAT}"
            ),
        }
    }
}

impl std::error::Error for UpgradeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            UpgradeError::Sockets(e) | UpgradeError::Channel(e) => Some(e),
            UpgradeError::Spawn { source, .. } | UpgradeError::Talk { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// The old process's side of an upgrade, usable from any thread (a signal
/// thread, the control socket's): see [`ProxyHandle::upgrader`].
#[derive(Clone)]
pub struct Upgrader {
    links: Vec<WorkerLink>,
    controller: Controller,
    /// Whose servers' health is handed over.
    fleet: std::sync::Arc<Fleet>,
    /// The admin endpoint: stopped for the new process to bind its
    /// address at the commit, started again if the upgrade then fails.
    #[cfg(feature = "admin")]
    admin: Option<crate::proxy::AdminSwitch>,
}

impl Upgrader {
    pub(crate) fn new(
        links: Vec<WorkerLink>,
        controller: Controller,
        fleet: std::sync::Arc<Fleet>,
        #[cfg(feature = "admin")] admin: Option<crate::proxy::AdminSwitch>,
    ) -> Upgrader {
        Upgrader {
            links,
            controller,
            fleet,
            #[cfg(feature = "admin")]
            admin,
        }
    }

    /// Starts `request.binary` and hands it every listening socket.
    /// `on_commit(pid)` runs just before the commit (to tell the service
    /// manager the new main pid), and `on_rollback()` after a failure that
    /// followed it. On `Ok` this process has stopped accepting and drains
    /// its live relays; on `Err` nothing changed.
    pub fn hand_over(
        &self,
        request: &Request,
        on_commit: impl FnOnce(u32),
        on_rollback: impl FnOnce(),
    ) -> Result<Handed, UpgradeError> {
        let stop_admin = || {
            #[cfg(feature = "admin")]
            if let Some(admin) = &self.admin {
                admin.stop();
            }
        };
        let restart_admin = || {
            #[cfg(feature = "admin")]
            if let Some(admin) = &self.admin {
                admin.restart();
            }
        };
        let handed = hand_over(
            &self.links,
            &self.fleet,
            request,
            |pid| {
                stop_admin();
                on_commit(pid);
            },
            || {
                restart_admin();
                on_rollback();
            },
        )?;
        self.controller.shutdown();
        Ok(handed)
    }
}

/// A duplicate of every distinct listening socket the workers accept on,
/// with its address: each worker's own SO_REUSEPORT socket, and a socket
/// several workers share (a passed one) once.
fn listening_sockets(links: &[WorkerLink]) -> io::Result<Vec<(SocketAddr, OwnedFd)>> {
    let mut seen = std::collections::HashSet::new();
    let mut all = Vec::new();
    for link in links {
        let (tx, rx) = std::sync::mpsc::channel();
        let gone = || io::Error::other("a worker has exited");
        link.send(WorkerCommand::ListeningSockets(tx))
            .map_err(|_| gone())?;
        let sockets = rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| gone())??;
        for (addr, fd) in sockets {
            let stat = nix::sys::stat::fstat(fd.as_raw_fd())?;
            if seen.insert((stat.st_dev, stat.st_ino)) {
                all.push((addr, fd));
            }
        }
    }
    Ok(all)
}

fn hand_over(
    links: &[WorkerLink],
    fleet: &Fleet,
    request: &Request,
    on_commit: impl FnOnce(u32),
    on_rollback: impl FnOnce(),
) -> Result<Handed, UpgradeError> {
    let began = Instant::now();
    let sockets = listening_sockets(links).map_err(UpgradeError::Sockets)?;
    let (ours, theirs) = fdpass::channel_pair().map_err(UpgradeError::Channel)?;
    fdpass::set_timeouts(ours.as_fd(), Some(ANSWER_WITHIN)).map_err(UpgradeError::Channel)?;
    let child = Command::new(&request.binary)
        .args(&request.args)
        .env(CHANNEL_ENV, theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|source| UpgradeError::Spawn {
            binary: request.binary.clone(),
            source,
        })?;
    drop(theirs);
    let mut talk = Talk {
        channel: ours,
        child,
        committed: false,
    };
    let outcome = talk.run(&sockets, fleet, on_commit);
    match outcome {
        Ok(pid) => {
            // The child is not waited for: it is the instance now.
            std::mem::forget(talk.child);
            Ok(Handed {
                pid,
                sockets: sockets.len(),
                elapsed: began.elapsed(),
            })
        }
        Err(e) => {
            let _ = fdpass::send(talk.channel.as_fd(), &Message::Abort.encode(), &[]);
            let e = talk.end_child(e);
            if talk.committed {
                on_rollback();
            }
            Err(e)
        }
    }
}

struct Talk {
    channel: OwnedFd,
    child: Child,
    committed: bool,
}

impl Talk {
    fn run(
        &mut self,
        sockets: &[(SocketAddr, OwnedFd)],
        fleet: &Fleet,
        on_commit: impl FnOnce(u32),
    ) -> Result<u32, UpgradeError> {
        // Taken now, so the header can count it; the new process's
        // probes start as soon as it serves.
        let health = fleet.carried();
        let header = Message::Header {
            format: FORMAT,
            from: std::process::id(),
            sockets: sockets.len(),
            servers: health.len(),
        };
        self.send(&header, &[], "send the header")?;
        let mut sent = 0;
        for batch in sockets.chunks(BATCH) {
            let addrs = batch.iter().map(|(a, _)| *a).collect();
            let fds: Vec<BorrowedFd<'_>> = batch.iter().map(|(_, fd)| fd.as_fd()).collect();
            self.send(&Message::Sockets(addrs), &fds, "send listening sockets")?;
            sent += batch.len();
            match self.answer("sockets acknowledged")? {
                Message::Ack(n) if n == sent => {}
                other => return Err(out_of_place(&other, "an acknowledgement")),
            }
        }
        for server in health {
            self.send(&Message::Server(server), &[], "send the servers' health")?;
        }
        match self.answer("ready")? {
            Message::Ready => {}
            Message::Refuse(why) => return Err(UpgradeError::Refused(why)),
            other => return Err(out_of_place(&other, "ready")),
        }
        on_commit(self.child.id());
        self.committed = true;
        self.send(&Message::Commit, &[], "send the commit")?;
        match self.answer("started")? {
            Message::Started(pid) => Ok(pid),
            Message::Failed(why) => Err(UpgradeError::Refused(why)),
            other => Err(out_of_place(&other, "started")),
        }
    }

    /// Sends `m`; a child that has exited (its end closed) is an `Ended`.
    fn send(
        &self,
        m: &Message,
        fds: &[BorrowedFd<'_>],
        op: &'static str,
    ) -> Result<(), UpgradeError> {
        fdpass::send(self.channel.as_fd(), &m.encode(), fds).map_err(|source| match source.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => UpgradeError::Ended {
                stage: before(op),
                status: String::new(),
            },
            _ => UpgradeError::Talk { op, source },
        })
    }

    /// The next message; the end of the channel is the child's end.
    fn answer(&mut self, stage: &'static str) -> Result<Message, UpgradeError> {
        let got = match fdpass::receive(self.channel.as_fd()) {
            Ok(got) => got,
            // The child exited with a message of ours unread.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => fdpass::Received {
                bytes: Vec::new(),
                fds: Vec::new(),
            },
            Err(source) => {
                return Err(UpgradeError::Talk {
                    op: "read the answer",
                    source,
                })
            }
        };
        if got.bytes.is_empty() && got.fds.is_empty() {
            return Err(UpgradeError::Ended {
                stage: before(stage),
                status: String::new(),
            });
        }
        Message::decode(&got.bytes).map_err(|e| UpgradeError::Protocol(e.to_string()))
    }

    /// Kills the child if it still runs and reaps it; an `Ended` error
    /// gains its exit status.
    fn end_child(&mut self, e: UpgradeError) -> UpgradeError {
        // A child that just closed the channel is given a moment to exit,
        // so its status can be told.
        let until = Instant::now() + Duration::from_millis(500);
        let mut status = self.child.try_wait().ok().flatten();
        while status.is_none() && Instant::now() < until {
            std::thread::sleep(Duration::from_millis(5));
            status = self.child.try_wait().ok().flatten();
        }
        let status = match status {
            Some(s) => format!("pid {}: {s}", self.child.id()),
            None => {
                let _ = self.child.kill();
                let s = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                format!("pid {}: killed, {s}", self.child.id())
            }
        };
        match e {
            UpgradeError::Ended { stage, .. } => UpgradeError::Ended { stage, status },
            other => other,
        }
    }
}

fn before(stage: &'static str) -> &'static str {
    match stage {
        "send the header" | "send listening sockets" => {
            "before it acknowledged every listening socket"
        }
        "send the servers' health" => "before it read the servers' health",
        "send the commit" => "before the commit",
        "sockets acknowledged" => "before it acknowledged every listening socket",
        "ready" => "before it was ready",
        "started" => "after the commit, before it started",
        _ => "early",
    }
}

fn out_of_place(m: &Message, wanted: &str) -> UpgradeError {
    let text = String::from_utf8_lossy(&m.encode()).into_owned();
    UpgradeError::Protocol(format!("expected {wanted}, got {text:?}"))
}

/// The new process's side, between reading the sockets and the commit.
#[derive(Debug)]
pub struct Incoming {
    channel: OwnedFd,
    from: u32,
    sockets: Vec<OwnedFd>,
    health: Vec<ServerHealth>,
}

/// The health of the old process's servers, for the new one to start
/// from ([`crate::start_upgraded`]).
#[derive(Debug, Default)]
pub struct CarriedHealth(pub(crate) Vec<ServerHealth>);

impl CarriedHealth {
    /// How many servers it names.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether it names none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Incoming {
    /// When this process was started by an upgrade ([`CHANNEL_ENV`]):
    /// raises RLIMIT_NOFILE, reads the header and every listening socket,
    /// acknowledging each batch. A header of another format is refused on
    /// the channel and returned as the error.
    pub fn from_env() -> Option<Result<Incoming, UpgradeError>> {
        let fd = std::env::var(CHANNEL_ENV).ok()?;
        std::env::remove_var(CHANNEL_ENV);
        let fault = std::env::var(FAULT_ENV).ok();
        if fault.as_deref() == Some("exit-at-start") {
            eprintln!("spliced: {FAULT_ENV}=exit-at-start: exiting (test fault)");
            std::process::exit(3);
        }
        let fd = match fd.parse() {
            Ok(fd) => fd,
            Err(_) => {
                return Some(Err(UpgradeError::Protocol(format!(
                    "{CHANNEL_ENV}={fd:?} is not a descriptor number"
                ))))
            }
        };
        Some(receive(fd, fault.as_deref() == Some("die-after-half")))
    }

    /// The old process's pid (whose pid and stats file this one takes over).
    pub fn from_pid(&self) -> u32 {
        self.from
    }

    /// Tells the old process why this one will not serve; it carries on.
    pub fn refuse(self, reason: &str) {
        let _ = fdpass::send(
            self.channel.as_fd(),
            &Message::Refuse(reason.into()).encode(),
            &[],
        );
    }

    /// Says `ready` and waits for the commit (for as long as the old
    /// process takes). Until then nothing is accepted on the sockets.
    pub fn ready(self) -> Result<Committed, UpgradeError> {
        let talk = |op, source| UpgradeError::Talk { op, source };
        fdpass::send(self.channel.as_fd(), &Message::Ready.encode(), &[])
            .map_err(|e| talk("send ready", e))?;
        fdpass::set_timeouts(self.channel.as_fd(), None).map_err(|e| talk("wait", e))?;
        let got = fdpass::receive(self.channel.as_fd()).map_err(|e| talk("read the commit", e))?;
        match Message::decode(&got.bytes) {
            Ok(Message::Commit) => Ok(Committed {
                channel: self.channel,
                sockets: self.sockets,
                health: self.health,
            }),
            Ok(Message::Abort) => Err(UpgradeError::Refused(
                "the running instance aborted the upgrade".into(),
            )),
            _ if got.bytes.is_empty() => Err(UpgradeError::Ended {
                stage: "before the commit",
                status: "the running instance closed the channel".into(),
            }),
            Ok(other) => Err(out_of_place(&other, "commit")),
            Err(e) => Err(UpgradeError::Protocol(e.to_string())),
        }
    }
}

fn receive(fd: i32, die_after_half: bool) -> Result<Incoming, UpgradeError> {
    crate::sys::raise_nofile_limit();
    let channel = fdpass::adopt_channel(fd).map_err(UpgradeError::Channel)?;
    fdpass::set_timeouts(channel.as_fd(), Some(ANSWER_WITHIN)).map_err(UpgradeError::Channel)?;
    let talk = |op, source| UpgradeError::Talk { op, source };
    let got = fdpass::receive(channel.as_fd()).map_err(|e| talk("read the header", e))?;
    let (from, expected, servers) = match Message::decode(&got.bytes) {
        Ok(Message::Header {
            format,
            from,
            sockets,
            servers,
        }) if format == FORMAT => (from, sockets, servers),
        Ok(Message::Header { format, .. }) => {
            let e = UpgradeError::Format { theirs: format };
            let _ = fdpass::send(
                channel.as_fd(),
                &Message::Refuse(e.to_string()).encode(),
                &[],
            );
            return Err(e);
        }
        _ => {
            return Err(UpgradeError::Protocol(
                "the channel did not start with a header".into(),
            ))
        }
    };
    let mut sockets = Vec::with_capacity(expected);
    while sockets.len() < expected {
        let got =
            fdpass::receive(channel.as_fd()).map_err(|e| talk("read listening sockets", e))?;
        let addrs = match Message::decode(&got.bytes) {
            Ok(Message::Sockets(addrs)) => addrs,
            Ok(Message::Abort) => {
                return Err(UpgradeError::Refused(
                    "the running instance aborted the upgrade".into(),
                ))
            }
            _ => return Err(UpgradeError::Protocol("expected listening sockets".into())),
        };
        if addrs.len() != got.fds.len() {
            return Err(UpgradeError::Protocol(format!(
                "{} addresses came with {} descriptors",
                addrs.len(),
                got.fds.len()
            )));
        }
        sockets.extend(got.fds);
        fdpass::send(channel.as_fd(), &Message::Ack(sockets.len()).encode(), &[])
            .map_err(|e| talk("acknowledge", e))?;
        if die_after_half && sockets.len() * 2 >= expected {
            eprintln!("spliced: {FAULT_ENV}=die-after-half: exiting after {} of {expected} sockets (test fault)", sockets.len());
            std::process::exit(3);
        }
    }
    let mut health = Vec::with_capacity(servers.min(1 << 16));
    while health.len() < servers {
        let got =
            fdpass::receive(channel.as_fd()).map_err(|e| talk("read the servers' health", e))?;
        match Message::decode(&got.bytes) {
            Ok(Message::Server(server)) => health.push(server),
            Ok(Message::Abort) => {
                return Err(UpgradeError::Refused(
                    "the running instance aborted the upgrade".into(),
                ))
            }
            _ => return Err(UpgradeError::Protocol("expected a server's health".into())),
        }
    }
    Ok(Incoming {
        channel,
        from,
        sockets,
        health,
    })
}

/// The new process after the commit: it starts on [`Committed::take_sockets`]
/// and then says [`Committed::started`] (or [`Committed::failed`]).
#[derive(Debug)]
pub struct Committed {
    channel: OwnedFd,
    sockets: Vec<OwnedFd>,
    health: Vec<ServerHealth>,
}

impl Committed {
    /// The passed listening sockets, to start on.
    pub fn take_sockets(&mut self) -> Vec<OwnedFd> {
        std::mem::take(&mut self.sockets)
    }

    /// The old process's servers' health, to start from.
    pub fn take_health(&mut self) -> CarriedHealth {
        CarriedHealth(std::mem::take(&mut self.health))
    }

    /// Tells the old process this one serves; it stops accepting.
    pub fn started(self) {
        let m = Message::Started(std::process::id());
        let _ = fdpass::send(self.channel.as_fd(), &m.encode(), &[]);
    }

    /// Tells the old process this one could not start; it carries on.
    pub fn failed(self, reason: &str) {
        let _ = fdpass::send(
            self.channel.as_fd(),
            &Message::Failed(reason.into()).encode(),
            &[],
        );
    }
}
