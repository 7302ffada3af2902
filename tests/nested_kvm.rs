//! Nested KVM: one L1 boot (stock kernel in sid's QEMU under TCG, -cpu max)
//! runs this workspace's `kvm-smoke` with L1's real `/dev/kvm`.

use std::time::Instant;
use testenv::{target_bin, NestedOptions};

#[test]
fn nested_kvm_smoke() {
    system_tests::guest_test("nested_kvm", |env| {
        let t0 = Instant::now();
        let smoke = target_bin("kvm-smoke").unwrap();
        let cmd = vec![
            smoke.to_string_lossy().into_owned(),
            "--repeat".into(),
            "100".into(),
        ];
        let opts = NestedOptions {
            name: "nested_kvm".into(),
            ..Default::default()
        };
        let r = env.run_nested(&cmd, &opts).unwrap();
        eprintln!("--- L1 job output ---\n{}", r.output);
        assert!(
            r.output.contains("testenv: /dev/kvm present"),
            "L1 has no /dev/kvm:\n{}",
            r.output
        );
        assert_eq!(r.status, 0, "kvm-smoke failed in L1:\n{}", r.output);
        assert!(
            r.output.contains("kvm-smoke: OK: 100 run(s)")
                && r.output.contains("IoOut(0x1234, 0x5a), Hlt"),
            "kvm-smoke did not report the expected exits:\n{}",
            r.output
        );
        eprintln!("nested_kvm: passed in {:.1} s", t0.elapsed().as_secs_f64());
    });
}
