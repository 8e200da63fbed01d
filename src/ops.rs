//! Settings of the operations surface: the admin endpoint, the stats file
//! and progress lines. None of them touches the data path.

use std::net::SocketAddr;
use std::time::Duration;

/// Most connections the admin endpoint holds at once. Past it, a new
/// connection takes the place of the one that has been quiet longest.
pub const ADMIN_MAX_CONNECTIONS: usize = 64;

/// What a running instance exposes about itself. All off by default in the
/// library; `spliced run` names its instance `spliced` unless told.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ops {
    /// Serve `/metrics`, `/healthz` and `/livez` over HTTP here.
    pub admin: Option<SocketAddr>,
    /// Keep the counters in the stats file of this instance name (see
    /// [`crate::shm::stats_path`]); `None` keeps them in anonymous memory.
    pub instance: Option<String>,
    /// The group that may read the stats file (mode 0640); `None` leaves
    /// it to its owner alone (mode 0600).
    pub stats_group: Option<StatsGroup>,
    /// Log a progress line for every relay alive longer than this, once per
    /// interval.
    pub log_interval: Option<Duration>,
}

/// A group, by the name it was given and the id it had when looked up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatsGroup {
    pub name: String,
    pub gid: u32,
}

/// Why a `stats-group` could not be had.
#[derive(Debug)]
pub enum GroupError {
    /// The group database has no such group.
    Unknown(String),
    /// The group database could not be read.
    Lookup { name: String, source: nix::Error },
}

impl std::fmt::Display for GroupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            GroupError::Unknown(name) => write!(f, "no group named '{name}' on this system"),
            GroupError::Lookup { name, source } => {
                write!(f, "cannot look group '{name}' up: {source}")
            }
        }
    }
}

impl std::error::Error for GroupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            GroupError::Lookup { source, .. } => Some(source),
            GroupError::Unknown(_) => None,
        }
    }
}

impl StatsGroup {
    /// Looks `name` up in the group database.
    pub fn lookup(name: &str) -> Result<StatsGroup, GroupError> {
        match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Ok(StatsGroup {
                name: name.to_string(),
                gid: group.gid.as_raw(),
            }),
            Ok(None) => Err(GroupError::Unknown(name.into())),
            Err(source) => Err(GroupError::Lookup {
                name: name.into(),
                source,
            }),
        }
    }
}

impl Ops {
    /// The file descriptors the admin endpoint may hold at most, kept out of
    /// the relay budget: its connections, its listener, its event loop and
    /// waker, and the one connection being accepted while every slot is
    /// taken. None without an admin endpoint.
    pub fn admin_fds(&self) -> u64 {
        match self.admin {
            Some(_) => ADMIN_MAX_CONNECTIONS as u64 + 4,
            None => 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{Config, Mode};

    #[test]
    fn the_admin_endpoint_fds_come_out_of_the_relay_cap() {
        let mut c = Config::single("127.0.0.1:0".parse().unwrap(), vec![], Mode::Splice);
        c.workers = 1;
        let used = |c: &Config| {
            let b = crate::runtime::fd_budget(c, 20_000);
            2 * b.relays as u64 + b.pipe_fds as u64
        };
        let without = used(&c);
        c.ops.admin = Some("127.0.0.1:0".parse().unwrap());
        let with = used(&c);
        // Relays' sockets and pipes give up the admin's fds (the pipes'
        // share is rounded down to whole pipes).
        assert!(without - with >= c.ops.admin_fds() - 1, "{without} {with}");
        assert!(without - with <= c.ops.admin_fds() + 1, "{without} {with}");
        assert_eq!(c.ops.admin_fds(), 68);
    }
}
