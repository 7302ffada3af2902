//! What the host tests that run a device in a spawned `remote-host` on this
//! machine's `/dev/kvm` need, checked one way, and the config of that
//! device (included with `#[path]` by the tests and the MMIO benchmark).

use std::path::{Path, PathBuf};

/// `target/<profile>`: where cargo put `remote-host` and the plugins (the
/// running executable is in its `deps/` or `examples/`).
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// What is missing of /dev/kvm, `remote-host` and the dma-example plugin,
/// as a sentence; `None` when nothing is.
pub fn missing() -> Option<String> {
    let dir = profile_dir();
    let mut missing = Vec::new();
    if !Path::new("/dev/kvm").exists() {
        missing.push("/dev/kvm".to_string());
    }
    for f in ["remote-host", "libdma_example.so"] {
        if !dir.join(f).exists() {
            missing.push(dir.join(f).display().to_string());
        }
    }
    (!missing.is_empty()).then(|| {
        format!(
            "needs {} (build: cargo build -p remote-host -p dma-example)",
            missing.join(", ")
        )
    })
}

/// The profile directory when everything is there. Otherwise a test
/// skips (`None`, saying why), except under `CI`, where it fails.
pub fn or_skip() -> Option<PathBuf> {
    match missing() {
        None => Some(profile_dir()),
        Some(why) if std::env::var_os("CI").is_some() => panic!("CI: {why}"),
        Some(why) => {
            eprintln!("SKIP: {why}");
            None
        }
    }
}

/// Writes and loads `work/vm.toml`: a VM without kernel whose one remote
/// `remote` (plus `remote_keys`, TOML lines of its own) serves dma-example
/// as device `dma0` in `slot`, plugins from [`profile_dir`].
pub fn dma_example_config(
    work: &Path,
    remote: &str,
    remote_keys: &str,
    slot: u8,
) -> (PathBuf, config::Config) {
    let path = work.join("vm.toml");
    std::fs::write(
        &path,
        format!(
            "[vm]\nmemory = \"64M\"\nkernel = \"none\"\n\n\
             [[remote]]\nid = \"{remote}\"\n{remote_keys}\nplugin-dirs = [\"{}\"]\n\n\
             [[device]]\nid = \"dma0\"\nremote = \"{remote}\"\nplugin = \"dma-example\"\nslot = {slot}\n",
            profile_dir().display()
        ),
    )
    .unwrap();
    let cfg = config::Config::load(&path).unwrap();
    (path, cfg)
}
