//! ACPI: the tables the guest reads at boot ([`tables`]) and the fixed
//! hardware they describe ([`pm`]): the PM1 event and control registers
//! (power button, S5 power-off), the PM timer, the reset register and
//! QEMU's ISA pvpanic port. With them, `poweroff`, `reboot` and a kernel
//! panic end the VM through registers the guest writes, never through
//! what it prints (docs/host.md, "Platform").

pub mod pm;
pub mod tables;

/// PM1a event block: PM1_STS (2 bytes), PM1_EN (2 bytes).
pub const PM1A_EVT: u16 = 0x600;
/// PM1a control block (2 bytes).
pub const PM1A_CNT: u16 = 0x604;
/// The 32-bit PM timer (3.579545 MHz).
pub const PM_TMR: u16 = 0x608;
/// The FADT's reset register (1 byte): writing [`RESET_VALUE`] resets.
pub const RESET_PORT: u16 = 0x60c;
pub const RESET_VALUE: u8 = 0x01;
/// GPE0 block: GPE0_STS (2 bytes), GPE0_EN (2 bytes).
pub const GPE0_BLK: u16 = 0x620;
/// The GPE that announces PCI hotplug events (`\_GPE._E01`).
pub const GPE_PCI_HOTPLUG: u16 = 1 << 1;
/// PCI hotplug registers (QEMU PIIX4's scheme): PCIU (slots to check,
/// cleared when read), PCID (slots to eject), then B0EJ (the guest writes
/// the slots it released).
pub const PCI_HOTPLUG: u16 = 0x640;
/// QEMU's ISA pvpanic port (the DSDT's `QEMU0001` device).
pub const PVPANIC_PORT: u16 = 0x505;
/// The SCI: ISA IRQ 9, level-triggered, active high (MADT override).
pub const SCI_GSI: u32 = 9;
/// The SLP_TYP value `\_S5_` gives: PM1_CNT with it and SLP_EN powers off.
pub const S5_SLP_TYP: u8 = 5;
