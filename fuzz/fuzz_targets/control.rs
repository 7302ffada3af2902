#![no_main]
//! libFuzzer entry of the `control` target (fuzz_targets::control).

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::control(data));
