//! The proxy as a child process (`spliced run`).

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_spliced")
}

/// Removes ANSI escape sequences (in case the log is coloured).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The number after `key=` in a log line, if any.
pub fn log_number<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let digits: String = line[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The address printed after `listening on` in a log line, if any.
pub fn parse_listening(line: &str) -> Option<SocketAddr> {
    let at = line.find("listening on")?;
    line[at + "listening on".len()..]
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|t| !t.is_empty())
        .take(3)
        .find_map(|t| {
            let t = t.rsplit('=').next().unwrap_or(t);
            let t = t.trim_matches(|c: char| c == '"' || c == '\'' || c == '`');
            t.parse().ok()
        })
}

/// A running `spliced run` child. Dropping it kills it.
pub struct Spliced {
    child: Child,
    pub addr: SocketAddr,
    logs: Arc<Mutex<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    /// The RUNTIME_DIRECTORY made for it, removed on drop.
    own_dir: Option<PathBuf>,
}

/// A fresh directory for one child's stats and pid files.
fn own_run_dir() -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir()
        .join("spliced-tests-run")
        .join(format!("{}-{n}", std::process::id()))
}

impl Spliced {
    /// `spliced run --listen 127.0.0.1:0 <args>`.
    pub fn run(args: &[&str]) -> Spliced {
        let mut cmd = Command::new(bin());
        cmd.args(["run", "--listen", "127.0.0.1:0"]).args(args);
        Spliced::spawn(cmd)
    }

    /// Same, under `ulimit -n <nofile>` (soft and hard).
    pub fn run_with_nofile(nofile: u32, args: &[&str]) -> Spliced {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
            .arg(bin())
            .args(["run", "--listen", "127.0.0.1:0"])
            .args(args);
        Spliced::spawn(cmd)
    }

    /// Spawns `cmd` and waits for its `listening on ADDR` line.
    pub fn spawn(cmd: Command) -> Spliced {
        let mut me = Spliced::spawn_unready(cmd);
        me.wait_listening();
        me
    }

    /// Spawns `cmd` without waiting for anything (`addr` stays 0.0.0.0:0):
    /// for a process that starts listening only later, or never.
    pub fn spawn_unready(mut cmd: Command) -> Spliced {
        // Stats and pid files of test children stay out of /run, each in a
        // directory of its own (children of one name would refuse each
        // other); a test that reads one sets its own directory.
        let mut own_dir = None;
        if !cmd.get_envs().any(|(k, _)| k == "RUNTIME_DIRECTORY") {
            let dir = own_run_dir();
            cmd.env("RUNTIME_DIRECTORY", &dir);
            own_dir = Some(dir);
        }
        if !cmd.get_envs().any(|(k, _)| k == "SPLICED_LOOP") {
            cmd.env("SPLICED_LOOP", super::event_loop().as_str());
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .env_remove("RUST_BACKTRACE");
        let mut child = cmd.spawn().expect("spawn spliced");
        let stderr = child.stderr.take().unwrap();
        let logs = Arc::new(Mutex::new(Vec::new()));
        let reader = {
            let logs = Arc::clone(&logs);
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    logs.lock().unwrap().push(strip_ansi(&line));
                }
            })
        };
        Spliced {
            child,
            addr: "0.0.0.0:0".parse().unwrap(),
            logs,
            reader: Some(reader),
            own_dir,
        }
    }

    /// Waits for the `listening on ADDR` line and keeps ADDR.
    fn wait_listening(&mut self) {
        let me = self;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(addr) = me.logs().iter().find_map(|l| parse_listening(l)) {
                me.addr = addr;
                return;
            }
            if let Ok(Some(status)) = me.child.try_wait() {
                // Let the reader collect the last lines.
                if let Some(r) = me.reader.take() {
                    let _ = r.join();
                }
                panic!(
                    "spliced exited ({status}) before listening; stderr:\n{}",
                    me.logs().join("\n")
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "spliced printed no 'listening on ADDR' within 10 s; stderr:\n{}",
                    me.logs().join("\n")
                );
            }
            super::wait::poll_pause();
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Lines logged to stderr so far (ANSI stripped).
    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    fn proc_file(&self, name: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/{name}", self.pid()))
            .unwrap_or_else(|e| panic!("read /proc/{}/{name}: {e}", self.pid()))
    }

    /// Resident set size in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = self.proc_file("status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// User + system CPU time of the whole process.
    pub fn cpu_time(&self) -> Duration {
        let stat = self.proc_file("stat");
        // Fields after the parenthesised command name; utime and stime are
        // fields 14 and 15 (1-based), i.e. 11 and 12 after ") ".
        let rest = &stat[stat.rfind(')').expect("comm in stat") + 2..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let utime: u64 = fields[11].parse().unwrap();
        let stime: u64 = fields[12].parse().unwrap();
        let tck = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as u64;
        Duration::from_nanos((utime + stime) * 1_000_000_000 / tck)
    }

    /// Open file descriptors of the process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)
            .unwrap_or_else(|e| panic!("kill -{sig} {}: {e}", self.pid()));
    }

    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    /// Waits for the process to exit; `None` if it is still running after
    /// `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let st = super::wait::exit_within(&mut self.child, timeout)?;
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        Some(st)
    }
}

impl Drop for Spliced {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        if let Some(dir) = &self.own_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Runs the binary to completion with `args` (killing it after `timeout`);
/// returns (exit status, stdout, stderr). `None` status means it was killed.
pub fn run_bin(args: &[&str], timeout: Duration) -> (Option<ExitStatus>, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args);
    run_cmd(cmd, timeout)
}

/// Runs `cmd` to completion like [`run_bin`]; without a RUNTIME_DIRECTORY
/// of its own, in a fresh one (as [`Spliced::spawn`]).
pub fn run_cmd(mut cmd: Command, timeout: Duration) -> (Option<ExitStatus>, String, String) {
    let mut own_dir = None;
    if !cmd.get_envs().any(|(k, _)| k == "RUNTIME_DIRECTORY") {
        let dir = own_run_dir();
        cmd.env("RUNTIME_DIRECTORY", &dir);
        own_dir = Some(dir);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env("NO_COLOR", "1")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LOG")
        .spawn()
        .expect("spawn spliced");
    let outputs = Outputs::take(&mut child);
    let status = super::wait::exit_within(&mut child, timeout);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (stdout, stderr) = outputs.join();
    let (stdout, stderr) = (text(&stdout), strip_ansi(&text(&stderr)));
    if let Some(dir) = own_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    (status, stdout, stderr)
}

/// A child's piped stdout and stderr, each read to its end on a thread of
/// its own, so that a full pipe never stalls the child.
pub struct Outputs {
    stdout: JoinHandle<Vec<u8>>,
    stderr: JoinHandle<Vec<u8>>,
}

impl Outputs {
    /// Takes `child`'s stdout and stderr (both must be piped).
    pub fn take(child: &mut Child) -> Outputs {
        let read_all = |mut from: Box<dyn Read + Send>| {
            thread::spawn(move || {
                let mut b = Vec::new();
                let _ = from.read_to_end(&mut b);
                b
            })
        };
        Outputs {
            stdout: read_all(Box::new(child.stdout.take().expect("a piped stdout"))),
            stderr: read_all(Box::new(child.stderr.take().expect("a piped stderr"))),
        }
    }

    /// All the child wrote on stdout and stderr, once both are closed.
    pub fn join(self) -> (Vec<u8>, Vec<u8>) {
        (self.stdout.join().unwrap(), self.stderr.join().unwrap())
    }
}

/// `bytes` as text, any invalid UTF-8 replaced.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
