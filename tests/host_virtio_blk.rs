//! Our VMM with the virtio-blk plugin under the real KVM of the nested
//! environment, first in a `remote-host` that `host` spawns, then loaded
//! in-process: the guest's stock `virtio_pci` and `virtio_blk` find vda,
//! and the shared disk job (a direct write and read at known offsets, a
//! file system made, written, remounted and checked) passes in both; the
//! guest's write is on the host image byte for byte. Both VMs run in one
//! L1 boot. Then, under QEMU's own QMP client, `block_resize` of the
//! device grows its image and the guest sees the new capacity by itself
//! (a configuration change interrupt); the remote is restarted, and the
//! guest's write at its new end goes through the new process, completed
//! on the MSI-X vector it programmed before; and the VM is live-migrated
//! (over unix:) to a second VMM with its own remote while the guest
//! writes and reads back blocks, and finishes there.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use system_tests::{
    check_disk_job, disk_job, make_lsi_image, prepare_vm, run_qmp_driver, tail_lines, IMAGE_SIZE,
    VIRTIO_BLK_MODULES,
};
use testenv::{parse_console, target_bin, NestedOptions};

/// The guest's modules: the virtio PCI transport and block driver, and
/// what mounting ext2 through the ext4 driver needs.
fn modules() -> Vec<&'static str> {
    let mut m = VIRTIO_BLK_MODULES.to_vec();
    m.extend(["crc16", "mbcache", "jbd2", "crc32c_generic", "ext4"]);
    m
}

/// L1's /tmp is a tmpfs (UNIX sockets do not work on 9p).
const QMP_SOCKET: &str = "/tmp/host-virtio-blk/qmp.sock";

fn config(kernel: &Path, name: &str, placement: &str) -> String {
    format!(
        r#"[vm]
memory = "256M"
vcpus = 2
kernel = "{kernel}"
initrd = "initrd.cpio"
cmdline = "console=ttyS0 quiet"
console-log = "{name}-console.log"

[[remote]]
id = "storage"
log = "{name}-remote.log"
# A nested guest on a loaded machine can stall for seconds.
timeout-ms = 30000

[[device]]
id = "vd0"
{placement}
plugin = "virtio-blk"
slot = 5
file = "{name}.img"
serial = "VD0-{name}"
# Two queues: Linux takes one per vCPU, each with its MSI-X vector.
queues = 2
"#,
        kernel = kernel.display()
    )
}

