//! The nested-KVM variant of `mpqemu_proxy`: ONE L1 boot (stock kernel in
//! sid's QEMU under TCG, `-cpu max`, a real `/dev/kvm`) runs this same
//! test binary, whose `in_l1` test starts `remote-host serve --protocol
//! mpqemu --fd 3` (dma-example) and Debian 12's QEMU 7.2 with
//! `-enable-kvm -cpu host -device x-pci-proxy-dev`. The L2 Linux guest
//! binds the device to uio_pci_generic, runs a DMA between two buffers in
//! its RAM and **receives the interrupt** on `/dev/uio0`: the proxy
//! registers our irqfd with KVM (`KVM_IRQFD` with a resample fd), and our
//! process signals it directly.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Instant;

use testenv::{require_env, NestedOptions};

#[path = "mpqemu_guest.rs"]
mod guest;

/// Runs inside L1 only (the outer test starts it there).
#[test]
fn in_l1() {
    if std::env::var("TESTENV_L1").is_err() {
        eprintln!(
            "in_l1: runs only inside the nested L1 guest (see nested_kvm_proxy_dma_and_interrupt)"
        );
        return;
    }
    let env = require_env("mpqemu_nested(L1)").unwrap();
    assert!(
        std::path::Path::new("/dev/kvm").exists(),
        "no /dev/kvm in L1"
    );
    let t0 = Instant::now();
    let r = guest::run_pair(&env, "mpqemu_nested_l2", "kvm", "host", 20);
    guest::check(&r.output, true, &|| r.log.clone());
    println!(
        "MPQEMU-NESTED-OK: L2 guest DMA and interrupt through x-pci-proxy-dev under KVM ({:.1} s in L1)",
        t0.elapsed().as_secs_f64()
    );
}

#[test]
fn nested_kvm_proxy_dma_and_interrupt() {
    if std::env::var("TESTENV_L1").is_ok() {
        return;
    }
    system_tests::guest_test("mpqemu_nested", |env| {
        let t0 = Instant::now();
        let exe = std::env::current_exe().unwrap();
        let cmd = vec![
            exe.to_string_lossy().into_owned(),
            "--exact".into(),
            "in_l1".into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
        ];
        let opts = NestedOptions {
            name: "mpqemu_nested".into(),
            ..Default::default()
        };
        let r = env.run_nested(&cmd, &opts).unwrap();
        eprintln!("--- L1 job output ---\n{}", r.output);
        assert!(
            r.output.contains("testenv: /dev/kvm present"),
            "L1 has no /dev/kvm:\n{}",
            r.output
        );
        assert_eq!(r.status, 0, "the L1 part failed:\n{}", r.output);
        assert!(
            r.output.contains("MPQEMU-NESTED-OK"),
            "the L1 part did not run:\n{}",
            r.output
        );
        eprintln!(
            "mpqemu_nested: passed in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    });
}
