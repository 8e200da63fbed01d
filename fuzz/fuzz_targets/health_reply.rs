//! The health probes on arbitrary server bytes, split arbitrarily.
//! The invariants live in spliced::fuzzing::health_reply; a panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    spliced::fuzzing::health_reply(data);
});
