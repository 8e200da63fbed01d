//! What one `relay closed` line costs the thread that logs it: the text
//! format `spliced run` uses (`spliced::cli::logfmt::TextFormat`) against
//! `tracing_subscriber`'s default format, which writes the same bytes, each
//! into a writer that discards them (the write to stderr is the log
//! thread's, not measured here).
//!
//!   cargo bench --bench logline

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{criterion_group, criterion_main, Criterion};

/// A close line as a relay logs it (the fields of `ClosedLine::log`).
fn closed(relay: u64, client: SocketAddr, upstream: SocketAddr) {
    tracing::info!(
        target: "spliced::relay",
        relay,
        client = %client,
        listener = %"127.0.0.1:6432",
        upstream = %upstream,
        bytes_c2u = 72u64,
        bytes_u2c = 64u64,
        duration_ms = 1u64,
        engine_c2u = %"splice",
        engine_u2c = %"splice",
        reason = %"eof",
        "relay closed"
    );
}

fn close_line(c: &mut Criterion) {
    let client: SocketAddr = "127.0.0.1:53818".parse().unwrap();
    let upstream: SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let mut group = c.benchmark_group("relay closed line");
    let default = tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(default, || {
        let mut relay = 0u64;
        group.bench_function("tracing_subscriber default format", |b| {
            b.iter(|| {
                relay += 1;
                closed(black_box(relay), client, upstream)
            })
        });
    });
    let quick = tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .with_ansi(false)
        .event_format(spliced::cli::logfmt::TextFormat::new())
        .finish();
    tracing::subscriber::with_default(quick, || {
        let mut relay = 0u64;
        group.bench_function("spliced TextFormat", |b| {
            b.iter(|| {
                relay += 1;
                closed(black_box(relay), client, upstream)
            })
        });
    });
    let off = tracing_subscriber::fmt()
        .with_writer(std::io::sink)
        .with_max_level(tracing::Level::WARN)
        .finish();
    tracing::subscriber::with_default(off, || {
        let mut relay = 0u64;
        group.bench_function("line off (level warn)", |b| {
            b.iter(|| {
                relay += 1;
                closed(black_box(relay), client, upstream)
            })
        });
    });
    group.finish();
}

criterion_group!(benches, close_line);
criterion_main!(benches);
