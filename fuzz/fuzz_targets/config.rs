//! The duration and size parsers against reference implementations.
//! The invariants live in spliced::fuzzing::config_text; a panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    spliced::fuzzing::config_text(data);
});
