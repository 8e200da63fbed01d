//! What a valid config still needs from the host: password files the
//! process can read, and server names that resolve. `spliced run` reads
//! the password files at start and at every reload ([`Config::load_secrets`]);
//! `spliced check` tests both ahead ([`Config::preflight`]), as the user
//! `run --user` will be by the time of a reload.

use std::net::ToSocketAddrs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use super::{Config, ConfigError, Secret};

/// The user `spliced run --user` switches to: the password files must be
/// readable with these ids, since a reload reads them after the switch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    /// Its primary group, which `--user` keeps as its only group.
    pub gid: u32,
}

impl RunAs {
    /// Whether this user can open and read `path` (see `sys::access`); the
    /// caller must be root.
    pub fn can_read(&self, path: &Path) -> std::io::Result<()> {
        crate::sys::access::readable_as(path, self.uid, self.gid)
    }

    /// How an error says who could not read a file.
    pub fn describe(&self) -> String {
        format!(
            "as user {} (uid {}, gid {}), as reloads under 'spliced run --user {}' must",
            self.name, self.uid, self.gid, self.name
        )
    }
}

/// What [`Config::preflight`] found: errors `run` would stop on, and
/// warnings about what it would run with. One line each.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Preflight {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

impl Config {
    /// Reads every `password-file`, so a missing or unreadable file stops
    /// the start (or the reload), not the first probe. The password is the
    /// file's first line. A file with group or other access is read, with
    /// a warning.
    pub fn load_secrets(&mut self) -> Result<(), ConfigError> {
        let named = self.pools.iter_mut().map(|p| {
            let owner = format!("pool '{}'", p.name);
            (owner, "health.password-file", &mut p.config)
        });
        let own = self.listeners.iter_mut().flat_map(|l| {
            let owner = format!("listener '{}'", l.name);
            let key = if l.routes.is_empty() {
                "pool.health.password-file"
            } else {
                "route pool's health.password-file"
            };
            l.pools_mut()
                .into_iter()
                .map(move |p| (owner.clone(), key, p))
        });
        for (owner, key, pool) in named.chain(own).collect::<Vec<_>>() {
            let Some(path) = pool.health.password_file.clone() else {
                continue;
            };
            let password = read_password(&owner, key, &path).map_err(ConfigError)?;
            if let Some(warning) = loose_mode(Path::new(&path)) {
                tracing::warn!(owner = %owner, path = %path, "{}", password_file_line(&owner, key, &path, &warning));
            }
            pool.health.password = Some(Secret(password));
        }
        Ok(())
    }

    /// Tests what `run` will need beyond a valid file. Errors: a password
    /// file this process cannot read, or (`run_as`, when this process is
    /// root) that user cannot. Warnings: a password file with group or
    /// other access, a server name that does not resolve now (`run`
    /// starts without it and retries).
    ///
    /// `run_as` needs root, or to be this process's own user: the caller
    /// checks that.
    pub fn preflight(&self, run_as: Option<&RunAs>) -> Preflight {
        let mut out = Preflight::default();
        let named = self.pools.iter().map(|p| {
            (
                format!("pool '{}'", p.name),
                "health.password-file",
                &p.config,
            )
        });
        let own = self
            .listeners
            .iter()
            .filter(|l| l.routes.is_empty())
            .map(|l| {
                let owner = format!("listener '{}'", l.name);
                (owner, "pool.health.password-file", &l.pool)
            });
        for (owner, key, pool) in named.chain(own) {
            if let Some(path) = pool.health.password_file.as_deref() {
                check_password_file(&owner, key, path, run_as, &mut out);
            }
            for s in &pool.servers {
                if s.ip().is_some() {
                    continue;
                }
                let Ok((host, port)) = s.host_port() else {
                    continue;
                };
                let problem = match (host, port).to_socket_addrs().map(|mut a| a.next()) {
                    Ok(Some(_)) => continue,
                    Ok(None) => "it resolves to no address".to_string(),
                    Err(e) => e.to_string(),
                };
                out.warnings.push(format!(
                    "{owner}: server {} does not resolve now ({problem}); 'spliced run' starts without it and keeps trying until it resolves",
                    s.address
                ));
            }
        }
        out
    }
}

fn check_password_file(
    owner: &str,
    key: &str,
    path: &str,
    run_as: Option<&RunAs>,
    out: &mut Preflight,
) {
    // As this process: what the start reads (run reads the file before
    // it switches users), and the first line must be text.
    if let Err(e) = read_password(owner, key, path) {
        out.errors.push(e);
        return;
    }
    // As the user a reload will read it as. The kernel is asked in a
    // child process with exactly those ids (see sys::access), so ACLs,
    // directory permissions and the like count as they will.
    if let Some(u) = run_as.filter(|u| u.uid != nix::unistd::geteuid().as_raw()) {
        if let Err(e) = u.can_read(Path::new(path)) {
            out.errors.push(password_file_line(
                owner,
                key,
                path,
                &format!("cannot read it {}: {e}", u.describe()),
            ));
        }
    }
    if let Some(warning) = loose_mode(Path::new(path)) {
        out.warnings
            .push(password_file_line(owner, key, path, &warning));
    }
}

/// The first line of the password file, or the one-line error.
fn read_password(owner: &str, key: &str, path: &str) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| password_file_line(owner, key, path, &format!("cannot read it: {e}")))?;
    Ok(text.lines().next().unwrap_or("").to_string())
}

fn password_file_line(owner: &str, key: &str, path: &str, problem: &str) -> String {
    format!("{owner}: {key} {path}: {problem}")
}

/// A warning when the file has any group or other permission, as libpq
/// gives for a `.pgpass` (which it then ignores; spliced uses it). A file
/// root owns may also be read by its group, as PostgreSQL allows for its
/// key files: that is how a Kubernetes Secret reaches a non-root process
/// (root, the pod's `fsGroup`, mode 0440).
fn loose_mode(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    let mode = meta.mode() & 0o7777;
    let (forbidden, most) = if meta.uid() == 0 {
        (0o037, "u=rw,g=r (0640) for a file root owns")
    } else {
        (0o077, "u=rw (0600)")
    };
    (mode & forbidden != 0).then(|| {
        format!("has group or other access (mode {mode:04o}); permissions should be {most} or less")
    })
}
