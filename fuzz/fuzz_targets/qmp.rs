#![no_main]
//! libFuzzer entry of the `qmp` target (fuzz_targets::qmp).

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::qmp(data));
