//! Parsing of durations, sizes and addresses, shared by the CLI and the
//! config file.

use std::fmt;
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// The longest timeout accepted: a year. Longer ones are surely typos, and
/// `Instant + Duration` must never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86400);

/// Why a duration was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DurationError {
    Empty,
    /// It does not start with a number, or a unit follows no number.
    NotADuration(String),
    /// A number past `u64`.
    TooLarge(String),
    /// A bare number other than `0`.
    NoUnit {
        text: String,
        value: u64,
    },
    UnknownUnit {
        text: String,
        unit: String,
    },
    /// Longer than [`MAX_DURATION`].
    TooLong(String),
}

impl fmt::Display for DurationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DurationError::Empty => f.write_str("empty duration"),
            DurationError::NotADuration(text) => {
                write!(f, "'{text}' is not a duration (try 500ms, 30s, 5m, 1h)")
            }
            DurationError::TooLarge(text) => write!(f, "'{text}' is too large"),
            DurationError::NoUnit { text, value } => write!(
                f,
                "'{text}' has no unit (try {value}s or {value}ms; 0 disables)"
            ),
            DurationError::UnknownUnit { text, unit } => write!(
                f,
                "'{text}' has an unknown unit '{unit}' (use us, ms, s, m, h or d)"
            ),
            DurationError::TooLong(text) => {
                write!(f, "'{text}' is longer than the maximum of 365d")
            }
        }
    }
}

impl std::error::Error for DurationError {}

/// Why a byte size was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SizeError {
    /// It does not start with a number.
    NotASize(String),
    /// Past `usize`, as a number or once multiplied by its unit.
    TooLarge(String),
    UnknownUnit {
        text: String,
        unit: String,
    },
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SizeError::NotASize(text) => {
                write!(f, "'{text}' is not a size (try 65536, 256k or 1m)")
            }
            SizeError::TooLarge(text) => write!(f, "'{text}' is too large"),
            SizeError::UnknownUnit { text, unit } => {
                write!(f, "'{text}' has an unknown unit '{unit}'")
            }
        }
    }
}

impl std::error::Error for SizeError {}

/// Why an address (to listen on, or of an admin endpoint or an upstream
/// given on the command line) was refused.
#[derive(Debug)]
pub enum AddressError {
    /// Not `HOST:PORT`.
    NotAnAddress(String),
    /// `:PORT` or `*:PORT` without a valid port.
    WildcardPort(String),
    /// The name did not resolve.
    Resolve { text: String, source: io::Error },
    /// The name resolved to no address.
    NoAddress(String),
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AddressError::NotAnAddress(text) => {
                write!(f, "'{text}' is not an address (expected HOST:PORT)")
            }
            AddressError::WildcardPort(text) => {
                write!(f, "'{text}' has no valid port (expected :PORT, e.g. :6432)")
            }
            AddressError::Resolve { text, source } => {
                write!(f, "cannot resolve '{text}': {source}")
            }
            AddressError::NoAddress(text) => write!(f, "'{text}' resolves to no address"),
        }
    }
}

impl std::error::Error for AddressError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AddressError::Resolve { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Why a `HOST:PORT` (a server of a pool) was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostPortError {
    /// No `:` at all.
    NotAnAddress(String),
    /// What follows the last `:` is no port.
    Port(String),
    /// Nothing before the `:`.
    NoHost(String),
    /// `[...]` holding no IPv6 address.
    NotIpv6 { text: String, inner: String },
    /// An IPv6 address without brackets.
    Unbracketed(String),
}

impl fmt::Display for HostPortError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPortError::NotAnAddress(text) => {
                write!(f, "'{text}' is not an address (expected HOST:PORT)")
            }
            HostPortError::Port(text) => {
                write!(f, "'{text}' has no valid port (expected HOST:PORT)")
            }
            HostPortError::NoHost(text) => write!(f, "'{text}' has no host (expected HOST:PORT)"),
            HostPortError::NotIpv6 { text, inner } => write!(
                f,
                "'{text}' is not an address ([{inner}] is no IPv6 address)"
            ),
            HostPortError::Unbracketed(text) => {
                write!(f, "'{text}' is not an address (write IPv6 as [ADDR]:PORT)")
            }
        }
    }
}

impl std::error::Error for HostPortError {}

/// Parses `500ms`, `30s`, `5m`, `1h` (also `us`, `d`, and sums like `1m30s`).
/// `0` alone means "disabled" and yields `None`; any other bare number is
/// rejected, because `--idle-timeout 30` is ambiguous.
pub fn parse_duration(text: &str) -> Result<Option<Duration>, DurationError> {
    let s = text.trim();
    if s == "0" {
        return Ok(None);
    }
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(DurationError::NotADuration(text.into()));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| DurationError::TooLarge(text.into()))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "" => {
                return Err(DurationError::NoUnit {
                    text: text.into(),
                    value,
                })
            }
            "us" => Duration::from_micros(value),
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.saturating_mul(60)),
            "h" => Duration::from_secs(value.saturating_mul(3600)),
            "d" => Duration::from_secs(value.saturating_mul(86400)),
            other => {
                return Err(DurationError::UnknownUnit {
                    text: text.into(),
                    unit: other.into(),
                })
            }
        };
        total = total.saturating_add(part);
    }
    if total > MAX_DURATION {
        return Err(DurationError::TooLong(text.into()));
    }
    Ok(if total.is_zero() { None } else { Some(total) })
}

