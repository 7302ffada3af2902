//! Plain-Rust constructors of the description types of [`crate::abi`], so
//! that [`Device::describe`](crate::Device::describe) is written with
//! `Vec`s and builder calls. The types themselves (their layout is the ABI)
//! are unchanged.

use abi_stable::std_types::RVec;

use crate::abi::{BarDesc, BarKind, CapabilityDesc, DeviceDesc, PciIdentity};

impl PciIdentity {
    /// A function `vendor_id:device_id` of class `class_code`
    /// (`class << 16 | subclass << 8 | prog_if`), revision 0, the same
    /// IDs as its subsystem, and no interrupt pin (see
    /// [`with_intx`](Self::with_intx)).
    pub fn new(vendor_id: u16, device_id: u16, class_code: u32) -> Self {
        PciIdentity {
            vendor_id,
            device_id,
            class_code,
            revision: 0,
            subsystem_vendor_id: vendor_id,
            subsystem_id: device_id,
            interrupt_pin: 0,
        }
    }

    /// With interrupt pin INTA# (the pin a single-function device uses;
    /// [`Host::set_intx`](crate::Host::set_intx) drives it).
    pub fn with_intx(mut self) -> Self {
        self.interrupt_pin = 1;
        self
    }

    /// With this revision ID.
    pub fn with_revision(mut self, revision: u8) -> Self {
        self.revision = revision;
        self
    }

    /// With these subsystem IDs.
    pub fn with_subsystem(mut self, vendor_id: u16, id: u16) -> Self {
        self.subsystem_vendor_id = vendor_id;
        self.subsystem_id = id;
        self
    }
}

impl BarDesc {
    /// An I/O-port BAR `index` of `size` bytes (a power of two, 4..=256).
    ///
    /// The guest's firmware places it in port space (the harness's
    /// [`map_bars`](crate::harness::TestBench::map_bars) from port
    /// `0xc000`); the device sees accesses as
    /// [`bar_read`](crate::Device::bar_read)/[`bar_write`](crate::Device::bar_write)
    /// of BAR `index` at an offset from the BAR's base, like MMIO.
    pub fn io(index: u8, size: u64) -> Self {
        Self::of(index, BarKind::Io, size)
    }

    /// A 32-bit memory BAR `index` of `size` bytes (a power of two, at
    /// least 16).
    pub fn mmio32(index: u8, size: u64) -> Self {
        Self::of(index, BarKind::Memory32, size)
    }

    /// A 64-bit memory BAR at `index` (it also takes `index + 1`).
    pub fn mmio64(index: u8, size: u64) -> Self {
        Self::of(index, BarKind::Memory64, size)
    }

    /// Marked prefetchable (memory BARs only; reads must have no side
    /// effects).
    pub fn prefetchable(mut self) -> Self {
        self.prefetchable = true;
        self
    }

    fn of(index: u8, kind: BarKind, size: u64) -> Self {
        BarDesc {
            index,
            kind,
            size,
            prefetchable: false,
        }
    }
}

impl CapabilityDesc {
    /// Capability `id` with `body` (the bytes after the ID and next-pointer
    /// header), read-only to the guest.
    pub fn new(id: u8, body: Vec<u8>) -> Self {
        CapabilityDesc {
            id,
            body: RVec::from(body),
            writable: RVec::new(),
        }
    }

    /// With `mask` as the guest-writable bits of the body (one byte of mask
    /// per byte of body).
    pub fn with_writable(mut self, mask: Vec<u8>) -> Self {
        self.writable = RVec::from(mask);
        self
    }
}

impl DeviceDesc {
    /// A function with `identity`, no BAR, no capability and no MSI.
    ///
    /// ```
    /// use plugin_api::{BarDesc, DeviceDesc, PciIdentity};
    ///
    /// let desc = DeviceDesc::new(PciIdentity::new(0x1234, 0x11e9, 0x00ff00).with_intx())
    ///     .with_bar(BarDesc::mmio32(0, 0x1000))
    ///     .with_bar(BarDesc::io(1, 0x20));
    /// assert_eq!(desc.bars.len(), 2);
    /// ```
    pub fn new(identity: PciIdentity) -> Self {
        DeviceDesc {
            identity,
            bars: RVec::new(),
            capabilities: RVec::new(),
            msi_vectors: 0,
        }
    }

