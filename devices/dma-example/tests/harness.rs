//! The example device through the test bench, twice: linked directly (rlib)
//! and loaded from its `.so` through the ABI checks. The same test bodies
//! run against both (`plugin_api::plugin_tests!`).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use dma_example::*;
use plugin_api::control::json;
use plugin_api::harness::{PluginSource, TestBench};

plugin_api::plugin_tests! {
    plugin: dma_example,
    bench: |source| TestBench::new(source, None, ""),
    tests: [
        identity_and_bar,
        registers,
        dma_copies_and_interrupts,
        dma_fault_is_reported_not_fatal,
        too_long_dma_is_refused,
        save_restore_round_trip,
        a_restart_mid_copy_finishes_the_copy,
        reset_clears_state,
        control_sets_the_limit,
        a_stale_save_is_refused_and_the_device_stays_as_made,
    ],
}

fn bar0(tb: &mut TestBench) -> u64 {
    tb.map_bars();
    tb.bar_address(0)
}

fn identity_and_bar(mut tb: TestBench) {
    assert_eq!(tb.plugin().name, "dma-example");
    assert_eq!(tb.plugin().kinds, vec!["dma-example".to_string()]);
    assert_eq!(tb.cfg_read(0x00, 2), u32::from(VENDOR_ID));
    assert_eq!(tb.cfg_read(0x02, 2), u32::from(DEVICE_ID));
    assert_eq!(tb.cfg_read(0x09, 4) & 0xff_ffff, 0x00ff00);
    assert_eq!(tb.cfg_read(0x3d, 1), 1, "INTA");
    assert_eq!(tb.probe_bars(), vec![(0, 0x1000, false)]);
    assert!(tb.msix().is_none(), "INTx only");
    let base = bar0(&mut tb);
    assert_eq!(base, 0xe000_0000);
    assert_eq!(tb.mmio_read(base + REG_ID, 4), u64::from(ID_VALUE));
    // Byte access to the middle of a register sees its bytes.
    assert_eq!(
        tb.mmio_read(base + REG_ID + 3, 1),
        u64::from(ID_VALUE >> 24)
    );
    // Outside the BAR nothing answers: all-ones.
    assert_eq!(tb.mmio_read(base + 0x1000, 4), 0xffff_ffff);
}

fn registers(mut tb: TestBench) {
    let base = bar0(&mut tb);
    tb.mmio_write(base + REG_LIVENESS, 4, 0x1234_5678);
    assert_eq!(
        tb.mmio_read(base + REG_LIVENESS, 4),
        u64::from(!0x1234_5678u32)
    );
    tb.mmio_write(base + REG_SCRATCH, 4, 0xcafe_f00d);
    assert_eq!(tb.mmio_read(base + REG_SCRATCH, 4), 0xcafe_f00d);
    // 64-bit access covers two registers.
    tb.mmio_write(base + REG_DMA_SRC, 8, 0x1_2345_6000);
    assert_eq!(tb.mmio_read(base + REG_DMA_SRC, 8), 0x1_2345_6000);
    // Interrupt raise/ack drive the line.
    tb.mmio_write(base + REG_IRQ_RAISE, 4, 0x1);
    assert!(tb.irq().level());
    assert!(tb.irq().eoi(), "still high at EOI: delivered again");
    tb.mmio_write(base + REG_IRQ_ACK, 4, 0x1);
    assert!(!tb.irq().level());
    assert_eq!(tb.irq().history(), vec![true, false]);
    assert_eq!(tb.irq().deliveries(), 2);
}

fn dma_copies_and_interrupts(mut tb: TestBench) {
    let base = bar0(&mut tb);
    let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 7 + 3) as u8).collect();
    tb.ram().write_all(0x10_0000, &pattern);
    tb.mmio_write(base + REG_DMA_SRC, 8, 0x10_0000);
    tb.mmio_write(base + REG_DMA_DST, 8, 0x20_0000);
    tb.mmio_write(base + REG_DMA_LEN, 4, pattern.len() as u64);
    tb.mmio_write(
        base + REG_DMA_CMD,
        4,
        u64::from(DMA_CMD_START | DMA_CMD_IRQ),
    );
    assert!(
        tb.irq().wait_for(true, Duration::from_secs(5)),
        "DMA interrupt"
    );
    tb.wait_idle(Duration::from_secs(5)).unwrap();
    assert_eq!(tb.ram().read_vec(0x20_0000, pattern.len()), pattern);
    assert_eq!(tb.mmio_read(base + REG_DMA_RESULT, 4), u64::from(DMA_OK));
    assert_eq!(
        tb.mmio_read(base + REG_IRQ_STATUS, 4),
        u64::from(IRQ_DMA_DONE)
    );
    assert_eq!(tb.mmio_read(base + REG_STATUS, 4), 0);
    tb.mmio_write(base + REG_IRQ_ACK, 4, u64::from(IRQ_DMA_DONE));
    assert!(!tb.irq().eoi(), "acknowledged: not re-delivered");
}

