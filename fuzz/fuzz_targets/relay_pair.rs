//! Both directions through pump_pair, with the relay's Activity deadlines.
//! The invariants live in spliced::fuzzing::pair_script; a panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    spliced::fuzzing::pair_script(data);
});
