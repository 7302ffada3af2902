//! The ACPI tables the guest finds at boot, built with rust-vmm's
//! `acpi_tables` (tables and AML): RSDP, XSDT, FADT (+ FACS), MADT and a
//! DSDT with the PCI root bridge (its windows and `_PRT`), `\_S5_` and
//! the pvpanic device.
//!
//! Where they live: the reserved hole under 1 MiB ([`TABLES_START`]),
//! beside the MP table; the zero page points at the RSDP
//! (`acpi_rsdp_addr`), and the RSDP also sits where a legacy scan looks.

use acpi_tables::aml::{
    self, AddressSpace, AddressSpaceCacheable, And, Arg, Device, EISAName, Field, FieldAccessType,
    FieldEntry, FieldLockRule, FieldUpdateRule, If, Local, Method, MethodCall, Name, Notify,
    OpRegion, OpRegionSpace, Package, Path, ResourceTemplate, Scope, ShiftLeft, Store, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags, PmProfile};
use acpi_tables::gas::{AccessSize, AddressSpace as GasSpace, GAS};
use acpi_tables::sdt::Sdt;
use acpi_tables::{facs::FACS, rsdp::Rsdp, xsdt::XSDT, Aml};
use anyhow::{ensure, Context, Result};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::{
    GPE0_BLK, PCI_HOTPLUG, PM1A_CNT, PM1A_EVT, PM_TMR, PVPANIC_PORT, RESET_PORT, RESET_VALUE,
    S5_SLP_TYP, SCI_GSI,
};
use crate::memory::{PCI_MMIO_END, PCI_MMIO_START};
use crate::mptable::{PciIrq, APIC_DEFAULT_BASE, IOAPIC_DEFAULT_BASE};

/// First byte of the tables (16-byte aligned, in the BIOS area a legacy
/// RSDP scan covers, reserved in the e820 map).
pub const TABLES_START: u64 = 0xe_0000;
/// The tables must end before this (the top of the BIOS area).
const TABLES_END: u64 = 0x10_0000;

const OEM_ID: [u8; 6] = *b"HOSTVM";
const OEM_REVISION: u32 = 1;

fn table_id(name: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"HOST    ";
    id[4..].copy_from_slice(name);
    id
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn io_gas(width_bits: u8, port: u16) -> GAS {
    let size = match width_bits {
        8 => AccessSize::ByteAccess,
        16 => AccessSize::WordAccess,
        _ => AccessSize::DwordAccess,
    };
    GAS::new(GasSpace::SystemIo, width_bits, 0, size, u64::from(port))
}

/// FADT: full (not hardware-reduced) ACPI with PM1a event and control
/// blocks, a 32-bit PM timer, the reset register, the fixed power button
/// and an always-enabled SCI (no SMI command port: nothing to switch).
fn fadt(dsdt: u64, facs: u64) -> Vec<u8> {
    let mut f = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt)
        .firmware_ctrl_64(facs)
        .preferred_pm_profile(PmProfile::EnterpriseServer)
        .flag(Flags::Wbinvd)
        .flag(Flags::ProcC1)
        .flag(Flags::SlpButton) // no sleep button (the flag says "absent")
        .flag(Flags::TmrValExt)
        .flag(Flags::ResetRegSup)
        .flag(Flags::Headless);
    f.sci_int = (SCI_GSI as u16).into();
    f.pm1a_evt_blk = u32::from(PM1A_EVT).into();
    f.pm1a_cnt_blk = u32::from(PM1A_CNT).into();
    f.pm_tmr_blk = u32::from(PM_TMR).into();
    f.pm1_evt_len = 4;
    f.pm1_cnt_len = 2;
    f.pm_tmr_len = 4;
    f.gpe0_blk = u32::from(GPE0_BLK).into();
    f.gpe0_blk_len = 4;
    f.x_gpe0_blk = io_gas(32, GPE0_BLK);
    f.x_pm1a_evt_blk = io_gas(32, PM1A_EVT);
    f.x_pm1a_cnt_blk = io_gas(16, PM1A_CNT);
    f.x_pm_tmr_blk = io_gas(32, PM_TMR);
    f.reset_reg = io_gas(8, RESET_PORT);
    f.reset_value = RESET_VALUE;
    // IA-PC boot architecture: no VGA, no MSI disabled, no ASPM; the
    // 8042 is there (bit 1).
    f.iapc_boot_arch = (1u16 << 1 | 1 << 2).into();
    bytes(&f.finalize())
}

