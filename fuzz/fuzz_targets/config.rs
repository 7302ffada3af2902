#![no_main]
//! libFuzzer entry of the `config` target (fuzz_targets::config).

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::config(data));
