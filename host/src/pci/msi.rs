//! MSI in the VMM, the same way as MSI-X (`super::msix`): the guest's
//! address, data and mask bits live in the function's configuration space
//! (the device's process keeps them like any register), and after every
//! configuration write that touches the capability the VMM reads it again
//! and puts each vector's KVM route and irqfd in step. The device only
//! signals its vector's eventfd. The Pending Bits register is the VMM's:
//! a masked vector has no irqfd, its eventfd keeps the signal, and that
//! is the bit the guest reads; unmasking attaches the irqfd, which
//! delivers it.

use std::sync::Arc;

use anyhow::Result;
use kvm_ioctls::VmFd;
use pci::msi::{MsiState, CAP_LEN, PENDING};
use vmm_sys_util::eventfd::EventFd;

use super::msix::{GsiRoutes, VectorSet};

/// One function's MSI as the VMM serves it.
pub struct MsiRouter {
    msi: plugin_api::function::Msi,
    vectors: VectorSet,
    state: MsiState,
}

impl MsiRouter {
    /// Eventfds and GSIs for the vectors `msi` asks for, MSI disabled.
    pub fn new(
        vm: Arc<VmFd>,
        routes: Arc<GsiRoutes>,
        msi: plugin_api::function::Msi,
    ) -> Result<Self> {
        Ok(MsiRouter {
            vectors: VectorSet::new(vm, routes, usize::from(msi.vectors), "MSI")?,
            msi,
            state: MsiState::default(),
        })
    }

    /// The capability's offset in configuration space.
    pub fn cap(&self) -> usize {
        self.msi.cap
    }

    /// The capability's place and size.
    pub fn msi(&self) -> plugin_api::function::Msi {
        self.msi
    }

    /// What the guest programmed, as last applied.
    pub fn state(&self) -> MsiState {
        self.state
    }

    /// Whether a configuration access of `len` bytes at `offset` touches
    /// the capability.
    pub fn touches(&self, offset: usize, len: usize) -> bool {
        offset < self.msi.cap + CAP_LEN && offset + len > self.msi.cap
    }

    /// The eventfd the device signals for each vector, in order.
    pub fn eventfds(&self) -> Vec<&EventFd> {
        self.vectors.eventfds()
    }

    /// Signals vector `v` as the device would (an in-process device, or
    /// a snapshot's pending vector); dropped while MSI is disabled or for
    /// a vector not granted.
    pub fn signal(&self, v: u16) {
        if self.state.enabled && v < u16::from(self.state.granted) {
            self.vectors.signal(usize::from(v));
        }
    }

    /// The guest changed the capability (`state` read back from the
    /// function): each vector's route and irqfd follow it.
    pub fn update(&mut self, state: MsiState) {
        let was = self.state.enabled;
        self.state = state;
        for v in 0..self.vectors.len() {
            let n = v as u8;
            if state.enabled && !was {
                // What was raised while disabled was dropped, not pending.
                self.vectors.drop_pending(v);
            }
            self.vectors.set(v, state.live(n).then(|| state.message(n)));
            if !state.enabled || n >= state.granted {
                self.vectors.drop_pending(v);
            }
        }
    }

    /// The Pending Bits register: each granted vector that was raised
    /// while masked.
    pub fn pending_bits(&self) -> u32 {
        let granted = usize::from(self.state.granted);
        pci::msi::pending_bits(
            (0..self.vectors.len()).map(|v| v < granted && self.vectors.pending(v)),
        )
    }

    /// Answers a configuration read that covers the Pending Bits register
    /// (already filled from the function) with the VMM's bits.
    pub fn patch_read(&self, offset: usize, data: &mut [u8]) {
        let reg = self.msi.cap + PENDING;
        let bits = self.pending_bits().to_le_bytes();
        for (i, d) in data.iter_mut().enumerate() {
            let at = offset + i;
            if (reg..reg + 4).contains(&at) {
                *d = bits[at - reg];
            }
        }
    }

    /// A function reset: MSI disabled, nothing pending.
    pub fn reset(&mut self) {
        self.update(MsiState::default());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A VM with an in-kernel irqchip, where KVM exists.
    fn vm() -> Option<Arc<VmFd>> {
        let kvm = kvm_ioctls::Kvm::new().ok()?;
        let vm = kvm.create_vm().ok()?;
        vm.create_irq_chip().ok()?;
        Some(Arc::new(vm))
    }

    fn state(enabled: bool, granted: u8, mask: u32) -> MsiState {
        MsiState {
            enabled,
            granted,
            address: 0xfee0_0000,
            data: 0x4020,
            mask,
        }
    }

    /// Masking and the pending bits as PCI 3.0 6.8.1 says, with real KVM
    /// routes and irqfds: a masked vector's signal is pending (the guest
    /// reads its bit) and leaves at unmask; a disabled MSI keeps nothing;
    /// a vector not granted is never pending.
    #[test]
    fn masked_vectors_keep_their_signal_until_unmasked() {
        let Some(vm) = vm() else {
            eprintln!("skipped: no KVM here");
            return;
        };
        let routes = GsiRoutes::new();
        let msi = plugin_api::function::Msi {
            cap: 0x50,
            vectors: 4,
        };
        let mut r = MsiRouter::new(vm, routes, msi).unwrap();
        assert_eq!(r.eventfds().len(), 4);
        // Disabled: dropped.
        r.signal(0);
        r.vectors.signal(1); // a remote signals its eventfd itself
        r.update(state(true, 2, 0b10));
        assert_eq!(r.pending_bits(), 0, "raised while disabled: not pending");
        // Vector 1 masked: pending; vector 0 live: delivered at once.
        r.signal(1);
        r.signal(0);
        assert_eq!(r.pending_bits(), 0b10);
        let mut cfg = [0u8; 24];
        r.patch_read(0x50 + 16, &mut cfg[16..24]);
        assert_eq!(
            &cfg[20..24],
            &[0b10, 0, 0, 0],
            "the guest reads its pending bit"
        );
        // Unmasked: the irqfd takes it.
        r.update(state(true, 2, 0));
        assert_eq!(r.pending_bits(), 0);
        // Vector 3 was not granted (2 of 4): never pending.
        r.vectors.signal(3);
        assert_eq!(r.pending_bits(), 0);
        // Masked again, raised, then MSI disabled: nothing left.
        r.update(state(true, 2, 0b01));
        r.signal(0);
        assert_eq!(r.pending_bits(), 0b01);
        r.reset();
        assert_eq!(r.pending_bits(), 0);
        assert!(r.touches(0x50 + 22, 4));
        assert!(!r.touches(0x50 + 24, 4));
        assert!(r.touches(0x4e, 4));
    }
}
