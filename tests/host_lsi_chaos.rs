//! Chaos under disk I/O on the LSI (issue 13): one LSI53C895A controller
//! in a remote with two disks, a raw one and one with a file system, each
//! under a verified write/read workload of the guest's stock `sym53c8xx`
//! driver, while the remote is killed with SIGKILL at random moments 1-3 s
//! apart (`CHAOS_KILLS` times, default 10); then the plugin panics once
//! (QMP `x-device-control` `x-panic`: the controller comes back alone, in
//! the same remote process) and the remote hangs once (SIGSTOP past its
//! timeout). The remote has `restart = "on-failure"`.
//!
//! Unlike virtio-blk's, the LSI's state cannot stay current under I/O:
//! every command changes its registers and SCRIPTS' progress through guest
//! RAM. The VMM saved it while the guest left it alone (after the driver
//! set it up), and each restart brings it back from that stale save with
//! `resume-after-loss`: registers and SCRIPTS as the driver set them, then
//! a reset of the SCSI bus. The driver starts the chip up again and the
//! midlayer issues every outstanding command again (a write again with the
//! same data, a read again), so the reset is in the guest's log, once per
//! restart, and nothing else is.
//!
//! Checked as a user would: no I/O error in the guest, every direct read
//! of a chunk just written matches it, every file read back from the
//! file system (remounted, caches dropped) matches its checksum, the raw
//! image on the host holds exactly the last data the guest wrote to each
//! chunk, the guest's kernel log has no I/O error, abort or time-out, and
//! each restart resumed the controller.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use system_tests::{
    check_disk_chaos, lsi_job_modules, output_number, prepare_vm, recovery_times, run_chaos,
    DiskChaosJob,
};
use testenv::target_bin;

const QMP_SOCKET: &str = "/tmp/host-lsi-chaos/qmp.sock";
const IMAGE: u64 = 64 << 20;

fn config(kernel: &Path) -> String {
    format!(
        r#"[vm]
memory = "256M"
vcpus = 2
kernel = "{kernel}"
initrd = "initrd.cpio"
cmdline = "console=ttyS0 quiet"
console-log = "console.log"

[[remote]]
id = "svc"
log = "svc.log"
restart = "on-failure"
restart-limit = 100

[[device]]
id = "lsi0"
remote = "svc"
plugin = "lsi53c895a"
slot = 5

[[device.drive]]
file = "raw.img"
scsi-id = 0

[[device.drive]]
file = "fs.img"
scsi-id = 1
"#,
        kernel = kernel.display()
    )
}

/// The guest's job: [`DiskChaosJob`] on its two disks.
fn guest_job() -> String {
    DiskChaosJob {
        disks: "sda sdb",
        key: "basename \"$(readlink /sys/block/$d/device)\"",
        raw: "*:0:0:0",
        fs: "*:0:1:0",
        // The disks left alone for 3 s, a dozen heartbeat periods: the VMM
        // saves the controller as the driver set it up, the save a crash
        // in the middle of the I/O comes back from.
        before_load: "sync\nsleep 3",
        log_errors: "i/o error|blk_update|critical (target|medium)|EXT[234]-fs (error|warning)|hung task|timing out|abort|rejecting i/o|offline|FAILED Result",
        log_report: "echo \"bus-resets=$(dmesg | grep -c 'SCSI BUS reset detected')\"\n\
                     echo \"unit-attentions=$(dmesg | grep -ciE 'power-on or device reset|bus reset occurred')\"\n\
                     dmesg | grep -iE 'reset' | tail -5",
    }
    .script()
}

