//! Shared helpers for the whole-system tests in this directory.
//!
//! The LSI disk job is defined once here, so QEMU's own LSI (the
//! reference) and our plugin behind each transport run exactly the same
//! guest job and are checked the same way.
#![allow(clippy::unwrap_used, clippy::panic)]

pub mod bench;

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use testenv::JobResult;

pub const IMAGE_SIZE: u64 = 64 << 20;
/// Where the host writes data for the guest to read.
pub const HOST_OFF: u64 = 8 << 20;
/// Where the guest writes its pattern.
pub const GUEST_OFF: u64 = 16 << 20;
pub const BLOCK: usize = 4096;

pub fn host_data() -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..BLOCK)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8
        })
        .collect()
}

/// The 4 KiB the guest job writes: 128 lines of 32 bytes.
pub fn guest_pattern() -> Vec<u8> {
    (0..128)
        .flat_map(|i| format!("TESTENV-GUEST-PATTERN-{i:09}\n").into_bytes())
        .collect()
}

pub fn parse_hex(text: &str, start: &str, end: &str) -> Vec<u8> {
    let body = text
        .split_once(start)
        .and_then(|(_, rest)| rest.split_once(end))
        .map(|(b, _)| b)
        .unwrap_or_else(|| panic!("no {start}..{end} section in job output:\n{text}"));
    body.split_whitespace()
        .map(|w| u8::from_str_radix(w, 16).unwrap_or_else(|_| panic!("bad hex byte `{w}`")))
        .collect()
}

/// The modules a guest needs to find a virtio-blk disk: the virtio PCI
/// transport and the block driver.
pub const VIRTIO_BLK_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
];

/// Kernel modules of the LSI disk job, in load order: testenv's LSI/SCSI
/// set, what mounting ext2 (through the ext4 driver) needs, and the ACPI
/// power button and pvpanic drivers.
pub fn lsi_job_modules() -> Vec<&'static str> {
    let mut m = testenv::LSI_MODULES.to_vec();
    m.extend(["crc16", "mbcache", "jbd2", "crc32c_generic", "ext4"]);
    // The ACPI power button and its input device (QMP system_powerdown),
    // and pvpanic (a panic ends the VM with its own exit code).
    m.extend(["button", "evdev", "pvpanic", "pvpanic-mmio"]);
    m
}

/// Where the second-disk jobs (tests/host_qmp.rs, tests/host_hotplug.rs)
/// write the guest pattern on sdb, and where the host put its data.
pub const SDB_GUEST_OFF: u64 = 1 << 20;
pub const SDB_HOST_OFF: u64 = 2 << 20;

/// A second raw image of `size` bytes with the host's data at
/// [`SDB_HOST_OFF`].
pub fn make_second_disk(image: &Path, size: u64) {
    let mut f = fs::File::create(image).unwrap();
    f.set_len(size).unwrap();
    f.seek(SeekFrom::Start(SDB_HOST_OFF)).unwrap();
    f.write_all(&host_data()).unwrap();
}

/// Guest shell lines: write the guest pattern on /dev/sdb at
/// [`SDB_GUEST_OFF`] (direct I/O, exit 3 on failure), then print the
/// host's block at [`SDB_HOST_OFF`] in hex between `SDB-HOST-BEGIN` and
/// `SDB-HOST-END` (exit 4).
pub fn sdb_write_and_read_job() -> String {
    format!(
        r#"j=0; while [ $j -lt 128 ]; do printf 'TESTENV-GUEST-PATTERN-%09d\n' $j; j=$((j+1)); done > /tmp/pat
dd if=/tmp/pat of=/dev/sdb bs={BLOCK} seek={gseek} count=1 oflag=direct conv=notrunc 2>/dev/null || exit 3
echo "SDB-HOST-BEGIN"
dd if=/dev/sdb bs={BLOCK} skip={hskip} count=1 iflag=direct 2>/dev/null | od -A n -t x1 -v || exit 4
echo "SDB-HOST-END"
"#,
        gseek = SDB_GUEST_OFF / BLOCK as u64,
        hskip = SDB_HOST_OFF / BLOCK as u64,
    )
}

