//! Live upgrade: a running instance starts a new binary with the same
//! arguments and hands it every listening socket and every live relay
//! over a Unix socket pair (`sys::fdpass`), in two phases, so a failure
//! before the commit leaves the old process serving as before.
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
//! 3. The old process freezes every connected relay (`relays`: each
//!    leaves its worker's epoll set and is moved by nothing) and sends
//!    them in acknowledged batches: both sockets, each pipe that holds
//!    bytes, a memory file with what a copy buffer holds, and the relay's
//!    state as a line of text (`wire`). Relays still connecting or
//!    negotiating, and clients still reading a preface, follow in later
//!    rounds (below); pairs an embedder handed off stay with the old
//!    process and drain there.
//! 4. On `commit` the new process starts on the passed sockets (every
//!    SO_REUSEPORT socket of an address is adopted, so no accept queue is
//!    closed), its workers take the relays, and it answers with the
//!    relays it could not take (`declined`: their listener is gone from
//!    its config) and `started PID` with the relays' pause distribution.
//!    Only then does the old process stop accepting, let go of the relays
//!    taken (its descriptors close; the sockets live on in the new one),
//!    and resume the declined ones, which drain with the rest. Before it
//!    accepts, each server of its config that the old process knew
//!    starts in the carried state ([`CarriedHealth`]), so a role pool
//!    relays at once to the primary the old process had confirmed.
//! 5. Later rounds: the old process hands over, as in 3 and 4, the relays
//!    that connected since the freeze, until none may follow or
//!    [`LATE_WITHIN`] has passed, then closes the channel.
//!
//! Until the commit, the old process keeps accepting and the frozen
//! relays are its own: if the new binary is missing, exits, refuses or
//! dies, it is killed and reaped, the relays resume, and nothing else
//! changes. After the commit, a new process that says `failed` had not
//! touched them (they resume); one that dies without a word may have moved
//! their bytes, so they are reset, never resumed or cut cleanly.
//! (Feature `service`.)

mod incoming;
mod protocol;
mod relays;
mod wire;

use std::collections::HashSet;
use std::ffi::OsString;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub use incoming::{CarriedHealth, Committed, Incoming, LateRelays};
use protocol::Message;
pub use protocol::{BadMessage, Taken, FORMAT};

pub use relays::{AdoptOutcome, CarriedRelays, RelayAdopter};

use std::net::SocketAddr;

use crate::control::{Command as WorkerCommand, Fate as WorkerFate, WorkerLink};
use crate::sys::fdpass;
use crate::upstream::fleet::Fleet;
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