#[test]
fn an_lsi_in_a_remote_killed_again_and_again_loses_no_write() {
    system_tests::guest_test("host_lsi_chaos", |env| {
        for bin in ["host", "remote-host", "liblsi53c895a.so"] {
            target_bin(bin).unwrap();
        }
        let job = guest_job();
        let spec = testenv::InitramfsSpec::new(&lsi_job_modules(), &job);
        let dir = prepare_vm(env, "host-lsi-chaos", &spec);
        fs::write(dir.join("vm.toml"), config(&env.kernel)).unwrap();
        for img in ["raw.img", "fs.img"] {
            fs::File::create(dir.join(img))
                .unwrap()
                .set_len(IMAGE)
                .unwrap();
        }
        // After the kills, the plugin panics once (tests/chaos_driver.py).
        fs::write(dir.join("chaos-panic"), "lsi0").unwrap();
        let (run, out, kills) = run_chaos(
            env,
            "host_lsi_chaos",
            &dir,
            QMP_SOCKET,
            10,
            Duration::from_secs(180),
        );
        let (r, diag) = (&run.results, &run.diag);
        let num = |key: &str| output_number(&out, key, diag);
        let (raw_rounds, fs_rounds) = check_disk_chaos(&out, diag, &dir.join("raw.img"));
        let ms = recovery_times(r, kills, diag);
        // Every restart, the hang's included, brought the controller back
        // with its state: restored from a save still current (a kill while
        // the guest left it alone: the driver pauses 3 s after a bus
        // reset, its `settle_delay`), or resumed from a stale one (a kill
        // in the middle of the I/O). Never reset.
        let kept = r["replies"]["state-kept"].as_array().unwrap();
        let resumed = r["replies"]["state-resumed"].as_array().unwrap();
        assert_eq!(kept.len() as u64, kills + 1, "{diag}");
        assert_eq!(resumed.len() as u64, kills + 1, "{diag}");
        let has =
            |v: &serde_json::Value| v.as_array().is_some_and(|a| a.iter().any(|d| d == "lsi0"));
        let mut resumes = 0;
        for (k, s) in kept.iter().zip(resumed) {
            assert!(
                has(k) != has(s),
                "a restart brought the controller back reset, or twice (kept: {k}, resumed: {s}):\n{diag}"
            );
            resumes += u64::from(has(s));
        }
        assert!(
            resumes > 0,
            "no kill came in the middle of the I/O:\n{diag}"
        );
        assert_eq!(r["replies"]["hang"]["new-pid"], true, "{diag}");
        // The plugin panic: the controller came back alone, in the same
        // remote process, with its state one way or the other.
        let p = &r["replies"]["panic"];
        assert!(
            p["reply"].as_str().unwrap_or_default().contains("x-panic"),
            "the panic's own message is the op's error: {p}\n{diag}"
        );
        assert_eq!(p["device"], "lsi0", "{diag}");
        assert!(
            (p["state-kept"] == true) != (p["state-resumed"] == true),
            "the panicked controller came back reset: {p}\n{diag}"
        );
        assert_eq!(p["same-pid"], true, "{diag}");
        assert_eq!(p["remote-restarts"], 0, "{diag}");
        let resumes = resumes + u64::from(p["state-resumed"] == true);
        assert_eq!(r["host-exit"], 0, "{diag}");
        // What the guest saw: one SCSI bus reset per resume (two resumes
        // before the driver handled the first may fold into one).
        let resets = num("bus-resets=");
        assert!(
            resets >= 1 && resets <= resumes,
            "{resets} bus resets for {resumes} resumes:\n{diag}"
        );
        eprintln!(
            "host_lsi_chaos: {kills} kills ({resumes} restarts resumed a stale save, the others restored a current one), recovery p50 {} ms max {} ms; a hang recovered in {} ms; a plugin panic in {} ms ({}); raw rounds {raw_rounds}, fs rounds {fs_rounds}, 0 errors, 0 mismatches; the guest saw {resets} SCSI bus resets and {} unit attentions",
            ms[ms.len() / 2],
            ms[ms.len() - 1],
            r["replies"]["hang"]["recovery-ms"],
            p["recovery-ms"],
            if p["state-resumed"] == true {
                "resumed"
            } else {
                "restored"
            },
            num("unit-attentions=")
        );
        fs::remove_dir_all(&dir).ok();
    });
}
