//! QEMU 11.1 (`vfio-user-pci`, a vfio-user client we did not write) under
//! TCG against our `remote-host --protocol vfio-user` with the dma-example
//! plugin: the Linux guest sees the device, and a small guest program
//! (busybox `devmem` through `uio_pci_generic`) runs a DMA and receives
//! the interrupt on `/dev/uio0`. Under TCG QEMU's VFIO INTx path has a
//! userspace fallback (no KVM irqfd), so the interrupt does arrive.

#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "mpqemu_guest.rs"]
#[allow(dead_code)]
mod guest;

use std::fs;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use testenv::{target_bin, InitramfsSpec, QemuKind, RunOptions};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn dma_and_interrupt_over_vfio_user_under_tcg() {
    system_tests::guest_test("vfio_user_guest", |env| {
        let dir = testenv::workspace_root()
            .join("target")
            .join(format!("vfio-user-guest-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let config = dir.join("vm.toml");
        fs::write(
        &config,
        "[vm]\nmemory = \"512M\"\nkernel = \"vmlinuz\"\n\n[[remote]]\nid = \"r\"\nlog = \"remote.log\"\n\n\
         [[device]]\nid = \"dma0\"\nremote = \"r\"\nplugin = \"dma-example\"\nslot = 4\n",
    )
    .unwrap();
        let socket = dir.join("dma0.sock");
        let mut child = Command::new(target_bin("remote-host").unwrap())
            .args([
                "serve",
                "--remote",
                "r",
                "--protocol",
                "vfio-user",
                "--config",
            ])
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            assert!(child.try_wait().unwrap().is_none(), "remote-host exited");
            assert!(Instant::now() < deadline, "no socket");
            std::thread::sleep(Duration::from_millis(20));
        }
        let _remote = Killed(child);

        let spec = InitramfsSpec::new(guest::MODULES, guest::JOB);
        let opts = RunOptions {
            qemu: QemuKind::Sid,
            name: "vfio_user_guest".into(),
            timeout: Duration::from_secs(240),
            extra_args: vec![
                "-object".into(),
                "memory-backend-memfd,id=mem,size=512M,share=on".into(),
                "-machine".into(),
                "memory-backend=mem".into(),
                "-device".into(),
                format!(
                    r#"{{"driver":"vfio-user-pci","socket":{{"type":"unix","path":"{}"}}}}"#,
                    socket.display()
                ),
            ],
            ..Default::default()
        };
        let log = || fs::read_to_string(dir.join("remote.log")).unwrap_or_default();
        let r = env
            .run_job(&spec, &opts)
            .unwrap_or_else(|e| panic!("{e:#}\n--- remote-host log ---\n{}", log()));
        eprintln!("--- guest job output ---\n{}", r.output);
        guest::check(&r.output.to_lowercase(), true, &log);
        fs::remove_dir_all(&dir).ok();
    });
}
