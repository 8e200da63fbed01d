//! `spliced bench`: the self-contained benchmark.
//!
//! It starts an embedded upstream ([`upstream`]) on loopback or behind a veth
//! pair (`netpath`), runs spliced in-process once per engine (`splice`,
//! `copy`), a `direct` baseline with no proxy, and any `--target` proxies, and
//! drives the same load through each
//! ([`load`], [`workloads`], [`idle`]). Runs interleave the engines (case by
//! case, run by run) so slow drift of the machine hits them alike; each figure
//! is the median of the runs. The proxy's CPU is its worker threads' own
//! (schedstat), read apart from the load generator's threads.
//!
//! | module | what lives there |
//! |---|---|
//! | `args` | the CLI and the settings derived from it |
//! | [`upstream`] | sink / source / echo server (one mio loop) |
//! | [`load`] | client connections: bulk, ping-pong, churn |
//! | `engines` | spliced in-process, a `--target`, or `direct` |
//! | `workloads` | the cases and one measured run of each |
//! | `clienthello` | the TLS ClientHello of the routed connect workload (and of the routing tests) |
//! | `idle` | idle relays measured in a child process |
//! | `measure` | /proc readers, medians and percentiles |
//! | `netpath` | `--path`: loopback, or network namespaces joined by veth pairs |
//! | `netcmd` | the `ip`, `tc` and `ethtool` commands a path is built with |
//! | `floor` | a veth path's sanity floor: `direct` over it against loopback |
//! | `noise` | when a ratio or difference is a figure and when it is noise |
//! | `report`, `summary`, `plot`, `sysinfo` | what is printed and drawn |

mod args;
#[doc(hidden)]
pub mod clienthello;
mod engines;
mod floor;
mod idle;
mod inproc;
pub mod load;
mod measure;
mod netcmd;
mod netpath;
mod noise;
mod plot;
mod report;
mod summary;
mod syscalls;
mod sysinfo;
pub mod upstream;
mod workloads;

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::Instant;

pub use args::{BenchArgs, Workload};

use args::{EngineSpec, Settings};
use engines::Engine;
use netpath::{NetPath, PathInfo, PathKind, Side};
use report::{EngineInfo, Results};
use workloads::CaseKind;

/// A one-line progress display on stderr (a line per case when stderr is not a terminal).
struct Progress {
    total: usize,
    done: usize,
    tty: bool,
    quiet: bool,
    started: Instant,
    last_case: String,
}

impl Progress {
    fn step(&mut self, case: &str, engine: &str, run: usize, runs: usize) {
        self.done += 1;
        if self.quiet {
            return;
        }
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = write!(
                err,
                "\r\x1b[2K[{:>3}/{}] {:>4.1}s  {case} · {engine} · run {run}/{runs}",
                self.done,
                self.total,
                self.started.elapsed().as_secs_f64()
            );
            let _ = err.flush();
        } else if case != self.last_case {
            let _ = writeln!(
                err,
                "spliced bench: {:>5.1}s [{}/{}] {case}",
                self.started.elapsed().as_secs_f64(),
                self.done,
                self.total
            );
        }
        self.last_case = case.to_string();
    }

    fn clear(&self) {
        if self.tty && !self.quiet {
            eprint!("\r\x1b[2K");
        }
    }
}

