//! `lsi-compare`: the same Linux guest on the same disk behind three LSI
//! controllers, under a real KVM (run it inside the nested-KVM L1, or on a
//! machine with hardware KVM):
//!
//! - `qemu-lsi`: QEMU 7.2 with its own in-process `lsi53c895a` (reference);
//! - `qemu-mp`: QEMU 7.2's multi-process pair, `x-pci-proxy-dev` + its own
//!   `-machine x-remote` running the LSI;
//! - `ours-mp`: QEMU 7.2's `x-pci-proxy-dev` + our `remote-host --protocol
//!   mpqemu` with the LSI plugin (the original multi-process setup with our
//!   device process in place of QEMU's);
//! - `host-remote` / `host-inproc` / `host-xremote` (bench only): our VMM,
//!   `host run`, with the LSI plugin in a spawned `remote-host` (vfio-user),
//!   in-process, or QEMU 7.2's own `x-remote` LSI (mpqemu) behind it.
//!
//! `lsi-compare check` runs the shared LSI guest job (write/read/file
//! system) on each and exits non-zero if any fails. `lsi-compare bench`
//! runs timed `dd` jobs on each and prints a table with ratios against
//! `qemu-lsi` (and writes it as JSON to `$LSI_COMPARE_JSON` when set);
//! `LSI_COMPARE_ONLY=a,b` runs only the variants named (the first named
//! is then the ratios' reference).
//! `lsi-compare profile` runs our VMM with the plugin in a remote and
//! in-process on three jobs (boot only, 4 KiB direct reads, 4 KiB direct
//! writes) and prints what one I/O costs: BAR reads and writes per
//! register, and how long the vCPU waited for each read.

use std::fs;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use system_tests::bench::{
    children_named, cpu_seconds, inheritable, parse_times, remotes_of, shared_ram_args,
    sibling_bin, spawn_with_fd3, timed_job_prologue, JobCpuWatch, Reaped,
};
use system_tests::{lsi_disk_job, lsi_job_modules, make_lsi_image, IMAGE_SIZE};
use testenv::{Env, InitramfsSpec, JobResult, ModuleOrder, QemuKind, RunOptions};

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    QemuLsi,
    QemuMp,
    OursMp,
    HostRemote,
    /// host-remote with `posted-writes = true`: disk commands on the ring
    /// thread.
    HostPosted,
    HostRemoteSocket,
    HostInProcess,
    HostXRemote,
}

impl Variant {
    const ALL: [Variant; 8] = [
        Variant::QemuLsi,
        Variant::QemuMp,
        Variant::OursMp,
        Variant::HostRemote,
        Variant::HostPosted,
        Variant::HostRemoteSocket,
        Variant::HostInProcess,
        Variant::HostXRemote,
    ];
    /// What `check` runs (our VMM's variants have their own test,
    /// tests/host_lsi.rs).
    const CHECK: [Variant; 3] = [Variant::QemuLsi, Variant::QemuMp, Variant::OursMp];

    fn name(self) -> &'static str {
        match self {
            Variant::QemuLsi => "qemu-lsi",
            Variant::QemuMp => "qemu-mp",
            Variant::OursMp => "ours-mp",
            Variant::HostRemote => "host-remote",
            Variant::HostPosted => "host-posted",
            Variant::HostRemoteSocket => "host-socket",
            Variant::HostInProcess => "host-inproc",
            Variant::HostXRemote => "host-xremote",
        }
    }
}

/// QEMU 7.2's `x-remote` running its own LSI + scsi-hd on `drive`, on the
/// connected socket it inherits as fd 3.
fn x_remote_command(env: &Env, drive: &str) -> Command {
    let mut c = env.qemu_command(QemuKind::Debian12);
    // x-remote runs no vCPU, but needs an accelerator; in the nested L1
    // Debian's QEMU cannot load its TCG module ("could not load module for
    // type 'tcg-accel-ops'"), so prefer KVM there.
    c.args([
        "-machine",
        "x-remote,accel=kvm:tcg",
        "-nodefaults",
        "-display",
        "none",
    ])
    .args(["-device", "lsi53c895a,id=lsi0"])
    .args(["-drive", drive])
    .args(["-device", "scsi-hd,drive=disk0,bus=lsi0.0,scsi-id=0"])
    .args(["-object", "x-remote-object,id=robj0,devid=lsi0,fd=3"]);
    if let Ok(t) = std::env::var("LSI_COMPARE_XREMOTE_TRACE") {
        c.args(["-trace", &t]);
    }
    c
}

