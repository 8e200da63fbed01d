//! `spliced run` from start to exit, and `spliced reload`.
//!
//! Start: bind (or adopt systemd's sockets), write the pid file, drop root
//! if `--user` asks, then tell systemd READY. SIGHUP re-reads the config
//! file and reloads (RELOADING, then READY whatever the outcome). The
//! first SIGTERM/SIGINT drains (STOPPING), a second one exits at once.
//! SIGUSR2, or `spliced upgrade` through the instance's upgrade socket,
//! starts a binary upgrade (see `spliced::upgrade`); a process started by
//! one takes over the pid file, stats file and upgrade socket once the old
//! process commits, and tells systemd it is the main process.

use std::process::ExitCode;

use spliced::config::Config;
use spliced::service::{self, Notify, PidFile, PidFileError};
use spliced::Reloader;

use super::fail;

/// Runs the proxy until it has drained. `reread` gives the config file
/// anew, or every problem in it, one a line.
pub(super) fn run(
    config: Config,
    name: &str,
    user: Option<&str>,
    reread: impl Fn() -> Result<Config, Vec<String>> + Send + 'static,
) -> ExitCode {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
    // Installed before anything starts, so an early SIGHUP cannot end the
    // process by its default action.
    let signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR2]);
    let mut signals = match signals {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot install signal handlers: {e}")),
    };
    let mut incoming = match spliced::upgrade::Incoming::from_env() {
        None => None,
        Some(Ok(incoming)) => Some(incoming),
        Some(Err(e)) => return fail(&format!("upgrade: {e}")),
    };
    // Before binding: a second instance under a live name must not serve.
    // A process taking over writes it once the old one has committed.
    let mut pid_file = match incoming {
        Some(_) => None,
        None => match create_pid_file(name, None) {
            Ok(p) => p,
            Err(code) => return code,
        },
    };
    let stats_gid = config.ops.stats_group.as_ref().map(|g| g.gid);
    let started = match incoming.as_mut() {
        Some(incoming) => {
            spliced::shm::take_over_from(std::os::unix::process::parent_id());
            match incoming.listeners() {
                Ok(sockets) => spliced::start_with_sockets(config, sockets),
                Err(e) => return fail(&format!("upgrade: {e}")),
            }
        }
        None => spliced::start_activated(config),
    };
    let handle = match started {
        Ok(h) => h,
        Err(e) => {
            if let Some(incoming) = incoming {
                incoming.refuse(&e.to_string());
            }
            return fail(&e.to_string());
        }
    };
    if let Some(incoming) = incoming {
        match incoming.take_over(&handle) {
            Ok(taken) => {
                tracing::info!(
                    relays = taken.relays,
                    previous_pid = taken.parent,
                    "upgrade: took over every listener and relay"
                );
                if let Err(e) = handle.runtime().publish_stats_file() {
                    tracing::warn!(error = %e, "upgrade: cannot put the stats file in place");
                }
                pid_file = match create_pid_file(name, Some(taken.parent as i32)) {
                    Ok(p) => p,
                    Err(code) => return code,
                };
                service::notify_main_pid("serving; upgraded");
            }
            Err(e) => {
                tracing::error!(error = %e, "upgrade: the take-over failed; the previous process serves on");
                handle.abort();
                return fail(&format!("upgrade: {e}"));
            }
        }
    } else if let Some(user) = user {
        // Without the file, the user could not remove it at exit. The
        // stats file keeps its stats-group; a link is changed itself,
        // never what it points to.
        let stats_file = handle.runtime().stats_file().map(|p| p.to_path_buf());
        let give_pid_file = |uid, gid| {
            if let Some(p) = &pid_file {
                if let Err(e) = p.chown(uid, gid) {
                    tracing::warn!(path = %p.path().display(), error = %e, "cannot give the pid file to {user}; it stays behind at exit");
                }
            }
            if let Some(path) = &stats_file {
                let gid = stats_gid.unwrap_or(gid.as_raw());
                if let Err(e) = std::os::unix::fs::lchown(path, Some(uid.as_raw()), Some(gid)) {
                    tracing::warn!(path = %path.display(), error = %e, "cannot give the stats file to {user}; it stays behind at exit");
                }
            }
        };
        match service::drop_privileges(user, give_pid_file) {
            Ok((uid, gid)) => {
                tracing::info!(user, %uid, %gid, "dropped root: running as {user}");
            }
            Err(e) => {
                handle.abort();
                return fail(&e);
            }
        }
    }
    let controller = handle.controller();
    let reloader = handle.reloader();
    let upgrader = handle.upgrader();
    let upgraded = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let after_upgrade = {
        let (controller, upgraded) = (controller.clone(), std::sync::Arc::clone(&upgraded));
        move || {
            // The new process is the service now: this one drains what
            // it kept and exits, telling systemd nothing.
            upgraded.store(true, std::sync::atomic::Ordering::Relaxed);
            controller.shutdown();
        }
    };
    if let Err(e) = spliced::upgrade::control::serve(name, upgrader.clone(), after_upgrade.clone())
    {
        tracing::warn!(error = %e, "no upgrade socket: 'spliced upgrade --name {name}' cannot reach this instance (SIGUSR2 still upgrades)");
    }
    if pid_file.is_some() {
        service::notify(Notify::Ready, "serving");
    }
    let signal_upgraded = std::sync::Arc::clone(&upgraded);
    std::thread::spawn(move || {
        let mut seen = 0;
        for signal in signals.forever() {
            if signal == SIGHUP {
                reload(&reloader, &reread);
                continue;
            }
            if signal == SIGUSR2 {
                if signal_upgraded.load(std::sync::atomic::Ordering::Relaxed) {
                    continue;
                }
                tracing::info!("SIGUSR2: upgrading to the binary on disk");
                let result = upgrader.upgrade(None);
                spliced::upgrade::control::log(&result);
                if result.is_ok() {
                    after_upgrade();
                }
                continue;
            }
            seen += 1;
            if seen == 1 {
                if !signal_upgraded.load(std::sync::atomic::Ordering::Relaxed) {
                    service::notify(Notify::Stopping, "draining");
                }
                tracing::info!(signal, "stopping: no new connections; draining live relays");
                controller.shutdown();
            } else {
                tracing::warn!(signal, "second signal: exiting now");
                spliced::cli::log::flush();
                std::process::exit(1);
            }
        }
    });
    handle.join();
    drop(pid_file);
    tracing::info!("all relays closed; exiting");
    ExitCode::SUCCESS
}

