//! `virtio-compare`: the same Linux guest (2 vCPUs, its stock
//! `virtio_blk`, two queues) on the same kind of disk image behind five
//! virtio-blk devices, under a real KVM (run it inside the nested-KVM L1):
//!
//! - `qemu-virtio`: QEMU 7.2's own in-process `virtio-blk-pci` (reference);
//! - `qemu-vhost`: QEMU 7.2 with `vhost-user-blk-pci`, the device served by
//!   QEMU's `qemu-storage-daemon` in its own process;
//! - `host-remote`: our VMM with the virtio-blk plugin in a spawned
//!   `remote-host` (queue notifies as doorbells: KVM ioeventfds);
//! - `host-nodoor`: the same with `doorbells = false` (every notify exits
//!   to the VMM and takes the access ring);
//! - `host-inproc`: our VMM with the plugin in-process;
//! - `host-noevidx`: `host-remote` with `event-idx = false` (the driver
//!   notifies every request, the device interrupts once per pass);
//! - `host-1io`: `host-remote` with `io-threads = 1` (a batch of requests
//!   runs on the serving thread alone).
//!
//! Each runs timed direct `dd` jobs: 4 KiB and 64 KiB at queue depth 1,
//! and 4 KiB with 32 `dd`s at once (queue depth up to 32). The table gives
//! IOPS per job with the ratio against `qemu-virtio`, and the CPU the
//! device side (VMM or QEMU, plus its device process) used per I/O over
//! all jobs, sampled from /proc when the guest prints its begin and end
//! lines. `VIRTIO_COMPARE_JSON` names a file for the table as JSON;
//! `VIRTIO_COMPARE_ONLY` runs the variants it names (comma-separated);
//! `VIRTIO_COMPARE_ROUNDS=N` runs them N times, interleaved, and the
//! table gives each variant's median (this environment's runs vary by up
//! to 2x from one boot to the next; each round's numbers are printed as
//! `ROUND` lines).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use system_tests::bench::{
    children_named, cpu_seconds, parse_times, remotes_of, shared_ram_args, sibling_bin,
    timed_job_prologue, Ipis, Reaped,
};
use system_tests::{make_lsi_image, VIRTIO_BLK_MODULES};
use testenv::{Env, InitramfsSpec, JobResult, QemuKind, RunOptions};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Variant {
    QemuVirtio,
    QemuVhost,
    HostRemote,
    HostNoDoorbells,
    HostInProcess,
    HostNoEventIdx,
    HostOneIoThread,
}

impl Variant {
    const ALL: [Variant; 7] = [
        Variant::QemuVirtio,
        Variant::QemuVhost,
        Variant::HostRemote,
        Variant::HostNoDoorbells,
        Variant::HostInProcess,
        Variant::HostNoEventIdx,
        Variant::HostOneIoThread,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::QemuVirtio => "qemu-virtio",
            Variant::QemuVhost => "qemu-vhost",
            Variant::HostRemote => "host-remote",
            Variant::HostNoDoorbells => "host-nodoor",
            Variant::HostInProcess => "host-inproc",
            Variant::HostNoEventIdx => "host-noevidx",
            Variant::HostOneIoThread => "host-1io",
        }
    }
}

/// A timed job: its name, how many I/Os it makes, its shell command.
struct Job {
    name: &'static str,
    ios: u64,
    command: &'static str,
}

const JOBS: &[Job] = &[
    Job {
        name: "read-4k-qd1",
        ios: 4096,
        command: "dd if=/dev/vda of=/dev/null bs=4k count=4096 iflag=direct",
    },
    Job {
        name: "write-4k-qd1",
        ios: 4096,
        command: "dd if=/dev/zero of=/dev/vda bs=4k count=4096 seek=4096 oflag=direct",
    },
    Job {
        name: "read-64k-qd1",
        ios: 512,
        command: "dd if=/dev/vda of=/dev/null bs=64k count=512 iflag=direct",
    },
    Job {
        name: "write-64k-qd1",
        ios: 256,
        command: "dd if=/dev/zero of=/dev/vda bs=64k count=256 seek=512 oflag=direct",
    },
    Job {
        name: "read-4k-qd32",
        ios: 4096,
        command: "par r",
    },
    Job {
        name: "write-4k-qd32",
        ios: 4096,
        command: "par w",
    },
];

