#![no_main]
//! libFuzzer entry of the `lsi_state` target (fuzz_targets::lsi_state).

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::lsi_state(data));
