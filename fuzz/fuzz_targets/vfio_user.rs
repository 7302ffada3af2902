#![no_main]
//! libFuzzer entry of the `vfio_user` target (fuzz_targets::vfio_user).

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::vfio_user(data));
