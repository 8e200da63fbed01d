//! What a worker reads from a client before it connects upstream, for the
//! listeners that ask for it: the PROXY header (`accept-proxy`) and the
//! first PostgreSQL packet (`protocol = "postgres"`), to recognise a
//! CancelRequest. Every other listener starts its upstream connect at
//! accept, as before; the relay itself never changes.
//!
//! A pending client is registered under a preface token and read with a
//! deadline. Whatever it sent past the header reaches the server first,
//! as read-ahead bytes of the client→upstream direction (after the PROXY
//! header spliced sends itself, with `send-proxy`).
//!
//! A CancelRequest (16 bytes: length 16, code 80877102) cannot be routed
//! by its key without knowing every session's, so it is sent to every
//! server of every pool the listener can send clients to: each connect is
//! a preface entry too, written once connected and closed. PostgreSQL
//! ignores a key it does not know.
//!
//! A listener with routes reads the client's opening as far as its routes
//! need (`route::startup`): requests are answered as the server would
//! (`N` to GSS encryption, `S` to TLS, on its behalf), then the startup
//! packet or the TLS ClientHello chooses the route. A client no route
//! takes, or whose hello cannot be read, is reset, with nothing sent to
//! any server.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use mio::net::TcpStream;
use mio::Interest;
use slab::Slab;

use super::start::Arrival;
use super::Worker;
use crate::config::{format_duration, Protocol, SendProxy};
use crate::listener::{Admission, Listener, Reservation};
use crate::pgwire;
use crate::proxy_protocol;
use crate::route::startup::{Opening, TlsStyle};
use crate::route::Shown;
use crate::token;
use crate::upstream::Pool;

mod cancel;
mod decide;

use cancel::CancelSend;
use decide::{read_some, Decision};

/// PostgreSQL's CancelRequest: its length and its request code.
const CANCEL_LEN: usize = pgwire::CANCEL_REQUEST_LEN;
const CANCEL_CODE: u32 = pgwire::CANCEL_REQUEST_CODE;

/// Room under the listener's limits: reserved before the header names
/// the client, admitted once it did.
enum Hold {
    Reserved(Reservation),
    Admitted(Admission),
    Taken,
}

struct Pending {
    client: TcpStream,
    /// The client's address: the socket's, or the header's source.
    client_addr: SocketAddr,
    /// The address the client connected to: the header's destination,
    /// when it named one.
    local: Option<SocketAddr>,
    listener: Arc<Listener>,
    hold: Hold,
    buf: Vec<u8>,
    header_done: bool,
    deadline: Instant,
    /// When the client was accepted (its queue-timeout counts from then).
    accepted_at: Instant,
    /// A listener with routes: the opening read so far.
    opening: Option<Opening>,
}

enum Entry {
    Client(Box<Pending>),
    Cancel(CancelSend),
}

impl Entry {
    fn deadline(&self) -> Instant {
        match self {
            Entry::Client(p) => p.deadline,
            Entry::Cancel(c) => c.deadline,
        }
    }
}

/// A worker's connections that have no relay yet.
#[derive(Default)]
pub(super) struct Prefaces {
    entries: Slab<Entry>,
    next: Option<Instant>,
}

impl Prefaces {
    pub(super) fn next(&self) -> Option<Instant> {
        self.next
    }

    /// No client is being read and no cancel is on its way.
    pub(super) fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Clients being read (cancel requests on their way not counted).
    #[cfg(feature = "service")]
    pub(super) fn clients(&self) -> usize {
        self.entries
            .iter()
            .filter(|(_, e)| matches!(e, Entry::Client(_)))
            .count()
    }

    fn wake_by(&mut self, deadline: Instant) {
        self.next = Some(self.next.map_or(deadline, |n| n.min(deadline)));
    }
}

