//! Nested KVM: boots L1 (Debian's stock kernel) in sid's QEMU under TCG with
//! `-cpu max` (emulated AMD SVM), so L1 has a real `/dev/kvm`, shares this
//! machine's root over 9p, chroots into it and runs one command there.

use crate::cmd::shell_quote;
use crate::initramfs::{InitramfsSpec, JobResult};
use crate::runner::{run_job, RunOptions};
use crate::{Env, QemuKind};
use anyhow::{bail, Context, Result};
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Modules L1 loads: KVM for AMD and virtio-9p (dependencies resolved).
pub const L1_MODULES: &[&str] = &[
    "irqbypass",
    "ccp",
    "kvm",
    "kvm_amd",
    "virtio",
    "virtio_ring",
    "virtio_pci",
    "netfs",
    "fscache",
    "9pnet",
    "9pnet_virtio",
    "9p",
];

/// Options of a nested run.
#[derive(Debug, Clone)]
pub struct NestedOptions {
    /// Wall-clock limit for the whole L1 run (boot included).
    pub timeout: Duration,
    /// L1 RAM in MiB.
    pub memory_mib: u32,
    /// L1 vCPUs.
    pub smp: u32,
    /// Directory to run the command in (inside the chroot, i.e. the same
    /// path as on this machine); default: the current directory.
    pub cwd: Option<PathBuf>,
    /// Environment variables for the command (in addition to PATH, HOME,
    /// `TESTENV_L1=1`, and RUST_LOG / RUST_BACKTRACE when set here).
    pub env: Vec<(String, String)>,
    /// Use this machine's /tmp (over 9p) instead of a fresh tmpfs. 9p
    /// cannot hold UNIX sockets that work, hence tmpfs by default.
    pub host_tmp: bool,
    /// Extra QEMU arguments for L1.
    pub extra_qemu_args: Vec<String>,
    /// Name for the work directory and logs.
    pub name: String,
}

impl Default for NestedOptions {
    fn default() -> Self {
        NestedOptions {
            timeout: Duration::from_secs(600),
            memory_mib: 3072,
            smp: 2,
            cwd: None,
            env: Vec::new(),
            host_tmp: false,
            extra_qemu_args: Vec::new(),
            name: "nested".into(),
        }
    }
}

/// The L1 initramfs spec that runs `cmd` in the chroot of this machine's root.
pub fn l1_spec(cmd: &[String], opts: &NestedOptions) -> Result<InitramfsSpec> {
    if cmd.is_empty() {
        bail!("nested: no command given");
    }
    let cwd = match &opts.cwd {
        Some(c) => c.clone(),
        None => std::env::current_dir().context("current directory")?,
    };
    let mut env = String::from(
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root TESTENV_L1=1",
    );
    let mut vars = opts.env.clone();
    for k in ["RUST_LOG", "RUST_BACKTRACE"] {
        if let Ok(v) = std::env::var(k) {
            if !vars.iter().any(|(n, _)| n == k) {
                vars.push((k.to_string(), v));
            }
        }
    }
    for (k, v) in &vars {
        env.push(' ');
        env.push_str(&shell_quote(OsStr::new(&format!("{k}={v}"))));
    }
    let words: Vec<String> = cmd.iter().map(|w| shell_quote(OsStr::new(w))).collect();
    let tmp = if opts.host_tmp {
        String::new()
    } else {
        fresh_tmp_keeping(&[cwd.clone(), crate::workspace_root(), crate::testenv_dir()])
    };
    let job = format!(
        r#"set -u
mkdir -p /host
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 hostroot /host || {{ echo "testenv: 9p mount failed"; exit 125; }}
mount -o bind /dev /host/dev
mount -t tmpfs tmpfs /host/dev/shm
mount -t devpts devpts /host/dev/pts 2>/dev/null
mount -o bind /proc /host/proc
mount -o bind /sys /host/sys
{tmp}# Loopback, for jobs that talk TCP to themselves (live migration).
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up 2>/dev/null || echo "testenv: no loopback"
if [ -c /dev/kvm ]; then echo "testenv: /dev/kvm present"; else echo "testenv: /dev/kvm MISSING"; fi
chroot /host /usr/bin/env -i {env} /bin/sh -c 'cd "$1" && shift && exec "$@"' sh {cwd} {words}
"#,
        cwd = shell_quote(cwd.as_os_str()),
        words = words.join(" "),
    );
    let mut spec = InitramfsSpec::new(L1_MODULES, &job);
    spec.verbose_kernel = false;
    Ok(spec)
}