#[test]
fn virtio_blk_plugin_remote_and_in_process_behind_our_vmm() {
    system_tests::guest_test("host_virtio_blk", |env| {
        let t0 = Instant::now();
        for bin in ["host", "remote-host", "libvirtio_blk.so"] {
            target_bin(bin).unwrap();
        }
        // The serial number through the driver's sysfs attribute (GET_ID),
        // the features the driver accepted (a character per bit), and the
        // interrupts each MSI-X vector took.
        let job = format!(
            "{}\necho \"serial=$(cat /sys/block/vda/serial)\"\necho \"features=$(cat /sys/block/vda/device/features)\"\ngrep virtio /proc/interrupts\n",
            disk_job("vda", "virtio-pci", "virtio_blk|vda")
        );
        let spec = testenv::InitramfsSpec::new(&modules(), &job);
        let dir = prepare_vm(env, "host-virtio-blk", &spec);
        let host = target_bin("host").unwrap();
        let runs = [
            ("remote", "remote = \"storage\""),
            ("inproc", "in-process = true"),
        ];
        let mut cmd = String::new();
        for (name, placement) in runs {
            make_lsi_image(&dir.join(format!("{name}.img")));
            fs::write(
                dir.join(format!("{name}.toml")),
                config(&env.kernel, name, placement),
            )
            .unwrap();
            cmd.push_str(&format!(
            "t=$(date +%s%N); HOST_STATS=1 timeout 240 {host} run {cfg}; echo {name}-EXIT=$?; echo {name}-MS=$(( ($(date +%s%N) - t) / 1000000 )); ",
            host = host.display(),
            cfg = dir.join(format!("{name}.toml")).display(),
        ));
        }
        let opts = NestedOptions {
            name: "host_virtio_blk".into(),
            timeout: Duration::from_secs(600),
            ..Default::default()
        };
        let l1 = env
            .run_nested(&["sh".into(), "-c".into(), cmd], &opts)
            .unwrap();
        eprintln!("--- L1 output ---\n{}", l1.output);
        for (name, _) in runs {
            let console =
                fs::read_to_string(dir.join(format!("{name}-console.log"))).unwrap_or_default();
            let log =
                fs::read_to_string(dir.join(format!("{name}-remote.log"))).unwrap_or_default();
            let r = parse_console(&console).unwrap_or_else(|| {
            panic!(
                "{name}: no job markers in the guest console, which ends:\n{}\n--- console ---\n{console}\n--- remote log ---\n{log}",
                tail_lines(&console, 12)
            )
        });
            eprintln!("--- {name}: guest job output ---\n{}", r.output);
            check_disk_job(&r, &dir.join(format!("{name}.img")), "virtio-pci");
            assert!(
                r.output.contains(&format!("serial=VD0-{name}")),
                "{name}: the serial number (GET_ID) did not reach the guest:\n{}",
                r.output
            );
            // Linux's virtio_ring accepted EVENT_IDX (bit 29): the device
            // interrupts and is notified only when the other side asks.
            let features = r
                .output
                .lines()
                .find_map(|l| l.trim().strip_prefix("features="))
                .unwrap_or("");
            assert_eq!(
                features.as_bytes().get(29),
                Some(&b'1'),
                "{name}: the driver did not accept EVENT_IDX: features={features}"
            );
            // The driver took MSI-X: the queues' vectors carried the
            // completions (no INTx line for virtio at all), one vector per
            // queue; how the I/O split between them depends on which vCPU
            // issued it.
            let (q0, q1) = (
                msix_count(&r.output, "virtio0-req.0"),
                msix_count(&r.output, "virtio0-req.1"),
            );
            assert!(
                q0.is_some() && q1.is_some(),
                "{name}: no MSI-X vector for each queue:\n{}",
                r.output
            );
            let (q0, q1) = (q0.unwrap_or(0), q1.unwrap_or(0));
            assert!(
                q0 + q1 > 10,
                "{name}: too few MSI-X interrupts on the queues' vectors:\n{}",
                r.output
            );
            assert!(
                r.output
                    .lines()
                    .any(|l| l.contains("virtio0-config") && l.contains("PCI-MSI")),
                "{name}: no configuration vector:\n{}",
                r.output
            );
            eprintln!(
                "host_virtio_blk: {name}: MSI-X interrupts: virtio0-req.0 {q0}, virtio0-req.1 {q1}"
            );
            assert!(
                l1.output.contains(&format!("{name}-EXIT=0")),
                "{name}: host did not exit 0:\n{}",
                l1.output
            );
            // Queue notifications: in a remote they are doorbells (KVM
            // ioeventfds the remote's ring thread waits on) and never exit to
            // the VMM; in-process every one is a VM exit the VMM counts.
            let notifies = notify_writes(&l1.output, name);
            eprintln!("host_virtio_blk: {name}: queue notify writes seen by the VMM: {notifies}");
            if name == "remote" {
                assert_eq!(
                notifies, 0,
                "{name}: queue notifications exited to the VMM instead of ringing the remote's doorbells:\n{}",
                l1.output
            );
                let rung = doorbells_taken(&l1.output, name);
                eprintln!("host_virtio_blk: {name}: doorbells the device took: {rung}");
                assert!(
                    rung > 10,
                    "{name}: the remote's device took too few doorbells ({rung}):\n{}",
                    l1.output
                );
            } else {
                assert!(
                    notifies > 10,
                    "{name}: the VMM counted too few queue notifications:\n{}",
                    l1.output
                );
            }
        }
        fs::remove_dir_all(&dir).ok();
        resize_reaches_the_guest(env);
        eprintln!(
            "host_virtio_blk: passed in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    });
}

/// Writes to the queues' notify area (BAR 0 from 0x3000) that the VMM
/// counted for the run `name` (its `HOST_STATS` lines come before its
/// `name-EXIT=` line in L1's output).
fn notify_writes(l1_output: &str, name: &str) -> u64 {
    let end = l1_output
        .find(&format!("{name}-EXIT="))
        .unwrap_or(l1_output.len());
    let start = l1_output[..end].rfind("-EXIT=").unwrap_or(0);
    l1_output[start..end]
        .lines()
        .filter(|l| l.contains("device=vd0 register bar=0 "))
        .filter_map(|l| {
            let field = |k: &str| l.split_whitespace().find_map(|w| w.strip_prefix(k));
            let offset = u64::from_str_radix(field("offset=0x")?, 16).ok()?;
            let writes = field("writes=")?.parse::<u64>().ok()?;
            (0x3000..0x3040).contains(&offset).then_some(writes)
        })
        .sum()
}

/// The doorbells vd0's remote counted for the run `name` (its
/// `host-stats` device line, before `name-EXIT=`).
fn doorbells_taken(l1_output: &str, name: &str) -> u64 {
    let end = l1_output
        .find(&format!("{name}-EXIT="))
        .unwrap_or(l1_output.len());
    l1_output[..end]
        .lines()
        .filter(|l| l.contains("host-stats: device=vd0 bar_reads="))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("doorbells="))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .next_back()
        .unwrap_or(0)
}

/// The interrupts a `/proc/interrupts` line named `name` counts (all
/// CPUs), if it is an MSI line.
fn msix_count(output: &str, name: &str) -> Option<u64> {
    let line = output
        .lines()
        .find(|l| l.trim_end().ends_with(name) && l.contains("PCI-MSI"))?;
    let counts = line.split_once(':')?.1;
    Some(
        counts
            .split_whitespace()
            .map_while(|w| w.parse::<u64>().ok())
            .sum(),
    )
}

/// The guest's side of `block_resize`: it notes the capacity, waits for
/// the driver's go, waits for the capacity to change by itself, writes a
/// marker at the new last sector. Then the I/O during the migration
/// (round `i` writes 64 KiB blocks of "virtio-round-i" lines at block
/// `16 + i % 32` and reads them back) until the driver says stop.
const RESIZE_JOB: &str = r#"
i=0; while [ ! -e /sys/block/vda/dev ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
[ -b /dev/vda ] || mknod /dev/vda b $(cut -d: -f1 /sys/block/vda/dev) $(cut -d: -f2 /sys/block/vda/dev)
before=$(cat /sys/block/vda/size)
echo "before=$before"
echo "STEP ready"
read -r -t 300 line || { echo "no go"; exit 20; }
i=0; while [ "$(cat /sys/block/vda/size)" = "$before" ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
after=$(cat /sys/block/vda/size)
echo "after=$after"
printf 'VIRTIO-BLK-GREW' | dd of=/dev/vda bs=512 seek=$((after - 1)) conv=sync,notrunc oflag=direct 2>/dev/null || exit 3
echo "STEP grown"
# Blocks written and read back without pause while the VM moves.
(
  i=0; bad=0
  while [ ! -e /tmp/stop ] && [ $i -lt 100000 ]; do
    yes "virtio-round-$i" | head -c 65536 > /tmp/b
    at=$(( 16 + i % 32 ))
    dd if=/tmp/b of=/dev/vda bs=65536 seek=$at count=1 oflag=direct conv=notrunc 2>/dev/null || { echo "write $i failed"; break; }
    dd if=/dev/vda of=/tmp/r bs=65536 skip=$at count=1 iflag=direct 2>/dev/null || { echo "read $i failed"; break; }
    cmp -s /tmp/b /tmp/r || { bad=$((bad + 1)); echo "round $i: read back differs"; }
    i=$((i + 1))
    [ $((i % 4)) -eq 0 ] && echo "STEP tick"
  done
  echo "rounds=$i bad=$bad"
) &
loop=$!
read -r -t 400 line || { echo "no stop"; exit 21; }
touch /tmp/stop; wait $loop
echo "grew-read=$(dd if=/dev/vda bs=512 skip=$((after - 1)) count=1 iflag=direct 2>/dev/null | head -c 15)"
dmesg | grep -i 'capacity change'
dmesg | grep -ciE 'I/O error|virtio.*(error|reset)' | sed 's/^/io-errors=/'
grep virtio /proc/interrupts
echo "STEP done"
"#;

fn resize_reaches_the_guest(env: &testenv::Env) {
    let spec = testenv::InitramfsSpec::new(&modules(), RESIZE_JOB);
    let dir = prepare_vm(env, "host-virtio-blk-qmp", &spec);
    make_lsi_image(&dir.join("vd.img"));
    let cfg = config(&env.kernel, "vm", "remote = \"storage\"")
        .replace(
            "console-log = \"vm-console.log\"",
            "console-log = \"console.log\"",
        )
        .replace("file = \"vm.img\"", "file = \"vd.img\"");
    fs::write(dir.join("vm.toml"), cfg).unwrap();
    let run = run_qmp_driver(
        env,
        "host_virtio_blk_resize",
        "virtio_driver.py",
        &dir,
        QMP_SOCKET,
        Duration::from_secs(480),
        &[
            "vm-remote.log",
            "console-b.log",
            "vm-b-remote.log",
            "vm-b.toml.host-stderr",
        ],
    );
    // The guest started on A and finished on B.
    let job =
        run.check_across(&[fs::read_to_string(dir.join("console-b.log")).unwrap_or_default()]);
    let (r, diag) = (&run.results, &run.diag);
    assert_eq!(job.status, 0, "guest job failed:\n{diag}");
    let rep = &r["replies"];
    assert!(
        rep["shrink"]
            .as_str()
            .unwrap_or_default()
            .contains("shrinking"),
        "a shrink was not refused:\n{diag}"
    );
    assert_eq!(rep["resize"], serde_json::json!({}), "{diag}");
    // The write after the remote's restart completed through the new
    // process, on the vector the guest programmed before it.
    assert_eq!(rep["restarted"]["data"]["id"], "storage", "{diag}");
    assert_eq!(
        rep["restarted"]["data"]["state-kept"],
        serde_json::json!(["vd0"]),
        "{diag}"
    );
    let sectors = |key: &str| -> u64 {
        job.output
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in the guest output:\n{diag}"))
    };
    assert_eq!(sectors("before=") * 512, IMAGE_SIZE, "{diag}");
    assert_eq!(
        sectors("after=") * 512,
        2 * IMAGE_SIZE,
        "the guest did not see the new size:\n{diag}"
    );
    assert!(job.output.contains("capacity change"), "{diag}");
    assert!(
        msix_count(&job.output, "virtio0-config").is_some_and(|n| n >= 1),
        "the configuration change did not come on its MSI-X vector:\n{diag}"
    );
    let img = fs::read(dir.join("vd.img")).unwrap();
    assert_eq!(img.len() as u64, 2 * IMAGE_SIZE);
    let last = &img[img.len() - 512..];
    assert_eq!(
        &last[..15],
        b"VIRTIO-BLK-GREW",
        "the guest's write at its new end"
    );
    // The live migration (over unix:, during the guest's I/O): the
    // source stopped, its copy check found every page sent as it is, it
    // and its remote are gone, and the guest went on on B.
    assert_eq!(rep["migrated"]["status"], "completed", "{diag}");
    assert_eq!(rep["source-status"], "postmigrate", "{diag}");
    assert_eq!(rep["source-exit"], 0, "{diag}");
    assert_eq!(rep["source-remotes-gone"], true, "{diag}");
    let verify = rep["source-verify"].as_array().cloned().unwrap_or_default();
    assert!(
        verify
            .last()
            .and_then(|v| v.as_str())
            .is_some_and(|v| v.contains("sent as they are now")),
        "the source's copy check: {verify:?}\n{diag}"
    );
    assert_eq!(rep["status-b"], "running", "{diag}");
    let rounds: u64 = job
        .output
        .lines()
        .find_map(|l| l.strip_prefix("rounds="))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no rounds line:\n{diag}"));
    assert!(
        job.output.contains(&format!("rounds={rounds} bad=0")),
        "a block read back differs:\n{diag}"
    );
    assert!(rounds >= 8, "the guest's I/O ran on A and on B:\n{diag}");
    eprintln!(
        "host_virtio_blk: live migration during the guest's I/O: {rounds} rounds, 0 differ; downtime {} ms, total {} ms",
        rep["migrated"]["downtime"], rep["migrated"]["total-time"]
    );
    assert!(
        job.output.contains("grew-read=VIRTIO-BLK-GREW"),
        "the write before the move, read on B:\n{diag}"
    );
    assert!(
        job.output.contains("io-errors=0"),
        "the guest saw an I/O error:\n{diag}"
    );
    // The host image holds the guest's last round where it wrote it.
    let last = rounds - 1;
    let at = ((16 + last % 32) * 65536) as usize;
    let want = format!("virtio-round-{last}\n");
    assert_eq!(
        &img[at..at + want.len()],
        want.as_bytes(),
        "the last round's block on the host image"
    );
    assert_eq!(r["host-exit"], 0, "{diag}");
    fs::remove_dir_all(&dir).ok();
}
