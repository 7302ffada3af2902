//! The remote's sandbox: a seccomp filter, installed on every thread once
//! the devices are built, that refuses (EPERM) the system calls a device
//! process has no business making: starting programs, opening network
//! sockets, tracing or reading other processes, changing identity,
//! mounts, namespaces (also through `clone` flags), io_uring (whose
//! operations, network sockets among them, would bypass this filter),
//! kernel modules, BPF, time and reboot.
//!
//! A deny list, as QEMU's `-sandbox on` is: everything a device does on
//! its data path (file and socket I/O, memory mapping of new guest RAM,
//! eventfds, threads, opening a drive's file on `drive-add`, loading a
//! plugin on `device-add`) keeps working whatever the plugin needs, and a
//! plugin or a guest that subverts one gets an error instead of a shell or
//! a network connection. The refused call fails; the process goes on, so
//! a plugin that tries is not a way to kill the device's neighbours.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Errors setting the sandbox up.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// The seccomp filter could not be built: {0}
    #[error("the seccomp filter could not be built: {0}")]
    Build(String),
    /// The kernel refused the seccomp filter: {0}
    #[error("the kernel refused the seccomp filter: {0}")]
    Install(String),
}

/// System calls refused outright.
const DENIED: &[i64] = &[
    // Starting programs.
    libc::SYS_execve,
    libc::SYS_execveat,
    // Other processes' memory and control.
    libc::SYS_ptrace,
    libc::SYS_process_vm_readv,
    libc::SYS_process_vm_writev,
    libc::SYS_pidfd_getfd,
    libc::SYS_kcmp,
    // Identity.
    libc::SYS_setuid,
    libc::SYS_setgid,
    libc::SYS_setreuid,
    libc::SYS_setregid,
    libc::SYS_setresuid,
    libc::SYS_setresgid,
    libc::SYS_setgroups,
    libc::SYS_setfsuid,
    libc::SYS_setfsgid,
    libc::SYS_personality,
    // File systems and namespaces.
    libc::SYS_mount,
    libc::SYS_umount2,
    libc::SYS_pivot_root,
    libc::SYS_chroot,
    libc::SYS_unshare,
    libc::SYS_setns,
    libc::SYS_open_by_handle_at,
    libc::SYS_name_to_handle_at,
    libc::SYS_fsopen,
    libc::SYS_fsmount,
    libc::SYS_move_mount,
    libc::SYS_open_tree,
    // io_uring runs its operations (socket, openat, ...) in the kernel
    // without the system calls this filter sees.
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    // The kernel itself.
    libc::SYS_init_module,
    libc::SYS_finit_module,
    libc::SYS_delete_module,
    libc::SYS_kexec_load,
    libc::SYS_kexec_file_load,
    libc::SYS_bpf,
    libc::SYS_perf_event_open,
    libc::SYS_userfaultfd,
    libc::SYS_keyctl,
    libc::SYS_add_key,
    libc::SYS_request_key,
    libc::SYS_iopl,
    libc::SYS_ioperm,
    libc::SYS_acct,
    libc::SYS_swapon,
    libc::SYS_swapoff,
    libc::SYS_reboot,
    libc::SYS_settimeofday,
    libc::SYS_clock_settime,
    libc::SYS_clock_adjtime,
    libc::SYS_adjtimex,
    libc::SYS_sethostname,
    libc::SYS_setdomainname,
];

/// `clone` flags that make a new namespace: refused (threads never use
/// them).
const NAMESPACE_FLAGS: &[u64] = &[
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWCGROUP as u64,
    0x80, // CLONE_NEWTIME (not in every libc crate)
];