/// Boots the guest with our VMM: `host run` on a config of its own.
fn run_host(env: &Env, variant: Variant, image: &Path, job: &str, dir: &Path) -> Result<JobResult> {
    let mut spec = InitramfsSpec::new(&lsi_job_modules(), job);
    spec.order = ModuleOrder::Exact;
    let initrd = dir.join(format!("{}-initrd.cpio", variant.name()));
    env.build_initramfs(&spec, &initrd)?;
    let placement = if variant == Variant::HostInProcess {
        "in-process = true"
    } else {
        "remote = \"storage\""
    };
    let protocol = if variant == Variant::HostXRemote {
        "mpqemu"
    } else {
        "vfio-user"
    };
    // host-socket: our remote with the access ring turned off.
    let fast_path = variant != Variant::HostRemoteSocket;
    let posted_writes = variant == Variant::HostPosted;
    let config = dir.join(format!("{}.toml", variant.name()));
    fs::write(
        &config,
        format!(
            "[vm]\nmemory = \"512M\"\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 quiet\"\n\n\
             [[remote]]\nid = \"storage\"\nprotocol = \"{protocol}\"\nfast-path = {fast_path}\nposted-writes = {posted_writes}\nlog = \"{}-device.log\"\n\n\
             [[device]]\nid = \"lsi0\"\n{placement}\nplugin = \"lsi53c895a\"\nslot = 4\n\n\
             [[device.drive]]\nfile = \"{}\"\nscsi-id = 0\n",
            env.kernel.display(),
            initrd.display(),
            variant.name(),
            image.display()
        ),
    )?;
    let console = dir.join(format!("{}-console.log", variant.name()));
    let mut host = Command::new(sibling_bin("host")?);
    host.arg("run").arg(&config);
    // QEMU's x-remote takes only a connected fd: a socketpair, one end for
    // it (fd 3), the other inherited by host (`--remote-fd`).
    let mut _x_remote: Option<Reaped> = None;
    let mut _vmm_end: Option<OwnedFd> = None;
    if variant == Variant::HostXRemote {
        let (vmm_end, dev_end) = UnixStream::pair()?;
        let drive = format!("file={},format=raw,if=none,id=disk0", image.display());
        let log = fs::File::create(dir.join("host-xremote-qemu.log"))?;
        let mut x = x_remote_command(env, &drive);
        x.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        _x_remote = Some(Reaped(spawn_with_fd3(&mut x, OwnedFd::from(dev_end))?));
        let vmm_end = OwnedFd::from(vmm_end);
        host.arg("--remote-fd")
            .arg(format!("storage={}", inheritable(&vmm_end)?));
        _vmm_end = Some(vmm_end);
    }
    let stats = dir.join(format!("{}-host-stats.log", variant.name()));
    if std::env::var_os("HOST_STATS").is_some() {
        host.stderr(fs::File::create(&stats)?);
    } else {
        host.stderr(Stdio::inherit());
    }
    let mut child = host
        .stdin(Stdio::null())
        .stdout(fs::File::create(&console)?)
        .spawn()
        .context("spawning host")?;
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut idle = IdleWatch::default();
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        idle.look(&console, child.id());
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("host run timed out");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let text = fs::read_to_string(&console)?;
    testenv::parse_console(&text)
        .with_context(|| format!("no job result on the console:\n{}", tail(&text, 30)))
}

/// CPU the VMM and its remote used between the guest's `IDLE-BEGIN` and
/// `IDLE-END` console lines (the `sleep` profile job), sampled from /proc.
#[derive(Default)]
struct IdleWatch {
    begin: Option<(Instant, f64, f64)>,
    seen: u64,
}

/// Wall seconds, VMM CPU seconds, remote CPU seconds.
type IdleSample = (f64, f64, f64);

/// The last sample.
static IDLE_CPU: std::sync::Mutex<Option<IdleSample>> = std::sync::Mutex::new(None);

