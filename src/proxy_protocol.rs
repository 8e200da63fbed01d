//! The PROXY protocol (HAProxy's proxy-protocol.txt), versions 1 and 2:
//! an encoder for the header spliced sends to an upstream, a strict
//! incremental parser for the header a trusted client sends, and the
//! trusted-source check.
//!
//! The parser reads nothing past the header it returns and never asks for
//! more than [`V1_MAX`] bytes (v1) or `16 + 216 + V2_MAX_EXTRA` (v2): a
//! client that has not completed a valid header by then is refused. It is
//! strict where the specification leaves room: single spaces, canonical
//! addresses and ports (no leading zeros), a family that matches the
//! addresses, TLVs that tile the extra bytes exactly.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;

/// The longest v1 header, CRLF included.
pub const V1_MAX: usize = 107;
/// The most bytes a v2 header may carry past its addresses (TLVs).
pub const V2_MAX_EXTRA: usize = 512;
/// The v2 signature.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
const V2_HEADER: usize = 16;
/// Address block sizes: AF_INET, AF_INET6, AF_UNIX.
const V2_INET: usize = 12;
const V2_INET6: usize = 36;
const V2_UNIX: usize = 216;

/// A complete header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Bytes the header took; the payload starts right after.
    pub header_len: usize,
    pub version: u8,
    /// `None` for v1 UNKNOWN, v2 LOCAL, and v2 UNSPEC or UNIX addresses:
    /// use the connection's own addresses.
    pub source: Option<SocketAddr>,
    pub destination: Option<SocketAddr>,
}

/// What the bytes so far amount to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parse {
    Complete(Parsed),
    /// A valid beginning: read more and parse the whole buffer again.
    Incomplete,
}

/// Why a header is refused. Displayed as one line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProxyHeaderError {
    /// Neither "PROXY " nor the v2 signature.
    NotProxy,
    /// v1: no CRLF within [`V1_MAX`] bytes.
    V1TooLong,
    /// v1: what is wrong with the line.
    V1Malformed(&'static str),
    V2Version(u8),
    V2Command(u8),
    V2Family(u8),
    /// v2: the length field, over the cap.
    V2TooLong(usize),
    /// v2: the length field, too short for the family's addresses.
    V2Short(usize),
    V2Tlv,
}

impl fmt::Display for ProxyHeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use ProxyHeaderError::*;
        // The parser reads what a client sent; the side leads the line.
        f.write_str("client PROXY header: ")?;
        match self {
            NotProxy => f.write_str("neither a v1 nor a v2 signature"),
            V1TooLong => write!(f, "v1 line without CRLF within {V1_MAX} bytes"),
            V1Malformed(why) => write!(f, "v1 line {why}"),
            V2Version(v) => write!(f, "v2 version nibble {v}, want 2"),
            V2Command(c) => write!(f, "v2 command {c}, want 0 (LOCAL) or 1 (PROXY)"),
            V2Family(b) => write!(
                f,
                "v2 family/protocol byte {b:#04x} is not TCP over IPv4/IPv6, UNIX stream or UNSPEC"
            ),
            V2TooLong(n) => write!(f, "v2 length {n} over the cap (addresses + {V2_MAX_EXTRA})"),
            V2Short(n) => write!(f, "v2 length {n} too short for its addresses"),
            V2Tlv => f.write_str("v2 TLVs do not fill the extra bytes exactly"),
        }
    }
}

impl std::error::Error for ProxyHeaderError {}

/// Parses the header at the start of `buf`.
pub fn parse(buf: &[u8]) -> Result<Parse, ProxyHeaderError> {
    if buf.is_empty() {
        return Ok(Parse::Incomplete);
    }
    if buf[0] == V1_PREFIX[0] {
        return parse_v1(buf);
    }
    if buf[0] == V2_SIGNATURE[0] {
        return parse_v2(buf);
    }
    Err(ProxyHeaderError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Parse, ProxyHeaderError> {
    let n = buf.len().min(V1_PREFIX.len());
    if buf[..n] != V1_PREFIX[..n] {
        return Err(ProxyHeaderError::NotProxy);
    }
    let window = &buf[..buf.len().min(V1_MAX)];
    // Only printable ASCII before the CR, so a bad byte is refused as soon
    // as it arrives rather than after 107 bytes.
    let Some(cr) = window.iter().position(|&b| !(0x20..0x7f).contains(&b)) else {
        return if buf.len() >= V1_MAX {
            Err(ProxyHeaderError::V1TooLong)
        } else {
            Ok(Parse::Incomplete)
        };
    };
    if window[cr] != b'\r' {
        return Err(ProxyHeaderError::V1Malformed(
            "holds a control or non-ASCII byte",
        ));
    }
    match window.get(cr + 1) {
        None if buf.len() >= V1_MAX => return Err(ProxyHeaderError::V1TooLong),
        None => return Ok(Parse::Incomplete),
        Some(b'\n') => {}
        Some(_) => return Err(ProxyHeaderError::V1Malformed("has a CR without LF")),
    }
    if cr < V1_PREFIX.len() {
        return Err(ProxyHeaderError::V1Malformed("ends before its protocol"));
    }
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..cr])
        .map_err(|_| ProxyHeaderError::V1Malformed("is not ASCII"))?;
    let (source, destination) = v1_fields(line)?;
    Ok(Parse::Complete(Parsed {
        header_len: cr + 2,
        version: 1,
        source,
        destination,
    }))
}

