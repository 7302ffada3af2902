//! A device that panics on a BAR read, loaded from its `.so`: the panic is
//! contained, the device is marked failed and reads as all-ones, and the
//! test process (standing in for remote-host) keeps running.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use plugin_api::harness::{plugin_library_path, PluginSource, TestBench};
use plugin_api::DeviceErrorKind;

#[test]
fn panic_in_bar_read_marks_device_failed_without_killing_the_process() {
    let path = plugin_library_path("faulty-plugin").unwrap();
    let mut tb = TestBench::new(PluginSource::Library(path), Some("panics-on-read"), "").unwrap();
    tb.map_bars();
    let base = tb.bar_address(0);
    tb.mmio_write(base, 4, 1);
    assert_eq!(tb.failure(), None);
    assert_eq!(tb.mmio_read(base + 0x10, 4), 0xffff_ffff);
    let failure = tb.failure().expect("device marked failed");
    assert!(failure.contains("read at 0x10 went wrong"), "{failure}");
    // Later calls are refused, not run.
    let mut buf = [0u8; 4];
    let err = tb.function().bar_read(0, 0, &mut buf).unwrap_err();
    assert_eq!(err.kind, DeviceErrorKind::Failed);
    let err = tb.function().bar_write(0, 0, &[1, 2, 3, 4]).unwrap_err();
    assert_eq!(err.kind, DeviceErrorKind::Failed);
}

#[test]
fn failing_and_panicking_constructors_return_messages() {
    let path = plugin_library_path("faulty-plugin").unwrap();
    let err = TestBench::new(PluginSource::Library(path.clone()), Some("fails"), "")
        .err()
        .unwrap();
    assert!(err.ends_with("disk on fire"), "{err}");
    let err = TestBench::new(PluginSource::Library(path.clone()), Some("panics"), "")
        .err()
        .unwrap();
    assert!(
        err.contains("constructor panicked: constructor exploded"),
        "{err}"
    );
    let err = TestBench::new(PluginSource::Library(path), None, "")
        .err()
        .unwrap();
    assert!(err.contains("several device kinds"), "{err}");
}

#[test]
fn incompatible_abi_is_refused_with_both_versions() {
    let path = plugin_library_path("incompatible-plugin").unwrap();
    let err = TestBench::new(PluginSource::Library(path), None, "")
        .err()
        .unwrap();
    assert!(err.contains("plugin-api 99.0.0"), "{err}");
    assert!(
        err.contains(&format!("plugin-api {}", plugin_api::ABI_VERSION)),
        "{err}"
    );
}
