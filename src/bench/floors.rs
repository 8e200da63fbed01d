//! The performance floors of issue 3, checked against the medians of this run.
//! They are reported, never enforced: a missed floor is a finding, not a failure.

use super::report::Results;
use super::workloads::{CaseKind, Metric};

#[derive(Clone, Debug, serde::Serialize)]
pub struct Floor {
    pub name: String,
    /// None: this run cannot tell (a workload or engine was not run).
    pub met: Option<bool>,
    pub detail: String,
}

fn floor(name: impl Into<String>, met: Option<bool>, detail: impl Into<String>) -> Floor {
    Floor {
        name: name.into(),
        met,
        detail: detail.into(),
    }
}

/// The peers the "best of" floors compare with: targets named haproxy*, else every target.
fn peers(r: &Results) -> (Vec<usize>, &'static str) {
    let hap =
        r.engine_index(|e| e.kind == "target" && e.label.to_ascii_lowercase().contains("haproxy"));
    if hap.is_empty() {
        (r.engine_index(|e| e.kind == "target"), "targets")
    } else {
        (hap, "HAProxy")
    }
}

pub fn check(r: &Results) -> Vec<Floor> {
    let mut out = Vec::new();
    let Some(sp) = r.main_splice() else {
        return out;
    };
    let spl = r.engines[sp].label.clone();
    let copy = r
        .engine_index(|e| e.mode == Some(crate::Mode::Copy))
        .first()
        .copied();
    let direct = r.engine_index(|e| e.kind == "direct").first().copied();
    let (peers, peer_name) = peers(r);
    for (ci, case) in r.cases.iter().enumerate() {
        match case.kind {
            CaseKind::Bulk {
                conns,
                duplex: false,
            } => {
                let what = format!("bulk {conns} conn");
                let cpu = r.median(ci, sp, Metric::CpuPerGib);
                if let (Some(s), Some(c)) =
                    (cpu, copy.and_then(|c| r.median(ci, c, Metric::CpuPerGib)))
                {
                    out.push(floor(
                        format!("{what}: {spl} CPU/GiB ≤ 0.6 × copy's"),
                        Some(s <= 0.6 * c),
                        format!(
                            "{s:.3} vs 0.6 × {c:.3} = {:.3} s/GiB (ratio {:.2})",
                            0.6 * c,
                            s / c
                        ),
                    ));
                }
                let best_cpu = peers
                    .iter()
                    .filter_map(|&p| Some((r.median(ci, p, Metric::CpuPerGib)?, p)))
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                if let (Some(s), Some((h, p))) = (cpu, best_cpu) {
                    out.push(floor(
                        format!("{what}: {spl} CPU/GiB ≤ 0.6 × {peer_name}'s best"),
                        Some(s <= 0.6 * h),
                        format!(
                            "{s:.3} vs 0.6 × {h:.3} ({}) = {:.3} s/GiB (ratio {:.2})",
                            r.engines[p].label,
                            0.6 * h,
                            s / h
                        ),
                    ));
                }
                let best_tput = peers
                    .iter()
                    .filter_map(|&p| Some((r.median(ci, p, Metric::Gbps)?, p)))
                    .max_by(|a, b| a.0.total_cmp(&b.0));
                if let (Some(s), Some((h, p))) = (r.median(ci, sp, Metric::Gbps), best_tput) {
                    if conns == 1 {
                        out.push(floor(
                            format!("{what}: {spl} throughput ≥ {peer_name}'s best"),
                            Some(s >= h),
                            format!("{s:.2} vs {h:.2} GB/s ({})", r.engines[p].label),
                        ));
                    }
                }
            }
            CaseKind::Rr { size: 64 } => {
                let Some(d) = direct else { continue };
                let added =
                    |e: usize| Some(r.median(ci, e, Metric::P50)? - r.median(ci, d, Metric::P50)?);
                let best = peers
                    .iter()
                    .filter_map(|&p| Some((added(p)?, p)))
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                match (added(sp), best) {
                    (Some(s), Some((h, p))) => out.push(floor(
                        format!("rr 64 B: p50 latency {spl} adds over direct ≤ {peer_name}'s"),
                        Some(s <= h),
                        format!("+{s:.1} µs vs +{h:.1} µs ({})", r.engines[p].label),
                    )),
                    (Some(s), None) => out.push(floor(
                        format!("rr 64 B: p50 latency {spl} adds over direct ≤ {peer_name}'s"),
                        None,
                        format!("+{s:.1} µs; no peer measured (run scripts/bench-peers.sh)"),
                    )),
                    _ => {}
                }
            }
            CaseKind::Idle { .. } => {
                let (Some(n), Some(b), Some(p)) = (
                    r.median(ci, sp, Metric::Relays),
                    r.median(ci, sp, Metric::BytesPerRelay),
                    r.median(ci, sp, Metric::Pipes),
                ) else {
                    continue;
                };
                // Under a 20 000-fd limit (as here, even for root in a container)
                // a proxy cannot hold 10 000 relays; the per-relay figures of a
                // few hundred fewer are judged all the same, and the count is shown.
                let enough = n >= 9_000.0;
                out.push(floor(
                    format!("idle: 10 000 {spl} relays < 2 KiB each and 0 pipes"),
                    if enough {
                        Some(b < 2048.0 && p == 0.0)
                    } else {
                        None
                    },
                    format!(
                        "{n:.0} relays: {b:.0} B/relay, {p:.0} pipes in use{}",
                        if enough {
                            ""
                        } else {
                            " (fewer than 9 000: not judged)"
                        }
                    ),
                ));
            }
            _ => {}
        }
    }
    out
}
