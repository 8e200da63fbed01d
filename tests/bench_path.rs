//! `spliced bench --path`: the veth paths run, name their path and MTU in the
//! output, and leave no network namespace behind, also when interrupted; a
//! user without the privileges gets one clear line. `veth` and `veth2` give
//! their pairs a NIC's offloads (GSO out, GRO in, a qdisc), `veth-nooffload`
//! none; a path below the sanity floor prints no table and exits non-zero.
//!
//! The floor is measured on the machine as it is: on a machine too loaded,
//! the NIC-path cases below accept the floor's refusal (and check it is one)
//! in place of a table; `floor_refuses_a_shaped_path` makes the refusal
//! certain with a tc rate limit.
//!
//! The veth cases need root (they create network namespaces); run as another
//! user they say so and pass without measuring.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use common::{bin, serial, strip_ansi, wait_until};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// The serial lock for a veth case, or `None` (after saying so) when not
/// root: only root creates the path's network namespaces.
fn as_root_serially() -> Option<MutexGuard<'static, ()>> {
    if !is_root() {
        eprintln!("not root: the veth path cannot be created; see refused_without_privileges");
        return None;
    }
    Some(serial())
}

/// The namespaces of the bench with `pid` that still exist.
fn namespaces_of(pid: u32) -> Vec<String> {
    let prefix = format!("spliced-bench-{pid}-");
    std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// A bench child whose stderr lines are collected as they come.
struct Bench {
    child: Child,
    stdout: Option<thread::JoinHandle<String>>,
    stderr: Arc<Mutex<Vec<String>>>,
    stderr_reader: Option<thread::JoinHandle<()>>,
}

impl Bench {
    fn spawn(args: &[&str]) -> Bench {
        let mut child = Command::new(bin())
            .arg("bench")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .spawn()
            .expect("spawn spliced bench");
        let mut out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let stdout = thread::spawn(move || {
            let mut s = String::new();
            let _ = out.read_to_string(&mut s);
            s
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let lines = Arc::clone(&stderr);
        let reader = thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(strip_ansi(&l));
            }
        });
        Bench {
            child,
            stdout: Some(stdout),
            stderr,
            stderr_reader: Some(reader),
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits for the exit (killing the bench after `timeout`, which fails the
    /// test) and for its output to be read to EOF; returns the status and stdout.
    fn finish(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let Some(status) = common::exit_within(&mut self.child, timeout) else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "spliced bench did not finish in {timeout:?}:\n{}",
                self.stderr()
            );
        };
        if let Some(t) = self.stderr_reader.take() {
            t.join().unwrap();
        }
        let out = self
            .stdout
            .take()
            .map(|t| t.join().unwrap())
            .unwrap_or_default();
        (status, out)
    }
}

impl Drop for Bench {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A pid no process has now: that of a child that already exited.
fn dead_pid() -> u32 {
    let mut c = Command::new("true").spawn().expect("spawn true");
    let pid = c.id();
    c.wait().unwrap();
    pid
}

fn ip(args: &[&str]) {
    let st = Command::new("ip").args(args).status().expect("run ip");
    assert!(st.success(), "ip {args:?} failed");
}

/// The sanity floor's refusal: exit 2, no table, one line naming the causes.
fn is_floor_refusal(status: ExitStatus, out: &str, stderr: &str) -> bool {
    status.code() == Some(2)
        && out.is_empty()
        && stderr.contains("spliced: error: the veth")
        && stderr.contains("path is implausibly slow")
}

/// A NIC path's run either printed its table with the floor line, or the
/// machine was too loaded and the floor refused (said on stderr).
fn table_or_floor_refusal(b: &Bench, status: ExitStatus, out: &str) -> bool {
    if is_floor_refusal(status, out, &b.stderr()) {
        eprintln!(
            "the sanity floor refused on this machine now:\n{}",
            b.stderr()
        );
        return false;
    }
    assert!(status.success(), "exit {status}:\n{out}\n{}", b.stderr());
    true
}

/// `spliced bench --path PATH --hold`: the path, kept while the returned
/// child's stdin is open; its name (the netns= field).
fn hold(path: &str) -> (Child, String) {
    let mut child = Command::new(bin())
        .args(["bench", "--path", path, "--hold"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn spliced bench --hold");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .expect("read the --hold line");
    let name = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("netns="))
        .unwrap_or_else(|| panic!("no netns= in {line:?}"))
        .to_string();
    (child, name)
}

/// Closes a --hold's stdin and waits for it to remove its namespaces.
fn release(mut child: Child, name: &str) {
    drop(child.stdin.take());
    let status = common::exit_within(&mut child, Duration::from_secs(30)).expect("--hold exits");
    assert!(status.success());
    assert!(!Path::new("/run/netns").join(format!("{name}-px")).exists());
}

/// `ip netns exec NS CMD...`, its stdout.
fn in_ns(ns: &str, cmd: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
        .expect("run ip netns exec");
    assert!(out.status.success(), "{cmd:?} in {ns}: {:?}", out);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn feature<'a>(shown: &'a str, name: &str) -> &'a str {
    shown
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
        .unwrap_or_else(|| panic!("no {name} in {shown}"))
        .split_whitespace()
        .next()
        .unwrap()
}

#[test]
fn veth_names_path_and_mtu_and_removes_its_namespaces() {
    let Some(_serial) = as_root_serially() else {
        return;
    };
    // What a bench killed by SIGKILL would leave; the next bench removes it.
    let stale = format!("spliced-bench-{}-up", dead_pid());
    ip(&["netns", "add", &stale]);
    let mut b = Bench::spawn(&[
        "--quick",
        "--path",
        "veth",
        "-w",
        "bulk,rr",
        "-e",
        "splice,copy",
    ]);
    let (status, out) = b.finish(Duration::from_secs(300));
    if table_or_floor_refusal(&b, status, &out) {
        assert!(
            out.contains("  path      veth, MTU 1500 ") && out.contains("GRO in, as a NIC"),
            "no path line in:\n{out}"
        );
        assert!(
            out.contains("  check     direct over veth ") && out.contains("(at least 25% needed)"),
            "no path check line in:\n{out}"
        );
        assert!(out.contains("bulk — 8 conns, one way") && out.contains("rr — 256 KiB"));
        assert!(out.contains("splice/copy"), "{out}");
        // GRO merged the frames before the upstream's stack saw them.
        assert!(out.contains("IP packets, "), "{out}");
    }
    assert_eq!(namespaces_of(b.pid()), Vec::<String>::new());
    assert!(
        !Path::new("/run/netns").join(&stale).exists(),
        "the stale namespace {stale} is still there"
    );
}

#[test]
fn veth2_json_names_path_and_mtu() {
    let Some(_serial) = as_root_serially() else {
        return;
    };
    let mut b = Bench::spawn(&[
        "--quick",
        "--path",
        "veth2",
        "--mtu",
        "9000",
        "-w",
        "rr,idle",
        "--sizes",
        "16k",
        "--idle-relays",
        "200",
        "-e",
        "splice,direct",
        "--json",
    ]);
    let (status, out) = b.finish(Duration::from_secs(120));
    if !table_or_floor_refusal(&b, status, &out) {
        assert_eq!(namespaces_of(b.pid()), Vec::<String>::new());
        return;
    }
    let doc: serde_json::Value = serde_json::from_str(&out).expect("JSON on stdout");
    let floor = &doc["path"]["check"];
    assert_eq!(floor["pairs"], 2, "{floor}");
    assert!(floor["path_gbps"].as_f64().unwrap() > 0.0);
    assert_eq!(doc["path"]["path"], "veth2", "{}", doc["path"]);
    assert_eq!(doc["path"]["mtu"], 9000);
    // Frames crossed the veth pair, none larger than the MTU on average.
    let mean = doc["path"]["upstream_frame_bytes"].as_f64().unwrap();
    assert!(mean > 0.0 && mean <= 9014.0, "mean frame {mean} B");
    // `direct` crosses both legs: the proxy's namespace forwards.
    let engines: Vec<&str> = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["engine"].as_str())
        .collect();
    assert!(engines.contains(&"direct") && engines.contains(&"splice"));
    // The idle proxy process entered the proxy's namespace and relayed there.
    let idle = doc["results"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["workload"] == "idle" && r["metric"] == "relays")
        .unwrap_or_else(|| panic!("no idle result: {}", doc["errors"]));
    assert_eq!(idle["median"], 200.0);
    assert_eq!(doc["errors"], serde_json::json!([]));
    assert_eq!(namespaces_of(b.pid()), Vec::<String>::new());
}

#[test]
fn nic_paths_have_offloads_and_nooffload_has_none() {
    let Some(_serial) = as_root_serially() else {
        return;
    };
    for path in ["veth", "veth2"] {
        let (child, name) = hold(path);
        let mut ends = vec![(format!("{name}-px"), "vup"), (format!("{name}-up"), "vpx")];
        if path == "veth2" {
            ends.push((format!("{name}-px"), "vcl"));
            ends.push((format!("{name}-cl"), "vpx"));
        }
        for (ns, dev) in &ends {
            let shown = in_ns(ns, &["ethtool", "-k", dev]);
            assert_eq!(
                feature(&shown, "tcp-segmentation-offload"),
                "off",
                "{path} {ns} {dev}"
            );
            assert_eq!(
                feature(&shown, "generic-segmentation-offload"),
                "on",
                "{path} {ns} {dev}"
            );
            assert_eq!(
                feature(&shown, "generic-receive-offload"),
                "on",
                "{path} {ns} {dev}"
            );
            let qdisc = in_ns(ns, &["tc", "qdisc", "show", "dev", dev]);
            assert!(qdisc.contains("pfifo_fast"), "{path} {ns} {dev}: {qdisc}");
            let link = in_ns(ns, &["ip", "-d", "link", "show", "dev", dev]);
            assert!(
                link.contains("mtu 1500 ") && link.contains("gso_max_segs 65535"),
                "{link}"
            );
        }
        release(child, &name);
    }
    let (child, name) = hold("veth-nooffload");
    for (ns, dev) in [(format!("{name}-px"), "vup"), (format!("{name}-up"), "vpx")] {
        let link = in_ns(&ns, &["ip", "-d", "link", "show", "dev", dev]);
        assert!(link.contains("gso_max_segs 1 "), "{link}");
        let shown = in_ns(&ns, &["ethtool", "-k", dev]);
        assert_eq!(feature(&shown, "generic-receive-offload"), "off");
    }
    release(child, &name);
}

#[test]
fn floor_refuses_a_shaped_path() {
    let Some(_serial) = as_root_serially() else {
        return;
    };
    let (child, name) = hold("veth");
    // 100 Mbit/s towards the upstream: a hundredth of any loopback here.
    let px = format!("{name}-px");
    let st = Command::new("tc")
        .args(["-n", &px, "qdisc", "replace", "dev", "vup", "root"])
        .args(["tbf", "rate", "100mbit", "burst", "32kb", "latency", "50ms"])
        .status()
        .expect("run tc");
    assert!(st.success());
    let mut b = Bench::spawn(&[
        "--quick", "--path", "veth", "--netns", &name, "-w", "rr", "--sizes", "64", "-e", "direct",
    ]);
    let (status, out) = b.finish(Duration::from_secs(60));
    let stderr = b.stderr();
    assert!(
        is_floor_refusal(status, &out, &stderr),
        "exit {status}:\n{out}\n{stderr}"
    );
    assert!(
        stderr.contains("(at least 25% needed)")
            && stderr.contains("tc qdisc")
            && stderr.contains("loaded"),
        "{stderr}"
    );
    release(child, &name);
}

#[test]
fn nooffload_is_the_named_worst_case() {
    let Some(_serial) = as_root_serially() else {
        return;
    };
    let mut b = Bench::spawn(&[
        "--quick",
        "--path",
        "veth-nooffload",
        "-w",
        "rr",
        "--sizes",
        "1k",
        "-e",
        "splice,direct",
    ]);
    let (status, out) = b.finish(Duration::from_secs(120));
    assert!(status.success(), "exit {status}:\n{out}\n{}", b.stderr());
    assert!(
        out.contains("  path      veth-nooffload, MTU 1500 "),
        "{out}"
    );
    assert!(!out.contains("  check "), "{out}");
    assert!(out.contains("a worst case, not a deployment's"), "{out}");
    assert_eq!(namespaces_of(b.pid()), Vec::<String>::new());
}

#[test]
fn sigint_mid_run_removes_the_namespaces() {
    let Some(_serial) = as_root_serially() else {
        return;
    };
    let mut b = Bench::spawn(&["--path", "veth2", "-w", "bulk", "-e", "splice,copy"]);
    let pid = b.pid();
    // Mid-run: the namespaces exist and the path's check has started.
    wait_until(
        Duration::from_secs(60),
        "the bench started measuring",
        || namespaces_of(pid).len() == 3 && b.stderr().contains("checking the path"),
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let (status, _) = b.finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(130), "{}", b.stderr());
    assert_eq!(namespaces_of(pid), Vec::<String>::new());
    assert!(
        b.stderr().contains("removed network namespaces"),
        "{}",
        b.stderr()
    );
}

#[test]
fn refused_without_privileges() {
    let mut cmd = if is_root() {
        // Drop to an unprivileged user (capabilities go with uid 0).
        let mut c = Command::new("setpriv");
        c.args(["--reuid=nobody", "--regid=nogroup", "--clear-groups", "--"])
            .arg(bin());
        c
    } else {
        Command::new(bin())
    };
    let out = cmd
        .args(["bench", "--quick", "--path", "veth", "-w", "rr"])
        .stdin(Stdio::null())
        .env("NO_COLOR", "1")
        .output()
        .expect("run spliced bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "not one line: {stderr}");
    assert!(
        stderr.starts_with("spliced: error: --path veth needs root")
            && stderr.contains("CAP_NET_ADMIN"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn loopback_names_its_path() {
    let _serial = serial();
    let mut b = Bench::spawn(&[
        "--quick",
        "-w",
        "rr",
        "--sizes",
        "64",
        "-e",
        "splice,direct",
    ]);
    let (status, out) = b.finish(Duration::from_secs(60));
    assert!(status.success(), "exit {status}:\n{out}\n{}", b.stderr());
    assert!(out.contains("  path      loopback, MTU "), "{out}");
    // --quick says what it is, and prints no negative added latency.
    assert!(
        out.starts_with("spliced bench --quick: SMOKE TEST, not results\n"),
        "{out}"
    );
    let added = out
        .lines()
        .find(|l| l.trim_start().starts_with("splice vs direct"))
        .unwrap_or_else(|| panic!("no 'splice vs direct' row:\n{out}"));
    assert!(
        !added
            .split_whitespace()
            .any(|w| w.starts_with('-') && w.len() > 1),
        "a negative figure in {added:?}"
    );
    assert!(!out.contains("adds over direct: -"), "{out}");
    let mut b = Bench::spawn(&["--quick", "--mtu", "1500"]);
    let (status, _) = b.finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(2));
    assert!(b
        .stderr()
        .contains("--mtu, --netns and --hold need --path veth"));
}
