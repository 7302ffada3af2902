//! The pci-serial plugin under a real guest: in the nested-KVM
//! environment our VMM runs a Linux guest with a pci-serial port in a
//! spawned `remote-host` (remote `misc`). The guest's own `8250_pci`
//! driver binds it as a `ttyS` port and the guest starts a shell on it;
//! tests/serial_driver.py types a command into the plugin's UNIX socket
//! (as `socat` would) and the shell's answer comes back through it and
//! into the port's output file. Then the VM is live-migrated (over unix:)
//! to a second VMM with its own remote, port socket and output file, and
//! the same shell answers through the new port. A third port lives in a
//! remote the driver starts itself, as an orchestrator would (`socket =`
//! in the config: no control channel of the VMM's): its shell answers on
//! A and, its state moved by vfio-user migration v2 into B's own
//! orchestrated remote, on B. Then a second port is
//! hot-added with `device_add` into that running remote; the guest finds
//! it by itself (ACPI PCI hotplug, no rescan), and a shell on it answers
//! as well.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::time::Duration;

use system_tests::{prepare_vm, run_qmp_driver};
use testenv::target_bin;

/// L1's /tmp is a tmpfs (UNIX sockets do not work on 9p); the driver puts
/// the ports' sockets beside the monitor's.
const QMP_SOCKET: &str = "/tmp/host-serial/qmp.sock";

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
id = "misc"
log = "misc.log"
timeout-ms = 30000

[[device]]
id = "ser0"
remote = "misc"
plugin = "pci-serial"
slot = 5
socket = "/tmp/host-serial/ser0.sock"
output = "ser0.out"

# An orchestrator's remote: the driver starts its remote-host; the VMM
# has no control channel to it, so its state moves by vfio-user
# migration v2.
[[remote]]
id = "orch"
socket = "/tmp/host-serial/orch"
log = "orch.log"
timeout-ms = 30000

[[device]]
id = "ser2"
remote = "orch"
plugin = "pci-serial"
slot = 7
socket = "/tmp/host-serial/ser2.sock"
output = "ser2.out"
"#,
        kernel = kernel.display()
    )
}

/// The guest side: find each port's tty through sysfs, start a shell on
/// it, tell the driver (`step`) and wait for its `go`.
fn guest_job() -> &'static str {
    r#"
step() { echo "STEP $1"; read -r -t 300 line || { echo "no go after $1"; exit 20; }; }
ttyof() { ls /sys/bus/pci/devices/0000:00:$1.0/tty/ 2>/dev/null | head -n1; }
shell_on() {
    t=$1
    [ -c /dev/$t ] || mknod /dev/$t c $(cut -d: -f1 /sys/class/tty/$t/dev) $(cut -d: -f2 /sys/class/tty/$t/dev)
    setsid sh -c "exec sh -i </dev/$t >/dev/$t 2>&1" &
}
t0=$(ttyof 05)
[ -n "$t0" ] || { echo "no tty on 00:05.0"; ls /sys/bus/pci/devices/; exit 1; }
echo "tty0=$t0 driver0=$(basename $(readlink /sys/bus/pci/devices/0000:00:05.0/driver))"
shell_on $t0
t2=$(ttyof 07)
[ -n "$t2" ] || { echo "no tty on 00:07.0"; exit 1; }
echo "tty2=$t2 driver2=$(basename $(readlink /sys/bus/pci/devices/0000:00:07.0/driver))"
shell_on $t2
step ready

i=0; while [ -z "$(ttyof 06)" ] && [ $i -lt 300 ]; do sleep 0.2; i=$((i+1)); done
t1=$(ttyof 06)
[ -n "$t1" ] || { echo "no tty on 00:06.0 (ACPI hotplug, no rescan)"; exit 2; }
echo "tty1=$t1 driver1=$(basename $(readlink /sys/bus/pci/devices/0000:00:06.0/driver))"
echo "uarts=$(dmesg | grep -c 'is a 16550A')"
shell_on $t1
step hot-ready
echo "STEP done"
"#
}

fn value<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .flat_map(|l| l.split_whitespace())
        .find_map(|w| w.strip_prefix(key))
        .unwrap_or_else(|| panic!("no `{key}` in the guest output:\n{output}"))
}

