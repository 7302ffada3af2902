//! The remote's sandbox: a seccomp filter, installed on every thread once
//! the devices are built, that refuses (EPERM) the system calls a device
//! process has no business making: starting programs, opening network
//! sockets, tracing or reading other processes, changing identity,
//! mounts, namespaces, kernel modules, BPF, time and reboot.
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

/// The filter: [`DENIED`], plus `socket`/`socketpair` of any family but
/// `AF_UNIX` (the only sockets a remote uses are the ones it is given, its
/// listeners and their connections).
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
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        TargetArch::x86_64,
    )
    .map_err(build)?;
    BpfProgram::try_from(filter).map_err(build)
}

/// Installs the filter on every thread of the process (and so on every
/// thread started later).
pub fn enter() -> Result<(), SandboxError> {
    let prog = filter()?;
    seccompiler::apply_filter_all_threads(&prog).map_err(|e| SandboxError::Install(e.to_string()))
}