type Pair = (Option<SocketAddr>, Option<SocketAddr>);

fn v1_fields(line: &str) -> Result<Pair, ProxyHeaderError> {
    use ProxyHeaderError::V1Malformed as Bad;
    // The specification lets UNKNOWN carry anything up to the CRLF.
    if line == "UNKNOWN" || line.starts_with("UNKNOWN ") {
        return Ok((None, None));
    }
    let fields: Vec<&str> = line.split(' ').collect();
    let [proto, src, dst, sport, dport] = fields[..] else {
        return Err(Bad("does not have exactly five single-spaced fields"));
    };
    let (src, dst): (IpAddr, IpAddr) = match proto {
        "TCP4" => (
            src.parse::<Ipv4Addr>()
                .map_err(|_| Bad("has a bad IPv4 source"))?
                .into(),
            dst.parse::<Ipv4Addr>()
                .map_err(|_| Bad("has a bad IPv4 destination"))?
                .into(),
        ),
        "TCP6" => (
            src.parse::<Ipv6Addr>()
                .map_err(|_| Bad("has a bad IPv6 source"))?
                .into(),
            dst.parse::<Ipv6Addr>()
                .map_err(|_| Bad("has a bad IPv6 destination"))?
                .into(),
        ),
        _ => return Err(Bad("has a protocol other than TCP4, TCP6 or UNKNOWN")),
    };
    let sport = v1_port(sport).ok_or(Bad("has a bad source port"))?;
    let dport = v1_port(dport).ok_or(Bad("has a bad destination port"))?;
    Ok((
        Some(SocketAddr::new(src, sport)),
        Some(SocketAddr::new(dst, dport)),
    ))
}

/// Decimal 0..=65535 without sign or leading zeros.
fn v1_port(s: &str) -> Option<u16> {
    let canonical = !s.is_empty()
        && s.len() <= 5
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s == "0" || !s.starts_with('0'));
    canonical.then(|| s.parse().ok()).flatten()
}

fn parse_v2(buf: &[u8]) -> Result<Parse, ProxyHeaderError> {
    use ProxyHeaderError::*;
    let n = buf.len().min(V2_SIGNATURE.len());
    if buf[..n] != V2_SIGNATURE[..n] {
        return Err(NotProxy);
    }
    let Some(&ver_cmd) = buf.get(12) else {
        return Ok(Parse::Incomplete);
    };
    if ver_cmd >> 4 != 2 {
        return Err(V2Version(ver_cmd >> 4));
    }
    let local = match ver_cmd & 0x0f {
        0 => true,
        1 => false,
        c => return Err(V2Command(c)),
    };
    let Some(&fam) = buf.get(13) else {
        return Ok(Parse::Incomplete);
    };
    // A relay carries streams only; LOCAL skips its address block, so a
    // datagram family is harmless there.
    let stream = fam & 0x0f == 1 || (local && fam & 0x0f == 2);
    let addr_len = match fam >> 4 {
        0 if fam == 0 => 0,
        1 if stream => V2_INET,
        2 if stream => V2_INET6,
        3 if stream => V2_UNIX,
        _ => return Err(V2Family(fam)),
    };
    let Some(len) = buf.get(14..16) else {
        return Ok(Parse::Incomplete);
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    if len < addr_len {
        return Err(V2Short(len));
    }
    if len - addr_len > V2_MAX_EXTRA {
        return Err(V2TooLong(len));
    }
    let Some(body) = buf.get(V2_HEADER..V2_HEADER + len) else {
        return Ok(Parse::Incomplete);
    };
    check_tlvs(&body[addr_len..])?;
    let (source, destination) = if local {
        (None, None)
    } else {
        v2_addrs(fam, body)
    };
    Ok(Parse::Complete(Parsed {
        header_len: V2_HEADER + len,
        version: 2,
        source,
        destination,
    }))
}

fn v2_addrs(fam: u8, body: &[u8]) -> Pair {
    let port = |at: usize| u16::from_be_bytes([body[at], body[at + 1]]);
    match fam {
        0x11 => {
            let ip = |at: usize| Ipv4Addr::new(body[at], body[at + 1], body[at + 2], body[at + 3]);
            (
                Some(SocketAddr::new(ip(0).into(), port(8))),
                Some(SocketAddr::new(ip(4).into(), port(10))),
            )
        }
        0x21 => {
            let ip = |at: usize| {
                let mut o = [0u8; 16];
                o.copy_from_slice(&body[at..at + 16]);
                Ipv6Addr::from(o)
            };
            (
                Some(SocketAddr::new(ip(0).into(), port(32))),
                Some(SocketAddr::new(ip(16).into(), port(34))),
            )
        }
        _ => (None, None),
    }
}

/// Each TLV is a type byte, a 2-byte length and that many bytes; together
/// they fill the extra bytes exactly. Their contents are not interpreted.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), ProxyHeaderError> {
    while !tlvs.is_empty() {
        let len = match tlvs.get(1..3) {
            Some(l) => usize::from(u16::from_be_bytes([l[0], l[1]])),
            None => return Err(ProxyHeaderError::V2Tlv),
        };
        tlvs = tlvs.get(3 + len..).ok_or(ProxyHeaderError::V2Tlv)?;
    }
    Ok(())
}

