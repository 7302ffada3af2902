//! A type-0 PCI configuration space: identity, BARs, capabilities and the
//! masks that decide which bits the guest may change.
//!
//! The model keeps the 256 bytes as the guest sees them plus a write mask
//! and a write-one-to-clear mask per byte. BAR sizing works the way hardware
//! does: the address bits below the BAR's size are read-only zero, so a
//! guest that writes all-ones reads back the size mask.

use crate::{command, regs, status};

/// Size of the conventional configuration space.
pub const CONFIG_SPACE_SIZE: usize = 256;

/// Vendor/device identity of a function.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Identity {
    pub vendor_id: u16,
    pub device_id: u16,
    /// Class code as `class << 16 | subclass << 8 | prog_if`.
    pub class_code: u32,
    pub revision: u8,
    pub subsystem_vendor_id: u16,
    pub subsystem_id: u16,
    /// 0 = no interrupt, 1..=4 = INTA#..INTD#.
    pub interrupt_pin: u8,
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarType {
    Io,
    Memory32,
    /// Takes this BAR slot and the next one.
    Memory64,
}

/// Description of one BAR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    pub bar_type: BarType,
    /// Size in bytes; a power of two (at least 4 for I/O, 16 for memory).
    pub size: u64,
    pub prefetchable: bool,
}

/// Errors while describing a function (not guest-triggerable).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LayoutError {
    /// BAR index is out of range or overlaps another BAR
    #[error("BAR {0} is out of range or already used")]
    BarSlot(usize),
    /// BAR size is not a power of two or too small for its type
    #[error("BAR {index} size {size:#x} is not a valid power of two for its type")]
    BarSize { index: usize, size: u64 },
    /// No room left for a capability
    #[error("no room for a capability of {0} bytes")]
    CapabilitySpace(usize),
}

/// Where a BAR currently sits in guest address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarAddress {
    pub index: usize,
    pub spec: BarSpec,
    pub base: u64,
}

/// A guest-physical access that a function's BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarRegion {
    pub index: usize,
    pub offset: u64,
}

/// What a configuration write changed, so owners can update their maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigWriteEffect {
    /// Bit `i` set: BAR `i` was written (its address may have moved).
    pub bars_written: u8,
    /// The command register changed (decode or bus mastering toggled).
    pub command_changed: bool,
}

/// One function's configuration space.
#[derive(Clone)]
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SPACE_SIZE],
    write_mask: [u8; CONFIG_SPACE_SIZE],
    w1c_mask: [u8; CONFIG_SPACE_SIZE],
    bars: [Option<BarSpec>; 6],
    /// Offset of the last capability header, for chaining.
    last_capability: Option<usize>,
    next_capability: usize,
    /// Ranges `[start, end)` that capabilities occupy.
    capability_ranges: Vec<(usize, usize)>,
}

impl std::fmt::Debug for ConfigSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConfigSpace")
            .field("vendor_id", &self.read16(regs::VENDOR_ID))
            .field("device_id", &self.read16(regs::DEVICE_ID))
            .field("bars", &self.bars)
            .finish()
    }
}

impl ConfigSpace {
    /// A header with `identity`, no BARs and no capabilities.
    pub fn new(identity: Identity) -> Self {
        let mut cs = ConfigSpace {
            bytes: [0; CONFIG_SPACE_SIZE],
            write_mask: [0; CONFIG_SPACE_SIZE],
            w1c_mask: [0; CONFIG_SPACE_SIZE],
            bars: [None; 6],
            last_capability: None,
            next_capability: regs::FIRST_CAPABILITY,
            capability_ranges: Vec::new(),
        };
        cs.set16(regs::VENDOR_ID, identity.vendor_id);
        cs.set16(regs::DEVICE_ID, identity.device_id);
        cs.bytes[regs::REVISION_ID] = identity.revision;
        cs.bytes[regs::CLASS_CODE] = identity.class_code as u8;
        cs.bytes[regs::CLASS_CODE + 1] = (identity.class_code >> 8) as u8;
        cs.bytes[regs::CLASS_CODE + 2] = (identity.class_code >> 16) as u8;
        cs.set16(regs::SUBSYSTEM_VENDOR_ID, identity.subsystem_vendor_id);
        cs.set16(regs::SUBSYSTEM_ID, identity.subsystem_id);
        cs.bytes[regs::INTERRUPT_PIN] = identity.interrupt_pin;

        let cmd_mask = command::IO_SPACE
            | command::MEMORY_SPACE
            | command::BUS_MASTER
            | command::PARITY_ERROR_RESPONSE
            | command::SERR
            | command::INTX_DISABLE;
        cs.mask16(regs::COMMAND, cmd_mask);
        cs.w1c_mask[regs::STATUS] = status::WRITE_ONE_TO_CLEAR as u8;
        cs.w1c_mask[regs::STATUS + 1] = (status::WRITE_ONE_TO_CLEAR >> 8) as u8;
        cs.write_mask[regs::CACHE_LINE_SIZE] = 0xff;
        cs.write_mask[regs::LATENCY_TIMER] = 0xff;
        cs.write_mask[regs::INTERRUPT_LINE] = 0xff;
        cs
    }

