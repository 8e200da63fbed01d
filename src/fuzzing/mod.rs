//! Entry points for fuzz targets (cargo-fuzz) and property tests: drives the
//! pure state machines with scripted engines. Not a stable API.
//!
//! Each `pub fn` takes arbitrary bytes, decodes them into a script and panics
//! as soon as an invariant breaks: a panic is a fuzz finding. The drivers and
//! the scripted [`Engine`] are also what the proptest properties in
//! `relay::props` run. docs/reliability/fuzzing.md lists every invariant.
//!
//! The scripted engine answers each `fill`/`drain` from a queue of [`Step`]s
//! (then from a default answer) and keeps its own books: bytes in and out,
//! bytes buffered, whether it holds a buffer, how often FIN was forwarded, and
//! whether the direction owes it a readiness edge. The checks compare those
//! books with what the [`Direction`](crate::relay::Direction) believes.

mod checks;
mod config;
mod decode;
mod direction;
mod engine;
mod health;
mod hello;
mod pair;
mod proxy;
#[cfg(test)]
mod tests;

// The drivers and the scripted engine, at the paths `relay::props` uses.
#[cfg_attr(not(test), allow(unused_imports))]
pub(crate) use self::{
    checks::check_books,
    direction::{Action, DirSetup},
    engine::{Discard, Engine, Step, FAIL_KINDS},
    pair::{check_expiry, PairAction, PairSetup, CUT_REASONS},
};
pub(crate) use direction::run_direction;
pub use health::{health_reply, health_verdict};
pub use hello::client_hello;
#[cfg(test)]
pub(crate) use hello::tls_records;
pub(crate) use pair::run_pair;
pub use proxy::proxy_header;

use config::{
    check_duration_number, check_duration_text, check_mode_text, check_size_number, check_size_text,
};
use decode::{decode_direction, decode_pair};

/// Fuzz target `direction`: one [`Direction`](crate::relay::Direction) driven by a scripted engine.
pub fn direction_script(data: &[u8]) {
    let (setup, actions) = decode_direction(data);
    run_direction(&setup, &actions);
}

/// Fuzz target `relay_pair`: both directions through the relay core, with the
/// relay's [`Activity`](crate::relay::Activity) bookkeeping and a clock.
pub fn pair_script(data: &[u8]) {
    let (setup, actions) = decode_pair(data);
    run_pair(&setup, &actions);
}

/// Fuzz target `config`: the duration and size parsers against reference
/// implementations, and their round trips.
pub fn config_text(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    check_duration_text(&text);
    check_size_text(&text);
    check_mode_text(&text);
    if data.len() >= 9 {
        let mut n = [0u8; 8];
        n.copy_from_slice(&data[..8]);
        let n = u64::from_le_bytes(n);
        // Small numbers matter more than huge ones: shift some of them down.
        let n = n >> (data[8] % 64);
        check_duration_number(n);
        check_size_number(n);
    }
}
