//! Process file descriptors (`pidfd_open(2)`): how a VMM waits for and
//! signals a remote that is not its child (one a migration handed over),
//! without the race of a pid that was reused since.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// A pidfd for process `pid` (of this VMM's PID namespace).
pub fn open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = libc::pid_t::try_from(pid)
        .ok()
        .filter(|&p| p > 0)
        .ok_or_else(|| std::io::Error::other(format!("{pid} is not a process id")))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The process `fd` refers to, as this VMM's PID namespace numbers it
/// (from `/proc/self/fdinfo`); `None` when `fd` is not a pidfd or its
/// process is gone.
pub fn pid_of(fd: &OwnedFd) -> Option<u32> {
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd())).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("Pid:"))
        .and_then(|v| v.trim().parse::<i64>().ok())
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p > 0)
}

/// Waits up to `within` for the process to end; whether it did.
pub fn wait(fd: &OwnedFd, within: Duration) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(within.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll on one valid pollfd for the call's duration.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// SIGKILL to the process (errors ignored: it may be gone already).
pub fn kill(fd: &OwnedFd) {
    // SAFETY: pidfd_send_signal with a pidfd, a signal number and no info.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_child_is_waited_for_and_killed_through_its_pidfd() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let fd = open(child.id()).unwrap();
        assert_eq!(pid_of(&fd), Some(child.id()));
        assert!(!wait(&fd, Duration::from_millis(50)));
        kill(&fd);
        assert!(wait(&fd, Duration::from_secs(10)));
        assert!(child.wait().is_ok());
        assert!(open(0).is_err());
        assert!(open(u32::MAX).is_err());
    }
}