/// Whether a listener reads anything before its upstream connect.
pub(super) fn wanted(listener: &Listener) -> bool {
    listener.config.accept_proxy.is_some() || listener.config.protocol != Protocol::None
}

/// When a client still reading its preface gives up: at the PROXY
/// header's deadline until the header is whole, then at the first
/// packet's.
fn preface_deadline(listener: &Listener, header_done: bool, now: Instant) -> Instant {
    match &listener.config.accept_proxy {
        Some(a) if !header_done => now + a.timeout,
        _ => now + listener.config.first_packet_timeout,
    }
}

/// Whether `peer` may send a PROXY header to `listener`.
fn trusted(listener: &Listener, peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    listener
        .config
        .accept_proxy
        .as_ref()
        .is_some_and(|a| a.trusted.iter().any(|n| n.contains(&peer)))
}

/// What goes to the server before the client's own bytes: the
/// `send-proxy` header, then what the client sent before the connect; and
/// the header's length.
pub(super) fn ahead(
    pool: &Pool,
    client: &TcpStream,
    client_addr: SocketAddr,
    local: Option<SocketAddr>,
    preread: Vec<u8>,
) -> (Vec<u8>, u16) {
    let version = pool.send_proxy;
    if version == SendProxy::None {
        return (preread, 0);
    }
    let local = local.or_else(|| client.local_addr().ok());
    let addrs = local.map(|l| (client_addr, l));
    let mut header = match version {
        SendProxy::V1 => proxy_protocol::encode_v1(addrs),
        _ => proxy_protocol::encode_v2(addrs),
    };
    // A header is at most a few hundred bytes (v2 with its address block).
    let header_len = u16::try_from(header.len()).unwrap_or(u16::MAX);
    header.extend_from_slice(&preread);
    (header, header_len)
}

impl Worker {
    /// A new client: its relay starts now, or once the listener read what
    /// it wants first (a PROXY header, a PostgreSQL first packet).
    pub(super) fn accepted(
        &mut self,
        client: TcpStream,
        addr: SocketAddr,
        listener: Arc<Listener>,
        reservation: Reservation,
        now: Instant,
    ) {
        if wanted(&listener) {
            self.begin_preface(client, addr, listener, reservation, now);
            return;
        }
        match listener.admit(reservation, addr.ip()) {
            Ok(admission) => {
                // Routes on a listener that reads nothing: the default.
                let Some(to) = self.destination(&listener, None, &Shown::default()) else {
                    drop(admission);
                    self.refuse_unrouted(client, addr, &listener, "no route matches", now);
                    return;
                };
                let arrival = Arrival {
                    client,
                    client_addr: addr,
                    local: None,
                    listener,
                    admission,
                    preread: Vec::new(),
                    since: now,
                };
                self.start_relay(arrival, to, now)
            }
            Err(refused) => self.refuse(client, addr, &listener, refused, Vec::new(), now),
        }
    }

    /// An accepted client of a listener that reads first: refused at once
    /// if it may not send a PROXY header, else read with a deadline.
    pub(super) fn begin_preface(
        &mut self,
        client: TcpStream,
        peer: SocketAddr,
        listener: Arc<Listener>,
        reservation: Reservation,
        now: Instant,
    ) {
        let hold = if listener.config.accept_proxy.is_some() {
            if !trusted(&listener, peer.ip()) {
                let why = "not a trusted source of PROXY headers".to_string();
                self.refuse_preface(client, peer, &listener, &why, now);
                return;
            }
            Hold::Reserved(reservation)
        } else {
            match listener.admit(reservation, peer.ip()) {
                Ok(admission) => Hold::Admitted(admission),
                Err(refused) => {
                    self.refuse(client, peer, &listener, refused, Vec::new(), now);
                    return;
                }
            }
        };
        let deadline = preface_deadline(&listener, false, now);
        // A listener that reads no protocol routes every client by its
        // default route (the only one it may have).
        let protocol = listener.config.protocol;
        let opening = (listener.has_routes() && protocol != Protocol::None)
            .then(|| Opening::new(protocol == Protocol::Tls));
        let pending = Pending {
            opening,
            client,
            client_addr: peer,
            local: None,
            listener,
            hold,
            buf: Vec::new(),
            header_done: false,
            deadline,
            accepted_at: now,
        };
        let entry = self.prefaces.entries.vacant_entry();
        let key = entry.key();
        let mut pending = Box::new(pending);
        if let Err(e) = self.poll.registry().register(
            &mut pending.client,
            token::preface(key),
            Interest::READABLE,
        ) {
            tracing::warn!(worker = self.index, client = %peer, error = %e, "internal: cannot register a client socket; closing it");
            return;
        }
        entry.insert(Entry::Client(pending));
        self.prefaces.wake_by(deadline);
        // The client may have sent already: read now rather than wait for
        // the registration's first event.
        self.on_preface_event(key, now);
    }