/// Shell lines that give L1 a fresh tmpfs on /tmp (9p cannot hold working
/// UNIX sockets) while keeping the host directories in `keep` that live
/// under /tmp (a checkout in /tmp, as CI may use, must stay visible).
fn fresh_tmp_keeping(keep: &[PathBuf]) -> String {
    let mut under: Vec<PathBuf> = keep
        .iter()
        .filter(|p| p.starts_with("/tmp") && p.as_path() != Path::new("/tmp"))
        .cloned()
        .collect();
    under.sort();
    under.dedup();
    let roots: Vec<PathBuf> = under
        .iter()
        .filter(|p| !under.iter().any(|q| q != *p && p.starts_with(q)))
        .cloned()
        .collect();
    let mut lines = String::new();
    for (i, p) in roots.iter().enumerate() {
        let p = shell_quote(p.as_os_str());
        lines.push_str(&format!(
            "mkdir -p /keep{i}\nmount -o bind /host{p} /keep{i}\n"
        ));
    }
    lines.push_str("mount -t tmpfs tmpfs /host/tmp\n");
    for (i, p) in roots.iter().enumerate() {
        let p = shell_quote(p.as_os_str());
        lines.push_str(&format!(
            "mkdir -p /host{p}\nmount -o move /keep{i} /host{p}\n"
        ));
    }
    lines
}

/// How long L1 may take to reach its job before it counts as lost and is
/// booted again (see [`RunOptions::start_within`]).
pub const L1_START_WITHIN: Duration = Duration::from_secs(150);

/// Runs `cmd` inside L1 (see the module docs) and returns its exit status
/// and output (stdout and stderr together, as printed on L1's console).
pub fn run_nested(env: &Env, cmd: &[String], opts: &NestedOptions) -> Result<JobResult> {
    let spec = l1_spec(cmd, opts)?;
    let mut extra = vec![
        "-virtfs".to_string(),
        "local,path=/,mount_tag=hostroot,security_model=passthrough".to_string(),
    ];
    extra.extend(opts.extra_qemu_args.iter().cloned());
    let ropts = RunOptions {
        qemu: QemuKind::Sid,
        name: opts.name.clone(),
        memory_mib: opts.memory_mib,
        smp: opts.smp,
        accel: "tcg".into(),
        cpu: "max".into(),
        append: String::new(),
        extra_args: extra,
        timeout: opts.timeout,
        log: None,
        lost_guest_retries: 1,
        // L1 reaches its job in 3 to 6 s of its own clock.
        start_within: Some(L1_START_WITHIN),
    };
    run_job(env, &spec, &ropts)
}

#[cfg(test)]
mod tmp_tests {
    use super::*;

    #[test]
    fn checkouts_under_tmp_survive_the_fresh_tmpfs() {
        let s = fresh_tmp_keeping(&[
            PathBuf::from("/tmp/ci/tests"),
            PathBuf::from("/tmp/ci"),
            PathBuf::from("/work/x"),
            PathBuf::from("/tmp/ci/target/testenv"),
        ]);
        assert_eq!(s.matches("mount -o bind").count(), 1, "{s}");
        assert!(
            s.contains("/host'/tmp/ci'") || s.contains("/host/tmp/ci"),
            "{s}"
        );
        let bind = s.find("mount -o bind").unwrap();
        let tmpfs = s.find("mount -t tmpfs").unwrap();
        let mv = s.find("mount -o move").unwrap();
        assert!(bind < tmpfs && tmpfs < mv, "{s}");
        assert_eq!(
            fresh_tmp_keeping(&[PathBuf::from("/work/x")]),
            "mount -t tmpfs tmpfs /host/tmp\n"
        );
    }
}
