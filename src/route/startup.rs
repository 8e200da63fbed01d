//! A client's opening on a listener with routes, read as a PostgreSQL
//! server (or a TLS server) would read it, up to what a route is chosen
//! by:
//!
//! - a GSSENCRequest is answered `N` (no GSS encryption), once, and the
//!   next packet read;
//! - an SSLRequest is answered `S` on the server's behalf, and a TLS
//!   ClientHello must follow (classic TLS);
//! - a first byte 0x16 is a TLS record: a ClientHello sent at once
//!   (direct TLS, and every client of a `tls` listener);
//! - a CancelRequest, whole and alone, is recognised as such;
//! - anything else is the startup packet: its `database` and `user`
//!   parameters are read once it is whole (`database` defaults to `user`).
//!
//! Pure: the worker feeds every byte read since the last answered request
//! and acts on the [`Step`].

use super::hello::{self, HelloParse};
use super::Shown;
use crate::pgwire::{
    CANCEL_REQUEST_CODE, CANCEL_REQUEST_LEN, GSSENC_REQUEST_CODE, MAX_STARTUP_LEN, SSL_REQUEST_CODE,
};

/// The protocol 3.0 startup packet's version code.
const PROTOCOL_3: u32 = 196_608;
/// A TLS record's first byte when it carries a handshake.
pub(crate) const TLS_HANDSHAKE: u8 = 0x16;

/// How a client speaks TLS, when it does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TlsStyle {
    /// An SSLRequest first, answered `S` by the proxy; the server must be
    /// asked the same before the hello reaches it.
    Classic,
    /// The ClientHello straight away.
    Direct,
}

/// What the bytes so far decide.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// Read more.
    More,
    /// Write this byte to the client, drop the 8 bytes of its request
    /// from what was read, and step again.
    Answer(u8),
    /// A CancelRequest, whole and alone.
    Cancel([u8; CANCEL_REQUEST_LEN]),
    /// A whole ClientHello: route by its server name and ALPN.
    Tls(TlsStyle, Shown),
    /// A whole startup packet (or one no parameters can be read from:
    /// the server judges it); route by its parameters.
    Startup(Shown),
    /// Reset the client: nothing can be routed or forwarded.
    Refuse(String),
}

/// A client's opening as read so far.
#[derive(Clone, Debug, Default)]
pub(crate) struct Opening {
    /// A `tls` listener: only a ClientHello is accepted.
    tls_only: bool,
    ssl_answered: bool,
    gss_answered: bool,
}

impl Opening {
    pub(crate) fn new(tls_only: bool) -> Opening {
        Opening {
            tls_only,
            ..Opening::default()
        }
    }

    /// Whether a TLS hello is expected (answered `S`, or sent at once):
    /// then nothing short of a whole one is forwarded.
    fn in_tls(&self, buf: &[u8]) -> bool {
        self.ssl_answered || self.tls_only || buf.first() == Some(&TLS_HANDSHAKE)
    }

    /// What `buf` (every byte since the last answered request) decides.
    pub(crate) fn step(&mut self, buf: &[u8]) -> Step {
        if buf.is_empty() {
            return Step::More;
        }
        if self.in_tls(buf) {
            if buf[0] != TLS_HANDSHAKE {
                let after = if self.ssl_answered {
                    "after its SSLRequest was answered"
                } else {
                    "on a tls listener"
                };
                return Step::Refuse(format!(
                    "sent a first byte 0x{:02x} {after}, not a TLS handshake record",
                    buf[0]
                ));
            }
            let style = if self.ssl_answered {
                TlsStyle::Classic
            } else {
                TlsStyle::Direct
            };
            return match hello::parse(buf) {
                HelloParse::Incomplete => Step::More,
                HelloParse::Done(h) => Step::Tls(
                    style,
                    Shown {
                        server_name: h.server_name,
                        alpn: h.alpn,
                        ..Shown::default()
                    },
                ),
                HelloParse::Invalid(e) => Step::Refuse(e.to_string()),
            };
        }
        if buf.len() < 8 {
            return Step::More;
        }
        let word = |at: usize| u32::from_be_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]]);
        let (len, code) = (word(0), word(4));
        match (len, code) {
            (8, SSL_REQUEST_CODE) => {
                self.ssl_answered = true;
                Step::Answer(b'S')
            }
            (8, GSSENC_REQUEST_CODE) if !self.gss_answered => {
                self.gss_answered = true;
                Step::Answer(b'N')
            }
            (16, CANCEL_REQUEST_CODE) => match buf.len() {
                n if n < CANCEL_REQUEST_LEN => Step::More,
                CANCEL_REQUEST_LEN => {
                    let mut packet = [0u8; CANCEL_REQUEST_LEN];
                    packet.copy_from_slice(buf);
                    Step::Cancel(packet)
                }
                // A cancel connection carries nothing after its request.
                _ => Step::Startup(Shown::default()),
            },
            (9..=MAX_STARTUP_LEN, _) if buf.len() < len as usize => Step::More,
            (9..=MAX_STARTUP_LEN, PROTOCOL_3) => Step::Startup(parameters(&buf[8..len as usize])),
            _ => Step::Startup(Shown::default()),
        }
    }

    /// Nothing more will be read (end of stream, the first-packet
    /// timeout, the buffer's bound): a TLS hello not whole by then is
    /// refused; a startup packet is routed by what it showed (nothing: the
    /// default route takes it, and the server judges it).
    pub(crate) fn give_up(&self, buf: &[u8]) -> Step {
        if self.in_tls(buf) {
            let why = if buf.is_empty() {
                "sent no TLS ClientHello".to_string()
            } else {
                format!(
                    "sent {} bytes of a TLS ClientHello that never became whole",
                    buf.len()
                )
            };
            return Step::Refuse(why);
        }
        Step::Startup(Shown::default())
    }
}

