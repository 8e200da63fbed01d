//! `--user NAME`: give up root once the listeners are bound, so only the
//! start needs it (ports below 1024, the pid file under /run).

use nix::unistd::{self, Gid, Uid, User};

/// Switches the whole process (every thread: glibc applies set*id to all
/// of them) to `name`'s uid, primary gid and no supplementary groups.
/// Returns the new ids. Refuses unless running as root, and checks that
/// root cannot be regained. `as_root` runs just before the switch, with the
/// ids to come: the last chance to hand files over to the user.
pub fn drop_privileges(
    name: &str,
    as_root: impl FnOnce(Uid, Gid),
) -> Result<(Uid, Gid), PrivilegeError> {
    let fail = |step| PrivilegeError {
        user: name.to_string(),
        step,
    };
    let euid = unistd::geteuid();
    if !euid.is_root() {
        return Err(fail(Step::NotRoot(euid)));
    }
    let user = match User::from_name(name) {
        Ok(Some(user)) => user,
        Ok(None) => return Err(fail(Step::NoSuchUser)),
        Err(e) => return Err(fail(Step::Lookup(e))),
    };
    as_root(user.uid, user.gid);
    // Groups first: once the uid is not root, they cannot be changed.
    unistd::setgroups(&[user.gid]).map_err(|e| fail(Step::SetGroups(e)))?;
    unistd::setgid(user.gid).map_err(|e| fail(Step::SetGid(user.gid, e)))?;
    unistd::setuid(user.uid).map_err(|e| fail(Step::SetUid(user.uid, e)))?;
    if !user.uid.is_root() && unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(fail(Step::RootRegained));
    }
    Ok((user.uid, user.gid))
}

/// Why `--user` could not be carried out: the user asked for, and the step
/// that failed.
#[derive(Debug)]
pub struct PrivilegeError {
    pub user: String,
    pub step: Step,
}

/// The step of a privilege drop that failed.
#[derive(Debug)]
pub enum Step {
    /// The process does not run as root (its effective uid).
    NotRoot(Uid),
    NoSuchUser,
    /// The user database could not be read.
    Lookup(nix::Error),
    SetGroups(nix::Error),
    SetGid(Gid, nix::Error),
    SetUid(Uid, nix::Error),
    /// After setuid, setuid(0) still succeeded.
    RootRegained,
}

impl std::fmt::Display for PrivilegeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = &self.user;
        match &self.step {
            Step::NotRoot(euid) => write!(
                f,
                "--user {name}: dropping privileges needs root, and this process runs as uid {euid}; start it as root or leave --user out"
            ),
            Step::NoSuchUser => write!(f, "--user {name}: no such user"),
            Step::Lookup(e) => write!(f, "--user {name}: cannot look the user up: {e}"),
            Step::SetGroups(e) => write!(f, "--user {name}: setgroups failed: {e}"),
            Step::SetGid(gid, e) => write!(f, "--user {name}: setgid({gid}) failed: {e}"),
            Step::SetUid(uid, e) => write!(f, "--user {name}: setuid({uid}) failed: {e}"),
            Step::RootRegained => write!(f, "--user {name}: root could be regained after setuid"),
        }
    }
}

impl std::error::Error for PrivilegeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.step {
            Step::Lookup(e) | Step::SetGroups(e) | Step::SetGid(_, e) | Step::SetUid(_, e) => {
                Some(e)
            }
            Step::NotRoot(_) | Step::NoSuchUser | Step::RootRegained => None,
        }
    }
}
