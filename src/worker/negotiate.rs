//! A routed TLS client's relay between its upstream connect and the start
//! of relaying: what spliced says to the server itself, and the server's
//! first answer, which decides whether the client's bytes may follow.
//!
//! - **Classic TLS** (the client sent an SSLRequest, which spliced
//!   answered `S` to choose a route by the hello that followed): the
//!   server gets the same 8-byte SSLRequest and must answer the single
//!   byte `S`, which spliced reads and drops; then the hello (the relay's
//!   read-ahead bytes) goes on and the relay splices. An `N` (a server
//!   without TLS), anything else or a close resets the client.
//! - **Direct TLS** (the client sent its hello at once): spliced writes the
//!   hello itself and peeks at the server's first byte. A TLS record (a
//!   handshake or an alert) starts the relay with that byte unread; any
//!   other byte, or a close before any, resets the client. PostgreSQL 16
//!   and older read a direct hello as a broken startup packet: this is
//!   what a client meets behind spliced when it asks one of them for
//!   direct TLS.
//!
//! While a negotiation runs, the relay counts as connecting: its connect
//! deadline bounds it, and a server that does not answer in time is
//! failed over like a connect that timed out (the negotiation restarts on
//! the next server). A negotiating client is never held (`queue-timeout`):
//! it already speaks TLS, so no word of ours could reach it.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use super::Worker;
use crate::error::{Op, RelayError, Side};
use crate::stats::CloseReason;

use std::io::{Read, Write};

use crate::route::startup::{TlsStyle, TLS_HANDSHAKE};

/// A TLS record carrying an alert: a server that refuses the hello in TLS.
const TLS_ALERT: u8 = 0x15;

/// What passes between spliced and the server before a TLS client's bytes.
#[derive(Debug)]
pub(crate) struct Negotiation {
    style: TlsStyle,
    /// Written to the server once connected: the `send-proxy` header, then
    /// the SSLRequest (classic) or the client's hello (direct).
    send: Vec<u8>,
    written: usize,
    /// The connect succeeded: writing `send`, or waiting for the answer.
    started: bool,
}

/// What the server's first byte (`None`: it closed) says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The client's bytes may follow.
    Proceed,
    /// Reset the client: why, in a log line's words.
    Refused(String),
}

impl Negotiation {
    pub(crate) fn new(style: TlsStyle, send: Vec<u8>) -> Negotiation {
        Negotiation {
            style,
            send,
            written: 0,
            started: false,
        }
    }

    /// Another server is tried: start over.
    pub(crate) fn restart(&mut self) {
        self.written = 0;
        self.started = false;
    }

    /// The connect succeeded: what is to be sent goes now.
    pub(crate) fn begin(&mut self) {
        self.started = true;
    }

    pub(crate) fn started(&self) -> bool {
        self.started
    }

    /// Judges the server's first byte. Pure.
    pub(crate) fn judge(style: TlsStyle, first: Option<u8>) -> Verdict {
        match (style, first) {
            (TlsStyle::Classic, Some(b'S')) => Verdict::Proceed,
            (TlsStyle::Classic, Some(b'N')) => Verdict::Refused(
                "the server answered N to the SSLRequest: it does not accept TLS".into(),
            ),
            (TlsStyle::Classic, Some(b)) => Verdict::Refused(format!(
                "the server answered 0x{b:02x} to the SSLRequest, neither S nor N"
            )),
            (TlsStyle::Classic, None) => {
                Verdict::Refused("the server closed the connection before answering the SSLRequest".into())
            }
            (TlsStyle::Direct, Some(TLS_HANDSHAKE | TLS_ALERT)) => Verdict::Proceed,
            (TlsStyle::Direct, Some(b)) => Verdict::Refused(format!(
                "the server answered the direct TLS ClientHello with 0x{b:02x}, not TLS (PostgreSQL 16 and older take TLS only after an SSLRequest: the client must use sslnegotiation=postgres)"
            )),
            (TlsStyle::Direct, None) => Verdict::Refused(
                "the server closed the connection before any TLS byte of its answer to the direct TLS ClientHello (PostgreSQL 16 and older take TLS only after an SSLRequest: the client must use sslnegotiation=postgres)".into(),
            ),
        }
    }
}

