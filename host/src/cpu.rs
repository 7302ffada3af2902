//! vCPUs: CPUID from KVM's supported set, LAPIC LINT pins, the 64-bit boot
//! state of the boot vCPU (also after a reset: [`reset_registers`]), and
//! the run loop that sends port and MMIO exits to the
//! [`Bus`](crate::bus::Bus) and parks at a [`Gate`] while a reset holds
//! the vCPUs.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_segment,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED, KVM_VCPUEVENT_VALID_NMI_PENDING,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::boot::{self, BootInfo};
use crate::bus::Bus;
use crate::crash::{CrashRecord, ExitKind};
use crate::exit::{ExitReason, ExitSignal};

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// CPUID for vCPU `id`: KVM's supported set with the APIC ID filled in
/// and the hypervisor bit set.
pub fn cpuid_for(base: &CpuId, id: u8, vcpus: u8) -> CpuId {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(vcpus) << 16) | (u32::from(id) << 24);
                e.ecx |= 1 << 31; // running on a hypervisor
                if vcpus > 1 {
                    e.edx |= 1 << 28; // HTT: the logical count in EBX is valid
                }
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    c
}

fn lapic_set(regs: &mut [std::os::raw::c_char; 1024], off: usize, mode: u32) {
    let mut v = [0u8; 4];
    for (i, b) in v.iter_mut().enumerate() {
        *b = regs[off + i] as u8;
    }
    let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
    for (i, b) in val.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

fn segment(index: u16, (flags, base, limit): (u16, u32, u32)) -> kvm_segment {
    kvm_segment {
        base: u64::from(base),
        limit,
        selector: index * 8,
        type_: (flags & 0xf) as u8,
        present: ((flags >> 7) & 1) as u8,
        dpl: ((flags >> 5) & 3) as u8,
        db: ((flags >> 14) & 1) as u8,
        s: ((flags >> 4) & 1) as u8,
        l: ((flags >> 13) & 1) as u8,
        g: ((flags >> 15) & 1) as u8,
        avl: ((flags >> 12) & 1) as u8,
        unusable: if (flags >> 7) & 1 == 0 { 1 } else { 0 },
        padding: 0,
    }
}

/// What a vCPU looks like at power-on, read back from KVM right after it
/// was created (before it ever ran): a reset puts this back, because KVM
/// has no vCPU reset of its own and cannot delete vCPUs.
pub struct PowerOn {
    regs: kvm_regs,
    sregs: kvm_sregs,
    lapic: kvm_lapic_state,
    /// Every MSR of KVM's save list that could be read (TSC and the
    /// VM-wide wall clock left out); among them the paravirtual clock,
    /// steal-time and async-PF MSRs, which must be off again before the
    /// new kernel's memory is where the old one had those areas.
    msrs: Vec<kvm_msr_entry>,
    xcrs: Option<kvm_xcrs>,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
}

/// MSRs a reset does not put back: the TSC (writing it would make guest
/// time go backwards and desynchronize vCPUs) and the wall clock MSRs,
/// which are VM-wide and write to guest memory when set.
const MSRS_NOT_RESET: [u32; 3] = [0x10, 0x11, 0x4b56_4d00];

fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Vec<kvm_msr_entry> {
    read_msrs_except(vcpu, indices, &MSRS_NOT_RESET)
}

/// Every MSR of `indices` but `except` that KVM lets us read.
pub(crate) fn read_msrs_except(
    vcpu: &VcpuFd,
    indices: &[u32],
    except: &[u32],
) -> Vec<kvm_msr_entry> {
    let mut out = Vec::new();
    let mut rest: Vec<u32> = indices
        .iter()
        .copied()
        .filter(|i| !except.contains(i))
        .collect();
    while !rest.is_empty() {
        let chunk: Vec<kvm_msr_entry> = rest
            .iter()
            .take(64)
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let Ok(mut msrs) = Msrs::from_entries(&chunk) else {
            break;
        };
        // KVM stops at the first MSR it cannot read: keep what it read and
        // skip that one.
        let n = vcpu.get_msrs(&mut msrs).unwrap_or(0).min(chunk.len());
        out.extend_from_slice(&msrs.as_slice()[..n]);
        let skip = if n < chunk.len() { n + 1 } else { n };
        rest.drain(..skip);
    }
    out
}

/// Writes `entries`, skipping any KVM refuses; returns how many it refused.
pub(crate) fn write_msrs(vcpu: &VcpuFd, entries: &[kvm_msr_entry]) -> usize {
    let mut refused = 0;
    let mut rest = entries;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(64)];
        let n = Msrs::from_entries(chunk)
            .ok()
            .and_then(|m| vcpu.set_msrs(&m).ok())
            .unwrap_or(0)
            .min(chunk.len());
        let mut skip = n;
        if n < chunk.len() {
            tracing::debug!("KVM_SET_MSRS refused MSR {:#x}", chunk[n].index);
            refused += 1;
            skip += 1;
        }
        rest = &rest[skip..];
    }
    refused
}

