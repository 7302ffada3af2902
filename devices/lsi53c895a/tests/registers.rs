//! Register behaviour the Linux driver depends on, through BAR1 and BAR0.

#![allow(clippy::unwrap_used)]
mod common;
use common::*;
use plugin_api::harness::{plugin_library_path, PluginSource};

#[test]
fn pci_identity_and_bars() {
    let path = plugin_library_path("lsi53c895a").unwrap();
    let mut tb = bench(PluginSource::Library(path), "");
    assert_eq!(tb.cfg_read(0, 4), 0x0012_1000);
    assert_eq!(
        tb.cfg_read(0x08, 4) >> 8,
        0x01_00_00,
        "class: SCSI controller"
    );
    assert_eq!(tb.cfg_read(0x2c, 4), 0x1000_1000, "subsystem ids");
    assert_eq!(tb.cfg_read(0x3d, 1), 1, "INTA");
    assert_eq!(
        tb.probe_bars(),
        vec![(0, 256, true), (1, 0x400, false), (2, 0x2000, false)]
    );
}

#[test]
fn reset_values_and_fixed_reads() {
    let mut tb = linked("");
    assert_eq!(tb.r8(SCNTL0), 0xc0);
    assert_eq!(tb.r8(SCID), 0x07);
    assert_eq!(tb.r8(GPREG), 0x7f, "no NVRAM answers");
    assert_eq!(tb.r8(STEST4), 0xe0, "LVD, clock locked");
    assert_eq!(u64::from(tb.r8(DSTAT)) & DSTAT_DFE, DSTAT_DFE);
    // I/O BAR decodes the same registers.
    let io = tb.bar_address(0);
    tb.w32(SCRATCHA, 0x1234_5678);
    assert_eq!(tb.pio_read(io + SCRATCHA, 4), 0x1234_5678);
    // BAR1 mirrors registers every 256 bytes.
    assert_eq!(tb.r32(0x100 + SCRATCHA), 0x1234_5678);
}

#[test]
fn status_registers_ignore_writes() {
    // The driver's register test: 0x0c..0x0f must not read back what was written.
    let mut tb = linked("");
    tb.w32(DSTAT, 0xffff_ffff);
    assert_ne!(tb.r32(DSTAT), 0xffff_ffff);
}

#[test]
fn scsi_bus_reset_leaves_only_rst() {
    let img = Image::new(64);
    let mut tb = linked(&settings_for(&[(&img, 0)]));
    tb.w8(SIEN0, 0x02); // RST
    tb.w8(STEST3, 0x80);
    tb.w8(SCNTL1, 0x08);
    assert_eq!(tb.r8(SSTAT0), 0x02, "SSTAT0 == RST only");
    assert_eq!(tb.r8(SSTAT2), 0);
    assert_eq!(tb.r8(SBDL), 0);
    assert_eq!(tb.r8(SBCL), 0);
    assert!(tb.irq().level(), "RST interrupt enabled");
    assert_eq!(tb.r8(ISTAT0) & 0x02, 0x02, "SIP");
    assert_eq!(tb.r8(SIST0), 0x02);
    assert_eq!(tb.r8(SIST0), 0, "read clears");
    assert!(!tb.irq().level());
    tb.w8(SCNTL1, 0);
    assert_eq!(tb.r8(SSTAT0), 0);
}

#[test]
fn sigp_is_read_and_cleared_through_ctest2() {
    let mut tb = linked("");
    tb.w8(ISTAT0, 0x20);
    assert_eq!(tb.r8(ISTAT0) & 0x20, 0x20);
    assert_eq!(tb.r8(CTEST2) & 0x40, 0x40);
    assert_eq!(tb.r8(ISTAT0) & 0x20, 0, "cleared by the CTEST2 read");
    assert_eq!(tb.r8(CTEST2) & 0x40, 0);
}

#[test]
fn software_reset_restores_defaults() {
    let mut tb = linked("");
    tb.w8(SCNTL0, 0);
    tb.w32(SCRATCHA, 5);
    tb.w8(ISTAT0, 0x40);
    tb.w8(ISTAT0, 0);
    assert_eq!(tb.r8(SCNTL0), 0xc0);
    assert_eq!(tb.r32(SCRATCHA), 0);
}

#[test]
fn scripts_ram_is_bar2() {
    let mut tb = linked("");
    let ram = tb.bar_address(2);
    tb.mmio_write(ram + 0x1ff0, 4, 0xdead_beef);
    assert_eq!(tb.mmio_read(ram + 0x1ff0, 4), 0xdead_beef);
    assert_eq!(
        tb.mmio_read(ram + 0x1ff0 + 16, 4),
        0xffff_ffff,
        "past the BAR"
    );
    assert_ne!(tb.mmio_read(ram + 0x1ff0, 4), 0x5241_4944, "not RAID");
}
