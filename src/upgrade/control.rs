//! The instance's upgrade socket, `spliced-NAME.upgrade` beside its pid
//! file: `spliced upgrade` connects, sends one JSON line (the binary to
//! start, or none), and reads one JSON line back with the outcome. The
//! socket is 0600 in a directory only this user may write to.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{UpgradeReport, Upgrader};

/// Where instance `name`'s upgrade socket lives.
pub fn socket_path(name: &str) -> PathBuf {
    crate::service::pid_dir().join(format!("spliced-{name}.upgrade"))
}

/// What `spliced upgrade` asks.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Request {
    pub binary: Option<PathBuf>,
}

/// What the instance answers.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Outcome {
    pub ok: bool,
    pub error: Option<String>,
    pub pid: Option<u32>,
    pub relays: usize,
    pub left_behind: usize,
    pub bytes_in_flight: u64,
    pub total_us: u64,
    pub pause_p50_us: u64,
    pub pause_p99_us: u64,
    pub pause_max_us: u64,
}

impl Outcome {
    pub fn of(result: &Result<UpgradeReport, super::UpgradeError>) -> Outcome {
        match result {
            Ok(r) => Outcome {
                ok: true,
                error: None,
                pid: Some(r.pid),
                relays: r.relays,
                left_behind: r.left_behind,
                bytes_in_flight: r.bytes_in_flight,
                total_us: r.total.as_micros() as u64,
                pause_p50_us: r.pause_p50.as_micros() as u64,
                pause_p99_us: r.pause_p99.as_micros() as u64,
                pause_max_us: r.pause_max.as_micros() as u64,
            },
            Err(e) => Outcome {
                error: Some(e.to_string()),
                ..Outcome::default()
            },
        }
    }
}

/// Logs an upgrade's outcome, with its figures.
pub fn log(result: &Result<UpgradeReport, super::UpgradeError>) {
    match result {
        Ok(r) => tracing::info!(
            new_pid = r.pid,
            relays = r.relays,
            left_behind = r.left_behind,
            bytes_in_flight = r.bytes_in_flight,
            total_ms = r.total.as_secs_f64() * 1e3,
            pause_p50_ms = r.pause_p50.as_secs_f64() * 1e3,
            pause_p99_ms = r.pause_p99.as_secs_f64() * 1e3,
            pause_max_ms = r.pause_max.as_secs_f64() * 1e3,
            "upgrade done: the new process serves every listener and relay handed over; draining what is left here"
        ),
        Err(e) => tracing::error!(error = %e, "upgrade failed; this process serves on with every relay"),
    }
}

/// Binds the upgrade socket of instance `name` (replacing a stale one) and
/// serves it on a thread: each request runs `upgrader`; after a success
/// `done` runs and the thread ends.
pub fn serve(
    name: &str,
    upgrader: Upgrader,
    done: impl Fn() + Send + 'static,
) -> std::io::Result<()> {
    let path = socket_path(name);
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    std::thread::Builder::new()
        .name("spliced-upgrade".into())
        .spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                if answer(stream, &upgrader) {
                    done();
                    return;
                }
            }
        })?;
    Ok(())
}

/// One request; true when the upgrade succeeded.
fn answer(stream: UnixStream, upgrader: &Upgrader) -> bool {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut line = String::new();
    if BufReader::new(&stream).read_line(&mut line).is_err() {
        return false;
    }
    let request: Request = match serde_json::from_str(&line) {
        Ok(r) => r,
        Err(e) => {
            reply(
                &stream,
                &Outcome {
                    error: Some(format!("a request that is not one: {e}")),
                    ..Outcome::default()
                },
            );
            return false;
        }
    };
    tracing::info!(binary = ?request.binary, "upgrade asked for");
    let result = upgrader.upgrade(request.binary.as_deref());
    log(&result);
    reply(&stream, &Outcome::of(&result));
    result.is_ok()
}

fn reply(mut stream: &UnixStream, outcome: &Outcome) {
    if let Ok(mut text) = serde_json::to_string(outcome) {
        text.push('\n');
        let _ = stream.write_all(text.as_bytes());
    }
}

/// `spliced upgrade`'s side: asks instance `name` to upgrade (to `binary`)
/// and waits for the outcome.
pub fn request(name: &str, binary: Option<&Path>) -> Result<Outcome, String> {
    let path = socket_path(name);
    let stream = UnixStream::connect(&path).map_err(|e| {
        format!(
            "no running instance named '{name}' to upgrade ({}: {e})",
            path.display()
        )
    })?;
    let binary = match binary {
        Some(b) => {
            Some(std::fs::canonicalize(b).map_err(|e| format!("--binary {}: {e}", b.display()))?)
        }
        None => None,
    };
    let mut text = serde_json::to_string(&Request { binary }).map_err(|e| e.to_string())?;
    text.push('\n');
    (&stream)
        .write_all(text.as_bytes())
        .map_err(|e| format!("cannot ask '{name}': {e}"))?;
    let _ = stream.set_read_timeout(Some(Duration::from_secs(120)));
    let mut line = String::new();
    BufReader::new(&stream)
        .read_line(&mut line)
        .map_err(|e| format!("no answer from '{name}': {e}"))?;
    if line.is_empty() {
        return Err(format!(
            "'{name}' closed the upgrade socket without an answer"
        ));
    }
    serde_json::from_str(&line).map_err(|e| format!("a garbled answer from '{name}': {e}"))
}
