//! Builds busybox initramfs images that run one job script and report its
//! result between console markers.

use crate::cpio::CpioWriter;
use crate::modules::ModuleIndex;
use crate::Env;
use anyhow::{bail, Context, Result};
use std::fs;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Printed on the console right before the job starts.
pub const JOB_START: &str = "===TESTENV-JOB-START===";
/// Prefix of the line printed after the job: `===TESTENV-JOB-END status=N===`.
pub const JOB_END_PREFIX: &str = "===TESTENV-JOB-END status=";

/// How the module list of an [`InitramfsSpec`] is interpreted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ModuleOrder {
    /// Add each module's `depends=` modules (recursively) before it.
    #[default]
    ResolveDeps,
    /// Load exactly the given modules in the given order.
    Exact,
}

/// An extra file to put into the initramfs.
#[derive(Debug, Clone)]
pub struct ExtraFile {
    /// Absolute path inside the guest.
    pub guest_path: String,
    /// Contents.
    pub data: Vec<u8>,
    /// Permission bits, e.g. 0o755.
    pub mode: u32,
}

/// What goes into a job initramfs.
#[derive(Debug, Clone, Default)]
pub struct InitramfsSpec {
    /// Kernel module names (`-` and `_` alike), loaded with `insmod`.
    pub modules: Vec<String>,
    /// Whether dependencies are resolved or the list is taken as is.
    pub order: ModuleOrder,
    /// The job: a busybox `sh` script, run after the modules are loaded.
    pub job: String,
    /// Keep kernel messages on the console during the job (default: only
    /// emergencies are printed, so the job output stays clean; `dmesg`
    /// still shows everything).
    pub verbose_kernel: bool,
    /// Extra files.
    pub files: Vec<ExtraFile>,
}

impl InitramfsSpec {
    /// A spec with modules (dependencies resolved) and a job script.
    pub fn new<S: AsRef<str>>(modules: &[S], job: &str) -> Self {
        InitramfsSpec {
            modules: modules.iter().map(|m| m.as_ref().to_string()).collect(),
            job: job.to_string(),
            ..Default::default()
        }
    }
}

const INIT: &str = r#"#!/bin/sh
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /dev/shm
for m in $(cat /etc/testenv/modules); do
    insmod "/lib/modules/$m" || echo "testenv: insmod $m failed"
done
[ -e /etc/testenv/quiet ] && echo 1 > /proc/sys/kernel/printk
printf '\n===TESTENV-JOB-START===\n'
sh /etc/testenv/job.sh
st=$?
printf '\n===TESTENV-JOB-END status=%s===\n' "$st"
console-drain
sync
poweroff -f
sleep 5
echo o > /proc/sysrq-trigger
"#;

/// `console-drain`: waits (at most 30 s) until the console's tty has sent
/// everything written to it. `poweroff -f` and `reboot -f` do not wait for
/// the serial driver's transmit buffer (up to a page), so on a slow or
/// loaded host the end of the job's output, end marker included, was lost.
/// Setting the console's own settings back with `tcsetattr(TCSADRAIN)`
/// (what busybox `stty` uses for any setting) waits for the drain without
/// changing anything. Jobs that reboot call it themselves.
const CONSOLE_DRAIN: &str = r#"#!/bin/sh
mode=$(stty -F /dev/console -g 2>/dev/null) || exit 0
timeout 30 stty -F /dev/console "$mode" 2>/dev/null
exit 0
"#;

/// The applets of a busybox binary as paths (`bin/sh`, `sbin/insmod`, ...),
/// without `busybox` itself (a `busybox -> busybox` link makes the kernel
/// fail `/init` with ELOOP).
pub fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let text = crate::cmd::run_text(
        Command::new(busybox).arg("--list-full"),
        "from package busybox-static: run `testenv prepare`",
    )?;
    let applets: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .filter(|l| l.rsplit('/').next() != Some("busybox"))
        .map(str::to_string)
        .collect();
    if applets.is_empty() {
        bail!("`{} --list-full` listed no applets", busybox.display());
    }
    Ok(applets)
}

