//! One relay direction (the pure state machine) driven by a scripted engine.
//! The invariants live in spliced::fuzzing::direction_script; a panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    spliced::fuzzing::direction_script(data);
});
