//! The results: medians over runs, ratios between engines, the terminal table
//! and the JSON document.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::args::{EngineSpec, Settings};
use super::measure::Summary;
use super::netpath::PathInfo;
use super::noise::{self, Compared};
use super::sysinfo::SysInfo;
use super::workloads::{Case, Figures, Metric};

#[derive(Clone, Debug, serde::Serialize)]
pub struct EngineInfo {
    pub label: String,
    /// spliced, direct or target.
    pub kind: &'static str,
    pub mode: Option<crate::Mode>,
    pub pipe_size: Option<usize>,
    pub addr: String,
    pub pid: Option<u32>,
}

impl EngineInfo {
    pub fn new(spec: &EngineSpec, label: &str, addr: std::net::SocketAddr) -> EngineInfo {
        let (kind, mode, pipe_size, pid) = match spec {
            EngineSpec::Direct => ("direct", None, None, None),
            EngineSpec::Proxy {
                mode, pipe_size, ..
            } => (
                "spliced",
                Some(*mode),
                (*mode == crate::Mode::Splice).then_some(*pipe_size),
                None,
            ),
            EngineSpec::Target { pid, .. } => ("target", None, None, *pid),
            EngineSpec::Handoff => ("handoff", None, None, None),
            EngineSpec::Tokio => ("tokio", None, None, None),
        };
        EngineInfo {
            label: label.to_string(),
            kind,
            mode,
            pipe_size,
            addr: addr.to_string(),
            pid,
        }
    }
}

/// One line of the summary (`bench::summary::compare` makes them from
/// the results): a comparison between engines in one case.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Comparison {
    /// The case, e.g. `bulk 1 conn, one way`.
    pub case: String,
    /// What was compared and the figures, e.g. `splice CPU per GiB vs copy: 0.44×
    /// (0.149 vs 0.341 s/GiB)`.
    pub text: String,
    /// The ratio of the medians, where the comparison is one.
    pub ratio: Option<f64>,
}

/// Everything measured, before and after aggregation.
pub struct Results {
    pub sys: SysInfo,
    pub path: PathInfo,
    pub settings: Settings,
    pub engines: Vec<EngineInfo>,
    pub cases: Vec<Case>,
    /// (case, engine) → the figures of each run.
    pub runs: BTreeMap<(usize, usize), Vec<Figures>>,
    pub notes: Vec<String>,
    pub errors: Vec<String>,
    /// `--syscalls`: (engine label, counts).
    pub syscalls: Vec<(String, super::syscalls::SyscallCounts)>,
}

/// A ratio row: numerator engine over denominator engine.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Ratio {
    pub case: String,
    pub metric: Metric,
    pub numerator: String,
    pub denominator: String,
    /// numerator / denominator of the medians.
    pub ratio: f64,
    /// numerator − denominator of the medians (what a proxy adds, for latencies).
    pub difference: f64,
    /// The spreads of the ratio and of the difference (those of both medians,
    /// added; docs/BENCHMARKS.md).
    pub ratio_spread: f64,
    pub difference_spread: f64,
    /// The ratio is as large as its spread or smaller: printed "within noise".
    pub ratio_within_noise: bool,
    /// The difference is not larger than its spread (a negative one never
    /// is): printed "within noise" where it is an added latency.
    pub difference_within_noise: bool,
}

#[derive(serde::Serialize)]
struct JsonRow<'a> {
    workload: &'a str,
    case: &'a str,
    engine: &'a str,
    metric: Metric,
    unit: &'static str,
    median: f64,
    min: f64,
    max: f64,
    spread_pct: f64,
    runs: &'a [f64],
}

impl Results {
    pub fn summary(&self, case: usize, engine: usize, m: Metric) -> Option<Summary> {
        let runs = self.runs.get(&(case, engine))?;
        let values: Vec<f64> = runs
            .iter()
            .filter_map(|f| f.iter().find(|(k, _)| *k == m).map(|(_, v)| *v))
            .collect();
        Summary::of(&values)
    }

