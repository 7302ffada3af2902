//! Our LSI53C895A plugin in a separate `remote-host` process, driven by an
//! unmodified Linux `sym53c8xx` in a guest of QEMU 11.1 (`vfio-user-pci`,
//! a vfio-user client we did not write), under TCG. The same guest job as
//! the reference test with QEMU's own LSI, checked the same way.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use system_tests::{check_lsi_disk_job, lsi_disk_job, lsi_job_modules, make_lsi_image};
use testenv::{target_bin, InitramfsSpec, ModuleOrder, QemuKind, RunOptions};

struct Remote(Child);

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(path: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            panic!("remote-host exited before listening: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn lsi_plugin_behind_vfio_user_with_linux_driver() {
    system_tests::guest_test("lsi_vfio_user", |env| {
        let t0 = Instant::now();
        let dir = testenv::workspace_root()
            .join("target")
            .join(format!("lsi-vfio-user-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let image = dir.join("disk.img");
        make_lsi_image(&image);
        let config = dir.join("vm.toml");
        fs::write(
            &config,
            format!(
                r#"[vm]
memory = "512M"
kernel = "{kernel}"

[[remote]]
id = "storage"
log = "remote.log"

[[device]]
id = "lsi0"
remote = "storage"
plugin = "lsi53c895a"
slot = 4

[[device.drive]]
file = "disk.img"
scsi-id = 0
"#,
                kernel = env.kernel.display()
            ),
        )
        .unwrap();
        let socket = dir.join("lsi0.sock");
        let mut child = Command::new(target_bin("remote-host").unwrap())
            .args([
                "serve",
                "--remote",
                "storage",
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
        wait_for(&socket, &mut child);
        let remote = Remote(child);

        let job = lsi_disk_job();
        let mut spec = InitramfsSpec::new(&lsi_job_modules(), &job);
        spec.order = ModuleOrder::Exact;
        let opts = RunOptions {
            qemu: QemuKind::Sid,
            name: "lsi_vfio_user".into(),
            timeout: Duration::from_secs(300),
            extra_args: vec![
                // vfio-user passes guest RAM to the device as fds: it must be shareable.
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
        let r = env.run_job(&spec, &opts);
        let log = fs::read_to_string(dir.join("remote.log")).unwrap_or_default();
        let r = r.unwrap_or_else(|e| panic!("{e:#}\n--- remote-host log ---\n{log}"));
        eprintln!("--- guest job output ---\n{}", r.output);
        if r.status != 0 {
            eprintln!("--- remote-host log ---\n{log}");
        }
        check_lsi_disk_job(&r, &image);
        drop(remote);
        fs::remove_dir_all(&dir).ok();
        eprintln!(
            "lsi_vfio_user: passed in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    });
}