/// Creates vCPU `id` with its CPUID and records its power-on state, then
/// puts it in its boot state ([`reset_registers`]).
pub fn create(
    vm: &VmFd,
    base_cpuid: &CpuId,
    msr_indices: &[u32],
    id: u8,
    vcpus: u8,
    boot: &BootInfo,
) -> Result<(VcpuFd, PowerOn)> {
    let vcpu = vm
        .create_vcpu(u64::from(id))
        .with_context(|| format!("create vCPU {id}"))?;
    vcpu.set_cpuid2(&cpuid_for(base_cpuid, id, vcpus))
        .context("KVM_SET_CPUID2")?;
    let mut lapic = vcpu.get_lapic().context("KVM_GET_LAPIC")?;
    lapic_set(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    lapic_set(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    let mut events = vcpu.get_vcpu_events().context("KVM_GET_VCPU_EVENTS")?;
    // Also clear a pending NMI on reset (KVM only sets it with this flag).
    events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING;
    let power_on = PowerOn {
        regs: vcpu.get_regs().context("KVM_GET_REGS")?,
        sregs: vcpu.get_sregs().context("KVM_GET_SREGS")?,
        lapic,
        msrs: read_msrs(&vcpu, msr_indices),
        // Without XSAVE there are no XCRs to reset.
        xcrs: vcpu.get_xcrs().ok(),
        events,
        debugregs: vcpu.get_debug_regs().context("KVM_GET_DEBUGREGS")?,
    };
    reset_registers(&vcpu, &power_on, id, boot)?;
    Ok((vcpu, power_on))
}

/// Puts vCPU `id` in its boot state: the power-on state for everything,
/// then for the boot vCPU (0) the 64-bit entry state and RUNNABLE; the
/// others wait for the guest's INIT/SIPI (UNINITIALIZED). Returns after
/// setting all of it; MSRs KVM refuses are skipped (logged at debug).
pub fn reset_registers(vcpu: &VcpuFd, p: &PowerOn, id: u8, boot: &BootInfo) -> Result<()> {
    // The APIC base (in sregs) before the LAPIC, and the LAPIC after the
    // MSRs (the TSC deadline MSR lives in its timer).
    let sregs = if id == 0 {
        boot_sregs(p.sregs)
    } else {
        p.sregs
    };
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;
    let refused = write_msrs(vcpu, &p.msrs);
    if refused > 0 {
        tracing::debug!("vCPU {id}: {refused} MSRs kept their value");
    }
    vcpu.set_lapic(&p.lapic).context("KVM_SET_LAPIC")?;
    if let Some(x) = &p.xcrs {
        vcpu.set_xcrs(x).context("KVM_SET_XCRS")?;
    }
    vcpu.set_debug_regs(&p.debugregs)
        .context("KVM_SET_DEBUGREGS")?;
    vcpu.set_vcpu_events(&p.events)
        .context("KVM_SET_VCPU_EVENTS")?;
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).context("KVM_SET_FPU")?;
    let (regs, mp_state) = if id == 0 {
        let regs = kvm_regs {
            rflags: 0x2,
            rip: boot.entry,
            rsp: boot::BOOT_STACK,
            rbp: boot::BOOT_STACK,
            rsi: boot::ZERO_PAGE,
            ..Default::default()
        };
        (regs, KVM_MP_STATE_RUNNABLE)
    } else {
        (p.regs, KVM_MP_STATE_UNINITIALIZED)
    };
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    vcpu.set_mp_state(kvm_mp_state { mp_state })
        .context("KVM_SET_MP_STATE")?;
    Ok(())
}

/// The boot vCPU's special registers for the 64-bit entry, from its
/// power-on ones: our GDT, identity page tables, long mode.
fn boot_sregs(mut sregs: kvm_sregs) -> kvm_sregs {
    let code = segment(1, boot::BOOT_GDT[1]);
    let data = segment(2, boot::BOOT_GDT[2]);
    let tss = segment(3, boot::BOOT_GDT[3]);
    sregs.gdt.base = boot::GDT_START;
    sregs.gdt.limit = (boot::BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = boot::IDT_START;
    sregs.idt.limit = 7;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr3 = boot::PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PE | X86_CR0_PG | X86_CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
    sregs
}

/// One KVM_RUN and its exit. An exit that stops the VM sets `exit`, which
/// the run loop checks before the next KVM_RUN. Port and MMIO exits go to
/// the crash record's ring (with the time spent serving them); an exit
/// that ends the VM captures the vCPU's registers first.
fn run_once(id: u8, vcpu: &mut VcpuFd, bus: &Bus, exit: &ExitSignal, crash: &CrashRecord) {
    let end = match vcpu.run() {
        Ok(VcpuExit::IoIn(port, data)) => {
            let t = Instant::now();
            bus.pio_read(port, data);
            crash.exit(id, t, ExitKind::PioIn, u64::from(port), data);
            return;
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            let t = Instant::now();
            bus.pio_write(port, data);
            crash.exit(id, t, ExitKind::PioOut, u64::from(port), data);
            return;
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            let t = Instant::now();
            bus.mmio_read(addr, data);
            crash.exit(id, t, ExitKind::MmioRead, addr, data);
            return;
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            let t = Instant::now();
            bus.mmio_write(addr, data);
            crash.exit(id, t, ExitKind::MmioWrite, addr, data);
            return;
        }
        Ok(VcpuExit::Hlt) => {
            std::thread::yield_now();
            return;
        }
        Ok(VcpuExit::Intr) => return,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => return,
        Ok(VcpuExit::Shutdown) => ExitReason::TripleFault,
        Ok(VcpuExit::SystemEvent(kind, _)) => {
            exit.set(ExitReason::SystemEvent(kind));
            return;
        }
        Ok(VcpuExit::FailEntry(reason, cpu)) => ExitReason::Error(format!(
            "vCPU {id}: KVM entry failed, hardware reason {reason:#x} on CPU {cpu}"
        )),
        Ok(VcpuExit::InternalError) => {
            let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
            ExitReason::Error(format!("vCPU {id}: KVM internal error at rip {rip:#x}"))
        }
        Ok(other) => ExitReason::Error(format!("vCPU {id}: unexpected exit {other:?}")),
        Err(e) => ExitReason::Error(format!("vCPU {id}: KVM_RUN: {e}")),
    };
    // Before anything else runs on this vCPU.
    crash.capture(id, vcpu, &format!("{end:?}"));
    exit.set(end);
}

/// Runs a vCPU until the VM stops or a reset wants it held, then parks it
/// at `gate` (without its fd, so the reset can set its registers), and
/// runs it again when the gate opens. Never returns: the process ends with
/// the VM. When the VM ends in a crash, the vCPU's registers go to the
/// crash record before it parks.
pub fn run(
    id: u8,
    vcpu: Arc<Mutex<VcpuFd>>,
    bus: Arc<Bus>,
    exit: Arc<ExitSignal>,
    gate: Arc<Gate>,
    crash: Arc<CrashRecord>,
) {
    loop {
        {
            let mut fd = vcpu.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if exit.is_set() || gate.pause_requested() {
                    complete_pending_io(id, &mut fd, &bus, &exit);
                    if exit.current().is_some_and(|r| r.is_crash()) {
                        crash.capture(id, &fd, "stopped after the crash of the VM");
                    }
                    break;
                }
                run_once(id, &mut fd, &bus, &exit, &crash);
            }
        }
        gate.park();
    }
}

/// Before parking: a KVM_RUN with `immediate_exit` lets KVM finish the
/// instruction whose port or MMIO access we just served (its result would
/// otherwise land in the registers after a reset), without entering the
/// guest. An access that continues (string I/O) is served too.
fn complete_pending_io(id: u8, vcpu: &mut VcpuFd, bus: &Bus, exit: &ExitSignal) {
    vcpu.set_kvm_immediate_exit(1);
    for _ in 0..64 {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
            Ok(VcpuExit::Shutdown) => exit.set(ExitReason::TripleFault),
            Ok(_) => break,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => break,
            Err(e) => {
                tracing::debug!("vCPU {id}: KVM_RUN with immediate_exit: {e}");
                break;
            }
        }
    }
    vcpu.set_kvm_immediate_exit(0);
}