    pub fn median(&self, case: usize, engine: usize, m: Metric) -> Option<f64> {
        self.summary(case, engine, m).map(|s| s.median)
    }

    pub fn engine_index(&self, pred: impl Fn(&EngineInfo) -> bool) -> Vec<usize> {
        (0..self.engines.len())
            .filter(|&i| pred(&self.engines[i]))
            .collect()
    }

    /// The splice engine the summary and ratios speak of: the default pipe size if
    /// it was run, else the first splice engine.
    pub fn main_splice(&self) -> Option<usize> {
        let splices = self.engine_index(|e| e.mode == Some(crate::Mode::Splice));
        splices
            .iter()
            .copied()
            .find(|&i| self.engines[i].pipe_size == Some(crate::config::DEFAULT_PIPE_SIZE))
            .or(splices.first().copied())
    }

    /// (numerator, denominator) pairs of the ratio rows: each splice engine over
    /// copy, the main splice engine over each target, and spliced over direct
    /// (every proxy over direct where latency is measured, to show what each adds).
    fn ratio_pairs(&self, latency: bool) -> Vec<(usize, usize)> {
        let mut out = Vec::new();
        let splices = self.engine_index(|e| e.mode == Some(crate::Mode::Splice));
        let copy = self.engine_index(|e| e.mode == Some(crate::Mode::Copy));
        let direct = self.engine_index(|e| e.kind == "direct");
        let targets = self.engine_index(|e| e.kind == "target");
        if let Some(&c) = copy.first() {
            out.extend(splices.iter().map(|&s| (s, c)));
        }
        if let Some(s) = self.main_splice() {
            out.extend(targets.iter().map(|&t| (s, t)));
        }
        if let Some(&d) = direct.first() {
            out.extend(
                (0..self.engines.len())
                    .filter(|&e| e != d && (latency || self.engines[e].kind != "target"))
                    .map(|e| (e, d)),
            );
        }
        out
    }

    pub fn ratios(&self) -> Vec<Ratio> {
        let mut out = Vec::new();
        for (ci, case) in self.cases.iter().enumerate() {
            let latency = case.metrics().iter().any(|m| m.is_latency());
            for (a, b) in self.ratio_pairs(latency) {
                for &m in case.metrics() {
                    if m.no_ratio() {
                        continue;
                    }
                    if let (Some(x), Some(y)) = (self.summary(ci, a, m), self.summary(ci, b, m)) {
                        let (ratio, ratio_spread) = if y.median != 0.0 {
                            noise::ratio(&x, &y)
                        } else {
                            (f64::NAN, f64::NAN)
                        };
                        let (difference, difference_spread) = noise::difference(&x, &y);
                        out.push(Ratio {
                            case: format!("{} {}", case.workload.as_str(), case.name),
                            metric: m,
                            numerator: self.engines[a].label.clone(),
                            denominator: self.engines[b].label.clone(),
                            ratio,
                            difference,
                            ratio_spread,
                            difference_spread,
                            ratio_within_noise: noise::is_noise(
                                Compared::Ratio,
                                ratio,
                                ratio_spread,
                            ),
                            difference_within_noise: noise::is_noise(
                                Compared::Added,
                                difference,
                                difference_spread,
                            ),
                        });
                    }
                }
            }
        }
        out
    }

