//! `remote-host plugins` and `remote-host check` as a user runs them, with
//! real plugin libraries: good, failing, panicking and ABI-incompatible.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::*;

use std::path::PathBuf;
use std::process::Command;

fn remote_host() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_remote-host"));
    c.env_remove("PLUGIN_PATH");
    c
}

fn require_plugins() -> PathBuf {
    plugin_dir_with(&[
        "libdma_example.so",
        "libfaulty_plugin.so",
        "libincompatible_plugin.so",
    ])
}

#[test]
fn plugins_lists_good_and_reports_incompatible() {
    let dir = require_plugins();
    let out = remote_host()
        .args(["plugins", "--plugin-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("dma-example\t0.1.0\tdma-example\t")),
        "{stdout}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("faulty-plugin\t0.1.0\tfails,panics,panics-on-read,escapes\t")),
        "{stdout}"
    );
    let bad = stdout
        .lines()
        .find(|l| l.contains("libincompatible_plugin.so"))
        .unwrap_or_else(|| panic!("incompatible plugin not reported:\n{stdout}"));
    assert!(bad.starts_with("!error"), "{bad}");
    assert!(
        bad.contains("plugin-api 99.0.0"),
        "names the plugin's ABI: {bad}"
    );
    assert!(
        bad.contains(&format!("plugin-api {}", plugin_api::ABI_VERSION)),
        "names ours: {bad}"
    );
}

fn write_config(body: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vm.toml");
    std::fs::write(
        &path,
        format!("[vm]\nmemory = \"64M\"\nkernel = \"vmlinuz\"\n\n[[remote]]\nid = \"r\"\n{body}"),
    )
    .unwrap();
    (dir, path)
}

#[test]
fn failing_and_panicking_constructors_are_reported_and_others_still_run() {
    let dir = require_plugins();
    let (_tmp, cfg) = write_config(
        r#"
[[device]]
id = "boom"
remote = "r"
plugin = "faulty-plugin"
kind = "panics"
slot = 3

[[device]]
id = "fire"
remote = "r"
plugin = "faulty-plugin"
kind = "fails"
slot = 4

[[device]]
id = "good"
remote = "r"
plugin = "dma-example"
slot = 5
max-transfer = 4096
"#,
    );
    let out = remote_host()
        .args(["check", "--remote", "r", "--config"])
        .arg(&cfg)
        .arg("--plugin-dir")
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("failed\tboom\tplugin `faulty-plugin`: device constructor panicked: constructor exploded"),
        "{stdout}"
    );
    assert!(
        stdout.contains("failed\tfire\tplugin `faulty-plugin`: disk on fire"),
        "{stdout}"
    );
    // The device after the panic was still created: the process survived.
    assert!(
        stdout.contains("ok\tgood\tdma-example@0.1.0\t1234:11e9\tslot 5"),
        "{stdout}"
    );
    assert!(
        stderr.contains("vm.toml:"),
        "failures carry the config location: {stderr}"
    );
}

#[test]
fn plugin_settings_errors_and_missing_plugins_are_reported() {
    let dir = require_plugins();
    let (_tmp, cfg) = write_config(
        r#"
[[device]]
id = "typo"
remote = "r"
plugin = "dma-example"
slot = 5
max-transfr = 1

[[device]]
id = "ghost"
remote = "r"
plugin = "no-such-plugin"
slot = 6
"#,
    );
    let out = remote_host()
        .args(["check", "--remote", "r", "--config"])
        .arg(&cfg)
        .arg("--plugin-dir")
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("failed\ttypo\t") && stdout.contains("max-transfr"),
        "{stdout}"
    );
    assert!(
        stdout.contains("failed\tghost\tplugin `no-such-plugin` not found in"),
        "{stdout}"
    );
}

#[test]
fn config_errors_name_file_line_and_column() {
    let (_tmp, cfg) =
        write_config("[[device]]\nid = \"d\"\nremote = \"nowhere\"\nplugin = \"x\"\nslot = 2\n");
    let out = remote_host()
        .args(["check", "--remote", "r", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains(&format!(
            "{}:9:10: device `d` names remote `nowhere`",
            cfg.display()
        )),
        "{stderr}"
    );
    let out = remote_host()
        .args(["check", "--remote", "other", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