/// The filter: [`DENIED`], `socket`/`socketpair` of any family but
/// `AF_UNIX` (the only sockets a remote uses are the ones it is given, its
/// listeners and their connections), and `clone` with a namespace flag.
pub fn filter() -> Result<BpfProgram, SandboxError> {
    let build = |e: seccompiler::BackendError| SandboxError::Build(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        DENIED.iter().map(|&nr| (nr, Vec::new())).collect();
    let not_unix = || {
        SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            libc::AF_UNIX as u64,
        )
        .and_then(|c| SeccompRule::new(vec![c]))
    };
    rules.insert(libc::SYS_socket, vec![not_unix().map_err(build)?]);
    rules.insert(libc::SYS_socketpair, vec![not_unix().map_err(build)?]);
    let clone_rules = NAMESPACE_FLAGS
        .iter()
        .map(|&flag| {
            SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )
            .and_then(|c| SeccompRule::new(vec![c]))
        })
        .collect::<Result<Vec<_>, _>>()
        .map_err(build)?;
    rules.insert(libc::SYS_clone, clone_rules);
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// `clone3` passes its flags in memory, where seccomp cannot look: it is
/// answered ENOSYS, and the C library falls back to `clone`, whose flags
/// the main filter checks (what container runtimes do).
pub fn clone3_filter() -> Result<BpfProgram, SandboxError> {
    let build = |e: seccompiler::BackendError| SandboxError::Build(e.to_string());
    let filter = SeccompFilter::new(
        [(libc::SYS_clone3, Vec::new())].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Installs the filters on every thread of the process (and so on every
/// thread started later).
pub fn enter() -> Result<(), SandboxError> {
    let install = |p: &BpfProgram| {
        seccompiler::apply_filter_all_threads(p).map_err(|e| SandboxError::Install(e.to_string()))
    };
    install(&clone3_filter()?)?;
    install(&filter()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child with the sandbox entered; returns what
    /// the child exits with.
    fn in_sandboxed_child(f: fn() -> i32) -> i32 {
        // SAFETY: the child only makes raw system calls and `_exit`s; it
        // never returns into the test harness.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let code = if enter().is_ok() { f() } else { 100 };
            // SAFETY: ends the child without running the parent's atexit
            // handlers or destructors.
            unsafe { libc::_exit(code) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        libc::WEXITSTATUS(status)
    }

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    #[test]
    fn io_uring_is_refused() {
        let code = in_sandboxed_child(|| {
            let mut params = [0u8; 120];
            // SAFETY: io_uring_setup with a zeroed params block it may
            // write; refused before it does.
            let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 4, params.as_mut_ptr()) };
            if r < 0 && errno() == libc::EPERM {
                0
            } else {
                1
            }
        });
        assert_eq!(code, 0, "io_uring_setup was not refused with EPERM");
    }

    #[test]
    fn new_namespaces_are_refused_but_threads_still_start() {
        let code = in_sandboxed_child(|| {
            // SAFETY: unshare only changes this child's namespaces.
            if unsafe { libc::unshare(libc::CLONE_NEWUSER) } == 0 || errno() != libc::EPERM {
                return 1;
            }
            // clone with CLONE_NEWUSER|SIGCHLD (a fork into a namespace).
            // SAFETY: a fork-like clone whose child (if any) exits at once.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_clone,
                    (libc::CLONE_NEWUSER | libc::SIGCHLD) as u64,
                    0u64,
                    0u64,
                    0u64,
                    0u64,
                )
            };
            if r == 0 {
                // SAFETY: the namespaced child leaves at once.
                unsafe { libc::_exit(0) };
            }
            if r > 0 || errno() != libc::EPERM {
                return 2;
            }
            // SAFETY: clone3 with a null argument: refused before reading it.
            let r = unsafe { libc::syscall(libc::SYS_clone3, 0u64, 0u64) };
            if r >= 0 || errno() != libc::ENOSYS {
                return 3;
            }
            // Threads still start (the C library falls back to clone).
            match std::thread::spawn(|| 7).join() {
                Ok(7) => 0,
                _ => 4,
            }
        });
        assert_eq!(code, 0, "step {code} of the namespace checks failed");
    }
}
