//! A device's INTx line as a pair of eventfds: the irqfd KVM injects from
//! and the resample fd KVM signals at EOI. The VMM registers both with KVM
//! (`KVM_IRQFD` with `KVM_IRQFD_FLAG_RESAMPLE`) and hands them over the
//! protocol, so an interrupt never passes through the VMM.
//!
//! Level semantics over an edge-style eventfd: a rising level signals the
//! irqfd; at EOI KVM lowers the line and signals resample, and if the
//! device still holds the line high we signal the irqfd again.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::thread::JoinHandle;

use plugin_api::function::IrqSink;
use vmm_sys_util::eventfd::EventFd;

/// The eventfds of one INTx line, once the VMM provided them.
pub struct IntxFds {
    pub trigger: EventFd,
    pub resample: Option<EventFd>,
}

/// INTx state of one device.
#[derive(Default)]
pub struct IntxLine {
    level: AtomicBool,
    /// Masked by the protocol (vfio-user SET_IRQS mask/unmask).
    masked: AtomicBool,
    /// Disabled by the guest (Command.INTX_DISABLE).
    disabled: AtomicBool,
    fds: Mutex<Option<IntxFds>>,
    /// Times the irqfd was signalled (for tests and statistics).
    signals: AtomicU64,
    /// MSI-X: each vector's eventfd, as the VMM gave them (vfio-user
    /// SET_IRQS of the MSI-X index). The VMM routes them to KVM.
    msix: Mutex<Vec<Option<EventFd>>>,
    /// The guest enabled MSI-X: INTx stays quiet meanwhile.
    msix_enabled: AtomicBool,
    /// MSI: each vector's eventfd (SET_IRQS of the MSI index).
    msi: Mutex<Vec<Option<EventFd>>>,
    /// The guest enabled MSI: INTx stays quiet meanwhile.
    msi_enabled: AtomicBool,
}

/// Which vectors' eventfds: vfio-user's two message-interrupt indexes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vectors {
    Msi,
    Msix,
}

impl IntxLine {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs (or with `None` removes) the eventfds.
    pub fn set_fds(&self, fds: Option<IntxFds>) {
        *self.fds.lock().unwrap_or_else(|e| e.into_inner()) = fds;
        if self.level() {
            self.signal();
        }
    }

    /// A duplicate of the resample fd, for an event loop to wait on.
    pub fn resample_fd(&self) -> Option<EventFd> {
        let fds = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        fds.as_ref()
            .and_then(|f| f.resample.as_ref())
            .and_then(|r| r.try_clone().ok())
    }

    pub fn level(&self) -> bool {
        self.level.load(Ordering::Acquire)
    }

    /// vfio-style mask: while masked, nothing is signalled.
    pub fn set_masked(&self, masked: bool) {
        self.masked.store(masked, Ordering::Release);
        if !masked && self.level() {
            self.signal();
        }
    }

    /// Command.INTX_DISABLE: while set, nothing is signalled; clearing
    /// it re-signals a line that is still high.
    pub fn set_disabled(&self, disabled: bool) {
        let was = self.disabled.swap(disabled, Ordering::AcqRel);
        if was && !disabled && self.level() {
            self.signal();
        }
    }

    /// Installs the eventfds of vectors `start..` (vfio-user SET_IRQS of
    /// the MSI or MSI-X index); with `fds` empty and `start` 0, removes
    /// them all.
    pub fn set_vector_fds(&self, which: Vectors, start: usize, fds: Vec<EventFd>) {
        let table = match which {
            Vectors::Msi => &self.msi,
            Vectors::Msix => &self.msix,
        };
        let mut m = table.lock().unwrap_or_else(|e| e.into_inner());
        if fds.is_empty() && start == 0 {
            m.clear();
            return;
        }
        if m.len() < start + fds.len() {
            m.resize_with(start + fds.len(), || None);
        }
        for (i, fd) in fds.into_iter().enumerate() {
            m[start + i] = Some(fd);
        }
    }

    /// MSI-X's and MSI's enable bits, after a configuration write: while
    /// either is set INTx is quiet; a line still high when both clear is
    /// signalled.
    pub fn set_message_enabled(&self, msix: bool, msi: bool) {
        let was = self.messages_enabled();
        self.msix_enabled.store(msix, Ordering::Release);
        self.msi_enabled.store(msi, Ordering::Release);
        if was && !self.messages_enabled() && self.level() {
            self.signal();
        }
    }

