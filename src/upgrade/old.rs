//! The old process's side: start the new binary, hand it the listeners and
//! the relays, and take everything back if it does not confirm.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{percentile, recv, send, Message, WireError, BATCH_FDS, BATCH_RELAYS, FD_ENV};
use crate::control::{Command, Frozen, WorkerLink};
use crate::relay::Relay;
use crate::sys::fdpass;

/// How long the new process may take to start and answer each step.
const STEP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long relays still connecting (or reading a first packet) are waited
/// for before the rest is committed without them.
const SETTLE: Duration = Duration::from_secs(2);
/// Between two freezes while relays settle.
const SETTLE_STEP: Duration = Duration::from_millis(5);

/// Starts upgrades of a running proxy; one at a time.
#[derive(Clone)]
pub struct Upgrader {
    links: Vec<WorkerLink>,
    busy: Arc<Mutex<()>>,
}

/// What an upgrade did.
#[derive(Clone, Debug)]
pub struct UpgradeReport {
    /// The new process.
    pub pid: u32,
    /// Relays handed over.
    pub relays: usize,
    /// Relays left to finish here (still connecting when the wait ended).
    pub left_behind: usize,
    /// Bytes in flight handed over in the relays' buffers (pipes and copy
    /// buffers).
    pub bytes_in_flight: u64,
    /// From the request to the new process's confirmation.
    pub total: Duration,
    pub pause_p50: Duration,
    pub pause_p99: Duration,
    pub pause_max: Duration,
}

/// Why an upgrade failed. In every case but [`UpgradeError::AfterCommit`]
/// the old process took every relay back and serves on.
#[derive(Debug)]
pub enum UpgradeError {
    /// Another upgrade is under way.
    Busy,
    /// The binary cannot be used.
    Binary(PathBuf, std::io::Error),
    /// The new process could not be started.
    Spawn(PathBuf, std::io::Error),
    /// The new process said no.
    Refused(String),
    /// The new process died, timed out or spoke garbage at a step.
    Failed { step: &'static str, why: String },
    /// The new process failed after it took the relays over: they are lost.
    AfterCommit(String),
}

impl std::fmt::Display for UpgradeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpgradeError::Busy => f.write_str("another upgrade is under way"),
            UpgradeError::Binary(p, e) => write!(f, "cannot use the binary {}: {e}", p.display()),
            UpgradeError::Spawn(p, e) => write!(f, "cannot start {}: {e}", p.display()),
            UpgradeError::Refused(why) => write!(f, "the new process refused: {why}"),
            UpgradeError::Failed { step, why } => write!(f, "{step}: {why}"),
            UpgradeError::AfterCommit(why) => write!(
                f,
                "the new process failed after taking the relays over: {why}"
            ),
        }
    }
}

impl std::error::Error for UpgradeError {}

impl Upgrader {
    pub(crate) fn new(links: Vec<WorkerLink>) -> Upgrader {
        Upgrader {
            links,
            busy: Arc::new(Mutex::new(())),
        }
    }

    /// Starts `binary` (default: the binary this process was started from,
    /// as it is on disk now) with this process's arguments and hands it
    /// everything. On success this process has nothing left but relays
    /// that were still connecting; the caller drains it and exits.
    pub fn upgrade(&self, binary: Option<&Path>) -> Result<UpgradeReport, UpgradeError> {
        let _one = self.busy.try_lock().map_err(|_| UpgradeError::Busy)?;
        let started = Instant::now();
        let binary = match binary {
            Some(p) => p.to_path_buf(),
            None => own_binary()
                .map_err(|e| UpgradeError::Binary(PathBuf::from("/proc/self/exe"), e))?,
        };
        check_binary(&binary).map_err(|e| UpgradeError::Binary(binary.clone(), e))?;
        let failed = |step| {
            move |e: std::io::Error| UpgradeError::Failed {
                step,
                why: e.to_string(),
            }
        };
        let (ours, theirs) = fdpass::seqpacket_pair().map_err(failed("make the socket pair"))?;
        fdpass::inherit_on_exec(theirs.as_fd()).map_err(failed("make the socket pair"))?;
        fdpass::set_recv_timeout(ours.as_fd(), STEP_TIMEOUT)
            .map_err(failed("make the socket pair"))?;
        let child = Process::new(&binary)
            .args(std::env::args_os().skip(1))
            .env(FD_ENV, theirs.as_raw_fd().to_string())
            .spawn()
            .map_err(|e| UpgradeError::Spawn(binary.clone(), e))?;
        drop(theirs);
        tracing::info!(binary = %binary.display(), pid = child.id(), "upgrade: new process started");
        let mut run = Run {
            links: &self.links,
            socket: ours,
            child,
            held: (0..self.links.len()).map(|_| Vec::new()).collect(),
            kept: (0..self.links.len()).map(|_| Vec::new()).collect(),
            sent: 0,
            in_flight: 0,
            committed: false,
        };
        let outcome = run.hand_over(started);
        match outcome {
            Ok(report) => {
                // The new process holds every descriptor: ours close, and
                // nothing ends.
                drop(std::mem::take(&mut run.held));
                let kept = std::mem::take(&mut run.kept);
                for (link, relays) in self.links.iter().zip(kept) {
                    let _ = link.send(Command::Thaw {
                        relays,
                        accept: false,
                    });
                }
                Ok(report)
            }
            Err(e) => {
                run.abandon();
                Err(e)
            }
        }
    }
}

