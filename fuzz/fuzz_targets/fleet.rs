#![no_main]
//! `cargo +nightly fuzz run fleet`: see mxgate::fuzzing::fleet.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mxgate::fuzzing::fleet(data));
