//! Tests of testenv itself: failure behaviour and module resolution.
//! The guest tests need the prepared environment (see `require_env`).

use std::process::Command;
use std::time::Duration;
use testenv::modules::ModuleIndex;
use testenv::{nested::L1_MODULES, require_env, InitramfsSpec, RunOptions};

#[test]
fn missing_tool_is_named() {
    let err = testenv::cmd::run(
        Command::new("testenv-no-such-tool").arg("--flag"),
        "package nothing",
    )
    .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains("`testenv-no-such-tool` not found"), "{msg}");
    assert!(msg.contains("testenv-no-such-tool --flag"), "{msg}");
}

#[test]
fn failing_command_shows_command_and_stderr() {
    let err = testenv::cmd::run(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]), "")
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("exit status: 3") && msg.contains("oops"),
        "{msg}"
    );
}

#[test]
fn l1_modules_resolve_with_dependencies() {
    let Some(env) = require_env("l1_modules_resolve_with_dependencies") else {
        return;
    };
    let index = ModuleIndex::new(&env.modules_dir).unwrap();
    let order = index.resolve(L1_MODULES).unwrap();
    let names: Vec<String> = order
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().replace('-', "_"))
        .collect();
    let pos = |n: &str| {
        names
            .iter()
            .position(|x| x == n)
            .unwrap_or_else(|| panic!("{n} not in {names:?}"))
    };
    assert!(pos("kvm") < pos("kvm_amd"));
    assert!(pos("irqbypass") < pos("kvm"));
    assert!(pos("9pnet") < pos("9pnet_virtio"));
    assert!(pos("netfs") < pos("9p"));
    assert!(pos("virtio_pci_modern_dev") < pos("virtio_pci"));
}

#[test]
fn hung_guest_is_killed_with_console_tail() {
    let Some(env) = require_env("hung_guest_is_killed_with_console_tail") else {
        return;
    };
    let spec = InitramfsSpec::new::<&str>(&[], "echo about-to-hang; sleep 1000");
    let opts = RunOptions {
        name: "hung".into(),
        // Long enough for a TCG boot to reach the job on a loaded
        // machine (the console tail must hold its line).
        timeout: Duration::from_secs(40),
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let err = env.run_job(&spec, &opts).unwrap_err();
    let msg = format!("{err:#}");
    assert!(t.elapsed() < Duration::from_secs(100));
    assert!(msg.contains("timed out after 40 s"), "{msg}");
    assert!(msg.contains("about-to-hang"), "console tail missing: {msg}");
}

#[test]
#[ignore = "runs apt-get update"]
fn unknown_package_is_named() {
    let dir = std::env::temp_dir().join(format!("testenv-dl-{}", std::process::id()));
    let err = testenv::prepare::download(&dir, "testenv-no-such-package").unwrap_err();
    let msg = format!("{err:#}");
    std::fs::remove_dir_all(&dir).ok();
    assert!(msg.contains("testenv-no-such-package"), "{msg}");
    assert!(msg.contains("apt-get download"), "{msg}");
}

#[test]
fn a_guest_that_never_reaches_its_job_is_lost_and_booted_again() {
    let Some(env) = require_env("a_guest_that_never_reaches_its_job_is_lost_and_booted_again")
    else {
        return;
    };
    let spec = InitramfsSpec::new::<&str>(&[], "echo never-seen");
    let opts = RunOptions {
        name: "never-starts".into(),
        // No TCG boot reaches its job within a second.
        start_within: Some(Duration::from_secs(1)),
        lost_guest_retries: 1,
        timeout: Duration::from_secs(120),
        ..Default::default()
    };
    let t = std::time::Instant::now();
    let err = env.run_job(&spec, &opts).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("no job start marker within 1 s"),
        "stopped as lost: {msg}"
    );
    assert!(!msg.contains("timed out"), "not a time-out: {msg}");
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());
    // The first boot's console is kept beside the second's: it was booted
    // again.
    let log = msg
        .lines()
        .find_map(|l| l.strip_prefix("log: "))
        .expect("the error names its log");
    let kept = std::path::Path::new(log).with_extension("lost-1.log");
    assert!(kept.exists(), "{} kept", kept.display());
}
