//! `host run` (our VMM) boots Debian's stock kernel with a busybox
//! initramfs to its job, under the real KVM of the nested environment,
//! with 2 vCPUs and ACPI, and exits 0 when the guest powers off (ACPI S5);
//! a line "Kernel panic" that a user program prints changes nothing. In
//! the same L1 boot, a guest that runs `reboot -f` (ACPI reset register)
//! with `on-reboot = "exit"` and a guest whose kernel panics (pvpanic) end
//! the VMM too, each with its exit code, and a guest without ACPI (the MP
//! table only) still powers off. The reboot guest boots the same kernel as
//! an ELF `vmlinux` (unpacked from the bzImage): the VMM's other boot
//! path.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::time::{Duration, Instant};

use testenv::{parse_console, target_bin, InitramfsSpec, NestedOptions};

#[test]
fn host_boots_stock_kernel_to_its_job() {
    system_tests::guest_test("host_boot", |env| {
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
echo "acpi_tables=$(ls /sys/firmware/acpi/tables | grep -v -e data -e dynamic | tr '\n' ,)"
echo "Kernel panic - not syncing: only a line a user program printed"
read -t 60 line && echo "input=$line"
exit 7
"#;
        let initrd = dir.join("initrd.cpio");
        env.build_initramfs(&InitramfsSpec::new::<&str>(&[], job), &initrd)
            .unwrap();
        let vmlinux = dir.join("vmlinux");
        testenv::vmlinux::extract_vmlinux(&env.kernel, &vmlinux).unwrap();
        let write_config = |name: &str, kernel: &std::path::Path, initrd: &str, vcpus: u32| {
            let config = dir.join(format!("{name}.toml"));
            fs::write(
                &config,
                format!(
                    r#"[vm]
memory = "256M"
vcpus = {vcpus}
kernel = "{}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet"
console-log = "{name}-console.log"
{on_reboot}{acpi}"#,
                    kernel.display(),
                    acpi = if name == "noacpi" {
                        "acpi = false\n"
                    } else {
                        ""
                    },
                    // The reboot guest checks QEMU's -no-reboot behaviour (the
                    // restart itself is tests/host_reset.rs).
                    on_reboot = if name == "reboot" {
                        "on-reboot = \"exit\"\n"
                    } else {
                        ""
                    },
                ),
            )
            .unwrap();
            config
        };
        write_config("vm", &env.kernel, "initrd.cpio", 2);
        for (name, modules, job) in [
            (
                "reboot",
                &[][..],
                "echo rebooting; console-drain; reboot -f; sleep 60",
            ),
            (
                // Linux's pvpanic driver binds the DSDT's QEMU0001 device.
                "panic",
                &["pvpanic-mmio"][..],
                "echo crashing; console-drain; echo c > /proc/sysrq-trigger; sleep 60",
            ),
            (
                "noacpi",
                &[][..],
                "echo \"noacpi_tables=$(ls /sys/firmware/acpi/tables 2>/dev/null | wc -l)\"",
            ),
        ] {
            env.build_initramfs(
                &InitramfsSpec::new(modules, job),
                &dir.join(format!("{name}.cpio")),
            )
            .unwrap();
            let kernel = if name == "reboot" {
                &vmlinux
            } else {
                &env.kernel
            };
            write_config(name, kernel, &format!("{name}.cpio"), 1);
        }
        let run = |name: &str, key: &str| {
            format!(
                "HOST_STATS=1 timeout 120 {} run {}; echo {key}-EXIT=$?",
                host.display(),
                dir.join(format!("{name}.toml")).display()
            )
        };
        // The first VM also gets console input (stdin -> COM1).
        let cmd = format!(
        "t0=$(date +%s%N); (while :; do echo console-input-ok; sleep 1; done) | {}; echo HOST-MS=$(( ($(date +%s%N) - t0) / 1000000 )); {}; {}; {}",
        run("vm", "HOST"),
        run("reboot", "REBOOT"),
        run("panic", "PANIC"),
        run("noacpi", "NOACPI"),
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
        let console = fs::read_to_string(dir.join("vm-console.log")).unwrap_or_default();
        let job = parse_console(&console)
            .unwrap_or_else(|| panic!("no job markers in the guest console:\n{console}"));
        eprintln!("--- guest job output ---\n{}", job.output);
        // The VMM exits 0 because the guest powered off through ACPI (the
        // "Kernel panic" line its job printed ended nothing), and the job's
        // own status is what the guest reported.
        assert!(
            l1.output.contains("HOST-EXIT=0") && l1.output.contains("exit=PowerOff code=0"),
            "host did not exit 0 on the guest's power-off:\n{}",
            l1.output
        );
        assert_eq!(job.status, 7);
        assert!(job.output.contains("cpus=2"), "{}", job.output);
        assert!(
            job.output.contains("hostbridge=0x1b36:0x0008"),
            "{}",
            job.output
        );
        assert!(
            job.output.contains("acpi_tables=APIC,DSDT,FACP,FACS,"),
            "{}",
            job.output
        );
        assert!(job
            .output
            .contains("Kernel panic - not syncing: only a line"));
        // With ACPI the kernel reboots through the FADT's reset register.
        assert!(!job.output.contains("reboot=k"), "{}", job.output);
        assert!(
            // Lines sent before the guest opened its console may be cut.
            job.output
                .lines()
                .any(|l| l.starts_with("input=") && l.ends_with("input-ok")),
            "console input did not reach the guest:\n{}",
            job.output
        );
        // reboot -f: the kernel restarts through ACPI's reset register, which
        // ends the VM with on-reboot = "exit"; exit code 0. A panic ends the VM
        // as soon as pvpanic reports it (before panic=-1 reboots); exit 2.
        // The reboot guest's kernel was the ELF vmlinux: it reached its job.
        let reboot = fs::read_to_string(dir.join("reboot-console.log")).unwrap_or_default();
        assert!(reboot.contains("rebooting"), "ELF vmlinux guest:\n{reboot}");
        assert!(
            l1.output.contains("REBOOT-EXIT=0"),
            "reboot: host did not exit 0:\n{}\n{reboot}",
            l1.output
        );
        assert!(l1.output.contains("exit=Reboot code=0"), "{}", l1.output);
        let panic = fs::read_to_string(dir.join("panic-console.log")).unwrap_or_default();
        assert!(panic.contains("Kernel panic"), "{panic}");
        assert!(
            l1.output.contains("PANIC-EXIT=2") && l1.output.contains("exit=Panic code=2"),
            "panic: host did not exit 2:\n{}\n{panic}",
            l1.output
        );
        // Without ACPI: no tables, and the power-off is seen on the console.
        let noacpi = fs::read_to_string(dir.join("noacpi-console.log")).unwrap_or_default();
        assert!(noacpi.contains("noacpi_tables=0"), "{noacpi}");
        assert!(
            l1.output.contains("NOACPI-EXIT=0") && l1.output.contains("exit=Halt code=0"),
            "noacpi: host did not exit 0:\n{}\n{noacpi}",
            l1.output
        );
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
    });
}