/// Guest shell lines that wait (at most a minute) for the block device
/// `/dev/<dev>`, making its node from sysfs; exit 1 without it.
pub fn wait_for_disk(dev: &str) -> String {
    format!(
        r#"i=0
while [ ! -b /dev/{dev} ] && [ $i -lt 600 ]; do
    [ -e /sys/block/{dev}/dev ] && mknod /dev/{dev} b $(cut -d: -f1 /sys/block/{dev}/dev) $(cut -d: -f2 /sys/block/{dev}/dev)
    sleep 0.1; i=$((i+1))
done
[ -b /dev/{dev} ] || {{ echo "no /dev/{dev}"; exit 1; }}
"#
    )
}

/// A VM of `memory_mib` with an LSI controller in a spawned remote
/// `storage` (slot 4) whose drive is `disk0.img`; VM `name`'s console
/// and remote logs are `console-<name>.log` and `storage-<name>.log`.
pub fn remote_lsi_config(kernel: &Path, memory_mib: u32, name: &str) -> String {
    let remote = format!(
        "[[remote]]\nid = \"storage\"\nlog = \"storage-{name}.log\"\ntimeout-ms = 30000\n\n"
    );
    lsi_config(kernel, memory_mib, name, &remote, "remote = \"storage\"")
}

/// The same VM as [`remote_lsi_config`] with the LSI in the VMM's own
/// process.
pub fn in_process_lsi_config(kernel: &Path, memory_mib: u32, name: &str) -> String {
    lsi_config(kernel, memory_mib, name, "", "in-process = true")
}

/// The VM of both: `remotes` (tables) before the device, `placement` its
/// key.
fn lsi_config(
    kernel: &Path,
    memory_mib: u32,
    name: &str,
    remotes: &str,
    placement: &str,
) -> String {
    format!(
        r#"[vm]
memory = "{memory_mib}M"
vcpus = 2
kernel = "{kernel}"
initrd = "initrd.cpio"
cmdline = "console=ttyS0 quiet"
console-log = "console-{name}.log"

{remotes}[[device]]
id = "lsi0"
{placement}
plugin = "lsi53c895a"
slot = 4

[[device.drive]]
file = "disk0.img"
scsi-id = 0
"#,
        kernel = kernel.display()
    )
}

/// Creates the raw image with host-written data at HOST_OFF.
pub fn make_lsi_image(image: &Path) {
    let mut f = fs::File::create(image).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    f.seek(SeekFrom::Start(HOST_OFF)).unwrap();
    f.write_all(&host_data()).unwrap();
}

/// The guest job: wait for sda, report its size, write the pattern with
/// O_DIRECT, read the host's data back.
pub fn lsi_disk_job() -> String {
    disk_job("sda", "sym53c8xx", "sym[0-9]|scsi host|sd 0:")
}

/// The shared disk job on `/dev/<dev>`, driven by the PCI driver
/// `driver`; it ends with the kernel's lines matching `dmesg_pattern`
/// (an extended regular expression).
pub fn disk_job(dev: &str, driver: &str, dmesg_pattern: &str) -> String {
    format!(
        r#"
i=0
while [ ! -b /dev/{dev} ] && [ $i -lt 600 ]; do
    if [ -e /sys/block/{dev}/dev ]; then
        mknod /dev/{dev} b $(cut -d: -f1 /sys/block/{dev}/dev) $(cut -d: -f2 /sys/block/{dev}/dev)
    fi
    sleep 0.1; i=$((i+1))
done
[ -b /dev/{dev} ] || {{ echo "no /dev/{dev}"; dmesg | tail -30; exit 1; }}
echo "waited_ds=$i"
echo "pci_driver: $(ls /sys/bus/pci/drivers/{driver}/ | grep 0000: | tr '\n' ' ')"
echo "sectors=$(cat /sys/block/{dev}/size)"
j=0
while [ $j -lt 128 ]; do printf 'TESTENV-GUEST-PATTERN-%09d\n' $j; j=$((j+1)); done > /tmp/pat
dd if=/tmp/pat of=/dev/{dev} bs={BLOCK} seek={gseek} count=1 oflag=direct conv=notrunc 2>/dev/null || exit 2
echo "guest-write-ok"
echo "HOST-DATA-BEGIN"
dd if=/dev/{dev} bs={BLOCK} skip={hskip} count=1 iflag=direct 2>/dev/null | od -A n -t x1 -v || exit 3
echo "HOST-DATA-END"
# A file system in the first 4 MiB (the raw areas above stay untouched):
# write a file, unmount, drop caches, mount again, compare checksums.
mke2fs -q -F /dev/{dev} 4096 || exit 4
mkdir -p /mnt
mount -t ext2 /dev/{dev} /mnt || exit 5
dd if=/dev/urandom of=/mnt/data bs=64k count=16 2>/dev/null || exit 6
before=$(md5sum /mnt/data | cut -d' ' -f1)
umount /mnt || exit 7
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 -o ro /dev/{dev} /mnt || exit 8
after=$(md5sum /mnt/data | cut -d' ' -f1)
umount /mnt
[ "$before" = "$after" ] && echo "fs-ok $before" || {{ echo "fs-mismatch $before $after"; exit 9; }}
sync
dmesg | grep -E '{dmesg_pattern}'
"#,
        gseek = GUEST_OFF / BLOCK as u64,
        hskip = HOST_OFF / BLOCK as u64,
    )
}