    /// The identity this space was built with (as the guest reads it now).
    pub fn identity(&self) -> Identity {
        Identity {
            vendor_id: self.read16(regs::VENDOR_ID),
            device_id: self.read16(regs::DEVICE_ID),
            class_code: u32::from(self.bytes[regs::CLASS_CODE])
                | u32::from(self.bytes[regs::CLASS_CODE + 1]) << 8
                | u32::from(self.bytes[regs::CLASS_CODE + 2]) << 16,
            revision: self.bytes[regs::REVISION_ID],
            subsystem_vendor_id: self.read16(regs::SUBSYSTEM_VENDOR_ID),
            subsystem_id: self.read16(regs::SUBSYSTEM_ID),
            interrupt_pin: self.bytes[regs::INTERRUPT_PIN],
        }
    }

    /// Sets a byte the guest cannot write (latency timer default, etc.).
    pub fn set_initial_byte(&mut self, offset: usize, value: u8) {
        if let Some(b) = self.bytes.get_mut(offset) {
            *b = value;
        }
    }

    /// Declares BAR `index`.
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Result<(), LayoutError> {
        let slots = if spec.bar_type == BarType::Memory64 {
            2
        } else {
            1
        };
        if index + slots > 6 || (0..slots).any(|i| self.bar_slot_used(index + i)) {
            return Err(LayoutError::BarSlot(index));
        }
        let min = if spec.bar_type == BarType::Io { 4 } else { 16 };
        if !spec.size.is_power_of_two() || spec.size < min {
            return Err(LayoutError::BarSize {
                index,
                size: spec.size,
            });
        }
        if spec.bar_type == BarType::Io && spec.size > 256 {
            return Err(LayoutError::BarSize {
                index,
                size: spec.size,
            });
        }
        let off = regs::BAR0 + index * 4;
        let low_flags: u32 = match spec.bar_type {
            BarType::Io => 0x1,
            BarType::Memory32 => u32::from(spec.prefetchable) << 3,
            BarType::Memory64 => 0x4 | u32::from(spec.prefetchable) << 3,
        };
        let flag_bits: u64 = if spec.bar_type == BarType::Io {
            0x3
        } else {
            0xf
        };
        let mask = !(spec.size - 1) & !flag_bits;
        self.set32(off, low_flags);
        self.mask32(off, mask as u32);
        if spec.bar_type == BarType::Memory64 {
            self.set32(off + 4, 0);
            self.mask32(off + 4, (mask >> 32) as u32);
        }
        self.bars[index] = Some(spec);
        Ok(())
    }

    fn bar_slot_used(&self, slot: usize) -> bool {
        if self.bars[slot].is_some() {
            return true;
        }
        slot > 0 && matches!(self.bars[slot - 1], Some(s) if s.bar_type == BarType::Memory64)
    }

