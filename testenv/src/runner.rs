//! Boots a kernel + job initramfs in QEMU (TCG by default) and collects
//! the job result from the console, with a time limit.

use crate::initramfs::{parse_console, InitramfsSpec, JobResult, JOB_END_PREFIX};
use crate::{Env, QemuKind};
use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// How to boot a guest.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Which QEMU binary.
    pub qemu: QemuKind,
    /// Name used for the work directory and log files.
    pub name: String,
    /// Guest RAM in MiB.
    pub memory_mib: u32,
    /// vCPUs.
    pub smp: u32,
    /// `-accel` value, e.g. `tcg`.
    pub accel: String,
    /// `-cpu` value.
    pub cpu: String,
    /// Extra kernel command line words.
    pub append: String,
    /// Extra QEMU arguments (devices, drives, ...).
    pub extra_args: Vec<String>,
    /// Wall-clock limit; the guest is killed when it is exceeded.
    pub timeout: Duration,
    /// Console log file; default `<work dir>/console.log`.
    pub log: Option<PathBuf>,
    /// How many times a guest whose kernel is lost (QEMU exits on its own
    /// without the job's end marker: the kernel panicked, rebooted or
    /// triple-faulted) is booted again. For the nested L1, a TCG guest
    /// that runs no code of the project in its kernel, and the benchmarks'
    /// guests (a lost anchor would leave a table without its column): under load its
    /// kernel was seen to end silently during its own boot, and to panic
    /// inside its KVM ("TASK stack guard page was hit" in a vCPU thread)
    /// while running an L2 guest (docs/testenv.md, "The nested environment
    /// loses guests"). Each loss is reported on stderr with the panic line
    /// if any, and its console kept beside the log; a time-out is never
    /// retried.
    pub lost_guest_retries: u32,
    /// The job's start marker must be on the console this soon after
    /// QEMU starts, or the guest counts as lost (stopped at once, and
    /// booted again where `lost_guest_retries` allows). For the nested L1,
    /// whose kernel reaches its job in a few seconds of its own clock, and
    /// which was seen to stall for good in its boot, after loading 9p:
    /// without this the stall would wait out the whole time limit, and a
    /// time-out is never retried.
    pub start_within: Option<Duration>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            qemu: QemuKind::Debian12,
            name: "guest".into(),
            memory_mib: 512,
            smp: 1,
            accel: "tcg".into(),
            cpu: "max".into(),
            append: String::new(),
            extra_args: Vec::new(),
            timeout: Duration::from_secs(300),
            log: None,
            lost_guest_retries: 0,
            start_within: None,
        }
    }
}

/// Lines of console shown in errors.
pub const TAIL_LINES: usize = 40;

