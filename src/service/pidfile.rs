//! `spliced-NAME.pid`: written at start, removed at exit, read by
//! `spliced reload --name NAME` to find the instance to signal. Both
//! check the directory first (see [`super::rundir`]) and trust a pid only
//! once it names a spliced process of this user.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::rundir::{self, pid_dir, DirError, UnsafeDir};

fn path_in(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("spliced-{name}.pid"))
}

/// Why a pid file could not be written or read. Each prints as one line.
#[derive(Debug)]
pub enum PidFileError {
    /// The instance name cannot name a file.
    BadName(String),
    /// The directory could be written by another user.
    UnsafeDir(UnsafeDir),
    /// A live spliced of this user already runs under the name.
    Running {
        name: String,
        pid: i32,
        path: PathBuf,
    },
    /// The pid file names a process that is not a spliced of this user.
    NotOurs {
        name: String,
        pid: i32,
        path: PathBuf,
        why: String,
    },
    /// Reading or writing the file (or making its directory) failed.
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

impl fmt::Display for PidFileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PidFileError::BadName(name) => write!(
                f,
                "instance name '{name}' must be non-empty and without '/'"
            ),
            PidFileError::UnsafeDir(e) => e.fmt(f),
            PidFileError::Running { name, pid, path } => write!(
                f,
                "instance '{name}' is already running (pid {pid}, pid file {}); stop it first or give this one another --name",
                path.display()
            ),
            PidFileError::NotOurs {
                name,
                pid,
                path,
                why,
            } => write!(
                f,
                "the pid file of '{name}' ({}) names pid {pid}, which {why}: not signalling it",
                path.display()
            ),
            PidFileError::Io { op, path, source } => {
                write!(f, "cannot {op} {}: {source}", path.display())
            }
        }
    }
}

impl std::error::Error for PidFileError {}

impl From<DirError> for PidFileError {
    fn from(e: DirError) -> Self {
        match e {
            DirError::Unsafe(e) => PidFileError::UnsafeDir(e),
            DirError::Io(path, source) => PidFileError::Io {
                op: "create the pid directory",
                path,
                source,
            },
        }
    }
}

/// This process's pid file; removed on drop if it still names this process.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes this process's pid for instance `name`. Refuses while a live
    /// spliced of this user holds the name; a pid file naming a dead
    /// process, or one that is not such a spliced, is replaced (logged).
    pub fn create(name: &str) -> Result<PidFile, PidFileError> {
        PidFile::write(name, None)
    }

    /// Like [`create`](Self::create) for the new process of a live
    /// upgrade: the name held by `from`, the instance it takes over from,
    /// is taken, not refused. Any other live holder is still refused.
    pub fn take_over(name: &str, from: u32) -> Result<PidFile, PidFileError> {
        PidFile::write(name, Some(from as i32))
    }

    fn write(name: &str, from: Option<i32>) -> Result<PidFile, PidFileError> {
        if name.is_empty() || name.contains('/') {
            return Err(PidFileError::BadName(name.to_string()));
        }
        let dir = pid_dir();
        rundir::make(&dir)?;
        let path = path_in(&dir, name);
        let me = std::process::id() as i32;
        match read_in(&path) {
            Ok(pid) if pid == me => {}
            Ok(pid) if Some(pid) == from => {
                tracing::info!(path = %path.display(), pid, "taking over the pid file from pid {pid}");
            }
            Ok(pid) => match our_spliced(pid) {
                Ok(()) => {
                    return Err(PidFileError::Running {
                        name: name.to_string(),
                        pid,
                        path,
                    })
                }
                Err(why) => tracing::warn!(
                    path = %path.display(),
                    pid,
                    "replacing a stale pid file: pid {pid} {why}"
                ),
            },
            Err(ReadError::Missing(_)) => {}
            Err(ReadError::Garbled(text)) => tracing::warn!(
                path = %path.display(),
                "replacing a pid file that holds no pid: {text:?}"
            ),
            Err(ReadError::Io(source)) => {
                return Err(PidFileError::Io {
                    op: "read",
                    path,
                    source,
                })
            }
        }
        // Written beside and renamed, so a reader never sees half a pid;
        // `create_new` never follows a link left at the temporary name.
        let tmp = dir.join(format!(".spliced-{name}.pid.{me}"));
        let _ = fs::remove_file(&tmp);
        let written = fs::File::options()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)
            .and_then(|mut file| writeln!(file, "{me}"))
            .and_then(|()| fs::rename(&tmp, &path));
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(PidFileError::Io {
                op: "write",
                path,
                source,
            });
        }
        Ok(PidFile { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the file and its directory to `uid`/`gid`, so the process
    /// can still remove it (and the stats file beside it) after dropping
    /// root. The directory is spliced's own ($RUNTIME_DIRECTORY,
    /// /run/spliced or $XDG_RUNTIME_DIR/spliced), as systemd hands a
    /// service's RuntimeDirectory to its User. A link is changed itself,
    /// never what it points to.
    pub fn chown(&self, uid: nix::unistd::Uid, gid: nix::unistd::Gid) -> io::Result<()> {
        let ids = (Some(uid.as_raw()), Some(gid.as_raw()));
        if let Some(dir) = self.path.parent() {
            std::os::unix::fs::lchown(dir, ids.0, ids.1)?;
        }
        std::os::unix::fs::lchown(&self.path, ids.0, ids.1)
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let mine = read_in(&self.path).ok() == Some(std::process::id() as i32);
        if mine {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the pid file");
            }
        }
    }
}

