//! The remote's sandbox: a seccomp filter, installed on every thread once
//! the devices are built, that lets through only the system calls a device
//! process serving its devices makes ([`ALLOWED`], some with their
//! arguments checked), and refuses every other with EPERM: starting
//! programs, network sockets, tracing or reading other processes, identity
//! changes, mounts and namespaces (also through `clone` flags), io_uring
//! (whose operations would bypass this filter), kernel modules, BPF, time,
//! reboot, and anything not listed.
//!
//! An allow list, in the style of crosvm's per-device policies. What a
//! device does on its data path stays allowed: file and AF_UNIX socket
//! I/O, mapping guest RAM the VMM sends later (DMA_MAP), eventfds, threads,
//! opening a drive's file on `drive-add`, and loading a plugin on
//! `device-add` (so executable mappings are allowed from read-only private
//! file mappings, as the dynamic loader makes them, and never from
//! anonymous or writable memory: no JIT, no shellcode in a heap page).
//! A refused call fails; the process goes on, so a plugin that tries is not
//! a way to kill the device's neighbours. docs/security.md lists the calls
//! and what an escaped plugin can still reach.

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

/// System calls allowed with any arguments.
pub const ALLOWED: &[i64] = &[
    // Ending a thread or the process; sleeps interrupted by a signal.
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    // Threads, locks, condition variables, parking (glibc and Rust std).
    // clone3 is answered ENOSYS by its own filter (see `clone3_filter`):
    // listed here so that this filter's refusal does not override it.
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_membarrier,
    // Signals: masks around thread start, alternate stacks, handlers.
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    // Memory: the allocator, thread stacks, guest RAM and ring pages.
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    // Time and randomness (when the vDSO falls back to the kernel).
    libc::SYS_clock_gettime,
    libc::SYS_clock_getres,
    libc::SYS_gettimeofday,
    libc::SYS_nanosleep,
    libc::SYS_clock_nanosleep,
    libc::SYS_getrandom,
    // File descriptors: eventfds, sockets, the log, disk images.
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_dup3,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fadvise64,
    // Opening and looking at files: a drive on `drive-add`, a plugin and
    // its directory on `device-add`, the serial port's output file.
    libc::SYS_openat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_fstat,
    libc::SYS_stat,
    libc::SYS_lstat,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_getdents64,
    libc::SYS_fstatfs,
    libc::SYS_uname,
    // Socket files of listeners (a stale one replaced; pci-serial's).
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    // Waiting.
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_eventfd2,
    libc::SYS_pipe2,
    // AF_UNIX sockets (the family is checked where one is made).
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
];

/// `clone` flags that make a new namespace: refused (threads never use
/// them).
const NAMESPACE_FLAGS: u64 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWCGROUP) as u64;

fn cond(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, len, op, value)
}

/// A rule that holds when all `conds` do.
fn all(
    conds: Vec<Result<SeccompCondition, seccompiler::BackendError>>,
) -> Result<SeccompRule, seccompiler::BackendError> {
    SeccompRule::new(conds.into_iter().collect::<Result<Vec<_>, _>>()?)
}

/// A rule that holds when argument `arg` is one of `values`.
fn one_of(arg: u8, values: &[u64]) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    values
        .iter()
        .map(|&v| {
            all(vec![cond(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                v,
            )])
        })
        .collect()
}

/// System calls allowed only with the arguments their rules accept.
fn filtered() -> Result<Vec<(i64, Vec<SeccompRule>)>, seccompiler::BackendError> {
    use SeccompCmpArgLen::{Dword, Qword};
    use SeccompCmpOp::{Eq, MaskedEq, Ne};
    let exec = libc::PROT_EXEC as u64;
    let write = libc::PROT_WRITE as u64;
    let pid = u64::from(std::process::id());
    let thread = (libc::CLONE_THREAD | libc::CLONE_VM) as u64;
    Ok(vec![
        // Only sockets of the local family.
        (libc::SYS_socket, one_of(0, &[libc::AF_UNIX as u64])?),
        (libc::SYS_socketpair, one_of(0, &[libc::AF_UNIX as u64])?),
        // Threads only: sharing memory, no new namespace.
        (
            libc::SYS_clone,
            vec![all(vec![
                cond(0, Qword, MaskedEq(thread), thread),
                cond(0, Qword, MaskedEq(NAMESPACE_FLAGS), 0),
            ])?],
        ),
        // Memory that is never both writable and executable: anything
        // without PROT_EXEC, or code mapped read-only and private from a
        // file (the dynamic loader loading a plugin on `device-add`).
        (
            libc::SYS_mmap,
            vec![
                all(vec![cond(2, Dword, MaskedEq(exec), 0)])?,
                all(vec![
                    cond(2, Dword, MaskedEq(write), 0),
                    cond(3, Dword, MaskedEq(0x3), libc::MAP_PRIVATE as u64),
                    cond(4, Dword, Ne, 0xffff_ffff),
                ])?,
            ],
        ),
        (
            libc::SYS_mprotect,
            vec![all(vec![cond(2, Dword, MaskedEq(exec), 0)])?],
        ),
        // Thread names; and clearing (only) the parent-death signal, when
        // the remote is handed over to another VMM (`handover-release`).
        (libc::SYS_prctl, {
            let mut rules = one_of(0, &[libc::PR_SET_NAME as u64, libc::PR_GET_NAME as u64])?;
            rules.push(all(vec![
                cond(0, Dword, Eq, libc::PR_SET_PDEATHSIG as u64),
                cond(1, Qword, Eq, 0),
            ])?);
            rules
        }),
        // abort() signalling this process's own threads.
        (libc::SYS_tgkill, vec![all(vec![cond(0, Dword, Eq, pid)])?]),
        // Descriptor flags and seals, nothing that signals or leases.
        (
            libc::SYS_fcntl,
            one_of(
                1,
                &[
                    libc::F_GETFD as u64,
                    libc::F_SETFD as u64,
                    libc::F_GETFL as u64,
                    libc::F_SETFL as u64,
                    libc::F_DUPFD_CLOEXEC as u64,
                    libc::F_GET_SEALS as u64,
                ],
            )?,
        ),
        // Non-blocking and close-on-exec flags; a terminal query is
        // refused (isatty then says no).
        (
            libc::SYS_ioctl,
            one_of(1, &[libc::FIONBIO, libc::FIOCLEX, libc::FIONCLEX])?,
        ),
    ])
}

