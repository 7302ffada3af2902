//! Replays the committed corpus (`fuzz/corpus/<target>/*`: the seeds,
//! what the fuzzer found interesting, and any crash reproducer) through
//! the same entry points the fuzzer calls, so a regression shows up in
//! `cargo test` without the fuzzer. A panic on any thread (a device's
//! worker included) fails the test, as it would crash the fuzzer.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// One replay at a time, so the panic count is this target's alone.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn count_panics() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            default(info);
        }));
    });
}

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn replay(target: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    count_panics();
    let f = fuzz_targets::target(target).expect("known target");
    let files = corpus(target);
    assert!(
        files.len() >= 3,
        "fuzz/corpus/{target} has {} files; the seeds at least should be there",
        files.len()
    );
    for file in &files {
        let data = std::fs::read(file).expect("corpus file");
        let before = PANICS.load(Ordering::SeqCst);
        f(&data);
        assert_eq!(
            PANICS.load(Ordering::SeqCst),
            before,
            "{} panicked (see above)",
            file.display()
        );
    }
    eprintln!("{target}: {} inputs replayed", files.len());
}

#[test]
fn vfio_user() {
    replay("vfio_user");
}

#[test]
fn mpqemu() {
    replay("mpqemu");
}

#[test]
fn control() {
    replay("control");
}

#[test]
fn config() {
    replay("config");
}

#[test]
fn lsi() {
    replay("lsi");
}

#[test]
fn vfio_user_client() {
    replay("vfio_user_client");
}

#[test]
fn mpqemu_client() {
    replay("mpqemu_client");
}

#[test]
fn qmp() {
    replay("qmp");
}

#[test]
fn lsi_state() {
    replay("lsi_state");
}

/// The state seeds start the fuzzer past the parser: each but the
/// truncated one is a state the controller takes.
#[test]
fn lsi_state_seeds_restore() {
    for s in fuzz_targets::seeds::all() {
        if s.target != "lsi_state" {
            continue;
        }
        let verdict = fuzz_targets::lsi_state_verdict(&s.data);
        assert_eq!(
            verdict.is_ok(),
            s.name != "truncated",
            "{}: {verdict:?}",
            s.name
        );
    }
}

/// The seeds in the source are the ones committed.
#[test]
fn committed_seeds_are_current() {
    // Its failure is a panic: not while a replay counts panics.
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    for s in fuzz_targets::seeds::all() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(s.target)
            .join(format!("seed-{}", s.name));
        let on_disk = std::fs::read(&path).unwrap_or_else(|e| {
            panic!(
                "{}: {e} (cargo run -p fuzz-targets --example write_seeds)",
                path.display()
            )
        });
        assert!(
            on_disk == s.data,
            "{} differs from seeds.rs (cargo run -p fuzz-targets --example write_seeds)",
            path.display()
        );
    }
}
