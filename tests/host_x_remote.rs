//! QEMU's own device behind our VMM: Debian 12's QEMU 7.2 `-machine
//! x-remote` runs its `lsi53c895a` + `scsi-hd` on a raw image, and `host
//! run` drives it over mpqemu as a proxy PCI function (`protocol =
//! "mpqemu"`). x-remote only takes a connected socket, so the test makes a
//! socketpair, gives one end to x-remote as fd 3 and the other to `host`
//! with `--remote-fd storage=N`. Then the same guest with our LSI plugin
//! in a `remote-host` that `host` spawns, over mpqemu too. The shared LSI
//! job must pass in both. ONE nested L1 boot: this test binary runs its
//! `in_l1` test inside L1, the outer test checks the results.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use system_tests::{check_lsi_disk_job, lsi_disk_job, make_lsi_image, prepare_lsi_vm};
use testenv::{parse_console, require_env, target_bin, JobResult, NestedOptions, QemuKind};

const DIR_VAR: &str = "HOST_X_REMOTE_DIR";
const RUNS: [&str; 2] = ["xremote", "oursmp"];

fn config(kernel: &Path, dir: &Path, name: &str) -> String {
    format!(
        r#"[vm]
memory = "512M"
vcpus = 2
kernel = "{kernel}"
initrd = "{initrd}"
cmdline = "console=ttyS0 quiet"
console-log = "{dir}/{name}-console.log"

[[remote]]
id = "storage"
protocol = "mpqemu"
timeout-ms = 20000
log = "{dir}/{name}-remote.log"

[[device]]
id = "lsi0"
remote = "storage"
plugin = "lsi53c895a"
slot = 4

[[device.drive]]
file = "{dir}/{name}.img"
scsi-id = 0
"#,
        kernel = kernel.display(),
        initrd = dir.join("initrd.cpio").display(),
        dir = dir.display(),
    )
}

/// Spawns `cmd` with `fd` as its fd 3.
fn spawn_with_fd3(cmd: &mut Command, fd: OwnedFd) -> Child {
    testenv::inherit_as_fd3(cmd, fd.as_raw_fd());
    let child = cmd.spawn().unwrap();
    drop(fd);
    child
}

