//! The PROXY protocol v1/v2 parser on raw bytes.
//! The invariants live in spliced::fuzzing::proxy_header; a panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    spliced::fuzzing::proxy_header(data);
});
