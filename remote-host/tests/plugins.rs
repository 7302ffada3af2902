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
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A file that could not be loaded makes the listing fail, so a script
    // notices.
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stderr.contains("could not be loaded"), "{stderr}");
    // Each file once, though the plugin directory is also one of the
    // defaults (the directory of the executable).
    let mut paths: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.rsplit('\t').next())
        .collect();
    let n = paths.len();
    paths.sort_unstable();
    paths.dedup();
    assert_eq!(paths.len(), n, "a file listed twice:\n{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("dma-example\t0.1.0\tdma-example\t")),
        "{stdout}"
    );
    assert!(
        stdout.lines().any(|l| l.starts_with(
            "faulty-plugin\t0.1.0\tfails,panics,panics-on-read,panics-on-magic,escapes\t"
        )),
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

/// Each way a plugin's ABI can be wrong is refused in at most two lines
/// that name the plugin's plugin-api version and the host's.
#[test]
fn every_abi_refusal_names_both_versions() {
    let examples = target_dir().join("examples");
    let cases = [
        ("libabi_older.so", "0.0.1".to_string(), "older"),
        ("libabi_newer.so", "0.999.0".to_string(), "newer"),
        ("libincompatible_plugin.so", "99.0.0".to_string(), "major"),
        (
            "libabi_layout.so",
            plugin_api::ABI_VERSION.to_string(),
            "expected `PluginModule`",
        ),
    ];
    for (lib, theirs, why) in cases {
        let src = if lib.starts_with("libabi_") {
            examples.join(lib)
        } else {
            target_dir().join(lib)
        };
        assert!(
            src.is_file(),
            "{} is not built: run `cargo build --workspace --all-targets` (scripts/test does)",
            src.display()
        );
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(&src, dir.path().join(lib)).unwrap();
        let out = remote_host()
            .current_dir(dir.path())
            .args(["plugins", "--plugin-dir"])
            .arg(dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(1), "{lib}: {stdout}");
        let copy = std::fs::canonicalize(dir.path().join(lib)).unwrap();
        let copy = copy.to_string_lossy();
        let line = stdout
            .lines()
            .find(|l| l.contains(&*copy))
            .unwrap_or_else(|| panic!("{lib} not reported:\n{stdout}"));
        assert!(line.starts_with("!error"), "{line}");
        assert!(
            line.contains(&format!("plugin-api {theirs}")),
            "{lib}: names the plugin's version {theirs}: {line}"
        );
        assert!(
            line.contains(&format!("plugin-api {}", plugin_api::ABI_VERSION)),
            "{lib}: names the host's version: {line}"
        );
        assert!(line.contains(why), "{lib}: says why ({why}): {line}");
        assert!(
            line.contains("rebuild the plugin"),
            "{lib}: what to do: {line}"
        );
        // One line in the listing (the message has no line breaks).
        assert_eq!(
            stdout.lines().filter(|l| l.contains(&*copy)).count(),
            1,
            "{lib}: {stdout}"
        );
        println!("{line}");
    }
}

/// `check` builds one remote's devices from a file that has no `[vm]`
/// (a config written for one remote-host).
#[test]
fn check_works_on_a_remote_only_config() {
    let dir = require_plugins();
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("remote.toml");
    std::fs::write(
        &path,
        "[[remote]]\nid = \"r\"\n\n[[device]]\nid = \"d0\"\nremote = \"r\"\nplugin = \"dma-example\"\nslot = 4\n",
    )
    .unwrap();
    let (code, stdout, stderr) = check(&path, &dir);
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.starts_with("ok\td0\tdma-example@"), "{stdout}");
    // Piped output carries no colour codes.
    assert!(
        !stderr.contains('\x1b'),
        "colour codes in a pipe: {stderr:?}"
    );
}

/// `remote-host check` of remote `r` in `config`, plugins from `dir`:
/// exit code, standard output and error.
fn check(config: &std::path::Path, dir: &std::path::Path) -> (Option<i32>, String, String) {
    let out = remote_host()
        .args(["check", "--remote", "r", "--config"])
        .arg(config)
        .arg("--plugin-dir")
        .arg(dir)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    let (code, stdout, stderr) = check(&cfg, &dir);
    assert_eq!(code, Some(1), "{stdout}\n{stderr}");
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
    let (_, stdout, _) = check(&cfg, &dir);
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

/// A plugin given as a path in the config is relative to the config's
/// directory, whatever the current directory of the remote-host that
/// reads it (here `/`), with or without a `/` in it.
#[test]
fn a_plugin_given_as_a_path_is_relative_to_the_config() {
    let dir = require_plugins();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::create_dir(tmp.path().join("sub")).unwrap();
    let lib = dir.join("libdma_example.so");
    std::fs::copy(&lib, tmp.path().join("sub/libdma_example.so")).unwrap();
    std::fs::copy(&lib, tmp.path().join("libdma_example.so")).unwrap();
    let path = tmp.path().join("remote.toml");
    std::fs::write(
        &path,
        "[[remote]]\nid = \"r\"\n\n\
         [[device]]\nid = \"d0\"\nremote = \"r\"\nplugin = \"sub/libdma_example.so\"\nslot = 4\n\n\
         [[device]]\nid = \"d1\"\nremote = \"r\"\nplugin = \"libdma_example.so\"\nslot = 5\n",
    )
    .unwrap();
    let out = remote_host()
        .current_dir("/")
        .env_remove("PLUGIN_PATH")
        .args(["check", "--remote", "r", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("ok\td0\tdma-example@"), "{stdout}");
    assert!(stdout.contains("ok\td1\tdma-example@"), "{stdout}");
}
