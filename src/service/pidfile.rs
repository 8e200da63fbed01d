//! `spliced-NAME.pid`: written at start, removed at exit, read by
//! `spliced reload --name NAME` to find the instance to signal.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

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

fn path_for(name: &str) -> PathBuf {
    pid_dir().join(format!("spliced-{name}.pid"))
}

/// This process's pid file; removed on drop if it still names this process.
#[derive(Debug)]
pub struct PidFile {
    path: PathBuf,
}

impl PidFile {
    /// Writes this process's pid for instance `name`. Refuses while another
    /// live process holds the name; a pid file left by a dead one is
    /// replaced.
    pub fn create(name: &str) -> io::Result<PidFile> {
        if name.is_empty() || name.contains('/') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("instance name '{name}' must be non-empty and without '/'"),
            ));
        }
        let path = path_for(name);
        let dir = path.parent().unwrap_or(Path::new("/")).to_path_buf();
        fs::create_dir_all(&dir)?;
        if let Ok(pid) = read_pid(name) {
            let me = std::process::id() as i32;
            if pid != me && alive(pid) {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!(
                        "another process (pid {pid}) runs as instance '{name}' ({}); give this one another --name",
                        path.display()
                    ),
                ));
            }
        }
        // Written beside and renamed, so a reader never sees half a pid.
        let tmp = dir.join(format!(".spliced-{name}.pid.{}", std::process::id()));
        let mut file = fs::File::create(&tmp)?;
        writeln!(file, "{}", std::process::id())?;
        drop(file);
        fs::rename(&tmp, &path)?;
        Ok(PidFile { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Gives the file and its directory to `uid`/`gid`, so the process
    /// can still remove it (and the stats file beside it) after dropping
    /// root. The directory is spliced's own ($RUNTIME_DIRECTORY,
    /// /run/spliced or $XDG_RUNTIME_DIR/spliced), as systemd hands a
    /// service's RuntimeDirectory to its User.
    pub fn chown(&self, uid: nix::unistd::Uid, gid: nix::unistd::Gid) -> io::Result<()> {
        if let Some(dir) = self.path.parent() {
            nix::unistd::chown(dir, Some(uid), Some(gid))?;
        }
        nix::unistd::chown(&self.path, Some(uid), Some(gid))?;
        Ok(())
    }
}

impl Drop for PidFile {
    fn drop(&mut self) {
        let mine = fs::read_to_string(&self.path)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok())
            == Some(std::process::id());
        if mine {
            if let Err(e) = fs::remove_file(&self.path) {
                tracing::warn!(path = %self.path.display(), error = %e, "cannot remove the pid file");
            }
        }
    }
}

/// The pid in instance `name`'s pid file.
pub fn read_pid(name: &str) -> io::Result<i32> {
    let path = path_for(name);
    let text = fs::read_to_string(&path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    text.trim()
        .parse::<i32>()
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{}: not a pid: {:?}", path.display(), text.trim()),
            )
        })
}

/// Whether a process with this pid exists (signal 0 delivers nothing).
fn alive(pid: i32) -> bool {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) {
        Ok(()) => true,
        // It exists but belongs to someone else.
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}
