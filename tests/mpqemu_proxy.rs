//! QEMU 7.2 as the VMM (`-device x-pci-proxy-dev`, the mpqemu client we
//! did not write) against our `remote-host serve --protocol mpqemu --fd 3`
//! with the dma-example plugin, under TCG: the Linux guest sees the
//! device's ids in `/sys/bus/pci`, binds it to uio_pci_generic, reads and
//! writes its BAR0 registers with `devmem` (each access a
//! BAR_READ/BAR_WRITE to our process at the address SeaBIOS placed the
//! BAR at) and runs a DMA between two buffers in guest RAM, which our
//! process reaches through the memfd QEMU sent with SYNC_SYSMEM (the job
//! is in `mpqemu_guest.rs`).
//!
//! Under TCG the proxy delivers no interrupts (its INTx path is a KVM
//! irqfd with resample), so no interrupt is checked here.
//!
//! The socketpair end QEMU uses must survive its exec: `testenv::run_job`
//! builds QEMU's command itself, so the end is made non-CLOEXEC in this
//! process before the run and passed by its number (`fd=N`). This test is
//! alone in its binary, so no other child inherits it by accident.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testenv::{require_env, target_bin, InitramfsSpec, QemuKind, RunOptions};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[path = "mpqemu_guest.rs"]
mod guest;

#[test]
fn qemu_7_2_proxy_sees_our_remote_host_device() {
    let Some(env) = require_env("mpqemu_proxy") else {
        return;
    };
    let t0 = Instant::now();
    let remote_host = target_bin("remote-host").unwrap();
    let plugins = remote_host.parent().unwrap().to_path_buf();
    assert!(
        plugins.join("libdma_example.so").is_file(),
        "libdma_example.so is not built in {}: run `cargo build --workspace` first",
        plugins.display()
    );
    let dir = testenv::workspace_root()
        .join("target")
        .join(format!("mpqemu-proxy-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let config = dir.join("vm.toml");
    fs::write(
        &config,
        r#"[vm]
memory = "512M"
kernel = "vmlinuz"

[[remote]]
id = "r"

[[device]]
id = "dma0"
remote = "r"
plugin = "dma-example"
slot = 4
"#,
    )
    .unwrap();
    let log_path = dir.join("remote-host.log");

    let (vmm_end, device_end) = UnixStream::pair().unwrap();
    let mut cmd = Command::new(&remote_host);
    cmd.env("RUST_LOG", "debug")
        .args([
            "serve",
            "--remote",
            "r",
            "--protocol",
            "mpqemu",
            "--fd",
            "3",
        ])
        .arg("--config")
        .arg(&config)
        .arg("--plugin-dir")
        .arg(&plugins)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(&log_path).unwrap());
    let raw = device_end.as_raw_fd();
    // SAFETY: only dup2/fcntl run between fork and exec (async-signal-safe).
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
    let mut remote = Killed(cmd.spawn().unwrap());
    drop(device_end);

    // QEMU inherits our end under its own number.
    let n = vmm_end.as_raw_fd();
    // SAFETY: F_SETFD on an fd this process owns (`vmm_end`).
    assert!(unsafe { libc::fcntl(n, libc::F_SETFD, 0) } >= 0);
    // No interrupt will come under TCG: do not wait long for it.
    let job = format!("IRQ_WAIT=2\n{}", guest::JOB);
    let spec = InitramfsSpec::new(guest::MODULES, &job);
    let opts = RunOptions {
        qemu: QemuKind::Debian12,
        name: "mpqemu_proxy".into(),
        timeout: Duration::from_secs(240),
        extra_args: vec![
            // mpqemu passes guest RAM to the device as fds: it must be shareable.
            "-object".into(),
            "memory-backend-memfd,id=mem,size=512M,share=on".into(),
            "-machine".into(),
            "memory-backend=mem".into(),
            "-device".into(),
            format!("x-pci-proxy-dev,id=dma0,fd={n}"),
        ],
        ..Default::default()
    };
    let r = env.run_job(&spec, &opts);
    let log = || fs::read_to_string(&log_path).unwrap_or_default();
    let r = r.unwrap_or_else(|e| panic!("{e:#}\n--- remote-host log ---\n{}", log()));
    eprintln!("--- guest job output ---\n{}", r.output);
    assert_eq!(
        r.status,
        0,
        "guest job failed\n--- remote-host log ---\n{}",
        log()
    );
    let out = r.output.to_lowercase();
    // Under TCG the proxy delivers no interrupt: everything else must work.
    guest::check(&out, false, &log);
    if out.contains("uio-event none") {
        eprintln!(
            "mpqemu_proxy: no interrupt under TCG, as expected (the proxy's INTx needs KVM irqfd)"
        );
    }

    // QEMU is gone; once our end closes too, remote-host exits 0 like x-remote.
    drop(vmm_end);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = remote.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "remote-host did not exit at EOF\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "remote-host: {status}\n{}", log());
    let l = log();
    assert!(
        l.contains("SYNC_SYSMEM"),
        "the proxy shared guest RAM:\n{l}"
    );
    fs::remove_dir_all(&dir).ok();
    eprintln!(
        "mpqemu_proxy: passed in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
