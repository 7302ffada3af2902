//! Work only the process's first thread can do, asked for from any other.
//!
//! The VMM spawns a remote with `PR_SET_PDEATHSIG` (it dies with the
//! VMM). The kernel keeps that setting per thread, and only the thread the
//! VMM forked and exec'd carries it: clearing it from the control thread
//! would change nothing. So `serve` keeps the first thread free: devices
//! are served on threads of their own, and the first thread runs
//! [`run_tasks_until`], doing what other threads post here, such as
//! [`clear_parent_death_signal`] when the remote is handed over to
//! another VMM (docs/migration.md, "Handing a remote over").

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// What the first thread is asked to do, with where its answer goes.
enum Task {
    ClearParentDeathSignal(Sender<Result<(), String>>),
}

/// Where tasks are posted, once [`init`] ran.
static TASKS: OnceLock<Mutex<Sender<Task>>> = OnceLock::new();
/// Where the first thread takes them from (taken by [`run_tasks_until`]).
static INBOX: Mutex<Option<Receiver<Task>>> = Mutex::new(None);

/// How long an asking thread waits for the first thread's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// Opens the task queue, on the first thread, before any thread that may
/// post to it starts: a task posted before [`run_tasks_until`] runs
/// waits for it.
pub fn init() {
    let (tx, rx) = channel();
    if TASKS.set(Mutex::new(tx)).is_ok() {
        *INBOX.lock().unwrap_or_else(|e| e.into_inner()) = Some(rx);
    }
}

/// Runs the tasks other threads post, on the calling thread (the
/// process's first, after [`init`]), until `done()` says to stop; `done`
/// is asked at least every 100 ms.
pub fn run_tasks_until(mut done: impl FnMut() -> bool) {
    let inbox = INBOX.lock().unwrap_or_else(|e| e.into_inner()).take();
    while !done() {
        let Some(rx) = &inbox else {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Task::ClearParentDeathSignal(answer)) => {
                let _ = answer.send(clear_on_this_thread());
            }
            // The sender lives in a static: only a time-out comes here.
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
        }
    }
}

fn clear_on_this_thread() -> Result<(), String> {
    // SAFETY: PR_SET_PDEATHSIG with 0 only changes this thread's
    // parent-death signal.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, 0) } != 0 {
        return Err(format!(
            "prctl(PR_SET_PDEATHSIG, 0): {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Makes this process outlive the VMM that spawned it: the first thread
/// clears its parent-death signal. An error where no task loop was set
/// up ([`init`]): clearing another thread's would answer a success that
/// is not one.
pub fn clear_parent_death_signal() -> Result<(), String> {
    let Some(tasks) = TASKS.get() else {
        return Err("this process runs no task loop on its first thread".into());
    };
    let (tx, rx) = channel();
    tasks
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send(Task::ClearParentDeathSignal(tx))
        .map_err(|_| "the first thread no longer takes tasks".to_string())?;
    rx.recv_timeout(ANSWER_WITHIN)
        .map_err(|_| format!("the first thread did not answer within {ANSWER_WITHIN:?}"))?
}
