//! `host run` (our VMM) boots Debian's stock kernel with a busybox
//! initramfs to its job, under the real KVM of the nested environment,
//! with 2 vCPUs, and exits when the guest powers off. One L1 boot.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::time::{Duration, Instant};

use testenv::{parse_console, require_env, target_bin, InitramfsSpec, NestedOptions};

#[test]
fn host_boots_stock_kernel_to_its_job() {
    let Some(env) = require_env("host_boot") else {
        return;
    };
    let t0 = Instant::now();
    let host = target_bin("host").unwrap();
    let dir = testenv::workspace_root()
        .join("target")
        .join(format!("host-boot-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let job = r#"
echo "cpus=$(grep -c ^processor /proc/cpuinfo)"
echo "mem_kb=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)"
echo "cmdline=$(cat /proc/cmdline)"
echo "hostbridge=$(cat /sys/bus/pci/devices/0000:00:00.0/vendor):$(cat /sys/bus/pci/devices/0000:00:00.0/device)"
exit 7
"#;
    let initrd = dir.join("initrd.cpio");
    env.build_initramfs(&InitramfsSpec::new::<&str>(&[], job), &initrd)
        .unwrap();
    let config = dir.join("vm.toml");
    fs::write(
        &config,
        format!(
            r#"[vm]
memory = "256M"
vcpus = 2
kernel = "{}"
initrd = "initrd.cpio"
cmdline = "console=ttyS0 quiet"
console-log = "console.log"
"#,
            env.kernel.display()
        ),
    )
    .unwrap();
    let cmd = format!(
        "t0=$(date +%s%N); HOST_STATS=1 {} run {}; echo HOST-EXIT=$?; echo HOST-MS=$(( ($(date +%s%N) - t0) / 1000000 ))",
        host.display(),
        config.display()
    );
    let opts = NestedOptions {
        name: "host_boot".into(),
        timeout: Duration::from_secs(480),
        ..Default::default()
    };
    let l1 = env
        .run_nested(&["sh".into(), "-c".into(), cmd], &opts)
        .unwrap();
    eprintln!("--- L1 output ---\n{}", l1.output);
    let console = fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let job = parse_console(&console)
        .unwrap_or_else(|| panic!("no job markers in the guest console:\n{console}"));
    eprintln!("--- guest job output ---\n{}", job.output);
    // The VMM exits 0 because the guest powered off, and the job's own
    // status is what the guest reported.
    assert!(
        l1.output.contains("HOST-EXIT=0"),
        "host did not exit 0:\n{}",
        l1.output
    );
    assert_eq!(job.status, 7);
    assert!(job.output.contains("cpus=2"), "{}", job.output);
    assert!(
        job.output.contains("hostbridge=0x1b36:0x0008"),
        "{}",
        job.output
    );
    assert!(job.output.contains("reboot=k"), "{}", job.output);
    let ms = l1
        .output
        .lines()
        .find_map(|l| l.trim().strip_prefix("HOST-MS="))
        .unwrap_or("?")
        .to_owned();
    fs::remove_dir_all(&dir).ok();
    eprintln!(
        "host_boot: passed in {:.1} s (host run in L1: {ms} ms)",
        t0.elapsed().as_secs_f64()
    );
}
