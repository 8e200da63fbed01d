//! The TLS ClientHello, read without terminating TLS: the server name
//! (SNI) and the ALPN protocols of a client's first flight, so a client can
//! be routed before any upstream is chosen.
//!
//! [`parse`] takes every byte the client has sent so far and answers
//! [`HelloParse::Incomplete`] (read more, then call it again with the whole
//! buffer), [`HelloParse::Done`] or [`HelloParse::Invalid`]. It reassembles
//! the handshake message across TLS records (a client may split its hello
//! over several, down to one byte each), reads nothing past the end of the
//! ClientHello, and never reads past [`HELLO_MAX`] bytes: a hello not whole
//! by then is [`HelloError::TooLarge`]. Every length is checked before it is
//! used. Nothing is copied while the hello is incomplete; once it is whole,
//! the only allocations are a copy of a hello split over records (at most
//! `HELLO_MAX` bytes), the server name and the ALPN list.
//!
//! Strict where routing depends on it, as OpenSSL is: one `server_name`
//! extension holding exactly one `host_name` of printable ASCII, one ALPN
//! extension, no byte left over in any vector or after the extensions.
//! Other extensions are skipped unread. RFC 8446 §4.1.2 and §5.1, RFC 6066
//! §3, RFC 7301 §3.1.

use std::borrow::Cow;
use std::fmt;

/// A TLS record header: content type, legacy version (2), length (2).
const RECORD_HEADER: usize = 5;
/// The largest record payload a peer may send: 2^14 (RFC 8446 §5.1).
const MAX_RECORD: usize = 1 << 14;
const CONTENT_HANDSHAKE: u8 = 22;
/// A handshake message header: type, length (3).
const HANDSHAKE_HEADER: usize = 4;
const CLIENT_HELLO: u8 = 1;
const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const NAME_TYPE_HOST: u8 = 0;
/// The longest host name a server accepts (OpenSSL's limit; DNS allows 253).
const MAX_HOST_NAME: usize = 255;

/// The most bytes of TLS records spliced reads before it gives up on a hello.
///
/// 16 KiB of handshake bytes plus the headers of four records: the budget
/// HAProxy (`tune.bufsize`) and nginx (`preread_buffer_size`) give a hello.
/// Real hellos take 0.3 to 2 KB (one with an X25519MLKEM768 key share about
/// 1.8 KB), which leaves room for long session tickets, several
/// post-quantum shares, or a hello split into many small records: the
/// record headers count against the limit too.
pub const HELLO_MAX: usize = 16 * 1024 + 4 * RECORD_HEADER;

/// What a client's first TLS flight says, as far as routing needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ClientHello {
    /// The SNI host name, lower-cased; `None` when the client sent none
    /// (libpq sends none when it connects to an IP address).
    pub server_name: Option<String>,
    /// The ALPN protocols offered, in the client's order; empty without
    /// the extension.
    pub alpn: Vec<Vec<u8>>,
}

/// What the bytes so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloParse {
    /// A valid beginning: read more and parse the whole buffer again.
    Incomplete,
    Done(ClientHello),
    /// Not a ClientHello spliced can read; more bytes will not change that.
    Invalid(HelloError),
}

/// Why a client's first bytes are not a readable ClientHello. Displayed as
/// one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HelloError {
    /// The first record is not a TLS handshake record (content type 22,
    /// version 3.x): the client does not speak TLS first.
    NotHandshake,
    /// The hello does not end within [`HELLO_MAX`] bytes.
    TooLarge,
    /// What is wrong with the records or the hello.
    Malformed(&'static str),
}

impl fmt::Display for HelloError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The parser reads what a client sent; the side leads the line.
        f.write_str("client TLS hello: ")?;
        match self {
            HelloError::NotHandshake => f.write_str("the first record is not a TLS handshake"),
            HelloError::TooLarge => write!(f, "not complete within {HELLO_MAX} bytes"),
            HelloError::Malformed(why) => f.write_str(why),
        }
    }
}

impl std::error::Error for HelloError {}

use HelloError::{Malformed, NotHandshake, TooLarge};

/// Parses the ClientHello at the start of `buf`, every byte the client has
/// sent so far (the first record header first).
pub fn parse(buf: &[u8]) -> HelloParse {
    let window = &buf[..buf.len().min(HELLO_MAX)];
    let outcome = whole_body(window).and_then(|body| body.map(|b| read_hello(&b)).transpose());
    match outcome {
        Ok(Some(hello)) => HelloParse::Done(hello),
        Ok(None) if buf.len() >= HELLO_MAX => HelloParse::Invalid(TooLarge),
        Ok(None) => HelloParse::Incomplete,
        Err(e) => HelloParse::Invalid(e),
    }
}

