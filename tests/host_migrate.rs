//! Snapshot and restore with a real guest in the middle of its disk I/O
//! (issue 15): the guest writes 64 KiB blocks of a known pattern through
//! the LSI controller in a remote with direct I/O, reading each back and
//! comparing it. Meanwhile the QMP driver (PyPI's `qemu.qmp`,
//! tests/migrate_driver.py) stops and continues the VM once, then saves
//! it with `migrate file:` and kills the VMM (its remote ends with it);
//! a new VMM started with `--incoming file:` and a new remote takes the
//! guest over, and the job goes on to its end. Checked as a user would:
//! every block the guest read back matched, the job ran on both sides of
//! the snapshot, the host image holds exactly the guest's blocks, no
//! SCSI error, and the source's processes are gone.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use system_tests::{make_lsi_image, prepare_lsi_vm, run_qmp_driver_with, GUEST_OFF};
use testenv::require_env;

/// L1's /tmp is a tmpfs (UNIX sockets do not work on 9p).
const QMP_SOCKET: &str = "/tmp/host-migrate/qmp.sock";
const ROUNDS: u64 = 400;
const BLOCK: u64 = 64 << 10;

fn config(kernel: &Path, console: &str) -> String {
    format!(
        r#"[vm]
memory = "256M"
vcpus = 2
kernel = "{kernel}"
initrd = "initrd.cpio"
cmdline = "console=ttyS0 quiet"
console-log = "{console}"

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
"#,
        kernel = kernel.display()
    )
}

/// The block of round `i`, as the guest makes it (`yes | head -c`).
fn block(i: u64) -> Vec<u8> {
    format!("migrate-round-{i}\n")
        .into_bytes()
        .into_iter()
        .cycle()
        .take(BLOCK as usize)
        .collect()
}

fn guest_job() -> String {
    format!(
        r#"
i=0
while [ ! -b /dev/sda ] && [ $i -lt 600 ]; do
    [ -e /sys/block/sda/dev ] && mknod /dev/sda b $(cut -d: -f1 /sys/block/sda/dev) $(cut -d: -f2 /sys/block/sda/dev)
    sleep 0.1; i=$((i+1))
done
[ -b /dev/sda ] || {{ echo "no /dev/sda"; exit 1; }}
errs() {{ dmesg | grep -ciE "abort|reset|timeout|timed out|I/O error"; }}
e0=$(errs)
i=0; bad=0
while [ $i -lt {ROUNDS} ]; do
    yes "migrate-round-$i" | head -c {BLOCK} > /tmp/b
    dd if=/tmp/b of=/dev/sda bs={BLOCK} seek=$(( {first} + i )) count=1 oflag=direct conv=notrunc 2>/dev/null || {{ echo "write $i failed"; exit 3; }}
    dd if=/dev/sda of=/tmp/r bs={BLOCK} skip=$(( {first} + i )) count=1 iflag=direct 2>/dev/null || {{ echo "read $i failed"; exit 4; }}
    cmp -s /tmp/b /tmp/r || {{ bad=$((bad + 1)); echo "round $i: read back differs"; }}
    echo "round $i"
    [ $i -eq 8 ] && echo "STEP writing"
    i=$((i + 1))
done
echo "rounds=$i bad=$bad"
echo "scsi_errors_added=$(( $(errs) - e0 ))"
echo "STEP done"
"#,
        first = GUEST_OFF / BLOCK,
    )
}

#[test]
fn a_guest_in_the_middle_of_disk_io_is_snapshotted_and_restored_in_new_processes() {
    let Some(env) = require_env("host_migrate") else {
        return;
    };
    let dir = prepare_lsi_vm(&env, "host-migrate", &guest_job());
    make_lsi_image(&dir.join("disk0.img"));
    fs::write(dir.join("vm.toml"), config(&env.kernel, "console.log")).unwrap();
    fs::write(dir.join("vm2.toml"), config(&env.kernel, "console2.log")).unwrap();
    let run = run_qmp_driver_with(
        &env,
        "host_migrate",
        "migrate_driver.py",
        &dir,
        QMP_SOCKET,
        Duration::from_secs(900),
        &["storage.log", "vm2.toml.host-stderr", "console2.log"],
        false,
    );
    let (r, diag) = (&run.results, &run.diag);
    assert!(
        r.get("failure").is_none() && run.l1_output.contains("DRIVER-EXIT=0"),
        "the driver failed:\n{diag}"
    );
    let source = run.console.clone();
    let restored = fs::read_to_string(dir.join("console2.log"))
        .unwrap_or_default()
        .replace("\r\n", "\n");
    let job = testenv::parse_console(&format!("{source}\n{restored}"))
        .unwrap_or_else(|| panic!("no job markers across both consoles:\n{diag}"));
    assert_eq!(job.status, 0, "guest job failed:\n{diag}");
    assert!(
        job.output.contains(&format!("rounds={ROUNDS} bad=0")),
        "{diag}"
    );
    assert!(job.output.contains("scsi_errors_added=0"), "{diag}");
    // The snapshot came in the middle: some rounds ran before it, the
    // rest only after the restore.
    let before = source.matches("\nround ").count() as u64;
    let after = restored.matches("\nround ").count() as u64;
    assert!(
        before > 8 && before < ROUNDS && after > 0,
        "rounds before the snapshot {before}, after {after}:\n{diag}"
    );
    let rep = &r["replies"];
    assert_eq!(rep["status-stopped"], "paused", "{diag}");
    assert_eq!(rep["status-cont"], "running", "{diag}");
    assert_eq!(rep["migrate"]["status"], "completed", "{diag}");
    assert_eq!(rep["status-after"], "postmigrate", "{diag}");
    assert_eq!(rep["status-restored"], "running", "{diag}");
    assert_eq!(rep["source-remotes-gone"], true, "{diag}");
    assert!(
        rep["bad-uri"].as_str().unwrap_or("").contains("file:PATH"),
        "{diag}"
    );
    let ram = rep["migrate"]["ram"]["transferred"].as_u64().unwrap_or(0);
    assert!(ram > (1 << 20), "{diag}");
    assert_eq!(r["host-exit"], 0, "{diag}");
    // The host image holds exactly the guest's blocks.
    let img = fs::read(dir.join("disk0.img")).unwrap();
    for i in 0..ROUNDS {
        let at = (GUEST_OFF + i * BLOCK) as usize;
        assert!(
            img[at..at + BLOCK as usize] == block(i)[..],
            "block {i} on the image is not the guest's:\n{diag}"
        );
    }
    eprintln!(
        "host_migrate: {before} rounds before the snapshot, {after} after; snapshot {} bytes ({} of RAM with data), total {} ms, downtime {} ms",
        rep["snapshot-bytes"], ram, rep["migrate"]["total-time"], rep["migrate"]["downtime"]
    );
    fs::remove_dir_all(&dir).ok();
}
