use super::*;
use crate::cli::logfmt::tests::{default_format, sample_closed_lines, untimed};

fn inner() -> Inner {
    Inner {
        pending: Mutex::new(Pending::default()),
        lines: Condvar::new(),
        room: Condvar::new(),
    }
}

/// What the writer thread writes of `inner`'s pending lines.
fn written(inner: &Inner) -> String {
    let mut out = Vec::new();
    let (mut text, mut joined) = (String::new(), Vec::new());
    inner
        .lock()
        .batch
        .write_to(&mut out, &mut text, &mut joined);
    String::from_utf8(out).unwrap()
}

#[test]
fn lines_are_kept_in_order_and_nothing_is_lost_past_the_high_water_mark() {
    let inner = inner();
    inner.append(b"one\n");
    inner.append(b"two\n");
    assert_eq!(inner.lock().batch.bytes, b"one\ntwo\n");
    // Closing lets a thread past the mark append instead of waiting.
    inner.lock().closing = true;
    let big = vec![b'x'; HIGH_WATER];
    inner.append(&big);
    inner.append(b"three\n");
    assert_eq!(inner.lock().batch.bytes.len(), 8 + HIGH_WATER + 6);
}

#[test]
fn queued_close_lines_are_the_default_formats_bytes_in_the_order_logged() {
    let inner = inner();
    inner.append(b"first\n");
    sample_closed_lines(&mut |line| {
        inner.append_close(line);
        inner.append(b"after a close line\n");
    });
    inner.append(b"last\n");
    assert_eq!(inner.lock().batch.closes.len(), 2);
    let text = written(&inner);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 6, "{text}");
    assert_eq!(lines[0], "first");
    assert_eq!(lines[2], "after a close line");
    assert_eq!(lines[4], "after a close line");
    assert_eq!(lines[5], "last");
    let queued = untimed(&[lines[1], lines[3]].join("\n"));
    let default = untimed(&default_format(|| {
        sample_closed_lines(&mut |line| line.log());
    }));
    assert_eq!(default.len(), 2);
    assert_eq!(queued, default);
}

#[test]
fn a_queued_close_line_counts_against_the_high_water_mark() {
    let inner = inner();
    sample_closed_lines(&mut |line| inner.append_close(line));
    assert_eq!(inner.lock().batch.size(), 2 * QUEUED_CLOSE_BYTES);
    inner.append(b"plain\n");
    assert_eq!(inner.lock().batch.size(), 2 * QUEUED_CLOSE_BYTES + 6);
}
