//! Running as a service: the pid file `spliced reload` finds an instance
//! by, dropping root after binding, and telling systemd where the process
//! is in its life (`sd_notify`).

mod pidfile;
mod privileges;
mod rundir;

pub use pidfile::{read_pid, PidFile, PidFileError};
pub use privileges::{drop_privileges, PrivilegeError};
pub use rundir::{pid_dir, UnsafeDir};

/// A state change for the service manager; a no-op without
/// `NOTIFY_SOCKET`. Failures are logged, never fatal: the proxy serves
/// whether or not systemd hears of it.
pub fn notify(state: Notify, status: &str) {
    use sd_notify::NotifyState;
    let mut states = vec![NotifyState::Status(status)];
    match state {
        Notify::Ready => states.push(NotifyState::Ready),
        Notify::Reloading => {
            states.push(NotifyState::Reloading);
            // Type=notify-reload wants the time the reload began.
            if let Ok(now) = NotifyState::monotonic_usec_now() {
                states.push(now);
            }
        }
        Notify::Stopping => states.push(NotifyState::Stopping),
    }
    if let Err(e) = sd_notify::notify(&states) {
        tracing::warn!(error = %e, "internal: cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// Lets this process, the new one of a live upgrade, take over the stats
/// file of `pid`, the instance it replaces (its pid file:
/// [`PidFile::take_over`]).
pub fn take_over_from_pid(pid: u32) {
    crate::shm::take_over_from(pid);
}

/// Tells the service manager that `pid` is the service's main process
/// from now on (a live upgrade's new process; this process's own pid
/// again when it rolls back). Failures are logged, never fatal.
pub fn notify_main_pid(pid: u32, status: &str) {
    use sd_notify::NotifyState;
    let states = [NotifyState::MainPid(pid), NotifyState::Status(status)];
    if let Err(e) = sd_notify::notify(&states) {
        tracing::warn!(error = %e, "internal: cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// Where the process is, as `sd_notify(3)` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notify {
    /// Listening and serving (also: a reload is over, whatever its outcome).
    Ready,
    /// Re-reading the config.
    Reloading,
    /// Draining before exit.
    Stopping,
}
