//! How the VM ends, and the exit code `host run` returns for it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 (Linux `reboot=k`;
    /// also how `poweroff -f` ends without ACPI: the kernel powers off,
    /// init exits, the panic reboots).
    Reset,
    /// The guest powered off through ACPI (S5 in PM1_CNT).
    PowerOff,
    /// The guest reset the machine through a register (the ACPI reset
    /// register, or the i8042 when the machine has ACPI): a reboot.
    Reboot,
    /// The guest halted or powered off: without ACPI, Linux's `poweroff`
    /// ends in `machine_halt` (all CPUs stopped, nothing left to exit to
    /// user space), so the console line the kernel prints just before
    /// ("reboot: System halted" / "reboot: Power down") ends the VM.
    Halt,
    /// The guest panicked: its pvpanic driver said so (with ACPI), or
    /// (without ACPI) the console showed "Kernel panic", not after a power
    /// down. The VM ends at once, before the reboot that `panic=-1` asks
    /// for, so that a panicking guest never restarts in a loop.
    Panic,
    /// The vCPU triple-faulted (KVM_EXIT_SHUTDOWN). Never restarted: a
    /// triple fault usually means a broken guest.
    TripleFault,
    /// KVM_EXIT_SYSTEM_EVENT of this type.
    SystemEvent(u32),
    /// A VMM failure.
    Error(String),
    /// The monitor's `quit`.
    Quit,
    /// The monitor's `system_reset`: restarts the guest, or ends the VM
    /// with `on-reboot = "exit"`.
    HostReset,
}

impl ExitReason {
    /// Whether the VM ended in a way a developer has to look into: a
    /// triple fault or a failure (of a vCPU's entry, of KVM, of the VMM).
    /// `host run` prints the crash report for these.
    pub fn is_crash(&self) -> bool {
        matches!(self, ExitReason::TripleFault | ExitReason::Error(_))
    }

    /// QEMU's `SHUTDOWN` event `reason` for this end.
    pub fn qmp_reason(&self, seen: ConsoleSeen) -> &'static str {
        match self {
            ExitReason::Quit => "host-qmp-quit",
            ExitReason::HostReset => "host-qmp-system-reset",
            ExitReason::Error(_) => "host-error",
            ExitReason::PowerOff => "guest-shutdown",
            ExitReason::Reboot => "guest-reset",
            _ if seen.power_down => "guest-shutdown",
            ExitReason::Panic => "guest-panic",
            _ if seen.panic => "guest-panic",
            _ => "guest-reset",
        }
    }
}

/// What the guest said on its console before it went away.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleSeen {
    /// "reboot: Power down" or "reboot: System halted".
    pub power_down: bool,
    /// "reboot: Restarting system".
    pub restart: bool,
    /// "Kernel panic" (not the one that follows a power down).
    pub panic: bool,
}

/// Exit codes of `host run`.
pub mod code {
    /// The guest powered off.
    pub const POWEROFF: i32 = 0;
    /// The guest rebooted with `on-reboot = "exit"`, or `system_reset`
    /// ended it.
    pub const REBOOT: i32 = 0;
    /// VMM error (config, KVM, remote).
    pub const ERROR: i32 = 1;
    /// The guest kernel panicked.
    pub const PANIC: i32 = 2;
    /// The guest triple-faulted or reset without saying why.
    pub const RESET: i32 = 3;
}

/// Why a reset restarts the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResetCause {
    /// The guest rebooted (i8042 reset after "reboot: Restarting system").
    Guest,
    /// QMP `system_reset`.
    HostQmp,
}

impl ResetCause {
    /// The `RESET` event's `guest` and `reason`, as QEMU sends them.
    pub fn qmp_event(self) -> (bool, &'static str) {
        match self {
            ResetCause::Guest => (true, "guest-reset"),
            ResetCause::HostQmp => (false, "host-qmp-system-reset"),
        }
    }
}