/// The ClientHello's body (past its handshake header) once every byte of
/// it is in `buf`; `None` before. Copies only a body split over records.
fn whole_body(buf: &[u8]) -> Result<Option<Cow<'_, [u8]>>, HelloError> {
    let Some(body_len) = complete_length(buf)? else {
        return Ok(None);
    };
    if body_len == 0 {
        return Ok(Some(Cow::Borrowed(&[])));
    }
    let mut skip = HANDSHAKE_HEADER;
    let mut copy = Vec::new();
    // complete_length walked these records without an error.
    for (_, bytes) in Fragments::new(buf).map_while(Result::ok) {
        let cut = skip.min(bytes.len());
        skip -= cut;
        let bytes = &bytes[cut..];
        let piece = &bytes[..(body_len - copy.len()).min(bytes.len())];
        if copy.is_empty() && piece.len() == body_len {
            return Ok(Some(Cow::Borrowed(piece)));
        }
        if copy.is_empty() {
            copy.reserve_exact(body_len);
        }
        copy.extend_from_slice(piece);
        if copy.len() == body_len {
            break;
        }
    }
    Ok(Some(Cow::Owned(copy)))
}

/// Walks the records until the ClientHello's handshake message is whole
/// (its body length) or the bytes run out (`None`), without copying.
fn complete_length(buf: &[u8]) -> Result<Option<usize>, HelloError> {
    let mut header = [0u8; HANDSHAKE_HEADER];
    let mut seen = 0;
    let mut total = None;
    for fragment in Fragments::new(buf) {
        let (offset, bytes) = fragment?;
        let before = seen;
        for &b in bytes.iter().take(HANDSHAKE_HEADER.saturating_sub(seen)) {
            header[seen] = b;
            seen += 1;
            if seen == 1 && b != CLIENT_HELLO {
                return Err(Malformed(
                    "the first handshake message is not a ClientHello",
                ));
            }
        }
        if total.is_none() && seen == HANDSHAKE_HEADER {
            let [_, a, b, c] = header;
            total = Some(HANDSHAKE_HEADER + u32::from_be_bytes([0, a, b, c]) as usize);
        }
        let Some(total) = total else { continue };
        // Each byte of buf carries at most one byte of the message, so it
        // cannot end before this fragment's offset plus what it still needs.
        if offset + (total - before) > HELLO_MAX {
            return Err(TooLarge);
        }
        seen = before + bytes.len();
        if seen >= total {
            return Ok(Some(total - HANDSHAKE_HEADER));
        }
    }
    Ok(None)
}

/// The payloads of the handshake records at the start of a buffer, in
/// order, each with its offset; the last may be cut short by the end of the
/// buffer. Ends at the first record header not yet whole, or after the
/// first error.
struct Fragments<'a> {
    buf: &'a [u8],
    pos: usize,
    over: bool,
}

impl<'a> Fragments<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Fragments {
            buf,
            pos: 0,
            over: false,
        }
    }
}

impl<'a> Iterator for Fragments<'a> {
    type Item = Result<(usize, &'a [u8]), HelloError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.over || self.pos >= self.buf.len() {
            return None;
        }
        let len = match record_length(&self.buf[self.pos..], self.pos == 0) {
            Ok(Some(len)) => len,
            Ok(None) => return None,
            Err(e) => {
                self.over = true;
                return Some(Err(e));
            }
        };
        let start = self.pos + RECORD_HEADER;
        let end = (start + len).min(self.buf.len());
        self.pos = start + len;
        Some(Ok((start, &self.buf[start..end])))
    }
}

/// The payload length of the record header at the start of `b`, `None`
/// while the header is not whole. Each header byte is judged as soon as it
/// is there, so a client that does not speak TLS is refused at its first
/// byte.
fn record_length(b: &[u8], first: bool) -> Result<Option<usize>, HelloError> {
    if b.first().is_some_and(|&t| t != CONTENT_HANDSHAKE) {
        return Err(if first {
            NotHandshake
        } else {
            Malformed("a record other than handshake before the ClientHello ends")
        });
    }
    if b.get(1).is_some_and(|&major| major != 3) {
        return Err(if first {
            NotHandshake
        } else {
            Malformed("a record whose version is not 3.x")
        });
    }
    let too_long = Malformed("a record longer than 2^14 bytes");
    if b.get(3)
        .is_some_and(|&hi| usize::from(hi) << 8 > MAX_RECORD)
    {
        return Err(too_long);
    }
    let [_, _, _, hi, lo, ..] = *b else {
        return Ok(None);
    };
    match usize::from(u16::from_be_bytes([hi, lo])) {
        0 => Err(Malformed("an empty handshake record")),
        len if len > MAX_RECORD => Err(too_long),
        len => Ok(Some(len)),
    }
}

