//! The serial console (a `vm-superio` 16550A on COM1, IRQ 4 through an
//! irqfd) and the i8042 whose CPU-reset command ends the VM.

use std::io::Write;
use std::sync::Arc;

use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::exit::ExitSignal;

/// COM1.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1's ISA IRQ.
pub const SERIAL_GSI: u32 = 4;
/// i8042 data port; the command port is +4.
pub const I8042_PORT: u16 = 0x60;

/// An eventfd as a `vm-superio` interrupt trigger.
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// The i8042's CPU reset: a guest reset (see [`ExitSignal::guest_reset`]).
#[derive(Debug)]
pub struct ResetTrigger(pub Arc<ExitSignal>);

impl Trigger for ResetTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.guest_reset();
        Ok(())
    }
}

/// Console output: line-buffered into the sink, each line also shown to
/// the exit logic (power down, restart, panic).
pub struct ConsoleOut {
    sink: Box<dyn Write + Send>,
    line: Vec<u8>,
    exit: Arc<ExitSignal>,
}

impl ConsoleOut {
    pub fn new(sink: Box<dyn Write + Send>, exit: Arc<ExitSignal>) -> Self {
        ConsoleOut {
            sink,
            line: Vec::with_capacity(256),
            exit,
        }
    }

    /// Writes out a pending partial line (at exit).
    pub fn finish(&mut self) -> std::io::Result<()> {
        self.flush_line()
    }

    fn flush_line(&mut self) -> std::io::Result<()> {
        if self.line.is_empty() {
            return Ok(());
        }
        self.exit.console_line(&String::from_utf8_lossy(&self.line));
        self.sink.write_all(&self.line)?;
        self.line.clear();
        self.sink.flush()
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' || self.line.len() >= 4096 {
                self.flush_line()?;
            }
        }
        Ok(buf.len())
    }

    /// `vm-superio` flushes after every byte: keep the line together (the
    /// exit logic matches whole lines) and only flush the sink.
    fn flush(&mut self) -> std::io::Result<()> {
        self.sink.flush()
    }
}

/// The COM1 model.
pub type Com1 = Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleOut>;
/// The i8042 model.
pub type I8042 = I8042Device<ResetTrigger>;

/// How often [`LostIrqGuard`] looks at COM1.
pub const GUARD_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// Interrupts [`LostIrqGuard`] raised again (`HOST_STATS`' `com1_reraised`).
pub static COM1_RERAISED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Raises COM1's interrupt again when a cause has stayed pending.
///
/// IRQ 4 is an ISA edge, which reaches KVM as an irqfd pulse; KVM drops a
/// pulse that arrives while the guest has the IOAPIC pin masked, and
/// `vm-superio` raises an edge only when a cause appears in IIR, not while
/// one stays there. A real 16550's interrupt output is a level the guest
/// would still see once it unmasked the pin; here the guest's driver would
/// wait for an interrupt that never comes, with its output stuck in the
/// transmit buffer until something else writes to the port (seen as
/// console lines arriving seconds late, and consoles cut at power-off).
/// So a cause still pending (IIR unread) at two looks in a row is raised
/// again: an extra edge costs a guest whose handler was only slow one
/// interrupt that finds nothing to do.
#[derive(Debug, Default)]
pub struct LostIrqGuard {
    pending_before: bool,
}

impl LostIrqGuard {
    /// One look (every [`GUARD_PERIOD`]); whether it raised the interrupt.
    pub fn look(&mut self, serial: &Com1) -> bool {
        let pending = serial.state().interrupt_identification & 1 == 0;
        if pending && self.pending_before {
            self.pending_before = false;
            if serial.interrupt_evt().trigger().is_ok() {
                COM1_RERAISED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return true;
            }
            return false;
        }
        self.pending_before = pending;
        false
    }
}

/// Runs [`LostIrqGuard`] on COM1 for the life of the process.
pub fn spawn_lost_irq_guard(bus: Arc<crate::bus::Bus>) {
    let spawned = std::thread::Builder::new()
        .name("com1-guard".into())
        .spawn(move || {
            let mut guard = LostIrqGuard::default();
            loop {
                std::thread::sleep(GUARD_PERIOD);
                let s = bus.serial.lock().unwrap_or_else(|e| e.into_inner());
                if guard.look(&s) {
                    tracing::debug!("COM1: an interrupt stayed pending; raised again");
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no COM1 interrupt guard: {e}");
    }
}

/// Feeds standard input to COM1 (when `stdin` is not a terminal in raw
/// mode, the guest sees whole lines). Ends at EOF; bytes wait while the
/// guest's receive FIFO is full.
pub fn spawn_stdin_forwarder(bus: Arc<crate::bus::Bus>) {
    use std::io::Read;
    let spawned = std::thread::Builder::new()
        .name("console-in".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 64];
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                let mut rest = &buf[..n];
                while !rest.is_empty() {
                    let taken = {
                        let mut s = bus.serial.lock().unwrap_or_else(|e| e.into_inner());
                        let room = s.fifo_capacity().min(rest.len());
                        if room > 0 {
                            s.enqueue_raw_bytes(&rest[..room]).unwrap_or(0)
                        } else {
                            0
                        }
                    };
                    rest = &rest[taken..];
                    if taken == 0 {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("no console input: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn halt_line_ends_the_vm() {
        let exit = Arc::new(ExitSignal::default());
        let out = ConsoleOut::new(Box::new(Vec::new()), exit.clone());
        let mut s: Com1 = Serial::new(EventFdTrigger(EventFd::new(0).unwrap()), out);
        for b in b"[    8.259731] reboot: System halted\r\n" {
            s.write(0, *b).unwrap();
        }
        assert!(exit.is_set());
        assert_eq!(exit.wait(), crate::exit::ExitReason::Halt);
    }

    #[test]
    fn a_pending_interrupt_is_raised_again_until_the_guest_reads_iir() {
        let exit = Arc::new(ExitSignal::default());
        let out = ConsoleOut::new(Box::new(Vec::new()), exit);
        let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut s: Com1 = Serial::new(EventFdTrigger(evt.try_clone().unwrap()), out);
        let mut g = LostIrqGuard::default();
        assert!(!g.look(&s), "nothing pending");
        // The driver enables THRE: one edge, and IIR shows the cause. Say
        // the edge was lost (the guest had the pin masked).
        s.write(1, 0x02).unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        assert!(!g.look(&s), "pending once: maybe only slow");
        assert!(g.look(&s), "pending twice: raised again");
        assert_eq!(evt.read().unwrap(), 1);
        // The guest's handler reads IIR: nothing pending, nothing raised.
        assert_eq!(s.read(2) & 0x0f, 0x02);
        assert!(!g.look(&s));
        assert!(!g.look(&s));
        assert!(evt.read().is_err(), "no further edge");
    }

    #[test]
    fn with_acpi_console_lines_end_nothing() {
        let exit = Arc::new(ExitSignal::default());
        exit.set_acpi(true);
        let out = ConsoleOut::new(Box::new(Vec::new()), exit.clone());
        let mut s: Com1 = Serial::new(EventFdTrigger(EventFd::new(0).unwrap()), out);
        for b in b"Kernel panic - not syncing: printed by a user program\r\nreboot: Power down\r\n"
        {
            s.write(0, *b).unwrap();
        }
        assert!(!exit.is_set(), "a guest's text never ends an ACPI machine");
        assert_eq!(exit.console_tail().len(), 2, "kept for the crash report");
    }
}
