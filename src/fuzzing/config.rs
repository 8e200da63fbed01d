//! Config parsers.

use std::time::Duration;

use crate::config::{parse_duration, parse_size, Mode};

/// A second, independent reading of `parse_duration`'s grammar: Ok(None) for
/// "disabled", Err(()) for a rejection, Ok(Some(nanos)) otherwise, summed
/// exactly (no saturation) in u128.
pub(crate) fn reference_duration(text: &str) -> Result<Option<u128>, ()> {
    let s = text.trim();
    if s == "0" {
        return Ok(None);
    }
    if s.is_empty() {
        return Err(());
    }
    let mut total: u128 = 0;
    let mut chars = s.chars().peekable();
    while chars.peek().is_some() {
        let mut digits = String::new();
        while let Some(c) = chars.next_if(char::is_ascii_digit) {
            digits.push(c);
        }
        let mut unit = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_ascii_digit()) {
            unit.push(c);
        }
        let value: u64 = digits.parse().map_err(|_| ())?;
        let nanos: u128 = match unit.as_str() {
            "us" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            _ => return Err(()),
        };
        total = total.saturating_add(u128::from(value) * nanos);
    }
    if total > crate::config::MAX_DURATION.as_nanos() {
        return Err(());
    }
    Ok((total > 0).then_some(total))
}

/// `parse_duration` never panics, agrees with [`reference_duration`]
/// (saturating past u64::MAX seconds), ignores surrounding whitespace, and
/// what it returns prints back to itself.
pub(crate) fn check_duration_text(text: &str) {
    let got = parse_duration(text);
    let want = reference_duration(text);
    match (&got, want) {
        (Err(e), Err(())) => assert!(!e.to_string().is_empty()),
        (Ok(None), Ok(None)) => {}
        (Ok(Some(d)), Ok(Some(nanos))) => {
            let cap = u128::from(u64::MAX) * 1_000_000_000;
            if nanos >= cap {
                assert!(
                    *d >= Duration::from_secs(u64::MAX),
                    "{text:?}: {d:?} should saturate"
                );
            } else {
                assert_eq!(d.as_nanos(), nanos, "{text:?}: wrong duration");
            }
            if let Ok(us) = u64::try_from(d.as_micros()) {
                if d.subsec_nanos() % 1000 == 0 {
                    assert_eq!(
                        parse_duration(&format!("{us}us")),
                        Ok(Some(*d)),
                        "{text:?}: no round trip"
                    );
                }
            }
        }
        (got, want) => panic!("{text:?}: parse_duration gave {got:?}, the reference {want:?}"),
    }
    assert_eq!(
        parse_duration(&format!(" {text}\t")).ok(),
        got.ok(),
        "{text:?}: whitespace matters"
    );
}

/// `N<unit>` parses to exactly N units (saturating), `0<unit>` disables.
pub(crate) fn check_duration_number(n: u64) {
    type Unit = (&'static str, fn(u64) -> Duration);
    let units: [Unit; 6] = [
        ("us", Duration::from_micros),
        ("ms", Duration::from_millis),
        ("s", Duration::from_secs),
        ("m", |n| Duration::from_secs(n.saturating_mul(60))),
        ("h", |n| Duration::from_secs(n.saturating_mul(3600))),
        ("d", |n| Duration::from_secs(n.saturating_mul(86400))),
    ];
    for (unit, make) in units {
        let text = format!("{n}{unit}");
        let got = parse_duration(&text);
        if make(n) > crate::config::MAX_DURATION {
            assert!(got.is_err(), "{text}: past the maximum must be rejected");
        } else {
            assert_eq!(got, Ok((n > 0).then(|| make(n))), "{text}");
        }
    }
    if n > 0 {
        assert!(
            parse_duration(&n.to_string()).is_err(),
            "a bare number must be rejected"
        );
    }
    // Sums: "Nm Ns" is the sum of its parts.
    let m = n % 100_000;
    let sum = parse_duration(&format!("{m}m{n}s"));
    let want = Duration::from_secs(m * 60).saturating_add(Duration::from_secs(n));
    if want > crate::config::MAX_DURATION {
        assert!(sum.is_err(), "{m}m{n}s: past the maximum must be rejected");
    } else {
        assert_eq!(sum.unwrap().unwrap_or(Duration::ZERO), want, "{m}m{n}s");
    }
}

/// A second reading of `parse_size`: the size in bytes, exactly, or Err.
pub(crate) fn reference_size(text: &str) -> Result<u128, ()> {
    let s = text.trim();
    let digits: String = s.chars().take_while(char::is_ascii_digit).collect();
    let value: usize = digits.parse().map_err(|_| ())?;
    let unit = s[digits.len()..].to_ascii_lowercase();
    let mult: u128 = match unit.as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(()),
    };
    Ok(value as u128 * mult)
}

/// `parse_size` never panics, agrees with [`reference_size`] (rejecting
/// what overflows usize) and ignores surrounding whitespace.
pub(crate) fn check_size_text(text: &str) {
    let got = parse_size(text);
    match (&got, reference_size(text)) {
        (Ok(n), Ok(want)) => assert_eq!(*n as u128, want, "{text:?}"),
        (Err(_), Ok(want)) => assert!(want > usize::MAX as u128, "{text:?}: rejected {want}"),
        (Err(_), Err(())) => {}
        (Ok(n), Err(())) => panic!("{text:?}: parse_size accepted {n}, the reference rejects it"),
    }
    assert_eq!(
        parse_size(&format!("\n{text} ")).ok(),
        got.ok(),
        "{text:?}: whitespace matters"
    );
}

pub(crate) fn check_size_number(n: u64) {
    let Ok(n) = usize::try_from(n) else { return };
    assert_eq!(parse_size(&n.to_string()), Ok(n));
    for (unit, shift) in [
        ("k", 10),
        ("KiB", 10),
        ("m", 20),
        ("MB", 20),
        ("g", 30),
        ("GiB", 30),
    ] {
        let want = n.checked_mul(1 << shift);
        assert_eq!(parse_size(&format!("{n}{unit}")).ok(), want, "{n}{unit}");
    }
}

pub(super) fn check_mode_text(text: &str) {
    match text.parse::<Mode>() {
        Ok(mode) => assert_eq!(mode.as_str(), text),
        Err(msg) => {
            assert!(text != "splice" && text != "copy");
            assert!(msg.to_string().contains("unknown mode"));
        }
    }
}
