//! `spliced check`: the config file and what `spliced run` needs of the
//! host, tested without starting anything.

use std::process::ExitCode;

use spliced::config::{self, FlagDefaults};

use super::CheckArgs;

/// `spliced check`: the effective config on stdout and exit 0, or every
/// problem on stderr (one a line) and exit 1. Beyond the file it tests what
/// `run` needs of the host: every password file readable (as `--user` too,
/// and the config file itself as that user, since reloads re-read it),
/// and warns of one with group or other access and of a server name that
/// does not resolve now. Settings `spliced run` cannot carry out yet are
/// notes: the file is valid, but `run` refuses it.
pub(super) fn check(args: CheckArgs) -> ExitCode {
    let path = &args.config;
    let loaded = match config::load(path, &FlagDefaults::default()) {
        Ok(loaded) => loaded,
        Err(diagnostics) => {
            for d in &diagnostics {
                eprintln!("spliced: error: {}: {d}", path.display());
            }
            return ExitCode::from(1);
        }
    };
    let run_as = match args.user.as_deref().map(run_as).transpose() {
        Ok(run_as) => run_as,
        Err(e) => {
            eprintln!("spliced: error: {e}");
            return ExitCode::from(1);
        }
    };
    let mut found = loaded.config.preflight(run_as.as_ref());
    // A reload re-reads the config file, as the user by then.
    if let Some(u) = run_as
        .as_ref()
        .filter(|u| u.uid != nix::unistd::geteuid().as_raw())
    {
        if let Err(e) = u.can_read(path) {
            found.errors.insert(
                0,
                format!("cannot read the config file {}: {e}", u.describe()),
            );
        }
    }
    for w in &found.warnings {
        eprintln!("spliced: warning: {}: {w}", path.display());
    }
    if !found.errors.is_empty() {
        for e in &found.errors {
            eprintln!("spliced: error: {}: {e}", path.display());
        }
        return ExitCode::from(1);
    }
    print!("{}", config::effective_toml(&loaded.config));
    for d in &loaded.unsupported {
        eprintln!(
            "spliced: note: {}: {d}; 'spliced run' refuses this file until it is",
            path.display()
        );
    }
    ExitCode::SUCCESS
}

/// `check --user NAME`: the ids `run --user NAME` switches to (the user's
/// uid and primary group). Testing as them needs root, unless this process
/// already is that user.
fn run_as(name: &str) -> Result<config::RunAs, String> {
    let user = match nix::unistd::User::from_name(name) {
        Ok(Some(user)) => user,
        Ok(None) => return Err(format!("--user {name}: no such user")),
        Err(e) => return Err(format!("--user {name}: cannot look the user up: {e}")),
    };
    let euid = nix::unistd::geteuid();
    if !euid.is_root() && euid != user.uid {
        return Err(format!(
            "--user {name}: testing files as {name} needs root (as 'spliced run --user' does); this process runs as uid {euid}"
        ));
    }
    Ok(config::RunAs {
        name: name.to_string(),
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    })
}
