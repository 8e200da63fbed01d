//! A relay on its way to a live upgrade's new process: frozen here into an
//! image (what it is, as plain data) and its descriptors, rebuilt there
//! from them. A pipe passes with the bytes in it; a copy buffer's bytes
//! pass in a memory file. Only a connected pair passes: a relay still
//! connecting or negotiating, or one an embedder waits for, stays where it
//! is.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;

use super::core::CoreImage;
use super::session::Session;
use super::{Relay, RelayCore, RouteTag};
use crate::engine::{Buffer, Held, Pools, Slot, SlotImage, Stream};
use crate::listener::{Admission, Listener};
use crate::sys::{self, fdpass};
use crate::upstream::{Pool, Round};

/// Where a direction's pending bytes travel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Carry {
    Nothing,
    /// In its pipe (two descriptors, read end first).
    Pipe,
    /// This many bytes of the copy buffer, in the relay's memory file.
    Bytes(usize),
}

/// A relay as plain data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RelayImage {
    pub(crate) id: u64,
    /// Its listener, by name.
    pub(crate) listener: String,
    pub(crate) route: Option<RouteTag>,
    pub(crate) client_addr: Option<SocketAddr>,
    pub(crate) upstream_addr: Option<SocketAddr>,
    pub(crate) core: CoreImage,
    pub(crate) c2u: SlotImage,
    pub(crate) u2c: SlotImage,
    pub(crate) c2u_carry: Carry,
    pub(crate) u2c_carry: Carry,
    /// When it stopped moving, in CLOCK_MONOTONIC nanoseconds (one clock
    /// for every process of the host): its pause is measured from here.
    pub(crate) frozen_at: u64,
}

impl RelayImage {
    /// How many descriptors come with it: both sockets, two per pipe, and
    /// the memory file if a copy buffer held bytes.
    pub(crate) fn descriptors(&self) -> usize {
        let pipes = [self.c2u_carry, self.u2c_carry]
            .iter()
            .filter(|c| **c == Carry::Pipe)
            .count();
        let bytes = [self.c2u_carry, self.u2c_carry]
            .iter()
            .any(|c| matches!(c, Carry::Bytes(_)));
        2 + 2 * pipes + usize::from(bytes)
    }
}

/// A frozen relay on its way out: its image, the relay itself (its
/// descriptors are passed from it, not duplicated: a process near its fd
/// limit has no room for copies), and the memory file holding its copy
/// buffers' bytes, if they held any.
pub(crate) struct Outbound {
    pub(crate) image: RelayImage,
    pub(crate) relay: Relay,
    memfd: Option<OwnedFd>,
}

impl Outbound {
    /// Its descriptors, in the order [`RelayImage::descriptors`] counts
    /// them: client, upstream, the client→upstream pipe, the
    /// upstream→client pipe, the memory file.
    pub(crate) fn fds(&self) -> Vec<BorrowedFd<'_>> {
        let r = &self.relay;
        let mut fds = vec![r.client.as_fd(), r.upstream.as_fd()];
        for (slot, carry) in [
            (&r.c2u_slot, self.image.c2u_carry),
            (&r.u2c_slot, self.image.u2c_carry),
        ] {
            if let (Carry::Pipe, Some(Buffer::Pipe(pipe))) = (carry, slot.buffer()) {
                fds.extend([pipe.pipe().read_end(), pipe.pipe().write_end()]);
            }
        }
        fds.extend(self.memfd.as_ref().map(|m| m.as_fd()));
        fds
    }
}

/// A relay arrived from the old process: its image and its descriptors.
#[derive(Debug)]
pub(crate) struct Inbound {
    pub(crate) image: RelayImage,
    pub(crate) fds: Vec<OwnedFd>,
}

/// What the new process's worker found for a relay: its listener, the
/// pool holding its server and a lease on it (if the pool still has it),
/// and its room under the listener's limits.
pub(crate) struct Placing {
    pub(crate) listener: Arc<Listener>,
    pub(crate) pool: Arc<Pool>,
    pub(crate) round: Round,
    pub(crate) admission: Admission,
    pub(crate) worker: usize,
}

impl Relay {
    /// Whether a live upgrade can hand this relay over now: a connected
    /// TCP pair, nothing negotiated for it, no embedder waiting for it.
    pub(crate) fn can_hand_over(&self) -> bool {
        !self.core.is_connecting()
            && self.session.negotiation.is_none()
            && self.session.reporter.is_none()
            && self.client.as_tcp().is_some()
            && self.upstream.as_tcp().is_some()
    }

    /// Whether a live upgrade can hand this relay over once its connect
    /// and negotiation are done (no embedder waits for it).
    pub(crate) fn can_hand_over_later(&self) -> bool {
        self.session.reporter.is_none()
            && self.client.as_tcp().is_some()
            && (self.core.is_connecting() || self.session.negotiation.is_some())
    }

