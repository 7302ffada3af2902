//! The QMP monitor and remote supervision, for real: in the nested-KVM
//! environment our VMM runs a Linux guest with a remote LSI controller
//! (remote `storage`) and a dma-example function in a second remote
//! (`misc`). QEMU's own Python client (`qemu.qmp`, tests/qmp_driver.py)
//! drives the monitor in step with the guest job:
//!
//! 1. queries (status, remotes, PCI, drives) and bad arguments;
//! 2. `blockdev-add` + `device_add scsi-hd` on the remote LSI: the guest
//!    finds sdb after a SCSI scan and writes to it; the bytes are checked
//!    in the image on the host;
//! 3. `block_resize`: the guest reads the new capacity after a rescan, and
//!    the kernel reports the CAPACITY DATA HAS CHANGED unit attention;
//! 4. the guest deletes sdb, then `device_del` + `blockdev-del`;
//! 5. `device_add` of a dma-example function into the running `storage`
//!    remote and of another in-process: the guest finds them after a PCI
//!    rescan and reads their ID register through their BARs; a plugin
//!    whose BAR reads panic, added in `storage` and in-process, fails with
//!    DEVICE_FAILED and reads all-ones, and nothing else is affected;
//! 6. SIGSTOP of `misc`: REMOTE_HUNG, and a guest read of its BAR returns
//!    all-ones instead of freezing;
//! 7. SIGKILL of `misc`: REMOTE_DIED; the guest keeps using its disk;
//! 8. `remote-restart misc`: a new process serves dma0 in the same slot at
//!    the same BAR, and the guest reads its ID register again;
//! 9. SIGKILL of `auto` (`restart = "on-failure"`, `restart-limit = 2`)
//!    once dma3's state was saved while idle: it comes back by itself
//!    (REMOTE_RESTARTED, reason "automatic", with the recovery time and
//!    dma3's state) and the guest, which reads dma3 right after the kill
//!    (its read waits for the restart instead of reading all-ones), finds
//!    its registers as it left them;
//!    killed twice more within the minute, it restarts once more and then
//!    stays failed (REMOTE_FAILED naming the limit; all-ones);
//! 10. `remote-restart storage` while it still answers: its devices' state
//!     is carried to the new process, the guest's disk and dma1 go on as
//!     before (no SCSI error or reset);
//! 11. `system_powerdown`: the guest's ACPI power button reports the press
//!     (the job waits for it on the button's input device), the guest
//!     powers off through ACPI, and the VM ends with SHUTDOWN
//!     "guest-shutdown" and exit status 0.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use system_tests::{
    guest_pattern, host_data, make_lsi_image, make_second_disk, parse_hex, prepare_lsi_vm,
    run_qmp_driver, sdb_write_and_read_job, BLOCK, SDB_GUEST_OFF,
};
use testenv::target_bin;

/// L1's /tmp is a tmpfs (UNIX sockets do not work on 9p).
const QMP_SOCKET: &str = "/tmp/host-qmp/qmp.sock";
const DISK1_SIZE: u64 = 32 << 20;
const DISK1_RESIZED: u64 = 48 << 20;

fn config(kernel: &Path) -> String {
    format!(
        r#"[vm]
memory = "512M"
vcpus = 2
kernel = "{kernel}"
initrd = "initrd.cpio"
cmdline = "console=ttyS0 quiet iomem=relaxed"
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

[[remote]]
id = "misc"
log = "misc.log"
heartbeat-ms = 200
timeout-ms = 1000

[[device]]
id = "dma0"
remote = "misc"
plugin = "dma-example"
slot = 6

[[remote]]
id = "auto"
log = "auto.log"
restart = "on-failure"
restart-limit = 2

[[device]]
id = "dma3"
remote = "auto"
plugin = "dma-example"
slot = 7
"#,
        kernel = kernel.display()
    )
}

