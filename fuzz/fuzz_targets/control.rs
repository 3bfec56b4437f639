#![no_main]
//! `cargo +nightly fuzz run control`: see mxgate::fuzzing::control.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mxgate::fuzzing::control(data));
