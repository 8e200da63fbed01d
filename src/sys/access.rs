//! Whether a file is readable by another user, asked of the kernel itself.
//!
//! A forked child switches to the user's ids and opens and reads the file;
//! its exit status carries the answer. Comparing the file's mode, owner and
//! group with the ids instead would miss ACLs, every directory on the path
//! (each needs search permission), read-only or `noexec` mounts, LSMs and
//! files that open but cannot be read (a directory): the child meets
//! exactly what the process will meet after `--user`.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// The child's exit status when it could not take on the ids.
const SWITCH_FAILED: i32 = 255;

/// Opens `path` and reads one byte as `uid`, with `gid` as its group and
/// only supplementary group: the ids `--user` leaves the process with. The
/// caller must be root (else the switch fails, reported as
/// `PermissionDenied` naming it). The error is the open's or the read's.
pub fn readable_as(path: &Path, uid: u32, gid: u32) -> io::Result<()> {
    // Everything the child needs is made before the fork: after it, only
    // async-signal-safe calls are allowed (no allocation, no locks).
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL byte in the path"))?;
    let groups = [gid as libc::gid_t];
    let mut byte = [0u8; 1];
    // SAFETY (of the fork, through `syscall!`): fork(2) takes no
    // arguments. The child below makes raw system calls only
    // (async-signal-safe, as required after a fork in a process that may
    // have threads), on memory prepared before the fork, and always leaves
    // by _exit, never returning into Rust code.
    let pid = syscall!(fork())?;
    if pid == 0 {
        // Raw setgroups/setgid/setuid (not the libc wrappers, which signal
        // every thread) change only the calling thread: the child's only
        // one. Each pointer is to memory of this stack frame, copied into
        // the child; errors are read as plain errno values (no allocation).
        let switched = syscall!(syscall(libc::SYS_setgroups, 1, groups.as_ptr())).is_ok()
            && syscall!(syscall(libc::SYS_setgid, gid)).is_ok()
            && syscall!(syscall(libc::SYS_setuid, uid)).is_ok();
        let code = if !switched {
            SWITCH_FAILED
        } else {
            let flags = libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY;
            syscall!(open(path.as_ptr(), flags))
                .and_then(|fd| syscall!(read(fd, byte.as_mut_ptr().cast(), 1)))
                .map_or_else(|e| errno_status(e.raw_os_error()), |_| 0)
        };
        // SAFETY: _exit(2) ends the child at once, without running atexit
        // handlers or destructors that belong to the parent.
        unsafe { libc::_exit(code) }
    }
    let mut status: libc::c_int = 0;
    loop {
        // SAFETY: `status` is a valid, writable c_int; `pid` is our child.
        match syscall!(waitpid(pid, &mut status, 0)) {
            Ok(_) => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    if !libc::WIFEXITED(status) {
        return Err(io::Error::other("the child testing the file died"));
    }
    match libc::WEXITSTATUS(status) {
        0 => Ok(()),
        SWITCH_FAILED => Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("cannot switch to uid {uid}, gid {gid} (needs root)"),
        )),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// An errno as an exit status (every errno is below 255; any other is EIO).
fn errno_status(errno: Option<i32>) -> i32 {
    match errno {
        Some(n) if (1..SWITCH_FAILED).contains(&n) => n,
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_as_another_user_only_what_that_user_may_read() {
        if !nix::unistd::geteuid().is_root() {
            println!("skipped: switching ids needs root");
            return;
        }
        let dir = std::env::temp_dir().join(format!("spliced-access-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = dir.join("secret");
        std::fs::write(&secret, "pw\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let nobody = 65534;
        let e = readable_as(&secret, nobody, nobody).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        assert!(readable_as(&secret, 0, 0).is_ok());
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(readable_as(&secret, nobody, nobody).is_ok());
        let e = readable_as(&dir.join("missing"), nobody, nobody).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound, "{e}");
        // A directory opens but does not read.
        let e = readable_as(&dir, nobody, nobody).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EISDIR), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
