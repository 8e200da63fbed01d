//! The text log's event format: what `tracing_subscriber`'s default
//! (`Format<Full>`, no ANSI colours) writes, byte for byte, but for the
//! relay's own lines (target `spliced::relay`: `relay closed`, `relay
//! progress`) written with fewer formatting steps, since a worker writes one
//! per relay. The timestamp's date and time of day are formatted once per
//! second and thread, integers without `core::fmt`, and each field as its
//! name, `=` and its value, with no format string to interpret. Every other
//! line, and any line inside a span, goes through the default format.
//!
//! The line is built in the subscriber's per-thread buffer: no allocation
//! once that buffer has grown.

use std::cell::Cell;
use std::fmt::{self, Write as _};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::{Format, Full, Writer};
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::registry::LookupSpan;

/// The target whose lines take the quick path (the relay's lines).
const QUICK_TARGET: &str = "spliced::relay";

/// The text format of `spliced`'s log (see the module docs).
pub struct TextFormat {
    full: Format<Full, tracing_subscriber::fmt::time::SystemTime>,
}

impl TextFormat {
    /// Formats as `tracing_subscriber::fmt::format()` without ANSI colours.
    pub fn new() -> TextFormat {
        TextFormat {
            full: tracing_subscriber::fmt::format().with_ansi(false),
        }
    }
}

impl Default for TextFormat {
    fn default() -> Self {
        TextFormat::new()
    }
}

impl<S, N> FormatEvent<S, N> for TextFormat
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let meta = event.metadata();
        if meta.target() != QUICK_TARGET || writer.has_ansi_escapes() || ctx.event_scope().is_some()
        {
            return self.full.format_event(ctx, writer, event);
        }
        write_timestamp(&mut writer)?;
        writer.write_str(level_str(meta.level()))?;
        writer.write_char(' ')?;
        writer.write_str(meta.target())?;
        writer.write_str(": ")?;
        let sanitize = writer.sanitizes_ansi_escapes();
        let mut visitor = Fields {
            writer: writer.by_ref(),
            first: true,
            sanitize,
            result: Ok(()),
        };
        event.record(&mut visitor);
        visitor.result?;
        writer.write_char('\n')
    }
}

/// The level as the default format writes it: five columns, right-aligned.
fn level_str(level: &Level) -> &'static str {
    match *level {
        Level::TRACE => "TRACE",
        Level::DEBUG => "DEBUG",
        Level::INFO => " INFO",
        Level::WARN => " WARN",
        Level::ERROR => "ERROR",
    }
}

thread_local! {
    /// The second whose `YYYY-MM-DDTHH:MM:SS.` this thread wrote last.
    static SECOND: Cell<(u64, [u8; 20])> = const { Cell::new((u64::MAX, [0; 20])) };
}

/// The timestamp and its trailing space, as `tracing_subscriber`'s
/// `SystemTime` writes it (RFC 3339, UTC, microseconds).
fn write_timestamp(writer: &mut Writer<'_>) -> fmt::Result {
    let since_epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .ok()
        .filter(|d| d.as_secs() < MAX_FOUR_DIGIT_YEAR_SECS);
    let Some(since_epoch) = since_epoch else {
        // Before 1970 or past year 9999: the default writes those.
        if tracing_subscriber::fmt::time::SystemTime
            .format_time(writer)
            .is_err()
        {
            writer.write_str("<unknown time>")?;
        }
        return writer.write_char(' ');
    };
    let secs = since_epoch.as_secs();
    let prefix = SECOND.with(|cell| {
        let (cached, prefix) = cell.get();
        if cached == secs {
            return prefix;
        }
        let prefix = date_time_prefix(secs);
        cell.set((secs, prefix));
        prefix
    });
    let mut line = [0u8; 28];
    line[..20].copy_from_slice(&prefix);
    let mut micros = since_epoch.subsec_micros();
    for digit in line[20..26].iter_mut().rev() {
        *digit = b'0' + (micros % 10) as u8;
        micros /= 10;
    }
    line[26] = b'Z';
    line[27] = b' ';
    // Only ASCII digits and punctuation were written.
    writer.write_str(std::str::from_utf8(&line).map_err(|_| fmt::Error)?)
}

/// Seconds from 1970 to 10000-01-01T00:00:00Z.
const MAX_FOUR_DIGIT_YEAR_SECS: u64 = 253_402_300_800;

/// `YYYY-MM-DDTHH:MM:SS.` of `secs` since 1970 (UTC), for a year of four
/// digits.
fn date_time_prefix(secs: u64) -> [u8; 20] {
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days);
    let mut out = *b"0000-00-00T00:00:00.";
    put_digits(&mut out[0..4], year);
    put_digits(&mut out[5..7], month);
    put_digits(&mut out[8..10], day);
    put_digits(&mut out[11..13], rest / 3600);
    put_digits(&mut out[14..16], rest / 60 % 60);
    put_digits(&mut out[17..19], rest % 60);
    out
}