/// Checks what a user would: the driver bound, sda has the image's size,
/// the guest's write is in the image byte for byte, and the guest read the
/// host's data.
pub fn check_lsi_disk_job(r: &JobResult, image: &Path) {
    check_disk_job(r, image, "sym53c8xx");
    assert!(
        r.console.contains("sym0:"),
        "no sym0 messages on the console"
    );
}

/// [`check_lsi_disk_job`] for the job of [`disk_job`] with any driver.
pub fn check_disk_job(r: &JobResult, image: &Path, driver: &str) {
    assert_eq!(r.status, 0, "guest job failed:\n{}", r.output);
    assert!(
        r.output.lines().any(|l| l.starts_with("fs-ok ")),
        "the file system did not survive a write/read cycle:\n{}",
        r.output
    );
    // The driver bound the function and found the disk.
    assert!(
        r.output.contains("pci_driver: 0000:"),
        "{driver} did not bind:\n{}",
        r.output
    );
    let sectors: u64 = r
        .output
        .lines()
        .find_map(|l| l.strip_prefix("sectors="))
        .expect("sectors line")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        sectors * 512,
        IMAGE_SIZE,
        "the disk's size differs from the image"
    );

    // The guest's write is in the image, byte for byte.
    let img = fs::read(image).unwrap();
    let off = GUEST_OFF as usize;
    assert_eq!(
        &img[off..off + BLOCK],
        &guest_pattern()[..],
        "guest pattern not found in the image at {GUEST_OFF:#x}"
    );
    // The guest read what the host wrote.
    let read = parse_hex(&r.output, "HOST-DATA-BEGIN", "HOST-DATA-END");
    assert_eq!(read, host_data(), "guest read different host data");
}

/// Where [`guest_test`] records a first attempt that failed (printed by
/// scripts/test at the end of every run).
pub fn retried_log() -> std::path::PathBuf {
    testenv::workspace_root()
        .join("target")
        .join("retried-tests.log")
}

/// Runs a real-guest test: `body` with the prepared environment, or a
/// skip outside CI when there is none (`testenv::require_env`).
///
/// A first attempt that fails is tried once more, because the nested
/// environment loses guests now and then with no code of ours involved
/// (docs/testenv.md, "The nested environment loses guests"): a CI run
/// holds some twenty nested guests, and one lost among them would fail
/// it. Nothing is hidden: the first failure's message goes to
/// [`retried_log`], which scripts/test prints at the end of every run,
/// passed or not; a test that fails twice fails. `GUEST_TEST_RETRIES=0`
/// turns the second attempt off (when hunting a rare failure).
pub fn guest_test(name: &str, body: impl Fn(&testenv::Env)) {
    let Some(env) = testenv::require_env(name) else {
        return;
    };
    if std::env::var("GUEST_TEST_RETRIES").is_ok_and(|v| v == "0") {
        return body(&env);
    }
    let first = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&env)));
    let Err(payload) = first else {
        return;
    };
    let message = payload
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| payload.downcast_ref::<&str>().copied())
        .unwrap_or("(a panic without a message)");
    let when = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let entry = format!(
        "==== {name}: the first attempt failed (unix time {when}); trying once more\n{}\n",
        head_lines(message, 120)
    );
    eprint!("{entry}");
    let logged = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(retried_log())
        .and_then(|mut f| f.write_all(entry.as_bytes()));
    if let Err(e) = logged {
        eprintln!("{name}: cannot record the retry: {e}");
    }
    body(&env);
}

