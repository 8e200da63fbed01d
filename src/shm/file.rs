//! Where an instance's stats file lives, and how it is made: readable by
//! its owner alone (0600), or also by one group (0640, `stats-group`).

use std::fs::{self, File, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use memmap2::{MmapOptions, MmapRaw};

use super::view::{Liveness, StatsFile};
use crate::ops::StatsGroup;

/// Where instance `name`'s stats file lives: under `$RUNTIME_DIRECTORY`
/// (set by systemd's `RuntimeDirectory=`), else `$XDG_RUNTIME_DIR/spliced`,
/// else `/run/spliced`.
pub fn stats_path(name: &str) -> PathBuf {
    let dir = std::env::var_os("RUNTIME_DIRECTORY")
        .and_then(|v| {
            // systemd joins several directories with ':'; the first is ours.
            let first = v.to_string_lossy().split(':').next()?.to_string();
            (!first.is_empty()).then(|| PathBuf::from(first))
        })
        .or_else(|| {
            std::env::var_os("XDG_RUNTIME_DIR")
                .filter(|v| !v.is_empty())
                .map(|d| PathBuf::from(d).join("spliced"))
        })
        .unwrap_or_else(|| PathBuf::from("/run/spliced"));
    dir.join(format!("{name}.stats"))
}

/// An instance name [`check_instance_name`] refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceNameError(pub String);

impl std::fmt::Display for InstanceNameError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "instance name '{}' must be 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'",
            self.0
        )
    }
}

impl std::error::Error for InstanceNameError {}

/// Checks an instance name: 1 to 64 of `A-Z a-z 0-9 . _ -`, not starting
/// with a dot (it names a file).
pub fn check_instance_name(name: &str) -> Result<(), InstanceNameError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(InstanceNameError(name.into()))
    }
}

/// Why the stats file was not made.
#[derive(Debug)]
pub(crate) enum CreateError {
    /// The file could not be made or mapped; the instance runs without it.
    File(io::Error),
    /// It could not be given to the `stats-group`: a start error, since
    /// running on would hide the counters from the reader asked for.
    Group(StatsGroup, io::Error),
}

/// The pid of the instance a live upgrade takes over from: its stats file
/// is replaced although it still runs (0: none).
static TAKES_OVER_FROM: AtomicU32 = AtomicU32::new(0);

/// Lets this process replace the stats file of `pid`, the running
/// instance it upgrades (`crate::upgrade`).
pub fn take_over_from(pid: u32) {
    TAKES_OVER_FROM.store(pid, Ordering::Relaxed);
}

/// Builds the file under a temporary name and renames it into place,
/// refusing when a live process owns the current one. The file is 0600,
/// or 0640 and given to `group`.
pub(crate) fn create_file(
    path: &Path,
    len: usize,
    group: Option<&StatsGroup>,
) -> Result<MmapRaw, CreateError> {
    if let Ok(existing) = StatsFile::open(path) {
        let ours = [std::process::id(), TAKES_OVER_FROM.load(Ordering::Relaxed)];
        if existing.liveness() == Liveness::Running && !ours.contains(&existing.pid()) {
            return Err(CreateError::File(io::Error::new(
                io::ErrorKind::AddrInUse,
                format!(
                    "instance name in use by running pid {}; give this one another name",
                    existing.pid()
                ),
            )));
        }
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(CreateError::File)?;
    }
    let tmp = path.with_extension(format!("stats.{}.tmp", std::process::id()));
    // A leftover of a dead process with our pid; `create_new` then never
    // follows a link someone put in its place.
    let _ = fs::remove_file(&tmp);
    let file = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(CreateError::File)?;
    let made = shape(&file, len, group).and_then(|()| {
        let map = MmapOptions::new()
            .map_raw(&file)
            .map_err(CreateError::File)?;
        fs::rename(&tmp, path).map_err(CreateError::File)?;
        Ok(map)
    });
    if made.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    made
}

/// Sets the new file's group, mode (whatever the umask) and length.
fn shape(file: &File, len: usize, group: Option<&StatsGroup>) -> Result<(), CreateError> {
    let mode = match group {
        Some(g) => {
            std::os::unix::fs::fchown(file, None, Some(g.gid))
                .map_err(|e| CreateError::Group(g.clone(), e))?;
            0o640
        }
        None => 0o600,
    };
    file.set_permissions(Permissions::from_mode(mode))
        .and_then(|()| file.set_len(len as u64))
        .map_err(CreateError::File)
}
