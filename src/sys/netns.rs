//! Network namespaces: moving the calling thread into one.
//!
//! A thread that entered a namespace creates its sockets there, and so do
//! the threads it spawns afterwards (a new thread shares its creator's
//! namespaces); a socket stays in the namespace it was created in, whichever
//! thread uses it later.

use std::io;
use std::path::Path;

/// Moves the calling thread (only it) into the network namespace at `path`,
/// e.g. `/run/netns/NAME` as `ip netns add` makes it: setns(2) with
/// `CLONE_NEWNET`. Needs `CAP_SYS_ADMIN`.
///
/// See <https://man7.org/linux/man-pages/man2/setns.2.html>.
pub fn enter(path: &Path) -> io::Result<()> {
    let ns = std::fs::File::open(path)?;
    nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}
