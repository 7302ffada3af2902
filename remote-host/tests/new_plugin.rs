//! The out-of-tree path a plugin author takes, end to end: `remote-host
//! new-plugin` writes a crate outside the workspace (plugin-api by path to
//! this checkout), `cargo test` passes in it (its tests run linked and
//! from the `.so`), `cargo build` makes its library, and `remote-host
//! plugins` and `remote-host check` load it. So the template cannot rot.
//!
//! The crate builds into `target/plugin-template` (kept between runs, so
//! only the crate itself is rebuilt), never this workspace's own target
//! directory, whose lock the running `cargo test` holds. Without cargo the
//! test fails: it is not skipped.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const NAME: &str = "template-check";

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn remote_host() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_remote-host"));
    c.env_remove("PLUGIN_PATH");
    c
}

/// Cargo as `cargo test` runs us with it (`$CARGO`), else from PATH.
fn cargo(dir: &Path, target: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(dir)
        .env("CARGO_TARGET_DIR", target)
        .env("CARGO_TERM_COLOR", "never");
    c
}

fn run(what: &str, c: &mut Command) -> Output {
    let out = c.output().unwrap_or_else(|e| {
        panic!(
            "{what}: cannot run {:?}: {e} (this test builds the plugin template as an out-of-tree crate: it needs cargo)",
            c.get_program()
        )
    });
    let text = format!(
        "{what}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    out
}

#[test]
fn new_plugin_builds_tests_and_loads_out_of_tree() {
    let ws = workspace();
    let target = ws.join("target").join("plugin-template");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(NAME);

    let out = run(
        "remote-host new-plugin",
        remote_host()
            .args(["new-plugin", NAME, "--dir"])
            .arg(&dir)
            .arg("--plugin-api")
            .arg(ws.join("plugin-api")),
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("created plugin `{NAME}`")), "{said}");
    // The workspace's versions of plugin-api's dependencies: what this
    // checkout is tested with, and already downloaded.
    std::fs::copy(ws.join("Cargo.lock"), dir.join("Cargo.lock")).unwrap();

    let out = run("cargo test (template)", cargo(&dir, &target).arg("test"));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for test in [
        "linked::registers",
        "library::registers",
        "library::control_and_reset",
    ] {
        assert!(
            stdout.contains(&format!("test {test} ... ok")),
            "{test} did not pass:\n{stdout}"
        );
    }
    assert!(
        !stderr.contains("warning:"),
        "the template builds with warnings:\n{stderr}"
    );

    run("cargo build (template)", cargo(&dir, &target).arg("build"));
    let libs = target.join("debug");
    assert!(
        libs.join("libtemplate_check.so").is_file(),
        "no libtemplate_check.so in {}",
        libs.display()
    );

    // Other plugins may be listed too (the executable's own directory is a
    // default one, and holds the workspace's fixtures): only ours matters.
    let out = remote_host()
        .args(["plugins", "--plugin-dir"])
        .arg(&libs)
        .output()
        .unwrap();
    let listing = String::from_utf8_lossy(&out.stdout);
    assert!(
        listing
            .lines()
            .any(|l| l.starts_with("template-check\t0.1.0\ttemplate-check\t")),
        "{listing}"
    );
    assert!(
        !listing
            .lines()
            .any(|l| l.starts_with("!error") && l.contains("libtemplate_check.so")),
        "{listing}"
    );

    let cfg = tmp.path().join("remote.toml");
    std::fs::write(
        &cfg,
        format!(
            "[[remote]]\nid = \"r\"\n\n[[device]]\nid = \"dev0\"\nremote = \"r\"\nplugin = \"{NAME}\"\nslot = 4\ninitial-scratch = 5\n"
        ),
    )
    .unwrap();
    let out = run(
        "remote-host check",
        remote_host()
            .args(["check", "--remote", "r", "--config"])
            .arg(&cfg)
            .arg("--plugin-dir")
            .arg(&libs),
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        report.starts_with("ok\tdev0\ttemplate-check@0.1.0\t1234:0001\t"),
        "{report}"
    );
}
