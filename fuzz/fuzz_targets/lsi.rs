#![no_main]
//! libFuzzer entry of the `lsi` target (fuzz_targets::lsi).

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::lsi(data));