/// Both addresses in one family: a mixed pair is carried as IPv6, with
/// the IPv4 side mapped (`::ffff:a.b.c.d`).
fn same_family(src: SocketAddr, dst: SocketAddr) -> (SocketAddr, SocketAddr) {
    let v6 = |a: SocketAddr| match a.ip() {
        IpAddr::V4(ip) => SocketAddr::new(ip.to_ipv6_mapped().into(), a.port()),
        IpAddr::V6(_) => a,
    };
    if src.is_ipv4() == dst.is_ipv4() {
        (src, dst)
    } else {
        (v6(src), v6(dst))
    }
}

/// A v1 line: `PROXY TCP4|TCP6 src dst sport dport\r\n`, or
/// `PROXY UNKNOWN\r\n` for `None`.
pub fn encode_v1(addrs: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let Some((src, dst)) = addrs else {
        return b"PROXY UNKNOWN\r\n".to_vec();
    };
    let (src, dst) = same_family(src, dst);
    let proto = if src.is_ipv4() { "TCP4" } else { "TCP6" };
    format!(
        "PROXY {proto} {} {} {} {}\r\n",
        src.ip(),
        dst.ip(),
        src.port(),
        dst.port()
    )
    .into_bytes()
}

/// A v2 header: PROXY over TCP4/TCP6, or LOCAL (no addresses) for `None`.
pub fn encode_v2(addrs: Option<(SocketAddr, SocketAddr)>) -> Vec<u8> {
    let mut out = V2_SIGNATURE.to_vec();
    let Some((src, dst)) = addrs else {
        out.extend_from_slice(&[0x20, 0x00, 0, 0]);
        return out;
    };
    let (src, dst) = same_family(src, dst);
    match (src.ip(), dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            out.extend_from_slice(&[0x21, 0x11, 0, V2_INET as u8]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            out.extend_from_slice(&[0x21, 0x21, 0, V2_INET6 as u8]);
            out.extend_from_slice(&s.octets());
            out.extend_from_slice(&d.octets());
        }
        _ => unreachable!("same_family gives one family"),
    }
    out.extend_from_slice(&src.port().to_be_bytes());
    out.extend_from_slice(&dst.port().to_be_bytes());
    out
}

/// An entry of `accept-proxy.trusted` that is neither a network nor an
/// address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustedError(pub String);

impl std::fmt::Display for TrustedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "accept-proxy.trusted: {:?} is not a network (a.b.c.d/n, x::/n) or an address",
            self.0
        )
    }
}

impl std::error::Error for TrustedError {}

/// The peers allowed to send a PROXY header
/// (`accept-proxy = { trusted = [...] }`). Empty trusts no one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Trusted {
    nets: Vec<IpNet>,
}

impl Trusted {
    pub fn new(nets: Vec<IpNet>) -> Self {
        Trusted { nets }
    }

    /// Parses CIDR networks or bare addresses (a host route), naming the
    /// setting in the error.
    pub fn parse<S: AsRef<str>>(list: &[S]) -> Result<Self, TrustedError> {
        let nets = list
            .iter()
            .map(|s| {
                let s = s.as_ref().trim();
                s.parse::<IpNet>()
                    .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                    .map_err(|_| TrustedError(s.to_string()))
            })
            .collect::<Result<_, _>>()?;
        Ok(Trusted { nets })
    }

    /// Whether `peer` may send a header. An IPv4 peer seen on a
    /// dual-stack socket (`::ffff:a.b.c.d`) matches IPv4 networks.
    pub fn contains(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.nets.iter().any(|n| n.contains(&peer))
    }

    pub fn networks(&self) -> &[IpNet] {
        &self.nets
    }
}

#[cfg(test)]
mod tests;