/// The pid file, replacing one naming `previous`; `Ok(None)` (logged) when
/// it cannot be written, `Err` with the exit code when a live instance
/// holds the name.
fn create_pid_file(name: &str, previous: Option<i32>) -> Result<Option<PidFile>, ExitCode> {
    match PidFile::create_replacing(name, previous) {
        Ok(p) => Ok(Some(p)),
        Err(e @ PidFileError::Io { .. }) => {
            tracing::warn!(error = %e, "no pid file: 'spliced reload --name {name}' cannot find this instance (SIGHUP still reloads)");
            Ok(None)
        }
        Err(e) => Err(fail(&e.to_string())),
    }
}

/// `spliced upgrade --name NAME [--binary PATH]`: asks the instance to
/// upgrade and prints the outcome and its figures.
pub(super) fn request_upgrade(name: &str, binary: Option<&std::path::Path>) -> ExitCode {
    match spliced::upgrade::control::request(name, binary) {
        Ok(o) if o.ok => {
            let ms = |us: u64| us as f64 / 1e3;
            println!(
                "spliced: '{name}' upgraded: new pid {}, {} relays handed over with {} bytes in flight ({} left to finish in the old process), total {:.1} ms; relay pause p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                o.pid.unwrap_or(0),
                o.relays,
                o.bytes_in_flight,
                o.left_behind,
                ms(o.total_us),
                ms(o.pause_p50_us),
                ms(o.pause_p99_us),
                ms(o.pause_max_us)
            );
            ExitCode::SUCCESS
        }
        Ok(o) => {
            eprintln!(
                "spliced: error: upgrade of '{name}' failed: {}; it serves on with every relay",
                o.error.unwrap_or_default()
            );
            ExitCode::from(1)
        }
        Err(e) => fail(&e),
    }
}

/// One reload: every problem is logged and the old config keeps serving,
/// or the new listeners take over. systemd hears RELOADING, then READY.
fn reload(reloader: &Reloader, reread: &dyn Fn() -> Result<Config, Vec<String>>) {
    service::notify(Notify::Reloading, "reloading");
    tracing::info!("SIGHUP: re-reading the config");
    let outcome =
        reread().and_then(|config| reloader.reload(config).map_err(|e| vec![e.to_string()]));
    match outcome {
        Ok(report) => {
            tracing::info!(
                added = report.added.len(),
                removed = report.removed.len(),
                changed = report.changed.len(),
                "config reloaded"
            );
            service::notify(Notify::Ready, "serving; last reload succeeded");
        }
        Err(problems) => {
            for p in &problems {
                tracing::error!("reload: {p}");
            }
            tracing::error!(
                problems = problems.len(),
                "reload refused; still serving the previous config"
            );
            service::notify(Notify::Ready, "serving; last reload failed (see the log)");
        }
    }
}

/// `spliced reload --name NAME`: SIGHUP to the pid in NAME's pid file,
/// once that pid is seen to be a spliced of this user. The outcome is in
/// that instance's log.
pub(super) fn signal_reload(name: &str) -> ExitCode {
    let pid = match service::read_pid(name) {
        Ok(pid) => pid,
        Err(e @ PidFileError::Io { .. }) => {
            return fail(&format!("no running instance named '{name}' found: {e}"))
        }
        Err(e) => return fail(&e.to_string()),
    };
    let target = nix::unistd::Pid::from_raw(pid);
    match nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGHUP) {
        Ok(()) => {
            println!("spliced: sent SIGHUP to '{name}' (pid {pid}); its log tells whether the reload succeeded");
            ExitCode::SUCCESS
        }
        Err(e) => fail(&format!(
            "cannot signal '{name}' (pid {pid} from its pid file): {e}"
        )),
    }
}
