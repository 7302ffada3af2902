//! A vCPU's architectural state as KVM holds it, read and written in the
//! order QEMU uses: MSRs before the LAPIC, and the TSC deadline only after
//! the LAPIC (KVM ignores a deadline while the LVT timer is not in
//! TSC-deadline mode).

use anyhow::{Context, Result};
use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVM_VCPUEVENT_VALID_NMI_PENDING,
    KVM_VCPUEVENT_VALID_SIPI_VECTOR,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::cpu;

/// IA32_TSC_DEADLINE.
const MSR_TSC_DEADLINE: u32 = 0x6e0;
/// The VM-wide wall clock MSRs: written once by the guest at boot, and
/// setting one writes guest memory; the wall clock comes with the VM's
/// KVM clock instead.
const MSRS_NOT_SAVED: [u32; 2] = [0x11, 0x4b56_4d00];

/// One vCPU.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    /// None without XSAVE.
    xcrs: Option<kvm_xcrs>,
    msrs: Vec<kvm_msr_entry>,
    mp_state: kvm_mp_state,
    lapic: kvm_lapic_state,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
}

impl VcpuState {
    /// Reads vCPU `vcpu` (out of KVM_RUN); `msr_indices` is KVM's list of
    /// MSRs to save.
    pub fn read(vcpu: &VcpuFd, msr_indices: &[u32]) -> Result<Self> {
        Ok(VcpuState {
            regs: vcpu.get_regs().context("KVM_GET_REGS")?,
            sregs: vcpu.get_sregs().context("KVM_GET_SREGS")?,
            xsave: vcpu.get_xsave().context("KVM_GET_XSAVE")?,
            xcrs: vcpu.get_xcrs().ok(),
            msrs: cpu::read_msrs_except(vcpu, msr_indices, &MSRS_NOT_SAVED),
            mp_state: vcpu.get_mp_state().context("KVM_GET_MP_STATE")?,
            lapic: vcpu.get_lapic().context("KVM_GET_LAPIC")?,
            events: vcpu.get_vcpu_events().context("KVM_GET_VCPU_EVENTS")?,
            debugregs: vcpu.get_debug_regs().context("KVM_GET_DEBUGREGS")?,
        })
    }

    /// Writes this state into `vcpu` (created with the same CPUID).
    pub fn write(&self, vcpu: &VcpuFd) -> Result<()> {
        vcpu.set_sregs(&self.sregs).context("KVM_SET_SREGS")?;
        vcpu.set_regs(&self.regs).context("KVM_SET_REGS")?;
        // SAFETY: the buffer is a whole `kvm_xsave` read from KVM_GET_XSAVE
        // on this same machine (the legacy 4 KiB layout KVM_SET_XSAVE takes).
        unsafe { vcpu.set_xsave(&self.xsave) }.context("KVM_SET_XSAVE")?;
        if let Some(x) = &self.xcrs {
            vcpu.set_xcrs(x).context("KVM_SET_XCRS")?;
        }
        let (deadline, msrs): (Vec<_>, Vec<_>) =
            self.msrs.iter().partition(|m| m.index == MSR_TSC_DEADLINE);
        let refused = cpu::write_msrs(vcpu, &msrs);
        if refused > 0 {
            tracing::warn!("restore: KVM refused {refused} MSR(s) of the snapshot");
        }
        vcpu.set_mp_state(self.mp_state)
            .context("KVM_SET_MP_STATE")?;
        vcpu.set_lapic(&self.lapic).context("KVM_SET_LAPIC")?;
        cpu::write_msrs(vcpu, &deadline);
        let mut events = self.events;
        events.flags |= KVM_VCPUEVENT_VALID_NMI_PENDING | KVM_VCPUEVENT_VALID_SIPI_VECTOR;
        vcpu.set_vcpu_events(&events)
            .context("KVM_SET_VCPU_EVENTS")?;
        vcpu.set_debug_regs(&self.debugregs)
            .context("KVM_SET_DEBUGREGS")?;
        Ok(())
    }
}
