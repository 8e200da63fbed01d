//! Parsing of durations, sizes and addresses, shared by the CLI and the
//! config file.

use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// The longest timeout accepted: a year. Longer ones are surely typos, and
/// `Instant + Duration` must never overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 86400);

/// Parses `500ms`, `30s`, `5m`, `1h` (also `us`, `d`, and sums like `1m30s`).
/// `0` alone means "disabled" and yields `None`; any other bare number is
/// rejected, because `--idle-timeout 30` is ambiguous.
pub fn parse_duration(text: &str) -> Result<Option<Duration>, String> {
    let s = text.trim();
    if s == "0" {
        return Ok(None);
    }
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "'{text}' is not a duration (try 500ms, 30s, 5m, 1h)"
            ));
        }
        let value: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("'{text}' is too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "" => {
                return Err(format!(
                    "'{text}' has no unit (try {value}s or {value}ms; 0 disables)"
                ))
            }
            "us" => Duration::from_micros(value),
            "ms" => Duration::from_millis(value),
            "s" => Duration::from_secs(value),
            "m" => Duration::from_secs(value.saturating_mul(60)),
            "h" => Duration::from_secs(value.saturating_mul(3600)),
            "d" => Duration::from_secs(value.saturating_mul(86400)),
            other => {
                return Err(format!(
                    "'{text}' has an unknown unit '{other}' (use us, ms, s, m, h or d)"
                ))
            }
        };
        total = total.saturating_add(part);
    }
    if total > MAX_DURATION {
        return Err(format!("'{text}' is longer than the maximum of 365d"));
    }
    Ok(if total.is_zero() { None } else { Some(total) })
}

/// Parses a byte size: `65536`, `64k`, `1m`, `1MiB`.
pub fn parse_size(text: &str) -> Result<usize, String> {
    let s = text.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(format!("'{text}' is not a size (try 65536, 256k or 1m)"));
    }
    let value: usize = s[..digits]
        .parse()
        .map_err(|_| format!("'{text}' is too large"))?;
    let mult = match s[digits..].to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        other => return Err(format!("'{text}' has an unknown unit '{other}'")),
    };
    value
        .checked_mul(mult)
        .ok_or_else(|| format!("'{text}' is too large"))
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
pub fn resolve_listen(text: &str) -> Result<Vec<SocketAddr>, String> {
    let wildcard_port = text.strip_prefix(':').or_else(|| text.strip_prefix("*:"));
    if let Some(port) = wildcard_port {
        let port: u16 = port
            .parse()
            .map_err(|_| format!("'{text}' has no valid port (expected :PORT, e.g. :6432)"))?;
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
pub fn resolve(text: &str) -> Result<Vec<SocketAddr>, String> {
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(vec![addr]);
    }
    if !text.contains(':') {
        return Err(format!("'{text}' is not an address (expected HOST:PORT)"));
    }
    let addrs: Vec<SocketAddr> = text
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve '{text}': {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("'{text}' resolves to no address"));
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
        assert!(parse_duration("30").unwrap_err().contains("no unit"));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
        assert!(parse_duration("3x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999999999999999999s").is_err());
        assert_eq!(parse_duration("365d"), Ok(Some(MAX_DURATION)));
        assert!(parse_duration("366d").unwrap_err().contains("maximum"));
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