    pub fn to_json(&self, summary: &[Comparison]) -> String {
        let mut rows = Vec::new();
        let mut sums = Vec::new();
        for ci in 0..self.cases.len() {
            for ei in 0..self.engines.len() {
                let mut metrics: Vec<Metric> = self
                    .runs
                    .get(&(ci, ei))
                    .into_iter()
                    .flatten()
                    .flat_map(|f| f.iter().map(|(m, _)| *m))
                    .collect();
                metrics.sort();
                metrics.dedup();
                for m in metrics {
                    if let Some(s) = self.summary(ci, ei, m) {
                        sums.push((ci, ei, m, s));
                    }
                }
            }
        }
        for (ci, ei, m, s) in &sums {
            let case = &self.cases[*ci];
            rows.push(JsonRow {
                workload: case.workload.as_str(),
                case: &case.name,
                engine: &self.engines[*ei].label,
                metric: *m,
                unit: m.unit(),
                median: s.median,
                min: s.min,
                max: s.max,
                spread_pct: s.spread_pct(),
                runs: &s.runs,
            });
        }
        let doc = serde_json::json!({
            "system": self.sys,
            "path": self.path,
            "settings": self.settings,
            "engines": self.engines,
            "cases": self.cases,
            "results": rows,
            "smoke_test": self.settings.quick,
            "ratios": self.ratios().iter().filter(|r| r.ratio.is_finite()).collect::<Vec<_>>(),
            "summary": summary,
            "syscalls": self.syscalls,
            "notes": self.notes,
            "errors": self.errors,
        });
        serde_json::to_string_pretty(&doc).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }

