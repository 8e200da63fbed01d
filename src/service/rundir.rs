//! The directory of pid files, and whether it can be trusted: another
//! local user who could write into it could plant a pid file, and so make
//! `spliced reload` signal a process of their choosing.

use std::fmt;
use std::fs::{self, DirBuilder};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use nix::unistd::{Uid, User};

/// The directory of pid files: systemd's `RuntimeDirectory=` (the first
/// entry of `$RUNTIME_DIRECTORY`), else `/run/spliced` for root, else
/// `$XDG_RUNTIME_DIR/spliced`, else `/tmp/spliced-UID`.
pub fn pid_dir() -> PathBuf {
    if let Some(dirs) = std::env::var_os("RUNTIME_DIRECTORY") {
        if let Some(first) = dirs.to_string_lossy().split(':').find(|d| !d.is_empty()) {
            return PathBuf::from(first);
        }
    }
    let uid = nix::unistd::geteuid();
    if uid.is_root() {
        return PathBuf::from("/run/spliced");
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) if !dir.is_empty() => Path::new(&dir).join("spliced"),
        _ => PathBuf::from(format!("/tmp/spliced-{uid}")),
    }
}

/// Why the pid directory is not used.
#[derive(Debug)]
pub struct UnsafeDir {
    pub dir: PathBuf,
    pub problem: String,
}

impl fmt::Display for UnsafeDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "refusing the pid directory {}: {}",
            self.dir.display(),
            self.problem
        )
    }
}

/// Creates `dir` when missing (0700; 0755 for root, whose directory
/// also holds stats files a `stats-group` may read), then checks it.
pub(super) fn make(dir: &Path) -> Result<(), DirError> {
    let mode = if nix::unistd::geteuid().is_root() {
        0o755
    } else {
        0o700
    };
    DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)
        .map_err(|e| DirError::Io(dir.to_path_buf(), e))?;
    // Checked after: whoever made it first, this is what it is now.
    check(dir).map_err(DirError::Unsafe)
}

/// Why the directory could not be made or used.
#[derive(Debug)]
pub(super) enum DirError {
    Unsafe(UnsafeDir),
    Io(PathBuf, io::Error),
}

/// Refuses a directory another user could write into: it must be owned by
/// this user and writable by its owner alone. As root, a directory owned
/// by another user is accepted only inside a root-owned directory no one
/// else can write (`/run/spliced` handed to `--user`, or systemd's
/// `RuntimeDirectory=` given to `User=`): only root could have made it.
pub fn check(dir: &Path) -> Result<(), UnsafeDir> {
    let refuse = |problem: String| UnsafeDir {
        dir: dir.to_path_buf(),
        problem,
    };
    let meta = fs::metadata(dir).map_err(|e| refuse(format!("cannot inspect it: {e}")))?;
    if !meta.is_dir() {
        return Err(refuse("it is not a directory".into()));
    }
    let me = nix::unistd::geteuid();
    let owner = Uid::from_raw(meta.uid());
    if owner != me && !(me.is_root() && made_by_root(dir)) {
        return Err(refuse(format!(
            "it is owned by {}, not by {}, the user running spliced; remove it, or set XDG_RUNTIME_DIR or RUNTIME_DIRECTORY to a directory of this user's",
            who(owner),
            who(me)
        )));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(refuse(format!(
            "it is writable by its group or by others (mode {:04o}); it must be writable by its owner only (chmod go-w)",
            meta.mode() & 0o7777
        )));
    }
    Ok(())
}

/// Whether `dir`'s parent is root's and writable by root alone.
fn made_by_root(dir: &Path) -> bool {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("/"),
    };
    fs::metadata(parent).is_ok_and(|m| m.uid() == 0 && m.mode() & 0o022 == 0)
}

/// `uid N (name)`.
fn who(uid: Uid) -> String {
    match User::from_uid(uid) {
        Ok(Some(user)) => format!("{} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}
