//! The live relays' part of an upgrade. The old process freezes every
//! relay it can hand over ([`Frozen`]: out of its workers' epoll sets,
//! moved by nothing), sends their images and descriptors in batches, and
//! after the new process's answer gives each back to its worker to let go
//! of, resume or reset. The new process receives them ([`receive`]) and,
//! once started, its workers take them ([`adopt`]).

use std::collections::HashSet;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::time::Duration;

use super::protocol::{Message, Taken};
use super::UpgradeError;
use crate::control::{Adopted, Command, Fate, WorkerLink};
use crate::relay::image::{Inbound, Outbound, RelayImage};
use crate::sys::fdpass;

/// Text per `relay-batch` message, well inside [`fdpass::MAX_MESSAGE`].
const BATCH_TEXT: usize = 48 * 1024;

/// The relays the old process froze, by the worker they came from.
pub(super) struct Frozen {
    per_worker: Vec<(usize, Vec<Outbound>)>,
    /// Clients the workers still connect or read, which may become
    /// relays to hand over (a worker that did not answer counts one).
    pub(super) later: usize,
}

impl Frozen {
    /// Freezes every worker's relays that can be handed over. A worker
    /// that does not answer keeps its relays (it resumes them once it sees
    /// the answer was not taken).
    pub(super) fn take(links: &[WorkerLink]) -> Frozen {
        let asked: Vec<_> = links
            .iter()
            .enumerate()
            .filter_map(|(i, link)| {
                let (tx, rx) = std::sync::mpsc::channel();
                link.send(Command::FreezeRelays(tx)).ok().map(|()| (i, rx))
            })
            .collect();
        let mut later = 0;
        let per_worker = asked
            .into_iter()
            .filter_map(|(i, rx)| match rx.recv_timeout(Duration::from_secs(10)) {
                Ok((relays, pending)) => {
                    later += pending;
                    Some((i, relays))
                }
                Err(_) => {
                    later += 1;
                    None
                }
            })
            .collect();
        Frozen { per_worker, later }
    }

    pub(super) fn len(&self) -> usize {
        self.per_worker.iter().map(|(_, r)| r.len()).sum()
    }

    /// The relays in batches of whole relays, each within the kernel's
    /// descriptors per message and [`BATCH_TEXT`].
    pub(super) fn batches(&self) -> Vec<Vec<&Outbound>> {
        let mut batches = Vec::new();
        let (mut batch, mut fds, mut text) = (Vec::new(), 0, 0);
        for relay in self.per_worker.iter().flat_map(|(_, r)| r) {
            let (n, t) = (
                relay.image.descriptors(),
                200 + relay.image.listener.len() * 3,
            );
            if !batch.is_empty() && (fds + n > fdpass::MAX_FDS_PER_MESSAGE || text + t > BATCH_TEXT)
            {
                batches.push(std::mem::take(&mut batch));
                (fds, text) = (0, 0);
            }
            batch.push(relay);
            fds += n;
            text += t;
        }
        if !batch.is_empty() {
            batches.push(batch);
        }
        batches
    }

    /// Gives every relay back to its worker with its fate.
    pub(super) fn end(self, links: &[WorkerLink], fate: impl Fn(u64) -> Fate) {
        for (i, relays) in self.per_worker {
            if relays.is_empty() {
                continue;
            }
            let back = relays
                .into_iter()
                .map(|o| {
                    let f = fate(o.image.id);
                    (o.relay, f)
                })
                .collect();
            // A worker that exited has closed its relays already.
            let _ = links[i].send(Command::EndFreeze(back));
        }
    }
}

/// One batch as a message and its descriptors.
pub(super) fn batch_message<'a>(batch: &[&'a Outbound]) -> (Message, Vec<BorrowedFd<'a>>) {
    let images = batch.iter().map(|o| o.image.clone()).collect();
    let fds = batch.iter().flat_map(|o| o.fds()).collect();
    (Message::RelayBatch(images), fds)
}