/// Where vCPU threads wait while a reset holds them.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<GateState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    /// A reset wants every vCPU out of KVM_RUN.
    pause: bool,
    /// vCPUs parked since the gate last opened.
    parked: usize,
    /// Counts openings: a parked vCPU runs again when it changes.
    generation: u64,
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn pause_requested(&self) -> bool {
        self.lock().pause
    }

    /// Asks every vCPU to stop.
    pub fn request_pause(&self) {
        self.lock().pause = true;
    }

    /// How many vCPUs are parked.
    pub fn parked(&self) -> usize {
        self.lock().parked
    }

    /// Waits up to `t` for a vCPU to park.
    pub fn wait_parked(&self, t: Duration) {
        let g = self.lock();
        let _ = self.cv.wait_timeout(g, t);
    }

    /// Called by a vCPU thread: waits until the gate opens.
    fn park(&self) {
        let mut g = self.lock();
        g.parked += 1;
        let generation = g.generation;
        self.cv.notify_all();
        while g.generation == generation {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Lets every parked vCPU run again.
    pub fn open(&self) {
        let mut g = self.lock();
        g.pause = false;
        g.parked = 0;
        g.generation += 1;
        self.cv.notify_all();
    }
}

/// KVM's supported CPUID.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gate_counts_parked_vcpus_per_opening() {
        let gate = Arc::new(Gate::default());
        let spawn = |g: &Arc<Gate>| {
            let g = g.clone();
            std::thread::spawn(move || g.park())
        };
        gate.request_pause();
        assert!(gate.pause_requested());
        let (a, b) = (spawn(&gate), spawn(&gate));
        while gate.parked() < 2 {
            gate.wait_parked(Duration::from_millis(10));
        }
        gate.open();
        assert!(!gate.pause_requested());
        // Parked vCPUs of the last round do not count for the next one.
        assert_eq!(gate.parked(), 0);
        a.join().unwrap();
        b.join().unwrap();
    }
}
