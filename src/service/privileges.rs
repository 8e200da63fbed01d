//! `--user NAME`: give up root once the listeners are bound, so only the
//! start needs it (ports below 1024, the pid file under /run).

use nix::unistd::{self, Gid, Uid, User};

/// Switches the whole process (every thread: glibc applies set*id to all
/// of them) to `name`'s uid, primary gid and no supplementary groups.
/// Returns the new ids. Refuses unless running as root, and checks that
/// root cannot be regained. `as_root` runs just before the switch, with the
/// ids to come: the last chance to hand files over to the user.
pub fn drop_privileges(name: &str, as_root: impl FnOnce(Uid, Gid)) -> Result<(Uid, Gid), String> {
    let euid = unistd::geteuid();
    if !euid.is_root() {
        return Err(format!(
            "--user {name}: dropping privileges needs root, and this process runs as uid {euid}; start it as root or leave --user out"
        ));
    }
    let user = match User::from_name(name) {
        Ok(Some(user)) => user,
        Ok(None) => return Err(format!("--user {name}: no such user")),
        Err(e) => return Err(format!("--user {name}: cannot look the user up: {e}")),
    };
    as_root(user.uid, user.gid);
    // Groups first: once the uid is not root, they cannot be changed.
    unistd::setgroups(&[user.gid]).map_err(|e| format!("--user {name}: setgroups failed: {e}"))?;
    unistd::setgid(user.gid)
        .map_err(|e| format!("--user {name}: setgid({}) failed: {e}", user.gid))?;
    unistd::setuid(user.uid)
        .map_err(|e| format!("--user {name}: setuid({}) failed: {e}", user.uid))?;
    if !user.uid.is_root() && unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(format!(
            "--user {name}: root could be regained after setuid"
        ));
    }
    Ok((user.uid, user.gid))
}