/// The proleptic Gregorian date of a day count from 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Writes `value`'s last `out.len()` decimal digits, zero-padded.
fn put_digits(out: &mut [u8], mut value: u64) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Writes `value` in decimal, as `{:?}` and `{}` do.
fn write_u64(writer: &mut Writer<'_>, mut value: u64) -> fmt::Result {
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    // Only ASCII digits were written.
    writer.write_str(std::str::from_utf8(&buf[at..]).map_err(|_| fmt::Error)?)
}

/// The event's fields as the default field formatter (`DefaultFields`)
/// writes them without ANSI colours: the message first as it is, then
/// ` name=value` with each value's `Debug`.
struct Fields<'w> {
    writer: Writer<'w>,
    first: bool,
    sanitize: bool,
    result: fmt::Result,
}

impl Fields<'_> {
    /// The separator before a field, and its name (`r#` stripped) and `=`
    /// unless it is the message.
    fn begin(&mut self, field: &Field) -> fmt::Result {
        if !std::mem::take(&mut self.first) {
            self.writer.write_char(' ')?;
        }
        match field.name() {
            "message" => Ok(()),
            name => {
                self.writer
                    .write_str(name.strip_prefix("r#").unwrap_or(name))?;
                self.writer.write_char('=')
            }
        }
    }

    fn record(&mut self, field: &Field, write: impl FnOnce(&mut Self) -> fmt::Result) {
        // `log.` fields are a `log` record's metadata, which the default
        // format does not write either.
        if self.result.is_err() || field.name().starts_with("log.") {
            return;
        }
        self.result = self.begin(field).and_then(|()| write(self));
    }
}

impl Visit for Fields<'_> {
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.record(field, |f| write_u64(&mut f.writer, value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.record(field, |f| {
            if value < 0 {
                f.writer.write_char('-')?;
            }
            write_u64(&mut f.writer, value.unsigned_abs())
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.record(field, |f| {
            f.writer.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"));
        } else {
            self.record_debug(field, &value);
        }
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let sanitize = self.sanitize;
        match value.source() {
            Some(source) => self.record_debug(
                field,
                &format_args!(
                    "{} {}.sources={}",
                    Escaped::new(format_args!("{value}"), sanitize),
                    field.name(),
                    SourceList(source, sanitize)
                ),
            ),
            None => self.record_debug(
                field,
                &format_args!("{}", Escaped::new(format_args!("{value}"), sanitize)),
            ),
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let sanitize = self.sanitize;
        self.record(field, |f| {
            if field.name() == "message" {
                write!(f.writer, "{:?}", Escaped::new(value, sanitize))
            } else {
                write!(f.writer, "{value:?}")
            }
        });
    }
}

/// A value whose terminal control characters are written escaped, as the
/// default format writes messages and errors (`sanitize` off: as it is).
struct Escaped<T> {
    value: T,
    sanitize: bool,
}

impl<T> Escaped<T> {
    fn new(value: T, sanitize: bool) -> Self {
        Escaped { value, sanitize }
    }
}

/// Writes through to a formatter, escaping ESC, BEL, BS, FF, DEL and the C1
/// controls.
struct EscapingWriter<'a, 'b>(&'a mut fmt::Formatter<'b>);

impl fmt::Write for EscapingWriter<'_, '_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for ch in s.chars() {
            match ch {
                '\x1b' => self.0.write_str("\\x1b")?,
                '\x07' => self.0.write_str("\\x07")?,
                '\x08' => self.0.write_str("\\x08")?,
                '\x0c' => self.0.write_str("\\x0c")?,
                '\x7f' => self.0.write_str("\\x7f")?,
                ch if ('\u{80}'..='\u{9f}').contains(&ch) => {
                    write!(self.0, "\\u{{{:x}}}", ch as u32)?
                }
                _ => self.0.write_char(ch)?,
            }
        }
        Ok(())
    }
}

impl<T: fmt::Debug> fmt::Debug for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sanitize {
            write!(EscapingWriter(f), "{:?}", self.value)
        } else {
            write!(f, "{:?}", self.value)
        }
    }
}

impl<T: fmt::Display> fmt::Display for Escaped<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sanitize {
            write!(EscapingWriter(f), "{}", self.value)
        } else {
            write!(f, "{}", self.value)
        }
    }
}

/// An error and its sources as a list, as the default format writes them.
struct SourceList<'a>(&'a (dyn std::error::Error + 'static), bool);

impl fmt::Display for SourceList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut list = f.debug_list();
        let mut current = Some(self.0);
        while let Some(error) = current {
            list.entry(&Escaped::new(format_args!("{error}"), self.1));
            current = error.source();
        }
        list.finish()
    }
}

#[cfg(test)]
mod tests;
