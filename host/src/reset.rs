//! A VM reset that restarts the guest (guest `reboot`, QMP
//! `system_reset`), in the VMM process while the remotes keep running:
//!
//! 1. every vCPU thread leaves KVM_RUN (kicked with a signal until it
//!    parks at the [`Gate`]) and is held;
//! 2. every PCI function is reset (vfio-user and mpqemu DEVICE_RESET,
//!    `PciFunction::reset` in-process) and the BARs are placed afresh, as
//!    at boot;
//! 3. kernel, initrd, zero page, command line, page tables and MP table
//!    are written into guest RAM again; the PIC, IOAPIC and PIT get their
//!    power-on state back (read from KVM when they were created); COM1,
//!    the i8042 and the CMOS are new;
//! 4. every vCPU gets its power-on state back, the boot vCPU its entry
//!    state and the others wait for INIT/SIPI ([`cpu::reset_registers`]);
//! 5. the vCPUs run again.

use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use kvm_bindings::{
    kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::bus::Bus;
use crate::cpu::{self, Gate, PowerOn};
use crate::exit::ExitSignal;
use crate::memory::GuestRam;
use crate::mptable::PciIrq;
use crate::{boot, vm};

/// How long the vCPUs may take to leave KVM_RUN (one may be waiting for a
/// remote's reply, up to its `timeout-ms`).
const PAUSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The signal that kicks a vCPU thread out of KVM_RUN (its handler does
/// nothing; the interrupted ioctl returns EINTR).
fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the (empty) handler of the kick signal, without SA_RESTART so
/// that KVM_RUN returns.
pub fn install_kick_handler() -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
        .map_err(|e| anyhow::anyhow!("installing the vCPU kick handler: {e}"))
}

/// One vCPU as the reset sees it.
pub struct Vcpu {
    pub fd: Arc<Mutex<VcpuFd>>,
    pub power_on: PowerOn,
    pub thread: Option<JoinHandle<()>>,
}

/// The PIC, IOAPIC and PIT: as KVM created them (the machine's power-on
/// state, read right after KVM_CREATE_IRQCHIP and KVM_CREATE_PIT2, before
/// anything ran: all IOAPIC entries masked, the PICs uninitialized, the
/// PIT counters idle), or as a snapshot found them.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct IrqchipState {
    chips: Vec<kvm_irqchip>,
    pit: kvm_pit_state2,
}

impl IrqchipState {
    /// Reads the state KVM holds now.
    pub fn read(vm: &VmFd) -> Result<Self> {
        let mut chips = Vec::new();
        for id in [
            KVM_IRQCHIP_PIC_MASTER,
            KVM_IRQCHIP_PIC_SLAVE,
            KVM_IRQCHIP_IOAPIC,
        ] {
            let mut c = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut c).context("KVM_GET_IRQCHIP")?;
            chips.push(c);
        }
        let pit = vm.get_pit2().context("KVM_GET_PIT2")?;
        Ok(IrqchipState { chips, pit })
    }

    /// Puts this state into KVM.
    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        for c in &self.chips {
            vm.set_irqchip(c).context("KVM_SET_IRQCHIP")?;
        }
        vm.set_pit2(&self.pit).context("KVM_SET_PIT2")?;
        Ok(())
    }
}

/// What a boot wrote into the machine, to write it again.
pub struct Machine {
    pub vm: Arc<VmFd>,
    pub ram: Arc<GuestRam>,
    pub bus: Arc<Bus>,
    pub exit: Arc<ExitSignal>,
    pub gate: Arc<Gate>,
    pub vcpus: Vec<Vcpu>,
    pub irqchip: IrqchipState,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub pci_irqs: Vec<PciIrq>,
    /// The operator stopped the vCPUs (QMP `stop`, a migration): a reset
    /// meanwhile leaves them stopped.
    pub held: std::sync::atomic::AtomicBool,
    /// Serialises resets, stops and resumes.
    pub control: Mutex<()>,
    /// KVM's list of MSRs to save, for snapshots.
    pub msr_indices: Vec<u32>,
    /// Each vCPU's last exits and registers (the crash report's).
    pub crash: Arc<crate::crash::CrashRecord>,
}

