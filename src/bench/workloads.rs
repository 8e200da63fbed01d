//! The cases of each workload and one measured run of a case through an engine.

use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use super::args::{size_human, Settings, Workload};
use super::clienthello::{client_hello, BENCH_ALPN, OPENSSL_HELLO_LEN};
use super::engines::{Engine, ROUTED_NAMES};
use super::load::{Bulk, Churn, PingPong, Way};
use super::measure::percentile;
use super::upstream::Upstream;

const GIB: f64 = (1u64 << 30) as f64;

/// A figure a run produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    Gbps,
    CpuPerGib,
    P50,
    P99,
    P999,
    ConnPerSec,
    CpuPerConn,
    Relays,
    BytesPerRelay,
    FdsPerRelay,
    Pipes,
    /// Share of the bytes the splice engine moved by splice (the rest fell back to copy).
    SplicedPct,
}

impl Metric {
    pub fn header(self) -> &'static str {
        match self {
            Metric::Gbps => "GB/s",
            Metric::CpuPerGib => "CPU s/GiB",
            Metric::P50 => "p50 µs",
            Metric::P99 => "p99 µs",
            Metric::P999 => "p999 µs",
            Metric::ConnPerSec => "conn/s",
            Metric::CpuPerConn => "CPU µs/conn",
            Metric::Relays => "relays",
            Metric::BytesPerRelay => "B/relay",
            Metric::FdsPerRelay => "fds/relay",
            Metric::Pipes => "pipes",
            Metric::SplicedPct => "spliced %",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Metric::Gbps => "GB/s",
            Metric::CpuPerGib => "s/GiB",
            Metric::P50 | Metric::P99 | Metric::P999 | Metric::CpuPerConn => "us",
            Metric::ConnPerSec => "1/s",
            Metric::Relays | Metric::Pipes => "count",
            Metric::BytesPerRelay => "B",
            Metric::FdsPerRelay => "fds",
            Metric::SplicedPct => "%",
        }
    }

    pub fn is_latency(self) -> bool {
        matches!(self, Metric::P50 | Metric::P99 | Metric::P999)
    }

    /// Figures that are counts rather than rates: no ratio between engines.
    pub fn no_ratio(self) -> bool {
        matches!(
            self,
            Metric::Relays | Metric::Pipes | Metric::SplicedPct | Metric::FdsPerRelay
        )
    }

    pub fn decimals(self, v: f64) -> usize {
        match self {
            Metric::Relays | Metric::Pipes | Metric::ConnPerSec | Metric::BytesPerRelay => 0,
            Metric::SplicedPct | Metric::FdsPerRelay => 1,
            _ if v.abs() >= 100.0 => 0,
            _ if v.abs() >= 10.0 => 1,
            _ if v.abs() >= 1.0 => 2,
            _ => 3,
        }
    }
}

/// What one case does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum CaseKind {
    /// `write`: the size of each write of every sender.
    Bulk {
        conns: usize,
        way: Way,
        write: usize,
    },
    Rr {
        size: usize,
    },
    Connect {
        threads: usize,
    },
    /// `connect` opened with a ClientHello of `hello` bytes, through a
    /// listener with `routes` server-name routes and a default route, or
    /// (`routes` 0) through the plain listener.
    ConnectHello {
        threads: usize,
        hello: usize,
        routes: usize,
    },
    Idle {
        relays: usize,
    },
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Case {
    pub workload: Workload,
    pub name: String,
    #[serde(flatten)]
    pub kind: CaseKind,
}

impl Case {
    /// The columns the table shows for this case, in order.
    pub fn metrics(&self) -> &'static [Metric] {
        match self.kind {
            CaseKind::Bulk { .. } => &[Metric::Gbps, Metric::CpuPerGib, Metric::Pipes],
            CaseKind::Rr { .. } => &[
                Metric::P50,
                Metric::P99,
                Metric::P999,
                Metric::Gbps,
                Metric::CpuPerGib,
            ],
            CaseKind::Connect { .. } | CaseKind::ConnectHello { .. } => {
                &[Metric::ConnPerSec, Metric::CpuPerConn]
            }
            CaseKind::Idle { .. } => &[
                Metric::Relays,
                Metric::BytesPerRelay,
                Metric::FdsPerRelay,
                Metric::Pipes,
            ],
        }
    }
}

