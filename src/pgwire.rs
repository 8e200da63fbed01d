//! The little of the PostgreSQL wire protocol spliced speaks as if it were
//! the server: recognising a client's first packets, and the FATAL
//! ErrorResponse that tells a refused client why. Pure: bytes in, bytes
//! and decisions out; the sockets belong to the worker (`worker/preface.rs`
//! reads first packets, `worker/farewell.rs` drives a refusal).
//!
//! postgres-protocol (the crate the health probes use) encodes frontend
//! messages and parses backend ones, but has no encoder for a backend
//! ErrorResponse: [`error_response`] is that encoder, and its tests read
//! the bytes back with the crate's parser.

/// A CancelRequest: its length and request code.
pub(crate) const CANCEL_REQUEST_LEN: usize = 16;
pub(crate) const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// An SSLRequest's request code (the packet is 8 bytes).
pub(crate) const SSL_REQUEST_CODE: u32 = 80_877_103;
/// An SSLRequest as a client sends it, whole.
pub(crate) const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
/// A GSSENCRequest's request code (the packet is 8 bytes).
pub(crate) const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// PostgreSQL's own bound on a startup packet (`MAX_STARTUP_PACKET_LENGTH`).
pub(crate) const MAX_STARTUP_LEN: u32 = 10_000;
/// The longest message an ErrorResponse of ours carries, in bytes.
pub(crate) const MAX_MESSAGE_LEN: usize = 512;

/// The SQLSTATE codes spliced answers with (PostgreSQL's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SqlState {
    /// 57P03 `cannot_connect_now`: what PostgreSQL answers while it
    /// starts up, shuts down or recovers; drivers and poolers retry it.
    CannotConnectNow,
    /// 53300 `too_many_connections`: a connection limit.
    TooManyConnections,
    /// 53000 `insufficient_resources`.
    InsufficientResources,
    /// 28000 `invalid_authorization_specification`: what PostgreSQL
    /// answers a host no pg_hba.conf line admits.
    InvalidAuthorization,
}

impl SqlState {
    pub(crate) fn code(self) -> &'static str {
        match self {
            SqlState::CannotConnectNow => "57P03",
            SqlState::TooManyConnections => "53300",
            SqlState::InsufficientResources => "53000",
            SqlState::InvalidAuthorization => "28000",
        }
    }
}

/// A FATAL ErrorResponse (protocol 3.0): `E`, its length, then the fields
/// severity (`S`, and the untranslated `V`), SQLSTATE (`C`) and message
/// (`M`), each a NUL-terminated string, and a final NUL. A NUL inside
/// `message` is dropped (it would end the field early) and the message is
/// cut to [`MAX_MESSAGE_LEN`] bytes, at a character boundary.
pub(crate) fn error_response(state: SqlState, message: &str) -> Vec<u8> {
    let mut cut = message.len().min(MAX_MESSAGE_LEN);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let message = &message[..cut];
    let mut out = Vec::with_capacity(32 + message.len());
    out.push(b'E');
    out.extend_from_slice(&[0; 4]);
    for (field, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', state.code()),
        (b'M', message),
    ] {
        out.push(field);
        out.extend(value.bytes().filter(|&b| b != 0));
        out.push(0);
    }
    out.push(0);
    // The length counts itself and the fields, not the type byte; a
    // message of at most MAX_MESSAGE_LEN bytes keeps it far below i32::MAX.
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out
}

/// What a client's first packets asked for, as [`Greeting::feed`] tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Heard {
    /// Nothing whole yet: read on.
    More,
    /// An SSLRequest or GSSENCRequest: a server without TLS or GSS
    /// answers `N`, and the client goes on in plain text.
    EncryptionRequest,
    /// The startup packet is whole, or cannot be read past (a length out
    /// of bounds, a second request for the same encryption): the moment a
    /// server answers it.
    Startup,
    /// A CancelRequest: PostgreSQL answers none and closes.
    Cancel,
}

/// A client's first packets as a server reads them: encryption requests,
/// each answered, then the startup packet. Only headers are kept (8
/// bytes); a body is counted, not stored. Once it heard a startup packet
/// or a cancel request it takes every further byte and tells nothing.
#[derive(Clone, Debug, Default)]
pub(crate) struct Greeting {
    header: [u8; 8],
    have: u8,
    /// Body bytes of the packet being read that are still to come.
    skip: u32,
    ssl_asked: bool,
    gss_asked: bool,
    decided: bool,
}

impl Greeting {
    /// Reads from `bytes` up to the first thing a server acts on; returns
    /// how many bytes it took and what it heard. Call again with the rest:
    /// the outcome does not depend on how the bytes were split.
    pub(crate) fn feed(&mut self, bytes: &[u8]) -> (usize, Heard) {
        if self.decided {
            return (bytes.len(), Heard::More);
        }
        let mut used = 0;
        loop {
            if self.skip > 0 {
                let n = (bytes.len() - used).min(self.skip as usize);
                used += n;
                self.skip -= n as u32;
                if self.skip > 0 {
                    return (used, Heard::More);
                }
                return (used, self.decide(Heard::Startup));
            }
            let have = self.have as usize;
            let n = (bytes.len() - used).min(8 - have);
            self.header[have..have + n].copy_from_slice(&bytes[used..used + n]);
            used += n;
            self.have += n as u8;
            if self.have < 8 {
                return (used, Heard::More);
            }
            self.have = 0;
            let len = u32::from_be_bytes([
                self.header[0],
                self.header[1],
                self.header[2],
                self.header[3],
            ]);
            let code = u32::from_be_bytes([
                self.header[4],
                self.header[5],
                self.header[6],
                self.header[7],
            ]);
            match (len, code) {
                (8, SSL_REQUEST_CODE) if !self.ssl_asked => {
                    self.ssl_asked = true;
                    return (used, Heard::EncryptionRequest);
                }
                (8, GSSENC_REQUEST_CODE) if !self.gss_asked => {
                    self.gss_asked = true;
                    return (used, Heard::EncryptionRequest);
                }
                (16, CANCEL_REQUEST_CODE) => return (used, self.decide(Heard::Cancel)),
                (9..=MAX_STARTUP_LEN, _) => self.skip = len - 8,
                _ => return (used, self.decide(Heard::Startup)),
            }
        }
    }

    fn decide(&mut self, heard: Heard) -> Heard {
        self.decided = true;
        heard
    }
}

#[cfg(test)]
mod tests;
