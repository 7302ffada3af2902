//! Whole SCSI commands through SCRIPTS, as the driver issues them:
//! selection, IDENTIFY and tag, CDB, data, status, disconnect and
//! reselection. The disk is a real image file; what the guest wrote is
//! checked in the file, byte for byte.

#![allow(clippy::unwrap_used)]
mod common;
use common::*;
use plugin_api::harness::{plugin_library_path, PluginSource, TestBench};

const MSGS: u64 = 0x9000;
const CDB: u64 = 0x9100;
const STAT: u64 = 0x9200;

fn expect_done(tb: &mut TestBench, vector: u32) {
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

/// An untagged command that completes without disconnecting (INQUIRY...).
fn immediate_command(tb: &mut TestBench, cdb: &[u8], data_in: u32) -> u8 {
    tb.ram().write_all(MSGS, &[0x80]);
    tb.ram().write_all(CDB, cdb);
    let mut a = Asm::new();
    a.select_atn(0, 0)
        .mov(MSG_OUT, 1, MSGS)
        .mov(COMMAND, cdb.len() as u32, CDB);
    if data_in > 0 {
        a.mov(DATA_IN, data_in, BUF);
    }
    a.mov(STATUS, 1, STAT)
        .mov(MSG_IN, 1, MSGS + 8)
        .wait_disconnect()
        .int(0x600d);
    tb.run(&a);
    expect_done(tb, 0x600d);
    assert_eq!(tb.ram().read_vec(MSGS + 8, 1), [0x00], "COMMAND COMPLETE");
    tb.ram().read_vec(STAT, 1)[0]
}

/// A tagged command with disconnect and reselection (READ/WRITE), the way
/// sym53c8xx runs them. `data_out` is sent in the DATA OUT phase.
fn tagged_command(tb: &mut TestBench, cdb: &[u8], dir_in: bool, len: u32, tag: u8) -> u8 {
    let mut a = tagged_start(tb, cdb, tag);
    if !dir_in && len > 0 {
        a.mov(DATA_OUT, len, BUF);
    }
    a.mov(MSG_IN, 1, MSGS + 0x10) // SAVE DATA POINTER
        .mov(MSG_IN, 1, MSGS + 0x11) // DISCONNECT
        .wait_disconnect()
        .wait_reselect(0)
        .mov(MSG_IN, 1, MSGS + 0x12) // IDENTIFY
        .mov(MSG_IN, 2, MSGS + 0x13); // SIMPLE TAG, tag
    if dir_in && len > 0 {
        a.mov(DATA_IN, len, BUF);
    }
    a.mov(STATUS, 1, STAT)
        .mov(MSG_IN, 1, MSGS + 0x15)
        .wait_disconnect()
        .int(0x600d);
    tb.run(&a);
    expect_done(tb, 0x600d);
    assert_eq!(
        tb.ram().read_vec(MSGS + 0x10, 6),
        [0x02, 0x04, 0x80, 0x20, tag, 0x00],
        "disconnect, reselect with tag, complete"
    );
    assert_eq!(tb.r8(SSID), 0x80, "reselected by target 0");
    tb.ram().read_vec(STAT, 1)[0]
}

/// The messages and CDB of a tagged command in guest RAM, and the script
/// up to its COMMAND phase: selection with ATN, IDENTIFY + SIMPLE TAG.
fn tagged_start(tb: &mut TestBench, cdb: &[u8], tag: u8) -> Asm {
    tb.ram().write_all(MSGS, &[0xc0, 0x20, tag]);
    tb.ram().write_all(CDB, cdb);
    let mut a = Asm::new();
    a.select_atn(0, 0)
        .mov(MSG_OUT, 3, MSGS)
        .mov(COMMAND, cdb.len() as u32, CDB);
    a
}

fn both_ways(f: impl Fn(TestBench, &Image)) {
    let img = Image::new(2048);
    let s = settings_for(&[(&img, 0)]);
    f(linked(&s), &img);
    let img = Image::new(2048);
    let s = settings_for(&[(&img, 0)]);
    let path = plugin_library_path("lsi53c895a").unwrap();
    f(bench(PluginSource::Library(path), &s), &img);
}

#[test]
fn inquiry_without_disconnect() {
    both_ways(|mut tb, _img| {
        let st = immediate_command(&mut tb, &[0x12, 0, 0, 0, 36, 0], 36);
        assert_eq!(st, 0, "GOOD");
        let data = tb.ram().read_vec(BUF, 36);
        assert_eq!(data[0], 0x00, "direct-access block device");
        assert!(data[4] >= 31, "additional length");
    });
}

#[test]
fn read_capacity_matches_image() {
    both_ways(|mut tb, _img| {
        let st = immediate_command(&mut tb, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0], 8);
        assert_eq!(st, 0);
        let d = tb.ram().read_vec(BUF, 8);
        assert_eq!(
            u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
            2047,
            "last LBA"
        );
        assert_eq!(u32::from_be_bytes([d[4], d[5], d[6], d[7]]), 512);
    });
}

