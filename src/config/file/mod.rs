//! The config file (TOML): read with toml's spanned document tree so that
//! every problem, not just the first, is reported with its key and line.
//!
//! Each table has one reader that walks its keys once: a known key is
//! converted (and checked), an unknown one is an error. Keys a listener can
//! inherit from `[defaults]` are read by one shared function, so both
//! places accept exactly the same spelling.

mod listener;
mod pool;
mod route;
mod values;

use std::fmt;
use std::path::Path;
use std::time::Duration;

use toml::de::DeTable;

use super::{Config, Mode};
use values::Cx;

/// One problem in a config file, at a line, naming the key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// 1-based; 0 when the problem has no place (an unreadable file).
    pub line: usize,
    pub key: String,
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            0 if self.key.is_empty() => f.write_str(&self.message),
            0 => write!(f, "{}: {}", self.key, self.message),
            n => write!(f, "line {n}: {}: {}", self.key, self.message),
        }
    }
}

/// A valid config file, and the keys it uses that `spliced run` cannot
/// carry out yet (each is refused by `run`, reported as a note by `check`).
#[derive(Clone, Debug)]
pub struct Loaded {
    pub config: Config,
    pub unsupported: Vec<Diagnostic>,
}

/// Settings given as command-line flags, which replace the file's
/// `[defaults]` (a listener that sets a key itself keeps its own).
#[derive(Clone, Debug, Default)]
pub struct FlagDefaults {
    pub mode: Option<Mode>,
    pub idle_timeout: Option<Option<Duration>>,
    pub fin_timeout: Option<Option<Duration>>,
    pub connect_timeout: Option<Option<Duration>>,
}

/// Reads and validates the file at `path`.
pub fn load(path: &Path, flags: &FlagDefaults) -> Result<Loaded, Vec<Diagnostic>> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        vec![Diagnostic {
            line: 0,
            key: String::new(),
            message: format!("cannot read the config file: {e}"),
        }]
    })?;
    parse_str(&text, flags)
}

/// Parses and validates a config file's text.
pub fn parse_str(text: &str, flags: &FlagDefaults) -> Result<Loaded, Vec<Diagnostic>> {
    let mut cx = Cx::new(text);
    let root = match DeTable::parse(text) {
        Ok(root) => root,
        Err(e) => {
            let line = e.span().map_or(0, |s| cx.line(&s));
            let message = e.message().trim().replace('\n', "; ");
            return Err(vec![Diagnostic {
                line,
                key: "(syntax)".into(),
                message,
            }]);
        }
    };
    let config = listener::read_root(&mut cx, root.get_ref(), flags);
    match config {
        Some(config) if cx.errors.is_empty() => Ok(Loaded {
            config,
            unsupported: cx.unsupported,
        }),
        _ => {
            cx.errors.sort_by_key(|d| d.line);
            Err(cx.errors)
        }
    }
}
