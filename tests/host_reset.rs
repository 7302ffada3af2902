//! VM reset, for real: in the nested-KVM environment our VMM runs a Linux
//! guest with the LSI controller in a spawned remote (`storage`, one
//! drive) and a QMP monitor. tests/reset_driver.py (QEMU's `qemu.qmp`)
//! drives three boots of the same guest job, which waits for a line on
//! its console input after each boot has found its disk:
//!
//! 1. `system_reset` → RESET {guest: false}, and the guest boots again;
//! 2. the second boot is told `reboot` and runs `reboot -f` → RESET
//!    {guest: true}, and the guest boots again;
//! 3. the third boot is told `poweroff` → `host` exits 0.
//!
//! Every boot must find sda with the image's size and read the bytes the
//! host wrote: that proves the device reset in the remote and the BARs
//! placed afresh (a stale placement or a device stuck in its old state
//! fails the probe), and the kernel, irqchip and vCPUs reset (2 vCPUs:
//! the second boot brings the AP up again through INIT/SIPI).

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use system_tests::{
    host_data, make_lsi_image, parse_hex, prepare_lsi_vm, run_qmp_driver, BLOCK, HOST_OFF,
    IMAGE_SIZE,
};

/// L1's /tmp is a tmpfs (UNIX sockets do not work on 9p).
const QMP_SOCKET: &str = "/tmp/host-reset/qmp.sock";
const JOB_START: &str = "===TESTENV-JOB-START===";

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
id = "storage"
log = "storage.log"
# A nested guest on a loaded machine can stall for seconds: a long timeout
# keeps the disk from being failed by a slow answer (hangs are tested on
# another remote).
timeout-ms = 30000

[[device]]
id = "lsi0"
remote = "storage"
plugin = "lsi53c895a"
slot = 4

[[device.drive]]
file = "disk0.img"
scsi-id = 0
"#,
        kernel = kernel.display()
    )
}

/// The same job on every boot: find sda, report its size and the host's
/// block, then ask what to do.
fn guest_job() -> String {
    format!(
        r#"
echo "cpus=$(grep -c ^processor /proc/cpuinfo)"
i=0; while [ ! -e /sys/block/sda ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
[ -e /sys/block/sda ] || {{ echo "no sda"; exit 1; }}
[ -b /dev/sda ] || mknod /dev/sda b $(cut -d: -f1 /sys/block/sda/dev) $(cut -d: -f2 /sys/block/sda/dev)
echo "sda_sectors=$(cat /sys/block/sda/size)"
echo "HOST-BEGIN"
dd if=/dev/sda bs={BLOCK} skip={skip} count=1 iflag=direct 2>/dev/null | od -A n -t x1 -v
echo "HOST-END"
echo "STEP ask"
read -r -t 120 cmd || cmd=none
echo "cmd=$cmd"
case "$cmd" in
    reboot) console-drain; reboot -f; sleep 60 ;;
    poweroff) exit 0 ;;
    *) exit 9 ;;
esac
"#,
        skip = HOST_OFF / BLOCK as u64,
    )
}

fn value<'a>(output: &'a str, key: &str) -> Option<&'a str> {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
}

#[test]
fn system_reset_and_guest_reboot_restart_the_guest() {
    system_tests::guest_test("host_reset", |env| {
        let t0 = Instant::now();
        let dir = prepare_lsi_vm(env, "host-reset", &guest_job());
        make_lsi_image(&dir.join("disk0.img"));
        let cfg = dir.join("vm.toml");
        fs::write(&cfg, config(&env.kernel)).unwrap();
        let run = run_qmp_driver(
            env,
            "host_reset",
            "reset_driver.py",
            &dir,
            QMP_SOCKET,
            Duration::from_secs(300),
            &["storage.log"],
        );
        run.check();
        let (r, diag, console) = (&run.results, &run.diag, &run.console);
        let stderr = fs::read_to_string(dir.join("vm.toml.host-stderr")).unwrap_or_default();

        // Three boots of the job, each with its disk and the host's bytes.
        let boots: Vec<&str> = console.split(JOB_START).skip(1).collect();
        assert_eq!(boots.len(), 3, "job starts:\n{diag}");
        let commands = ["none", "reboot", "poweroff"];
        for (i, boot) in boots.iter().enumerate() {
            assert_eq!(value(boot, "cpus="), Some("2"), "boot {}:\n{diag}", i + 1);
            let sectors: u64 = value(boot, "sda_sectors=")
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("boot {}: no sda size:\n{diag}", i + 1));
            assert_eq!(sectors * 512, IMAGE_SIZE, "boot {}", i + 1);
            assert_eq!(
                parse_hex(boot, "HOST-BEGIN", "HOST-END"),
                host_data(),
                "boot {}: the host's block",
                i + 1
            );
            // Boot 1 is reset while it waits (no command reaches it).
            if i > 0 {
                assert_eq!(
                    value(boot, "cmd="),
                    Some(commands[i]),
                    "boot {}:\n{diag}",
                    i + 1
                );
            }
        }
        assert!(
            boots[2].contains("===TESTENV-JOB-END status=0==="),
            "{diag}"
        );

        // The two RESET events, in order, and the end.
        let rep = &r["replies"];
        assert_eq!(rep["reset-host"]["data"]["guest"], false, "{diag}");
        assert_eq!(rep["reset-host"]["data"]["reason"], "host-qmp-system-reset");
        assert_eq!(rep["reset-guest"]["data"]["guest"], true, "{diag}");
        assert_eq!(rep["reset-guest"]["data"]["reason"], "guest-reset");
        let resets: Vec<&serde_json::Value> = r["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == "RESET")
            .collect();
        assert_eq!(resets.len(), 2, "{diag}");
        assert_eq!(rep["status-after-reset"]["status"], "running");
        // The remote lives on across resets: same process, still running, its
        // device not failed.
        let (before, after) = (&rep["remotes-at-start"][0], &rep["remotes-after-resets"][0]);
        assert_eq!(before["state"], "running", "{diag}");
        assert_eq!(after["state"], "running", "{diag}");
        assert_eq!(after["pid"], before["pid"], "{diag}");
        assert_eq!(after["devices-failed"], false, "{diag}");
        assert_eq!(r["host-exit"], 0, "{diag}");
        assert!(stderr.contains("resets=2"), "{diag}");
        assert!(stderr.contains("code=0"), "{diag}");

        let reset_ms: Vec<&str> = stderr
            .lines()
            .filter(|l| l.starts_with("host-stats: reset="))
            .filter_map(|l| l.split("reset_ms=").nth(1))
            .collect();
        eprintln!(
        "host_reset: 3 boots, resets took {reset_ms:?} ms; steps {}; driver {} s; whole test {:.1} s",
        r["steps"],
        r["seconds"],
        t0.elapsed().as_secs_f64()
    );
        fs::remove_dir_all(&dir).ok();
    });
}
