#![no_main]
//! `cargo +nightly fuzz run proxy`: see mxgate::fuzzing::proxy.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mxgate::fuzzing::proxy(data));
