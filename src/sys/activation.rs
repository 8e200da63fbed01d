//! Sockets passed by a service manager (systemd socket activation,
//! `sd_listen_fds(3)`): `LISTEN_PID` names this process and `LISTEN_FDS`
//! counts the descriptors from fd 3 on.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once the inherited descriptors have been taken: owning them twice
/// would close them twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The descriptors passed to this process, owned (close-on-exec is set on
/// them). Empty when none were passed, when they were meant for another
/// process (`LISTEN_PID`), or on every call after the first.
pub fn take_inherited() -> io::Result<Vec<OwnedFd>> {
    if TAKEN.swap(true, Ordering::AcqRel) {
        return Ok(Vec::new());
    }
    let fds = sd_notify::listen_fds()?;
    Ok(fds
        .map(|fd| {
            // SAFETY: the service manager opened fds 3..3+LISTEN_FDS for
            // this process (LISTEN_PID matched), nothing else in the
            // process owns them, and TAKEN makes this the only place that
            // takes ownership, once.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
        .collect())
}
