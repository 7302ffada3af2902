//! Under a real KVM (nested in QEMU's TCG), QEMU 7.2's `x-pci-proxy-dev`
//! against our `remote-host --protocol mpqemu` with the LSI plugin — the
//! original multi-process setup with our device process in place of QEMU's
//! — runs the shared LSI guest job (interrupts through irqfd included),
//! compared in the same L1 run with QEMU's in-process LSI and QEMU's own
//! multi-process pair. One L1 boot, three L2 guests.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Duration;

use testenv::{target_bin, NestedOptions};

#[test]
fn lsi_behind_qemu_proxy_under_kvm() {
    system_tests::guest_test("nested_lsi", |env| {
        let bin = target_bin("lsi-compare").unwrap();
        let opts = NestedOptions {
            timeout: Duration::from_secs(900),
            name: "nested_lsi".into(),
            ..Default::default()
        };
        let r = env
            .run_nested(&[bin.display().to_string(), "check".into()], &opts)
            .unwrap();
        eprintln!("--- L1 output ---\n{}", r.output);
        for v in ["qemu-lsi", "qemu-mp", "ours-mp"] {
            assert!(
                r.output
                    .lines()
                    .any(|l| l.starts_with(&format!("RESULT {v} ok"))),
                "{v} failed:\n{}",
                r.output
            );
        }
        assert_eq!(r.status, 0, "{}", r.output);
    });
}