/// MADT: the local APICs, the IOAPIC, and the two interrupt source
/// overrides this machine has: none for the PIT (KVM's default routing
/// sends GSI 0 to IOAPIC pin 0), the SCI level-triggered, active high.
fn madt(vcpus: u8) -> Vec<u8> {
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, table_id(b"APIC"), OEM_REVISION);
    t.write_u32(36, APIC_DEFAULT_BASE);
    t.write_u32(40, 1); // PCAT_COMPAT: the 8259s are there
    for id in 0..vcpus {
        // Processor local APIC: type 0, length 8, uid, APIC id, enabled.
        t.append_slice(&[0, 8, id, id, 1, 0, 0, 0]);
    }
    // I/O APIC: type 1, length 12, id, reserved, address, GSI base 0.
    let mut ioapic = vec![1, 12, vcpus, 0];
    ioapic.extend_from_slice(&IOAPIC_DEFAULT_BASE.to_le_bytes());
    ioapic.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&ioapic);
    // Interrupt source override: type 2, length 10, bus 0 (ISA), source
    // IRQ, GSI, flags (active high 0b01, level 0b11 << 2).
    let mut sci = vec![2, 10, 0, SCI_GSI as u8];
    sci.extend_from_slice(&SCI_GSI.to_le_bytes());
    sci.extend_from_slice(&0x000du16.to_le_bytes());
    t.append_slice(&sci);
    // Local APIC NMI for every processor (0xff) on LINT1: type 4.
    t.append_slice(&[4, 6, 0xff, 0x05, 0x00, 1]);
    t.update_checksum();
    t.as_slice().to_vec()
}

/// The hotplug part of the PCI root (QEMU PIIX4's ACPI PCI hotplug): the
/// PCIU/PCID/B0EJ registers, a device with `_EJ0` for every slot, and
/// `PCNT`, which `\_GPE._E01` runs: Notify(Sxx, 1) (check) for each slot
/// in PCIU, Notify(Sxx, 3) (eject request) for each slot in PCID.
fn pci_hotplug_aml() -> Vec<u8> {
    let mut out = Vec::new();
    let (pcst_at, pcst_len) = (PCI_HOTPLUG, 8u8);
    let pcst = OpRegion::new("PCST".into(), OpRegionSpace::SystemIO, &pcst_at, &pcst_len);
    let pcst_fields = Field::new(
        "PCST".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![
            FieldEntry::Named(*b"PCIU", 32),
            FieldEntry::Named(*b"PCID", 32),
        ],
    );
    let (sej_at, sej_len) = (PCI_HOTPLUG + 8, 4u8);
    let sej = OpRegion::new("SEJ_".into(), OpRegionSpace::SystemIO, &sej_at, &sej_len);
    let sej_fields = Field::new(
        "SEJ_".into(),
        FieldAccessType::DWord,
        FieldLockRule::NoLock,
        FieldUpdateRule::WriteAsZeroes,
        vec![FieldEntry::Named(*b"B0EJ", 32)],
    );
    // PCEJ(slot): B0EJ = 1 << slot.
    let b0ej = Path::new("B0EJ");
    let shift = ShiftLeft::new(&b0ej, &aml::ONE, &Arg(0));
    let pcej = Method::new("PCEJ".into(), 1, false, vec![&shift]);
    for part in [&pcst as &dyn Aml, &pcst_fields, &sej, &sej_fields, &pcej] {
        part.to_aml_bytes(&mut out);
    }

    let slots: Vec<u8> = (1..=31).collect();
    let names: Vec<String> = slots.iter().map(|s| format!("S{s:02X}_")).collect();
    for (slot, name) in slots.iter().zip(&names) {
        let adr = Name::new("_ADR".into(), &(u32::from(*slot) << 16));
        let sun = Name::new("_SUN".into(), slot);
        let call = MethodCall::new("PCEJ".into(), vec![slot]);
        let ej0 = Method::new("_EJ0".into(), 1, false, vec![&call]);
        Device::new(name.as_str().into(), vec![&adr, &sun, &ej0]).to_aml_bytes(&mut out);
    }

    // PCNT: Local0 = PCIU, Local1 = PCID, then one If per slot and kind.
    let (l0, l1) = (Local(0), Local(1));
    let pciu = Path::new("PCIU");
    let pcid = Path::new("PCID");
    let load_up = Store::new(&l0, &pciu);
    let load_down = Store::new(&l1, &pcid);
    let masks: Vec<u32> = slots.iter().map(|s| 1u32 << s).collect();
    let paths: Vec<Path> = names.iter().map(|n| Path::new(n)).collect();
    let (check, eject) = (1u8, 3u8);
    let checks: Vec<Notify> = paths.iter().map(|p| Notify::new(p, &check)).collect();
    let ejects: Vec<Notify> = paths.iter().map(|p| Notify::new(p, &eject)).collect();
    let up_tests: Vec<And> = masks.iter().map(|m| And::new(&aml::ZERO, &l0, m)).collect();
    let down_tests: Vec<And> = masks.iter().map(|m| And::new(&aml::ZERO, &l1, m)).collect();
    let mut ifs: Vec<If> = Vec::new();
    for i in 0..slots.len() {
        ifs.push(If::new(&up_tests[i], vec![&checks[i]]));
        ifs.push(If::new(&down_tests[i], vec![&ejects[i]]));
    }
    let mut body: Vec<&dyn Aml> = vec![&load_up, &load_down];
    body.extend(ifs.iter().map(|i| i as &dyn Aml));
    Method::new("PCNT".into(), 0, true, body).to_aml_bytes(&mut out);
    out
}