#[test]
fn tagged_read_disconnects_and_reselects() {
    both_ways(|mut tb, img| {
        // READ(10) LBA 100, 8 blocks.
        let st = tagged_command(&mut tb, &[0x28, 0, 0, 0, 0, 100, 0, 0, 8, 0], true, 4096, 5);
        assert_eq!(st, 0);
        let want = &img.read()[100 * 512..108 * 512];
        assert_eq!(tb.ram().read_vec(BUF, 4096), want);
    });
}

#[test]
fn tagged_write_lands_in_the_image() {
    both_ways(|mut tb, img| {
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 13 + 7) as u8).collect();
        tb.ram().write_all(BUF, &pattern);
        // WRITE(10) LBA 7, 16 blocks.
        let st = tagged_command(&mut tb, &[0x2a, 0, 0, 0, 0, 7, 0, 0, 16, 0], false, 8192, 9);
        assert_eq!(st, 0);
        let file = img.read();
        assert_eq!(&file[7 * 512..23 * 512], &pattern[..]);
        assert_eq!(file.len(), 2048 * 512, "image size unchanged");
    });
}

#[test]
fn out_of_range_read_is_check_condition_and_sense_follows() {
    both_ways(|mut tb, _img| {
        // READ(10) past the end: fails at planning, no data phase.
        let st = immediate_command(&mut tb, &[0x28, 0, 0, 0, 0x10, 0, 0, 0, 1, 0], 0);
        assert_eq!(st, 2, "CHECK CONDITION");
        let st = immediate_command(&mut tb, &[0x03, 0, 0, 0, 18, 0], 18);
        assert_eq!(st, 0);
        let sense = tb.ram().read_vec(BUF, 18);
        assert_eq!(sense[0] & 0x7f, 0x70);
        assert_eq!(sense[2] & 0x0f, 0x05, "ILLEGAL REQUEST");
        assert_eq!(sense[12], 0x21, "LBA out of range");
    });
}

