//! Drives attached, resized and detached at run time through the plugin's
//! control operations (what the VMM's QMP `device_add scsi-hd`,
//! `block_resize` and `device_del` become), checked with SCRIPTS-driven
//! commands as a guest would issue them.

#![allow(clippy::unwrap_used)]
mod common;
use common::*;
use plugin_api::harness::{plugin_library_path, PluginSource, TestBench};
use serde_json::{json, Value};

const MSGS: u64 = 0x9000;
const CDB: u64 = 0x9100;
const STAT: u64 = 0x9200;

const READ_CAPACITY: [u8; 10] = [0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const REQUEST_SENSE: [u8; 6] = [0x03, 0, 0, 0, 18, 0];

fn expect_vector(tb: &mut TestBench, vector: u32) {
    tb.settle();
    let dstat = u64::from(tb.r8(DSTAT));
    assert_eq!(
        dstat & DSTAT_SIR,
        DSTAT_SIR,
        "DSTAT {dstat:#x}, DSP {:#x}",
        tb.r32(DSP)
    );
    assert_eq!(tb.r32(DSPS), vector, "DSP {:#x}", tb.r32(DSP));
}

/// An untagged command to `target` that completes without disconnecting
/// (the data phase is skipped when the target goes to STATUS at once).
fn immediate(tb: &mut TestBench, target: u8, cdb: &[u8], data_in: u32) -> u8 {
    tb.ram().write_all(MSGS, &[0x80]);
    tb.ram().write_all(CDB, cdb);
    tb.ram().write_all(STAT, &[0xff]);
    let mut a = Asm::new();
    a.select_atn(target, 0)
        .mov(MSG_OUT, 1, MSGS)
        .mov(COMMAND, cdb.len() as u32, CDB);
    let status = SCRIPT + 4 * (a.words.len() as u64 + 4);
    // A CHECK CONDITION skips the data phase: go straight to STATUS.
    a.jump_if_phase(STATUS, status);
    if data_in > 0 {
        a.mov(DATA_IN, data_in, BUF);
    } else {
        a.nop();
    }
    assert_eq!(a.here(), status);
    a.mov(STATUS, 1, STAT)
        .mov(MSG_IN, 1, MSGS + 8)
        .wait_disconnect()
        .int(0x600d);
    tb.run(&a);
    expect_vector(tb, 0x600d);
    tb.ram().read_vec(STAT, 1)[0]
}

/// A tagged READ(10) to `target` (disconnect, worker, reselection).
fn tagged_read(tb: &mut TestBench, target: u8, lba: u32, blocks: u16) -> u8 {
    let len = u32::from(blocks) * 512;
    let l = lba.to_be_bytes();
    let b = blocks.to_be_bytes();
    tb.ram().write_all(MSGS, &[0xc0, 0x20, 3]);
    tb.ram()
        .write_all(CDB, &[0x28, 0, l[0], l[1], l[2], l[3], 0, b[0], b[1], 0]);
    let mut a = Asm::new();
    a.select_atn(target, 0)
        .mov(MSG_OUT, 3, MSGS)
        .mov(COMMAND, 10, CDB)
        .mov(MSG_IN, 2, MSGS + 0x10) // SAVE DATA POINTER, DISCONNECT
        .wait_disconnect()
        .wait_reselect(0)
        .mov(MSG_IN, 3, MSGS + 0x12) // IDENTIFY, SIMPLE TAG, tag
        .mov(DATA_IN, len, BUF)
        .mov(STATUS, 1, STAT)
        .mov(MSG_IN, 1, MSGS + 0x15)
        .wait_disconnect()
        .int(0x600d);
    tb.run(&a);
    expect_vector(tb, 0x600d);
    assert_eq!(tb.r8(SSID), 0x80 | target, "reselected by the target");
    tb.ram().read_vec(STAT, 1)[0]
}

/// Sense key, ASC, ASCQ from REQUEST SENSE.
fn sense(tb: &mut TestBench, target: u8) -> (u8, u8, u8) {
    assert_eq!(immediate(tb, target, &REQUEST_SENSE, 18), 0);
    let s = tb.ram().read_vec(BUF, 18);
    (s[2] & 0x0f, s[12], s[13])
}

fn last_lba(tb: &mut TestBench, target: u8) -> u32 {
    assert_eq!(immediate(tb, target, &READ_CAPACITY, 8), 0, "GOOD");
    let d = tb.ram().read_vec(BUF, 4);
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

/// Whether selecting `target` times out (as for an absent target).
fn selection_times_out(tb: &mut TestBench, target: u8) -> bool {
    tb.w8(SIEN1, 0x04);
    let _ = tb.r8(SIST1); // clear
    let mut a = Asm::new();
    let present = SCRIPT + 4 * 8;
    a.select_atn(target, 0)
        .jump_if_phase(MSG_OUT, present)
        .int(1)
        .nop();
    assert_eq!(a.here(), present);
    a.int(2);
    tb.run(&a);
    tb.settle();
    let timed_out = tb.r8(SIST1) & 0x04 == 0x04;
    if !timed_out {
        assert_eq!(tb.r32(DSPS), 2, "selected, in MESSAGE OUT");
    }
    // Software reset: drop a selection left half done, quiet the chip.
    tb.w8(ISTAT0, 0x40);
    tb.w8(ISTAT0, 0);
    timed_out
}

fn control(tb: &mut TestBench, op: &str, args: Value) -> Result<Value, String> {
    tb.control(op, &args)
}

fn both_ways(f: impl Fn(TestBench)) {
    f(linked(""));
    let path = plugin_library_path("lsi53c895a").unwrap();
    f(bench(PluginSource::Library(path), ""));
}

#[test]
fn drive_add_reports_unit_attention_then_reads_the_file() {
    both_ways(|mut tb| {
        let img = Image::new(2048);
        assert!(selection_times_out(&mut tb, 2), "no drive yet");
        let r = control(
            &mut tb,
            "drive-add",
            json!({"scsi-id": 2, "lun": 0, "file": img.path, "read-only": false}),
        )
        .unwrap();
        assert_eq!(r, json!({"scsi-id": 2, "capacity": 2048 * 512}));
        // First command: CHECK CONDITION with POWER ON/RESET.
        assert_eq!(immediate(&mut tb, 2, &READ_CAPACITY, 8), 2);
        assert_eq!(sense(&mut tb, 2), (0x06, 0x29, 0x00));
        assert_eq!(last_lba(&mut tb, 2), 2047);
        assert_eq!(tagged_read(&mut tb, 2, 100, 8), 0);
        assert_eq!(
            tb.ram().read_vec(BUF, 4096),
            &img.read()[100 * 512..108 * 512]
        );
        let list = control(&mut tb, "drive-list", json!({})).unwrap();
        assert_eq!(
            list,
            json!([{"scsi-id": 2, "lun": 0, "file": img.path.display().to_string(),
                    "read-only": false, "capacity": 2048 * 512}])
        );
    });
}

#[test]
fn drive_resize_raises_capacity_changed() {
    let img = Image::new(64);
    let mut tb = linked(&settings_for(&[(&img, 0)]));
    assert_eq!(last_lba(&mut tb, 0), 63);
    let r = control(
        &mut tb,
        "drive-resize",
        json!({"scsi-id": 0, "size": 128 * 512}),
    )
    .unwrap();
    assert_eq!(r, json!({"scsi-id": 0, "capacity": 128 * 512}));
    assert_eq!(
        std::fs::metadata(&img.path).unwrap().len(),
        128 * 512,
        "file length"
    );
    assert_eq!(
        immediate(&mut tb, 0, &READ_CAPACITY, 8),
        2,
        "unit attention"
    );
    assert_eq!(sense(&mut tb, 0), (0x06, 0x2a, 0x09));
    assert_eq!(last_lba(&mut tb, 0), 127);
    // The new blocks read (as zeros).
    assert_eq!(tagged_read(&mut tb, 0, 100, 1), 0);
    assert_eq!(tb.ram().read_vec(BUF, 512), vec![0; 512]);
}

#[test]
fn drive_del_makes_selection_time_out() {
    both_ways(|mut tb| {
        let img = Image::new(64);
        control(
            &mut tb,
            "drive-add",
            json!({"scsi-id": 4, "file": img.path}),
        )
        .unwrap();
        assert!(!selection_times_out(&mut tb, 4));
        // A command that went to the worker completes before drive-del
        // returns (the reselection still comes).
        let _ = immediate(&mut tb, 4, &READ_CAPACITY, 8); // unit attention
        assert_eq!(tagged_read(&mut tb, 4, 1, 1), 0);
        assert_eq!(
            control(&mut tb, "drive-del", json!({"scsi-id": 4})).unwrap(),
            json!({"scsi-id": 4})
        );
        assert!(selection_times_out(&mut tb, 4), "detached");
        assert_eq!(
            control(&mut tb, "drive-list", json!({})).unwrap(),
            json!([])
        );
        let e = control(&mut tb, "drive-del", json!({"scsi-id": 4})).unwrap_err();
        assert_eq!(e, "no drive at scsi-id 4");
    });
}

#[test]
fn drive_del_waits_for_a_command_on_the_worker() {
    let img = Image::new(4096);
    let mut tb = linked(&settings_for(&[(&img, 1)]));
    // Start a 1 MiB tagged read and detach while it may be on the worker:
    // it still completes with the file's data.
    tb.ram().write_all(MSGS, &[0xc0, 0x20, 3]);
    tb.ram()
        .write_all(CDB, &[0x28, 0, 0, 0, 0, 0, 0, 0x08, 0x00, 0]);
    let mut a = Asm::new();
    a.select_atn(1, 0)
        .mov(MSG_OUT, 3, MSGS)
        .mov(COMMAND, 10, CDB)
        .mov(MSG_IN, 2, MSGS + 0x10)
        .wait_disconnect()
        .wait_reselect(0)
        .mov(MSG_IN, 3, MSGS + 0x12)
        .mov(DATA_IN, 2048 * 512, BUF)
        .mov(STATUS, 1, STAT)
        .mov(MSG_IN, 1, MSGS + 0x15)
        .wait_disconnect()
        .int(0x600d);
    tb.run(&a);
    control(&mut tb, "drive-del", json!({"scsi-id": 1})).unwrap();
    expect_vector(&mut tb, 0x600d);
    assert_eq!(tb.ram().read_vec(STAT, 1), [0]);
    assert_eq!(
        tb.ram().read_vec(BUF, 2048 * 512),
        &img.read()[..2048 * 512]
    );
    assert!(selection_times_out(&mut tb, 1));
}

#[test]
fn bad_drive_arguments_change_nothing() {
    let img = Image::new(64);
    let ro = Image::new(64);
    let mut tb = linked(&format!(
        "{}read-only = true\n{}",
        settings_for(&[(&ro, 3)]),
        settings_for(&[(&img, 0)])
    ));
    let before = control(&mut tb, "drive-list", json!({})).unwrap();
    assert_eq!(before.as_array().unwrap().len(), 2);
    let other = Image::new(32);
    let cases = [
        (
            "drive-add",
            json!({"scsi-id": 7, "file": other.path}),
            "scsi-id 7 is not usable",
        ),
        (
            "drive-add",
            json!({"scsi-id": 16, "file": other.path}),
            "scsi-id 16 is not usable",
        ),
        (
            "drive-add",
            json!({"scsi-id": 0, "file": other.path}),
            "scsi-id 0 is in use",
        ),
        (
            "drive-add",
            json!({"scsi-id": 5, "file": "/nonexistent/x.img"}),
            "/nonexistent/x.img",
        ),
        (
            "drive-add",
            json!({"scsi-id": 5, "file": other.path, "lun": 1}),
            "LUN",
        ),
        (
            "drive-add",
            json!({"scsi-id": 5, "file": other.path, "cache": "none"}),
            "unknown field",
        ),
        ("drive-add", json!({"scsi-id": 5}), "missing field `file`"),
        ("drive-add", json!("not an object"), "drive-add"),
        (
            "drive-resize",
            json!({"scsi-id": 0, "size": 1000}),
            "multiple of 512",
        ),
        (
            "drive-resize",
            json!({"scsi-id": 0}),
            "missing field `size`",
        ),
        (
            "drive-resize",
            json!({"scsi-id": 3, "size": 65536}),
            "read-only",
        ),
        (
            "drive-resize",
            json!({"scsi-id": 9, "size": 65536}),
            "no drive at scsi-id 9",
        ),
        ("drive-del", json!({"scsi-id": 9}), "no drive at scsi-id 9"),
        (
            "drive-eject",
            json!({}),
            "no control operation `drive-eject`",
        ),
    ];
    for (op, args, want) in cases {
        let e = control(&mut tb, op, args.clone()).unwrap_err();
        assert!(
            e.to_lowercase().contains(&want.to_lowercase()),
            "{op} {args}: {e}"
        );
    }
    assert_eq!(control(&mut tb, "drive-list", json!({})).unwrap(), before);
    assert_eq!(std::fs::metadata(&img.path).unwrap().len(), 64 * 512);
    assert!(selection_times_out(&mut tb, 5), "nothing attached at 5");
    assert!(tb.failure().is_none());
}
