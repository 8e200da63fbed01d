//! The headline comparisons of a run, from its medians: what splice costs
//! against copy and against the fastest or most frugal `--target`, the
//! latency a proxy adds, and what an idle relay holds. They state what was
//! measured; they judge nothing.

use super::load::Way;
use super::noise::{self, Compared};
use super::report::{Comparison, Results};
use super::workloads::{CaseKind, Metric};

/// `a / b` of one metric's medians in one case, with its spread.
fn ratio_of(r: &Results, ci: usize, (a, b): (usize, usize), m: Metric) -> Option<(f64, f64)> {
    let (x, y) = (r.summary(ci, a, m)?, r.summary(ci, b, m)?);
    (y.median != 0.0).then(|| noise::ratio(&x, &y))
}

/// The p50 latency engine `e` adds over `direct` in one case, with its spread.
fn added_of(r: &Results, ci: usize, e: usize, direct: usize) -> Option<(f64, f64)> {
    Some(noise::difference(
        &r.summary(ci, e, Metric::P50)?,
        &r.summary(ci, direct, Metric::P50)?,
    ))
}

/// `0.44×`, or "within noise" and no ratio.
fn ratio_text((q, spread): (f64, f64)) -> (String, Option<f64>) {
    let noisy = noise::is_noise(Compared::Ratio, q, spread);
    (
        noise::text(Compared::Ratio, q, spread),
        (!noisy).then_some(q),
    )
}

/// `+22.3 µs`, or "within noise".
fn added_text((d, spread): (f64, f64)) -> String {
    match noise::text(Compared::Added, d, spread) {
        t if noise::is_noise(Compared::Added, d, spread) => t,
        t => format!("{t} µs"),
    }
}

fn line(case: &str, text: String, ratio: Option<f64>) -> Comparison {
    Comparison {
        case: case.to_string(),
        text,
        ratio,
    }
}

pub fn compare(r: &Results) -> Vec<Comparison> {
    let mut out = Vec::new();
    compare_embedding(r, &mut out);
    compare_routing(r, &mut out);
    let Some(sp) = r.main_splice() else {
        return out;
    };
    let spl = r.engines[sp].label.clone();
    let copy = r
        .engine_index(|e| e.mode == Some(crate::Mode::Copy))
        .first()
        .copied();
    let direct = r.engine_index(|e| e.kind == "direct").first().copied();
    let targets = r.engine_index(|e| e.kind == "target");
    let several = targets.len() > 1;
    // "haproxy", or "haproxy (the most frugal target)" when there are several.
    let target_name = |t: usize, best: &str| {
        let label = &r.engines[t].label;
        if several {
            format!("{label} (the {best} target)")
        } else {
            label.clone()
        }
    };
    for (ci, case) in r.cases.iter().enumerate() {
        let name = format!("{} {}", case.workload.as_str(), case.name);
        match case.kind {
            CaseKind::Bulk {
                conns,
                way: Way::Up | Way::Down,
                ..
            } => {
                let cpu = r.median(ci, sp, Metric::CpuPerGib);
                if let (Some(s), Some(c)) =
                    (cpu, copy.and_then(|c| r.median(ci, c, Metric::CpuPerGib)))
                {
                    if let Some(q) = copy.and_then(|c| ratio_of(r, ci, (sp, c), Metric::CpuPerGib))
                    {
                        let (t, ratio) = ratio_text(q);
                        out.push(line(
                            &name,
                            format!("{spl} CPU per GiB vs copy: {t} ({s:.3} vs {c:.3} s/GiB)"),
                            ratio,
                        ));
                    }
                }
                let frugal = targets
                    .iter()
                    .filter_map(|&t| Some((r.median(ci, t, Metric::CpuPerGib)?, t)))
                    .min_by(|a, b| a.0.total_cmp(&b.0));
                if let (Some(s), Some((h, t))) = (cpu, frugal) {
                    if let Some(q) = ratio_of(r, ci, (sp, t), Metric::CpuPerGib) {
                        let (text, ratio) = ratio_text(q);
                        out.push(line(
                            &name,
                            format!(
                                "{spl} CPU per GiB vs {}: {text} ({s:.3} vs {h:.3} s/GiB)",
                                target_name(t, "most frugal"),
                            ),
                            ratio,
                        ));
                    }
                }
                let fastest = targets
                    .iter()
                    .filter_map(|&t| Some((r.median(ci, t, Metric::Gbps)?, t)))
                    .max_by(|a, b| a.0.total_cmp(&b.0));
                if let (1, Some(s), Some((h, t))) = (conns, r.median(ci, sp, Metric::Gbps), fastest)
                {
                    if let Some(q) = ratio_of(r, ci, (sp, t), Metric::Gbps) {
                        let (text, ratio) = ratio_text(q);
                        out.push(line(
                            &name,
                            format!(
                                "{spl} throughput vs {}: {text} ({s:.2} vs {h:.2} GB/s)",
                                target_name(t, "fastest"),
                            ),
                            ratio,
                        ));
                    }
                }
            }
            CaseKind::Rr { size: 64 } => {
                let Some(d) = direct else { continue };
                let Some(s) = added_of(r, ci, sp, d) else {
                    continue;
                };
                let lowest = targets
                    .iter()
                    .filter_map(|&t| Some((added_of(r, ci, t, d)?, t)))
                    .min_by(|a, b| a.0 .0.total_cmp(&b.0 .0));
                let text = match lowest {
                    Some((h, t)) => format!(
                        "p50 latency added over direct: {spl} {}, {} {}",
                        added_text(s),
                        target_name(t, "quickest"),
                        added_text(h)
                    ),
                    None => format!("p50 latency {spl} adds over direct: {}", added_text(s)),
                };
                out.push(line(&name, text, None));
            }
            CaseKind::Idle { .. } => {
                let (Some(b), Some(p)) = (
                    r.median(ci, sp, Metric::BytesPerRelay),
                    r.median(ci, sp, Metric::Pipes),
                ) else {
                    continue;
                };
                let fds = r
                    .median(ci, sp, Metric::FdsPerRelay)
                    .map_or(String::new(), |f| format!(" and {f:.1} fds"));
                let pipes = if p == 1.0 { "pipe" } else { "pipes" };
                out.push(line(
                    &name,
                    format!("{spl}: {b:.0} B of memory{fds} per relay; {p:.0} {pipes} held"),
                    None,
                ));
            }
            _ => {}
        }
    }
    out
}

