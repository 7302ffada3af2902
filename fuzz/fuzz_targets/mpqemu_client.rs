#![no_main]
//! libFuzzer entry of the `mpqemu_client` target (fuzz_targets::mpqemu_client).

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::mpqemu_client(data));
