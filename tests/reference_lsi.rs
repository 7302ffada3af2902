//! Reference for the LSI plugin: Debian 12's QEMU 7.2 with its in-process
//! `lsi53c895a` + `scsi-hd` under TCG, driven by the stock kernel's
//! `sym53c8xx`. Checks the disk size, a guest write (on the host image, byte
//! for byte) and a guest read of host-written data.

use std::fs;
use std::time::{Duration, Instant};
use system_tests::{check_lsi_disk_job, lsi_disk_job, lsi_job_modules, make_lsi_image};
use testenv::{InitramfsSpec, ModuleOrder, QemuKind, RunOptions};

#[test]
fn reference_lsi() {
    system_tests::guest_test("reference_lsi", |env| {
        let t0 = Instant::now();
        let dir =
            std::env::temp_dir().join(format!("testenv-reference-lsi-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");

        make_lsi_image(&image);
        let job = lsi_disk_job();
        let mut spec = InitramfsSpec::new(&lsi_job_modules(), &job);
        spec.order = ModuleOrder::Exact;
        let opts = RunOptions {
            qemu: QemuKind::Debian12,
            name: "reference_lsi".into(),
            timeout: Duration::from_secs(300),
            extra_args: vec![
                "-device".into(),
                "lsi53c895a,id=lsi0".into(),
                "-drive".into(),
                format!("file={},format=raw,if=none,id=disk0", image.display()),
                "-device".into(),
                "scsi-hd,drive=disk0,bus=lsi0.0,scsi-id=0".into(),
            ],
            ..Default::default()
        };
        let r = env.run_job(&spec, &opts).unwrap();
        eprintln!("--- guest job output ---\n{}", r.output);
        assert_eq!(r.status, 0, "guest job failed:\n{}", r.output);

        check_lsi_disk_job(&r, &image);
        fs::remove_dir_all(&dir).ok();
        eprintln!(
            "reference_lsi: passed in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    });
}
