//! `spliced bench --path`: the veth paths run, name their path and MTU in the
//! output, and leave no network namespace behind, also when interrupted; a
//! user without the privileges gets one clear line.
//!
//! The veth cases need root (they create network namespaces); run as another
//! user they say so and pass without measuring.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{bin, serial, strip_ansi, wait_until};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
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

#[test]
fn veth_names_path_and_mtu_and_removes_its_namespaces() {
    if !is_root() {
        eprintln!("not root: the veth path cannot be created; see refused_without_privileges");
        return;
    }
    let _serial = serial();
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
    assert!(status.success(), "exit {status}:\n{out}\n{}", b.stderr());
    assert!(
        out.contains("  path      veth, MTU 1500 "),
        "no path line in:\n{out}"
    );
    assert!(out.contains("bulk — 8 conns, one way") && out.contains("rr — 256 KiB"));
    assert!(out.contains("splice/copy"), "{out}");
    assert_eq!(namespaces_of(b.pid()), Vec::<String>::new());
    assert!(
        !Path::new("/run/netns").join(&stale).exists(),
        "the stale namespace {stale} is still there"
    );
}

#[test]
fn veth2_json_names_path_and_mtu() {
    if !is_root() {
        eprintln!("not root: the veth path cannot be created; see refused_without_privileges");
        return;
    }
    let _serial = serial();
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
    assert!(status.success(), "exit {status}:\n{out}\n{}", b.stderr());
    let doc: serde_json::Value = serde_json::from_str(&out).expect("JSON on stdout");
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
fn sigint_mid_run_removes_the_namespaces() {
    if !is_root() {
        eprintln!("not root: the veth path cannot be created; see refused_without_privileges");
        return;
    }
    let _serial = serial();
    let mut b = Bench::spawn(&["--path", "veth2", "-w", "bulk", "-e", "splice,copy"]);
    let pid = b.pid();
    // Mid-run: the namespaces exist and the first case has started.
    wait_until(Duration::from_secs(60), "the bench started a case", || {
        namespaces_of(pid).len() == 3 && b.stderr().contains("bulk 1 conn")
    });
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
    let mut b = Bench::spawn(&["--quick", "-w", "rr", "--sizes", "64", "-e", "splice"]);
    let (status, out) = b.finish(Duration::from_secs(60));
    assert!(status.success(), "exit {status}:\n{out}\n{}", b.stderr());
    assert!(out.contains("  path      loopback, MTU "), "{out}");
    let mut b = Bench::spawn(&["--quick", "--mtu", "1500"]);
    let (status, _) = b.finish(Duration::from_secs(60));
    assert_eq!(status.code(), Some(2));
    assert!(b
        .stderr()
        .contains("--mtu, --netns and --hold need --path veth"));
}
