//! vCPUs: CPUID from KVM's supported set, LAPIC LINT pins, the 64-bit boot
//! state of the boot vCPU, and the run loop that sends port and MMIO exits
//! to the [`Bus`](crate::bus::Bus).

use std::sync::Arc;

use anyhow::{Context, Result};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use crate::boot::{self, BootInfo};
use crate::bus::Bus;
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

/// Creates vCPU `id` and sets it up; the boot vCPU (0) gets the 64-bit
/// entry state, the others wait for the guest's INIT/SIPI.
pub fn create(vm: &VmFd, base_cpuid: &CpuId, id: u8, vcpus: u8, boot: &BootInfo) -> Result<VcpuFd> {
    let vcpu = vm
        .create_vcpu(u64::from(id))
        .with_context(|| format!("create vCPU {id}"))?;
    vcpu.set_cpuid2(&cpuid_for(base_cpuid, id, vcpus))
        .context("KVM_SET_CPUID2")?;
    let mut lapic = vcpu.get_lapic().context("KVM_GET_LAPIC")?;
    lapic_set(&mut lapic.regs, APIC_LVT0, APIC_MODE_EXTINT);
    lapic_set(&mut lapic.regs, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).context("KVM_SET_LAPIC")?;
    if id != 0 {
        return Ok(vcpu);
    }

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).context("KVM_SET_FPU")?;

    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
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
    vcpu.set_sregs(&sregs).context("KVM_SET_SREGS")?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: boot.entry,
        rsp: boot::BOOT_STACK,
        rbp: boot::BOOT_STACK,
        rsi: boot::ZERO_PAGE,
        ..Default::default()
    };
    vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
    Ok(vcpu)
}

/// Runs a vCPU until the VM ends; reports why through `exit`.
pub fn run(id: u8, mut vcpu: VcpuFd, bus: Arc<Bus>, exit: Arc<ExitSignal>) {
    loop {
        if exit.is_set() {
            return;
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => bus.pio_write(port, data),
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
            Ok(VcpuExit::Hlt) => std::thread::yield_now(),
            Ok(VcpuExit::Shutdown) => {
                exit.set(ExitReason::TripleFault);
                return;
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => {
                exit.set(ExitReason::SystemEvent(kind));
                return;
            }
            Ok(VcpuExit::Intr) => {}
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                exit.set(ExitReason::Error(format!(
                    "vCPU {id}: KVM entry failed, hardware reason {reason:#x} on CPU {cpu}"
                )));
                return;
            }
            Ok(VcpuExit::InternalError) => {
                let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                exit.set(ExitReason::Error(format!(
                    "vCPU {id}: KVM internal error at rip {rip:#x}"
                )));
                return;
            }
            Ok(other) => {
                exit.set(ExitReason::Error(format!(
                    "vCPU {id}: unexpected exit {other:?}"
                )));
                return;
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                exit.set(ExitReason::Error(format!("vCPU {id}: KVM_RUN: {e}")));
                return;
            }
        }
    }
}

/// KVM's supported CPUID.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")
}