/// The fields of a ClientHello body routing needs, every vector checked.
fn read_hello(body: &[u8]) -> Result<ClientHello, HelloError> {
    let mut r = Reader(body);
    let version = r.u16("the hello ends inside its version")?;
    if version >> 8 != 3 {
        return Err(Malformed("the hello's version is not 3.x"));
    }
    r.take(32, "the hello ends inside its random")?;
    if r.vec8("the session id runs past the hello")?.0.len() > 32 {
        return Err(Malformed("a session id longer than 32 bytes"));
    }
    let suites = r.vec16("the cipher suites run past the hello")?.0;
    if suites.is_empty() || suites.len() % 2 != 0 {
        return Err(Malformed("the cipher suites are empty or of odd length"));
    }
    if r.vec8("the compression methods run past the hello")?
        .0
        .is_empty()
    {
        return Err(Malformed("no compression method"));
    }
    let mut hello = ClientHello::default();
    if r.0.is_empty() {
        // No extensions at all: allowed before TLS 1.3.
        return Ok(hello);
    }
    let mut extensions = r.vec16("the extensions run past the hello")?;
    r.end("bytes after the extensions")?;
    let (mut sni, mut alpn) = (false, false);
    while !extensions.0.is_empty() {
        let kind = extensions.u16("an extension type runs past the extensions")?;
        let data = extensions.vec16("an extension runs past the extensions")?;
        match kind {
            EXT_SERVER_NAME if sni => return Err(Malformed("two server_name extensions")),
            EXT_SERVER_NAME => {
                sni = true;
                hello.server_name = Some(server_name(data)?);
            }
            EXT_ALPN if alpn => return Err(Malformed("two ALPN extensions")),
            EXT_ALPN => {
                alpn = true;
                hello.alpn = protocols(data)?;
            }
            _ => {}
        }
    }
    Ok(hello)
}

/// A server_name extension: a list of exactly one host_name entry.
fn server_name(mut data: Reader<'_>) -> Result<String, HelloError> {
    let mut list = data.vec16("the server name list runs past its extension")?;
    data.end("bytes after the server name list")?;
    if list.u8("an empty server name list")? != NAME_TYPE_HOST {
        return Err(Malformed("a server name that is not a host_name"));
    }
    let name = list.vec16("the host name runs past its list")?.0;
    list.end("more than one server name")?;
    if name.is_empty() {
        return Err(Malformed("an empty host name"));
    }
    if name.len() > MAX_HOST_NAME {
        return Err(Malformed("a host name longer than 255 bytes"));
    }
    // No NUL, control byte, space or non-ASCII byte: a name the server
    // could read differently from the route would be a way around it.
    if !name.iter().all(|b| b.is_ascii_graphic()) {
        return Err(Malformed(
            "a host name with a byte that is not printable ASCII",
        ));
    }
    Ok(name
        .iter()
        .map(|b| char::from(b.to_ascii_lowercase()))
        .collect())
}

/// An ALPN extension: a non-empty list of non-empty protocol names.
fn protocols(mut data: Reader<'_>) -> Result<Vec<Vec<u8>>, HelloError> {
    let mut list = data.vec16("the ALPN list runs past its extension")?;
    data.end("bytes after the ALPN list")?;
    if list.0.is_empty() {
        return Err(Malformed("an empty ALPN list"));
    }
    let mut names = Vec::new();
    while !list.0.is_empty() {
        let name = list.vec8("an ALPN protocol runs past its list")?.0;
        if name.is_empty() {
            return Err(Malformed("an empty ALPN protocol name"));
        }
        names.push(name.to_vec());
    }
    Ok(names)
}

/// Reads a TLS structure front to back. Every read checks that the bytes
/// are there; the error names what ran short.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, short: &'static str) -> Result<&'a [u8], HelloError> {
        if n > self.0.len() {
            return Err(Malformed(short));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn u8(&mut self, short: &'static str) -> Result<u8, HelloError> {
        let (&b, tail) = self.0.split_first().ok_or(Malformed(short))?;
        self.0 = tail;
        Ok(b)
    }

    fn u16(&mut self, short: &'static str) -> Result<u16, HelloError> {
        let b = self.take(2, short)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self, short: &'static str) -> Result<Reader<'a>, HelloError> {
        let n = self.u8(short)?;
        self.take(usize::from(n), short).map(Reader)
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self, short: &'static str) -> Result<Reader<'a>, HelloError> {
        let n = self.u16(short)?;
        self.take(usize::from(n), short).map(Reader)
    }

    /// Nothing may be left.
    fn end(&self, left_over: &'static str) -> Result<(), HelloError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(Malformed(left_over))
        }
    }
}

#[cfg(test)]
mod tests;
