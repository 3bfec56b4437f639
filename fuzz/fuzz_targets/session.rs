#![no_main]
//! `cargo +nightly fuzz run session`: see mxgate::fuzzing::session.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mxgate::fuzzing::session(data));