/// The guest's job: waits for vda, then runs [`JOBS`] between the lines
/// the host side samples CPU at.
fn bench_job() -> String {
    let mut s = timed_job_prologue("vda");
    s.push_str(
        r#"# 32 dd's of 128 x 4 KiB at once, on distinct ranges.
par() {
    k=0
    while [ $k -lt 32 ]; do
        if [ $1 = r ]; then
            dd if=/dev/vda of=/dev/null bs=4k count=128 skip=$((k*128)) iflag=direct 2>/dev/null &
        else
            dd if=/dev/zero of=/dev/vda bs=4k count=128 seek=$((8192+k*128)) oflag=direct 2>/dev/null &
        fi
        k=$((k+1))
    done
    wait
}
echo BENCH-BEGIN
"#,
    );
    for j in JOBS {
        s.push_str(&format!("run {} {}\n", j.name, j.command));
    }
    s.push_str("echo BENCH-END\n");
    s
}

/// CPU of the device side between the guest's BENCH-BEGIN and BENCH-END,
/// sampled by a thread that watches the console file.
struct CpuWatch {
    result: Arc<Mutex<Option<(f64, f64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl CpuWatch {
    /// Watches `console`; `pids()` lists the device side's processes.
    fn start(console: PathBuf, pids: impl Fn() -> Vec<u32> + Send + 'static) -> CpuWatch {
        let result = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let (r, s) = (result.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let cpu = |pids: &[u32]| pids.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
            let mut begin: Option<(Instant, Vec<u32>, f64)> = None;
            // The last sample while the section ran: a process that ends
            // right after the guest's BENCH-END (QEMU powers off at once)
            // reads 0 from /proc, and its CPU is then this sample, at
            // most one poll old, not a negative difference.
            let mut last = 0.0f64;
            while !s.load(Ordering::Relaxed) {
                let text = fs::read_to_string(&console).unwrap_or_default();
                match &begin {
                    None if text.contains("BENCH-BEGIN") => {
                        let p = pids();
                        let c = cpu(&p);
                        last = c;
                        begin = Some((Instant::now(), p, c));
                    }
                    Some((t0, p, c0)) if text.contains("BENCH-END") => {
                        let c1 = cpu(p).max(last);
                        *r.lock().unwrap_or_else(|e| e.into_inner()) =
                            Some((t0.elapsed().as_secs_f64(), c1 - c0));
                        return;
                    }
                    Some((_, p, _)) => last = last.max(cpu(p)),
                    _ => {}
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        CpuWatch {
            result,
            stop,
            thread: Some(thread),
        }
    }

    /// (wall seconds, CPU seconds) of the bench section, if both lines
    /// were seen.
    fn finish(mut self) -> Option<(f64, f64)> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *self.result.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn host_config(env: &Env, v: Variant, dir: &Path, image: &Path, initrd: &Path) -> String {
    let placement = if v == Variant::HostInProcess {
        "in-process = true"
    } else {
        "remote = \"storage\""
    };
    let doorbells = v != Variant::HostNoDoorbells;
    let event_idx = v != Variant::HostNoEventIdx;
    let io_threads = if v == Variant::HostOneIoThread { 1 } else { 2 };
    format!(
        "[vm]\nmemory = \"512M\"\nvcpus = 2\nkernel = \"{}\"\ninitrd = \"{}\"\ncmdline = \"console=ttyS0 quiet\"\nconsole-log = \"{}\"\n\n\
         [[remote]]\nid = \"storage\"\ntimeout-ms = 30000\ndoorbells = {doorbells}\nlog = \"{}\"\n\n\
         [[device]]\nid = \"vd0\"\n{placement}\nplugin = \"virtio-blk\"\nslot = 5\nfile = \"{}\"\nqueues = 2\nevent-idx = {event_idx}\nio-threads = {io_threads}\n",
        env.kernel.display(),
        initrd.display(),
        dir.join(format!("{}-console.log", v.name())).display(),
        dir.join(format!("{}-device.log", v.name())).display(),
        image.display()
    )
}

/// Boots the guest behind our VMM.
fn run_host(
    env: &Env,
    v: Variant,
    image: &Path,
    dir: &Path,
) -> Result<(JobResult, Option<(f64, f64)>)> {
    let spec = InitramfsSpec::new(VIRTIO_BLK_MODULES, &bench_job());
    let initrd = dir.join(format!("{}-initrd.cpio", v.name()));
    env.build_initramfs(&spec, &initrd)?;
    let config = dir.join(format!("{}.toml", v.name()));
    fs::write(&config, host_config(env, v, dir, image, &initrd))?;
    let console = dir.join(format!("{}-console.log", v.name()));
    fs::write(&console, "")?;
    let mut child = Command::new(sibling_bin("host")?)
        .arg("run")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(fs::File::create(
            dir.join(format!("{}-host.log", v.name())),
        )?)
        .spawn()
        .context("spawning host")?;
    let vmm = child.id();
    let watch = CpuWatch::start(console.clone(), move || {
        let mut p = vec![vmm];
        p.extend(remotes_of(vmm));
        p
    });
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("host run timed out");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let cpu = watch.finish();
    let status = child.wait()?;
    let text = fs::read_to_string(&console)?;
    // A guest lost after its job's end (a triple fault on the way to power
    // off) is a loss too: the VMM says so in its exit code and its crash
    // report.
    if !status.success() {
        let log =
            fs::read_to_string(dir.join(format!("{}-host.log", v.name()))).unwrap_or_default();
        bail!(
            "host exited with {status}:\n{}\n--- console (tail) ---\n{}",
            system_tests::tail_lines(&log, 120),
            system_tests::tail_lines(&text, 10)
        );
    }
    let r = testenv::parse_console(&text).with_context(|| {
        format!(
            "no job result on the console:\n{}",
            system_tests::tail_lines(&text, 30)
        )
    })?;
    Ok((r, cpu))
}

/// Boots the guest in QEMU 7.2 with its virtio-blk, in-process or as
/// vhost-user-blk from qemu-storage-daemon.
fn run_qemu(
    env: &Env,
    v: Variant,
    image: &Path,
    dir: &Path,
) -> Result<(JobResult, Option<(f64, f64)>)> {
    let spec = InitramfsSpec::new(VIRTIO_BLK_MODULES, &bench_job());
    let mut extra: Vec<String> = shared_ram_args(512);
    let mut daemon: Option<Reaped> = None;
    if v == Variant::QemuVhost {
        // A UNIX socket needs a file system that has them: L1's /tmp.
        let sock = PathBuf::from(format!("/tmp/virtio-compare-{}.sock", std::process::id()));
        let _ = fs::remove_file(&sock);
        let log = fs::File::create(dir.join(format!("{}-device.log", v.name())))?;
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                image.display()
            ))
            .args(["--blockdev", "driver=raw,node-name=disk0,file=file0"])
            .arg("--export")
            .arg(format!(
                "type=vhost-user-blk,id=exp0,node-name=disk0,writable=on,num-queues=2,addr.type=unix,addr.path={}",
                sock.display()
            ))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("qemu-storage-daemon (Debian's qemu-system-common)")?;
        daemon = Some(Reaped(child));
        let t = Instant::now();
        while !sock.exists() {
            if t.elapsed() > Duration::from_secs(30) {
                bail!("qemu-storage-daemon made no socket within 30 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        extra.extend([
            "-chardev".into(),
            format!("socket,id=vhost0,path={}", sock.display()),
            "-device".into(),
            "vhost-user-blk-pci,chardev=vhost0,num-queues=2".into(),
        ]);
    } else {
        extra.extend([
            "-drive".into(),
            format!("file={},format=raw,if=none,id=disk0", image.display()),
            "-device".into(),
            "virtio-blk-pci,drive=disk0,num-queues=2".into(),
        ]);
    }
    let console = dir.join(format!("{}-console.log", v.name()));
    fs::write(&console, "")?;
    let me = std::process::id();
    let daemon_pid = daemon.as_ref().map(|d| d.0.id());
    let watch = CpuWatch::start(console.clone(), move || {
        let mut p = children_named(me, "qemu-system-x86");
        p.extend(daemon_pid);
        p
    });
    let opts = RunOptions {
        qemu: QemuKind::Debian12,
        name: format!("virtio-compare-{}", v.name()),
        accel: "kvm".into(),
        cpu: "host".into(),
        smp: 2,
        memory_mib: 512,
        timeout: Duration::from_secs(900),
        extra_args: extra,
        log: Some(console),
        // A guest lost to the environment (docs/testenv.md) is booted
        // again rather than leave the table without a column; the loss
        // is reported on stderr.
        lost_guest_retries: 1,
        ..Default::default()
    };
    let r = env.run_job(&spec, &opts);
    let cpu = watch.finish();
    drop(daemon);
    Ok((r?, cpu))
}

/// One variant's results: whole run seconds, per-job seconds, and the
/// bench section's (wall, CPU) seconds.
struct Row {
    v: Variant,
    secs: f64,
    times: Vec<(String, f64)>,
    cpu: Option<(f64, f64)>,
}

/// The median of `xs` (NaN when empty).
fn median(mut xs: Vec<f64>) -> f64 {
    xs.retain(|x| !x.is_nan());
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

/// One row per variant (in the order they first ran): each job's median
/// time, and the median CPU and run time, over the variant's rounds.
fn medians(rows: &[Row]) -> Vec<Row> {
    let mut out: Vec<Row> = Vec::new();
    for r in rows {
        if out.iter().any(|o| o.v == r.v) {
            continue;
        }
        let same: Vec<&Row> = rows.iter().filter(|o| o.v == r.v).collect();
        let times = JOBS
            .iter()
            .map(|j| {
                let t = median(
                    same.iter()
                        .filter_map(|o| o.times.iter().find(|(n, _)| n == j.name))
                        .map(|(_, t)| *t)
                        .collect(),
                );
                (j.name.to_string(), t)
            })
            .collect();
        let cpu: Vec<(f64, f64)> = same.iter().filter_map(|o| o.cpu).collect();
        out.push(Row {
            v: r.v,
            secs: median(same.iter().map(|o| o.secs).collect()),
            times,
            cpu: (!cpu.is_empty()).then(|| {
                (
                    median(cpu.iter().map(|c| c.0).collect()),
                    median(cpu.iter().map(|c| c.1).collect()),
                )
            }),
        });
    }
    out
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("virtio-compare: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode> {
    let env = Env::load_default().context("test environment (run `testenv prepare`)")?;
    let dir = std::env::temp_dir().join(format!("virtio-compare-{}", std::process::id()));
    fs::create_dir_all(&dir)?;
    let only = std::env::var("VIRTIO_COMPARE_ONLY").ok();
    let chosen: Vec<Variant> = Variant::ALL
        .into_iter()
        .filter(|v| {
            only.as_deref()
                .is_none_or(|o| o.split(',').any(|n| n.trim() == v.name()))
        })
        .collect();
    let rounds: usize = std::env::var("VIRTIO_COMPARE_ROUNDS")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(1)
        .clamp(1, 20);
    let mut rows = Vec::new();
    let mut failed = 0;
    for round in 1..=rounds {
        for &v in &chosen {
            let image = dir.join(format!("{}.img", v.name()));
            make_lsi_image(&image);
            let t0 = Instant::now();
            let ipis = Ipis::now();
            let r = match v {
                Variant::QemuVirtio | Variant::QemuVhost => run_qemu(&env, v, &image, &dir),
                _ => run_host(&env, v, &image, &dir),
            };
            let secs = t0.elapsed().as_secs_f64();
            println!(
                "IPIS {round} {}: {}",
                v.name(),
                Ipis::now().since(ipis, secs)
            );
            match r {
                Ok((r, cpu)) if r.status == 0 => {
                    println!("RESULT {} ok ({secs:.1} s)", v.name());
                    let row = Row {
                        v,
                        secs,
                        times: parse_times(&r.output),
                        cpu,
                    };
                    let per_job: Vec<String> = JOBS
                        .iter()
                        .map(|j| format!("{} {:.0}", j.name, iops(&row, j)))
                        .collect();
                    println!("ROUND {round} {}: {}", v.name(), per_job.join(", "));
                    rows.push(row);
                }
                Ok((r, _)) => {
                    failed += 1;
                    println!(
                        "RESULT {} FAIL status {}:\n{}",
                        v.name(),
                        r.status,
                        r.output
                    );
                }
                Err(e) => {
                    failed += 1;
                    println!("RESULT {} FAIL: {e:#}", v.name());
                    let log = dir.join(format!("{}-device.log", v.name()));
                    let text = fs::read_to_string(log).unwrap_or_default();
                    println!(
                        "--- device log (tail) ---\n{}",
                        system_tests::tail_lines(&text, 20)
                    );
                }
            }
        }
    }
    let rows = medians(&rows);
    if !rows.is_empty() {
        print_table(&rows);
    }
    if let Some(path) = std::env::var_os("VIRTIO_COMPARE_JSON") {
        fs::write(&path, json(&rows).to_string())
            .with_context(|| format!("writing {}", Path::new(&path).display()))?;
        println!("(table as JSON: {})", Path::new(&path).display());
    }
    let _ = fs::remove_dir_all(&dir);
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn iops(row: &Row, job: &Job) -> f64 {
    row.times
        .iter()
        .find(|(n, _)| n == job.name)
        .map_or(f64::NAN, |(_, t)| job.ios as f64 / t)
}

fn cpu_us_per_io(row: &Row) -> f64 {
    let ios: u64 = JOBS.iter().map(|j| j.ios).sum();
    row.cpu.map_or(f64::NAN, |(_, c)| c * 1e6 / ios as f64)
}

fn print_table(rows: &[Row]) {
    println!("\nvirtio-blk, Linux virtio_blk guest (2 vCPUs, 2 queues) under KVM, IOPS (ratio to the first column):");
    print!("{:<16}", "job");
    for r in rows {
        print!("{:>12}{:>7}", r.v.name(), "ratio");
    }
    println!();
    for j in JOBS {
        print!("{:<16}", j.name);
        let base = iops(&rows[0], j);
        for r in rows {
            let x = iops(r, j);
            print!("{x:>12.0}{:>7.2}", x / base);
        }
        println!();
    }
    print!("{:<16}", "cpu us/io");
    let base = cpu_us_per_io(&rows[0]);
    for r in rows {
        let x = cpu_us_per_io(r);
        print!("{x:>12.1}{:>7.2}", x / base);
    }
    println!();
    print!("{:<16}", "whole run (s)");
    for r in rows {
        print!("{:>12.1}{:>7}", r.secs, "");
    }
    println!();
}

fn json(rows: &[Row]) -> serde_json::Value {
    let v: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            let jobs: serde_json::Map<String, serde_json::Value> = JOBS
                .iter()
                .map(|j| (j.name.to_string(), serde_json::json!(iops(r, j))))
                .collect();
            serde_json::json!({
                "variant": r.v.name(),
                "iops": jobs,
                "cpu_us_per_io": cpu_us_per_io(r),
                "whole_run_s": r.secs,
            })
        })
        .collect();
    serde_json::Value::Array(v)
}
