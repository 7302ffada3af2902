//! How the VM ends, and the exit code `host run` returns for it.

use std::sync::{Condvar, Mutex};

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest reset the machine through the i8042 (Linux `reboot=k`;
    /// also how `poweroff -f` ends without ACPI: the kernel powers off,
    /// init exits, the panic reboots).
    Reset,
    /// The guest halted or powered off: without ACPI, Linux's `poweroff`
    /// ends in `machine_halt` (all CPUs stopped, nothing left to exit to
    /// user space), so the console line the kernel prints just before
    /// ("reboot: System halted" / "reboot: Power down") ends the VM.
    Halt,
    /// The vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault,
    /// KVM_EXIT_SYSTEM_EVENT of this type.
    SystemEvent(u32),
    /// A VMM failure.
    Error(String),
    /// The monitor's `quit`.
    Quit,
    /// The monitor's `system_reset`: ends the VM as a guest reboot does
    /// (the VMM does not restart guests).
    HostReset,
}

impl ExitReason {
    /// QEMU's `SHUTDOWN` event `reason` for this end.
    pub fn qmp_reason(&self, seen: ConsoleSeen) -> &'static str {
        match self {
            ExitReason::Quit => "host-qmp-quit",
            ExitReason::HostReset => "host-qmp-system-reset",
            ExitReason::Error(_) => "host-error",
            _ if seen.power_down => "guest-shutdown",
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
    /// The guest rebooted (we do not restart it).
    pub const REBOOT: i32 = 0;
    /// VMM error (config, KVM, remote).
    pub const ERROR: i32 = 1;
    /// The guest kernel panicked.
    pub const PANIC: i32 = 2;
    /// The guest triple-faulted or reset without saying why.
    pub const RESET: i32 = 3;
}

/// The first reason set wins; waiters wake.
#[derive(Debug, Default)]
pub struct ExitSignal {
    reason: Mutex<Option<ExitReason>>,
    cv: Condvar,
    console: Mutex<ConsoleSeen>,
}

impl ExitSignal {
    pub fn set(&self, r: ExitReason) {
        let mut g = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(r);
        }
        self.cv.notify_all();
    }

    pub fn is_set(&self) -> bool {
        self.reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some()
    }

    pub fn wait(&self) -> ExitReason {
        let mut g = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(r) = g.as_ref() {
                return r.clone();
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Records a console line of interest.
    pub fn console_line(&self, line: &str) {
        let mut c = self.console.lock().unwrap_or_else(|e| e.into_inner());
        if line.contains("reboot: Power down") || line.contains("reboot: System halted") {
            c.power_down = true;
            drop(c);
            self.set(ExitReason::Halt);
        } else if line.contains("reboot: Restarting system") {
            c.restart = true;
        } else if line.contains("Kernel panic") && !c.power_down {
            c.panic = true;
        }
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
    fn panic_alone_is_a_panic() {
        let s = ExitSignal::default();
        s.console_line("Kernel panic - not syncing: VFS");
        assert_eq!(exit_code(&ExitReason::Reset, s.console()), code::PANIC);
    }
}
