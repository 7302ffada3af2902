//! The control channel, the remote's side: JSON lines into
//! `remote_host::control::Control::run`, which reads them with
//! `channel::control::serve_control` and runs ping, device-add,
//! device-del and device-control on an LSI controller.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::OnceLock;
use std::time::Duration;

use remote_host::control::Control;
use remote_host::dialect::Dialect;

use crate::wire::{exchange, make_fd, Chunk, FdKind};
use crate::{assert_not_failed, lsi_device};

/// The directory relative paths resolve in: a private temporary
/// directory holding `disk`, a small image `drive-add` can attach.
fn base_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(
        || match tempfile::Builder::new().prefix("fuzz-control").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("temporary directory: {e}"),
        },
    )
    .path()
}

/// Puts `disk` back to 64 KiB of zeros (an input may have resized it).
fn reset_disk(dir: &Path) {
    let r = File::create(dir.join("disk")).and_then(|f| f.set_len(64 << 10));
    if let Err(e) = r {
        panic!("disk image: {e}");
    }
}

/// Keeps an input inside the fuzzing directory: no `/`, `.` or `\` (so
/// no JSON escape can spell one either), hence no absolute path, no
/// `..`, and no plugin given as a path (which would load a library). A
/// remote trusts its VMM with paths (docs/security.md); this is about not
/// letting the fuzzer open or truncate the machine's files.
fn confine(data: &[u8]) -> Vec<u8> {
    data.iter()
        .map(|&b| {
            if matches!(b, b'/' | b'.' | b'\\') {
                b'_'
            } else {
                b
            }
        })
        .collect()
}

/// The three fds of an access ring as the VMM makes them (`ring-setup`).
fn ring_fds() -> Vec<OwnedFd> {
    match channel::ring::create(Duration::from_secs(1), Duration::ZERO) {
        Ok((_vmm_end, fds)) => vec![fds.memory, fds.kick, fds.reply],
        Err(e) => panic!("ring: {e}"),
    }
}

/// Cuts the input into lines; a line that starts with a space carries a
/// socket (what `device-add` wants), one that starts with a tab an
/// eventfd, one that starts with a carriage return an access ring's
/// memory and eventfds (JSON ignores leading white space, so the request
/// is the same).
fn lines(data: &[u8]) -> Vec<Chunk> {
    data.split_inclusive(|&b| b == b'\n')
        .map(|line| {
            let fds: Vec<OwnedFd> = match line.first() {
                Some(b' ') => vec![make_fd(FdKind::Socket)],
                Some(b'\t') => vec![make_fd(FdKind::Eventfd)],
                Some(b'\r') => ring_fds(),
                _ => Vec::new(),
            };
            Chunk {
                data: line.to_vec(),
                fds,
            }
        })
        .collect()
}

/// Serves `data` as control requests to a remote with one device, `lsi0`
/// (no drive yet; `disk` in the base directory can be added).
pub fn control(data: &[u8]) {
    // `x-panic` is the LSI's injected fault (for recovery tests): the
    // plugin panics on purpose, which this target would report.
    if data.windows(7).any(|w| w == b"x-panic") {
        return;
    }
    let dir = base_dir();
    reset_disk(dir);
    let lsi = lsi_device("lsi0", "", dir);
    let control = Control::new(
        std::slice::from_ref(&lsi),
        Vec::new(),
        dir.to_path_buf(),
        Dialect::new(config::Protocol::VfioUser, Duration::ZERO),
    );
    exchange(lines(&confine(data)), |sock| {
        let _ = control.run(sock);
    });
    assert_not_failed(&lsi);
    lsi.shutdown();
}