/// Waits for `child` up to `limit`; kills it after that. Its exit code, or
/// -1 when killed.
fn wait_for(child: &mut Child, limit: Duration) -> i32 {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st.code().unwrap_or(-1);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return -1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Inside L1: runs both VMs and prints NAME-EXIT= and NAME-MS= lines.
#[test]
fn in_l1() {
    if std::env::var("TESTENV_L1").is_err() {
        eprintln!("in_l1: runs only inside the nested L1 guest (see x_remote_lsi_behind_our_vmm)");
        return;
    }
    let env = require_env("host_x_remote(L1)").unwrap();
    let dir = PathBuf::from(std::env::var(DIR_VAR).unwrap());
    let host = target_bin("host").unwrap();

    // 1. QEMU 7.2's x-remote with its own LSI, on one end of a socketpair.
    let t = Instant::now();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let log = fs::File::create(dir.join("xremote-remote.log")).unwrap();
    let drive = format!(
        "file={},format=raw,if=none,id=disk0",
        dir.join("xremote.img").display()
    );
    let mut qemu = env.qemu_command(QemuKind::Debian12);
    // x-remote runs no vCPU but needs an accelerator; in L1 Debian's
    // QEMU cannot load its TCG module, hence kvm first.
    qemu.args([
        "-machine",
        "x-remote,accel=kvm:tcg",
        "-nodefaults",
        "-display",
        "none",
    ])
    .args(["-device", "lsi53c895a,id=lsi0"])
    .args(["-drive", &drive])
    .args(["-device", "scsi-hd,drive=disk0,bus=lsi0.0,scsi-id=0"])
    .args(["-object", "x-remote-object,id=robj0,devid=lsi0,fd=3"])
    .stdin(Stdio::null())
    .stdout(log.try_clone().unwrap())
    .stderr(log);
    let mut xremote = spawn_with_fd3(&mut qemu, OwnedFd::from(theirs));
    let ours = OwnedFd::from(ours);
    let n = ours.as_raw_fd();
    // SAFETY: F_SETFD on an fd we own: `host` inherits it.
    assert!(unsafe { libc::fcntl(n, libc::F_SETFD, 0) } >= 0);
    let mut child = Command::new(&host)
        .arg("run")
        .arg(dir.join("xremote.toml"))
        .arg("--remote-fd")
        .arg(format!("storage={n}"))
        .env("HOST_STATS", "1")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    drop(ours);
    let code = wait_for(&mut child, Duration::from_secs(300));
    println!("xremote-EXIT={code}");
    println!("xremote-MS={}", t.elapsed().as_millis());
    // x-remote leaves by itself once host has closed its socket.
    let t = Instant::now();
    let xcode = wait_for(&mut xremote, Duration::from_secs(20));
    println!(
        "xremote-REMOTE-EXIT={xcode} after {} ms",
        t.elapsed().as_millis()
    );

    // 2. Our LSI plugin in a remote-host that host spawns, over mpqemu.
    let t = Instant::now();
    let mut child = Command::new(&host)
        .arg("run")
        .arg(dir.join("oursmp.toml"))
        .env("HOST_STATS", "1")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let code = wait_for(&mut child, Duration::from_secs(300));
    println!("oursmp-EXIT={code}");
    println!("oursmp-MS={}", t.elapsed().as_millis());
    println!("HOST-X-REMOTE-L1-DONE");
}

fn ms(output: &str, key: &str) -> String {
    output
        .lines()
        .find_map(|l| l.trim().strip_prefix(key))
        .unwrap_or("?")
        .to_owned()
}

/// Guest kernel time (s) at which sda was attached, from the job's dmesg.
fn sda_attached(output: &str) -> String {
    output
        .lines()
        .find(|l| l.contains("Attached SCSI disk"))
        .and_then(|l| l.trim().strip_prefix('['))
        .and_then(|l| l.split(']').next())
        .map_or_else(|| "?".to_owned(), |t| t.trim().to_owned())
}

#[test]
fn x_remote_lsi_behind_our_vmm() {
    if std::env::var("TESTENV_L1").is_ok() {
        return;
    }
    system_tests::guest_test("host_x_remote", |env| {
        let t0 = Instant::now();
        let dir = prepare_lsi_vm(env, "host-x-remote", &lsi_disk_job());
        for name in RUNS {
            make_lsi_image(&dir.join(format!("{name}.img")));
            fs::write(
                dir.join(format!("{name}.toml")),
                config(&env.kernel, &dir, name),
            )
            .unwrap();
        }
        let exe = std::env::current_exe().unwrap();
        let cmd = vec![
            exe.to_string_lossy().into_owned(),
            "--exact".into(),
            "in_l1".into(),
            "--nocapture".into(),
            "--test-threads=1".into(),
        ];
        let opts = NestedOptions {
            name: "host_x_remote".into(),
            timeout: Duration::from_secs(900),
            env: vec![(DIR_VAR.into(), dir.display().to_string())],
            ..Default::default()
        };
        let l1 = env.run_nested(&cmd, &opts).unwrap();
        eprintln!("--- L1 output ---\n{}", l1.output);
        assert!(
            l1.output.contains("HOST-X-REMOTE-L1-DONE"),
            "the L1 part did not finish:\n{}",
            l1.output
        );
        let job = |name: &str| -> JobResult {
            let console =
                fs::read_to_string(dir.join(format!("{name}-console.log"))).unwrap_or_default();
            let log =
                fs::read_to_string(dir.join(format!("{name}-remote.log"))).unwrap_or_default();
            parse_console(&console).unwrap_or_else(|| {
            panic!("{name}: no job markers in the guest console, which ends:\n{}\n--- console ---\n{console}\n--- remote log ---\n{log}", system_tests::tail_lines(&console, 12))
        })
        };
        let mut attached = Vec::new();
        for name in RUNS {
            let r = job(name);
            eprintln!("--- {name}: guest job output ---\n{}", r.output);
            attached.push(format!("{name} {} s", sda_attached(&r.output)));
            check_lsi_disk_job(&r, &dir.join(format!("{name}.img")));
            assert!(
                l1.output.contains(&format!("{name}-EXIT=0")),
                "{name}: host did not exit 0:\n{}",
                l1.output
            );
        }
        eprintln!(
        "host_x_remote: passed in {:.1} s (host run in L1: QEMU x-remote {} ms, our remote-host over mpqemu {} ms)",
        t0.elapsed().as_secs_f64(),
        ms(&l1.output, "xremote-MS="),
        ms(&l1.output, "oursmp-MS="),
    );
        eprintln!(
            "host_x_remote: sda attached at guest time: {}",
            attached.join(", ")
        );
        fs::remove_dir_all(&dir).ok();
    });
}