/// Raw AML bytes as an object (for parts built apart).
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// DSDT: `\_S5_` (the S5 sleep type the PM1 control register takes), the
/// PCI root bridge with the windows the VMM places BARs in, an interrupt
/// route for every pin of every slot (the GSI the VMM wires that slot to,
/// whatever the pin) and ACPI PCI hotplug, `\_GPE._E01` for hotplug
/// events, and the pvpanic device.
fn dsdt(pci_irqs: &[PciIrq]) -> Vec<u8> {
    let s5 = Name::new(
        "_S5_".into(),
        &Package::new(vec![&S5_SLP_TYP, &S5_SLP_TYP, &aml::ZERO, &aml::ZERO]),
    );

    // _PRT: Package { address (slot << 16 | 0xffff), pin (0 = INTA),
    // source (0: a GSI), GSI }.
    let mut entries: Vec<(u32, u8, u32)> = Vec::new();
    for r in pci_irqs {
        for pin in 0..4u8 {
            entries.push((u32::from(r.slot) << 16 | 0xffff, pin, u32::from(r.gsi)));
        }
    }
    let prt_items: Vec<Package> = entries
        .iter()
        .map(|(addr, pin, gsi)| Package::new(vec![addr, pin, &aml::ZERO, gsi]))
        .collect();
    let prt_refs: Vec<&dyn Aml> = prt_items.iter().map(|p| p as &dyn Aml).collect();
    let prt = Name::new("_PRT".into(), &Package::new(prt_refs));

    let bus = AddressSpace::<u16>::new_bus_number(0, 0);
    let cfg_ports = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::<u16>::new_io(0x0000, 0x0cf7, None);
    let io_high = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    let mmio = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        PCI_MMIO_START as u32,
        (PCI_MMIO_END - 1) as u32,
        None,
    );
    let crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, &mmio]),
    );
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0A03"));
    let (adr, uid, bbn, seg) = (
        Name::new("_ADR".into(), &aml::ZERO),
        Name::new("_UID".into(), &aml::ZERO),
        Name::new("_BBN".into(), &aml::ZERO),
        Name::new("_SEG".into(), &aml::ZERO),
    );
    let hotplug = Raw(pci_hotplug_aml());
    let pci0 = Device::new(
        "PCI0".into(),
        vec![&hid, &adr, &uid, &bbn, &seg, &crs, &prt, &hotplug],
    );
    let pcnt = MethodCall::new("\\_SB_.PCI0.PCNT".into(), vec![]);
    let e01 = Method::new("_E01".into(), 0, false, vec![&pcnt]);
    let gpe = Scope::new("\\_GPE".into(), vec![&e01]);

    // QEMU's ISA pvpanic: Linux's pvpanic driver binds "QEMU0001" and
    // writes 1 to its port when the kernel panics.
    let pv_hid = Name::new("_HID".into(), &"QEMU0001");
    let pv_sta = Name::new("_STA".into(), &0x0fu8);
    let pv_port = IO::new(PVPANIC_PORT, PVPANIC_PORT, 1, 1);
    let pv_crs = Name::new("_CRS".into(), &ResourceTemplate::new(vec![&pv_port]));
    let pvpanic = Device::new("PEVT".into(), vec![&pv_hid, &pv_sta, &pv_crs]);

    let sb = Scope::new("_SB_".into(), vec![&pci0, &pvpanic]);

    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, table_id(b"DSDT"), OEM_REVISION);
    t.append_slice(&bytes(&s5));
    t.append_slice(&bytes(&sb));
    t.append_slice(&bytes(&gpe));
    t.update_checksum();
    t.as_slice().to_vec()
}