#[test]
fn short_data_in_jumps_through_pmjad_with_residual() {
    both_ways(|mut tb, _img| {
        // INQUIRY with allocation length 96: the disk returns fewer bytes,
        // so the 96-byte move ends early and the phase-mismatch handler
        // (PMJAD, as Linux configures it) gets the residual.
        tb.w8(CCNTL0, 0x80); // ENPMJ
        let mut a = Asm::new();
        tb.ram().write_all(MSGS, &[0x80]);
        tb.ram().write_all(CDB, &[0x12, 0, 0, 0, 96, 0]);
        a.select_atn(0, 0)
            .mov(MSG_OUT, 1, MSGS)
            .mov(COMMAND, 6, CDB);
        let data_move = a.here();
        a.mov(DATA_IN, 96, BUF).int(0xbad);
        let pm_handle = a.here();
        a.store(RBC, 4, BUF + 0x200)
            .store(UA, 4, BUF + 0x204)
            .mov(STATUS, 1, STAT)
            .mov(MSG_IN, 1, MSGS + 8)
            .wait_disconnect()
            .int(0x600d);
        tb.w32(PMJAD1, pm_handle as u32);
        tb.w32(PMJAD2, pm_handle as u32);
        tb.run(&a);
        expect_done(&mut tb, 0x600d);
        let got = tb.ram().read_vec(BUF, 96);
        let n = 5 + got[4] as u32;
        assert!(n < 96);
        assert_eq!(tb.r32(IA), data_move as u32, "instruction that mismatched");
        let rbc = tb.ram().read_vec(BUF + 0x200, 4);
        let ua = tb.ram().read_vec(BUF + 0x204, 4);
        assert_eq!(
            u32::from_le_bytes(rbc.try_into().unwrap()),
            96 - n,
            "remaining byte count"
        );
        assert_eq!(
            u32::from_le_bytes(ua.try_into().unwrap()),
            BUF as u32 + n,
            "updated address"
        );
        assert_eq!(tb.ram().read_vec(STAT, 1), [0]);
    });
}

#[test]
fn absent_target_and_second_disk() {
    let a_img = Image::new(64);
    let b_img = Image::new(128);
    let mut tb = linked(&settings_for(&[(&a_img, 0), (&b_img, 3)]));
    tb.w8(SIEN1, 0x04);
    let mut a = Asm::new();
    a.select_atn(5, 0).jump_if_phase(MSG_OUT, 0).int(1);
    tb.run(&a);
    assert_eq!(tb.r8(SIST1) & 0x04, 0x04, "ID 5: selection timeout");
    // ID 3 answers with its own capacity.
    tb.ram().write_all(MSGS, &[0x80]);
    tb.ram().write_all(CDB, &[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut a = Asm::new();
    a.select_atn(3, 0)
        .mov(MSG_OUT, 1, MSGS)
        .mov(COMMAND, 10, CDB)
        .mov(DATA_IN, 8, BUF)
        .mov(STATUS, 1, STAT)
        .mov(MSG_IN, 1, MSGS + 8)
        .wait_disconnect()
        .int(0x600d);
    tb.run(&a);
    expect_done(&mut tb, 0x600d);
    assert_eq!(tb.ram().read_vec(BUF, 4), 127u32.to_be_bytes());
}

/// A tagged READ or WRITE as sym53c8xx runs it when the target answers
/// at once: the same script as [`tagged_command`] up to the command, then
/// straight to the data and status, no disconnect. Started by a posted
/// DSP write (a remote's access ring), so the controller may run the
/// command inside the write (`control::POSTED_WRITES`).
fn posted_tagged_command(tb: &mut TestBench, cdb: &[u8], dir_in: bool, len: u32, tag: u8) -> u8 {
    let mut a = tagged_start(tb, cdb, tag);
    if dir_in {
        a.mov(DATA_IN, len, BUF);
    } else {
        a.mov(DATA_OUT, len, BUF);
    }
    a.mov(STATUS, 1, STAT)
        .mov(MSG_IN, 1, MSGS + 0x15)
        .wait_disconnect()
        .int(0x600d);
    tb.set_posted_writes(true).unwrap();
    tb.run(&a);
    tb.set_posted_writes(false).unwrap();
    expect_done(tb, 0x600d);
    assert_eq!(
        tb.ram().read_vec(MSGS + 0x15, 1),
        [0x00],
        "COMMAND COMPLETE"
    );
    tb.ram().read_vec(STAT, 1)[0]
}

fn stat(tb: &mut TestBench, name: &str) -> u64 {
    let s = tb
        .control("stats", &plugin_api::control::json!({}))
        .unwrap();
    s[name].as_u64().unwrap()
}

#[test]
fn a_posted_access_runs_reads_and_writes_at_once_without_disconnecting() {
    both_ways(|mut tb, img| {
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i * 29 + 3) as u8).collect();
        tb.ram().write_all(BUF, &pattern);
        // WRITE(10) LBA 40, 16 blocks, then READ(10) LBA 100, 8 blocks.
        let st = posted_tagged_command(
            &mut tb,
            &[0x2a, 0, 0, 0, 0, 40, 0, 0, 16, 0],
            false,
            8192,
            3,
        );
        assert_eq!(st, 0, "GOOD");
        assert_eq!(&img.read()[40 * 512..56 * 512], &pattern[..]);
        let st =
            posted_tagged_command(&mut tb, &[0x28, 0, 0, 0, 0, 100, 0, 0, 8, 0], true, 4096, 4);
        assert_eq!(st, 0, "GOOD");
        assert_eq!(
            tb.ram().read_vec(BUF, 4096),
            &img.read()[100 * 512..108 * 512]
        );
        assert_eq!(stat(&mut tb, "commands-inline"), 2);
        assert_eq!(stat(&mut tb, "reselections"), 0);
        // The same write from a vCPU's own access still disconnects.
        let st = tagged_command(&mut tb, &[0x2a, 0, 0, 0, 0, 7, 0, 0, 16, 0], false, 8192, 9);
        assert_eq!(st, 0);
        assert_eq!(stat(&mut tb, "commands-inline"), 2);
    });
}

