//! Intel MultiProcessor Specification 1.4 table, so that Linux finds the
//! CPUs, the IOAPIC and the PCI INTx routing without a BIOS or ACPI.
//!
//! Like crosvm's `mptable.rs`: bus 0 is PCI, bus 1 is ISA; ISA IRQs 0-15
//! go to the same IOAPIC pins; each PCI function's INTx has an interrupt
//! source entry (`srcbusirq = slot << 2 | (pin - 1)`) on a level-triggered,
//! active-high IOAPIC pin.

use anyhow::{bail, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::EBDA_START;

/// Where the floating pointer and the table go (the last KiB of base memory,
/// which Linux scans).
pub const MPTABLE_START: u64 = EBDA_START;
/// Local APIC base.
pub const APIC_DEFAULT_BASE: u32 = 0xfee0_0000;
/// IOAPIC base.
pub const IOAPIC_DEFAULT_BASE: u32 = 0xfec0_0000;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const BUS_PCI: u8 = 0;
const BUS_ISA: u8 = 1;
/// Active high, level triggered.
const IRQFLAG_LEVEL_HIGH: u16 = 0b1101;

/// One PCI INTx route: device `slot`, pin 1..=4 (INTA..INTD), IOAPIC pin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIrq {
    pub slot: u8,
    pub pin: u8,
    pub gsi: u8,
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_sub(*b))
}

/// Builds the floating pointer and the configuration table, to be placed at
/// `base`.
pub fn build(base: u64, vcpus: u8, pci_irqs: &[PciIrq]) -> Result<Vec<u8>> {
    if vcpus == 0 || vcpus > 254 {
        bail!("MP table: {vcpus} CPUs is out of range");
    }
    let table_addr = base + 16;
    let ioapic_id = vcpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..vcpus {
        entries.extend_from_slice(&[0, cpu, APIC_VERSION, 1 | if cpu == 0 { 2 } else { 0 }]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // FPU + APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    for (id, name) in [(BUS_PCI, b"PCI   "), (BUS_ISA, b"ISA   ")] {
        entries.extend_from_slice(&[1, id]);
        entries.extend_from_slice(name);
        count += 1;
    }
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    count += 1;
    for irq in 0..16u8 {
        entries.extend_from_slice(&[3, 0]);
        entries.extend_from_slice(&0u16.to_le_bytes());
        entries.extend_from_slice(&[BUS_ISA, irq, ioapic_id, irq]);
        count += 1;
    }
    for p in pci_irqs {
        if !(1..=4).contains(&p.pin) || p.slot > 31 {
            bail!("MP table: bad PCI INTx route {p:?}");
        }
        entries.extend_from_slice(&[3, 0]);
        entries.extend_from_slice(&IRQFLAG_LEVEL_HIGH.to_le_bytes());
        entries.extend_from_slice(&[BUS_PCI, (p.slot << 2) | (p.pin - 1), ioapic_id, p.gsi]);
        count += 1;
    }
    // LINT0: ExtINT (the PIC), LINT1: NMI.
    entries.extend_from_slice(&[4, 3, 0, 0, BUS_ISA, 0, 0, 0]);
    entries.extend_from_slice(&[4, 1, 0, 0, BUS_ISA, 0, 0xff, 1]);
    count += 2;

    let mut table: Vec<u8> = Vec::new();
    table.extend_from_slice(b"PCMP");
    let len = u16::try_from(44 + entries.len())?;
    table.extend_from_slice(&len.to_le_bytes());
    table.push(4); // spec rev 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"RUSTVMM ");
    table.extend_from_slice(b"HOST-VMM    ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_DEFAULT_BASE.to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended length + checksum + reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut fp: Vec<u8> = Vec::new();
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&u32::try_from(table_addr)?.to_le_bytes());
    fp.extend_from_slice(&[1, 4, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);

    let mut out = fp;
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table into guest memory at [`MPTABLE_START`].
pub fn setup(mem: &GuestMemoryMmap, vcpus: u8, pci_irqs: &[PciIrq]) -> Result<()> {
    let bytes = build(MPTABLE_START, vcpus, pci_irqs)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_are_zero_and_counts_match() {
        let irqs = [PciIrq {
            slot: 4,
            pin: 1,
            gsi: 16,
        }];
        let b = build(MPTABLE_START, 2, &irqs).unwrap();
        assert_eq!(&b[0..4], b"_MP_");
        assert_eq!(b[..16].iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let t = &b[16..];
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(t.len(), len);
        assert_eq!(t.iter().fold(0u8, |a, x| a.wrapping_add(*x)), 0);
        let count = u16::from_le_bytes([t[34], t[35]]);
        // 2 CPUs + 2 buses + IOAPIC + 16 ISA + 1 PCI + 2 local.
        assert_eq!(count, 24);
        assert_eq!(len, 44 + 2 * 20 + 22 * 8);
    }
}