fn dma_fault_is_reported_not_fatal(mut tb: TestBench) {
    let base = bar0(&mut tb);
    // Source beyond the 16 MiB of guest RAM.
    tb.mmio_write(base + REG_DMA_SRC, 8, 0x4000_0000);
    tb.mmio_write(base + REG_DMA_DST, 8, 0x1000);
    tb.mmio_write(base + REG_DMA_LEN, 4, 16);
    tb.mmio_write(
        base + REG_DMA_CMD,
        4,
        u64::from(DMA_CMD_START | DMA_CMD_IRQ),
    );
    assert!(tb.irq().wait_for(true, Duration::from_secs(5)));
    tb.wait_idle(Duration::from_secs(5)).unwrap();
    assert_eq!(tb.mmio_read(base + REG_DMA_RESULT, 4), u64::from(DMA_FAULT));
    assert_eq!(tb.failure(), None);
    // Still works afterwards.
    tb.mmio_write(base + REG_SCRATCH, 4, 7);
    assert_eq!(tb.mmio_read(base + REG_SCRATCH, 4), 7);
}

fn too_long_dma_is_refused(mut tb: TestBench) {
    let base = bar0(&mut tb);
    tb.mmio_write(base + REG_DMA_LEN, 4, (2 << 20) as u64);
    tb.mmio_write(base + REG_DMA_CMD, 4, u64::from(DMA_CMD_START));
    assert_eq!(
        tb.mmio_read(base + REG_DMA_RESULT, 4),
        u64::from(DMA_TOO_LONG)
    );
    assert_eq!(tb.mmio_read(base + REG_STATUS, 4), 0);
}

fn save_restore_round_trip(mut tb: TestBench) {
    let base = bar0(&mut tb);
    tb.mmio_write(base + REG_SCRATCH, 4, 0x55aa);
    tb.mmio_write(base + REG_DMA_DST, 8, 0xabc_d000);
    let state = tb.function().save_state().unwrap();
    tb.mmio_write(base + REG_SCRATCH, 4, 0);
    tb.function().restore_state(&state).unwrap();
    assert_eq!(tb.mmio_read(base + REG_SCRATCH, 4), 0x55aa);
    assert_eq!(tb.mmio_read(base + REG_DMA_DST, 8), 0xabc_d000);
    assert!(tb.function().restore_state(&state[..3]).is_err());
}

/// The device process dies while its copy runs (or just after): the new
/// device, given the old one's state, finishes the copy and interrupts.
fn a_restart_mid_copy_finishes_the_copy(mut tb: TestBench) {
    let base = bar0(&mut tb);
    let len = 1 << 20; // max-transfer: the longest copy there is
    let pattern: Vec<u8> = (0..len as u32).map(|i| (i % 251) as u8).collect();
    tb.ram().write_all(0x10_0000, &pattern);
    tb.mmio_write(base + REG_DMA_SRC, 8, 0x10_0000);
    tb.mmio_write(base + REG_DMA_DST, 8, 0x40_0000);
    tb.mmio_write(base + REG_DMA_LEN, 4, len as u64);
    tb.mmio_write(
        base + REG_DMA_CMD,
        4,
        u64::from(DMA_CMD_START | DMA_CMD_IRQ),
    );
    tb.restart_device().unwrap();
    assert!(
        tb.irq().wait_for(true, Duration::from_secs(5)),
        "DMA interrupt from the new device"
    );
    tb.wait_idle(Duration::from_secs(5)).unwrap();
    assert_eq!(tb.ram().read_vec(0x40_0000, len), pattern);
    assert_eq!(tb.mmio_read(base + REG_DMA_RESULT, 4), u64::from(DMA_OK));
    assert_eq!(tb.mmio_read(base + REG_STATUS, 4), 0);
    assert_eq!(
        tb.mmio_read(base + REG_IRQ_STATUS, 4),
        u64::from(IRQ_DMA_DONE)
    );
}