/// Where each table goes, in order, 64-byte aligned (the FACS must be).
struct Layout {
    next: u64,
}

impl Layout {
    fn place(&mut self, len: usize) -> Result<u64> {
        let at = self.next.next_multiple_of(64);
        let end = at + len as u64;
        ensure!(
            end <= TABLES_END,
            "ACPI tables do not fit under 1 MiB ({end:#x})"
        );
        self.next = end;
        Ok(at)
    }
}

/// Builds the tables and writes them into guest RAM; returns the RSDP's
/// address.
pub fn write(mem: &GuestMemoryMmap, vcpus: u8, pci_irqs: &[PciIrq]) -> Result<u64> {
    let mut at = Layout { next: TABLES_START };
    let rsdp_addr = at.place(Rsdp::len())?;
    let facs = bytes(&FACS::new());
    let facs_addr = at.place(facs.len())?;
    let dsdt = dsdt(pci_irqs);
    let dsdt_addr = at.place(dsdt.len())?;
    let fadt = fadt(dsdt_addr, facs_addr);
    let fadt_addr = at.place(fadt.len())?;
    let madt = madt(vcpus);
    let madt_addr = at.place(madt.len())?;
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = bytes(&xsdt);
    let xsdt_addr = at.place(xsdt.len())?;
    let rsdp = bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    for (addr, data) in [
        (rsdp_addr, &rsdp),
        (facs_addr, &facs),
        (dsdt_addr, &dsdt),
        (fadt_addr, &fadt),
        (madt_addr, &madt),
        (xsdt_addr, &xsdt),
    ] {
        mem.write_slice(data, GuestAddress(addr))
            .context("writing the ACPI tables")?;
    }
    Ok(rsdp_addr)
}

/// Checks a table's checksum (every byte of it sums to 0).
#[cfg(test)]
fn sums_to_zero(t: &[u8]) -> bool {
    t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn irqs() -> Vec<PciIrq> {
        (1..=31u8)
            .map(|slot| PciIrq {
                slot,
                pin: 1,
                gsi: 16 + slot % 8,
            })
            .collect()
    }

    #[test]
    fn tables_have_their_signatures_lengths_and_checksums() {
        let d = dsdt(&irqs());
        let f = fadt(0x1000, 0x2000);
        let m = madt(2);
        for (t, sig) in [(&d, b"DSDT"), (&f, b"FACP"), (&m, b"APIC")] {
            assert_eq!(&t[..4], sig);
            let len = u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize;
            assert_eq!(len, t.len(), "{sig:?} length field");
            assert!(sums_to_zero(t), "{sig:?} checksum");
        }
        // FADT: the PM blocks and the reset register where the PM device is.
        let u32_at = |o: usize| u32::from_le_bytes([f[o], f[o + 1], f[o + 2], f[o + 3]]);
        assert_eq!(u32_at(56), u32::from(PM1A_EVT));
        assert_eq!(u32_at(64), u32::from(PM1A_CNT));
        assert_eq!(u32_at(76), u32::from(PM_TMR));
        assert_eq!(u16::from_le_bytes([f[46], f[47]]), SCI_GSI as u16);
        assert_eq!(f[116 + 4], RESET_PORT as u8, "reset register address");
        assert_eq!(f[128], RESET_VALUE);
        // MADT: two local APICs, one IOAPIC, the SCI override, the NMI.
        assert_eq!(m.len(), 44 + 2 * 8 + 12 + 10 + 6);
        // DSDT: the names a guest looks up are in the AML.
        for name in [
            &b"_S5_"[..],
            b"PCI0",
            b"_PRT",
            b"_CRS",
            b"QEMU0001",
            b"PCNT",
            b"_E01",
            b"S1F_",
            b"B0EJ",
        ] {
            assert!(d.windows(name.len()).any(|w| w == name), "{name:?}");
        }
    }

    #[test]
    fn tables_fit_below_one_mib() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let rsdp = write(&mem, 8, &irqs()).unwrap();
        assert_eq!(rsdp, TABLES_START);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }

    #[test]
    fn layout_refuses_what_does_not_fit() {
        let mut l = Layout {
            next: TABLES_END - 10,
        };
        assert!(l.place(100).is_err());
    }
}