/// The `user` and `database` of a startup packet's body (after its 8-byte
/// header): NUL-terminated name and value pairs, ended by an empty name.
fn parameters(body: &[u8]) -> Shown {
    let mut shown = Shown::default();
    let mut fields = body.split(|&b| b == 0);
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        if name.is_empty() {
            break;
        }
        let value = String::from_utf8_lossy(value).into_owned();
        match name {
            b"user" => shown.user = Some(value),
            b"database" => shown.database = Some(value),
            _ => {}
        }
    }
    if shown.database.is_none() {
        shown.database = shown.user.clone();
    }
    shown
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = PROTOCOL_3.to_be_bytes().to_vec();
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
        p.extend(body);
        p
    }

    fn request(code: u32) -> Vec<u8> {
        let mut p = 8u32.to_be_bytes().to_vec();
        p.extend_from_slice(&code.to_be_bytes());
        p
    }

    #[test]
    fn startup_parameters_are_read_once_the_packet_is_whole() {
        let p = startup(&[("user", "bob"), ("database", "olap")]);
        let mut o = Opening::new(false);
        for n in 0..p.len() {
            assert_eq!(o.step(&p[..n]), Step::More, "{n} bytes");
        }
        let Step::Startup(s) = o.step(&p) else {
            panic!()
        };
        assert_eq!(
            (s.user.as_deref(), s.database.as_deref()),
            (Some("bob"), Some("olap"))
        );
    }

    #[test]
    fn the_database_defaults_to_the_user() {
        let p = startup(&[("user", "bob"), ("application_name", "x")]);
        let Step::Startup(s) = Opening::new(false).step(&p) else {
            panic!()
        };
        assert_eq!(s.database.as_deref(), Some("bob"));
    }

    #[test]
    fn requests_are_answered_and_gss_only_once() {
        let mut o = Opening::new(false);
        assert_eq!(o.step(&request(GSSENC_REQUEST_CODE)), Step::Answer(b'N'));
        assert!(matches!(
            o.step(&request(GSSENC_REQUEST_CODE)),
            Step::Startup(_)
        ));
        let mut o = Opening::new(false);
        assert_eq!(o.step(&request(SSL_REQUEST_CODE)), Step::Answer(b'S'));
        // After `S`, only a TLS record may follow.
        assert_eq!(o.step(&[]), Step::More);
        assert!(matches!(o.step(b"Q"), Step::Refuse(_)));
        assert!(matches!(o.give_up(&[0x16, 3]), Step::Refuse(_)));
    }

    #[test]
    fn a_cancel_request_whole_and_alone() {
        let mut c = 16u32.to_be_bytes().to_vec();
        c.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        c.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 9]);
        let mut o = Opening::new(false);
        assert_eq!(o.step(&c[..12]), Step::More);
        assert!(matches!(o.step(&c), Step::Cancel(_)));
        c.push(0);
        assert!(matches!(o.step(&c), Step::Startup(_)));
    }

    #[test]
    fn a_tls_listener_takes_only_a_hello() {
        let mut o = Opening::new(true);
        assert!(matches!(
            o.step(&startup(&[("user", "x")])),
            Step::Refuse(_)
        ));
        assert!(matches!(o.give_up(&[]), Step::Refuse(_)));
        assert_eq!(
            Opening::new(false).give_up(&[0, 0]),
            Step::Startup(Shown::default())
        );
    }
}
