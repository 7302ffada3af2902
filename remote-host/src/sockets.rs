//! The sockets `remote-host serve` is given, whatever the protocol: a path
//! to listen on, or an inherited fd (listening, or already connected).

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::Path;

use anyhow::Context;

/// Listens on `path`, replacing a stale socket there (never another file).
pub fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.file_type().is_socket() {
            std::fs::remove_file(path)
                .with_context(|| format!("cannot remove stale socket {}", path.display()))?;
        } else {
            anyhow::bail!("{} exists and is not a socket", path.display());
        }
    }
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}

/// Takes ownership of inherited fd `n` (`--fd N`, `--control N`) after
/// checking it is an open stream socket, and keeps it out of anything this
/// process starts.
pub fn inherited_socket(n: RawFd) -> anyhow::Result<OwnedFd> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if n < 0 || unsafe { libc::fcntl(n, libc::F_GETFD) } < 0 {
        anyhow::bail!("fd {n} is not an open file descriptor");
    }
    // SAFETY: the fd is open (checked above) and was handed to this
    // process on its command line to own; nothing else in the process
    // uses it.
    let fd = unsafe { OwnedFd::from_raw_fd(n) };
    // SAFETY: F_SETFD on an fd we own.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    if !is_stream_socket(fd.as_fd()) {
        anyhow::bail!("fd {n} is not a stream socket");
    }
    Ok(fd)
}

/// An integer socket option of `fd`.
fn int_option(fd: BorrowedFd<'_>, option: libc::c_int) -> std::io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v`/`len` are valid out-parameters of the sizes given; the
    // fd is open for the duration of the call.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            option,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(v)
}

/// Whether `fd` is a stream socket.
pub fn is_stream_socket(fd: BorrowedFd<'_>) -> bool {
    int_option(fd, libc::SO_TYPE).is_ok_and(|t| t == libc::SOCK_STREAM)
}

/// Whether `fd` is a listening socket (else a connected one).
pub fn is_listening(fd: BorrowedFd<'_>) -> anyhow::Result<bool> {
    int_option(fd, libc::SO_ACCEPTCONN)
        .map(|v| v != 0)
        .context("getsockopt(SO_ACCEPTCONN)")
}
