//! Chaos under disk I/O (issue 13): two virtio-blk disks in one remote,
//! a raw one and one with a file system, each under a verified write/read
//! workload of the guest's stock `virtio_blk` driver, while the remote is
//! killed with SIGKILL at random moments 1-3 s apart (`CHAOS_KILLS`
//! times, default 10), then one disk's plugin panics (QMP
//! `x-device-control` `x-panic`: that disk comes back alone, in the same
//! remote process, its neighbour untouched), and then the remote hangs
//! once (SIGSTOP past its timeout). The
//! remote has `restart = "on-failure"`: it comes back by itself, and each
//! disk comes back as it was, not reset (virtio-blk's saved state
//! outlives its doorbells, so the state the VMM saved after the driver set
//! the device up is still current in the middle of the I/O; the restored
//! device takes where it stands in each ring from the used ring).
//!
//! Checked as a user would: no I/O error in the guest, every direct read
//! of a chunk just written matches it, every file read back from the
//! file system (remounted, caches dropped) matches its checksum, the raw
//! image on the host holds exactly the last data the guest wrote to each
//! chunk, the guest's kernel log has no I/O error, and each restart kept
//! both disks' state.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use system_tests::{
    check_disk_chaos, prepare_vm, recovery_times, run_chaos, DiskChaosJob, VIRTIO_BLK_MODULES,
};
use testenv::target_bin;

const QMP_SOCKET: &str = "/tmp/host-virtio-chaos/qmp.sock";
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
id = "vd0"
remote = "svc"
plugin = "virtio-blk"
slot = 5
file = "raw.img"
serial = "RAW"

[[device]]
id = "vd1"
remote = "svc"
plugin = "virtio-blk"
slot = 6
file = "fs.img"
serial = "FS"
"#,
        kernel = kernel.display()
    )
}

/// The guest's job: [`DiskChaosJob`] on its two disks.
fn guest_job() -> String {
    DiskChaosJob {
        disks: "vda vdb",
        key: "cat /sys/block/$d/serial 2>/dev/null",
        raw: "RAW",
        fs: "FS",
        before_load: "",
        log_errors: "i/o error|blk_update|critical (target|medium)|EXT[234]-fs (error|warning)|virtio.*(error|reset|broken)|hung task",
        log_report: "",
    }
    .script()
}

#[test]
fn disks_in_a_remote_killed_again_and_again_lose_no_write() {
    system_tests::guest_test("host_virtio_chaos", |env| {
        for bin in ["host", "remote-host", "libvirtio_blk.so"] {
            target_bin(bin).unwrap();
        }
        let mut modules = VIRTIO_BLK_MODULES.to_vec();
        modules.extend(["crc16", "mbcache", "jbd2", "crc32c_generic", "ext4"]);
        let job = guest_job();
        let spec = testenv::InitramfsSpec::new(&modules, &job);
        let dir = prepare_vm(env, "host-virtio-chaos", &spec);
        fs::write(dir.join("vm.toml"), config(&env.kernel)).unwrap();
        for img in ["raw.img", "fs.img"] {
            fs::File::create(dir.join(img))
                .unwrap()
                .set_len(IMAGE)
                .unwrap();
        }
        // After the kills, vd1's plugin panics once (tests/chaos_driver.py).
        fs::write(dir.join("chaos-panic"), "vd1").unwrap();
        let (run, out, kills) = run_chaos(
            env,
            "host_virtio_chaos",
            &dir,
            QMP_SOCKET,
            10,
            Duration::from_secs(180),
        );
        let (r, diag) = (&run.results, &run.diag);
        let (raw_rounds, fs_rounds) = check_disk_chaos(&out, diag, &dir.join("raw.img"));
        let ms = recovery_times(r, kills, diag);
        // Every restart, the hang's included, brought both disks back with
        // their state.
        let kept = r["replies"]["state-kept"].as_array().unwrap();
        assert_eq!(kept.len() as u64, kills + 1, "{diag}");
        for k in kept {
            let ids: Vec<&str> = k
                .as_array()
                .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
                .unwrap_or_default();
            assert!(
                ids.contains(&"vd0") && ids.contains(&"vd1"),
                "a restart brought a disk back reset (state kept: {k}):\n{diag}"
            );
        }
        assert_eq!(r["replies"]["hang"]["new-pid"], true, "{diag}");
        // The plugin panic: vd1 came back alone, its state kept, in the
        // same remote process (vd0 never stopped).
        let p = &r["replies"]["panic"];
        assert!(
            p["reply"].as_str().unwrap_or_default().contains("x-panic"),
            "the panic's own message is the op's error: {p}\n{diag}"
        );
        assert_eq!(p["device"], "vd1", "{diag}");
        assert_eq!(p["state-kept"], true, "{diag}");
        assert_eq!(p["same-pid"], true, "{diag}");
        assert_eq!(p["remote-restarts"], 0, "{diag}");
        assert_eq!(r["host-exit"], 0, "{diag}");
        eprintln!(
        "host_virtio_chaos: {kills} kills, recovery p50 {} ms max {} ms; a hang recovered in {} ms; a plugin panic in {} ms; raw rounds {raw_rounds}, fs rounds {fs_rounds}, 0 errors, 0 mismatches",
        ms[ms.len() / 2],
        ms[ms.len() - 1],
        r["replies"]["hang"]["recovery-ms"],
        p["recovery-ms"]
    );
        fs::remove_dir_all(&dir).ok();
    });
}