/// The first `n` lines of `text`.
fn head_lines(text: &str, n: usize) -> String {
    text.lines().take(n).collect::<Vec<_>>().join("\n")
}

/// The python that can import `qemu.qmp`, as an absolute path (L1's PATH
/// differs from ours). `.ci/run` installs the package with pip.
pub fn python_with_qemu_qmp() -> String {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(&python)
        .args(["-c", "import sys, qemu.qmp; print(sys.executable)"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        _ => panic!("`{python}` cannot import qemu.qmp (.ci/run installs it with pip)"),
    }
}

/// What a QMP driver run left behind.
pub struct DriverRun {
    /// What the command in L1 printed (ends with `DRIVER-EXIT=N`).
    pub l1_output: String,
    /// The driver's results (tests/qmp_common.py), `Null` when missing.
    pub results: serde_json::Value,
    /// The guest's console log.
    pub console: String,
    /// Everything useful when an assertion fails: L1's output, the
    /// console, host's stderr, the named logs and the results.
    pub diag: String,
}

impl DriverRun {
    /// Whether the driver got through, and the guest job's result.
    pub fn check(&self) -> testenv::JobResult {
        self.check_across(&[])
    }

    /// [`check`](Self::check) of a guest that moved to other VMs: the
    /// job's result across its console log and `later` ones, in order.
    pub fn check_across(&self, later: &[String]) -> testenv::JobResult {
        assert!(
            !self.results.is_null(),
            "no results from the QMP driver:\n{}",
            self.diag
        );
        assert!(
            self.results.get("failure").is_none(),
            "the QMP driver failed:\n{}",
            self.diag
        );
        assert!(self.l1_output.contains("DRIVER-EXIT=0"), "{}", self.diag);
        let mut console = self.console.clone();
        for c in later {
            console.push('\n');
            console.push_str(&c.replace("\r\n", "\n"));
        }
        testenv::parse_console(&console).unwrap_or_else(|| panic!("no job markers:\n{}", self.diag))
    }
}

/// Runs tests/`driver` (a qemu.qmp script built on tests/qmp_common.py)
/// inside L1 on the VM of `dir`/vm.toml, whose monitor socket is
/// `qmp_socket` (in L1's /tmp: UNIX sockets do not work on 9p) and whose
/// console log is `dir`/console.log. `logs`: files of `dir` for the
/// diagnostics (remote logs).
pub fn run_qmp_driver(
    env: &testenv::Env,
    name: &str,
    driver: &str,
    dir: &Path,
    qmp_socket: &str,
    limit: std::time::Duration,
    logs: &[&str],
) -> DriverRun {
    run_qmp_driver_with(env, name, driver, dir, qmp_socket, limit, logs, false)
}

/// [`run_qmp_driver`], optionally (`local_bins`) with `host`,
/// `remote-host` and the plugins copied into L1's tmpfs first: L1 reaches
/// this machine's files over 9p without a page cache, so every exec of a
/// binary there (a remote restarted) pages it in over 9p again, which
/// costs about a second in the nested environment and nothing on a real
/// machine. Timing tests of restarts use it.
#[allow(clippy::too_many_arguments)]
pub fn run_qmp_driver_with(
    env: &testenv::Env,
    name: &str,
    driver: &str,
    dir: &Path,
    qmp_socket: &str,
    limit: std::time::Duration,
    logs: &[&str],
    local_bins: bool,
) -> DriverRun {
    let python = python_with_qemu_qmp();
    let built = testenv::target_bin("host").unwrap();
    let (prelude, host) = if local_bins {
        let from = built.parent().unwrap_or(Path::new("."));
        (
            format!(
                "mkdir -p /tmp/bins && cp {f}/host {f}/remote-host {f}/lib*.so /tmp/bins/ && ",
                f = from.display()
            ),
            std::path::PathBuf::from("/tmp/bins/host"),
        )
    } else {
        (String::new(), built)
    };
    let driver = testenv::workspace_root().join("tests").join(driver);
    let socket_dir = Path::new(qmp_socket).parent().unwrap_or(Path::new("/tmp"));
    let cmd = format!(
        "{prelude}mkdir -p {sd}; timeout {secs} {python} {driver} {host} {cfg} {qmp_socket} {console} {results}; echo DRIVER-EXIT=$?",
        sd = socket_dir.display(),
        secs = limit.as_secs(),
        driver = driver.display(),
        host = host.display(),
        cfg = dir.join("vm.toml").display(),
        console = dir.join("console.log").display(),
        results = dir.join("results.json").display(),
    );
    let opts = testenv::NestedOptions {
        name: name.into(),
        timeout: limit + std::time::Duration::from_secs(100),
        ..Default::default()
    };
    let l1 = env
        .run_nested(&["sh".into(), "-c".into(), cmd], &opts)
        .unwrap();
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_default();
    let console = read("console.log").replace("\r\n", "\n");
    let results = read("results.json");
    let host_stderr = read("vm.toml.host-stderr");
    let parsed: serde_json::Value = serde_json::from_str(&results).unwrap_or_default();
    // The driver's failure when it failed, else how its results end.
    let outcome = match parsed.get("failure") {
        Some(f) => format!("failure: {f}"),
        None => tail_lines(&results, 3),
    };
    // The verdict first: a log shortened in the middle keeps it. The
    // VMM's last lines say whether the guest ended (its exit line, a
    // crash report) or went quiet while the VMM ran on.
    let mut diag = format!(
        "--- summary ---\nL1: {}\nresults: {}\nhost stderr ends:\n{}\nconsole ends:\n{}\n",
        l1.output
            .lines()
            .filter(|l| l.contains("DRIVER-EXIT") || l.contains("testenv: nested"))
            .collect::<Vec<_>>()
            .join(" | "),
        outcome,
        tail_lines(&host_stderr, 8),
        tail_lines(&console, 12),
    );
    // A failed driver asked every VM still running what it was doing
    // (tests/qmp_common.py, QMP `x-debug-report`): for a guest that went
    // quiet, its vCPUs' registers and last exits.
    if let Some(reports) = parsed["debug-reports"].as_array() {
        for r in reports {
            diag.push_str(r.as_str().unwrap_or_default());
            diag.push('\n');
        }
    }
    diag.push_str(&format!(
        "--- L1 ---\n{}\n--- console ---\n{console}\n--- host stderr ---\n{host_stderr}\n",
        l1.output,
    ));
    for log in logs {
        diag.push_str(&format!("--- {log} ---\n{}\n", read(log)));
    }
    diag.push_str(&format!("--- results ---\n{results}"));
    DriverRun {
        l1_output: l1.output,
        results: parsed,
        console,
        diag,
    }
}

/// The last `n` lines of `text` (a verdict's context in a failure message).
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A fresh work directory `target/<name>-<pid>` for a VM of our `host`
/// with an LSI controller in a `remote-host`, holding `initrd.cpio`: the
/// LSI job modules and `job`. Fails when the binaries are not built.
pub fn prepare_lsi_vm(env: &testenv::Env, name: &str, job: &str) -> std::path::PathBuf {
    for bin in ["host", "remote-host", "liblsi53c895a.so"] {
        testenv::target_bin(bin).unwrap();
    }
    let mut spec = testenv::InitramfsSpec::new(&lsi_job_modules(), job);
    spec.order = testenv::ModuleOrder::Exact;
    prepare_vm(env, name, &spec)
}

/// A fresh work directory `target/<name>-<pid>` holding `initrd.cpio`
/// built from `spec`.
pub fn prepare_vm(
    env: &testenv::Env,
    name: &str,
    spec: &testenv::InitramfsSpec,
) -> std::path::PathBuf {
    let dir = testenv::workspace_root()
        .join("target")
        .join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    env.build_initramfs(spec, &dir.join("initrd.cpio")).unwrap();
    dir
}

/// A chaos run (`tests/chaos_driver.py`) on the VM in `dir`: its remote
/// `svc` killed `CHAOS_KILLS` times (default `default_kills`), 1-3 s
/// apart, then hung once, the binaries run from L1's tmpfs (a restart
/// then costs what it costs on a real machine, not a page-in over 9p).
/// Returns the run, the guest job's output (status 0 checked) and the
/// number of kills.
pub fn run_chaos(
    env: &testenv::Env,
    name: &str,
    dir: &Path,
    qmp_socket: &str,
    default_kills: u64,
    limit: std::time::Duration,
) -> (DriverRun, String, u64) {
    let kills: u64 = std::env::var("CHAOS_KILLS")
        .ok()
        .and_then(|k| k.parse().ok())
        .unwrap_or(default_kills);
    // The driver runs in L1 and reads the number of kills from here.
    fs::write(dir.join("chaos-kills"), kills.to_string()).unwrap();
    let run = run_qmp_driver_with(
        env,
        name,
        "chaos_driver.py",
        dir,
        qmp_socket,
        limit + std::time::Duration::from_secs(10 * kills),
        &["svc.log"],
        true,
    );
    let job = run.check();
    assert_eq!(job.status, 0, "guest job failed:\n{}", run.diag);
    (run, job.output, kills)
}

/// The word after `key` in a guest's output (`key` is its prefix, as in
/// `reads=`); fails the test naming it when missing.
pub fn output_field(out: &str, key: &str, diag: &str) -> String {
    out.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("no {key} in the guest output:\n{diag}"))
}

