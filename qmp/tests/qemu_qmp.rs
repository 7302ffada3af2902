#![allow(clippy::unwrap_used)]
//! Interoperability: QEMU's own Python QMP library (`qemu.qmp` from PyPI,
//! installed by `.ci/run`) drives the `qmp_demo` example through
//! `tests/qemu_qmp_client.py`. Skips with a reason when the package is not
//! importable, except under CI=true where that is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// `None` (after printing why) when the test cannot run here.
fn python_with_qemu_qmp() -> Option<String> {
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let probe = Command::new(&python)
        .args(["-c", "import qemu.qmp, qemu.qmp.legacy"])
        .output();
    let reason = match probe {
        Ok(out) if out.status.success() => return Some(python),
        Ok(out) => format!(
            "`{python} -c 'import qemu.qmp'` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => format!("cannot run {python}: {e}"),
    };
    if in_ci() {
        panic!("{reason} (CI=true: .ci/run installs qemu.qmp with pip)");
    }
    eprintln!("SKIP qemu_qmp: {reason}; install it with `python3 -m pip install qemu.qmp`");
    None
}

/// The example binary, built by `cargo test` (examples are built with the
/// tests) or, when only this test was selected, by cargo here.
fn demo_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/deps/qemu_qmp-HASH -> target/<profile>/examples/
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bin = profile_dir.join("examples").join("qmp_demo");
    if !bin.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args(["build", "-p", "qmp", "--example", "qmp_demo"]);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let status = build.status().unwrap();
        assert!(status.success(), "building the qmp_demo example failed");
    }
    assert!(bin.exists(), "{} not found", bin.display());
    bin
}

fn wait_for(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_socket(path: &Path, demo: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !path.exists() {
        if let Some(status) = demo.try_wait().unwrap() {
            panic!("qmp_demo exited before listening: {status}");
        }
        assert!(Instant::now() < deadline, "qmp_demo did not listen");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn qemu_qmp_client_drives_the_monitor() {
    let Some(python) = python_with_qemu_qmp() else {
        return;
    };
    let demo_bin = demo_binary();
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("demo.qmp");
    let mut demo = Command::new(&demo_bin)
        .arg(&socket)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_socket(&socket, &mut demo);

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qemu_qmp_client.py");
    let mut client = Command::new(&python)
        .arg(&script)
        .arg(&socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = client.stdout.take().unwrap();
    let stderr = client.stderr.take().unwrap();
    let out = thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let err = thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());
    let status = wait_for(&mut client, Duration::from_secs(60));
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    println!("{out}");
    eprintln!("{err}");
    let demo_status = wait_for(&mut demo, Duration::from_secs(10));

    assert!(
        status.is_some_and(|s| s.success()),
        "qemu.qmp client failed ({status:?}):\n{out}\n{err}"
    );
    assert!(out.contains("ok: all checks passed"));
    // `quit` through qemu.qmp ended the demo cleanly and removed the socket.
    assert!(
        demo_status.is_some_and(|s| s.success()),
        "qmp_demo after quit: {demo_status:?}"
    );
    assert!(!socket.exists(), "socket left behind");
}