/// How long the old process goes on handing over relays that connect
/// after the freeze (clients that were connecting or sending their first
/// bytes), and how often it looks.
const LATE_WITHIN: Duration = Duration::from_secs(60);
const LATE_EVERY: Duration = Duration::from_millis(20);

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
    /// The relays it took and how long they paused.
    pub relays: Taken,
    /// Relays it declined (their listener is gone from its config): they
    /// resume here and drain with the relays that were not connected yet.
    pub kept: usize,
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
        let (handed, talk) = hand_over(
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
        let links = self.links.clone();
        let spawned = std::thread::Builder::new()
            .name("spliced-upgrade".into())
            .spawn(move || talk.late_rounds(&links));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "upgrade: relays still connecting stay with this process");
        }
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
) -> Result<(Handed, Talk), UpgradeError> {
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
        untouched: true,
        frozen: None,
    };
    let outcome = talk.run(links, &sockets, fleet, on_commit);
    match outcome {
        Ok((pid, relays, declined)) => {
            let kept = declined.len();
            if let Some(frozen) = talk.frozen.take() {
                frozen.end(links, relays::fate_after_start(&declined));
            }
            let handed = Handed {
                pid,
                sockets: sockets.len(),
                relays,
                kept,
                elapsed: began.elapsed(),
            };
            Ok((handed, talk))
        }
        Err(e) => {
            let _ = fdpass::send(talk.channel.as_fd(), &Message::Abort.encode(), &[]);
            let e = talk.end_child(e);
            if let Some(frozen) = talk.frozen.take() {
                let fate = if talk.untouched {
                    WorkerFate::Resume
                } else {
                    WorkerFate::Reset
                };
                frozen.end(links, |_| fate);
            }
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
    /// The new process has not touched the frozen relays: they can
    /// resume here if the upgrade fails.
    untouched: bool,
    /// The relays frozen for the new process, until their fate is known.
    frozen: Option<relays::Frozen>,
}

impl Talk {
    /// The whole conversation: the new pid, what it took of the relays,
    /// and the ids of those it declined.
    fn run(
        &mut self,
        links: &[WorkerLink],
        sockets: &[(SocketAddr, OwnedFd)],
        fleet: &Fleet,
        on_commit: impl FnOnce(u32),
    ) -> Result<(u32, Taken, HashSet<u64>), UpgradeError> {
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
        self.send_relays(links)?;
        on_commit(self.child.id());
        self.committed = true;
        self.commit_and_answer()
    }

    /// Sends the commit (from here on the new process may move the
    /// frozen relays' bytes) and reads the answer: the relays it declined,
    /// then `started`.
    fn commit_and_answer(&mut self) -> Result<(u32, Taken, HashSet<u64>), UpgradeError> {
        self.untouched = false;
        self.send(&Message::Commit, &[], "send the commit")?;
        let mut declined = HashSet::new();
        loop {
            match self.answer("started")? {
                Message::Declined(ids) => declined.extend(ids),
                Message::Started(pid, taken) => {
                    let taken = taken.unwrap_or(Taken {
                        relays: 0,
                        p50_us: 0,
                        p99_us: 0,
                        max_us: 0,
                    });
                    return Ok((pid, taken, declined));
                }
                Message::Failed(why) => {
                    // Said before its workers took a relay.
                    self.untouched = true;
                    return Err(UpgradeError::Refused(why));
                }
                other => return Err(out_of_place(&other, "started")),
            }
        }
    }

    /// After `started`. Clients that were connecting or still sending
    /// their first bytes at the freeze become relays here (this process
    /// no longer accepts): each round hands over those connected since,
    /// as the first did, until no such client is left or [`LATE_WITHIN`]
    /// has passed. A round that fails leaves its relays here (resumed, or
    /// reset if the new process may have moved their bytes) and ends the
    /// rounds. Closing the channel at the end tells the new process.
    fn late_rounds(mut self, links: &[WorkerLink]) {
        let until = Instant::now() + LATE_WITHIN;
        loop {
            let frozen = relays::Frozen::take(links);
            let later = frozen.later;
            if frozen.len() > 0 {
                self.untouched = true;
                let sent = self.send_frozen(&frozen);
                self.frozen = Some(frozen);
                match sent.and_then(|()| self.commit_and_answer()) {
                    Ok((_, taken, declined)) => {
                        if let Some(frozen) = self.frozen.take() {
                            frozen.end(links, relays::fate_after_start(&declined));
                        }
                        tracing::info!(
                            relays = taken.relays,
                            declined = declined.len(),
                            pause_p99_us = taken.p99_us,
                            "upgrade: {} more relays handed over (they connected after the freeze)",
                            taken.relays
                        );
                    }
                    Err(e) => {
                        let fate = if self.untouched {
                            WorkerFate::Resume
                        } else {
                            WorkerFate::Reset
                        };
                        if let Some(frozen) = self.frozen.take() {
                            frozen.end(links, |_| fate);
                        }
                        tracing::warn!(error = %e, "upgrade: relays that connected after the freeze stay with this process");
                        break;
                    }
                }
            }
            if later == 0 || Instant::now() >= until {
                break;
            }
            std::thread::sleep(LATE_EVERY);
        }
        // The child is not waited for: it is the instance now.
        std::mem::forget(self.child);
    }

    /// Freezes the relays and sends them in acknowledged batches.
    fn send_relays(&mut self, links: &[WorkerLink]) -> Result<(), UpgradeError> {
        let frozen = relays::Frozen::take(links);
        let sent = self.send_frozen(&frozen);
        self.frozen = Some(frozen);
        sent
    }

    fn send_frozen(&self, frozen: &relays::Frozen) -> Result<(), UpgradeError> {
        let batches: Vec<_> = frozen
            .batches()
            .iter()
            .map(|b| relays::batch_message(b))
            .collect();
        self.send(&Message::Relays(frozen.len()), &[], "send the relays")?;
        let mut sent = 0;
        for (message, fds) in &batches {
            self.send(message, fds, "send the relays")?;
            if let Message::RelayBatch(images) = message {
                sent += images.len();
            }
            match self.answer("relays acknowledged")? {
                Message::Ack(n) if n == sent => {}
                other => return Err(out_of_place(&other, "an acknowledgement")),
            }
        }
        Ok(())
    }

    /// Sends `m`; a child that has exited (its end closed) is an `Ended`.
    fn send(
        &self,
        m: &Message,
        fds: &[BorrowedFd<'_>],
        op: &'static str,
    ) -> Result<(), UpgradeError> {
        fdpass::send(self.channel.as_fd(), &m.encode(), fds)
            .map_err(|source| talk_error(op, source))
    }

    /// The next message; the end of the channel is the child's end.
    fn answer(&self, stage: &'static str) -> Result<Message, UpgradeError> {
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

/// A failed send: a child that has exited (its end closed) is an `Ended`.
fn talk_error(op: &'static str, source: io::Error) -> UpgradeError {
    match source.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => UpgradeError::Ended {
            stage: before(op),
            status: String::new(),
        },
        _ => UpgradeError::Talk { op, source },
    }
}

fn before(stage: &'static str) -> &'static str {
    match stage {
        "send the header" | "send listening sockets" => {
            "before it acknowledged every listening socket"
        }
        "send the servers' health" => "before it read the servers' health",
        "send the relays" | "relays acknowledged" => "before it acknowledged every relay",
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