/// [`output_field`] as a number.
pub fn output_number(out: &str, key: &str, diag: &str) -> u64 {
    output_field(out, key, diag)
        .parse()
        .unwrap_or_else(|_| panic!("{key} is not a number:\n{diag}"))
}

/// The recovery times the chaos driver recorded, one per kill, sorted.
pub fn recovery_times(results: &serde_json::Value, kills: u64, diag: &str) -> Vec<u64> {
    let mut ms: Vec<u64> = results["replies"]["recovery-ms"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    assert_eq!(
        ms.len() as u64,
        kills,
        "one recovery time per kill:\n{diag}"
    );
    ms.sort_unstable();
    ms
}

/// Chunks of 128 KiB the disk chaos workload's raw disk cycles through
/// (4 MiB).
pub const CHAOS_CHUNKS: u64 = 32;

/// The guest's job of a disk chaos test (tests/host_virtio_chaos.rs,
/// tests/host_lsi_chaos.rs): finds its two disks, makes the file system,
/// fills the raw chunks once, then runs a verified write/read loop on the
/// raw disk and a write-and-checksum loop on the file system until the
/// driver's `go`; then verifies everything from the disks and prints the
/// counts ([`check_disk_chaos`] reads them).
pub struct DiskChaosJob<'a> {
    /// The block devices to look among (`vda vdb`).
    pub disks: &'a str,
    /// Shell printing what tells disk `$d` apart.
    pub key: &'a str,
    /// `case` patterns of `key` for the raw and the file-system disk.
    pub raw: &'a str,
    pub fs: &'a str,
    /// Shell run once both disks are set up, before the workload.
    pub before_load: &'a str,
    /// Kernel-log lines that count as errors (an extended regex).
    pub log_errors: &'a str,
    /// Shell run at the end to report more of the kernel log.
    pub log_report: &'a str,
}

