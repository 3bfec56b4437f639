#![no_main]
//! `cargo +nightly fuzz run dns`: see mxgate::fuzzing::dns.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mxgate::fuzzing::dns(data));