/// Waits (bounded) until `file` holds `needle`: the plugin's output
/// thread writes it shortly after the socket got it.
fn file_gets(file: &Path, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = String::from_utf8_lossy(&fs::read(file).unwrap_or_default()).into_owned();
        if text.contains(needle) || std::time::Instant::now() > deadline {
            return text;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn pci_serial_in_a_remote_answers_through_its_socket() {
    system_tests::guest_test("host_serial", |env| {
        for bin in ["host", "remote-host", "libpci_serial.so"] {
            target_bin(bin).unwrap();
        }
        let spec = testenv::InitramfsSpec::new(&[] as &[&str], guest_job());
        let dir = prepare_vm(env, "host-serial", &spec);
        fs::write(dir.join("vm.toml"), config(&env.kernel)).unwrap();

        let run = run_qmp_driver(
            env,
            "host_serial",
            "serial_driver.py",
            &dir,
            QMP_SOCKET,
            Duration::from_secs(600),
            &[
                "misc.log",
                "console-b.log",
                "misc-b.log",
                "vm-b.toml.host-stderr",
                "orch.log",
                "orch-b.log",
                "orch.rh-stderr",
            ],
        );
        // The guest started on A and finished on B.
        let job =
            run.check_across(&[fs::read_to_string(dir.join("console-b.log")).unwrap_or_default()]);
        let (r, diag) = (&run.results, &run.diag);
        assert_eq!(job.status, 0, "guest job failed:\n{diag}");
        let out = &job.output;
        let rep = &r["replies"];

        // The guest's 8250_pci driver bound both ports as ttyS ports.
        assert!(value(out, "tty0=").starts_with("ttyS"), "{diag}");
        assert_eq!(value(out, "driver0="), "serial", "{diag}");
        assert!(value(out, "tty1=").starts_with("ttyS"), "{diag}");
        assert_ne!(value(out, "tty0="), value(out, "tty1="));
        assert_eq!(value(out, "driver1="), "serial", "{diag}");
        // COM1 and the two PCI ports were each found as a 16550A.
        assert!(value(out, "uarts=").parse::<u32>().unwrap() >= 3, "{diag}");

        let pci = rep["query-pci"][0]["devices"].as_array().unwrap();
        let ser0 = pci.iter().find(|d| d["qdev_id"] == "ser0").unwrap();
        assert_eq!(ser0["slot"], 5);
        assert_eq!(ser0["id"]["vendor"], 0x1b36);
        assert_eq!(ser0["id"]["device"], 0x0002);
        assert_eq!(ser0["remote"], "misc");
        let hot = rep["query-pci-hot"][0]["devices"].as_array().unwrap();
        assert!(
            hot.iter().any(|d| d["qdev_id"] == "ser1" && d["slot"] == 6),
            "{diag}"
        );

        // The shells answered through the sockets...
        assert!(
            rep["ser0-answer"].as_str().unwrap().contains("hello-42"),
            "{diag}"
        );
        assert!(
            rep["ser1-answer"].as_str().unwrap().contains("hot-42"),
            "{diag}"
        );
        // The port in the orchestrator's remote (no control channel of
        // ours) answered on A, and, its state moved by vfio-user
        // migration v2 into B's orchestrated remote, on B.
        assert!(value(out, "tty2=").starts_with("ttyS"), "{diag}");
        assert_eq!(value(out, "driver2="), "serial", "{diag}");
        assert!(
            rep["ser2-answer"]
                .as_str()
                .unwrap_or_default()
                .contains("orch-42"),
            "{diag}"
        );
        assert!(
            rep["ser2-moved-answer"]
                .as_str()
                .unwrap_or_default()
                .contains("orch-moved-42"),
            "{diag}"
        );
        // It was that path: each orchestrated remote's log says so.
        let log = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_default();
        assert!(
            log("orch.log").contains("state saved for vfio-user migration"),
            "{diag}"
        );
        assert!(
            log("orch-b.log").contains("state restored by vfio-user migration"),
            "{diag}"
        );
        let f2 = file_gets(&dir.join("ser2-b.out"), "orch-moved-42");
        assert!(f2.contains("orch-moved-42"), "ser2-b.out: {f2:?}\n{diag}");
        // The live migration: completed, the source stopped and gone with
        // its remote, and the shell that answered on A answered on B.
        assert_eq!(rep["migrated"]["status"], "completed", "{diag}");
        assert_eq!(rep["source-status"], "postmigrate", "{diag}");
        assert_eq!(rep["source-exit"], 0, "{diag}");
        assert_eq!(rep["source-remotes-gone"], true, "{diag}");
        assert_eq!(rep["status-b"], "running", "{diag}");
        assert!(
            rep["ser0-moved-answer"]
                .as_str()
                .unwrap_or_default()
                .contains("moved-42"),
            "{diag}"
        );
        let fb = file_gets(&dir.join("ser0-b.out"), "moved-42");
        assert!(fb.contains("moved-42"), "ser0-b.out: {fb:?}\n{diag}");
        // ... and into the output files (the hot-added port's path was
        // relative: the config file's directory).
        let f0 = file_gets(&dir.join("ser0.out"), "hello-42");
        assert!(f0.contains("hello-42"), "ser0.out: {f0:?}\n{diag}");
        let f1 = file_gets(&dir.join("ser1.out"), "hot-42");
        assert!(f1.contains("hot-42"), "ser1.out: {f1:?}\n{diag}");

        assert_eq!(r["host-exit"], 0, "{diag}");
        eprintln!(
            "host_serial: first answer after {} s; whole run {} s",
            rep["ser0-seconds"], r["seconds"]
        );
        fs::remove_dir_all(&dir).ok();
    });
}