    /// Stops the relay where it is, for a live upgrade: its image at `now`
    /// (monotonic `frozen_at`) and the relay itself, moved by nothing until
    /// it comes back to its worker. Gives the relay back if its bytes
    /// cannot be accounted for.
    pub(crate) fn freeze(
        self,
        now: Instant,
        frozen_at: u64,
    ) -> Result<Outbound, Box<(Relay, io::Error)>> {
        let core = self.core.image(now);
        let mut bytes = Vec::new();
        let mut carry = |slot: &Slot, pending: usize| -> io::Result<Carry> {
            match slot.buffer() {
                _ if pending == 0 => Ok(Carry::Nothing),
                Some(Buffer::Pipe(_)) => Ok(Carry::Pipe),
                Some(Buffer::Mapped(heap)) if heap.unsent().len() == pending => {
                    bytes.extend_from_slice(heap.unsent());
                    Ok(Carry::Bytes(pending))
                }
                _ => Err(io::Error::other(format!(
                    "{pending} bytes pending with no buffer holding them"
                ))),
            }
        };
        let carries = carry(&self.c2u_slot, core.c2u.pending)
            .and_then(|c2u| Ok((c2u, carry(&self.u2c_slot, core.u2c.pending)?)));
        let (c2u_carry, u2c_carry) = match carries {
            Ok(c) => c,
            Err(e) => return Err(Box::new((self, e))),
        };
        let memfd = match (!bytes.is_empty()).then(|| fdpass::memfd_holding(&bytes)) {
            None => None,
            Some(Ok(fd)) => Some(fd),
            Some(Err(e)) => return Err(Box::new((self, e))),
        };
        Ok(Outbound {
            image: RelayImage {
                id: self.id,
                listener: self.session.listener.label().to_owned(),
                route: self.session.route.as_deref().cloned(),
                client_addr: self.session.client_addr,
                upstream_addr: self.session.upstream_addr,
                core,
                c2u: self.c2u_slot.image(),
                u2c: self.u2c_slot.image(),
                c2u_carry,
                u2c_carry,
                frozen_at,
            },
            relay: self,
            memfd,
        })
    }

    /// The relay another process froze, rebuilt at `now` from its image
    /// and descriptors: it moves on from where it stopped. Fails (closing
    /// the descriptors, which the old process still holds) only when a
    /// buffer cannot be had or the descriptors do not match the image.
    pub(crate) fn thawed(
        inbound: Inbound,
        placing: Placing,
        pools: &mut Pools,
        now: Instant,
    ) -> io::Result<Relay> {
        let Inbound { image, fds } = inbound;
        if fds.len() != image.descriptors() {
            return Err(io::Error::other(format!(
                "relay {} came with {} descriptors, not {}",
                image.id,
                fds.len(),
                image.descriptors()
            )));
        }
        let mut fds = fds.into_iter();
        let mut next = || {
            fds.next()
                .ok_or_else(|| io::Error::other("missing descriptor"))
        };
        let tcp = |fd: OwnedFd| Stream::Tcp(TcpStream::from_std(std::net::TcpStream::from(fd)));
        let client = tcp(next()?);
        let upstream = tcp(next()?);
        let mut pipe = |carry: Carry| -> io::Result<Option<sys::Pipe>> {
            Ok(match carry {
                Carry::Pipe => Some(sys::Pipe::from_ends(next()?, next()?)),
                _ => None,
            })
        };
        let c2u_pipe = pipe(image.c2u_carry)?;
        let u2c_pipe = pipe(image.u2c_carry)?;
        let length = |c: Carry| match c {
            Carry::Bytes(n) => n,
            _ => 0,
        };
        let (c2u_len, u2c_len) = (length(image.c2u_carry), length(image.u2c_carry));
        let mut bytes = match fds.next() {
            Some(memfd) => fdpass::memfd_bytes(memfd, c2u_len + u2c_len)?,
            None => Vec::new(),
        };
        let u2c_bytes = bytes.split_off(c2u_len);
        let held = |pipe: Option<sys::Pipe>, bytes: Vec<u8>| match pipe {
            Some(pipe) => Held::Pipe(pipe),
            None if !bytes.is_empty() => Held::Bytes(bytes),
            None => Held::Nothing,
        };
        let mode = placing.listener.config.mode;
        let c2u_slot = Slot::from_image(mode, image.c2u, held(c2u_pipe, bytes), pools)?;
        let u2c_slot = match Slot::from_image(mode, image.u2c, held(u2c_pipe, u2c_bytes), pools) {
            Ok(slot) => slot,
            Err(e) => {
                let mut c2u_slot = c2u_slot;
                c2u_slot.discard(pools, image.core.c2u.pending);
                return Err(e);
            }
        };
        let server = placing
            .round
            .server()
            .map(|s| s.block(placing.worker).clone());
        Ok(Relay {
            id: image.id,
            session: Session {
                listener: placing.listener,
                pool: placing.pool,
                route: image.route.map(Box::new),
                negotiation: None,
                upstream_addr: image.upstream_addr,
                client_addr: image.client_addr,
                round: placing.round,
                admission: placing.admission,
                reporter: None,
                first_bytes: Box::default(),
            },
            client,
            upstream,
            progress_at: None,
            server,
            core: RelayCore::from_image(&image.core, now),
            armed_at: None,
            queued: false,
            ahead_header: 0,
            c2u_slot,
            u2c_slot,
        })
    }

    /// Lets go of a relay the new process took: its buffers go back (a
    /// pipe that held bytes is closed, never pooled: the new process
    /// owns what is in it) and its descriptors close, which ends nothing
    /// while the new process holds the same sockets. No line, no count of
    /// a close: the relay lives on there.
    pub(crate) fn hand_away(mut self, pools: &mut Pools) {
        let (c2u, u2c) = (
            self.core.direction(super::Peer::Client).pending(),
            self.core.direction(super::Peer::Upstream).pending(),
        );
        self.c2u_slot.discard(pools, c2u);
        self.u2c_slot.discard(pools, u2c);
    }
}