impl DiskChaosJob<'_> {
    pub fn script(&self) -> String {
        let DiskChaosJob {
            disks,
            key,
            raw,
            fs,
            before_load,
            log_errors,
            log_report,
        } = self;
        format!(
            r#"
raw=; fsd=
i=0
while [ -z "$raw" -o -z "$fsd" ] && [ $i -lt 600 ]; do
  for d in {disks}; do
    [ -e /sys/block/$d/dev ] || continue
    [ -b /dev/$d ] || mknod /dev/$d b $(cut -d: -f1 /sys/block/$d/dev) $(cut -d: -f2 /sys/block/$d/dev)
    case "$({key})" in
      {raw}) raw=$d ;;
      {fs}) fsd=$d ;;
    esac
  done
  sleep 0.1; i=$((i+1))
done
[ -n "$raw" -a -n "$fsd" ] || {{ echo "disks missing: raw=$raw fs=$fsd"; dmesg | tail -30; exit 1; }}
CH={CHAOS_CHUNKS}
mke2fs -q -F /dev/$fsd 16384 || exit 4
mkdir -p /mnt /tmp/last /tmp/sums
mount -t ext2 /dev/$fsd /mnt || exit 5
c=0
while [ $c -lt $CH ]; do
  dd if=/dev/urandom of=/tmp/last/$c bs=64k count=2 2>/dev/null
  dd if=/tmp/last/$c of=/dev/$raw bs=64k seek=$((c*2)) count=2 oflag=direct conv=notrunc 2>/dev/null || exit 6
  c=$((c+1))
