//! The controller's state carried from one device to a new one
//! (`save_state` / `restore_state`, what a restarted device process
//! does): a command the old controller completed is delivered by the new
//! one, with the guest's data; hostile or mismatched blobs are refused and
//! change nothing.

#![allow(clippy::unwrap_used)]
mod common;
use common::*;
use plugin_api::harness::{plugin_library_path, PluginSource, TestBench};

const MSGS: u64 = 0x9000;
const CDB: u64 = 0x9100;
const STAT: u64 = 0x9200;

fn both_ways(f: impl Fn(&dyn Fn(&str) -> TestBench)) {
    f(&|s: &str| linked(s));
    let path = plugin_library_path("lsi53c895a").unwrap();
    f(&|s: &str| bench(PluginSource::Library(path.clone()), s));
}

fn expect_vector(tb: &mut TestBench, vector: u32) {
    tb.settle();
    let dstat = u64::from(tb.r8(DSTAT));
    assert_eq!(dstat & DSTAT_SIR, DSTAT_SIR, "DSTAT {dstat:#x}");
    assert_eq!(tb.r32(DSPS), vector, "DSP {:#x}", tb.r32(DSP));
}

/// A tagged READ(10) of 2 blocks at LBA 5 (tag 7): the target
/// disconnects and the worker completes it; the SCRIPTS stop before
/// reselection.
fn start_tagged_read(tb: &mut TestBench) {
    tb.ram().write_all(MSGS, &[0xc0, 0x20, 7]);
    tb.ram().write_all(CDB, &[0x28, 0, 0, 0, 0, 5, 0, 0, 2, 0]);
    let mut a = Asm::new();
    a.select_atn(0, 0)
        .mov(MSG_OUT, 3, MSGS)
        .mov(COMMAND, 10, CDB)
        .mov(MSG_IN, 2, MSGS + 0x10)
        .wait_disconnect()
        .int(0x1111);
    tb.run(&a);
    expect_vector(tb, 0x1111);
}

#[test]
fn a_command_completed_before_the_restart_is_delivered_after_it() {
    both_ways(|make| {
        let img = Image::new(64);
        let settings = settings_for(&[(&img, 0)]);
        let mut old = make(&settings);
        old.w32(SCRATCHA, 0x1234_5678);
        start_tagged_read(&mut old);
        // The device process dies; a new one takes over with the state.
        let mut new = old;
        new.restart_device().unwrap();
        assert_eq!(new.r32(SCRATCHA), 0x1234_5678, "registers carried over");
        let mut b = Asm::new();
        b.wait_reselect(0)
            .mov(MSG_IN, 3, MSGS + 0x12) // IDENTIFY, SIMPLE TAG, tag
            .mov(DATA_IN, 1024, BUF)
            .mov(STATUS, 1, STAT)
            .mov(MSG_IN, 1, MSGS + 0x15)
            .wait_disconnect()
            .int(0x600d);
        new.run(&b);
        expect_vector(&mut new, 0x600d);
        assert_eq!(new.r8(SSID), 0x80, "reselected by target 0");
        assert_eq!(new.ram().read_vec(MSGS + 0x13, 2), [0x20, 7], "its tag");
        assert_eq!(new.ram().read_vec(STAT, 1), [0], "GOOD");
        assert_eq!(
            new.ram().read_vec(BUF, 1024),
            img.read()[5 * 512..7 * 512],
            "the blocks the old controller read"
        );
    });
}

#[test]
fn hostile_or_mismatched_state_is_refused_and_changes_nothing() {
    let img = Image::new(16);
    let settings = settings_for(&[(&img, 0)]);
    let mut old = linked(&settings);
    old.w32(SCRATCHA, 0xfeed_f00d);
    let good = old.function().save_state().unwrap();
    let text = String::from_utf8(good.clone()).unwrap();

    let mut tb = linked(&settings);
    tb.w32(SCRATCHA, 0x0bad_cafe);
    let before = tb.function().save_state().unwrap();
    let ram_hex = format!("\"script-ram\":\"{}", "00".repeat(16));
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            "not an lsi53c895a state",
        ),
        (
            "garbage",
            b"\x00\x01garbage".to_vec(),
            "not an lsi53c895a state",
        ),
        (
            "another version",
            text.replace("\"version\":1", "\"version\":2").into_bytes(),
            "version 2",
        ),
        (
            "short SCRIPTS RAM",
            {
                let start = text.find("\"script-ram\":\"").unwrap();
                let end = text[start + 14..].find('"').unwrap() + start + 14;
                format!("{}{}{}", &text[..start], ram_hex, &text[end..]).into_bytes()
            },
            "SCRIPTS RAM",
        ),
        (
            "another format",
            text.replace("lsi53c895a-state", "e1000-state").into_bytes(),
            "e1000-state",
        ),
        (
            "too large",
            vec![b' '; lsi53c895a::state::MAX_STATE_BYTES + 1],
            "more than this controller ever saves",
        ),
    ];
    for (name, blob, why) in cases {
        let e = tb.function().restore_state(&blob).unwrap_err();
        assert!(e.message.contains(why), "{name}: {}", e.message);
        assert_eq!(
            tb.function().save_state().unwrap(),
            before,
            "{name}: the controller changed"
        );
    }
    // Another set of drives.
    let mut bare = linked("");
    let e = bare.function().restore_state(&good).unwrap_err();
    assert!(e.message.contains("scsi-ids"), "{}", e.message);
    // The good blob still restores.
    tb.function().restore_state(&good).unwrap();
    assert_eq!(tb.r32(SCRATCHA), 0xfeed_f00d);
}