impl IdleWatch {
    fn look(&mut self, console: &Path, vmm: u32) {
        let len = fs::metadata(console).map_or(0, |m| m.len());
        if len == self.seen {
            return;
        }
        self.seen = len;
        let text = fs::read_to_string(console).unwrap_or_default();
        let sample = || {
            let remote: f64 = remotes_of(vmm).into_iter().map(cpu_seconds).sum();
            (Instant::now(), cpu_seconds(vmm), remote)
        };
        if self.begin.is_none() && text.contains("IDLE-BEGIN") {
            self.begin = Some(sample());
        } else if let Some((t0, v0, r0)) = self.begin {
            if text.contains("IDLE-END") {
                let (t1, v1, r1) = sample();
                let mut last = IDLE_CPU.lock().unwrap_or_else(|e| e.into_inner());
                *last = Some(((t1 - t0).as_secs_f64(), v1 - v0, r1 - r0));
                self.begin = None;
                self.seen = u64::MAX;
            }
        }
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Boots the guest with `job` on `image` behind `variant`'s controller.
fn run_variant(
    env: &Env,
    variant: Variant,
    image: &Path,
    job: &str,
    dir: &Path,
) -> Result<JobResult> {
    if matches!(
        variant,
        Variant::HostRemote
            | Variant::HostPosted
            | Variant::HostRemoteSocket
            | Variant::HostInProcess
            | Variant::HostXRemote
    ) {
        return run_host(env, variant, image, job, dir);
    }
    let mut spec = InitramfsSpec::new(&lsi_job_modules(), job);
    spec.order = ModuleOrder::Exact;
    let mut extra: Vec<String> = shared_ram_args(512);
    let mut _helper: Option<Reaped> = None;
    let mut _vmm_end: Option<OwnedFd> = None;
    let drive = format!("file={},format=raw,if=none,id=disk0", image.display());
    match variant {
        Variant::QemuLsi => {
            extra.extend([
                "-device".into(),
                "lsi53c895a,id=lsi0".into(),
                "-drive".into(),
                drive,
                "-device".into(),
                "scsi-hd,drive=disk0,bus=lsi0.0,scsi-id=0".into(),
            ]);
        }
        Variant::HostRemote
        | Variant::HostPosted
        | Variant::HostRemoteSocket
        | Variant::HostInProcess
        | Variant::HostXRemote => bail!("{} runs through run_host", variant.name()),
        Variant::QemuMp | Variant::OursMp => {
            let (vmm_end, dev_end) = UnixStream::pair()?;
            let dev_end = OwnedFd::from(dev_end);
            let log = fs::File::create(dir.join(format!("{}-device.log", variant.name())))?;
            let mut cmd = if variant == Variant::QemuMp {
                x_remote_command(env, &drive)
            } else {
                let config = dir.join("ours-mp.toml");
                fs::write(
                    &config,
                    format!(
                        "[vm]\nmemory = \"512M\"\nkernel = \"{}\"\n\n[[remote]]\nid = \"storage\"\n\n\
                         [[device]]\nid = \"lsi0\"\nremote = \"storage\"\nplugin = \"lsi53c895a\"\nslot = 4\n\n\
                         [[device.drive]]\nfile = \"{}\"\nscsi-id = 0\n",
                        env.kernel.display(),
                        image.display()
                    ),
                )?;
                let mut c = Command::new(sibling_bin("remote-host")?);
                c.args([
                    "serve",
                    "--remote",
                    "storage",
                    "--protocol",
                    "mpqemu",
                    "--fd",
                    "3",
                ])
                .arg("--config")
                .arg(&config);
                c
            };
            cmd.stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log);
            _helper = Some(Reaped(spawn_with_fd3(&mut cmd, dev_end)?));
            let vmm_end = OwnedFd::from(vmm_end);
            let n = inheritable(&vmm_end)?;
            _vmm_end = Some(vmm_end);
            extra.extend(["-device".into(), format!("x-pci-proxy-dev,id=lsi0,fd={n}")]);
        }
    }
    let opts = RunOptions {
        qemu: QemuKind::Debian12,
        name: format!("lsi-compare-{}", variant.name()),
        accel: std::env::var("LSI_COMPARE_ACCEL").unwrap_or_else(|_| "kvm".into()),
        cpu: if std::env::var("LSI_COMPARE_ACCEL").is_ok_and(|a| a != "kvm") {
            "max".into()
        } else {
            "host".into()
        },
        timeout: Duration::from_secs(600),
        extra_args: extra,
        // The console as the host variants have it (`wide` samples CPU
        // from its lines).
        log: Some(dir.join(format!("{}-console.log", variant.name()))),
        // A guest lost to the environment (docs/testenv.md) is booted
        // again rather than leave the table without a column; the loss
        // is reported on stderr.
        lost_guest_retries: 1,
        ..Default::default()
    };
    env.run_job(&spec, &opts)
}

/// Timed `dd` jobs: 64 KiB and 4 KiB direct reads and writes at queue
/// depth 1, and a sequential read with four commands outstanding.
fn bench_job() -> String {
    let mut s = timed_job_prologue("sda");
    s.push_str(
        r#"echo "TIME sda-ready 0 $(now)"   # guest uptime when the disk appeared
par4() { for k in 0 1 2 3; do dd if=/dev/sda of=/dev/null bs=64k count=128 skip=$((k*128)) iflag=direct & done; wait; }
run read-64k-qd1 dd if=/dev/sda of=/dev/null bs=64k count=512 iflag=direct
run write-64k-qd1 dd if=/dev/zero of=/dev/sda bs=64k count=512 seek=512 oflag=direct
run read-4k-qd1 dd if=/dev/sda of=/dev/null bs=4k count=2048 iflag=direct
run write-4k-qd1 dd if=/dev/zero of=/dev/sda bs=4k count=2048 seek=8192 oflag=direct
run read-64k-qd4 par4
"#,
    );
    s
}

/// A variant, its whole run time, and its timed jobs.
type BenchRow = (Variant, f64, Vec<(String, f64)>);

/// Prints a `RESULT LABEL FAIL` line for a guest that did not end its job
/// well (its status and output, or the error), then its device log.
fn print_failure(dir: &Path, v: Variant, label: &str, r: &Result<JobResult>) {
    match r {
        Ok(r) => println!("RESULT {label} FAIL status {}:\n{}", r.status, r.output),
        Err(e) => println!("RESULT {label} FAIL: {e:#}"),
    }
    print_device_log(dir, v);
}

fn print_device_log(dir: &Path, v: Variant) {
    let log = fs::read_to_string(dir.join(format!("{}-device.log", v.name()))).unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    println!("--- {} device process log (tail) ---", v.name());
    for l in tail.iter().rev() {
        println!("{l}");
    }
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("lsi-compare: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode> {
    let mode = std::env::args().nth(1).unwrap_or_default();
    if !["check", "bench", "profile", "idle", "wide"].contains(&mode.as_str()) {
        bail!("usage: lsi-compare check|bench|profile|idle|wide");
    }
    let env = Env::load_default().context("test environment (run `testenv prepare`)")?;
    if mode == "profile" || mode == "idle" {
        return profile(&env, mode == "idle");
    }
    if mode == "wide" {
        return wide(&env);
    }
    let dir = work_dir("lsi-compare")?;
    let mut failed = 0;
    let mut table: Vec<BenchRow> = Vec::new();
    let only = std::env::var("LSI_COMPARE_ONLY").ok();
    let variants: &[Variant] = if mode == "check" {
        &Variant::CHECK
    } else {
        &Variant::ALL
    };
    for &v in variants {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|n| n == v.name()))
        {
            continue;
        }
        let image = dir.join(format!("{}.img", v.name()));
        make_lsi_image(&image);
        let job = if mode == "check" {
            lsi_disk_job()
        } else {
            bench_job()
        };
        let t0 = Instant::now();
        let r = run_variant(&env, v, &image, &job, &dir);
        let secs = t0.elapsed().as_secs_f64();
        match r {
            Ok(r) if r.status == 0 => {
                if mode == "check" {
                    // The same checks the TCG tests make, on this image.
                    let ok =
                        std::panic::catch_unwind(|| system_tests::check_lsi_disk_job(&r, &image));
                    if ok.is_err() {
                        failed += 1;
                        println!("RESULT {} FAIL ({secs:.1} s)", v.name());
                        continue;
                    }
                    let to_sda = r
                        .output
                        .lines()
                        .find_map(|l| l.strip_prefix("waited_ds="))
                        .unwrap_or("?")
                        .to_string();
                    println!(
                        "RESULT {} ok ({secs:.1} s, sda after {to_sda} x 0.1 s of waiting)",
                        v.name()
                    );
                } else {
                    table.push((v, secs, parse_times(&r.output)));
                    println!("RESULT {} ok ({secs:.1} s)", v.name());
                }
            }
            failure => {
                failed += 1;
                print_failure(&dir, v, v.name(), &failure);
            }
        }
    }
    if mode == "bench" && !table.is_empty() {
        println!(
            "\nLSI53C895A, Linux sym53c8xx guest under KVM, {} MiB disk:",
            IMAGE_SIZE >> 20
        );
        print!("{:<16}", "job (s)");
        for (v, _, _) in &table {
            print!("{:>12}{:>8}", v.name(), "ratio");
        }
        println!();
        let reference: Vec<(String, f64)> = table[0].2.clone();
        for (job, base) in &reference {
            print!("{job:<16}");
            for (_, _, times) in &table {
                let t = times
                    .iter()
                    .find(|(n, _)| n == job)
                    .map_or(f64::NAN, |(_, t)| *t);
                print!("{t:>12.2}{:>8.2}", t / base);
            }
            println!();
        }
        print!("{:<16}", "whole boot+job");
        let base = table[0].1;
        for (_, secs, _) in &table {
            print!("{secs:>12.1}{:>8.2}", secs / base);
        }
        println!();
        if let Some(path) = std::env::var_os("LSI_COMPARE_JSON") {
            fs::write(&path, bench_json(&table).to_string())
                .with_context(|| format!("writing {}", Path::new(&path).display()))?;
            println!("(table as JSON: {})", Path::new(&path).display());
        }
    }
    if std::env::var_os("LSI_COMPARE_KEEP").is_some() {
        for v in Variant::ALL {
            print_device_log(&dir, v);
        }
    } else {
        fs::remove_dir_all(&dir).ok();
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The bench table as JSON: the columns, and per row each column's
/// seconds and its ratio to the first column (QEMU's in-process LSI) and
/// to our in-process LSI.
fn bench_json(table: &[BenchRow]) -> serde_json::Value {
    let columns: Vec<&str> = table.iter().map(|(v, _, _)| v.name()).collect();
    let mut rows: Vec<(String, Vec<f64>)> = table[0]
        .2
        .iter()
        .map(|(job, _)| {
            let secs = table
                .iter()
                .map(|(_, _, times)| {
                    times
                        .iter()
                        .find(|(n, _)| n == job)
                        .map_or(f64::NAN, |(_, t)| *t)
                })
                .collect();
            (job.clone(), secs)
        })
        .collect();
    rows.push((
        "whole boot+job".into(),
        table.iter().map(|(_, secs, _)| *secs).collect(),
    ));
    let inproc = columns.iter().position(|c| *c == "host-inproc");
    let rows: Vec<serde_json::Value> = rows
        .iter()
        .map(|(job, secs)| {
            let ratio = |base: Option<f64>| -> Vec<Option<f64>> {
                secs.iter()
                    .map(|s| base.map(|b| s / b).filter(|r| r.is_finite()))
                    .collect()
            };
            serde_json::json!({
                "job": job,
                "seconds": secs.iter().map(|s| s.is_finite().then_some(*s)).collect::<Vec<_>>(),
                "ratio-to-qemu-lsi": ratio(secs.first().copied()),
                "ratio-to-host-inproc": ratio(inproc.map(|i| secs[i])),
            })
        })
        .collect();
    serde_json::json!({"columns": columns, "rows": rows})
}

/// How many 4 KiB I/Os each profile job does.
const PROFILE_IOS: u32 = 1000;
/// How many 64 KiB writes the `write64` profile job does (the bench's
/// outlier row, issue 10).
const PROFILE_IOS_64K: u32 = 256;

/// How long the `sleep` profile job leaves the disk alone.
const IDLE_SECONDS: u32 = 10;

/// The profile jobs besides `idle`: (kind, I/Os, what the table calls it).
const PROFILE_KINDS: [(&str, u32, &str); 3] = [
    ("read", PROFILE_IOS, "4 KiB direct read"),
    ("write", PROFILE_IOS, "4 KiB direct write"),
    ("write64", PROFILE_IOS_64K, "64 KiB direct write"),
];

/// The profile jobs: boot and probe only, then that plus N reads or N
/// writes; what an I/O costs is the difference over N.
fn profile_job(kind: &str) -> String {
    let io = match kind {
        "read" => format!("dd if=/dev/sda of=/dev/null bs=4k count={PROFILE_IOS} iflag=direct"),
        "write" => {
            format!("dd if=/dev/zero of=/dev/sda bs=4k count={PROFILE_IOS} seek=8192 oflag=direct")
        }
        "write64" => format!(
            "dd if=/dev/zero of=/dev/sda bs=64k count={PROFILE_IOS_64K} seek=512 oflag=direct"
        ),
        "sleep" => format!("echo IDLE-BEGIN; sleep {IDLE_SECONDS}; echo IDLE-END"),
        _ => "true".into(),
    };
    format!(
        r#"
i=0
while [ ! -b /dev/sda ] && [ $i -lt 600 ]; do
    [ -e /sys/block/sda/dev ] && mknod /dev/sda b $(cut -d: -f1 /sys/block/sda/dev) $(cut -d: -f2 /sys/block/sda/dev)
    sleep 0.1; i=$((i+1))
done
[ -b /dev/sda ] || {{ echo "no /dev/sda"; exit 1; }}
s=$(cut -d' ' -f1 /proc/uptime)
{io} 2>/dev/null || exit 2
e=$(cut -d' ' -f1 /proc/uptime)
echo "TIME io $s $e"
"#
    )
}

/// Register counters from `HOST_STATS` lines: (bar, offset, size) →
/// (reads, mean read µs, writes).
type RegisterProfile = std::collections::BTreeMap<(u8, u64, u8), (f64, f64, f64)>;

fn parse_register_stats(text: &str) -> RegisterProfile {
    let mut out = RegisterProfile::new();
    for l in text.lines().filter(|l| l.contains(" register bar=")) {
        let field = |k: &str| -> Option<&str> {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(k).and_then(|v| v.strip_prefix('=')))
        };
        let (Some(bar), Some(off), Some(size)) = (field("bar"), field("offset"), field("size"))
        else {
            continue;
        };
        let off = u64::from_str_radix(off.trim_start_matches("0x"), 16).unwrap_or(0);
        let num = |k: &str| field(k).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
        out.insert(
            (bar.parse().unwrap_or(0), off, size.parse().unwrap_or(0)),
            (num("reads"), num("read_mean_us"), num("writes")),
        );
    }
    out
}

/// Names of the LSI registers a Linux driver touches on its I/O path
/// (offsets of BAR 1, the MMIO alias of the registers).
fn lsi_register_name(offset: u64) -> &'static str {
    match offset {
        0x0c => "DSTAT",
        0x10 => "DSA",
        0x14 => "ISTAT",
        0x2c => "DSP",
        0x30 => "DSPS",
        0x34 => "SCRATCHA",
        0x42 => "SIST0",
        0x43 => "SIST1",
        0x5c => "SCRATCHB",
        _ => "",
    }
}

