//! What the remote-host integration tests share: where the built plugins
//! are, a `remote-host serve` of dma-example devices, guest RAM and
//! eventfds, and dma-example's register map (from its crate, the one
//! source). Each test binary uses part of it.

#![allow(dead_code, unused_imports)]

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub use dma_example::{
    DMA_CMD_IRQ, DMA_CMD_START, DMA_FAULT, DMA_OK, ID_VALUE, IRQ_DMA_DONE, REG_DMA_CMD,
    REG_DMA_DST, REG_DMA_LEN, REG_DMA_RESULT, REG_DMA_SRC, REG_ID, REG_IRQ_ACK, REG_IRQ_RAISE,
    REG_IRQ_STATUS, REG_LIVENESS, REG_SCRATCH, REG_STATUS,
};

/// target/<profile>, where the binaries and plugins of this build are
/// (the test executable is target/<profile>/deps/<name>).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The plugin directory, after checking that each of `libs` is built.
pub fn plugin_dir_with(libs: &[&str]) -> PathBuf {
    let dir = target_dir();
    for lib in libs {
        assert!(
            dir.join(lib).is_file(),
            "{lib} is not built in {}: run `cargo build --workspace` first (scripts/test does)",
            dir.display()
        );
    }
    dir
}

/// `tmp/vm.toml`: one remote `r` with a dma-example device per id, in
/// slots 4, 5, ...
pub fn dma_example_config(tmp: &Path, devices: &[&str]) -> PathBuf {
    let mut body =
        String::from("[vm]\nmemory = \"64M\"\nkernel = \"vmlinuz\"\n\n[[remote]]\nid = \"r\"\n");
    for (i, id) in devices.iter().enumerate() {
        body.push_str(&format!(
            "\n[[device]]\nid = \"{id}\"\nremote = \"r\"\nplugin = \"dma-example\"\nslot = {}\n",
            4 + i
        ));
    }
    let path = tmp.join("vm.toml");
    std::fs::write(&path, body).unwrap();
    path
}

/// `remote-host serve --protocol <protocol>` of [`dma_example_config`],
/// logging at debug level to `tmp/remote-host.log`; the caller adds where
/// to serve (`--socket`, `--fd`).
pub fn serve_command(tmp: &Path, devices: &[&str], protocol: &str) -> Command {
    let cfg = dma_example_config(tmp, devices);
    let log = File::create(tmp.join("remote-host.log")).unwrap();
    let mut c = Command::new(env!("CARGO_BIN_EXE_remote-host"));
    c.env_remove("PLUGIN_PATH")
        .env("RUST_LOG", "debug")
        .args(["serve", "--remote", "r", "--protocol", protocol, "--config"])
        .arg(cfg)
        .arg("--plugin-dir")
        .arg(plugin_dir_with(&["libdma_example.so"]))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    c
}

/// What `remote-host` logged so far (for failure messages).
pub fn remote_log(tmp: &Path) -> String {
    std::fs::read_to_string(tmp.join("remote-host.log")).unwrap_or_default()
}

/// `size` bytes of guest RAM as a memfd, as a VMM shares it.
pub fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is
    // checked and then owned by the File.
    let f = unsafe {
        let fd = libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create");
        File::from_raw_fd(fd)
    };
    f.set_len(size).unwrap();
    f
}

/// A non-blocking eventfd (irqfd, resample or unmask fd).
pub fn eventfd() -> File {
    // SAFETY: eventfd returns a new fd (checked) that the File owns.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
        assert!(fd >= 0, "eventfd");
        File::from_raw_fd(fd)
    }
}

/// Waits up to `timeout` for the eventfd to be signalled and consumes
/// it; returns its count.
pub fn wait_eventfd(ev: &File, timeout: Duration) -> Option<u64> {
    let mut pfd = libc::pollfd {
        fd: ev.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd for the duration of the call.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    if r <= 0 {
        return None;
    }
    let mut b = [0u8; 8];
    (&*ev).read_exact(&mut b).ok()?;
    Some(u64::from_ne_bytes(b))
}
