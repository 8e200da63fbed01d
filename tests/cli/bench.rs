//! `spliced bench --quick` as a user runs it: what its output says, the
//! routed connect case's rows, and the idle case under a low fd limit.

use std::process::Command;
use std::time::Duration;

use crate::common::*;

#[test]
fn bench_output_reports_measurements_only() {
    let (status, stdout, stderr) = run_bin(
        &[
            "bench",
            "--quick",
            "--workloads",
            "bulk,idle",
            "--idle-relays",
            "200",
        ],
        Duration::from_secs(120),
    );
    let status = status.expect("spliced bench --quick did not finish in 120 s");
    assert!(status.success(), "exit {status}:\n{stdout}\n{stderr}");
    assert!(
        stdout.contains("CPU per GiB vs copy: ") && stdout.contains("×"),
        "no splice vs copy ratio in the summary:\n{stdout}"
    );
    let lower = stdout.to_lowercase();
    for word in ["issue", "floor", "missed", "targets's", "worker(s)"] {
        assert!(
            !lower.contains(word),
            "the bench output says '{word}':\n{stdout}"
        );
    }
}

/// `connect-routed` prints a measured row per engine for the ClientHello
/// through the plain listener and through the routed one (in-process
/// spliced engines only: `direct` has no router), and what routing adds.
#[test]
fn bench_connect_routed_prints_both_listeners_rows() {
    let (status, stdout, stderr) = run_bin(
        &["bench", "--quick", "--workloads", "connect-routed"],
        Duration::from_secs(120),
    );
    let status = status.expect("spliced bench --quick did not finish in 120 s");
    assert!(status.success(), "exit {status}:\n{stdout}\n{stderr}");
    assert!(!stdout.contains("\nerrors\n"), "errors:\n{stdout}");
    // The rows of the case whose title starts with `title`: engine → cells.
    let rows = |title: &str| -> Vec<(String, Vec<String>)> {
        let block = stdout
            .split("\n\n")
            .find(|b| b.starts_with(title))
            .unwrap_or_else(|| panic!("no case '{title}':\n{stdout}"));
        let mut lines = block.lines();
        let header = lines.next().unwrap();
        assert!(
            header.contains("conn/s") && header.contains("CPU µs/conn"),
            "{header}"
        );
        lines
            .map(|l| {
                let mut words = l.split_whitespace().map(String::from);
                (words.next().unwrap(), words.collect())
            })
            .collect()
    };
    let measured = |cells: &[String]| {
        // `8405 ±13%   71.0 ±4%`: two medians, each with its spread.
        cells.len() == 4
            && cells[0].parse::<f64>().is_ok_and(|v| v > 0.0)
            && cells[2].parse::<f64>().is_ok_and(|v| v > 0.0)
            && cells[1].starts_with('±')
            && cells[3].starts_with('±')
    };
    let plain = rows("connect-routed — 2 threads, 517 B hello + 64 B, no routes");
    let routed =
        rows("connect-routed — 2 threads, 517 B hello + 64 B, 3 server-name routes + default");
    for (case, engines) in [
        (&plain, &["splice", "copy"][..]),
        (&routed, &["splice", "copy"][..]),
    ] {
        for engine in engines {
            let row = case.iter().find(|(e, _)| e == engine);
            assert!(
                row.is_some_and(|(_, cells)| measured(cells)),
                "no measured {engine} row: {row:?}\n{stdout}"
            );
        }
    }
    assert!(
        plain
            .iter()
            .any(|(e, cells)| e == "direct" && cells.len() == 3),
        "no direct row without routes:\n{stdout}"
    );
    assert!(
        !routed.iter().any(|(e, _)| e == "direct"),
        "direct has no router, yet a routed row:\n{stdout}"
    );
    for engine in ["splice", "copy"] {
        assert!(
            stdout.contains(&format!(
                "{engine} CPU per connection added by routing (3 server-name routes): "
            )),
            "no routing summary for {engine}:\n{stdout}"
        );
    }
}

/// Under a low fd limit the idle workload opens only the relays the proxy
/// child can take: none waits in its listen backlog, so none fails.
#[test]
fn bench_idle_opens_only_what_the_proxy_fd_limit_allows() {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"ulimit -n 2000 && exec "$0" bench --quick --workloads idle --engines splice --idle-relays 1500"#)
        .arg(bin());
    let (status, stdout, stderr) = run_cmd(cmd, Duration::from_secs(120));
    let status = status.expect("spliced bench did not finish in 120 s");
    assert!(status.success(), "exit {status}:\n{stdout}\n{stderr}");
    assert!(
        !stdout.contains("errors"),
        "the idle run had errors:\n{stdout}"
    );
    assert!(
        stdout.contains("allows") && stdout.contains("of the 1500 relays asked"),
        "no note that the fd limit allows fewer relays:\n{stdout}"
    );
}
