//! Each spawned remote is the first process (pid 1) of a PID namespace of
//! its own, where the VMM may make one (it needs `CAP_SYS_ADMIN`: as root).
//! Inside, the remote sees no other process: it cannot signal the VMM,
//! another remote or anything else of the machine even where its seccomp
//! filter is off, and `getppid` is 0. From outside nothing changes: the
//! VMM's child is the remote itself, so its pid, `waitid`, `SIGKILL`,
//! `SIGSTOP` and `SIGCONT` (supervision, the chaos tests) work as before
//! (signals from an ancestor namespace reach a namespace's first process;
//! only ones it has no handler for and that come from inside are dropped).
//!
//! Why here and not in `remote-host`'s jail: `unshare(CLONE_NEWPID)` moves
//! the caller's *next child*, never the caller, so a remote doing it itself
//! would have to fork and leave a go-between as the VMM's child (whose
//! pid a `SIGSTOP` would stop while the device serves on). The VMM's
//! spawner thread makes the namespace instead, just before it forks.
//!
//! A thread can have only one pending namespace for children: each spawn
//! first goes back to the VMM's own (`setns` on it), then makes a new one.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// The VMM's own PID namespace, held by the spawner thread.
pub struct PidNamespaces {
    own: File,
}

impl PidNamespaces {
    /// Opens the VMM's PID namespace and checks that this thread may make
    /// new ones (a try, undone at once), so a VMM that may not says so once.
    pub fn open() -> io::Result<PidNamespaces> {
        let ns = PidNamespaces {
            own: File::open("/proc/self/ns/pid")?,
        };
        ns.next_child_in_a_new_one()?;
        ns.back_to_our_own()?;
        Ok(ns)
    }

    /// Makes the next child this thread forks the first process of a new
    /// PID namespace.
    pub fn next_child_in_a_new_one(&self) -> io::Result<()> {
        self.back_to_our_own()?;
        // SAFETY: unshare(CLONE_NEWPID) changes only where this thread's
        // next children are made; it touches no memory of ours.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// This thread's children are made in the VMM's namespace again.
    pub fn back_to_our_own(&self) -> io::Result<()> {
        // SAFETY: setns on an fd we own that names a PID namespace; for a
        // PID namespace it changes only where this thread's next children
        // are made.
        if unsafe { libc::setns(self.own.as_raw_fd(), libc::CLONE_NEWPID) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
