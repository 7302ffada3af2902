#![no_main]
//! libFuzzer entry of the `vfio_user_client` target (fuzz_targets::vfio_user_client).

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_targets::vfio_user_client(data));
