//! The device on plugin-api's test bench, each test twice: against the
//! crate linked in (`linked::...`) and against its `.so` loaded through the
//! ABI checks as remote-host loads it (`library::...`).

use plugin_api::control::json;
use plugin_api::harness::{PluginSource, TestBench};
use plugin_template::*;

plugin_api::plugin_tests! {
    plugin: plugin_template,
    bench: |source| TestBench::new(source, None, "initial-scratch = 7"),
    tests: [identity_and_bar, registers, interrupt_is_a_level, control_and_reset],
}

/// BAR0's guest address, after placing the BARs as firmware would.
fn bar0(tb: &mut TestBench) -> u64 {
    tb.map_bars();
    tb.bar_address(0)
}

fn identity_and_bar(mut tb: TestBench) {
    assert_eq!(tb.plugin().name, "plugin-template");
    assert_eq!(tb.cfg_read(0x00, 2), u32::from(VENDOR_ID));
    assert_eq!(tb.cfg_read(0x02, 2), u32::from(DEVICE_ID));
    assert_eq!(tb.cfg_read(0x3d, 1), 1, "INTA");
    assert_eq!(tb.probe_bars(), vec![(0, BAR0_SIZE, false)]);
    let base = bar0(&mut tb);
    assert_eq!(tb.mmio_read(base + REG_ID, 4), u64::from(ID_VALUE));
    assert_eq!(tb.mmio_read(base + BAR0_SIZE, 4), 0xffff_ffff, "outside");
}

fn registers(mut tb: TestBench) {
    let base = bar0(&mut tb);
    assert_eq!(tb.mmio_read(base + REG_SCRATCH, 4), 7, "the setting");
    tb.mmio_write(base + REG_SCRATCH, 4, 0xcafe_f00d);
    assert_eq!(tb.mmio_read(base + REG_SCRATCH, 4), 0xcafe_f00d);
    assert_eq!(tb.mmio_read(base + REG_SCRATCH + 3, 1), 0xca, "one byte");
}

fn interrupt_is_a_level(mut tb: TestBench) {
    let base = bar0(&mut tb);
    tb.mmio_write(base + REG_IRQ_RAISE, 4, 0b11);
    assert!(tb.irq().level());
    tb.mmio_write(base + REG_IRQ_ACK, 4, 0b01);
    assert!(tb.irq().eoi(), "a cause still pending: delivered again");
    tb.mmio_write(base + REG_IRQ_ACK, 4, 0b10);
    assert!(!tb.irq().level());
    assert_eq!(tb.irq().deliveries(), 2);
}

fn control_and_reset(mut tb: TestBench) {
    let base = bar0(&mut tb);
    let r = tb.control("set-scratch", &json!({"value": 9}));
    assert_eq!(r, Ok(json!({"previous": 7})));
    assert_eq!(tb.mmio_read(base + REG_SCRATCH, 4), 9);
    let e = tb.control("set-scratch", &json!({"valu": 1}));
    assert!(e.is_err_and(|e| e.starts_with("set-scratch: unknown field `valu`")));
    assert!(tb.function().reset().is_ok());
    let base = bar0(&mut tb);
    assert_eq!(tb.mmio_read(base + REG_SCRATCH, 4), 7, "reset to the setting");
}

#[test]
fn a_bad_setting_is_refused_with_its_name() {
    let source = PluginSource::Linked(plugin_template::plugin_module());
    let e = TestBench::new(source, None, "initial-scratch = \"x\"").err();
    let e = e.unwrap_or_default();
    assert!(e.contains("`initial-scratch`: invalid type"), "{e}");
}