    /// With one more BAR.
    pub fn with_bar(mut self, bar: BarDesc) -> Self {
        self.bars.push(bar);
        self
    }

    /// With these BARs added.
    pub fn with_bars(mut self, bars: impl IntoIterator<Item = BarDesc>) -> Self {
        self.bars.extend(bars);
        self
    }

    /// With `vectors` MSI-X vectors (1 to 2048). The host adds the MSI-X
    /// capability after the device's own, and the table and pending-bit
    /// array in the first BAR index the device leaves free (32-bit
    /// memory); it emulates both as the PCI specification says (masking,
    /// pending bits), so the device never sees those accesses. The device
    /// raises vector `n` with [`Host::msix_notify`](crate::Host::msix_notify);
    /// while the guest has not enabled MSI-X it keeps using INTx. A host
    /// that predates MSI-X ignores this (no capability: the guest uses
    /// INTx).
    pub fn with_msix(mut self, vectors: u16) -> Self {
        self.msi_vectors = vectors;
        self
    }

    /// With an MSI capability asking for `vectors` vectors (1, 2, 4, 8,
    /// 16 or 32), after the device's own capabilities: 64-bit addresses
    /// and per-vector masking. The host emulates what the guest programs
    /// in it (address, data, masks, pending bits) and routes each vector,
    /// so the device only raises vector numbers, with
    /// [`Host::msi_notify`](crate::Host::msi_notify). While the guest has
    /// not enabled MSI (or MSI-X) the device's INTx is the interrupt:
    /// a device may raise both, and the host drops whichever the guest
    /// does not use. A host that predates MSI (plugin-api before 0.1.4)
    /// shows the capability read-only, so the guest cannot enable it and
    /// keeps using INTx.
    ///
    /// ```
    /// use plugin_api::{DeviceDesc, PciIdentity};
    ///
    /// let desc = DeviceDesc::new(PciIdentity::new(0x1234, 0x11e9, 0x00ff00).with_intx())
    ///     .with_msi(4);
    /// assert_eq!(desc.capabilities[0].id, 0x05);
    /// ```
    pub fn with_msi(mut self, vectors: u8) -> Self {
        let (body, _) = pci::msi::body(vectors);
        self.capabilities
            .push(CapabilityDesc::new(pci::msi::CAP_ID_MSI, body));
        self
    }

    /// With one more capability (placed by the host in the order given).
    pub fn with_capability(mut self, capability: CapabilityDesc) -> Self {
        self.capabilities.push(capability);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builders_fill_the_abi_types() {
        let d = DeviceDesc::new(
            PciIdentity::new(0x1000, 0x0012, 0x010000)
                .with_intx()
                .with_subsystem(0x1000, 0x1000),
        )
        .with_bars([BarDesc::io(0, 256), BarDesc::mmio32(1, 1024)])
        .with_bar(BarDesc::mmio64(2, 1 << 20).prefetchable())
        .with_capability(CapabilityDesc::new(1, vec![2, 0, 0, 0, 0, 0]).with_writable(vec![0; 6]));
        assert_eq!(d.identity.interrupt_pin, 1);
        assert_eq!(d.identity.subsystem_id, 0x1000);
        assert_eq!(
            d.bars.as_slice(),
            &[
                BarDesc {
                    index: 0,
                    kind: BarKind::Io,
                    size: 256,
                    prefetchable: false
                },
                BarDesc {
                    index: 1,
                    kind: BarKind::Memory32,
                    size: 1024,
                    prefetchable: false
                },
                BarDesc {
                    index: 2,
                    kind: BarKind::Memory64,
                    size: 1 << 20,
                    prefetchable: true
                },
            ]
        );
        assert_eq!(d.capabilities[0].body.len(), 6);
        assert_eq!(d.msi_vectors, 0);
    }
}
