//! Test environment for whole-system tests: a Debian 12 guest kernel and
//! busybox userland, job initramfs images, QEMU peers (Debian 12's 7.2 and a
//! Debian sid tree's 11.x), a TCG guest runner and a nested-KVM runner.
//!
//! Everything is cached under [`testenv_dir`] (`$TESTENV_DIR`, default
//! `<workspace>/target/testenv`) by `testenv prepare`. Tests call
//! [`require_env`] and skip (or, with `CI=true`, fail) when it is missing.
//! See `docs/testenv.md`.

pub mod cmd;
pub mod cpio;
pub mod initramfs;
pub mod modules;
pub mod nested;
pub mod prepare;
pub mod runner;
pub mod vmlinux;

pub use initramfs::{parse_console, InitramfsSpec, JobResult, ModuleOrder};
pub use nested::{run_nested, NestedOptions};
pub use prepare::prepare;
pub use runner::{run_initramfs, run_job, RunOptions};

use anyhow::{bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The modules an LSI53C895A disk needs in the stock kernel, in load order.
pub const LSI_MODULES: &[&str] = &[
    "crct10dif_common",
    "crct10dif_generic",
    "crc-t10dif",
    "crc64",
    "crc64-rocksoft",
    "crc64_rocksoft_generic",
    "t10-pi",
    "scsi_common",
    "scsi_mod",
    "scsi_transport_spi",
    "sym53c8xx",
    "sd_mod",
];

/// Which QEMU to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QemuKind {
    /// Debian 12's `/usr/bin/qemu-system-x86_64` (7.2, from apt).
    Debian12,
    /// The debootstrapped Debian sid tree's QEMU (11.x, has vfio-user-pci),
    /// run through the tree's own dynamic loader, without chroot.
    Sid,
}

/// The workspace root (parent of this crate's manifest directory when it
/// still exists, else found by walking up from the current executable).
pub fn workspace_root() -> PathBuf {
    let compiled = Path::new(env!("CARGO_MANIFEST_DIR"));
    if let Some(p) = compiled.parent() {
        if p.join("Cargo.toml").exists() {
            return p.to_path_buf();
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            let toml = dir.join("Cargo.toml");
            if fs::read_to_string(&toml).is_ok_and(|t| t.contains("[workspace]")) {
                return dir.to_path_buf();
            }
        }
    }
    compiled.to_path_buf()
}

/// `$TESTENV_DIR`, default `<workspace>/target/testenv`.
pub fn testenv_dir() -> PathBuf {
    match std::env::var_os("TESTENV_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => workspace_root().join("target").join("testenv"),
    }
}

/// A prepared environment (all paths absolute).
#[derive(Debug, Clone)]
pub struct Env {
    /// The cache directory.
    pub dir: PathBuf,
    /// Guest kernel version, e.g. `6.1.0-56-amd64`.
    pub kernel_version: String,
    /// Guest kernel image (bzImage).
    pub kernel: PathBuf,
    /// `.../lib/modules/<version>` of the guest kernel.
    pub modules_dir: PathBuf,
    /// Static busybox for the initramfs.
    pub busybox: PathBuf,
    /// Root of the Debian sid tree (QEMU 11.x).
    pub sid_root: PathBuf,
}

impl Env {
    /// Loads a prepared environment from `dir`; errors name what is missing.
    pub fn load(dir: &Path) -> Result<Env> {
        let dir = if dir.is_absolute() {
            dir.to_path_buf()
        } else {
            std::env::current_dir()?.join(dir)
        };
        let marker = |m: &str| -> Result<String> {
            let p = dir.join(m);
            fs::read_to_string(&p)
                .map(|s| s.trim().to_string())
                .with_context(|| {
                    format!(
                        "{} missing (run `cargo run -p testenv -- prepare`)",
                        p.display()
                    )
                })
        };
        let kernel_version = marker(prepare::KERNEL_MARKER)?;
        marker(prepare::BUSYBOX_MARKER)?;
        marker(prepare::SID_MARKER)?;
        let root = dir.join("debian12");
        let env = Env {
            kernel: root.join("boot").join(format!("vmlinuz-{kernel_version}")),
            modules_dir: root.join("lib/modules").join(&kernel_version),
            busybox: root.join("bin/busybox"),
            sid_root: dir.join("sid"),
            kernel_version,
            dir,
        };
        for p in [&env.kernel, &env.modules_dir, &env.busybox, &env.sid_root] {
            if !p.exists() {
                bail!(
                    "{} missing (run `cargo run -p testenv -- prepare`)",
                    p.display()
                );
            }
        }
        Ok(env)
    }

    /// Loads the environment from [`testenv_dir`].
    pub fn load_default() -> Result<Env> {
        Env::load(&testenv_dir())
    }

    /// A `Command` that runs the chosen QEMU; add arguments to it.
    pub fn qemu_command(&self, kind: QemuKind) -> Command {
        Env::qemu_command_for(kind, &self.sid_root)
    }