fn reset_clears_state(mut tb: TestBench) {
    let base = bar0(&mut tb);
    tb.mmio_write(base + REG_SCRATCH, 4, 9);
    tb.mmio_write(base + REG_IRQ_RAISE, 4, 1);
    tb.function().reset().unwrap();
    assert!(!tb.irq().level());
    assert_eq!(tb.cfg_read(0x04, 2), 0, "command register reset");
    let base = bar0(&mut tb);
    assert_eq!(tb.mmio_read(base + REG_SCRATCH, 4), 0);
}

/// dma-example has no way back from a save its guest moved past (its
/// copy's progress lives only in the process): a VMM's
/// `resume-after-loss` is refused, and the new instance stays as made.
fn a_stale_save_is_refused_and_the_device_stays_as_made(mut tb: TestBench) {
    let base = bar0(&mut tb);
    tb.mmio_write(base + REG_SCRATCH, 4, 9);
    let save = tb.function().save_state().unwrap();
    let e = tb.crash_and_resume(&save).unwrap_err();
    assert_eq!(
        e,
        "this device has no control operation `resume-after-loss`"
    );
    assert_eq!(
        tb.mmio_read(base + REG_SCRATCH, 4),
        0,
        "as made, not restored"
    );
}

fn control_sets_the_limit(mut tb: TestBench) {
    let base = bar0(&mut tb);
    let r = tb
        .control("set-max-transfer", &json!({"bytes": 16}))
        .unwrap();
    assert_eq!(r, json!({"max-transfer": 16, "previous": 1 << 20}));
    tb.mmio_write(base + REG_DMA_LEN, 4, 17);
    tb.mmio_write(base + REG_DMA_CMD, 4, u64::from(DMA_CMD_START));
    assert_eq!(
        tb.mmio_read(base + REG_DMA_RESULT, 4),
        u64::from(DMA_TOO_LONG)
    );
    let e = tb
        .control("set-max-transfer", &json!({"byte": 16}))
        .unwrap_err();
    assert!(
        e.starts_with("set-max-transfer: unknown field `byte`"),
        "{e}"
    );
    let e = tb.control("drive-list", &json!({})).unwrap_err();
    assert_eq!(e, "this device has no control operation `drive-list`");
}

#[test]
fn bad_settings_are_reported() {
    let err = TestBench::new(
        PluginSource::Linked(dma_example::plugin_module()),
        None,
        "max-transfr = 3\n",
    )
    .err()
    .unwrap();
    assert!(err.contains("unknown field `max-transfr`"), "{err}");
    let err = TestBench::new(
        PluginSource::Linked(dma_example::plugin_module()),
        None,
        "max-transfer = -1\n",
    )
    .err()
    .unwrap();
    assert!(
        err.contains("settings: `max-transfer`: invalid value"),
        "{err}"
    );
    assert!(!err.contains('\n'), "one line: {err}");
    let err = TestBench::new(
        PluginSource::Linked(dma_example::plugin_module()),
        None,
        "max-transfer = 0\n",
    )
    .err()
    .unwrap();
    assert!(err.contains("max-transfer must be at least 1"), "{err}");
    let err = TestBench::new(
        PluginSource::Linked(dma_example::plugin_module()),
        Some("nvme"),
        "",
    )
    .err()
    .unwrap();
    assert!(err.contains("unknown device kind `nvme`"), "{err}");
}

/// The bench with `interrupt = "..."` (linked: the settings, not the
/// loading, are what these tests are about).
fn bench_with(interrupt: &str) -> TestBench {
    TestBench::new(
        PluginSource::Linked(dma_example::plugin_module()),
        None,
        &format!("interrupt = \"{interrupt}\"\n"),
    )
    .unwrap()
}

/// A 4 KiB copy that raises DMA_DONE.
fn copy_with_interrupt(tb: &mut TestBench, base: u64) {
    tb.mmio_write(base + REG_DMA_SRC, 8, 0x10_0000);
    tb.mmio_write(base + REG_DMA_DST, 8, 0x20_0000);
    tb.mmio_write(base + REG_DMA_LEN, 4, 4096);
    tb.mmio_write(
        base + REG_DMA_CMD,
        4,
        u64::from(DMA_CMD_START | DMA_CMD_IRQ),
    );
}