/// A fresh directory for images and logs: inside the nested L1 under /tmp
/// (a tmpfs: images there avoid 9p, slow under emulation), elsewhere under
/// target/.
fn work_dir(name: &str) -> Result<PathBuf> {
    let base = if std::env::var_os("TESTENV_L1").is_some() {
        PathBuf::from("/tmp")
    } else {
        testenv::workspace_root().join("target")
    };
    let dir = base.join(format!("{name}-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `idle_only`: only the idle table (`scripts/bench-lsi idle`).
fn profile(env: &Env, idle_only: bool) -> Result<ExitCode> {
    std::env::set_var("HOST_STATS", "1");
    let dir = work_dir("lsi-profile")?;
    // (variant, job) → (registers, guest seconds of the I/O phase)
    let mut runs: Vec<(Variant, &str, RegisterProfile, f64)> = Vec::new();
    let mut idle_cpu: Vec<(Variant, Option<IdleSample>)> = Vec::new();
    for v in [
        Variant::HostRemote,
        Variant::HostRemoteSocket,
        Variant::HostInProcess,
    ] {
        let kinds = if idle_only {
            &[][..]
        } else {
            &PROFILE_KINDS[..]
        };
        for kind in ["idle"].into_iter().chain(kinds.iter().map(|k| k.0)) {
            if idle_only {
                break;
            }
            let image = dir.join(format!("{}-{kind}.img", v.name()));
            make_lsi_image(&image);
            let r = run_host(env, v, &image, &profile_job(kind), &dir)?;
            if r.status != 0 {
                bail!("{} {kind}: guest job failed:\n{}", v.name(), r.output);
            }
            let stats = fs::read_to_string(dir.join(format!("{}-host-stats.log", v.name())))?;
            let secs = parse_times(&r.output).first().map_or(f64::NAN, |(_, t)| *t);
            runs.push((v, kind, parse_register_stats(&stats), secs));
            println!("RESULT {} {kind} ok", v.name());
        }
        // The guest asleep, its disk idle: what do the VMM and the remote
        // burn meanwhile? (Issue 10: an idle remote costs no CPU.)
        let image = dir.join(format!("{}-sleep.img", v.name()));
        make_lsi_image(&image);
        *IDLE_CPU.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let r = run_host(env, v, &image, &profile_job("sleep"), &dir)?;
        if r.status != 0 {
            bail!("{} sleep: guest job failed:\n{}", v.name(), r.output);
        }
        let sample = *IDLE_CPU.lock().unwrap_or_else(|e| e.into_inner());
        idle_cpu.push((v, sample));
    }
    let find = |v: Variant, kind: &str| {
        runs.iter()
            .find(|(rv, k, _, _)| *rv == v && *k == kind)
            .map(|(_, _, p, s)| (p.clone(), *s))
    };
    let columns = [
        Variant::HostRemote,
        Variant::HostRemoteSocket,
        Variant::HostInProcess,
    ];
    let kinds = if idle_only {
        &[][..]
    } else {
        &PROFILE_KINDS[..]
    };
    for &(kind, ios, what) in kinds {
        let n = f64::from(ios);
        println!("\nOne {what} at queue depth 1 (over {ios} I/Os):");
        let (Some((idle, _)), Some((job, _))) = (
            find(Variant::HostRemote, "idle"),
            find(Variant::HostRemote, kind),
        ) else {
            bail!("a profile run is missing");
        };
        print!("{:<22}{:>10}{:>10}", "register", "reads/io", "writes/io");
        for v in columns {
            print!(
                "{:>16}",
                format!("read us {}", v.name().trim_start_matches("host-"))
            );
        }
        println!();
        let mut total = (0.0, 0.0);
        let mut waited = [0.0f64; 3];
        for (key, (reads, _, writes)) in &job {
            let (r0, _, w0) = idle.get(key).copied().unwrap_or_default();
            let (reads_io, writes_io) = ((reads - r0) / n, (writes - w0) / n);
            if reads_io < 0.01 && writes_io < 0.01 {
                continue;
            }
            total.0 += reads_io;
            total.1 += writes_io;
            let name = format!(
                "bar{} {:#04x}/{} {}",
                key.0,
                key.1,
                key.2,
                lsi_register_name(key.1)
            );
            print!("{name:<22}{reads_io:>10.2}{writes_io:>10.2}");
            for (i, v) in columns.iter().enumerate() {
                let mean = find(*v, kind)
                    .and_then(|(p, _)| p.get(key).map(|(_, m, _)| *m))
                    .unwrap_or(f64::NAN);
                waited[i] += reads_io * mean;
                print!("{mean:>16.1}");
            }
            println!();
        }
        println!("{:<22}{:>10.2}{:>10.2}", "all registers", total.0, total.1);
        for (i, v) in columns.iter().enumerate() {
            let secs = find(*v, kind).map_or(f64::NAN, |(_, s)| s);
            println!(
                "{}: {:.1} us per I/O (guest), of which {:.1} us waiting on BAR reads",
                v.name(),
                secs * 1e6 / n,
                waited[i]
            );
        }
    }
    println!("\nThe guest asleep for {IDLE_SECONDS} s (its disk idle): CPU used meanwhile");
    for (v, sample) in &idle_cpu {
        match sample {
            Some((wall, vmm, remote)) => println!(
                "{}: VMM {:.0} ms ({:.2}% of a core), remote-host {:.0} ms ({:.2}% of a core), over {wall:.1} s",
                v.name(),
                vmm * 1e3,
                vmm / wall * 100.0,
                remote * 1e3,
                remote / wall * 100.0
            ),
            None => println!("{}: not measured (markers not seen)", v.name()),
        }
    }
    fs::remove_dir_all(&dir).ok();
    Ok(ExitCode::SUCCESS)
}

/// I/Os of each `wide` job.
const WIDE_IOS: u32 = 2048;
/// Queue depths of the `wide` jobs: that many concurrent `dd` streams.
const WIDE_QDS: [u32; 4] = [1, 4, 16, 32];

/// The `wide` jobs' names, in the order the guest runs them.
fn wide_names() -> Vec<String> {
    let mut v = Vec::new();
    for dir in ["read", "write"] {
        for pat in ["seq", "rand"] {
            for qd in WIDE_QDS {
                v.push(format!("{dir}-4k-{pat}-qd{qd}"));
            }
        }
    }
    v
}

/// 4 KiB direct reads and writes, [`WIDE_IOS`] per job, as QD concurrent
/// `dd` streams: `seq` streams each go through a range of their own;
/// `rand` streams jump to a pseudo-random block (a fixed LCG, the same in
/// every variant) every 8 blocks, a fresh `dd` per run of 8 (the guest's
/// busybox has no fio; a process per 8 I/Os costs every variant alike).
/// `BEGIN NAME` and a pause before each job let the host sample CPU
/// ([`JobCpuWatch`]).
fn wide_job() -> String {
    let mut s = timed_job_prologue("sda");
    s.push_str(&format!(
        r#"IOS={WIDE_IOS}
# 64 MiB disk: 16384 blocks of 4 KiB; writes go to the upper half.
seq() {{
    n=$2; per=$((IOS/n)); k=0
    while [ $k -lt $n ]; do
        if [ $1 = read ]; then
            dd if=/dev/sda of=/dev/null bs=4k count=$per skip=$((k*per)) iflag=direct 2>/dev/null &
        else
            dd if=/dev/zero of=/dev/sda bs=4k count=$per seek=$((8192+k*per)) oflag=direct 2>/dev/null &
        fi
        k=$((k+1))
    done
    wait
}}
rand() {{
    n=$2; runs=$((IOS/8/n)); k=0
    while [ $k -lt $n ]; do
        (
            x=$((k*7919+17)); j=0
            while [ $j -lt $runs ]; do
                x=$(( (x*1103515245+12345) % 2147483648 ))
                b=$(( x % 8184 ))
                if [ $1 = read ]; then
                    dd if=/dev/sda of=/dev/null bs=4k count=8 skip=$b iflag=direct 2>/dev/null
                else
                    dd if=/dev/zero of=/dev/sda bs=4k count=8 seek=$((8192+b)) oflag=direct 2>/dev/null
                fi
                j=$((j+1))
            done
        ) &
        k=$((k+1))
    done
    wait
}}
"#
    ));
    for dir in ["read", "write"] {
        for pat in ["seq", "rand"] {
            for qd in WIDE_QDS {
                let name = format!("{dir}-4k-{pat}-qd{qd}");
                s.push_str(&format!(
                    "echo \"BEGIN {name}\"; sleep 0.3; run {name} {pat} {dir} {qd}\n"
                ));
            }
        }
    }
    s
}

/// One `wide` column: per round, seconds and CPU seconds per job.
struct WideColumn {
    variant: Variant,
    times: Vec<Vec<(String, f64)>>,
    cpu: Vec<Vec<(String, f64)>>,
}

/// The median of the values `job` has in the rounds (NaN: none).
fn median_of(rounds: &[Vec<(String, f64)>], job: &str) -> f64 {
    let mut v: Vec<f64> = rounds
        .iter()
        .filter_map(|r| r.iter().find(|(n, _)| n == job).map(|(_, x)| *x))
        .collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

impl WideColumn {
    fn iops(&self, job: &str) -> f64 {
        f64::from(WIDE_IOS) / median_of(&self.times, job)
    }

    fn cpu_us_per_io(&self, job: &str) -> f64 {
        median_of(&self.cpu, job) * 1e6 / f64::from(WIDE_IOS)
    }
}

/// Boots `v`'s guest with [`wide_job`] once: its job times and the CPU
/// its device side used per job.
fn wide_round(env: &Env, v: Variant, dir: &Path) -> Result<(JobResult, Vec<(String, f64)>)> {
    let image = dir.join(format!("{}.img", v.name()));
    make_lsi_image(&image);
    let console = dir.join(format!("{}-console.log", v.name()));
    fs::write(&console, "")?;
    let me = std::process::id();
    let qemu = v == Variant::QemuLsi;
    let watch = JobCpuWatch::start(console, move || {
        if qemu {
            children_named(me, "qemu-system-x86")
        } else {
            let vmms = children_named(me, "host");
            let mut p = vmms.clone();
            for vmm in vmms {
                p.extend(remotes_of(vmm));
            }
            p
        }
    });
    let r = run_variant(env, v, &image, &wide_job(), dir);
    let cpu = watch.finish();
    Ok((r?, cpu))
}

/// `lsi-compare wide`: the table of [`wide_job`] on QEMU's in-process
/// LSI, ours in a remote and ours in-process (`LSI_COMPARE_ONLY` narrows
/// it), `LSI_COMPARE_ROUNDS` interleaved rounds (default 1; this
/// environment drifts by up to 2x between guests of one L1, so each cell
/// is the median): IOPS with ratios to the first column, and the CPU the
/// device side used per I/O (the VMM and its remotes, or QEMU).
fn wide(env: &Env) -> Result<ExitCode> {
    let dir = work_dir("lsi-wide")?;
    let only = std::env::var("LSI_COMPARE_ONLY").ok();
    let rounds: usize = std::env::var("LSI_COMPARE_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut columns: Vec<WideColumn> = [
        Variant::QemuLsi,
        Variant::HostRemote,
        Variant::HostPosted,
        Variant::HostInProcess,
    ]
    .into_iter()
    .filter(|v| {
        only.as_deref()
            .is_none_or(|o| o.split(',').any(|n| n == v.name()))
    })
    .map(|variant| WideColumn {
        variant,
        times: Vec::new(),
        cpu: Vec::new(),
    })
    .collect();
    let mut failed = 0;
    for round in 1..=rounds {
        for c in &mut columns {
            let v = c.variant;
            match wide_round(env, v, &dir) {
                Ok((r, cpu)) if r.status == 0 => {
                    println!("RESULT {} round {round} ok", v.name());
                    c.times.push(parse_times(&r.output));
                    c.cpu.push(cpu);
                }
                failure => {
                    failed += 1;
                    let label = format!("{} round {round}", v.name());
                    print_failure(&dir, v, &label, &failure.map(|(r, _)| r));
                }
            }
        }
    }
    columns.retain(|c| !c.times.is_empty());
    if columns.is_empty() {
        return Ok(ExitCode::from(1));
    }
    println!(
        "\nLSI53C895A, 4 KiB direct I/O, {WIDE_IOS} per job, QD concurrent dd streams, median of {rounds} round(s): IOPS (ratio to {}) | CPU us per I/O (VMM + remote, or QEMU)",
        columns[0].variant.name()
    );
    print!("{:<20}", "job");
    for c in &columns {
        print!("{:>12}{:>7}", c.variant.name(), "ratio");
    }
    print!("  |");
    for c in &columns {
        print!("{:>12}", c.variant.name());
    }
    println!();
    let mut rows = Vec::new();
    for job in wide_names() {
        print!("{job:<20}");
        let base = columns[0].iops(&job);
        for c in &columns {
            let x = c.iops(&job);
            print!("{x:>12.0}{:>7.2}", x / base);
        }
        print!("  |");
        for c in &columns {
            print!("{:>12.1}", c.cpu_us_per_io(&job));
        }
        println!();
        rows.push(serde_json::json!({
            "job": job,
            "iops": columns.iter().map(|c| c.iops(&job)).collect::<Vec<_>>(),
            "ratio": columns.iter().map(|c| c.iops(&job) / base).collect::<Vec<_>>(),
            "cpu_us_per_io": columns.iter().map(|c| c.cpu_us_per_io(&job)).collect::<Vec<_>>(),
        }));
    }
    if let Some(path) = std::env::var_os("LSI_COMPARE_JSON") {
        let json = serde_json::json!({
            "ios_per_job": WIDE_IOS,
            "rounds": rounds,
            "columns": columns.iter().map(|c| c.variant.name()).collect::<Vec<_>>(),
            "rows": rows,
        });
        fs::write(&path, json.to_string())
            .with_context(|| format!("writing {}", PathBuf::from(&path).display()))?;
        println!("(table as JSON: {})", PathBuf::from(&path).display());
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
