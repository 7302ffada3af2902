//! Our VMM with the virtio-blk plugin under the real KVM of the nested
//! environment, first in a `remote-host` that `host` spawns, then loaded
//! in-process: the guest's stock `virtio_pci` and `virtio_blk` find vda,
//! and the shared disk job (a direct write and read at known offsets, a
//! file system made, written, remounted and checked) passes in both; the
//! guest's write is on the host image byte for byte. Both VMs run in one
//! L1 boot.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use system_tests::{check_disk_job, disk_job, make_lsi_image, prepare_vm, tail_lines};
use testenv::{parse_console, require_env, target_bin, NestedOptions};

/// The guest's modules: the virtio PCI transport and block driver, and
/// what mounting ext2 through the ext4 driver needs.
const MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "crc16",
    "mbcache",
    "jbd2",
    "crc32c_generic",
    "ext4",
];

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
"#,
        kernel = kernel.display()
    )
}

#[test]
fn virtio_blk_plugin_remote_and_in_process_behind_our_vmm() {
    let Some(env) = require_env("host_virtio_blk") else {
        return;
    };
    let t0 = Instant::now();
    for bin in ["host", "remote-host", "libvirtio_blk.so"] {
        target_bin(bin).unwrap();
    }
    // The serial number through the driver's sysfs attribute (GET_ID).
    let job = format!(
        "{}\necho \"serial=$(cat /sys/block/vda/serial)\"\n",
        disk_job("vda", "virtio-pci", "virtio_blk|vda")
    );
    let spec = testenv::InitramfsSpec::new(MODULES, &job);
    let dir = prepare_vm(&env, "host-virtio-blk", &spec);
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
        let log = fs::read_to_string(dir.join(format!("{name}-remote.log"))).unwrap_or_default();
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
        assert!(
            l1.output.contains(&format!("{name}-EXIT=0")),
            "{name}: host did not exit 0:\n{}",
            l1.output
        );
    }
    eprintln!(
        "host_virtio_blk: passed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    fs::remove_dir_all(&dir).ok();
}
