#![no_main]
//! libFuzzer entry of the `mpqemu` target (fuzz_targets::mpqemu).

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::mpqemu(data));
