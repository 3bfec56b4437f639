#![no_main]
//! `cargo +nightly fuzz run config`: see mxgate::fuzzing::config.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mxgate::fuzzing::config(data));