    /// An event on a pending client or on a cancel request's connect.
    pub(super) fn on_preface_event(&mut self, key: usize, now: Instant) {
        match self.prefaces.entries.get_mut(key) {
            Some(Entry::Client(p)) => {
                let max = p.max();
                let eof = match read_some(&mut p.client, &mut p.buf, max) {
                    Ok(eof) => eof,
                    Err(e) => {
                        // The client reset or failed: nothing to relay.
                        tracing::debug!(client = %p.client_addr, error = %e, "client failed before its relay started");
                        self.prefaces.entries.remove(key);
                        return;
                    }
                };
                let mut decision = p.decide(now);
                while let Decision::Answer(reply) = decision {
                    // One byte into an empty send buffer, as a server
                    // answers; the client waits for it before it goes on.
                    if let Err(e) = (&p.client).write_all(&[reply]) {
                        tracing::debug!(client = %p.client_addr, error = %e, "client failed before its relay started");
                        self.prefaces.entries.remove(key);
                        return;
                    }
                    p.buf.drain(..8);
                    decision = p.decide(now);
                }
                let full = p.buf.len() >= p.max();
                let decision = match decision {
                    Decision::More if (eof || full) && p.opening.is_some() => p.give_up(),
                    other => other,
                };
                match decision {
                    Decision::More if !eof && !full => {
                        let deadline = p.deadline;
                        self.prefaces.wake_by(deadline);
                    }
                    Decision::More
                        if p.listener.config.accept_proxy.is_some() && !p.header_done =>
                    {
                        let why = if eof {
                            "closed before its PROXY header was complete"
                        } else {
                            "sent more than a PROXY header may hold"
                        };
                        self.refuse_pending(key, why, now);
                    }
                    // A short first packet at EOF: the server says what it
                    // makes of it.
                    Decision::More | Decision::Relay => {
                        self.start_pending(key, None, Shown::default(), now)
                    }
                    Decision::Route(tls, shown) => self.start_pending(key, tls, shown, now),
                    Decision::Cancel(packet) => self.fan_out_cancel(key, packet, now),
                    Decision::Refuse(why) => self.refuse_pending(key, &why, now),
                    Decision::Unroutable(why) => self.unroutable_pending(key, &why, now),
                    // Answered in the loop above.
                    Decision::Answer(_) => {}
                }
            }
            Some(Entry::Cancel(_)) => self.on_cancel_event(key),
            None => {}
        }
    }

