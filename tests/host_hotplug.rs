//! ACPI PCI hotplug with a real guest: in the nested-KVM environment our
//! VMM runs a Linux guest with an LSI controller in a spawned remote
//! (`storage`), and tests/hotplug_driver.py (QEMU's `qemu.qmp`) adds and
//! removes PCI functions while the guest runs. The guest never rescans
//! its PCI bus: Linux's `acpiphp` hears of each change from the ACPI
//! hotplug event.
//!
//! 1. `device_add` of a second LSI controller with a drive into the
//!    running remote: the guest's `sym53c8xx` finds sdb with the image's
//!    size, writes to it (the bytes are in the image) and reads the
//!    host's data;
//! 2. `device_del` of it: the guest releases it (its disk goes), then
//!    `DEVICE_DELETED`, and the remote no longer has it;
//! 3. `device_add` of an in-process dma-example: the guest reads its ID;
//! 4. with the guest's hotplug GPE disabled, `device_del` of it posts the
//!    request and nothing more: no `DEVICE_DELETED`, `query-pci` shows
//!    the unplug pending; once the guest enables the GPE again, a second
//!    `device_del` says the unplug is pending and sends the request again:
//!    the guest releases the function and `DEVICE_DELETED` comes;
//! 5. in a remote with `restart = "on-failure"`, a plugin that panics on
//!    one bad request comes back by itself (`DEVICE_RESTARTED`) with the
//!    state it had before that request, while its neighbour in the same
//!    remote (dma5) answers throughout.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use system_tests::{
    guest_pattern, host_data, make_lsi_image, make_second_disk, parse_hex, prepare_lsi_vm,
    run_qmp_driver, sdb_write_and_read_job, BLOCK, SDB_GUEST_OFF,
};
use testenv::target_bin;

const QMP_SOCKET: &str = "/tmp/host-hotplug/qmp.sock";
const DISK1_SIZE: u64 = 32 << 20;

fn config(kernel: &Path) -> String {
    format!(
        r#"[vm]
memory = "256M"
vcpus = 2
kernel = "{kernel}"
initrd = "initrd.cpio"
cmdline = "console=ttyS0 quiet iomem=relaxed"
console-log = "console.log"

[[remote]]
id = "storage"
log = "storage.log"
timeout-ms = 30000

[[device]]
id = "lsi0"
remote = "storage"
plugin = "lsi53c895a"
slot = 4

[[device.drive]]
file = "disk0.img"
scsi-id = 0

# A remote whose devices come back by themselves.
[[remote]]
id = "plugins"
log = "plugins.log"
restart = "on-failure"
timeout-ms = 30000

[[device]]
id = "magic"
remote = "plugins"
plugin = "faulty-plugin"
kind = "panics-on-magic"
slot = 8

[[device]]
id = "dma5"
remote = "plugins"
plugin = "dma-example"
slot = 9
"#,
        kernel = kernel.display()
    )
}

fn guest_job() -> String {
    format!(
        r#"
step() {{ echo "STEP $1"; read -r -t 300 line || {{ echo "no go after $1"; exit 20; }}; }}
dev() {{ [ -b /dev/$1 ] || mknod /dev/$1 b $(cut -d: -f1 /sys/block/$1/dev) $(cut -d: -f2 /sys/block/$1/dev); }}
bar0() {{ head -n1 /sys/bus/pci/devices/$1/resource | cut -d' ' -f1; }}
waitfor() {{ i=0; while ! eval "$1" && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; eval "$1"; }}
waitfor '[ -e /sys/block/sda ]' || {{ echo "no sda"; exit 1; }}
echo "slots=$(ls /sys/bus/pci/slots | wc -l)"
step ready

waitfor '[ -e /sys/block/sdb ]' || {{ echo "no sdb without a rescan"; ls /sys/bus/pci/devices; exit 2; }}
dev sdb
echo "sdb_sectors=$(cat /sys/block/sdb/size)"
{sdb}step sdb-used

waitfor '[ ! -e /sys/bus/pci/devices/0000:00:06.0 ]' && echo "lsi1-released"
[ -e /sys/block/sdb ] && echo "sdb-still-there" || echo "sdb-gone"
dd if=/dev/sda of=/dev/null bs=64k count=16 iflag=direct 2>/dev/null && echo "sda-still-works"
step lsi1-gone

waitfor '[ -e /sys/bus/pci/devices/0000:00:07.0 ]' || {{ echo "no dma9 without a rescan"; exit 5; }}
waitfor '[ "$(bar0 0000:00:07.0)" != 0x0000000000000000 ]'
echo "dma9_id=$(devmem $(bar0 0000:00:07.0) 32)"
echo disable > /sys/firmware/acpi/interrupts/gpe01 || {{ echo "cannot disable gpe01"; exit 6; }}
step dma9-found

[ -e /sys/bus/pci/devices/0000:00:07.0 ] && echo "dma9-kept-while-ignored"
echo enable > /sys/firmware/acpi/interrupts/gpe01
step dma9-listening
waitfor '[ ! -e /sys/bus/pci/devices/0000:00:07.0 ]' && echo "dma9-released"

m=$(bar0 0000:00:08.0); d=$(bar0 0000:00:09.0)
echo "magic_id=$(devmem $m 32)"
devmem $((m + 4)) 32 0x55
step magic-ready
devmem $((m + 8)) 32 0xdead
echo "dma5_during=$(devmem $d 32)"
step magic-panicked
echo "magic_after=$(devmem $m 32) scratch_after=$(devmem $((m + 4)) 32)"
echo "dma5_after=$(devmem $d 32)"
echo "STEP done"
"#,
        sdb = sdb_write_and_read_job(),
    )
}