#[test]
fn a_slow_disk_sends_posted_commands_back_to_the_worker() {
    let img = Image::new(2048);
    // Every read and write of this disk takes 20 ms.
    let s = format!(
        "[[drive]]\nfile = {:?}\nscsi-id = 0\ndelay-us = 20000\n",
        img.path
    );
    let mut tb = linked(&s);
    // The first command runs inline (nothing said the disk was slow)...
    let st = posted_tagged_command(&mut tb, &[0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0], true, 4096, 1);
    assert_eq!(st, 0);
    assert_eq!(stat(&mut tb, "commands-inline"), 1);
    // ... and took 20 ms, so the next one goes to the worker, with a
    // disconnect and a reselection, although its write is posted.
    tb.set_posted_writes(true).unwrap();
    let st = tagged_command(&mut tb, &[0x28, 0, 0, 0, 0, 9, 0, 0, 8, 0], true, 4096, 2);
    tb.set_posted_writes(false).unwrap();
    assert_eq!(st, 0);
    assert_eq!(stat(&mut tb, "commands-inline"), 1);
    assert_eq!(tb.ram().read_vec(BUF, 4096), &img.read()[9 * 512..17 * 512]);
}

/// A cache flush, or a transfer past `INLINE_MAX_BYTES`, takes what the
/// disk wants whatever the last command took: in a posted write it still
/// goes to the worker (disconnect, reselection), so a guest read that
/// follows never waits behind it on the ring thread.
#[test]
fn a_posted_flush_or_long_transfer_goes_to_the_worker() {
    let img = Image::new(2048);
    let mut tb = linked(&settings_for(&[(&img, 0)]));
    // A short read first, so the disk counts as fast.
    let st = posted_tagged_command(&mut tb, &[0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0], true, 4096, 1);
    assert_eq!(st, 0);
    assert_eq!(stat(&mut tb, "commands-inline"), 1);
    tb.set_posted_writes(true).unwrap();
    // SYNCHRONIZE CACHE(10): no data.
    let st = tagged_command(&mut tb, &[0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0], true, 0, 2);
    assert_eq!(st, 0, "GOOD");
    // READ(10) of 520 blocks (260 KiB).
    let st = tagged_command(
        &mut tb,
        &[0x28, 0, 0, 0, 0, 0, 0, 0x02, 0x08, 0],
        true,
        520 * 512,
        3,
    );
    tb.set_posted_writes(false).unwrap();
    assert_eq!(st, 0, "GOOD");
    assert_eq!(stat(&mut tb, "commands-inline"), 1);
    assert_eq!(tb.ram().read_vec(BUF, 520 * 512), &img.read()[..520 * 512]);
}