/// The last `n` lines of a console log.
pub fn tail(console: &str, n: usize) -> String {
    let text = console.replace("\r\n", "\n");
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A fresh work directory `<cache>/work/<name>-<pid>-<n>`.
pub fn work_dir(env: &Env, name: &str) -> Result<PathBuf> {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let safe: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let d = env
        .dir
        .join("work")
        .join(format!("{safe}-{}-{n}", std::process::id()));
    if d.exists() {
        fs::remove_dir_all(&d)?;
    }
    fs::create_dir_all(&d).with_context(|| format!("creating {}", d.display()))?;
    Ok(d)
}

/// Builds the initramfs for `spec` and boots it (see [`run_initramfs`]).
pub fn run_job(env: &Env, spec: &InitramfsSpec, opts: &RunOptions) -> Result<JobResult> {
    let dir = work_dir(env, &opts.name)?;
    let initramfs = dir.join("initramfs.cpio");
    crate::initramfs::build(env, spec, &initramfs)?;
    let mut opts = opts.clone();
    if opts.log.is_none() {
        opts.log = Some(dir.join("console.log"));
    }
    let mut attempt = 0;
    let r = loop {
        let r = run_initramfs(env, &initramfs, &opts);
        if r.is_ok() || attempt >= opts.lost_guest_retries {
            break r;
        }
        let log = opts.log.clone().unwrap_or_default();
        let console = fs::read(&log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        if !lost(&r) {
            break r;
        }
        attempt += 1;
        let kept = log.with_extension(format!("lost-{attempt}.log"));
        fs::rename(&log, &kept).ok();
        let started = job_started(&console);
        let panic = console
            .lines()
            .find(|l| l.contains("Kernel panic") || l.contains("BUG: "))
            .unwrap_or("no panic message: a silent reset");
        eprintln!(
            "testenv: guest `{}`'s kernel was lost {} its job started ({}); its console is kept in {}; booting it again ({attempt} of {})",
            opts.name,
            if started { "after" } else { "before" },
            panic.trim(),
            kept.display(),
            opts.lost_guest_retries
        );
    };
    // Keep the console log; the image can be rebuilt.
    fs::remove_file(&initramfs).ok();
    r
}

/// Whether the console shows the job's start marker.
fn job_started(console: &str) -> bool {
    console
        .lines()
        .any(|l| l.trim_end() == crate::initramfs::JOB_START)
}

/// Whether a failed run ended on its own, without the job's end marker:
/// a time-out is not such an end (it is reported as it is).
fn lost(r: &Result<JobResult>) -> bool {
    let Err(e) = r else { return false };
    !e.to_string().contains(TIMED_OUT)
}

/// Words of the time-out error that tell it from an early end.
const TIMED_OUT: &str = "timed out after";

/// How long a CPU of the guest's kernel may report itself stuck (its
/// soft-lockup watchdog) before the guest counts as wedged.
pub const WEDGED_AFTER_S: u64 = 120;

/// The console's soft-lockup report of a CPU stuck for at least
/// [`WEDGED_AFTER_S`], if there is one.
///
/// A nested L1 (KVM on QEMU's TCG emulation of SVM) has been seen with a
/// kernel worker spinning on one CPU for good ("BUG: soft lockup - CPU#1
/// stuck for 26s!", then 53 s, 79 s, ...): its 9p file system stalls with
/// it, so nothing inside ends the job, and only the time limit would,
/// many minutes later. A guest kernel that reports a CPU stuck for two
/// minutes is lost like one that reset: it is stopped at once and booted
/// again where the caller allows (`lost_guest_retries`).
pub fn wedged(console: &str) -> Option<&str> {
    console.lines().find(|l| {
        l.split("soft lockup - CPU#")
            .nth(1)
            .and_then(|rest| rest.split("stuck for ").nth(1))
            .and_then(|s| s.split('s').next())
            .and_then(|n| n.parse::<u64>().ok())
            .is_some_and(|secs| secs >= WEDGED_AFTER_S)
    })
}

/// Boots `env.kernel` with `initramfs`, `-nographic -no-reboot`, console
/// into the log file; waits for QEMU to exit (or kills it at the time
/// limit) and parses the job markers. Errors carry the console tail.
pub fn run_initramfs(env: &Env, initramfs: &Path, opts: &RunOptions) -> Result<JobResult> {
    let log = match &opts.log {
        Some(l) => l.clone(),
        None => work_dir(env, &opts.name)?.join("console.log"),
    };
    if let Some(d) = log.parent() {
        fs::create_dir_all(d)?;
    }
    let stderr_path = log.with_extension("stderr");
    let out = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = fs::File::create(&stderr_path)?;
    let mut cmd = env.qemu_command(opts.qemu);
    cmd.args(["-accel", &opts.accel, "-cpu", &opts.cpu])
        .args(["-m", &opts.memory_mib.to_string()])
        .args(["-smp", &opts.smp.to_string()])
        .arg("-kernel")
        .arg(&env.kernel)
        .arg("-initrd")
        .arg(initramfs)
        .arg("-append")
        .arg(format!("console=ttyS0 panic=-1 {}", opts.append).trim())
        .args(["-nographic", "-no-reboot", "-net", "none"])
        .args(&opts.extra_args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    let line = crate::cmd::describe(&cmd);
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .with_context(|| format!("cannot start QEMU: {line}"))?;
    let mut end_seen: Option<Instant> = None;
    let mut stuck: Option<String> = None;
    let mut started = false;
    let read_log = || fs::read(&log).map(|b| String::from_utf8_lossy(&b).into_owned());
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break Some(st);
        }
        if start.elapsed() > opts.timeout {
            break None;
        }
        if end_seen.is_none() {
            let text = read_log().unwrap_or_default();
            if text.contains(JOB_END_PREFIX) && parse_console(&text).is_some() {
                end_seen = Some(Instant::now());
            } else if let Some(l) = wedged(&text) {
                stuck = Some(format!("its kernel: \"{}\"", l.trim()));
                child.kill().ok();
                break child.wait().ok();
            } else if !started {
                started = job_started(&text);
                if let Some(limit) = opts
                    .start_within
                    .filter(|l| !started && start.elapsed() > *l)
                {
                    stuck = Some(format!(
                        "no job start marker within {} s of its boot",
                        limit.as_secs()
                    ));
                    child.kill().ok();
                    break child.wait().ok();
                }
            }
        } else if end_seen.is_some_and(|t| t.elapsed() > Duration::from_secs(20)) {
            // Job finished but poweroff did not end QEMU: stop it.
            child.kill().ok();
            break child.wait().ok();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let console = read_log().unwrap_or_default();
    let qemu_err = fs::read_to_string(&stderr_path).unwrap_or_default();
    let Some(status) = status else {
        child.kill().ok();
        child.wait().ok();
        bail!(
            "guest `{}` {TIMED_OUT} {} s and was killed\ncommand: {line}\nlog: {}\n--- last {TAIL_LINES} console lines ---\n{}",
            opts.name,
            opts.timeout.as_secs(),
            log.display(),
            tail(&console, TAIL_LINES)
        );
    };
    if let Some(l) = stuck {
        bail!(
            "guest `{}` wedged ({l}) after {:.1} s and was stopped\ncommand: {line}\nlog: {}\n--- last {TAIL_LINES} console lines ---\n{}",
            opts.name,
            start.elapsed().as_secs_f64(),
            log.display(),
            tail(&console, TAIL_LINES)
        );
    }
    match parse_console(&console) {
        Some(r) => Ok(r),
        None => bail!(
            "guest `{}` ended ({status}, after {:.1} s) without the job end marker\ncommand: {line}\nlog: {}\n--- QEMU stderr ---\n{}\n--- last {TAIL_LINES} console lines ---\n{}",
            opts.name,
            start.elapsed().as_secs_f64(),
            log.display(),
            tail(&qemu_err, 20),
            tail(&console, TAIL_LINES)
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_with_a_cpu_stuck_for_two_minutes_is_wedged() {
        let early =
            "[   68.69] watchdog: BUG: soft lockup - CPU#1 stuck for 26s! [kworker/1:2:179]\n";
        assert_eq!(wedged(early), None, "a slow moment is not a wedge");
        let later = format!(
            "{early}[  152.69] watchdog: BUG: soft lockup - CPU#1 stuck for 105s! [kworker/1:2:179]\n\
             [  180.69] watchdog: BUG: soft lockup - CPU#1 stuck for 131s! [kworker/1:2:179]\n"
        );
        assert!(
            wedged(&later).is_some_and(|l| l.contains("131s")),
            "{later}"
        );
        assert_eq!(wedged("round 120 stuck for 500s\n"), None);
    }

    #[test]
    fn a_lost_kernel_is_one_that_ended_without_the_end_marker() {
        let failed = || -> Result<JobResult> { bail!("guest `g` ended (exit status: 0)") };
        let timed_out = || -> Result<JobResult> { bail!("guest `g` {TIMED_OUT} 9 s") };
        assert!(lost(&failed()));
        assert!(!lost(&timed_out()));
        let done = || -> Result<JobResult> {
            Ok(JobResult {
                status: 1,
                output: String::new(),
                console: String::new(),
            })
        };
        assert!(
            !lost(&done()),
            "a job that ended (even failing) is not lost"
        );
    }
}