#[test]
fn acpi_pci_hotplug_without_a_rescan() {
    system_tests::guest_test("host_hotplug", |env| {
        let t0 = Instant::now();
        let dir = prepare_lsi_vm(env, "host-hotplug", &guest_job());
        target_bin("libdma_example.so").unwrap();
        make_lsi_image(&dir.join("disk0.img"));
        {
            make_second_disk(&dir.join("disk1.img"), DISK1_SIZE);
        }
        fs::write(dir.join("vm.toml"), config(&env.kernel)).unwrap();
        target_bin("libfaulty_plugin.so").unwrap();
        let run = run_qmp_driver(
            env,
            "host_hotplug",
            "hotplug_driver.py",
            &dir,
            QMP_SOCKET,
            Duration::from_secs(600),
            &["storage.log", "plugins.log"],
        );
        let job = run.check();
        let (r, diag) = (&run.results, &run.diag);
        assert_eq!(job.status, 0, "guest job failed:\n{diag}");
        let out = &job.output;
        let rep = &r["replies"];

        // acpiphp registered a slot for each of the 31.
        assert!(out.contains("slots=31"), "{diag}");

        // 1. The hot-added controller's disk, found without a rescan.
        assert_eq!(rep["add-lsi1"], serde_json::json!({}), "{diag}");
        assert!(
            out.contains(&format!("sdb_sectors={}", DISK1_SIZE / 512)),
            "{diag}"
        );
        let img = fs::read(dir.join("disk1.img")).unwrap();
        let off = SDB_GUEST_OFF as usize;
        assert_eq!(&img[off..off + BLOCK], &guest_pattern()[..], "{diag}");
        assert_eq!(
            parse_hex(out, "SDB-HOST-BEGIN", "SDB-HOST-END"),
            host_data()
        );

        // 2. Released by the guest, then deleted, and gone from the remote.
        assert_eq!(rep["del-lsi1"], serde_json::json!({}), "{diag}");
        assert_eq!(rep["lsi1-deleted"]["data"]["device"], "lsi1", "{diag}");
        assert!(
            out.contains("lsi1-released") && out.contains("sdb-gone"),
            "{diag}"
        );
        assert!(out.contains("sda-still-works"), "{diag}");
        let storage = rep["remotes-after-del"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == "storage")
            .unwrap();
        assert_eq!(storage["devices"], serde_json::json!(["lsi0"]), "{diag}");
        let pci = rep["pci-after-del"][0]["devices"].as_array().unwrap();
        assert!(!pci.iter().any(|d| d["qdev_id"] == "lsi1"), "{diag}");

        // 3. An in-process function, found without a rescan.
        assert_eq!(rep["add-dma9"], serde_json::json!({}), "{diag}");
        assert!(out.contains("dma9_id=0xD3A00001"), "{diag}");

        // 4. Ignored: kept, pending, said so; then released.
        assert_eq!(rep["del-dma9"], serde_json::json!({}), "{diag}");
        assert_eq!(rep["deleted-while-ignored"], false, "{diag}");
        assert!(out.contains("dma9-kept-while-ignored"), "{diag}");
        let pending = rep["pci-while-pending"][0]["devices"].as_array().unwrap();
        let dma9 = pending.iter().find(|d| d["qdev_id"] == "dma9").unwrap();
        assert_eq!(dma9["unplug-pending"], true, "{diag}");
        assert!(
            rep["del-again"]
                .as_str()
                .unwrap()
                .contains("already in the process of unplug"),
            "{diag}"
        );
        assert!(out.contains("dma9-released"), "{diag}");
        assert_eq!(rep["dma9-deleted"]["data"]["device"], "dma9", "{diag}");

        // 5. The panicking plugin restarted alone, its state kept.
        assert!(out.contains("magic_id=0xFA170001"), "{diag}");
        assert!(out.contains("dma5_during=0xD3A00001"), "{diag}");
        let restarted = &rep["magic-restarted"]["data"];
        assert_eq!(restarted["remote"], "plugins", "{diag}");
        assert_eq!(restarted["state-kept"], true, "{diag}");
        assert!(
            out.contains("magic_after=0xFA170001 scratch_after=0x00000055"),
            "{diag}"
        );
        assert!(out.contains("dma5_after=0xD3A00001"), "{diag}");
        let plugins = rep["remotes-at-end"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == "plugins")
            .unwrap();
        assert_eq!(
            plugins["pid"], rep["plugins-pid-before"],
            "the remote went on"
        );
        eprintln!(
            "host_hotplug: device restart in {} ms",
            restarted["recovery-ms"]
        );

        assert_eq!(r["host-exit"], 0, "{diag}");
        eprintln!(
            "host_hotplug: passed in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        fs::remove_dir_all(&dir).ok();
    });
}