impl Worker {
    /// The upstream of relay `key` connected and it negotiates: write what
    /// spliced says to the server, then wait for the answer.
    pub(super) fn begin_negotiation(&mut self, key: usize, now: Instant) {
        self.relays[key].begin_negotiation();
        self.negotiate(key, now);
    }

    /// Moves relay `key`'s negotiation on: writes what is left to write,
    /// then reads (classic) or peeks at (direct) the server's first byte.
    pub(super) fn negotiate(&mut self, key: usize, now: Instant) {
        let relay = &mut self.relays[key];
        let Some((n, mut stream)) = relay.negotiation_io() else {
            return;
        };
        while n.written < n.send.len() {
            match stream.write(&n.send[n.written..]) {
                Ok(k) => n.written += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let e = RelayError::new(Side::Upstream, Op::Write, e);
                    self.close(key, CloseReason::UpstreamReset, Some(&e), now);
                    return;
                }
            }
        }
        let style = n.style;
        let mut byte = [0u8; 1];
        let first = match style {
            TlsStyle::Classic => stream.read(&mut byte),
            // The byte stays for the relay to forward.
            TlsStyle::Direct => stream.peek(&mut byte),
        }
        .map(|k| (k > 0).then_some(byte[0]));
        let first = match first {
            Ok(first) => first,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) =>
            {
                return
            }
            Err(e) => {
                let e = RelayError::new(Side::Upstream, Op::Read, e);
                self.close(key, CloseReason::UpstreamReset, Some(&e), now);
                return;
            }
        };
        match Negotiation::judge(style, first) {
            Verdict::Proceed => {
                let relay = &mut self.relays[key];
                relay.negotiated(now);
                tracing::debug!(relay = relay.id(), "upstream agreed to TLS; relaying");
                self.arm(key);
                self.run_relay(key, now);
            }
            Verdict::Refused(why) => {
                let relay = &self.relays[key];
                let (id, upstream) = (relay.id(), relay.upstream_addr());
                let listener = Arc::clone(relay.listener());
                match self.connect_warnings.allow(now) {
                    Some(held_back) => tracing::warn!(
                        worker = self.index,
                        relay = id,
                        listener = %listener.label(),
                        upstream = upstream.map(tracing::field::display),
                        similar_warnings_held_back = held_back,
                        "TLS client reset: {why}"
                    ),
                    None => tracing::debug!(
                        relay = id,
                        upstream = upstream.map(tracing::field::display),
                        "TLS client reset: {why}"
                    ),
                }
                let e = RelayError::new(
                    Side::Upstream,
                    Op::Read,
                    io::Error::new(io::ErrorKind::ConnectionRefused, why),
                );
                self.close(key, CloseReason::UpstreamReset, Some(&e), now);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_tls_goes_on_only_after_an_s() {
        let judge = |b| Negotiation::judge(TlsStyle::Classic, b);
        assert_eq!(judge(Some(b'S')), Verdict::Proceed);
        for refused in [Some(b'N'), Some(b'E'), Some(0x16), None] {
            assert!(matches!(judge(refused), Verdict::Refused(_)), "{refused:?}");
        }
    }

    #[test]
    fn direct_tls_goes_on_only_after_a_tls_record() {
        let judge = |b| Negotiation::judge(TlsStyle::Direct, b);
        assert_eq!(judge(Some(0x16)), Verdict::Proceed);
        assert_eq!(judge(Some(0x15)), Verdict::Proceed, "an alert is TLS too");
        for refused in [Some(b'E'), Some(b'N'), None] {
            let Verdict::Refused(why) = judge(refused) else {
                panic!("{refused:?} taken for TLS")
            };
            assert!(why.contains("PostgreSQL 16 and older"), "{why}");
        }
    }
}