    fn messages_enabled(&self) -> bool {
        self.msix_enabled.load(Ordering::Acquire) || self.msi_enabled.load(Ordering::Acquire)
    }

    fn signal_msix(&self, vector: u32) {
        // The enabled capability's eventfd; with neither enabled a vector
        // is dropped, not kept pending.
        let table = if self.msix_enabled.load(Ordering::Acquire) {
            &self.msix
        } else if self.msi_enabled.load(Ordering::Acquire) {
            &self.msi
        } else {
            return;
        };
        let m = table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(Some(fd)) = usize::try_from(vector).ok().and_then(|v| m.get(v)) {
            let _ = fd.write(1);
        }
    }

    pub fn signals(&self) -> u64 {
        self.signals.load(Ordering::Relaxed)
    }

    fn signal(&self) {
        if self.masked.load(Ordering::Acquire)
            || self.disabled.load(Ordering::Acquire)
            || self.messages_enabled()
        {
            return;
        }
        let fds = self.fds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = fds.as_ref() {
            if f.trigger.write(1).is_ok() {
                self.signals.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// KVM signalled resample (the guest EOI'd): re-raise if still high.
    pub fn on_resample(&self) {
        if self.level() {
            self.signal();
        }
    }
}

impl IrqSink for IntxLine {
    fn set_level(&self, irq: u32, asserted: bool) {
        if irq >= plugin_api::MSIX_IRQ_BASE {
            if asserted {
                self.signal_msix(irq - plugin_api::MSIX_IRQ_BASE);
            }
            return;
        }
        if irq != 0 {
            return;
        }
        let was = self.level.swap(asserted, Ordering::AcqRel);
        if asserted && !was {
            self.signal();
        }
    }
}

/// A thread that runs `on_event` each time an eventfd fires (KVM's
/// resample fd at EOI, or vfio-user's unmask eventfd), until dropped.
pub struct EventfdWatcher {
    stop: EventFd,
    thread: Option<JoinHandle<()>>,
}

impl EventfdWatcher {
    pub fn start(
        name: String,
        fd: EventFd,
        on_event: impl Fn() + Send + 'static,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stop2 = stop.try_clone()?;
        let thread = std::thread::Builder::new().name(name).spawn(move || loop {
            let mut pfds = [
                libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop2.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds for the duration of the call.
            let r = unsafe { libc::poll(pfds.as_mut_ptr(), 2, -1) };
            if r < 0 {
                if std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return;
            }
            if pfds[1].revents != 0 {
                return;
            }
            if pfds[0].revents & libc::POLLIN != 0 {
                let _ = fd.read();
                on_event();
            } else if pfds[0].revents != 0 {
                return;
            }
        })?;
        Ok(EventfdWatcher {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for EventfdWatcher {
    fn drop(&mut self) {
        let _ = self.stop.write(1);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn fds() -> (IntxFds, EventFd, EventFd) {
        let t = EventFd::new(EFD_NONBLOCK).unwrap();
        let r = EventFd::new(EFD_NONBLOCK).unwrap();
        let f = IntxFds {
            trigger: t.try_clone().unwrap(),
            resample: Some(r.try_clone().unwrap()),
        };
        (f, t, r)
    }

    #[test]
    fn rising_edge_signals_once_and_resample_re_raises() {
        let line = IntxLine::new();
        let (f, trigger, _r) = fds();
        line.set_fds(Some(f));
        line.set_level(0, true);
        line.set_level(0, true);
        assert_eq!(trigger.read().unwrap(), 1, "one edge, one signal");
        line.on_resample();
        assert_eq!(trigger.read().unwrap(), 1, "still high at EOI");
        line.set_level(0, false);
        line.on_resample();
        assert!(trigger.read().is_err(), "low at EOI: nothing");
    }

    #[test]
    fn mask_defers_and_fds_installed_late_catch_up() {
        let line = IntxLine::new();
        line.set_level(0, true);
        let (f, trigger, _r) = fds();
        line.set_fds(Some(f));
        assert_eq!(trigger.read().unwrap(), 1, "level was already high");
        line.set_masked(true);
        line.on_resample();
        assert!(trigger.read().is_err());
        line.set_masked(false);
        assert_eq!(trigger.read().unwrap(), 1);
    }
}
