#![no_main]
//! `cargo +nightly fuzz run upstream`: see mxgate::fuzzing::upstream.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mxgate::fuzzing::upstream(data));
