//! The new process's side of an upgrade: it reads the header, the
//! listening sockets and the servers' health, says `ready`, receives the
//! frozen relays, and waits for the commit.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use super::protocol::{Message, Taken};
use super::relays::{self, AdoptOutcome, CarriedRelays};
use super::{out_of_place, UpgradeError, ANSWER_WITHIN, CHANNEL_ENV, FAULT_ENV, FORMAT};
use crate::relay::image::Inbound;
use crate::sys::fdpass;
use crate::upstream::fleet::ServerHealth;

/// Relay ids per `declined` message (at most 21 bytes each).
const DECLINED_PER_MESSAGE: usize = 2048;

/// The new process's side, between reading the sockets and the commit.
#[derive(Debug)]
pub struct Incoming {
    channel: OwnedFd,
    from: u32,
    sockets: Vec<OwnedFd>,
    health: Vec<ServerHealth>,
    /// Test-only: exit after acknowledging half of the relays.
    die_after_half_relays: bool,
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
        let fault = fault.as_deref();
        Some(
            receive(fd, fault == Some("die-after-half")).map(|mut incoming| {
                incoming.die_after_half_relays = fault == Some("die-after-half-relays");
                incoming
            }),
        )
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

    /// Says `ready`, receives the relays the old process froze, and waits
    /// for the commit (for as long as the old process takes). Until then
    /// nothing is accepted on the sockets and no relay moves.
    pub fn ready(self) -> Result<Committed, UpgradeError> {
        let talk = |op, source| UpgradeError::Talk { op, source };
        fdpass::send(self.channel.as_fd(), &Message::Ready.encode(), &[])
            .map_err(|e| talk("send ready", e))?;
        fdpass::set_timeouts(self.channel.as_fd(), None).map_err(|e| talk("wait", e))?;
        let mut relays = Vec::new();
        let mut got =
            fdpass::receive(self.channel.as_fd()).map_err(|e| talk("read the commit", e))?;
        if let Ok(Message::Relays(expected)) = Message::decode(&got.bytes) {
            let die = self.die_after_half_relays;
            relays = receive_relays(self.channel.as_fd(), expected, die)?;
            got = fdpass::receive(self.channel.as_fd()).map_err(|e| talk("read the commit", e))?;
        }
        match Message::decode(&got.bytes) {
            Ok(Message::Commit) => Ok(Committed {
                channel: self.channel,
                sockets: self.sockets,
                health: self.health,
                relays: CarriedRelays(relays),
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

/// `expected` relays in acknowledged batches.
fn receive_relays(
    channel: BorrowedFd<'_>,
    expected: usize,
    die_after_half: bool,
) -> Result<Vec<Inbound>, UpgradeError> {
    let talk = |op, source| UpgradeError::Talk { op, source };
    let mut relays = Vec::with_capacity(expected.min(1 << 16));
    while relays.len() < expected {
        let batch = fdpass::receive(channel).map_err(|e| talk("read the relays", e))?;
        let images = match Message::decode(&batch.bytes) {
            Ok(Message::RelayBatch(images)) => images,
            Ok(Message::Abort) => {
                return Err(UpgradeError::Refused(
                    "the running instance aborted the upgrade".into(),
                ))
            }
            _ => return Err(UpgradeError::Protocol("expected relays".into())),
        };
        relays.extend(relays::inbound(images, batch.fds)?);
        fdpass::send(channel, &Message::Ack(relays.len()).encode(), &[])
            .map_err(|e| talk("acknowledge", e))?;
        if die_after_half && relays.len() * 2 >= expected {
            eprintln!("spliced: {FAULT_ENV}=die-after-half-relays: exiting after {} of {expected} relays (test fault)", relays.len());
            std::process::exit(3);
        }
    }
    Ok(relays)
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
        die_after_half_relays: false,
    })
}

/// The new process after the commit: it starts on [`Committed::take_sockets`]
/// and then says [`Committed::started`] (or [`Committed::failed`]).
#[derive(Debug)]
pub struct Committed {
    channel: OwnedFd,
    sockets: Vec<OwnedFd>,
    health: Vec<ServerHealth>,
    relays: CarriedRelays,
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

    /// The old process's live relays, for this one's workers to take
    /// once started ([`crate::ProxyHandle::adopt_relays`]).
    pub fn take_relays(&mut self) -> CarriedRelays {
        std::mem::take(&mut self.relays)
    }

    /// Tells the old process this one serves, which relays it did not
    /// take, and how long the others paused: it stops accepting, lets go
    /// of the relays taken and carries on with the rest.
    pub fn started(self, relays: &AdoptOutcome) -> (Taken, LateRelays) {
        let taken = answer_started(self.channel.as_fd(), relays);
        (
            taken,
            LateRelays {
                channel: self.channel,
            },
        )
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

/// Tells the old process which relays this one declined, then `started`
/// with what it took.
fn answer_started(channel: BorrowedFd<'_>, relays: &AdoptOutcome) -> Taken {
    let send = |m: Message| fdpass::send(channel, &m.encode(), &[]);
    for ids in relays.declined.chunks(DECLINED_PER_MESSAGE) {
        let _ = send(Message::Declined(ids.to_vec()));
    }
    let taken = relays.taken();
    let _ = send(Message::Started(std::process::id(), Some(taken)));
    taken
}

/// The channel after `started`: the old process hands over, in later
/// rounds, the relays that connect there after the freeze (clients that
/// were connecting or sending their first bytes), until it closes it.
#[derive(Debug)]
pub struct LateRelays {
    channel: OwnedFd,
}

impl LateRelays {
    /// Serves the later rounds on a thread of their own: each round's
    /// relays are received, and on the commit given to `adopt`; the
    /// answer is the same as the first round's.
    pub fn serve(self, adopt: impl Fn(CarriedRelays) -> AdoptOutcome + Send + 'static) {
        let spawned = std::thread::Builder::new()
            .name("spliced-upgrade".into())
            .spawn(move || self.rounds(adopt));
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "upgrade: relays still connecting in the old process stay there");
        }
    }

    fn rounds(self, adopt: impl Fn(CarriedRelays) -> AdoptOutcome) {
        let channel = self.channel.as_fd();
        loop {
            let expected = match fdpass::receive(channel).map(|got| Message::decode(&got.bytes)) {
                Ok(Ok(Message::Relays(n))) => n,
                // The old process closed the channel: no more rounds.
                _ => return,
            };
            let relays = match receive_relays(channel, expected, false) {
                Ok(relays) => relays,
                Err(e) => {
                    tracing::warn!(error = %e, "upgrade: a later round of relays failed; they stay with the old process");
                    return;
                }
            };
            // Nothing moves before the commit: without it the old process
            // carries on with them (their descriptors close here untouched).
            match fdpass::receive(channel).map(|got| Message::decode(&got.bytes)) {
                Ok(Ok(Message::Commit)) => {}
                _ => return,
            }
            let outcome = adopt(CarriedRelays(relays));
            let taken = answer_started(channel, &outcome);
            tracing::info!(
                relays = taken.relays,
                declined = outcome.declined.len(),
                "upgrade: took {} more relays that connected in the old process after the freeze",
                taken.relays
            );
        }
    }
}