#[test]
fn a_stale_save_comes_back_as_the_driver_set_it_up_with_a_bus_reset() {
    both_ways(|make| {
        let img = Image::new(64);
        let settings = settings_for(&[(&img, 0)]);
        let mut tb = make(&settings);
        // The driver's set-up, as the VMM's idle save holds it: SCSI
        // interrupts enabled as Linux enables them (MA, SGE, UDC, RST,
        // PAR), a register of its own, SCRIPTS in the on-chip RAM.
        tb.w8(SIEN0, 0x8f);
        tb.w32(SCRATCHA, 0x5a5a_0001);
        let sram = tb.bar_address(2);
        tb.mmio_write(sram + 0x40, 4, 0xdead_beef);
        let save = tb.function().save_state().unwrap();
        // The guest goes on: a tagged READ the target disconnects from,
        // left on the worker, and registers that move on.
        start_tagged_read(&mut tb);
        tb.w32(SCRATCHA, 2);
        tb.mmio_write(sram + 0x40, 4, 0);
        // The process dies; the VMM's save is stale.
        let reply = tb.crash_and_resume(&save).unwrap();
        assert_eq!(reply["bus-reset"], true, "{reply}");
        assert_eq!(tb.r32(SCRATCHA), 0x5a5a_0001, "the save's registers");
        assert_eq!(
            tb.mmio_read(sram + 0x40, 4),
            0xdead_beef,
            "the save's SCRIPTS RAM"
        );
        // The reset is reported at once, as the driver enabled it; the
        // line itself is not left asserted.
        assert!(tb.irq().level(), "RST interrupt");
        assert_eq!(tb.r8(ISTAT0) & 0x02, 0x02, "SIP");
        assert_eq!(tb.r8(SSTAT0) & 0x02, 0, "RST not held");
        assert_eq!(tb.r8(SIST0) & 0x02, 0x02, "SIST0 RST");
        assert!(!tb.irq().level(), "read clears it");
        // The READ died with the old process: nothing reselects. The disk
        // was reset with the bus: its next command reports it (UNIT
        // ATTENTION), as a real target does, and the driver's commands
        // then run.
        tb.ram().write_all(MSGS + 0x20, &[0x80]);
        tb.ram().write_all(CDB + 0x20, &[0, 0, 0, 0, 0, 0]);
        let mut b = Asm::new();
        b.select_atn(0, 0)
            .mov(MSG_OUT, 1, MSGS + 0x20)
            .mov(COMMAND, 6, CDB + 0x20)
            .mov(STATUS, 1, STAT)
            .mov(MSG_IN, 1, MSGS + 0x21)
            .wait_disconnect()
            .int(0x2222);
        tb.run(&b);
        expect_vector(&mut tb, 0x2222);
        assert_eq!(tb.ram().read_vec(STAT, 1), [2], "CHECK CONDITION");
        tb.run(&b);
        expect_vector(&mut tb, 0x2222);
        assert_eq!(tb.ram().read_vec(STAT, 1), [0], "then GOOD");
    });
}

#[test]
fn a_resume_from_a_state_not_the_controllers_changes_nothing() {
    let mut tb = linked("");
    tb.w32(SCRATCHA, 0x1357_9bdf);
    let before = tb.function().save_state().unwrap();
    let e = tb.crash_and_resume(b"not a state").unwrap_err();
    assert!(e.contains("not an lsi53c895a state"), "{e}");
    // The new instance, as made: the old one's registers are gone, and
    // no reset was reported.
    assert_eq!(tb.r32(SCRATCHA), 0);
    assert_eq!(tb.r8(ISTAT0) & 0x02, 0, "no SIP");
    assert_ne!(tb.function().save_state().unwrap(), before);
}