/// MSI as PCI 3.0 6.8.1 has it, driven as a guest driver would: INTx
/// until the guest enables MSI, then one message per new cause (a raise,
/// a finished copy) and INTx quiet; a masked vector sets its pending bit
/// and goes out at unmask; disabled again, INTx is back.
#[test]
fn msi_carries_each_new_cause_and_masking_holds_it() {
    let mut tb = bench_with("msi");
    let m = tb.msi().expect("an MSI capability");
    assert_eq!(m.vectors, 1);
    assert!(tb.msix().is_none());
    let base = bar0(&mut tb);
    tb.mmio_write(base + REG_IRQ_RAISE, 4, 1);
    assert!(tb.irq().level(), "MSI not enabled: INTx");
    assert_eq!(tb.irq().msi_count(0), 0);
    tb.mmio_write(base + REG_IRQ_ACK, 4, 1);

    tb.enable_msi(1).unwrap();
    tb.mmio_write(base + REG_IRQ_RAISE, 4, 1);
    assert_eq!(tb.irq().msi_count(0), 1);
    assert!(!tb.irq().level(), "MSI enabled: INTx stays low");
    let (v, msg) = tb.irq().msi_messages()[0];
    assert_eq!((v, msg.address, msg.data), (0, 0xfee0_0000, 0x4000));
    tb.mmio_write(base + REG_IRQ_ACK, 4, 1);

    copy_with_interrupt(&mut tb, base);
    assert!(tb.irq().wait_msi(0, 2, Duration::from_secs(5)), "DMA done");
    tb.wait_idle(Duration::from_secs(5)).unwrap();
    tb.mmio_write(base + REG_IRQ_ACK, 4, u64::from(IRQ_DMA_DONE));

    let pending = m.cap + plugin_api::pci::msi::PENDING;
    tb.cfg_write(m.cap + plugin_api::pci::msi::MASK, 4, 1);
    tb.mmio_write(base + REG_IRQ_RAISE, 4, 2);
    assert_eq!(tb.irq().msi_count(0), 2, "masked: not sent");
    assert_eq!(tb.cfg_read(pending, 4), 1, "masked: pending");
    tb.cfg_write(m.cap + plugin_api::pci::msi::MASK, 4, 0);
    assert_eq!(tb.irq().msi_count(0), 3, "sent at unmask");
    assert_eq!(tb.cfg_read(pending, 4), 0);

    // MSI off while a cause is set: the line carries it.
    tb.cfg_write(m.cap + plugin_api::pci::msi::CONTROL, 2, 0);
    tb.mmio_write(base + REG_IRQ_RAISE, 4, 4);
    assert!(tb.irq().level(), "MSI disabled: INTx again");
    assert_eq!(tb.irq().msi_count(0), 3);
}

/// The same with MSI-X: the vector's Vector Control mask holds a cause
/// pending in the PBA until unmasked.
#[test]
fn msix_carries_each_new_cause_and_masking_holds_it() {
    let mut tb = bench_with("msix");
    let m = tb.msix().expect("MSI-X");
    assert_eq!(m.layout.vectors, 1);
    assert!(tb.msi().is_none());
    let base = bar0(&mut tb);
    tb.enable_msix(&[0]).unwrap();
    copy_with_interrupt(&mut tb, base);
    assert!(tb.irq().wait_msix(0, 1, Duration::from_secs(5)), "DMA done");
    assert!(!tb.irq().level(), "MSI-X enabled: INTx stays low");
    tb.wait_idle(Duration::from_secs(5)).unwrap();
    tb.mmio_write(base + REG_IRQ_ACK, 4, u64::from(IRQ_DMA_DONE));
    let entry = tb.bar_address(usize::from(m.layout.table_bar)) + u64::from(m.layout.table_offset);
    tb.mmio_write(entry + 12, 4, 1);
    tb.mmio_write(base + REG_IRQ_RAISE, 4, 1);
    assert_eq!(tb.irq().msix_count(0), 1, "masked: not sent");
    assert!(tb.irq().msix_pending(0));
    tb.mmio_write(entry + 12, 4, 0);
    assert_eq!(tb.irq().msix_count(0), 2, "sent at unmask");
    assert!(!tb.irq().msix_pending(0));
}

#[test]
fn an_unknown_interrupt_kind_is_refused() {
    let e = TestBench::new(
        PluginSource::Linked(dma_example::plugin_module()),
        None,
        "interrupt = \"msi-x\"\n",
    )
    .err()
    .unwrap();
    assert!(e.contains("interrupt") || e.contains("msi-x"), "{e}");
}
