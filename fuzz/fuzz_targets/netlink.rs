#![no_main]
//! `cargo +nightly fuzz run netlink`: see mxgate::fuzzing::netlink.
libfuzzer_sys::fuzz_target!(|data: &[u8]| mxgate::fuzzing::netlink(data));