/// Runs the benchmark; returns the process exit code.
pub fn run(args: BenchArgs) -> ExitCode {
    if let Some(spec) = &args.idle_child {
        return idle::child_main(spec, &args);
    }
    match run_bench(&args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("spliced: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_bench(args: &BenchArgs) -> Result<ExitCode, String> {
    let mut settings = Settings::from_args(args);
    let specs = args::engine_specs(args)?;
    let several = specs
        .iter()
        .filter(|s| {
            matches!(
                s,
                EngineSpec::Proxy {
                    mode: crate::Mode::Splice,
                    ..
                }
            )
        })
        .count()
        > 1;
    let mut notes = Vec::new();
    if settings.workloads.contains(&Workload::Idle) {
        let nofile = measure::raise_nofile(idle::fds_needed(settings.idle_relays));
        let fit = idle::relays_that_fit(settings.idle_relays, nofile, settings.workers);
        if fit < settings.idle_relays {
            notes.push(format!(
                "idle: the fd limit ({nofile}) allows {fit} of the {} relays asked; raise `ulimit -n` (hard) to measure them all",
                settings.idle_relays
            ));
            settings.idle_relays = fit;
        }
    }
    let path = open_path(args)?;
    if args.net.hold {
        return Ok(path.hold());
    }
    let up_addr = path.upstream_addr(args.upstream)?;
    let up = path
        .run_in(Side::Upstream, || upstream::Upstream::start(up_addr))?
        .map_err(|e| format!("cannot start the embedded upstream on {up_addr}: {e}"))?;
    // Every load thread is spawned from this one from now on.
    path.enter_client()?;
    let mut engines = Vec::new();
    for spec in &specs {
        let e = Engine::start(spec, spec.label(several), up.addr(), &settings, &path)?;
        engines.push(e);
    }
    for e in &engines {
        engines::check(e)?;
    }
    if let Some(cpu) = settings.pin_proxy {
        let threads = engines.iter().map(|e| e.threads(settings.workers)).sum();
        if threads > 0 {
            engines::pin_workers(cpu, threads)?;
        }
    }
    // The sanity floor, before the long part: a path that cannot carry
    // `direct` at a plausible rate would only measure its own setup.
    let floor = if path.kind().models_nic() {
        eprintln!("spliced bench: checking the path: direct over it against direct over loopback");
        let f = floor::measure(&path, &up, &settings)?;
        f.check(path.kind().as_str())?;
        Some(f)
    } else {
        None
    };
    let cases = workloads::cases(&settings);
    let mut results = Results {
        sys: sysinfo::collect(),
        path: PathInfo {
            check: floor,
            ..path.info()
        },
        settings: settings.clone(),
        engines: specs
            .iter()
            .zip(&engines)
            .map(|(s, e)| EngineInfo::new(s, &e.label, e.addr))
            .collect(),
        cases: cases.clone(),
        runs: BTreeMap::new(),
        notes,
        errors: Vec::new(),
        syscalls: Vec::new(),
    };
    let total: usize = cases
        .iter()
        .map(|c| match c.kind {
            CaseKind::Idle { .. } => settings.idle_runs * engines.len(),
            _ => settings.runs * engines.len(),
        })
        .sum();
    let mut progress = Progress {
        total,
        done: 0,
        tty: std::io::stderr().is_terminal(),
        quiet: false,
        started: Instant::now(),
        last_case: String::new(),
    };
    for (ci, case) in cases.iter().enumerate() {
        let title = format!("{} {}", case.workload.as_str(), case.name);
        let runs = match case.kind {
            CaseKind::Idle { .. } => settings.idle_runs,
            _ => settings.runs,
        };
        let mut failed = vec![false; engines.len()];
        for run in 0..runs {
            for (ei, e) in engines.iter().enumerate() {
                progress.step(&title, &e.label, run + 1, runs);
                if failed[ei] {
                    continue;
                }
                let once = || match case.kind {
                    CaseKind::Bulk { conns, way, write } => {
                        Some(workloads::bulk(e, &up, (conns, way, write), &settings))
                    }
                    CaseKind::Rr { size } => Some(workloads::rr(e, &up, size, &settings)),
                    CaseKind::Connect { threads } => {
                        Some(workloads::connect(e, &up, threads, &settings))
                    }
                    CaseKind::ConnectHello {
                        threads,
                        hello,
                        routes,
                    } => workloads::connect_hello(e, &up, (threads, hello, routes > 0), &settings),
                    CaseKind::Idle { relays } => {
                        idle::run(&e.spec, relays, &settings, up.addr(), &path)
                    }
                };
                // One retry, so a hiccup of a busy machine does not fail the whole
                // bench; it is reported in the notes all the same.
                let r = match once() {
                    Some(Err(first)) => {
                        let again = once();
                        if let Some(Ok(_)) = again {
                            results.notes.push(format!(
                                "{title} · {} run {}: failed once ({first}), the retry passed",
                                e.label,
                                run + 1
                            ));
                        }
                        again
                    }
                    r => r,
                };
                match r {
                    Some(Ok(f)) => results.runs.entry((ci, ei)).or_default().push(f),
                    Some(Err(err)) => {
                        failed[ei] = true;
                        results.errors.push(format!("{title} · {}: {err}", e.label));
                    }
                    None => {}
                }
            }
        }
    }
    progress.clear();
    if args.syscalls {
        for e in &engines {
            let tids = e.tids();
            if tids.is_empty() {
                continue;
            }
            eprintln!("spliced bench: counting the system calls of {}", e.label);
            match syscalls::count(&tids, e.addr) {
                Ok(c) => results.syscalls.push((e.label.clone(), c)),
                Err(err) => results
                    .errors
                    .push(format!("syscalls · {}: {err}", e.label)),
            }
        }
    }
    results.path = PathInfo {
        check: floor,
        ..path.info()
    };
    add_notes(&mut results, &engines);
    for e in engines {
        e.stop();
    }
    drop(up);
    drop(path);
    let summary = summary::compare(&results);
    if let Some(path) = &args.plot {
        if let Err(e) = plot::draw(&results, path) {
            results.errors.push(format!("plot: {e}"));
        }
    }
    let mut out = std::io::stdout().lock();
    let text = if args.json {
        results.to_json(&summary)
    } else {
        results.table(&summary)
    };
    let _ = writeln!(out, "{text}");
    let _ = out.flush();
    if !args.json {
        eprintln!(
            "spliced bench: done in {:.1} s",
            progress.started.elapsed().as_secs_f64()
        );
    }
    Ok(if results.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// The --path of this run: loopback, new namespaces, or a --hold's.
fn open_path(args: &BenchArgs) -> Result<NetPath, String> {
    if args.net.path == PathKind::Loopback {
        if args.net.mtu.is_some() || args.net.netns.is_some() || args.net.hold {
            return Err("--mtu, --netns and --hold need --path veth or veth2".into());
        }
        return Ok(NetPath::loopback());
    }
    match &args.net.netns {
        Some(_) if args.net.hold => {
            Err("--hold makes a path; --netns uses one: give one of them".into())
        }
        Some(_) if args.net.mtu.is_some() => {
            Err("--mtu: the MTU of a --netns path is set by its --hold".into())
        }
        Some(name) => NetPath::attach(args.net.path, name),
        // A path made now has no --target inside it, and the load cannot reach
        // one outside.
        None if !args.target.is_empty() => Err(format!(
            "--target with --path {0}: start `spliced bench --path {0} --hold`, run the target in its NAME-px namespace, and give --netns NAME",
            args.net.path.as_str()
        )),
        None => NetPath::create(args.net.path, args.net.mtu.unwrap_or(netpath::DEFAULT_MTU)),
    }
}

/// Notes on what the figures cannot show by themselves.
fn add_notes(r: &mut Results, engines: &[Engine]) {
    for (ei, e) in engines.iter().enumerate() {
        if e.mode() == Some(crate::Mode::Splice) {
            let pct: Vec<f64> = (0..r.cases.len())
                .filter_map(|ci| r.median(ci, ei, workloads::Metric::SplicedPct))
                .collect();
            if let Some(min) = pct.iter().copied().reduce(f64::min) {
                if min < 99.0 {
                    r.notes.push(format!(
                        "{}: only {min:.1}% of the bytes of some case moved by splice; the rest fell back to copy",
                        e.label
                    ));
                }
            }
            if let Some(s) = e.stats() {
                if s.splice_fallbacks > 0 {
                    r.notes.push(format!(
                        "{}: {} directions fell back from splice to copy (no pipe, or splice refused)",
                        e.label, s.splice_fallbacks
                    ));
                }
            }
        }
        if e.is_target() && e.cpu().is_none() {
            r.notes.push(format!(
                "{}: no --target-pid, so its CPU, memory and pipes are not measured",
                e.label
            ));
        }
    }
    if let (Some(n), Some(b)) = (r.path.upstream_frames, r.path.upstream_frame_bytes) {
        let merged = match r.path.upstream_ip_packets {
            Some(p) if p > 0 && r.path.path.models_nic() => format!(
                "; GRO handed its stack {p} IP packets, {:.1} frames each",
                n as f64 / p as f64
            ),
            _ => String::new(),
        };
        r.notes.push(format!(
            "{}: the upstream namespace received {n} frames of {b:.0} B on average (MTU {}; ACKs included){merged}",
            r.path.path.as_str(),
            r.path.mtu
        ));
    }
    if r.path.path == PathKind::VethNooffload {
        r.notes.push(
            "veth-nooffload: no GSO and no GRO, so every segment crosses both stacks as its own skb; no NIC works like that, so these figures are a worst case, not a deployment's"
                .into(),
        );
    }
    if r.sys.root {
        r.notes.push(
            "running as root: pipe-user-pages-soft does not limit pipe sizes; benchmark as a user too (docs/BENCHMARKS.md)"
                .into(),
        );
    }
}
