//! The postgres probe of a build without the `postgres-checks` feature
//! (its conversation needs postgres-protocol). A config that asks for one
//! is refused at start and reload, so only a probe built by hand meets
//! this: it reports a check error saying why, and never a verdict on the
//! server.

use super::lag::Position;
use super::{CheckSpec, Step, Verdict};

/// Why a postgres check cannot run in this build.
pub const UNBUILT: &str = "this build has no postgres checks (cargo feature `postgres-checks`)";

pub(super) struct Postgres;

impl Postgres {
    pub(super) fn new(_: &CheckSpec) -> Self {
        Postgres
    }

    pub(super) fn start(&mut self) -> Step {
        Step::Done(Verdict::check_error(UNBUILT))
    }

    pub(super) fn phase(&self) -> &'static str {
        "connecting"
    }

    pub(super) fn timeline(&self) -> Option<u32> {
        None
    }

    pub(super) fn position(&self) -> Option<Position> {
        None
    }

    pub(super) fn goodbye(&self) -> &'static [u8] {
        b""
    }

    pub(super) fn on_bytes(&mut self, _: &[u8]) -> Step {
        Step::Done(Verdict::check_error(UNBUILT))
    }
}