/// Splits a received batch's descriptors among its relays, in the order
/// the images count them.
pub(super) fn inbound(
    images: Vec<RelayImage>,
    fds: Vec<OwnedFd>,
) -> Result<Vec<Inbound>, UpgradeError> {
    let wanted: usize = images.iter().map(RelayImage::descriptors).sum();
    if wanted != fds.len() {
        return Err(UpgradeError::Protocol(format!(
            "{} relays need {wanted} descriptors; {} came",
            images.len(),
            fds.len()
        )));
    }
    let mut fds = fds.into_iter();
    Ok(images
        .into_iter()
        .map(|image| {
            let fds = fds.by_ref().take(image.descriptors()).collect();
            Inbound { image, fds }
        })
        .collect())
}

/// Relays carried from the old process, for the new one's workers
/// ([`crate::ProxyHandle::adopt_relays`]).
#[derive(Debug, Default)]
pub struct CarriedRelays(pub(crate) Vec<Inbound>);

impl CarriedRelays {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// What the new process's workers made of the carried relays.
#[derive(Debug, Default)]
pub struct AdoptOutcome {
    /// Relays not taken, by id: the old process carries on with them.
    pub declined: Vec<u64>,
    /// Each relay taken: from its freeze in the old process to its
    /// registration here.
    pub pauses: Vec<Duration>,
}

impl AdoptOutcome {
    /// The count and pause distribution the old process is told.
    pub fn taken(&self) -> Taken {
        let mut us: Vec<u64> = self.pauses.iter().map(|d| d.as_micros() as u64).collect();
        us.sort_unstable();
        let at = |q: f64| {
            if us.is_empty() {
                return 0;
            }
            let i = ((us.len() as f64 * q).ceil() as usize).clamp(1, us.len()) - 1;
            us[i]
        };
        Taken {
            relays: us.len(),
            p50_us: at(0.5),
            p99_us: at(0.99),
            max_us: us.last().copied().unwrap_or(0),
        }
    }
}

/// Gives carried relays to a running proxy's workers, from any thread
/// ([`crate::ProxyHandle::relay_adopter`]).
#[derive(Clone)]
pub struct RelayAdopter {
    pub(crate) links: Vec<WorkerLink>,
}

impl RelayAdopter {
    pub fn adopt(&self, relays: CarriedRelays) -> AdoptOutcome {
        adopt(&self.links, relays)
    }
}

/// Hands the carried relays to the workers (round-robin by chunks) and
/// waits for each worker's answer. Relay ids carry on from the highest
/// carried one, so no new relay takes a carried id.
pub(crate) fn adopt(links: &[WorkerLink], relays: CarriedRelays) -> AdoptOutcome {
    let mut outcome = AdoptOutcome::default();
    if let Some(max) = relays.0.iter().map(|r| r.image.id).max() {
        crate::worker::relay_ids_after(max);
    }
    if links.is_empty() {
        outcome.declined = relays.0.iter().map(|r| r.image.id).collect();
        return outcome;
    }
    let per = relays.0.len().div_ceil(links.len()).max(1);
    let mut relays = relays.0.into_iter();
    let mut waiting = Vec::new();
    for link in links {
        let chunk: Vec<Inbound> = relays.by_ref().take(per).collect();
        if chunk.is_empty() {
            break;
        }
        let ids: Vec<u64> = chunk.iter().map(|r| r.image.id).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        match link.send(Command::AdoptRelays(chunk, tx)) {
            Ok(()) => waiting.push((ids, rx)),
            // The worker is gone: the old process keeps these.
            Err(_) => outcome.declined.extend(ids),
        }
    }
    for (ids, rx) in waiting {
        match rx.recv() {
            Ok(Adopted { declined, pauses }) => {
                for (id, why) in declined {
                    tracing::warn!(relay = id, reason = %why, "upgrade: relay left with the old process");
                    outcome.declined.push(id);
                }
                outcome
                    .pauses
                    .extend(pauses.into_iter().map(Duration::from_nanos));
            }
            Err(_) => outcome.declined.extend(ids),
        }
    }
    outcome
}

/// The fate of each relay once the new process answered `started`: the
/// ones it declined resume here, the rest are its own.
pub(super) fn fate_after_start(declined: &HashSet<u64>) -> impl Fn(u64) -> Fate + '_ {
    move |id| {
        if declined.contains(&id) {
            Fate::Resume
        } else {
            Fate::Handed
        }
    }
}