impl Machine {
    /// Resets the machine and lets the guest boot again. On an error the
    /// vCPUs stay held (the caller ends the VM).
    pub fn reset(&self) -> Result<()> {
        let _one = self.control.lock().unwrap_or_else(|e| e.into_inner());
        self.pause(PAUSE_TIMEOUT)?;
        self.bus
            .pci
            .reset(&|slot| Some(vm::pci_gsi(slot) as u8))
            .context("placing the PCI BARs again")?;
        let n = u8::try_from(self.vcpus.len()).context("vCPU count")?;
        let boot = boot::setup(
            &self.ram,
            &self.kernel,
            self.initrd.as_deref(),
            &self.cmdline,
            n,
            &self.pci_irqs,
            self.bus.pm.is_some(),
        )
        .context("loading the kernel again")?;
        self.irqchip.restore(&self.vm)?;
        self.bus.reset_legacy(&self.exit)?;
        for (id, v) in self.vcpus.iter().enumerate() {
            let fd = v.fd.lock().unwrap_or_else(|e| e.into_inner());
            cpu::reset_registers(&fd, &v.power_on, id as u8, &boot)
                .with_context(|| format!("resetting vCPU {id}"))?;
        }
        // The reason that caused this reset is gone; one that came
        // meanwhile (quit, a dead remote) stays and ends the VM at once.
        self.exit.rearm();
        if !self.held.load(std::sync::atomic::Ordering::SeqCst) {
            self.gate.open();
        }
        Ok(())
    }

    /// Stops the vCPUs until [`resume`](Self::resume) (QMP `stop`).
    /// Returns whether they were running.
    pub fn hold(&self) -> Result<bool> {
        let _one = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let was = !self.held.swap(true, std::sync::atomic::Ordering::SeqCst);
        if let Err(e) = self.pause(PAUSE_TIMEOUT) {
            if was {
                self.held.store(false, std::sync::atomic::Ordering::SeqCst);
                self.gate.open();
            }
            return Err(e);
        }
        Ok(was)
    }

    /// Lets stopped vCPUs run again (QMP `cont`); returns whether they
    /// were stopped.
    pub fn resume(&self) -> bool {
        let _one = self.control.lock().unwrap_or_else(|e| e.into_inner());
        let was = self.held.swap(false, std::sync::atomic::Ordering::SeqCst);
        if was {
            self.gate.open();
        }
        was
    }

    /// The crash report of a VM that has not crashed (QMP
    /// `x-debug-report`): each vCPU's registers (read with the vCPUs
    /// held a moment, then let go again unless the operator held them)
    /// and last exits, and the console's last lines. For a guest that
    /// went quiet: whether its vCPUs still exit, and where they are.
    pub fn debug_report(&self) -> String {
        let held = self.hold();
        let registers: Vec<Option<String>> = self
            .vcpus
            .iter()
            .map(|v| {
                // A vCPU that did not park (in KVM_RUN on a hung remote's
                // answer) holds its lock: it is reported as not captured.
                v.fd.try_lock()
                    .ok()
                    .map(|fd| format!("(read on request)\n{}", crate::crash::vcpu_state(&fd)))
            })
            .collect();
        let reason = match &held {
            Ok(_) => "requested (QMP x-debug-report)".to_owned(),
            Err(e) => format!("requested (QMP x-debug-report); {e:#}"),
        };
        if let Ok(true) = held {
            self.resume();
        }
        self.crash
            .report_now(&reason, &self.exit.console_tail(), &registers)
    }

    /// Whether the operator holds the vCPUs.
    pub fn is_held(&self) -> bool {
        self.held.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The parts a snapshot reads (call with the vCPUs held).
    pub fn parts(
        &self,
        remotes: Vec<Arc<crate::supervisor::Remote>>,
    ) -> crate::snapshot::Parts<'_> {
        crate::snapshot::Parts {
            vm: &self.vm,
            ram: &self.ram,
            bus: &self.bus,
            exit: &self.exit,
            vcpus: self.vcpus.iter().map(|v| v.fd.clone()).collect(),
            remotes,
            msr_indices: &self.msr_indices,
            handover: false,
        }
    }

    /// Holds every vCPU out of KVM_RUN: asks them to park and kicks the
    /// ones still in the kernel (a vCPU in HLT or waiting for SIPI stays in
    /// KVM_RUN until a signal interrupts it). The kick repeats, so one that
    /// lands just before a thread enters KVM_RUN is not lost.
    pub fn pause(&self, within: Duration) -> Result<()> {
        let t0 = Instant::now();
        self.gate.request_pause();
        while self.gate.parked() < self.vcpus.len() {
            if t0.elapsed() > within {
                bail!(
                    "only {} of {} vCPUs stopped within {within:?}",
                    self.gate.parked(),
                    self.vcpus.len()
                );
            }
            for v in &self.vcpus {
                let Some(t) = &v.thread else { continue };
                if t.is_finished() {
                    bail!("a vCPU thread has ended");
                }
                // SAFETY: the thread is alive (checked just above, and vCPU
                // threads never return); the signal's handler does nothing
                // and was installed before any vCPU thread started.
                unsafe { libc::pthread_kill(t.as_pthread_t(), kick_signal()) };
            }
            self.gate.wait_parked(Duration::from_millis(10));
        }
        Ok(())
    }
}