    pub fn table(&self, summary: &[Comparison]) -> String {
        let mut out = String::new();
        if self.settings.quick {
            let _ = writeln!(out, "spliced bench --quick: SMOKE TEST, not results");
            let _ = writeln!(
                out,
                "  (few runs of {} ms show that every part works; the figures are noise-bound. \
                 Measure without --quick for figures to compare.)",
                self.settings.duration.as_millis()
            );
        } else {
            let _ = writeln!(out, "spliced bench");
        }
        for l in self.sys.lines() {
            let _ = writeln!(out, "  {l}");
        }
        let s = &self.settings;
        let engines: Vec<String> = self
            .engines
            .iter()
            .map(|e| match (e.pipe_size, e.pid) {
                (Some(p), _) => format!("{} (pipe {})", e.label, super::args::size_human(p)),
                (_, Some(pid)) => format!("{} ({} pid {pid})", e.label, e.addr),
                _ if e.kind == "target" => format!("{} ({}, CPU unknown)", e.label, e.addr),
                _ => e.label.clone(),
            })
            .collect();
        let _ = writeln!(out, "  path      {}", self.path.line());
        if let Some(f) = &self.path.check {
            let _ = writeln!(out, "  check     {}", f.line(self.path.path.as_str()));
        }
        let _ = writeln!(out, "  engines   {}", engines.join(", "));
        let pin = s
            .pin_proxy
            .map_or(String::new(), |c| format!(", workers pinned to CPU {c}"));
        let _ = writeln!(
            out,
            "  runs      median of {} (idle {}) of {} ms, rr {} ms (±: largest distance of a run \
             from the median); spliced: {} worker{}{pin}",
            plural(s.runs, "run"),
            s.idle_runs,
            s.duration.as_millis(),
            s.rr_duration.as_millis(),
            s.workers,
            if s.workers == 1 { "" } else { "s" }
        );
        let labels = self
            .engines
            .iter()
            .map(|e| e.label.len())
            .max()
            .unwrap_or(6);
        let titles = self
            .cases
            .iter()
            .map(|c| c.workload.as_str().len() + c.name.chars().count() + 5)
            .max()
            .unwrap_or(0);
        let name_w = (labels * 2 + 13).max(titles).max(24);
        let col_w = 15;
        let ratios = self.ratios();
        for (ci, case) in self.cases.iter().enumerate() {
            let metrics = case.metrics();
            out.push('\n');
            let title = format!("{} — {}", case.workload.as_str(), case.name);
            let _ = write!(out, "{title:<name_w$}");
            for m in metrics {
                let _ = write!(out, "{:>col_w$}", m.header());
            }
            out.push('\n');
            if !(0..self.engines.len()).any(|ei| self.runs.contains_key(&(ci, ei))) {
                let _ = writeln!(
                    out,
                    "  (no engine measured: see the errors, or no proxy to measure)"
                );
            }
            for (ei, e) in self.engines.iter().enumerate() {
                if !self.runs.contains_key(&(ci, ei)) {
                    continue;
                }
                let _ = write!(out, "  {:<w$}", e.label, w = name_w - 2);
                for &m in metrics {
                    let cell = self.summary(ci, ei, m).map_or("—".to_string(), |sm| {
                        let v = format!("{:.*}", m.decimals(sm.median), sm.median);
                        if sm.runs.len() > 1 && !m.no_ratio() {
                            format!("{v} ±{:.0}%", sm.spread_pct())
                        } else {
                            v
                        }
                    });
                    let _ = write!(out, "{cell:>col_w$}");
                }
                out.push('\n');
            }
            let key = format!("{} {}", case.workload.as_str(), case.name);
            let mut pairs: Vec<(String, String)> = Vec::new();
            for r in ratios.iter().filter(|r| r.case == key) {
                let p = (r.numerator.clone(), r.denominator.clone());
                if !pairs.contains(&p) {
                    pairs.push(p);
                }
            }
            for (a, b) in pairs {
                let vs_direct = b == "direct";
                let label = if vs_direct {
                    format!("{a} vs direct")
                } else {
                    format!("{a}/{b}")
                };
                let _ = write!(out, "  {label:<w$}", w = name_w - 2);
                for &m in metrics {
                    let r = ratios.iter().find(|r| {
                        r.case == key && r.metric == m && r.numerator == a && r.denominator == b
                    });
                    let cell = match r {
                        None => String::new(),
                        Some(r) if vs_direct && m.is_latency() => {
                            noise::text(Compared::Added, r.difference, r.difference_spread)
                        }
                        Some(r) => noise::text(Compared::Ratio, r.ratio, r.ratio_spread),
                    };
                    let _ = write!(out, "{cell:>col_w$}");
                }
                out.push('\n');
            }
        }
        if !summary.is_empty() {
            out.push_str("\nsummary (medians)\n");
            for c in summary {
                let _ = writeln!(out, "  {}: {}", c.case, c.text);
            }
        }
        if !self.syscalls.is_empty() {
            out.push_str(
                "\nsyscalls (strace -c on the proxy's threads; a message is one 64 B request or reply, \
                 a connection opens, exchanges 64 B and closes)\n",
            );
            for (label, c) in &self.syscalls {
                let top = |calls: &[(String, f64)]| {
                    calls
                        .iter()
                        .take(6)
                        .map(|(n, k)| format!("{n} {k:.2}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                let _ = writeln!(
                    out,
                    "  {label:<12} {:>5.2} per message ({})",
                    c.per_message,
                    top(&c.message_calls)
                );
                let _ = writeln!(
                    out,
                    "  {:<12} {:>5.1} per connection ({})",
                    "",
                    c.per_connection,
                    top(&c.connection_calls)
                );
            }
        }
        if !self.notes.is_empty() {
            out.push_str("\nnotes\n");
            for n in &self.notes {
                let _ = writeln!(out, "  - {n}");
            }
        }
        if !self.errors.is_empty() {
            out.push_str("\nerrors\n");
            for e in &self.errors {
                let _ = writeln!(out, "  - {e}");
            }
        }
        out.push_str(
            "\nGB/s: payload bytes delivered per second (both directions summed for 'both ways' and rr). \
             CPU s/GiB: the proxy's own CPU seconds per GiB it moved. \
             'a/b' rows: ratios of the medians. 'vs direct' rows: ratios too, and for latencies \
             the µs the proxy adds. 'within noise': the ratio or difference is no larger than \
             its spread (the spreads of both medians added); a negative added latency always is.\n",
        );
        out
    }
}

/// `1 run`, `5 runs`.
fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("{n} {what}")
    } else {
        format!("{n} {what}s")
    }
}
