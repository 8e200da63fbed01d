//! Subcommands of the `spliced` binary that live in the library so tests
//! can drive them (feature `cli`).

pub mod log;
pub mod logfmt;
pub mod stats;
pub mod time;
