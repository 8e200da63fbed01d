//! `spliced run` from start to exit, and `spliced reload`.
//!
//! Start: bind (or adopt systemd's sockets), write the pid file, drop root
//! if `--user` asks, then tell systemd READY. SIGHUP re-reads the config
//! file and reloads (RELOADING, then READY whatever the outcome). The
//! first SIGTERM/SIGINT drains (STOPPING), a second one exits at once.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use spliced::config::Config;
use spliced::service::{self, Notify, PidFile, PidFileError};
use spliced::Reloader;

use spliced::upgrade::Incoming;

use super::fail;
use super::upgrade::{socket_path, Upgrades};

/// Runs the proxy until it has drained. `reread` gives the config file
/// anew, or every problem in it, one a line.
pub(super) fn run(
    config: Config,
    name: &str,
    user: Option<&str>,
    origin: (PathBuf, Vec<OsString>),
    incoming: Option<Incoming>,
    reread: impl Fn() -> Result<Config, Vec<String>> + Send + 'static,
) -> ExitCode {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR2};
    // Installed before anything starts, so an early SIGHUP cannot end the
    // process by its default action.
    let signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP, SIGUSR2]);
    let mut signals = match signals {
        Ok(s) => s,
        Err(e) => {
            let why = format!("cannot install signal handlers: {e}");
            if let Some(incoming) = incoming {
                incoming.refuse(&why);
            }
            return fail(&why);
        }
    };
    // A live upgrade's new process: ready once its config is read and the
    // sockets are here; nothing is touched until the old one commits.
    let mut committed = match incoming.map(|i| (i.from_pid(), i.ready())) {
        None => None,
        Some((from, Ok(c))) => {
            service::take_over_from_pid(from);
            Some((from, c))
        }
        Some((_, Err(e))) => return fail(&format!("upgrade: {e}")),
    };
    // Before binding: a second instance under a live name must not serve
    // (the instance this one upgrades hands its name over).
    let pid_file = match committed.as_ref().map(|(from, _)| *from) {
        Some(from) => PidFile::take_over(name, from),
        None => PidFile::create(name),
    };
    let pid_file = match pid_file {
        Ok(p) => Some(p),
        Err(e @ PidFileError::Io { .. }) => {
            tracing::warn!(error = %e, "no pid file: 'spliced reload --name {name}' cannot find this instance (SIGHUP still reloads)");
            None
        }
        Err(e) => return fail(&e.to_string()),
    };
    let control_socket = socket_path(name);
    let control = pid_file
        .as_ref()
        .and_then(|_| super::upgrade::bind(&control_socket));
    let stats_gid = config.ops.stats_group.as_ref().map(|g| g.gid);
    // The old instance's counters, read before this process replaces its
    // stats file, so the new one carries on from them.
    let old_counters = committed.as_ref().and_then(|_| {
        let path = spliced::shm::stats_path(name);
        spliced::shm::StatsFile::open(&path)
            .and_then(|f| f.snapshot())
            .ok()
    });
    let mut carried = 0;
    let started = match committed.as_mut() {
        Some((_, c)) => {
            let health = c.take_health();
            carried = health.len();
            spliced::start_upgraded(config, c.take_sockets(), health)
        }
        None => spliced::start_activated(config),
    };
    let handle = match started {
        Ok(h) => h,
        Err(e) => {
            if let Some((_, c)) = committed {
                c.failed(&e.to_string());
            }
            return fail(&e.to_string());
        }
    };
    let upgraded = committed.is_some();
    if let Some(old) = &old_counters {
        handle.seed_counters(old);
    }
    if let Some((from, mut c)) = committed {
        let outcome = handle.adopt_relays(c.take_relays());
        let (taken, late) = c.started(&outcome);
        let adopter = handle.relay_adopter();
        late.serve(move |relays| adopter.adopt(relays));
        tracing::info!(
            from,
            servers = carried,
            relays = taken.relays,
            declined = outcome.declined.len(),
            pause_p50_us = taken.p50_us,
            pause_p99_us = taken.p99_us,
            pause_max_us = taken.max_us,
            "upgrade: serving in place of pid {from} (health of {carried} servers carried over; {} live relays taken, {} left with pid {from})",
            taken.relays,
            outcome.declined.len()
        );
    }
    // A new process of an upgrade was started by one that had already
    // dropped root: it runs as that user.
    let user = user.filter(|_| !upgraded || nix::unistd::geteuid().is_root());
    if let Some(user) = user {
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
                return fail(&e.to_string());
            }
        }
    }
    let controller = handle.controller();
    let reloader = handle.reloader();
    let upgrades = Upgrades::new(handle.upgrader(), name, origin.0, origin.1);
    if let Some(control) = control {
        upgrades.serve(control, &control_socket);
    }
    service::notify(Notify::Ready, "serving");
    let on_signal = upgrades.clone();
    std::thread::spawn(move || {
        let mut seen = 0;
        for signal in signals.forever() {
            if signal == SIGHUP {
                reload(&reloader, &reread);
                continue;
            }
            if signal == SIGUSR2 {
                tracing::info!("SIGUSR2: upgrading");
                on_signal.run_from_signal();
                continue;
            }
            seen += 1;
            if seen == 1 {
                service::notify(Notify::Stopping, "draining");
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
    // An upgrade that handed every relay over ends the workers at once:
    // its answer is written (or logged) before the process exits.
    upgrades.wait_answered();
    if pid_file.is_some() {
        upgrades.remove(&control_socket);
    }
    drop(pid_file);
    tracing::info!("all relays closed; exiting");
    ExitCode::SUCCESS
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