/// What a route decision adds per connection, for each engine with a
/// routed listener whose CPU is read: the CPU per connection through the
/// routed listener against the plain one, the same ClientHello and
/// exchange on both.
fn compare_routing(r: &Results, out: &mut Vec<Comparison>) {
    let hello_case = |routed: bool| {
        r.cases.iter().position(
            |c| matches!(c.kind, CaseKind::ConnectHello { routes, .. } if (routes > 0) == routed),
        )
    };
    let (Some(plain), Some(routed)) = (hello_case(false), hello_case(true)) else {
        return;
    };
    let CaseKind::ConnectHello { routes, .. } = r.cases[routed].kind else {
        return;
    };
    let name = format!(
        "{} {}",
        r.cases[routed].workload.as_str(),
        r.cases[routed].name
    );
    for e in 0..r.engines.len() {
        let (Some(a), Some(b)) = (
            r.summary(routed, e, Metric::CpuPerConn),
            r.summary(plain, e, Metric::CpuPerConn),
        ) else {
            continue;
        };
        let added = added_text(noise::difference(&a, &b));
        out.push(line(
            &name,
            format!(
                "{} CPU per connection added by routing ({routes} server-name routes): {added} ({:.1} vs {:.1} µs/conn without routes)",
                r.engines[e].label, a.median, b.median
            ),
            None,
        ));
    }
}

/// Handing pairs to a spliced runtime against the in-process tokio
/// `copy_bidirectional` baseline: CPU per GiB of bulk, and the latency
/// each adds over direct at 64 B.
fn compare_embedding(r: &Results, out: &mut Vec<Comparison>) {
    let (Some(&h), Some(&t)) = (
        r.engine_index(|e| e.kind == "handoff").first(),
        r.engine_index(|e| e.kind == "tokio").first(),
    ) else {
        return;
    };
    let direct = r.engine_index(|e| e.kind == "direct").first().copied();
    for (ci, case) in r.cases.iter().enumerate() {
        let name = format!("{} {}", case.workload.as_str(), case.name);
        match case.kind {
            CaseKind::Bulk { .. } => {
                let (Some(a), Some(b), Some(q)) = (
                    r.median(ci, h, Metric::CpuPerGib),
                    r.median(ci, t, Metric::CpuPerGib),
                    ratio_of(r, ci, (h, t), Metric::CpuPerGib),
                ) else {
                    continue;
                };
                let (text, ratio) = ratio_text(q);
                out.push(line(
                    &name,
                    format!(
                        "handoff CPU per GiB vs tokio copy_bidirectional: {text} ({a:.3} vs {b:.3} s/GiB)"
                    ),
                    ratio,
                ));
            }
            CaseKind::Rr { size: 64 } => {
                let Some(d) = direct else { continue };
                if let (Some(a), Some(b)) = (added_of(r, ci, h, d), added_of(r, ci, t, d)) {
                    out.push(line(
                        &name,
                        format!(
                            "p50 latency added over direct: handoff {}, tokio copy_bidirectional {}",
                            added_text(a),
                            added_text(b)
                        ),
                        None,
                    ));
                }
            }
            _ => {}
        }
    }
}
