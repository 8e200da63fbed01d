//! Relay throughput and round-trip latency through the real event loop, both
//! engines (and no proxy, for reference), across message sizes.
//!
//! `cargo bench --bench relay` (or `make bench`). The load is the same
//! embedded upstream and clients `spliced bench` uses; `spliced bench` is the
//! tool for comparing engines and proxies, this file is for tracking the hot
//! path from commit to commit.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use spliced::bench::load::{open, PingPong};
use spliced::bench::upstream::{Op, Upstream};
use spliced::{Config, Mode, ProxyHandle};

const SIZES: [usize; 4] = [64, 1 << 10, 16 << 10, 256 << 10];

fn proxy(mode: Mode, upstream: SocketAddr) -> ProxyHandle {
    let mut cfg = Config::single(([127, 0, 0, 1], 0).into(), vec![upstream], mode);
    cfg.workers = 1;
    spliced::start(cfg).expect("start spliced")
}

/// The engines: label, the address the load connects to, and the proxy (none for direct).
fn engines(up: &Upstream) -> Vec<(&'static str, SocketAddr, Option<ProxyHandle>)> {
    let mut out = Vec::new();
    for mode in [Mode::Splice, Mode::Copy] {
        let h = proxy(mode, up.addr());
        out.push((mode.as_str(), h.local_addr(), Some(h)));
    }
    out.push(("direct", up.addr(), None));
    out
}

/// One way into the sink: time to write `iters` messages of `size` bytes and see
/// them all arrive.
fn throughput(c: &mut Criterion) {
    let up = Upstream::start(([127, 0, 0, 1], 0).into()).expect("start upstream");
    let engines = engines(&up);
    let mut g = c.benchmark_group("relay_throughput");
    for &size in &SIZES {
        g.throughput(Throughput::Bytes(size as u64));
        for (label, addr, _) in &engines {
            g.bench_with_input(BenchmarkId::new(*label, size), &size, |b, &size| {
                let mut s = open(*addr, Op::Sink).expect("connect");
                let buf = vec![0x5au8; size];
                b.iter_custom(|iters| {
                    let sunk = &up.counters().sunk;
                    let want = sunk.load(Relaxed) + iters * size as u64;
                    let t0 = Instant::now();
                    for _ in 0..iters {
                        s.write_all(&buf).expect("write");
                    }
                    while sunk.load(Relaxed) < want {
                        std::thread::yield_now();
                    }
                    t0.elapsed()
                });
            });
        }
    }
    g.finish();
}

/// Ping-pong: one message of `size` bytes out and back on one connection.
fn round_trip(c: &mut Criterion) {
    let up = Upstream::start(([127, 0, 0, 1], 0).into()).expect("start upstream");
    let engines = engines(&up);
    let mut g = c.benchmark_group("relay_round_trip");
    for &size in &SIZES {
        g.throughput(Throughput::Bytes(2 * size as u64));
        for (label, addr, _) in &engines {
            g.bench_with_input(BenchmarkId::new(*label, size), &size, |b, &size| {
                let mut pp = PingPong::open(*addr, size).expect("connect");
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        total += pp.round_trip().expect("round trip");
                    }
                    total
                });
            });
        }
    }
    g.finish();
}

criterion_group! {
    name = relay;
    config = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = throughput, round_trip
}
criterion_main!(relay);