/// Whether `reason` restarts the guest (with `on-reboot = "restart"`):
/// a guest reboot that the console announced and no panic preceded, or
/// `system_reset`. Panics, power-offs, triple faults and unexplained
/// resets end the VM.
pub fn restart_cause(reason: &ExitReason, seen: ConsoleSeen) -> Option<ResetCause> {
    match reason {
        ExitReason::HostReset => Some(ResetCause::HostQmp),
        ExitReason::Reboot => Some(ResetCause::Guest),
        ExitReason::Reset if seen.restart && !seen.panic && !seen.power_down => {
            Some(ResetCause::Guest)
        }
        _ => None,
    }
}

/// The first reason set wins; waiters wake. A restartable reason can be
/// cleared again ([`rearm`](Self::rearm)) once the guest restarted; a
/// reason set meanwhile is kept for after that.
#[derive(Debug, Default)]
pub struct ExitSignal {
    reason: Mutex<Reasons>,
    cv: Condvar,
    console: Mutex<ConsoleSeen>,
    /// The last console lines, for the crash report.
    tail: Mutex<std::collections::VecDeque<String>>,
    /// The machine has ACPI: the guest ends the VM through registers, and
    /// what it prints never does.
    acpi: AtomicBool,
}

/// Console lines kept for the crash report.
pub const CONSOLE_LINES_KEPT: usize = 40;

#[derive(Debug, Default)]
struct Reasons {
    current: Option<ExitReason>,
    /// The first reason that came after `current` (e.g. `quit` during a
    /// reset): it takes over when `current` is cleared.
    later: Option<ExitReason>,
}

impl ExitSignal {
    /// Says whether the machine has ACPI (see the field).
    pub fn set_acpi(&self, on: bool) {
        self.acpi.store(on, Ordering::Relaxed);
    }

    /// A reset the guest asked for through a register: with ACPI a
    /// reboot; without, a reset that the console must explain.
    pub fn guest_reset(&self) {
        if self.acpi.load(Ordering::Relaxed) {
            self.set(ExitReason::Reboot);
        } else {
            self.set(ExitReason::Reset);
        }
    }

    pub fn set(&self, r: ExitReason) {
        let mut g = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if g.current.is_none() {
            g.current = Some(r);
        } else if g.later.is_none() {
            g.later = Some(r);
        }
        self.cv.notify_all();
    }

    /// After a restart: forgets the reason that caused it and what the
    /// console showed, so the next boot starts afresh; a reason that came
    /// in the meantime becomes the current one (the VM then ends).
    pub fn rearm(&self) {
        let mut g = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        *self.console.lock().unwrap_or_else(|e| e.into_inner()) = ConsoleSeen::default();
        g.current = g.later.take();
        self.cv.notify_all();
    }

    /// The reason set now, if any.
    pub fn current(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .clone()
    }

    pub fn is_set(&self) -> bool {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .current
            .is_some()
    }

