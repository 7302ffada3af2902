//! A standby remote (`serve --standby FD`): a process started ahead of
//! need, with its config read and its jail entered, that waits before it
//! builds its devices. The VMM keeps one per remote it restarts by itself
//! and starts it when the remote fails: the restart then skips the cost
//! of starting a process (most of a restart's time in a nested guest,
//! docs/benchmarks.md).

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};

/// Waits on inherited fd `fd` (the read end of the VMM's pipe): `true`
/// when a byte arrives (serve), `false` at end of file (the VMM let the
/// standby go, or is gone). The fd is closed either way.
pub fn wait(fd: i32) -> std::io::Result<bool> {
    if fd < 0 {
        return Err(std::io::Error::other(format!("--standby {fd}: not an fd")));
    }
    // SAFETY: the fd was inherited for this purpose alone and nothing
    // else in this process takes it; `OwnedFd` closes it once read.
    let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let mut b = [0u8; 1];
    loop {
        match f.read(&mut b) {
            Ok(0) => return Ok(false),
            Ok(_) => return Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn pipe() -> (i32, std::fs::File) {
        let mut fds = [0i32; 2];
        // SAFETY: `fds` is a valid out array of two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: pipe just made fds[1]; owned once here.
        let w = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fds[1]) });
        (fds[0], w)
    }

    #[test]
    fn a_byte_starts_it_and_end_of_file_releases_it() {
        let (r, mut w) = pipe();
        w.write_all(b"g").unwrap();
        assert!(wait(r).unwrap());
        let (r, w) = pipe();
        drop(w);
        assert!(!wait(r).unwrap());
        // A bad number is an error, not a wait on something else.
        assert!(wait(-1).is_err());
    }
}