/// The cases of the selected workloads, in run order.
pub fn cases(s: &Settings) -> Vec<Case> {
    let mut out = Vec::new();
    for w in &s.workloads {
        match w {
            Workload::Bulk => {
                for &write in &s.write_sizes {
                    let mut shapes = vec![(1, Way::Up), (s.conns, Way::Up), (1, Way::Both)];
                    if s.conns == 1 {
                        shapes.remove(1);
                    }
                    // Chosen write sizes compare directions too (iperf3 and -R).
                    let writes = if s.write_sizes_given {
                        shapes.insert(1, (1, Way::Down));
                        format!(", {} writes", size_human(write))
                    } else {
                        String::new()
                    };
                    for (conns, way) in shapes {
                        let way_name = match way {
                            Way::Up => "one way",
                            Way::Down => "upstream to client",
                            Way::Both => "both ways",
                        };
                        out.push(Case {
                            workload: *w,
                            name: format!(
                                "{conns} conn{}, {way_name}{writes}",
                                if conns == 1 { "" } else { "s" }
                            ),
                            kind: CaseKind::Bulk { conns, way, write },
                        });
                    }
                }
            }
            Workload::Rr => {
                for &size in &s.sizes {
                    out.push(Case {
                        workload: *w,
                        name: size_human(size),
                        kind: CaseKind::Rr { size },
                    });
                }
            }
            Workload::Connect => out.push(Case {
                workload: *w,
                name: format!("{} threads, 64 B exchange", s.connect_threads),
                kind: CaseKind::Connect {
                    threads: s.connect_threads,
                },
            }),
            Workload::ConnectRouted => {
                for routes in [0, ROUTED_NAMES.len()] {
                    let via = if routes == 0 {
                        "no routes".to_string()
                    } else {
                        format!("{routes} server-name routes + default")
                    };
                    out.push(Case {
                        workload: *w,
                        name: format!(
                            "{} threads, {OPENSSL_HELLO_LEN} B hello + 64 B, {via}",
                            s.connect_threads
                        ),
                        kind: CaseKind::ConnectHello {
                            threads: s.connect_threads,
                            hello: OPENSSL_HELLO_LEN,
                            routes,
                        },
                    });
                }
            }
            Workload::Idle => out.push(Case {
                workload: *w,
                name: format!("{} relays", s.idle_relays),
                kind: CaseKind::Idle {
                    relays: s.idle_relays,
                },
            }),
        }
    }
    out
}

pub type Figures = Vec<(Metric, f64)>;

/// Waits for the relays of the previous run to close, so their teardown is not
/// charged to this one.
fn settle(up: &Upstream) -> Result<(), String> {
    if up.wait_open_at_most(0, Duration::from_secs(5)) {
        Ok(())
    } else {
        Err(format!(
            "{} upstream connections still open 5 s after the previous run",
            up.counters().open.load(Relaxed)
        ))
    }
}

fn cpu_delta(e: &Engine, before: Option<Duration>) -> Option<f64> {
    Some(e.cpu()?.saturating_sub(before?).as_secs_f64())
}

fn moved(e: &Engine) -> (u64, u64) {
    e.stats()
        .map_or((0, 0), |s| (s.bytes_spliced, s.bytes_copied))
}

fn push_spliced_pct(f: &mut Figures, e: &Engine, before: (u64, u64)) {
    if e.mode() == Some(crate::Mode::Splice) {
        let after = moved(e);
        let spliced = after.0.saturating_sub(before.0) as f64;
        let copied = after.1.saturating_sub(before.1) as f64;
        if spliced + copied > 0.0 {
            f.push((Metric::SplicedPct, 100.0 * spliced / (spliced + copied)));
        }
    }
}

/// One bulk run: streams for the warm-up, then measures for `s.duration`.
pub fn bulk(
    e: &Engine,
    up: &Upstream,
    (conns, way, write): (usize, Way, usize),
    s: &Settings,
) -> Result<Figures, String> {
    settle(up)?;
    let load =
        Bulk::start(e.addr, conns, way, write).map_err(|err| format!("bulk connect: {err}"))?;
    std::thread::sleep(s.warmup);
    let bytes = || up.counters().sunk.load(Relaxed) + load.received.load(Relaxed);
    let (b0, cpu0, m0, t0) = (bytes(), e.cpu(), moved(e), Instant::now());
    std::thread::sleep(s.duration / 2);
    let pipes = e.pipes();
    std::thread::sleep(s.duration / 2);
    let (b1, dt) = (bytes(), t0.elapsed().as_secs_f64());
    let cpu = cpu_delta(e, cpu0);
    let mut f = Figures::new();
    push_spliced_pct(&mut f, e, m0);
    let errors = load.stop();
    if errors > 0 {
        return Err(format!("{errors} bulk connections failed while streaming"));
    }
    let n = b1.saturating_sub(b0) as f64;
    if n == 0.0 {
        let c = up.counters();
        return Err(format!(
            "no byte moved in {dt:.2} s (upstream: {} accepted, {} open)",
            c.accepted.load(Relaxed),
            c.open.load(Relaxed)
        ));
    }
    f.push((Metric::Gbps, n / dt / 1e9));
    if let Some(c) = cpu {
        f.push((Metric::CpuPerGib, c / (n / GIB)));
    }
    if let Some(p) = pipes {
        f.push((Metric::Pipes, p as f64));
    }
    Ok(f)
}

