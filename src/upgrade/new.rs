//! The new process's side: take the listening sockets, hold the relays
//! until the old process commits, then resume them in the workers.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use super::old::summary;
use super::{recv, send, Message, WireError, FAULT_ENV, FD_ENV};
use crate::control::Command;
use crate::proxy::ProxyHandle;
use crate::relay::frozen::Parcel;
use crate::sys::fdpass;

/// How long the new process waits for the old one at each step (the old
/// one waits for relays still connecting for up to two seconds).
const WAIT: Duration = Duration::from_secs(30);
/// Relays per command to a worker at the resume.
const RESUME_CHUNK: usize = 256;

/// A test-only fault, from `SPLICED_UPGRADE_FAULT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    None,
    /// Exit before reading anything.
    ExitAtOnce,
    /// Exit after receiving this many batches of relays, unacknowledged.
    DieAfterBatches(usize),
    /// Exit after every batch, before confirming the count.
    DieBeforeConfirm,
}

impl Fault {
    fn from_env() -> Fault {
        let Ok(value) = std::env::var(FAULT_ENV) else {
            return Fault::None;
        };
        match value.as_str() {
            "exit-at-once" => Fault::ExitAtOnce,
            "die-before-confirm" => Fault::DieBeforeConfirm,
            other => other
                .strip_prefix("die-after-batches=")
                .and_then(|n| n.parse().ok())
                .map_or(Fault::None, Fault::DieAfterBatches),
        }
    }
}

/// This process's end of an upgrade: it was started by a running instance
/// to take its place.
pub struct Incoming {
    socket: OwnedFd,
    fault: Fault,
}

/// What the new process took over.
#[derive(Clone, Copy, Debug)]
pub struct TakeOver {
    /// Relays resumed here.
    pub relays: usize,
    /// The process replaced (this one's parent).
    pub parent: u32,
}

impl Incoming {
    /// `None` when this process was not started by an upgrade; else its
    /// end of the upgrade socket, or why it cannot be used.
    pub fn from_env() -> Option<Result<Incoming, String>> {
        let value = std::env::var(FD_ENV).ok()?;
        // Not passed on to anything this process starts (a later upgrade
        // sets its own).
        std::env::remove_var(FD_ENV);
        let fault = Fault::from_env();
        std::env::remove_var(FAULT_ENV);
        if fault == Fault::ExitAtOnce {
            std::process::exit(3);
        }
        let adopted = value
            .parse::<i32>()
            .map_err(|_| format!("{FD_ENV}={value:?} is not a descriptor number"))
            .and_then(|fd| {
                fdpass::adopt_inherited_socket(fd).map_err(|e| format!("{FD_ENV}={fd}: {e}"))
            })
            .and_then(|socket| {
                fdpass::set_recv_timeout(socket.as_fd(), WAIT)
                    .map_err(|e| format!("{FD_ENV}: {e}"))?;
                Ok(socket)
            });
        Some(adopted.map(|socket| Incoming { socket, fault }))
    }

    /// The listening sockets the old process hands over.
    pub fn listeners(&mut self) -> Result<Vec<OwnedFd>, String> {
        let mut sockets = Vec::new();
        loop {
            match self.recv()? {
                (Message::Listeners { addrs, last }, fds) => {
                    if fds.len() != addrs.len() {
                        return Err(format!(
                            "{} listening sockets came for {} addresses",
                            fds.len(),
                            addrs.len()
                        ));
                    }
                    sockets.extend(fds);
                    if last {
                        return Ok(sockets);
                    }
                }
                (other, _) => return Err(format!("unexpected message {other:?}")),
            }
        }
    }

    /// Tells the old process this one will not take over, and why.
    pub fn refuse(self, reason: &str) {
        let refused = Message::Refused {
            reason: reason.to_string(),
        };
        let _ = send(self.socket.as_fd(), &refused, &[]);
    }

    /// Says this process serves, takes every relay the old process hands
    /// over and, once it commits, resumes them in `handle`'s workers. An
    /// error before the commit leaves every relay with the old process
    /// (this one must exit).
    pub fn take_over(self, handle: &ProxyHandle) -> Result<TakeOver, String> {
        let parent = std::os::unix::process::parent_id();
        let ready = Message::Ready {
            pid: std::process::id(),
        };
        send(self.socket.as_fd(), &ready, &[]).map_err(|e| e.to_string())?;
        let mut parked: Vec<Parcel> = Vec::new();
        let mut batches = 0;
        loop {
            let (message, fds) = self.recv()?;
            match message {
                Message::Relays { relays } => {
                    batches += 1;
                    if self.fault == Fault::DieAfterBatches(batches) {
                        std::process::exit(3);
                    }
                    let wanted: usize = relays.iter().map(|r| r.fds()).sum();
                    if wanted != fds.len() {
                        return Err(format!(
                            "{} descriptors came for relays that need {wanted}",
                            fds.len()
                        ));
                    }
                    let n = relays.len();
                    let mut fds = fds.into_iter();
                    for state in relays {
                        let fds = fds.by_ref().take(state.fds()).collect();
                        parked.push(Parcel { state, fds });
                    }
                    let ack = Message::Ack { relays: n };
                    send(self.socket.as_fd(), &ack, &[]).map_err(|e| e.to_string())?;
                }
                Message::Done { relays } => {
                    if self.fault == Fault::DieBeforeConfirm {
                        std::process::exit(3);
                    }
                    if relays != parked.len() {
                        return Err(format!("{relays} relays announced, {} came", parked.len()));
                    }
                    let holding = Message::Holding { relays };
                    send(self.socket.as_fd(), &holding, &[]).map_err(|e| e.to_string())?;
                }
                Message::Commit => break,
                other => return Err(format!("unexpected message {other:?}")),
            }
        }
        let relays = parked.len();
        let pauses = resume(handle, parked);
        let (p50_ns, p99_ns, max_ns) = summary(pauses);
        let resumed = Message::Resumed {
            relays,
            p50_ns,
            p99_ns,
            max_ns,
        };
        // The old process exits whether or not it hears this.
        let _ = send(self.socket.as_fd(), &resumed, &[]);
        Ok(TakeOver { relays, parent })
    }

    fn recv(&self) -> Result<(Message, Vec<OwnedFd>), String> {
        recv(self.socket.as_fd()).map_err(|e| match e {
            WireError::Version(_) => {
                let reason = e.to_string();
                let refused = Message::Refused {
                    reason: reason.clone(),
                };
                let _ = send(self.socket.as_fd(), &refused, &[]);
                reason
            }
            e => e.to_string(),
        })
    }
}

/// Hands the parcels to the workers in turn; each worker registers and
/// pumps its share. Returns every relay's pause.
fn resume(handle: &ProxyHandle, parcels: Vec<Parcel>) -> Vec<u64> {
    let runtime = handle.runtime();
    let (tx, rx) = mpsc::channel();
    let mut asked = 0;
    let mut parcels = parcels.into_iter().peekable();
    while parcels.peek().is_some() {
        let chunk: Vec<Parcel> = parcels.by_ref().take(RESUME_CHUNK).collect();
        if runtime
            .next_link()
            .send(Command::Resume(chunk, tx.clone()))
            .is_ok()
        {
            asked += 1;
        }
    }
    drop(tx);
    let mut pauses = Vec::new();
    for _ in 0..asked {
        match rx.recv() {
            Ok(mut some) => pauses.append(&mut some),
            Err(_) => break,
        }
    }
    pauses
}
