//! What the bytes a pending client sent so far decide: the PROXY header
//! parsed once, then the first PostgreSQL packet or a routed listener's
//! opening; and the bounded read that collects them.

use std::io;
use std::time::Instant;

use mio::net::TcpStream;

use super::{preface_deadline, Pending, CANCEL_CODE, CANCEL_LEN};
use crate::config::Protocol;
use crate::route::startup::TlsStyle;
use crate::route::Shown;
use crate::{pgwire, proxy_protocol};

use std::io::Read;

use crate::proxy_protocol::Parse;
use crate::route::hello::HELLO_MAX;
use crate::route::startup::Step;

/// The most bytes read from a client before its relay starts.
const PREFACE_MAX: usize = 4096;
/// The same for a listener with routes: a whole TLS ClientHello, or a
/// startup packet (at most 10 000 bytes), after a PROXY header.
const ROUTED_MAX: usize = {
    let hello = HELLO_MAX + 8;
    let startup = pgwire::MAX_STARTUP_LEN as usize + 8;
    let most = if hello > startup { hello } else { startup };
    if most > PREFACE_MAX {
        most + 1024
    } else {
        PREFACE_MAX
    }
};

/// What the bytes read so far decide.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Decision {
    /// Read more.
    More,
    /// Start the relay with these bytes ahead.
    Relay,
    /// A CancelRequest: fan it out and close the client.
    Cancel([u8; CANCEL_LEN]),
    /// Reset the client: a bad PROXY header.
    Refuse(String),
    /// Answer the request of the first 8 bytes with this byte, drop them,
    /// and decide again (a listener with routes).
    Answer(u8),
    /// Route by what the client showed, TLS or not.
    Route(Option<TlsStyle>, Shown),
    /// Reset the client: its opening cannot be routed (a broken hello).
    Unroutable(String),
}

impl From<Step> for Decision {
    fn from(step: Step) -> Decision {
        match step {
            Step::More => Decision::More,
            Step::Answer(b) => Decision::Answer(b),
            Step::Cancel(packet) => Decision::Cancel(packet),
            Step::Tls(style, shown) => Decision::Route(Some(style), shown),
            Step::Startup(shown) => Decision::Route(None, shown),
            Step::Refuse(why) => Decision::Unroutable(why),
        }
    }
}

/// The first PostgreSQL packet so far (after any PROXY header): a
/// CancelRequest, something else, or too short to tell.
fn postgres_first(buf: &[u8]) -> Decision {
    if buf.len() < 8 {
        return Decision::More;
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let code = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len != CANCEL_LEN || code != CANCEL_CODE {
        return Decision::Relay;
    }
    if buf.len() < CANCEL_LEN {
        return Decision::More;
    }
    if buf.len() > CANCEL_LEN {
        // A cancel connection carries nothing after its request.
        return Decision::Relay;
    }
    let mut packet = [0u8; CANCEL_LEN];
    packet.copy_from_slice(&buf[..CANCEL_LEN]);
    Decision::Cancel(packet)
}

impl Pending {
    /// What the bytes read so far decide; parses the PROXY header once.
    /// The first packet's deadline starts when the header is whole.
    pub(super) fn decide(&mut self, now: Instant) -> Decision {
        if self.listener.config.accept_proxy.is_some() && !self.header_done {
            match proxy_protocol::parse(&self.buf) {
                Ok(Parse::Incomplete) => return Decision::More,
                Err(e) => return Decision::Refuse(e.to_string()),
                Ok(Parse::Complete(h)) => {
                    self.header_done = true;
                    self.deadline = preface_deadline(&self.listener, true, now);
                    self.buf.drain(..h.header_len);
                    if let Some(source) = h.source {
                        self.client_addr = source;
                    }
                    self.local = h.destination;
                }
            }
        }
        if let Some(opening) = &mut self.opening {
            return opening.step(&self.buf).into();
        }
        match self.listener.config.protocol {
            // Without routes a TLS listener has nothing to read for.
            Protocol::None | Protocol::Tls => Decision::Relay,
            Protocol::Postgres => postgres_first(&self.buf),
        }
    }

    /// Nothing more will be read (end of stream, the deadline, the
    /// buffer's bound): what the bytes so far decide.
    pub(super) fn give_up(&self) -> Decision {
        match &self.opening {
            Some(opening) => opening.give_up(&self.buf).into(),
            None => Decision::Relay,
        }
    }

    /// The most bytes read before the relay starts.
    pub(super) fn max(&self) -> usize {
        if self.opening.is_some() {
            ROUTED_MAX
        } else {
            PREFACE_MAX
        }
    }
}

/// Reads what the socket has, up to `max` bytes in all. `Ok(true)` at EOF.
pub(super) fn read_some(stream: &mut TcpStream, buf: &mut Vec<u8>, max: usize) -> io::Result<bool> {
    let mut chunk = [0u8; 1024];
    while buf.len() < max {
        let room = (max - buf.len()).min(chunk.len());
        match stream.read(&mut chunk[..room]) {
            Ok(0) => return Ok(true),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cancel(pid: u32, key: u32) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&16u32.to_be_bytes());
        b.extend_from_slice(&CANCEL_CODE.to_be_bytes());
        b.extend_from_slice(&pid.to_be_bytes());
        b.extend_from_slice(&key.to_be_bytes());
        b
    }

    #[test]
    fn a_cancel_request_is_recognised_only_whole_and_alone() {
        let c = cancel(4242, 77);
        for n in 0..16 {
            assert_eq!(postgres_first(&c[..n]), Decision::More, "{n} bytes");
        }
        let mut packet = [0u8; 16];
        packet.copy_from_slice(&c);
        assert_eq!(postgres_first(&c), Decision::Cancel(packet));
        let mut more = c.clone();
        more.push(0);
        assert_eq!(postgres_first(&more), Decision::Relay);
    }

    #[test]
    fn other_first_packets_relay_as_soon_as_their_header_is_read() {
        // StartupMessage (protocol 3.0), SSLRequest, GSSENCRequest.
        for code in [196_608u32, 80_877_103, 80_877_104] {
            let mut b = 8u32.to_be_bytes().to_vec();
            b.extend_from_slice(&code.to_be_bytes());
            assert_eq!(postgres_first(&b), Decision::Relay);
        }
        let mut wrong_len = 17u32.to_be_bytes().to_vec();
        wrong_len.extend_from_slice(&CANCEL_CODE.to_be_bytes());
        assert_eq!(postgres_first(&wrong_len), Decision::Relay);
    }
}
