use std::io;
use std::sync::{Arc, Mutex};

use super::*;
use crate::error::{Op, RelayError, Side};
use crate::relay::report::{ClosedLine, Traffic};
use crate::relay::RouteTag;
use crate::stats::CloseReason;

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The lines `log` writes through the default format and through
/// [`TextFormat`], each without its timestamp, and [`TextFormat`]'s whole.
fn both(log: impl Fn()) -> (Vec<String>, Vec<String>, String) {
    let default = Captured::default();
    let sink = default.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(Level::TRACE)
        .finish();
    tracing::subscriber::with_default(subscriber, &log);
    let quick = Captured::default();
    let sink = quick.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || sink.clone())
        .with_ansi(false)
        .with_max_level(Level::TRACE)
        .event_format(TextFormat::new())
        .finish();
    tracing::subscriber::with_default(subscriber, &log);
    let text = |c: &Captured| String::from_utf8(c.0.lock().unwrap().clone()).unwrap();
    let untimed = |s: &str| -> Vec<String> {
        s.lines()
            .map(|l| {
                assert!(l.len() > 28, "{l:?}");
                l[28..].to_string()
            })
            .collect()
    };
    let (default, quick) = (text(&default), text(&quick));
    (untimed(&default), untimed(&quick), quick)
}

fn closed_lines() {
    let error = RelayError::new(
        Side::Upstream,
        Op::Connect,
        io::Error::from_raw_os_error(libc::ECONNREFUSED),
    );
    let route = RouteTag {
        position: 2,
        server_name: Some("a.db.example".into()),
    };
    ClosedLine {
        relay: 7,
        client: Some("127.0.0.1:50000".parse().unwrap()),
        listener: "pg-rw",
        upstream: Some("[2001:db8::5]:5432".parse().unwrap()),
        traffic: Some(Traffic {
            bytes_c2u: 0,
            bytes_u2c: u64::MAX,
            duration_ms: 1234,
            engine_c2u: "splice",
            engine_u2c: "copy-fallback",
        }),
        route: Some(&route),
        reason: CloseReason::UpstreamReset,
        error: Some(&error),
    }
    .log();
    ClosedLine {
        relay: 8,
        client: Some("10.0.0.1:1".parse().unwrap()),
        listener: "127.0.0.1:6432",
        upstream: None,
        traffic: None,
        route: None,
        reason: CloseReason::ConnectFailed,
        error: None,
    }
    .log();
}

#[test]
fn the_close_line_is_what_the_default_format_writes() {
    let (default, quick, whole) = both(closed_lines);
    assert_eq!(default.len(), 2);
    assert_eq!(quick, default);
    assert!(
        quick[0].starts_with(" INFO spliced::relay: relay closed relay=7 client=127.0.0.1:50000 "),
        "{}",
        quick[0]
    );
    assert!(whole.ends_with("reason=connect-failed\n"), "{whole}");
}

#[derive(Debug)]
struct Outer(io::Error);

impl fmt::Display for Outer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("outer \x1b[31mfailure")
    }
}

impl std::error::Error for Outer {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

#[test]
fn every_kind_of_field_is_written_as_the_default_format_writes_it() {
    let (default, quick, _) = both(|| {
        let outer = Outer(io::Error::other("inner\u{9b}"));
        let plain = io::Error::other("plain");
        tracing::warn!(
            target: "spliced::relay",
            text = "quoted \"x\"\n",
            yes = true,
            negative = -42i64,
            min = i64::MIN,
            ratio = 0.5f64,
            r#type = "raw",
            list = ?[1, 2],
            outer = &outer as &(dyn std::error::Error + 'static),
            plain = &plain as &(dyn std::error::Error + 'static),
            "a \x1b[2Jmessage {}", 3
        );
        tracing::trace!(target: "spliced::relay", "no fields");
        tracing::error!(target: "spliced::relay", only = 1u64);
        tracing::info!(target: "spliced::other", n = 1, "elsewhere");
    });
    assert_eq!(default.len(), 4);
    assert_eq!(quick, default);
}

#[test]
fn dates_and_times_of_day_are_those_of_the_calendar() {
    let cases = [
        (0, "1970-01-01T00:00:00."),
        (951_782_400, "2000-02-29T00:00:00."),
        (1_709_164_800, "2024-02-29T00:00:00."),
        (1_796_619_494, "2026-12-07T04:58:14."),
        (4_102_444_799, "2099-12-31T23:59:59."),
        (MAX_FOUR_DIGIT_YEAR_SECS - 1, "9999-12-31T23:59:59."),
    ];
    for (secs, want) in cases {
        assert_eq!(std::str::from_utf8(&date_time_prefix(secs)).unwrap(), want);
    }
}

#[test]
fn the_timestamp_is_the_default_formats_to_the_second() {
    // The two are read moments apart: compare to the minute, unless the
    // minute turned between them.
    for _ in 0..3 {
        let mut quick = String::new();
        write_timestamp(&mut Writer::new(&mut quick)).unwrap();
        let mut default = String::new();
        tracing_subscriber::fmt::time::SystemTime
            .format_time(&mut Writer::new(&mut default))
            .unwrap();
        assert_eq!(quick.len(), 28, "{quick:?}");
        assert_eq!(&quick[26..], "Z ");
        if quick[..16] == default[..16] {
            return;
        }
    }
    panic!("the timestamps never agreed to the minute");
}