/// Builds the initramfs described by `spec` at `out` (newc cpio,
/// uncompressed). Returns the module files in load order.
pub fn build(env: &Env, spec: &InitramfsSpec, out: &Path) -> Result<Vec<PathBuf>> {
    let index = ModuleIndex::new(&env.modules_dir)?;
    let names: Vec<&str> = spec.modules.iter().map(String::as_str).collect();
    let mods = match spec.order {
        ModuleOrder::ResolveDeps => index.resolve(&names)?,
        ModuleOrder::Exact => index.ordered(&names)?,
    };
    let busybox = fs::read(&env.busybox)
        .with_context(|| format!("reading busybox {}", env.busybox.display()))?;
    let applets = busybox_applets(&env.busybox)?;

    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir)?;
    }
    let file = fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut w = CpioWriter::new(BufWriter::new(file));
    for d in [
        "dev",
        "proc",
        "sys",
        "tmp",
        "run",
        "mnt",
        "root",
        "etc/testenv",
        "lib/modules",
    ] {
        w.dir(d)?;
    }
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.file("bin/busybox", 0o755, &busybox)?;
    for a in &applets {
        let depth = a.matches('/').count();
        let target = format!("{}bin/busybox", "../".repeat(depth));
        w.symlink(a, &target)?;
    }
    let mut list = String::new();
    for m in &mods {
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .context("module file name")?
            .to_string();
        let data = fs::read(m).with_context(|| format!("reading {}", m.display()))?;
        w.file(&format!("lib/modules/{name}"), 0o644, &data)?;
        list.push_str(&name);
        list.push('\n');
    }
    w.file("etc/testenv/modules", 0o644, list.as_bytes())?;
    w.file("etc/testenv/job.sh", 0o755, spec.job.as_bytes())?;
    if !spec.verbose_kernel {
        w.file("etc/testenv/quiet", 0o644, b"")?;
    }
    for f in &spec.files {
        w.file(&f.guest_path, f.mode, &f.data)?;
    }
    w.file("bin/console-drain", 0o755, CONSOLE_DRAIN.as_bytes())?;
    w.file("init", 0o755, INIT.as_bytes())?;
    w.finish()?;
    Ok(mods)
}

/// The result of a guest job.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// The job script's exit status.
    pub status: i32,
    /// What the job printed (between the markers).
    pub output: String,
    /// The whole console log (firmware, kernel, init, job).
    pub console: String,
}

impl JobResult {
    /// Whether the job exited with status 0.
    pub fn success(&self) -> bool {
        self.status == 0
    }
}

/// Finds the job markers in a console log. `None` when the job did not
/// finish (no end marker after the start marker).
pub fn parse_console(console: &str) -> Option<JobResult> {
    let text = console.replace("\r\n", "\n").replace('\r', "");
    let mut lines = text.split('\n');
    let mut output = Vec::new();
    let mut started = false;
    for line in lines.by_ref() {
        if !started {
            started = line.trim_end() == JOB_START;
            continue;
        }
        if let Some(rest) = line.trim_end().strip_prefix(JOB_END_PREFIX) {
            if let Some(n) = rest.strip_suffix("===") {
                if let Ok(status) = n.parse::<i32>() {
                    // The end marker is preceded by a newline that init adds.
                    if output.last() == Some(&"") {
                        output.pop();
                    }
                    let mut out = output.join("\n");
                    if !out.is_empty() {
                        out.push('\n');
                    }
                    return Some(JobResult {
                        status,
                        output: out,
                        console: text,
                    });
                }
            }
        }
        output.push(line);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_markers() {
        let console = "SeaBIOS\r\n[ 1.0] boot\r\n\r\n===TESTENV-JOB-START===\r\nhello\r\nworld\r\n\r\n===TESTENV-JOB-END status=3===\r\n[ 2.0] reboot: Power down\r\n";
        let r = parse_console(console).unwrap();
        assert_eq!(r.status, 3);
        assert_eq!(r.output, "hello\nworld\n");
        assert!(r.console.contains("SeaBIOS"));
        assert!(parse_console("===TESTENV-JOB-START===\nx\n").is_none());
    }
}