    pub fn wait(&self) -> ExitReason {
        let mut g = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.current.as_ref() {
                return r.clone();
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Records a console line (for the crash report) and, on a machine
    /// without ACPI, what it says about the guest's end.
    pub fn console_line(&self, line: &str) {
        {
            let mut tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
            if tail.len() == CONSOLE_LINES_KEPT {
                tail.pop_front();
            }
            tail.push_back(line.trim_end().to_owned());
        }
        if self.acpi.load(Ordering::Relaxed) {
            return;
        }
        let mut c = self.console.lock().unwrap_or_else(|e| e.into_inner());
        if line.contains("reboot: Power down") || line.contains("reboot: System halted") {
            c.power_down = true;
            drop(c);
            self.set(ExitReason::Halt);
        } else if line.contains("reboot: Restarting system") {
            c.restart = true;
        } else if line.contains("Kernel panic") && !c.power_down {
            c.panic = true;
            drop(c);
            self.set(ExitReason::Panic);
        }
    }

    /// The console's last lines (for the crash report).
    pub fn console_tail(&self) -> Vec<String> {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect()
    }

    pub fn console(&self) -> ConsoleSeen {
        *self.console.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The exit code for a reason and what the console showed.
pub fn exit_code(reason: &ExitReason, seen: ConsoleSeen) -> i32 {
    match reason {
        ExitReason::Error(_) => code::ERROR,
        ExitReason::Quit => code::POWEROFF,
        ExitReason::HostReset => code::REBOOT,
        ExitReason::Panic => code::PANIC,
        ExitReason::PowerOff => code::POWEROFF,
        ExitReason::Reboot => code::REBOOT,
        _ if seen.power_down => code::POWEROFF,
        _ if seen.panic => code::PANIC,
        _ if seen.restart => code::REBOOT,
        _ => code::RESET,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poweroff_then_panic_is_a_clean_poweroff() {
        let s = ExitSignal::default();
        s.console_line("[    5.1] reboot: Power down");
        s.console_line("[    5.2] Kernel panic - not syncing: Attempted to kill init!");
        s.set(ExitReason::Reset);
        assert_eq!(exit_code(&s.wait(), s.console()), code::POWEROFF);
    }

    #[test]
    fn panic_ends_the_vm_before_its_reboot_and_never_restarts() {
        let s = ExitSignal::default();
        s.console_line("[    3.0] Kernel panic - not syncing: sysrq triggered crash");
        assert!(s.is_set());
        // The reboot that panic=-1 does comes after and changes nothing.
        s.console_line("[    3.1] reboot: Restarting system");
        s.set(ExitReason::Reset);
        let r = s.wait();
        assert_eq!(r, ExitReason::Panic);
        assert_eq!(restart_cause(&r, s.console()), None);
        assert_eq!(exit_code(&r, s.console()), code::PANIC);
        assert_eq!(r.qmp_reason(s.console()), "guest-panic");
        // Even a reset whose restart line came first does not restart
        // once a panic was seen.
        let seen = ConsoleSeen {
            restart: true,
            panic: true,
            power_down: false,
        };
        assert_eq!(restart_cause(&ExitReason::Reset, seen), None);
    }

    #[test]
    fn reboot_and_system_reset_restart_others_end() {
        let s = ExitSignal::default();
        s.console_line("[    4.0] reboot: Restarting system");
        s.set(ExitReason::Reset);
        assert_eq!(
            restart_cause(&s.wait(), s.console()),
            Some(ResetCause::Guest)
        );
        // A reset the console did not announce, a triple fault and a power
        // down end the VM.
        let none = ConsoleSeen::default();
        assert_eq!(restart_cause(&ExitReason::Reset, none), None);
        assert_eq!(restart_cause(&ExitReason::TripleFault, s.console()), None);
        assert_eq!(restart_cause(&ExitReason::Halt, s.console()), None);
        assert_eq!(
            restart_cause(&ExitReason::HostReset, none),
            Some(ResetCause::HostQmp)
        );
        assert_eq!(ResetCause::Guest.qmp_event(), (true, "guest-reset"));
        assert_eq!(
            ResetCause::HostQmp.qmp_event(),
            (false, "host-qmp-system-reset")
        );
    }

    #[test]
    fn rearm_clears_the_reset_and_keeps_a_later_reason() {
        let s = ExitSignal::default();
        s.console_line("reboot: Restarting system");
        s.set(ExitReason::Reset);
        s.rearm();
        assert!(!s.is_set());
        assert_eq!(s.console(), ConsoleSeen::default());
        // A quit during the reset is not lost.
        s.set(ExitReason::HostReset);
        s.set(ExitReason::Quit);
        s.rearm();
        assert_eq!(s.wait(), ExitReason::Quit);
    }

    #[test]
    fn panic_alone_is_a_panic() {
        let s = ExitSignal::default();
        s.console_line("Kernel panic - not syncing: VFS");
        assert_eq!(exit_code(&ExitReason::Reset, s.console()), code::PANIC);
    }
}
