//! The TLS ClientHello parser on arbitrary client bytes, and on every
//! prefix of them. The invariants live in spliced::fuzzing::client_hello;
//! a panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    spliced::fuzzing::client_hello(data);
});
