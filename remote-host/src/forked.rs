//! Tests of what a whole process may do (its sandbox, its jail) run in a
//! forked child: the test harness has many threads, and a seccomp filter
//! or namespaces entered there would hold for every test.

/// Runs `f` in a forked child; returns what it exits with.
pub fn in_child(f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: the child runs `f` and `_exit`s; it never returns into the
    // test harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let code = f();
        // SAFETY: ends the child without the parent's destructors or
        // atexit handlers.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    libc::WEXITSTATUS(status)
}