/// One upgrade under way.
struct Run<'a> {
    links: &'a [WorkerLink],
    socket: OwnedFd,
    child: Child,
    /// Relays sent (or being sent), per worker, kept whole until commit.
    held: Vec<Vec<Relay>>,
    /// Relays that could not be exported: they stay in their worker.
    kept: Vec<Vec<Relay>>,
    sent: usize,
    in_flight: u64,
    committed: bool,
}

impl Run<'_> {
    fn hand_over(&mut self, started: Instant) -> Result<UpgradeReport, UpgradeError> {
        self.send_listeners()?;
        let pid = match self.recv("start the new process")? {
            Message::Ready { pid } => pid,
            Message::Refused { reason } => return Err(UpgradeError::Refused(reason)),
            other => return Err(self.unexpected("start the new process", &other)),
        };
        let settle_until = Instant::now() + SETTLE;
        let left_behind = loop {
            let waiting = self.freeze_and_send()?;
            if waiting == 0 || Instant::now() >= settle_until {
                break waiting;
            }
            std::thread::sleep(SETTLE_STEP);
        };
        self.send_message("hand the relays", &Message::Done { relays: self.sent }, &[])?;
        match self.recv("confirm the relays")? {
            Message::Holding { relays } if relays == self.sent => {}
            Message::Holding { relays } => {
                return Err(UpgradeError::Failed {
                    step: "confirm the relays",
                    why: format!("the new process holds {relays} of {} relays", self.sent),
                })
            }
            Message::Refused { reason } => return Err(UpgradeError::Refused(reason)),
            other => return Err(self.unexpected("confirm the relays", &other)),
        }
        // From here the relays are the new process's.
        self.send_message("commit", &Message::Commit, &[])?;
        self.committed = true;
        let (p50, p99, max) = match self.recv("resume the relays") {
            Ok(Message::Resumed {
                p50_ns,
                p99_ns,
                max_ns,
                ..
            }) => (p50_ns, p99_ns, max_ns),
            Ok(other) => return Err(UpgradeError::AfterCommit(format!("{other:?}"))),
            Err(e) => return Err(UpgradeError::AfterCommit(e.to_string())),
        };
        Ok(UpgradeReport {
            pid,
            relays: self.sent,
            left_behind,
            bytes_in_flight: self.in_flight,
            total: started.elapsed(),
            pause_p50: Duration::from_nanos(p50),
            pause_p99: Duration::from_nanos(p99),
            pause_max: Duration::from_nanos(max),
        })
    }

    /// Every worker's listening sockets, at most a batch's worth a message.
    fn send_listeners(&mut self) -> Result<(), UpgradeError> {
        let (tx, rx) = mpsc::channel();
        let mut asked = 0;
        for link in self.links {
            if link.send(Command::Listening(tx.clone())).is_ok() {
                asked += 1;
            }
        }
        let mut sockets = Vec::new();
        for _ in 0..asked {
            match rx.recv_timeout(STEP_TIMEOUT) {
                Ok(mut some) => sockets.append(&mut some),
                Err(_) => {
                    return Err(UpgradeError::Failed {
                        step: "collect the listening sockets",
                        why: "a worker did not answer".into(),
                    })
                }
            }
        }
        let chunks: Vec<_> = sockets.chunks(BATCH_FDS).collect();
        let count = chunks.len().max(1);
        for i in 0..count {
            let chunk = chunks.get(i).copied().unwrap_or(&[]);
            let addrs = chunk.iter().map(|(a, _)| *a).collect();
            let fds: Vec<RawFd> = chunk.iter().map(|(_, s)| s.as_raw_fd()).collect();
            let message = Message::Listeners {
                addrs,
                last: i + 1 == count,
            };
            self.send_message("hand the listening sockets", &message, &fds)?;
        }
        Ok(())
    }

    /// One freeze of every worker; sends what they gave up and returns how
    /// many relays could not be handed yet.
    fn freeze_and_send(&mut self) -> Result<usize, UpgradeError> {
        let (tx, rx) = mpsc::channel::<Frozen>();
        let mut asked = 0;
        for link in self.links {
            if link.send(Command::Freeze(tx.clone())).is_ok() {
                asked += 1;
            }
        }
        drop(tx);
        let mut waiting = 0;
        let mut frozen = Vec::new();
        for _ in 0..asked {
            let Ok(part) = rx.recv_timeout(STEP_TIMEOUT) else {
                return Err(UpgradeError::Failed {
                    step: "freeze the relays",
                    why: "a worker did not answer".into(),
                });
            };
            waiting += part.waiting;
            frozen.push(part);
        }
        // Every frozen relay is kept whole before anything is sent, so a
        // failure at any point leaves none of them out of `held`.
        let mut round = Vec::new();
        for part in frozen {
            for (relay, frozen_ns) in part.relays {
                let at = self.held[part.worker].len();
                self.held[part.worker].push(relay);
                round.push((part.worker, at, frozen_ns));
            }
        }
        let now = Instant::now();
        let now_ns = fdpass::monotonic_ns();
        let mut batch = Vec::new();
        let mut fds: Vec<RawFd> = Vec::new();
        let mut memfds = Vec::new();
        let mut unsendable = Vec::new();
        for (worker, at, frozen_ns) in round {
            let relay = &self.held[worker][at];
            match relay.export(frozen_ns, now, now_ns) {
                Ok((state, mut relay_fds, mut made)) => {
                    self.in_flight += (state.c2u.pending + state.u2c.pending) as u64;
                    batch.push(state);
                    fds.append(&mut relay_fds);
                    memfds.append(&mut made);
                }
                Err(e) => {
                    tracing::error!(relay = relay.id, error = %e, "upgrade: cannot hand a relay over; it stays here");
                    waiting += 1;
                    unsendable.push((worker, at));
                    continue;
                }
            }
            if fds.len() >= BATCH_FDS || batch.len() >= BATCH_RELAYS {
                self.send_batch(&mut batch, &mut fds, &mut memfds)?;
            }
        }
        if !batch.is_empty() {
            self.send_batch(&mut batch, &mut fds, &mut memfds)?;
        }
        // Highest index first, so the others stay where they are.
        unsendable.sort_unstable_by(|a, b| b.cmp(a));
        for (worker, at) in unsendable {
            let relay = self.held[worker].swap_remove(at);
            self.kept[worker].push(relay);
        }
        Ok(waiting)
    }

    fn send_batch(
        &mut self,
        batch: &mut Vec<crate::relay::frozen::RelayState>,
        fds: &mut Vec<RawFd>,
        memfds: &mut Vec<OwnedFd>,
    ) -> Result<(), UpgradeError> {
        let relays = std::mem::take(batch);
        let n = relays.len();
        self.send_message("hand the relays", &Message::Relays { relays }, fds)?;
        fds.clear();
        memfds.clear();
        match self.recv("hand the relays")? {
            Message::Ack { relays } if relays == n => {
                self.sent += n;
                Ok(())
            }
            Message::Refused { reason } => Err(UpgradeError::Refused(reason)),
            other => Err(self.unexpected("hand the relays", &other)),
        }
    }

    fn send_message(
        &mut self,
        step: &'static str,
        message: &Message,
        fds: &[RawFd],
    ) -> Result<(), UpgradeError> {
        send(self.socket.as_fd(), message, fds).map_err(|e| self.died(step, e.to_string()))
    }

    fn recv(&mut self, step: &'static str) -> Result<Message, UpgradeError> {
        match recv(self.socket.as_fd()) {
            Ok((message, _fds)) => Ok(message),
            Err(WireError::Version(v)) => Err(UpgradeError::Refused(format!(
                "it speaks snapshot format {v}; this binary speaks format {}",
                super::FORMAT
            ))),
            Err(e) => Err(self.died(step, e.to_string())),
        }
    }

    /// A failure at `step`, with the child's exit status if it is gone.
    fn died(&mut self, step: &'static str, why: String) -> UpgradeError {
        // A closed socket usually means the child is exiting: give it a
        // moment to be reaped, so the reason names its exit status.
        let until = Instant::now() + Duration::from_millis(500);
        let why = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break format!("the new process exited ({status})"),
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(5)),
                _ => break why,
            }
        };
        UpgradeError::Failed { step, why }
    }

    fn unexpected(&self, step: &'static str, message: &Message) -> UpgradeError {
        UpgradeError::Failed {
            step,
            why: format!("unexpected message {message:?}"),
        }
    }

    /// The upgrade failed: stop the child, take every relay back (unless
    /// committed: then they are the child's, and ours only close) and
    /// accept again.
    fn abandon(&mut self) {
        if !self.committed {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let held = std::mem::take(&mut self.held);
        let kept = std::mem::take(&mut self.kept);
        for ((link, mut relays), mut kept) in self.links.iter().zip(held).zip(kept) {
            if self.committed {
                relays.clear();
            }
            relays.append(&mut kept);
            let _ = link.send(Command::Thaw {
                relays,
                accept: true,
            });
        }
    }
}

/// The binary this process runs, as its path names it now (the file may
/// have been replaced since: that is the point).
fn own_binary() -> std::io::Result<PathBuf> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let text = exe.to_string_lossy();
    Ok(PathBuf::from(
        text.strip_suffix(" (deleted)").unwrap_or(&text).to_string(),
    ))
}

/// A regular file someone may execute.
fn check_binary(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "not an executable file",
        ));
    }
    Ok(())
}

/// Sorted pauses → (p50, p99, max).
pub(crate) fn summary(mut pauses: Vec<u64>) -> (u64, u64, u64) {
    pauses.sort_unstable();
    (
        percentile(&pauses, 50),
        percentile(&pauses, 99),
        pauses.last().copied().unwrap_or(0),
    )
}