/// The filter: [`ALLOWED`] and [`filtered`]'s rules; EPERM for the rest.
pub fn filter() -> Result<BpfProgram, SandboxError> {
    let build = |e: seccompiler::BackendError| SandboxError::Build(e.to_string());
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        ALLOWED.iter().map(|&nr| (nr, Vec::new())).collect();
    for (nr, r) in filtered().map_err(build)? {
        rules.insert(nr, r);
    }
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::EPERM as u32),
        SeccompAction::Allow,
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
        crate::forked::in_child(|| if enter().is_ok() { f() } else { 100 })
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

    #[test]
    fn only_listed_calls_pass_and_threads_and_files_still_work() {
        let code = in_sandboxed_child(|| {
            // Not on the list: refused.
            // SAFETY: chdir with a valid C string.
            if unsafe { libc::chdir(c"/".as_ptr()) } == 0 || errno() != libc::EPERM {
                return 1;
            }
            // SAFETY: ptrace(PTRACE_TRACEME) only affects this child.
            let r = unsafe { libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) };
            if r == 0 || errno() != libc::EPERM {
                return 2;
            }
            // Network sockets refused, local ones made.
            // SAFETY: socket() with constant arguments; a result is closed.
            let inet = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) };
            if inet >= 0 || errno() != libc::EPERM {
                return 3;
            }
            // SAFETY: as above.
            let unix = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
            if unix < 0 {
                return 4;
            }
            // SAFETY: closes the socket just made.
            unsafe { libc::close(unix) };
            // Writable and executable anonymous memory: refused.
            // SAFETY: an anonymous mapping; unmapped if it was made.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            if p != libc::MAP_FAILED || errno() != libc::EPERM {
                return 5;
            }
            // Read-only executable code from a file (what the loader does
            // for a plugin): allowed.
            let Ok(exe) = std::fs::File::open("/proc/self/exe") else {
                return 6;
            };
            // SAFETY: maps 4 KiB of our own executable read-only; unmapped
            // below.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_EXEC,
                    libc::MAP_PRIVATE,
                    std::os::fd::AsRawFd::as_raw_fd(&exe),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return 7;
            }
            // SAFETY: the mapping just made.
            unsafe { libc::munmap(p, 4096) };
            // Making memory executable afterwards: refused.
            let mut page = vec![0u8; 8192];
            let aligned = ((page.as_mut_ptr() as usize + 4095) & !4095) as *mut libc::c_void;
            // SAFETY: mprotect on a page inside `page`; refused before it
            // changes anything.
            if unsafe { libc::mprotect(aligned, 4096, libc::PROT_READ | libc::PROT_EXEC) } == 0 {
                return 8;
            }
            // Named threads start and join; files open, write and read.
            let t = std::thread::Builder::new()
                .name("sandboxed".into())
                .spawn(|| 7);
            match t.map(|h| h.join()) {
                Ok(Ok(7)) => {}
                _ => return 9,
            }
            let dir = std::env::temp_dir().join(format!("sandbox-test-{}", std::process::id()));
            let f = dir.join("f");
            let ok = std::fs::create_dir_all(&dir).is_ok()
                && std::fs::write(&f, b"data").is_ok()
                && std::fs::read(&f).is_ok_and(|d| d == b"data")
                && std::fs::remove_file(&f).is_ok();
            let _ = std::fs::remove_dir(&dir);
            if !ok {
                return 10;
            }
            0
        });
        assert_eq!(code, 0, "step {code} of the allow-list checks failed");
    }
}