/// The guest side. `step NAME` tells the driver where the guest is and
/// waits for its `go` on the console input.
fn guest_job() -> String {
    format!(
        r#"
step() {{ echo "STEP $1"; read -r -t 300 line || {{ echo "no go after $1"; exit 20; }}; }}
dev() {{ [ -b /dev/$1 ] || mknod /dev/$1 b $(cut -d: -f1 /sys/block/$1/dev) $(cut -d: -f2 /sys/block/$1/dev); }}
scan() {{ for h in /sys/class/scsi_host/host*; do echo '- - -' > $h/scan; done; }}
bar0() {{ head -n1 /sys/bus/pci/devices/$1/resource | cut -d' ' -f1; }}
i=0; while [ ! -e /sys/block/sda ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
[ -e /sys/block/sda ] || {{ echo "no sda"; exit 1; }}
dev sda
echo "dma0_id=$(devmem $(bar0 0000:00:06.0) 32)"
step ready

i=0; while [ ! -e /sys/block/sdb ] && [ $i -lt 300 ]; do scan; sleep 0.2; i=$((i+1)); done
[ -e /sys/block/sdb ] || {{ echo "no sdb"; exit 2; }}
dev sdb
echo "sdb_sectors=$(cat /sys/block/sdb/size)"
{sdb}step sdb-written

t=$(ls -d /sys/class/scsi_device/*:0:1:0)
old=$(cat /sys/block/sdb/size)
i=0; while [ "$(cat /sys/block/sdb/size)" = "$old" ] && [ $i -lt 300 ]; do echo 1 > $t/device/rescan; sleep 0.2; i=$((i+1)); done
echo "sdb_resized=$(cat /sys/block/sdb/size)"
dmesg | grep -qi 'capacity data has changed' && echo "ua-capacity-changed"
echo 1 > $t/device/delete
step sdb-deleted

scan; sleep 1
ls /sys/class/scsi_device/ | grep -q ':0:1:0' && echo "sdb-still-there" || echo "sdb-absent"
echo 1 > /sys/bus/pci/rescan
i=0; while [ ! -e /sys/bus/pci/devices/0000:00:09.0 ] && [ $i -lt 100 ]; do sleep 0.2; echo 1 > /sys/bus/pci/rescan; i=$((i+1)); done
echo "dma1_vendor=$(cat /sys/bus/pci/devices/0000:00:09.0/vendor) dma1_device=$(cat /sys/bus/pci/devices/0000:00:09.0/device)"
echo "dma1_id=$(devmem $(bar0 0000:00:09.0) 32)"
for f in 0a 0b 0c; do
    i=0; while [ ! -e /sys/bus/pci/devices/0000:00:$f.0 ] && [ $i -lt 100 ]; do sleep 0.2; echo 1 > /sys/bus/pci/rescan; i=$((i+1)); done
done
echo "dma2_id=$(devmem $(bar0 0000:00:0a.0) 32)"
echo "bad1_read=$(devmem $(bar0 0000:00:0b.0) 32)"
echo "bad2_read=$(devmem $(bar0 0000:00:0c.0) 32)"
step dma-found

cs() {{ cut -d' ' -f1 /proc/uptime | tr -d .; }}
t0=$(cs)
v=$(devmem $(bar0 0000:00:06.0) 32)
echo "dma0_after_stop=$v ms=$(( ($(cs) - t0) * 10 ))"
step read-hung

echo "dma0_after_kill=$(devmem $(bar0 0000:00:06.0) 32)"
step dead-read

echo "dma0_after_restart=$(devmem $(bar0 0000:00:06.0) 32)"
dd if=/dev/sda of=/dev/null bs=64k count=64 iflag=direct 2>/dev/null && echo "sda-still-works"
echo "dma1_id_end=$(devmem $(bar0 0000:00:09.0) 32)"
echo "dma3_before=$(devmem $(bar0 0000:00:07.0) 32)"
devmem $(( $(bar0 0000:00:07.0) + 4 )) 32 0x4321
step auto-kill
t0=$(cs)
v=$(devmem $(bar0 0000:00:07.0) 32)
echo "dma3_after_auto_restart=$v ms=$(( ($(cs) - t0) * 10 ))"
echo "dma3_liveness_after_auto_restart=$(devmem $(( $(bar0 0000:00:07.0) + 4 )) 32)"
step auto-limit
echo "dma3_after_limit=$(devmem $(bar0 0000:00:07.0) 32)"
errs() {{ dmesg | grep -ciE "abort|reset|timeout|timed out|I/O error"; }}
e0=$(errs)
devmem $(( $(bar0 0000:00:09.0) + 4 )) 32 0x1234
sum0=$(dd if=/dev/sda bs=64k count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
step storage-restart
sum1=$(dd if=/dev/sda bs=64k count=16 iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)
[ -n "$sum1" ] && [ "$sum0" = "$sum1" ] && echo "sda-same-after-restart"
echo "dma1_liveness_after_restart=$(devmem $(( $(bar0 0000:00:09.0) + 4 )) 32)"
echo "scsi_errors_added=$(( $(errs) - e0 ))"
pb=""
for d in /sys/class/input/input*; do [ "$(cat $d/name)" = "Power Button" ] && pb=$(ls $d | grep '^event'); done
[ -n "$pb" ] || {{ echo "no power button input device"; exit 30; }}
[ -c /dev/input/$pb ] || {{ mkdir -p /dev/input; mknod /dev/input/$pb c $(cut -d: -f1 /sys/class/input/$pb/dev) $(cut -d: -f2 /sys/class/input/$pb/dev); }}
echo "STEP power-button"
dd if=/dev/input/$pb of=/dev/null bs=24 count=1 2>/dev/null && echo "power-button-pressed"
"#,
        sdb = sdb_write_and_read_job(),
    )
}

fn value<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or_else(|| panic!("no `{key}` in the guest output:\n{output}"))
        .split_whitespace()
        .next()
        .unwrap_or("")
}

#[test]
fn qmp_monitor_hotplug_and_supervision_with_a_real_guest() {
    system_tests::guest_test("host_qmp", |env| {
        let t0 = Instant::now();
        let dir = prepare_lsi_vm(env, "host-qmp", &guest_job());
        target_bin("libdma_example.so").unwrap();
        make_lsi_image(&dir.join("disk0.img"));
        {
            make_second_disk(&dir.join("disk1.img"), DISK1_SIZE);
        }
        let cfg = dir.join("vm.toml");
        fs::write(&cfg, config(&env.kernel)).unwrap();
        let run = run_qmp_driver(
            env,
            "host_qmp",
            "qmp_driver.py",
            &dir,
            QMP_SOCKET,
            Duration::from_secs(900),
            &["storage.log", "misc.log"],
        );
        let job = run.check();
        let (r, diag) = (&run.results, &run.diag);
        assert_eq!(job.status, 0, "guest job failed:\n{diag}");
        let out = &job.output;
        let rep = &r["replies"];

        // 1. Queries.
        assert_eq!(rep["query-status"]["status"], "running");
        let remotes = rep["query-remote"].as_array().unwrap();
        let ids: Vec<&str> = remotes.iter().map(|x| x["id"].as_str().unwrap()).collect();
        assert_eq!(ids, ["storage", "misc", "auto"]);
        for x in remotes {
            assert_eq!(x["state"], "running", "{x}");
            assert!(x["pid"].as_u64().unwrap() > 1, "{x}");
            assert!(x["last-heartbeat"]["seconds"].as_u64().is_some(), "{x}");
        }
        assert_eq!(remotes[0]["devices"], serde_json::json!(["lsi0"]));
        let pci = rep["query-pci"][0]["devices"].as_array().unwrap();
        let lsi = pci.iter().find(|d| d["qdev_id"] == "lsi0").unwrap();
        assert_eq!(lsi["slot"], 4);
        assert_eq!(lsi["id"]["vendor"], 0x1000);
        assert_eq!(lsi["id"]["device"], 0x0012);
        assert_eq!(lsi["remote"], "storage");
        assert!(rep["query-commands"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "block_resize"));
        assert_eq!(value(out, "dma0_id="), "0xD3A00001", "{diag}");

        // Bad arguments: QMP errors, and nothing changed.
        let err = |name: &str| r["errors"][name].clone();
        assert_eq!(err("del-unknown")["class"], "DeviceNotFound", "{diag}");
        assert_eq!(
            err("add-duplicate")["desc"],
            "Duplicate ID 'lsi0' for device"
        );
        assert_eq!(err("add-unknown-remote")["class"], "DeviceNotFound");
        assert_eq!(
            err("add-slot-taken")["desc"],
            "PCI slot 4 is in use by 'lsi0'"
        );
        assert_eq!(
            err("add-bad-plugin")["desc"],
            "'no-such-plugin' is not a valid device model name"
        );
        assert!(err("blockdev-missing-file")["desc"]
            .as_str()
            .unwrap()
            .starts_with("Could not open '/nonexistent.img'"));
        assert_eq!(err("hd-unknown-node")["class"], "DeviceNotFound");
        assert_eq!(err("del-controller-in-use")["class"], "GenericError");
        assert_eq!(
            err("blockdev-duplicate")["desc"],
            "Duplicate nodes with node-name='disk1'"
        );
        assert_eq!(err("hd-controller-target")["class"], "GenericError");
        assert_eq!(
            err("resize-odd")["desc"],
            "Parameter 'size' expects a multiple of 512"
        );
        assert_eq!(err("blockdev-del-in-use")["desc"], "Node 'disk1' is in use");
        assert!(
            err("resize-shrink")["desc"]
                .as_str()
                .unwrap()
                .contains("would lose data"),
            "{diag}"
        );
        assert_eq!(err("blockdev-del-again")["class"], "DeviceNotFound");
        assert_eq!(
            rep["query-pci-after-errors"], rep["query-pci"],
            "a refused command changed the PCI bus"
        );

        // 2. The hot-added drive: the guest found it with the image's size,
        //    wrote to it (the bytes are in the file) and read the host's data.
        assert_eq!(r["replies"]["drive-added"]["data"]["scsi-id"], 1);
        assert_eq!(
            value(out, "sdb_sectors=").parse::<u64>().unwrap() * 512,
            DISK1_SIZE
        );
        let img = fs::read(dir.join("disk1.img")).unwrap();
        let off = SDB_GUEST_OFF as usize;
        assert_eq!(
            &img[off..off + BLOCK],
            &guest_pattern()[..],
            "guest write not in disk1.img"
        );
        assert_eq!(
            parse_hex(out, "SDB-HOST-BEGIN", "SDB-HOST-END"),
            host_data()
        );

        // 3. Resize: new capacity after a rescan, with the unit attention.
        assert_eq!(img.len() as u64, DISK1_RESIZED, "the image was not resized");
        assert_eq!(
            value(out, "sdb_resized=").parse::<u64>().unwrap() * 512,
            DISK1_RESIZED
        );
        assert!(
            out.contains("ua-capacity-changed"),
            "no capacity unit attention:\n{diag}"
        );

        // 4. Removal.
        assert_eq!(rep["drive-removed"]["data"]["node-name"], "disk1");
        assert_eq!(
            rep["hd1-deleted"]["data"]["path"],
            "/machine/peripheral/hd1"
        );
        assert!(out.contains("sdb-absent"), "{diag}");

        // 5. A function added to a running remote, found after a PCI rescan.
        let hot = rep["query-pci-hotplugged"][0]["devices"]
            .as_array()
            .unwrap();
        let dma1 = hot.iter().find(|d| d["qdev_id"] == "dma1").unwrap();
        assert_eq!(dma1["slot"], 9);
        assert_eq!(dma1["remote"], "storage");
        assert!(
            out.contains("dma1_vendor=0x1234 dma1_device=0x11e9"),
            "{diag}"
        );
        assert_eq!(value(out, "dma1_id="), "0xD3A00001");
        let dma2 = hot.iter().find(|d| d["qdev_id"] == "dma2").unwrap();
        assert_eq!(
            dma2["remote"],
            serde_json::Value::Null,
            "dma2 is in-process"
        );
        assert_eq!(value(out, "dma2_id="), "0xD3A00001", "{diag}");

        // A plugin that panics: its device fails and reads all-ones; the
        // process serving it goes on (the LSI controller beside it in
        // `storage` keeps working, step 7).
        assert_eq!(value(out, "bad1_read="), "0xFFFFFFFF", "{diag}");
        assert_eq!(value(out, "bad2_read="), "0xFFFFFFFF", "{diag}");
        assert_eq!(rep["bad1-failed"]["data"]["remote"], "storage");
        assert_eq!(
            rep["bad2-failed"]["data"]["remote"],
            serde_json::Value::Null
        );
        for e in [&rep["bad1-failed"], &rep["bad2-failed"]] {
            let reason = e["data"]["reason"].as_str().unwrap();
            assert!(reason.contains("went wrong"), "{e}");
        }

        // 6. Hung remote: reported, and the guest's read returns all-ones.
        // Expected: heartbeat + timeout = 1.2 s (the log line below prints
        // it); the bound leaves room for a nested guest on a loaded machine.
        let hung_after = rep["hung-after-s"].as_f64().unwrap();
        assert!(hung_after < 8.0, "REMOTE_HUNG after {hung_after:.1} s");
        assert_eq!(
            rep["remote-hung"]["data"]["devices"],
            serde_json::json!(["dma0"])
        );
        assert_eq!(value(out, "dma0_after_stop="), "0xFFFFFFFF", "{diag}");
        let misc_hung = rep["query-remote-hung"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == "misc")
            .unwrap()
            .clone();
        assert_eq!(misc_hung["state"], "hung");

        // 7. Dead remote: reported at once; the VM keeps running.
        let died_after = rep["died-after-s"].as_f64().unwrap();
        assert!(died_after < 8.0, "REMOTE_DIED after {died_after:.1} s");
        assert_eq!(rep["remote-died"]["data"]["reason"], "signal");
        assert_eq!(rep["remote-died"]["data"]["signal"], 9);
        assert_eq!(rep["query-status-after-death"]["running"], true);
        assert_eq!(value(out, "dma0_after_kill="), "0xFFFFFFFF");

        // 8. Restart: a new process, the device back where the guest has it.
        assert_eq!(err("restart-unknown")["class"], "DeviceNotFound");
        let restarted = &rep["remote-restarted"]["data"];
        assert_eq!(restarted["devices"], serde_json::json!(["dma0"]));
        assert_eq!(restarted["problems"], serde_json::json!([]));
        let misc_new = rep["query-remote-restarted"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == "misc")
            .unwrap()
            .clone();
        assert_eq!(misc_new["state"], "running", "{misc_new}");
        assert_ne!(
            misc_new["pid"], misc_hung["pid"],
            "the same process after a restart"
        );
        assert_eq!(misc_new["devices-failed"], false);
        assert_eq!(value(out, "dma0_after_restart="), "0xD3A00001", "{diag}");
        assert!(out.contains("sda-still-works"), "{diag}");
        assert_eq!(value(out, "dma1_id_end="), "0xD3A00001");

        // 9. Automatic restart, within its limit and past it.
        assert_eq!(value(out, "dma3_before="), "0xD3A00001", "{diag}");
        let auto = &rep["auto-restarted"]["data"];
        assert_eq!(auto["reason"], "automatic", "{auto}");
        assert_eq!(auto["devices"], serde_json::json!(["dma3"]));
        assert_eq!(auto["problems"], serde_json::json!([]));
        let recovery_ms = auto["recovery-ms"].as_u64().unwrap();
        assert_ne!(rep["auto-pid-after"], rep["auto-pid-before"]);
        assert_eq!(
            value(out, "dma3_after_auto_restart="),
            "0xD3A00001",
            "{diag}"
        );
        // It crashed while the guest left dma3 alone: its state was saved
        // then, and the new process has it (the register the guest wrote).
        assert_eq!(rep["auto-state-saved"], serde_json::json!(["dma3"]));
        assert_eq!(auto["state-kept"], serde_json::json!(["dma3"]), "{auto}");
        assert_eq!(
            value(out, "dma3_liveness_after_auto_restart="),
            "0xFFFFBCDE",
            "{diag}"
        );
        assert_eq!(rep["auto-second-restart"]["data"]["reason"], "automatic");
        let failed = &rep["auto-failed"]["data"];
        assert!(
            failed["reason"]
                .as_str()
                .is_some_and(|r| r.contains("restart-limit")),
            "{failed}"
        );
        assert_eq!(value(out, "dma3_after_limit="), "0xFFFFFFFF", "{diag}");
        eprintln!("host_qmp: automatic restart of `auto` took {recovery_ms} ms");

        // 10. An operator's restart of `storage`, which still answers: its
        // devices keep their state, so the guest's disk goes on as if nothing
        // happened (no SCSI error or reset in its log) and dma1 keeps its
        // register. bad1 (failed) comes back reset, and the command says so.
        let st = &rep["storage-restarted"]["data"];
        let kept: Vec<&str> = st["state-kept"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(kept.contains(&"lsi0") && kept.contains(&"dma1"), "{st}");
        for p in st["problems"].as_array().unwrap() {
            assert!(p.as_str().unwrap().starts_with("bad1"), "{st}");
        }
        assert!(out.contains("sda-same-after-restart"), "{diag}");
        assert_eq!(
            value(out, "dma1_liveness_after_restart="),
            "0xFFFFEDCB",
            "{diag}"
        );
        assert_eq!(value(out, "scsi_errors_added="), "0", "{diag}");

        // 11. The power button.
        assert_eq!(rep["system_powerdown"], serde_json::json!({}), "{diag}");
        assert!(out.contains("power-button-pressed"), "{diag}");
        assert_eq!(r["host-exit"], 0, "{diag}");
        assert_eq!(rep["shutdown"]["event"], "SHUTDOWN", "{diag}");
        assert_eq!(
            rep["shutdown"]["data"]["reason"], "guest-shutdown",
            "{diag}"
        );

        eprintln!(
        "host_qmp: passed in {:.1} s; REMOTE_HUNG {:.2} s after SIGSTOP, REMOTE_DIED {:.2} s after SIGKILL; guest read of the hung BAR took {} ms",
        t0.elapsed().as_secs_f64(),
        hung_after,
        died_after,
        out.lines()
            .find(|l| l.starts_with("dma0_after_stop="))
            .and_then(|l| l.split("ms=").nth(1))
            .unwrap_or("?")
    );
        fs::remove_dir_all(&dir).ok();
    });
}