/// The pid of the running spliced named `name`, from its pid file: the
/// directory checked, the pid checked to be a spliced of this user (any
/// user's, for root).
pub fn read_pid(name: &str) -> Result<i32, PidFileError> {
    let dir = pid_dir();
    let path = path_in(&dir, name);
    // A missing directory is a missing file: said as such below.
    if dir.exists() {
        rundir::check(&dir).map_err(PidFileError::UnsafeDir)?;
    }
    let pid = read_in(&path).map_err(|e| PidFileError::Io {
        op: "read",
        path: path.clone(),
        source: match e {
            ReadError::Missing(e) => e,
            ReadError::Garbled(text) => {
                io::Error::new(io::ErrorKind::InvalidData, format!("not a pid: {text:?}"))
            }
            ReadError::Io(e) => e,
        },
    })?;
    our_spliced(pid).map_err(|why| PidFileError::NotOurs {
        name: name.to_string(),
        pid,
        path,
        why,
    })?;
    Ok(pid)
}

enum ReadError {
    Missing(io::Error),
    Garbled(String),
    Io(io::Error),
}

fn read_in(path: &Path) -> Result<i32, ReadError> {
    let text = fs::read_to_string(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ReadError::Missing(e),
        _ => ReadError::Io(e),
    })?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| ReadError::Garbled(text.trim().to_string()))
}

/// `Ok` when `pid` is a live spliced of this user (of any user, for
/// root); otherwise what it is instead, e.g. `is /usr/bin/sleep, not
/// spliced`.
fn our_spliced(pid: i32) -> Result<(), String> {
    let proc_dir = PathBuf::from(format!("/proc/{pid}"));
    let status = match fs::read_to_string(proc_dir.join("status")) {
        Ok(s) => s,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err("is not running".into()),
        Err(e) => return Err(format!("cannot be inspected ({e})")),
    };
    if status
        .lines()
        .any(|l| l.starts_with("State:") && l.contains("zombie"))
    {
        return Err("is not running (a zombie)".into());
    }
    let me = nix::unistd::geteuid();
    let uid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .and_then(|euid| euid.parse::<u32>().ok());
    match uid {
        Some(uid) if uid == me.as_raw() || me.is_root() => {}
        Some(uid) => return Err(format!("belongs to uid {uid}, not to this user (uid {me})")),
        None => return Err("cannot be inspected (no Uid in its status)".into()),
    }
    let exe = fs::read_link(proc_dir.join("exe"))
        .map_err(|e| format!("cannot be inspected (its /proc/{pid}/exe: {e})"))?;
    if is_spliced(&exe) {
        Ok(())
    } else {
        Err(format!("is {}, not spliced", exe.display()))
    }
}

/// Whether `exe` (a /proc/PID/exe link) is this binary, or any binary
/// named `spliced` (an upgrade may have replaced or moved it).
fn is_spliced(exe: &Path) -> bool {
    // The kernel marks a replaced binary " (deleted)".
    let text = exe.to_string_lossy();
    let exe = Path::new(text.strip_suffix(" (deleted)").unwrap_or(&text));
    let ours = std::env::current_exe().ok();
    ours.as_deref() == Some(exe) || exe.file_name() == Some("spliced".as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_binary_and_binaries_named_spliced_are_spliced() {
        // The test binary is not named spliced, but is our own binary.
        assert!(our_spliced(std::process::id() as i32).is_ok());
        assert!(is_spliced(Path::new("/usr/local/bin/spliced (deleted)")));
        assert!(!is_spliced(Path::new("/usr/bin/sleep")));
        assert!(our_spliced(i32::MAX).is_err());
    }
}
