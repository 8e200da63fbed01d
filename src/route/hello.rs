//! A TLS ClientHello's server name (SNI) and ALPN offers, read from the
//! records a client sent first. Pure: bytes in, a verdict out.

use std::fmt;

/// What routing needs of a ClientHello.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClientHello {
    /// The host name of the server_name extension, lower-cased.
    pub server_name: Option<String>,
    /// The protocols of the ALPN extension, in the client's order.
    pub alpn: Vec<Vec<u8>>,
}

/// What the bytes so far are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HelloParse {
    /// A ClientHello may still come whole: read more.
    Incomplete,
    Done(ClientHello),
    Invalid(HelloError),
}

/// Why the bytes are no ClientHello a router can read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HelloError {
    /// A record that is not a handshake record.
    NotHandshake(u8),
    /// A handshake message that is not a ClientHello.
    NotClientHello(u8),
    /// More than [`HELLO_MAX`] bytes without a whole ClientHello.
    TooLong(usize),
    /// A length field that overruns what contains it.
    Malformed(&'static str),
}

impl fmt::Display for HelloError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HelloError::NotHandshake(t) => write!(f, "TLS record type {t} is not a handshake"),
            HelloError::NotClientHello(t) => {
                write!(f, "handshake message type {t} is not a ClientHello")
            }
            HelloError::TooLong(n) => {
                write!(
                    f,
                    "ClientHello of {n} bytes is over the {HELLO_MAX}-byte limit"
                )
            }
            HelloError::Malformed(what) => write!(f, "malformed ClientHello: {what}"),
        }
    }
}

/// The most bytes (records and their headers) read for one ClientHello.
pub const HELLO_MAX: usize = 16 * 1024;

const RECORD_HEADER: usize = 5;
const HANDSHAKE: u8 = 0x16;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;

/// Reads the ClientHello at the start of `buf` (every byte since the
/// first record header). The verdict never depends on how the bytes were
/// split: call again with more.
pub fn parse(buf: &[u8]) -> HelloParse {
    let mut message = Vec::new();
    let mut at = 0;
    loop {
        if let Some(&t) = message.first().filter(|&&t| t != CLIENT_HELLO) {
            return HelloParse::Invalid(HelloError::NotClientHello(t));
        }
        if message.len() >= 4 {
            let len = u32::from_be_bytes([0, message[1], message[2], message[3]]) as usize;
            if len + 4 > HELLO_MAX {
                return HelloParse::Invalid(HelloError::TooLong(len + 4));
            }
            if message.len() >= len + 4 {
                return match body(&message[4..4 + len]) {
                    Ok(h) => HelloParse::Done(h),
                    Err(e) => HelloParse::Invalid(e),
                };
            }
        }
        if at >= HELLO_MAX {
            return HelloParse::Invalid(HelloError::TooLong(at));
        }
        let Some(header) = buf.get(at..at + RECORD_HEADER) else {
            return early(buf.get(at..).unwrap_or_default(), &message);
        };
        if header[0] != HANDSHAKE {
            return HelloParse::Invalid(HelloError::NotHandshake(header[0]));
        }
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if len == 0 {
            return HelloParse::Invalid(HelloError::Malformed("an empty record"));
        }
        let Some(fragment) = buf.get(at + RECORD_HEADER..at + RECORD_HEADER + len) else {
            let partial = &buf[at + RECORD_HEADER..];
            message.extend_from_slice(partial);
            return early(&[], &message);
        };
        message.extend_from_slice(fragment);
        at += RECORD_HEADER + len;
    }
}

/// Incomplete, unless what arrived already says it is no ClientHello.
fn early(record_start: &[u8], message: &[u8]) -> HelloParse {
    if let Some(&t) = record_start.first() {
        if t != HANDSHAKE {
            return HelloParse::Invalid(HelloError::NotHandshake(t));
        }
    }
    match message.first() {
        Some(&t) if t != CLIENT_HELLO => HelloParse::Invalid(HelloError::NotClientHello(t)),
        _ => HelloParse::Incomplete,
    }
}

/// A cursor over a message's bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], HelloError> {
        if self.0.len() < n {
            return Err(HelloError::Malformed(what));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<usize, HelloError> {
        Ok(usize::from(self.take(1, what)?[0]))
    }

    fn u16(&mut self, what: &'static str) -> Result<usize, HelloError> {
        let b = self.take(2, what)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn vec8(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u8(what)?;
        self.take(n, what)
    }

    fn vec16(&mut self, what: &'static str) -> Result<&'a [u8], HelloError> {
        let n = self.u16(what)?;
        self.take(n, what)
    }
}

fn body(b: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader(b);
    r.take(2 + 32, "version and random")?;
    r.vec8("session id")?;
    r.vec16("cipher suites")?;
    r.vec8("compression methods")?;
    let mut hello = ClientHello::default();
    if r.0.is_empty() {
        return Ok(hello);
    }
    let mut exts = Reader(r.vec16("extensions")?);
    while !exts.0.is_empty() {
        let kind = exts.u16("extension type")? as u16;
        let mut data = Reader(exts.vec16("extension")?);
        match kind {
            EXT_SERVER_NAME => {
                let mut names = Reader(data.vec16("server name list")?);
                while !names.0.is_empty() {
                    let name_type = names.u8("server name type")?;
                    let name = names.vec16("server name")?;
                    if name_type == 0 && hello.server_name.is_none() {
                        let text = std::str::from_utf8(name)
                            .map_err(|_| HelloError::Malformed("a server name that is not text"))?;
                        hello.server_name = Some(text.to_ascii_lowercase());
                    }
                }
            }
            EXT_ALPN => {
                let mut list = Reader(data.vec16("ALPN list")?);
                while !list.0.is_empty() {
                    hello.alpn.push(list.vec8("ALPN protocol")?.to_vec());
                }
            }
            _ => {}
        }
    }
    Ok(hello)
}