/// One rr run: round trips of `size` bytes on one connection.
pub fn rr(e: &Engine, up: &Upstream, size: usize, s: &Settings) -> Result<Figures, String> {
    settle(up)?;
    let mut pp = PingPong::open(e.addr, size).map_err(|err| format!("rr connect: {err}"))?;
    let err = |x: std::io::Error| format!("rr {size} B round trip: {x}");
    let warm_until = Instant::now() + s.warmup / 2;
    while Instant::now() < warm_until {
        pp.round_trip().map_err(err)?;
    }
    let mut samples: Vec<u64> = Vec::with_capacity(1 << 16);
    let (cpu0, m0, t0) = (e.cpu(), moved(e), Instant::now());
    while t0.elapsed() < s.rr_duration || samples.len() < 100 {
        samples.push(pp.round_trip().map_err(err)?.as_nanos() as u64);
    }
    let dt = t0.elapsed().as_secs_f64();
    let cpu = cpu_delta(e, cpu0);
    let mut f = Figures::new();
    push_spliced_pct(&mut f, e, m0);
    drop(pp);
    samples.sort_unstable();
    for (m, p) in [
        (Metric::P50, 0.5),
        (Metric::P99, 0.99),
        (Metric::P999, 0.999),
    ] {
        f.push((m, percentile(&samples, p) as f64 / 1000.0));
    }
    let n = 2.0 * size as f64 * samples.len() as f64;
    f.push((Metric::Gbps, n / dt / 1e9));
    if let Some(c) = cpu {
        f.push((Metric::CpuPerGib, c / (n / GIB)));
    }
    Ok(f)
}

/// One connect run: threads that connect, exchange 64 bytes and close.
pub fn connect(e: &Engine, up: &Upstream, threads: usize, s: &Settings) -> Result<Figures, String> {
    churn(e.addr, e, up, threads, &[], s).map_err(|err| format!("connect: {err}"))
}

/// One connect run opened with a ClientHello of `hello` bytes: through the
/// engine's routed listener (`routed`), whose last server-name route the
/// hello asks for, or through its plain listener. `None`: the engine has
/// no routed listener.
pub fn connect_hello(
    e: &Engine,
    up: &Upstream,
    (threads, hello, routed): (usize, usize, bool),
    s: &Settings,
) -> Option<Result<Figures, String>> {
    let (addr, name) = match (routed, e.routed_addr) {
        (false, _) => (e.addr, "plain.db.example"),
        (true, Some(addr)) => (addr, ROUTED_NAMES[ROUTED_NAMES.len() - 1]),
        (true, None) => return None,
    };
    let opening = client_hello(Some(name), &BENCH_ALPN, hello);
    Some(churn(addr, e, up, threads, &opening, s).map_err(|err| format!("connect: {err}")))
}

fn churn(
    addr: std::net::SocketAddr,
    e: &Engine,
    up: &Upstream,
    threads: usize,
    opening: &[u8],
    s: &Settings,
) -> Result<Figures, String> {
    settle(up)?;
    let churn = Churn::start(addr, threads, opening).map_err(|err| err.to_string())?;
    std::thread::sleep(s.warmup);
    let (n0, cpu0, t0) = (churn.done.load(Relaxed), e.cpu(), Instant::now());
    std::thread::sleep(s.duration);
    let (n1, dt) = (churn.done.load(Relaxed), t0.elapsed().as_secs_f64());
    let cpu = cpu_delta(e, cpu0);
    churn.stop().map_err(|err| err.to_string())?;
    let n = n1.saturating_sub(n0) as f64;
    if n == 0.0 {
        return Err("no connection completed".into());
    }
    let mut f = vec![(Metric::ConnPerSec, n / dt)];
    if let Some(c) = cpu {
        f.push((Metric::CpuPerConn, c * 1e6 / n));
    }
    Ok(f)
}