done
{before_load}
(
  n=0; ioerr=0; bad=0
  while [ ! -e /tmp/stop ]; do
    c=$((n % CH))
    dd if=/dev/urandom of=/tmp/w bs=64k count=2 2>/dev/null
    cp /tmp/w /tmp/last/$c
    dd if=/tmp/w of=/dev/$raw bs=64k seek=$((c*2)) count=2 oflag=direct conv=notrunc 2>/dev/null || {{ ioerr=$((ioerr+1)); echo "RAW WRITE ERROR chunk $c"; }}
    if dd if=/dev/$raw of=/tmp/r bs=64k skip=$((c*2)) count=2 iflag=direct 2>/dev/null; then
      cmp -s /tmp/w /tmp/r || {{ bad=$((bad+1)); echo "RAW MISMATCH chunk $c"; }}
    else
      ioerr=$((ioerr+1)); echo "RAW READ ERROR chunk $c"
    fi
    n=$((n+1))
  done
  echo "raw-rounds=$n raw-ioerr=$ioerr raw-bad=$bad" > /tmp/raw
) &
(
  n=0; err=0
  while [ ! -e /tmp/stop ]; do
    f=f$((n % 16))
    dd if=/dev/urandom of=/tmp/fw bs=64k count=4 2>/dev/null
    if dd if=/tmp/fw of=/mnt/$f bs=64k conv=fsync 2>/dev/null; then
      md5sum < /tmp/fw > /tmp/sums/$f
    else
      err=$((err+1)); echo "FS WRITE ERROR $f"
    fi
    n=$((n+1))
  done
  echo "fs-rounds=$n fs-err=$err" > /tmp/fs
) &
echo "STEP reading"
read -r -t 900 line || {{ echo "no go"; exit 20; }}
touch /tmp/stop
wait
cat /tmp/raw /tmp/fs
umount /mnt || exit 7
echo 3 > /proc/sys/vm/drop_caches
mount -t ext2 -o ro /dev/$fsd /mnt || exit 8
files=0; fsbad=0
for s in /tmp/sums/*; do
  f=${{s##*/}}
  [ "$(md5sum < /mnt/$f)" = "$(cat $s)" ] || {{ fsbad=$((fsbad+1)); echo "FS MISMATCH $f"; }}
  files=$((files+1))
done
umount /mnt
echo "fs-files=$files fs-bad=$fsbad"
c=0; : > /tmp/expect
while [ $c -lt $CH ]; do cat /tmp/last/$c >> /tmp/expect; c=$((c+1)); done
echo "raw-expect-md5=$(md5sum < /tmp/expect | cut -d' ' -f1)"
echo "raw-disk-md5=$(dd if=/dev/$raw bs=64k count=$((CH*2)) iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1)"
pat='{log_errors}'
echo "dmesg-errors=$(dmesg | grep -ciE "$pat")"
dmesg | grep -iE "$pat"
{log_report}
sync
echo "STEP done"
"#
        )
    }
}

/// Checks what [`DiskChaosJob`] printed as a user would: no I/O error,
/// every direct read of a chunk just written right, every file read back
/// from the remounted file system right, no error in the kernel log, and
/// the raw image on the host (`raw_image`) holding exactly the last data
/// the guest wrote to each chunk. Returns the rounds of the raw and the
/// file-system loops.
pub fn check_disk_chaos(out: &str, diag: &str, raw_image: &Path) -> (u64, u64) {
    let num = |key: &str| output_number(out, key, diag);
    for key in [
        "raw-ioerr=",
        "raw-bad=",
        "fs-err=",
        "fs-bad=",
        "dmesg-errors=",
    ] {
        assert_eq!(num(key), 0, "{key} in the guest:\n{diag}");
    }
    let (raw_rounds, fs_rounds) = (num("raw-rounds="), num("fs-rounds="));
    assert!(
        raw_rounds > 10 && fs_rounds > 10 && num("fs-files=") > 0,
        "the workloads hardly ran:\n{diag}"
    );
    let expect = output_field(out, "raw-expect-md5=", diag);
    assert_eq!(
        output_field(out, "raw-disk-md5=", diag),
        expect,
        "the guest's disk differs from what it wrote:\n{diag}"
    );
    let head = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {} '{}' | md5sum | cut -d' ' -f1",
            CHAOS_CHUNKS * 128 * 1024,
            raw_image.display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&head.stdout).trim(),
        expect,
        "the image on the host differs from what the guest wrote:\n{diag}"
    );
    (raw_rounds, fs_rounds)
}