    /// Appends a capability with `id`; `body` is what follows the two-byte
    /// header, `writable` (same length or empty) the guest-writable bits.
    /// Returns the capability's offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, LayoutError> {
        let len = (2 + body.len()).next_multiple_of(4);
        let start = self.next_capability;
        if start + len > CONFIG_SPACE_SIZE {
            return Err(LayoutError::CapabilitySpace(len));
        }
        self.bytes[start] = id;
        self.bytes[start + 1] = 0;
        for (i, b) in body.iter().enumerate() {
            self.bytes[start + 2 + i] = *b;
            self.write_mask[start + 2 + i] = writable.get(i).copied().unwrap_or(0);
        }
        match self.last_capability {
            Some(prev) => self.bytes[prev + 1] = start as u8,
            None => {
                self.bytes[regs::CAPABILITIES_POINTER] = start as u8;
                let st = self.read16(regs::STATUS) | status::CAPABILITIES_LIST;
                self.set16(regs::STATUS, st);
            }
        }
        self.last_capability = Some(start);
        self.next_capability = start + len;
        self.capability_ranges.push((start, start + len));
        Ok(start)
    }

    /// Whether `offset` lies in the standard header or a capability, i.e.
    /// this model answers for it; other offsets belong to the device.
    pub fn is_modelled(&self, offset: usize) -> bool {
        offset < regs::FIRST_CAPABILITY
            || self
                .capability_ranges
                .iter()
                .any(|&(s, e)| offset >= s && offset < e)
    }

    /// Reads `data.len()` bytes at `offset`; bytes past the end read as 0xff.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.bytes.get(offset + i).copied().unwrap_or(0xff);
        }
    }

    /// Reads an aligned little-endian value of `len` (1, 2 or 4) bytes.
    pub fn read_value(&self, offset: usize, len: usize) -> u32 {
        let mut buf = [0u8; 4];
        let len = len.min(4);
        self.read(offset, &mut buf[..len]);
        u32::from_le_bytes(buf)
    }

    /// Applies a guest write through the masks. Bytes past the end are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) -> ConfigWriteEffect {
        let mut effect = ConfigWriteEffect::default();
        let old_command = self.read16(regs::COMMAND);
        for (i, &value) in data.iter().enumerate() {
            let off = offset + i;
            if off >= CONFIG_SPACE_SIZE {
                break;
            }
            let wm = self.write_mask[off];
            let w1c = self.w1c_mask[off];
            let cur = self.bytes[off];
            self.bytes[off] = (cur & !wm & !(value & w1c)) | (value & wm);
            if (regs::BAR0..regs::BAR0 + 24).contains(&off) {
                effect.bars_written |= 1 << ((off - regs::BAR0) / 4);
            }
        }
        // A write to the upper half of a 64-bit BAR moves the BAR that owns it.
        for i in 1..6 {
            if effect.bars_written & (1 << i) != 0
                && matches!(self.bars[i - 1], Some(s) if s.bar_type == BarType::Memory64)
            {
                effect.bars_written |= 1 << (i - 1);
            }
        }
        effect.command_changed = self.read16(regs::COMMAND) != old_command;
        effect
    }

    /// Writes an aligned little-endian value of `len` (1, 2 or 4) bytes.
    pub fn write_value(&mut self, offset: usize, len: usize, value: u32) -> ConfigWriteEffect {
        let bytes = value.to_le_bytes();
        self.write(offset, &bytes[..len.min(4)])
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.read16(regs::COMMAND)
    }

    /// Sets or clears the status register's interrupt bit (INTx state).
    pub fn set_interrupt_status(&mut self, asserted: bool) {
        let mut st = self.read16(regs::STATUS);
        if asserted {
            st |= status::INTERRUPT;
        } else {
            st &= !status::INTERRUPT;
        }
        self.set16(regs::STATUS, st);
    }

    /// The declared BARs.
    pub fn bar_specs(&self) -> impl Iterator<Item = (usize, BarSpec)> + '_ {
        self.bars
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.map(|s| (i, s)))
    }

    /// The BAR spec at `index`, if declared.
    pub fn bar_spec(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// The address the guest programmed into BAR `index` (decode enabled or not).
    pub fn bar_base(&self, index: usize) -> Option<u64> {
        let spec = self.bar_spec(index)?;
        let off = regs::BAR0 + index * 4;
        let low = u64::from(self.read32(off));
        Some(match spec.bar_type {
            BarType::Io => low & !0x3,
            BarType::Memory32 => low & !0xf,
            BarType::Memory64 => (u64::from(self.read32(off + 4)) << 32) | (low & !0xf),
        })
    }

    /// BARs whose decoding is enabled by the command register and whose
    /// base is non-zero, with their current addresses.
    pub fn active_bars(&self) -> Vec<BarAddress> {
        let cmd = self.command();
        self.bar_specs()
            .filter_map(|(index, spec)| {
                let enabled = match spec.bar_type {
                    BarType::Io => cmd & command::IO_SPACE != 0,
                    _ => cmd & command::MEMORY_SPACE != 0,
                };
                let base = self.bar_base(index)?;
                (enabled && base != 0).then_some(BarAddress { index, spec, base })
            })
            .collect()
    }

    /// Which BAR decodes the access `[addr, addr + len)` in I/O (`io`) or
    /// memory space, if any. The access must lie wholly inside the BAR.
    pub fn decode(&self, io: bool, addr: u64, len: u64) -> Option<BarRegion> {
        self.active_bars().into_iter().find_map(|b| {
            if (b.spec.bar_type == BarType::Io) != io {
                return None;
            }
            let offset = addr.checked_sub(b.base)?;
            let end = offset.checked_add(len)?;
            (end <= b.spec.size).then_some(BarRegion {
                index: b.index,
                offset,
            })
        })
    }

    /// Restores the power-on state of the guest-writable registers.
    pub fn reset(&mut self) {
        let mut fresh = self.clone();
        for off in 0..CONFIG_SPACE_SIZE {
            // Writable bits go back to zero; read-only bits (identity, BAR
            // flags, capability bodies) keep their values.
            fresh.bytes[off] &= !self.write_mask[off];
        }
        let st = fresh.read16(regs::STATUS) & !status::WRITE_ONE_TO_CLEAR & !status::INTERRUPT;
        fresh.set16(regs::STATUS, st);
        *self = fresh;
    }

    fn read16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }
    fn read32(&self, off: usize) -> u32 {
        u32::from_le_bytes([
            self.bytes[off],
            self.bytes[off + 1],
            self.bytes[off + 2],
            self.bytes[off + 3],
        ])
    }
    fn set16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn set32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }
    fn mask16(&mut self, off: usize, m: u16) {
        self.write_mask[off..off + 2].copy_from_slice(&m.to_le_bytes());
    }
    fn mask32(&mut self, off: usize, m: u32) {
        self.write_mask[off..off + 4].copy_from_slice(&m.to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lsi_like() -> ConfigSpace {
        let mut cs = ConfigSpace::new(Identity {
            vendor_id: 0x1000,
            device_id: 0x0012,
            class_code: 0x010000,
            subsystem_vendor_id: 0x1000,
            subsystem_id: 0x1000,
            interrupt_pin: 1,
            ..Default::default()
        });
        let io = BarSpec {
            bar_type: BarType::Io,
            size: 256,
            prefetchable: false,
        };
        let mem = BarSpec {
            bar_type: BarType::Memory32,
            size: 0x400,
            prefetchable: false,
        };
        cs.add_bar(0, io).unwrap();
        cs.add_bar(1, mem).unwrap();
        cs
    }

    #[test]
    fn identity_reads_back() {
        let cs = lsi_like();
        assert_eq!(cs.read_value(0, 4), 0x0012_1000);
        assert_eq!(cs.read_value(0x08, 4), 0x0100_0000);
        assert_eq!(cs.read_value(0x2c, 4), 0x1000_1000);
        assert_eq!(cs.read_value(0x3d, 1), 1);
        assert_eq!(cs.identity().device_id, 0x12);
    }

    #[test]
    fn bar_sizing_returns_size_mask_and_flags() {
        let mut cs = lsi_like();
        cs.write_value(0x10, 4, 0xffff_ffff);
        assert_eq!(cs.read_value(0x10, 4), 0xffff_ff01, "I/O BAR of 256 bytes");
        cs.write_value(0x14, 4, 0xffff_ffff);
        assert_eq!(cs.read_value(0x14, 4), 0xffff_fc00, "memory BAR of 1 KiB");
        cs.write_value(0x18, 4, 0xffff_ffff);
        assert_eq!(cs.read_value(0x18, 4), 0, "unused BAR stays zero");
    }

    #[test]
    fn sixty_four_bit_bar_upper_half_is_writable_and_moves_bar() {
        let mut cs = ConfigSpace::new(Identity::default());
        let spec = BarSpec {
            bar_type: BarType::Memory64,
            size: 0x1000,
            prefetchable: true,
        };
        cs.add_bar(2, spec).unwrap();
        assert_eq!(cs.add_bar(3, spec), Err(LayoutError::BarSlot(3)));
        let eff = cs.write_value(0x1c, 4, 0x1);
        assert_eq!(eff.bars_written & 0b1100, 0b1100);
        cs.write_value(0x18, 4, 0xfe00_0000);
        cs.write_value(0x04, 2, u32::from(command::MEMORY_SPACE));
        assert_eq!(cs.bar_base(2), Some(0x1_fe00_0000));
        assert_eq!(cs.read_value(0x18, 4) & 0xf, 0xc);
        assert_eq!(
            cs.decode(false, 0x1_fe00_0010, 4),
            Some(BarRegion {
                index: 2,
                offset: 0x10
            })
        );
    }

    #[test]
    fn decode_requires_enable_and_whole_access_inside() {
        let mut cs = lsi_like();
        cs.write_value(0x14, 4, 0xfebf_0000);
        assert_eq!(cs.decode(false, 0xfebf_0000, 1), None, "memory decode off");
        let eff = cs.write_value(0x04, 2, u32::from(command::MEMORY_SPACE));
        assert!(eff.command_changed);
        assert_eq!(
            cs.decode(false, 0xfebf_03fc, 4).map(|r| r.offset),
            Some(0x3fc)
        );
        assert_eq!(cs.decode(false, 0xfebf_03fe, 4), None, "straddles the end");
        assert_eq!(cs.decode(true, 0xfebf_0000, 1), None, "wrong space");
    }

    #[test]
    fn read_only_and_w1c_bits() {
        let mut cs = lsi_like();
        cs.write_value(0x00, 4, 0xdead_beef);
        assert_eq!(cs.read_value(0, 4), 0x0012_1000, "identity is read-only");
        cs.bytes[0x07] = 0x80; // a device-set error bit (detected parity)
        cs.write_value(0x06, 2, 0x8000);
        assert_eq!(cs.read_value(0x06, 2) & 0x8000, 0, "write one clears");
    }

    #[test]
    fn capabilities_chain_and_are_modelled() {
        let mut cs = lsi_like();
        let a = cs
            .add_capability(0x01, &[0x03, 0x00, 0, 0, 0, 0], &[])
            .unwrap();
        let b = cs.add_capability(0x09, &[0xaa], &[0xff]).unwrap();
        assert_eq!(cs.read_value(0x34, 1) as usize, a);
        assert_eq!(cs.read_value(a + 1, 1) as usize, b);
        assert_ne!(cs.read_value(0x06, 2) as u16 & status::CAPABILITIES_LIST, 0);
        cs.write_value(b + 2, 1, 0x55);
        assert_eq!(cs.read_value(b + 2, 1), 0x55);
        assert!(cs.is_modelled(a) && cs.is_modelled(b + 2));
        assert!(!cs.is_modelled(0xc0));
    }

    #[test]
    fn out_of_range_access_is_harmless() {
        let mut cs = lsi_like();
        let mut buf = [0u8; 4];
        cs.read(0xfe, &mut buf);
        assert_eq!(buf, [0, 0, 0xff, 0xff]);
        cs.write(0xff, &[1, 2, 3, 4]);
    }

    #[test]
    fn reset_clears_writable_state() {
        let mut cs = lsi_like();
        cs.write_value(0x14, 4, 0xfebf_0000);
        cs.write_value(0x04, 2, 0x7);
        cs.reset();
        assert_eq!(cs.command(), 0);
        assert_eq!(cs.bar_base(1), Some(0));
        assert_eq!(cs.read_value(0x10, 4), 1, "I/O flag survives reset");
    }
}