    /// Ends pending clients and cancel connects past their deadline.
    pub(super) fn expire_prefaces(&mut self, now: Instant) {
        if self.prefaces.next.is_none_or(|t| t > now) {
            return;
        }
        let due: Vec<usize> = self
            .prefaces
            .entries
            .iter()
            .filter(|(_, e)| e.deadline() <= now)
            .map(|(k, _)| k)
            .collect();
        for key in due {
            match &self.prefaces.entries[key] {
                Entry::Client(p) if p.listener.config.accept_proxy.is_some() && !p.header_done => {
                    let within = p.listener.config.accept_proxy.as_ref().map(|a| a.timeout);
                    let why = format!("no PROXY header within {}", format_duration(within));
                    self.refuse_pending(key, &why, now);
                }
                // A postgres client that sent no full first packet yet:
                // relay what it sent and let the server judge; with
                // routes, what it showed decides.
                Entry::Client(p) => match p.give_up() {
                    Decision::Route(tls, shown) => self.start_pending(key, tls, shown, now),
                    Decision::Unroutable(why) => {
                        let why = format!("{why} within the first-packet-timeout");
                        self.unroutable_pending(key, &why, now)
                    }
                    _ => self.start_pending(key, None, Shown::default(), now),
                },
                Entry::Cancel(c) => {
                    tracing::debug!(upstream = %c.server, "cancel request not sent: connect timed out");
                    self.prefaces.entries.remove(key);
                }
            }
        }
        self.prefaces.next = self
            .prefaces
            .entries
            .iter()
            .map(|(_, e)| e.deadline())
            .min();
    }

    fn take_pending(&mut self, key: usize) -> Box<Pending> {
        let Entry::Client(mut p) = self.prefaces.entries.remove(key) else {
            unreachable!("the caller matched a client entry")
        };
        let _ = self.poll.registry().deregister(&mut p.client);
        p
    }

    /// The preface is complete: admit the client by the address it now
    /// has, route it by what it showed, and start its relay with what it
    /// sent so far (a TLS client's, after what spliced negotiates itself).
    fn start_pending(&mut self, key: usize, tls: Option<TlsStyle>, shown: Shown, now: Instant) {
        let mut p = self.take_pending(key);
        let admission = match std::mem::replace(&mut p.hold, Hold::Taken) {
            Hold::Admitted(a) => a,
            Hold::Reserved(r) => match p.listener.admit(r, p.client_addr.ip()) {
                Ok(a) => a,
                Err(refused) => {
                    let Pending {
                        client,
                        client_addr,
                        listener,
                        buf,
                        ..
                    } = *p;
                    self.refuse(client, client_addr, &listener, refused, buf, now);
                    return;
                }
            },
            Hold::Taken => return,
        };
        let Pending {
            client,
            client_addr,
            local,
            listener,
            buf,
            accepted_at,
            ..
        } = *p;
        let Some(to) = self.destination(&listener, tls, &shown) else {
            drop(admission);
            let why = match &shown.server_name {
                Some(name) => format!("no route matches (server name {name})"),
                None => "no route matches".to_string(),
            };
            self.refuse_unrouted(client, client_addr, &listener, &why, now);
            return;
        };
        let arrival = Arrival {
            client,
            client_addr,
            local,
            listener,
            admission,
            preread: buf,
            since: accepted_at,
        };
        self.start_relay(arrival, to, now);
    }

    /// Resets a client whose opening cannot be routed.
    fn unroutable_pending(&mut self, key: usize, why: &str, now: Instant) {
        let p = self.take_pending(key);
        let Pending {
            client,
            client_addr,
            listener,
            ..
        } = *p;
        self.refuse_unrouted(client, client_addr, &listener, why, now);
    }

    fn refuse_pending(&mut self, key: usize, why: &str, now: Instant) {
        let p = self.take_pending(key);
        let Pending {
            client,
            client_addr,
            listener,
            ..
        } = *p;
        self.refuse_preface(client, client_addr, &listener, why, now);
    }

    /// Resets a client whose PROXY header was refused, counts and logs it.
    fn refuse_preface(
        &mut self,
        client: TcpStream,
        addr: SocketAddr,
        listener: &Listener,
        why: &str,
        now: Instant,
    ) {
        let counter = &listener.counters(self.index).refused_proxy_header;
        self.reset_refused(client, addr, listener, counter, why, now);
    }
}