/// Parses a byte size: `65536`, `64k`, `1m`, `1MiB`.
pub fn parse_size(text: &str) -> Result<usize, SizeError> {
    let s = text.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(SizeError::NotASize(text.into()));
    }
    let value: usize = s[..digits]
        .parse()
        .map_err(|_| SizeError::TooLarge(text.into()))?;
    let mult = match s[digits..].to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => {
            return Err(SizeError::UnknownUnit {
                text: text.into(),
                unit: other.into(),
            })
        }
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| SizeError::TooLarge(text.into()))
}

/// The inverse of [`parse_duration`]: the largest unit that divides it
/// (`90s`, `5m`, `1h`); `0` for "disabled".
pub fn format_duration(d: Option<Duration>) -> String {
    let Some(d) = d else { return "0".into() };
    let us = d.as_micros();
    for (unit, size) in [
        ("d", 86_400_000_000u128),
        ("h", 3_600_000_000),
        ("m", 60_000_000),
        ("s", 1_000_000),
        ("ms", 1000),
    ] {
        if us >= size && us % size == 0 {
            return format!("{}{unit}", us / size);
        }
    }
    format!("{us}us")
}

/// The inverse of [`parse_size`]: `1m`, `64k` or plain bytes.
pub fn format_size(n: usize) -> String {
    for (unit, size) in [("g", 1usize << 30), ("m", 1 << 20), ("k", 1 << 10)] {
        if n >= size && n % size == 0 {
            return format!("{}{unit}", n / size);
        }
    }
    n.to_string()
}

/// `a, b, c` for log lines and errors.
pub fn display_addrs(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Resolves a listen address. Besides what [`resolve`] takes, `:PORT` (and
/// `*:PORT`) means every address, IPv4 and IPv6, as HAProxy and nginx users
/// write it. A name is bound on every address it resolves to.
pub fn resolve_listen(text: &str) -> Result<Vec<SocketAddr>, AddressError> {
    let wildcard_port = text.strip_prefix(':').or_else(|| text.strip_prefix("*:"));
    if let Some(port) = wildcard_port {
        let port: u16 = port
            .parse()
            .map_err(|_| AddressError::WildcardPort(text.into()))?;
        return Ok(vec![
            SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, port)),
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port)),
        ]);
    }
    let mut addrs = resolve(text)?;
    let mut seen = std::collections::HashSet::new();
    addrs.retain(|a| seen.insert(*a));
    Ok(addrs)
}

/// Resolves `host:port` (or `ip:port`, or `[v6]:port`) to addresses.
pub fn resolve(text: &str) -> Result<Vec<SocketAddr>, AddressError> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    if !text.contains(':') {
        return Err(AddressError::NotAnAddress(text.into()));
    }
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|source| AddressError::Resolve {
            text: text.into(),
            source,
        })?
        .collect();
    if addrs.is_empty() {
        return Err(AddressError::NoAddress(text.into()));
    }
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!(
            parse_duration("500ms"),
            Ok(Some(Duration::from_millis(500)))
        );
        assert_eq!(parse_duration("30s"), Ok(Some(Duration::from_secs(30))));
        assert_eq!(parse_duration("5m"), Ok(Some(Duration::from_secs(300))));
        assert_eq!(parse_duration("1h"), Ok(Some(Duration::from_secs(3600))));
        assert_eq!(parse_duration("1m30s"), Ok(Some(Duration::from_secs(90))));
        assert_eq!(parse_duration("0"), Ok(None));
        assert_eq!(parse_duration("0s"), Ok(None));
        assert!(parse_duration("30")
            .unwrap_err()
            .to_string()
            .contains("no unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3x")
            .unwrap_err()
            .to_string()
            .contains("unknown unit"));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999999s").is_err());
        assert_eq!(parse_duration("365d"), Ok(Some(MAX_DURATION)));
        assert!(parse_duration("366d")
            .unwrap_err()
            .to_string()
            .contains("maximum"));
        assert!(parse_duration("106751991167301d").is_err());
    }

    #[test]
    fn formats_parse_back() {
        for text in ["500ms", "90s", "5m", "1h", "2d", "1500us"] {
            let d = parse_duration(text).unwrap();
            assert_eq!(format_duration(d), text);
        }
        assert_eq!(format_duration(None), "0");
        for text in ["1m", "64k", "1000", "2g"] {
            assert_eq!(format_size(parse_size(text).unwrap()), text);
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64k"), Ok(65536));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert!(parse_size("x").is_err());
        assert!(parse_size("1q").is_err());
    }

    #[test]
    fn addresses() {
        assert_eq!(resolve("127.0.0.1:80").unwrap().len(), 1);
        assert!(resolve("[::1]:80").is_ok());
        assert!(resolve("nonsense").is_err());
        assert!(resolve("127.0.0.1:notaport").is_err());
    }

    #[test]
    fn listen_addresses() {
        let all = resolve_listen(":6432").unwrap();
        assert_eq!(all.len(), 2);
        assert!(all
            .iter()
            .all(|a| a.ip().is_unspecified() && a.port() == 6432));
        assert!(all[0].is_ipv4() && all[1].is_ipv6());
        assert_eq!(resolve_listen("*:5").unwrap().len(), 2);
        assert!(resolve_listen(":").is_err());
        assert!(resolve_listen(":99999").is_err());
        assert_eq!(resolve_listen("127.0.0.1:7").unwrap().len(), 1);
        let local = resolve_listen("localhost:7").unwrap();
        assert!(!local.is_empty() && local.iter().all(|a| a.ip().is_loopback()));
    }
}