    /// [`Env::qemu_command`] for a given sid tree.
    pub fn qemu_command_for(kind: QemuKind, sid_root: &Path) -> Command {
        match kind {
            QemuKind::Debian12 => Command::new("/usr/bin/qemu-system-x86_64"),
            QemuKind::Sid => {
                let mut c = Command::new(sid_root.join("lib64/ld-linux-x86-64.so.2"));
                let libs = format!(
                    "{0}/lib/x86_64-linux-gnu:{0}/usr/lib/x86_64-linux-gnu",
                    sid_root.display()
                );
                // Loadable QEMU modules must come from the same build: QEMU
                // also searches its compiled-in /usr/lib/x86_64-linux-gnu/qemu,
                // where Debian 12's 7.2 modules are (loading them aborts).
                let moddir = sid_root.join("usr/lib/x86_64-linux-gnu/qemu");
                c.env("QEMU_MODULE_DIR", &moddir);
                hide_host_qemu_modules(&mut c, &moddir);
                c.arg("--library-path")
                    .arg(libs)
                    .arg(sid_root.join("usr/bin/qemu-system-x86_64"))
                    .arg("-L")
                    .arg(sid_root.join("usr/share/qemu"))
                    .arg("-L")
                    .arg(sid_root.join("usr/share/seabios"));
                c
            }
        }
    }

    /// Builds a job initramfs (see [`initramfs::build`]).
    pub fn build_initramfs(&self, spec: &InitramfsSpec, out: &Path) -> Result<Vec<PathBuf>> {
        initramfs::build(self, spec, out)
    }

    /// Builds the initramfs for `spec` and boots it (see [`run_job`]).
    pub fn run_job(&self, spec: &InitramfsSpec, opts: &RunOptions) -> Result<JobResult> {
        run_job(self, spec, opts)
    }

    /// Runs `cmd` on this machine's root inside a nested-KVM L1 guest.
    pub fn run_nested(&self, cmd: &[String], opts: &NestedOptions) -> Result<JobResult> {
        run_nested(self, cmd, opts)
    }
}

/// Runs `cmd` in its own mount namespace where the host's QEMU module
/// directory is replaced by `moddir` (bind mount). Only done as root and
/// when both directories exist; otherwise `cmd` is left as it is.
fn hide_host_qemu_modules(cmd: &mut Command, moddir: &Path) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::process::CommandExt;
    const HOST_MODDIR: &str = "/usr/lib/x86_64-linux-gnu/qemu";
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !root || !Path::new(HOST_MODDIR).is_dir() || !moddir.is_dir() {
        return;
    }
    let (Ok(src), Ok(dst), Ok(slash)) = (
        CString::new(moddir.as_os_str().as_bytes()),
        CString::new(HOST_MODDIR),
        CString::new("/"),
    ) else {
        return;
    };
    let hook = move || -> std::io::Result<()> {
        // SAFETY: unshare and mount are async-signal-safe system calls; the
        // CStrings were allocated before fork and outlive this closure.
        // Failures are ignored: QEMU then runs with the host's module
        // directory visible, which only matters for modules sid lacks.
        unsafe {
            if libc::unshare(libc::CLONE_NEWNS) == 0
                && libc::mount(
                    std::ptr::null(),
                    slash.as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) == 0
            {
                libc::mount(
                    src.as_ptr(),
                    dst.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                );
            }
        }
        Ok(())
    };
    // SAFETY: the hook only makes async-signal-safe system calls and does
    // not allocate (see above).
    unsafe {
        cmd.pre_exec(hook);
    }
}

/// The prepared environment for a real-guest test, or `None` (test skips)
/// when it is missing. With `CI=true` a missing environment panics instead.
pub fn require_env(test_name: &str) -> Option<Env> {
    match Env::load_default() {
        Ok(env) => Some(env),
        Err(e) => {
            let msg = format!("{test_name}: test environment not prepared: {e:#}");
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("{msg} (CI=true: failing instead of skipping)");
            }
            eprintln!("SKIP {msg}");
            None
        }
    }
}

/// A binary built by cargo in the same target directory as the running test
/// executable (`target/<profile>/<name>`, the test being in
/// `target/<profile>/deps/`).
pub fn target_bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("current_exe")?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .context("test executable has no grandparent directory")?;
    let p = profile_dir.join(name);
    if !p.exists() {
        bail!(
            "{} not found: build it first (`cargo build --workspace --all-targets`, as scripts/test does)",
            p.display()
        );
    }
    Ok(p)
}

/// Makes `raw` the fd 3 of the child `cmd` starts, inherited across exec
/// (how `remote-host serve --fd 3` and QEMU's `x-remote ... fd=3` are
/// given their connected socket in tests). The caller closes its own copy
/// after spawning.
pub fn inherit_as_fd3(cmd: &mut std::process::Command, raw: std::os::fd::RawFd) {
    use std::os::unix::process::CommandExt;
    // SAFETY: only dup2 and fcntl run in the child between fork and exec;
    // both are async-signal-safe. dup2 clears FD_CLOEXEC on the new fd;
    // when `raw` already is 3, dup2 does nothing and fcntl clears it.
    unsafe {
        cmd.pre_exec(move || {
            let r = if raw == 3 {
                libc::fcntl(3, libc::F_SETFD, 0)
            } else {
                libc::dup2(raw, 3)
            };
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}
