//! Guest-hostile input: every bug class in the facts file, with sequences
//! of our own. Each must leave the controller usable, the process alive,
//! and never spin inside a BAR access.

#![allow(clippy::unwrap_used)]
mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn garbage_dsp_is_a_bus_fault_not_a_crash() {
    let img = Image::new(16);
    let mut tb = linked(&settings_for(&[(&img, 0)]));
    tb.w8(DIEN, 0x20);
    tb.w32(DSP, 0xfff0_0000); // not guest RAM, not our BARs
    assert!(tb.irq().level());
    assert_eq!(u64::from(tb.r8(DSTAT)) & DSTAT_BF, DSTAT_BF);
}

#[test]
fn data_phase_move_with_no_request_is_refused() {
    // SCRIPTS started at a garbage address that reach a data block move
    // with nothing connected and no request queued.
    let img = Image::new(16);
    let mut tb = linked(&settings_for(&[(&img, 0)]));
    let mut a = Asm::new();
    a.mov(DATA_IN, 512, BUF).mov(DATA_OUT, 512, BUF).int(1);
    tb.run(&a);
    assert_eq!(u64::from(tb.r8(DSTAT)) & DSTAT_IID, DSTAT_IID);
    // Table-indirect move whose table says count 0.
    let mut a = Asm::new();
    a.mov_table(DATA_IN, 0x40).int(1);
    tb.run(&a);
    assert_eq!(u64::from(tb.r8(DSTAT)) & DSTAT_IID, DSTAT_IID);
}

#[test]
fn endless_loops_pause_on_the_budget_and_can_be_aborted() {
    let mut tb = linked("");
    tb.w8(DIEN, 0x10);
    let mut a = Asm::new();
    a.reg_op(SCRATCHA, 6, 1).jump(SCRIPT); // count forever
    let t = Instant::now();
    tb.run(&a);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the BAR write returned"
    );
    // It keeps running in slices on the worker... The counter is one
    // byte and wraps, and a loaded machine may not schedule the worker
    // for a while: wait (bounded) until a sample differs from the first.
    let first = tb.r8(SCRATCHA);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut pause = Duration::from_micros(100);
    while tb.r8(SCRATCHA) == first {
        assert!(Instant::now() < deadline, "never resumed after pausing");
        std::thread::sleep(pause);
        pause = (pause * 3 / 2).min(Duration::from_millis(7));
    }
    // ...until the driver aborts it.
    tb.w8(ISTAT0, 0x80);
    assert_eq!(u64::from(tb.r8(DSTAT)) & DSTAT_ABRT, DSTAT_ABRT);
    tb.w8(ISTAT0, 0);
    tb.settle();
    let stopped = tb.r8(SCRATCHA);
    std::thread::sleep(Duration::from_millis(10));
    assert_eq!(stopped, tb.r8(SCRATCHA), "stopped for good");
}

/// What one run may cost: the budget, plus the one step that crossed it.
fn run_work_bound() -> u64 {
    u64::from(
        lsi53c895a::scripts::DEFAULT_BUDGET
            + lsi53c895a::scripts::MOVE_STEP / lsi53c895a::scripts::BYTES_PER_UNIT
            + 1,
    )
}

/// What one run may copy: the budget's worth, plus the step that crossed
/// it.
fn run_bytes_bound() -> u64 {
    u64::from(lsi53c895a::scripts::DEFAULT_BUDGET) * u64::from(lsi53c895a::scripts::BYTES_PER_UNIT)
        + u64::from(lsi53c895a::scripts::MOVE_STEP)
}

fn stat(tb: &mut plugin_api::harness::TestBench, name: &str) -> u64 {
    tb.control("stats", &serde_json::Value::Null).unwrap()[name]
        .as_u64()
        .unwrap()
}

#[test]
fn a_memory_move_of_megabytes_is_split_and_still_right() {
    let mut tb = linked("");
    let src = 0x40_0000u64;
    let dst = 0x80_0000u64;
    let len = 3 << 20;
    let data: Vec<u8> = (0..len).map(|i| (i * 7 + i / 4099) as u8).collect();
    tb.ram().write_all(src, &data);
    let mut a = Asm::new();
    a.mem_move(len as u32, src, dst).int(9);
    tb.run(&a);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tb.r8(DSTAT) & 0x04 == 0 {
        assert!(Instant::now() < deadline, "the move never finished");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(tb.r32(DSPS), 9);
    assert_eq!(
        tb.ram().read_vec(dst, len),
        data,
        "copied across steps and runs"
    );
    assert_eq!(stat(&mut tb, "bytes-moved"), len as u64);
    let most = stat(&mut tb, "max-run-work");
    assert!(most <= run_work_bound(), "one run did {most} units");
}

#[test]
fn a_loop_of_huge_memory_moves_never_holds_a_bar_access() {
    // The attack of issue 11: 8 MiB moves in an endless loop used to run
    // inside the DSP write that started them (seconds per access).
    let mut tb = linked("");
    tb.w8(DIEN, 0x10);
    let mut a = Asm::new();
    a.mem_move(8 << 20, 0x40_0000, 0x80_0000).jump(SCRIPT);
    tb.run(&a);
    // It goes on in slices on the worker: wait (bounded) for 32 MiB.
    let deadline = Instant::now() + Duration::from_secs(30);
    while stat(&mut tb, "bytes-moved") < 32 << 20 {
        assert!(Instant::now() < deadline, "the loop never made progress");
        std::thread::sleep(Duration::from_millis(2));
    }
    tb.w8(ISTAT0, 0x80);
    assert_eq!(u64::from(tb.r8(DSTAT)) & DSTAT_ABRT, DSTAT_ABRT);
    tb.w8(ISTAT0, 0);
    tb.settle();
    let most = stat(&mut tb, "max-run-work");
    assert!(
        most <= run_work_bound(),
        "one run did {most} work units (bound {})",
        run_work_bound()
    );
    let bytes = stat(&mut tb, "max-run-bytes");
    assert!(
        bytes <= run_bytes_bound(),
        "one run copied {bytes} bytes (bound {})",
        run_bytes_bound()
    );
    // Stopped for good: nothing is copied any more.
    let moved = stat(&mut tb, "bytes-moved");
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(moved, stat(&mut tb, "bytes-moved"));
}

#[test]
fn a_run_of_zero_dwords_is_bounded() {
    let mut tb = linked("");
    // 1 MiB of zeros from SCRIPT: skipped 4 bytes at a time, then INT.
    tb.ram()
        .write_all(SCRIPT + (1 << 20), &[0x00, 0x00, 0x08, 0x98, 0x07, 0, 0, 0]);
    let t = Instant::now();
    tb.w32(DSP, SCRIPT as u32);
    assert!(t.elapsed() < Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(10);
    while tb.r8(DSTAT) & 0x04 == 0 {
        assert!(Instant::now() < deadline, "never reached the INT");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(tb.r32(DSPS), 7);
}

#[test]
fn memory_move_into_own_dsp_does_not_recurse() {
    // A memory move whose destination is the controller's own DSP: the
    // copy "restarts" SCRIPTS from inside itself. Here it points back at
    // the same move, forever: bounded by the budget, no recursion.
    let mut tb = linked("");
    tb.w8(DIEN, 0x10);
    let bar1 = tb.bar_address(1);
    tb.ram().write_all(BUF, &(SCRIPT as u32).to_le_bytes());
    let mut a = Asm::new();
    a.mem_move(4, BUF, bar1 + DSP).int(1);
    tb.run(&a);
    tb.w8(ISTAT0, 0x80);
    tb.w8(ISTAT0, 0);
    tb.settle();
    // And to ISTAT (software reset) from inside SCRIPTS.
    tb.ram().write_all(BUF + 0x10, &[0x40]);
    let mut a = Asm::new();
    a.mem_move(1, BUF + 0x10, bar1 + ISTAT0).int(1);
    tb.run(&a);
    assert_eq!(tb.r8(SCNTL0), 0xc0, "reset happened, chip still answers");
}

#[test]
fn data_in_into_own_registers_resetting_the_bus_mid_copy() {
    // DATA IN aimed at BAR1: a byte lands in SCNTL1 with RST set and
    // cancels the very request being copied.
    let img = Image::new(64);
    let mut tb = linked(&settings_for(&[(&img, 0)]));
    let bar1 = tb.bar_address(1);
    tb.ram().write_all(0x9000, &[0x80]);
    tb.ram().write_all(0x9100, &[0x12, 0, 0, 0, 36, 0]);
    let mut a = Asm::new();
    a.select_atn(0, 0)
        .mov(MSG_OUT, 1, 0x9000)
        .mov(COMMAND, 6, 0x9100)
        .mov(DATA_IN, 36, bar1) // INQUIRY data over SCNTL0, SCNTL1 (0x00? RST?), ...
        .int(1);
    tb.run(&a);
    tb.settle();
    // Whatever the bytes did, the chip is alive and can run a command.
    tb.w8(SCNTL1, 0);
    tb.w8(ISTAT0, 0x40);
    tb.w8(ISTAT0, 0);
    let mut a = Asm::new();
    a.select_atn(0, 0)
        .mov(MSG_OUT, 1, 0x9000)
        .mov(COMMAND, 6, 0x9100)
        .mov(DATA_IN, 36, BUF)
        .mov(STATUS, 1, 0x9200)
        .mov(MSG_IN, 1, 0x9208)
        .int(2);
    tb.run(&a);
    tb.settle();
    assert_eq!(tb.r32(DSPS), 2);
    assert_eq!(tb.ram().read_vec(0x9200, 1), [0]);
}

#[test]
fn message_out_cancelling_requests_that_are_gone() {
    // BUS DEVICE RESET, IDENTIFY, ABORT TAG for a request that already
    // completed (and one that never existed): no effect but a disconnect.
    let img = Image::new(64);
    let mut tb = linked(&settings_for(&[(&img, 0)]));
    for msgs in [
        &[0x0c][..],
        &[0x80, 0x20, 0x05, 0x0d],
        &[0xc0, 0x0d, 0x0c, 0x06, 0x0e],
        &[0x01, 0x03, 0x01, 0x01], // WDTR: ignored
        &[0x01, 0x02, 0x77, 0x00], // unknown extended: MESSAGE REJECT
        &[0x42],                   // not a message we know: REJECT
    ] {
        tb.ram().write_all(0x9000, msgs);
        let mut a = Asm::new();
        a.select_atn(0, 0)
            .mov(MSG_OUT, msgs.len() as u32, 0x9000)
            .int(3);
        tb.run(&a);
        tb.settle();
        assert_eq!(tb.r32(DSPS), 3, "messages {msgs:x?}");
        tb.w8(SCNTL1, 0); // drop whatever connection is left
    }
    // The BUS DEVICE RESETs left a unit attention: a TEST UNIT READY
    // reports it (CHECK CONDITION) and clears it.
    tb.ram().write_all(0x9000, &[0x80]);
    tb.ram().write_all(0x9100, &[0; 6]);
    let mut a = Asm::new();
    a.select_atn(0, 0)
        .mov(MSG_OUT, 1, 0x9000)
        .mov(COMMAND, 6, 0x9100)
        .mov(STATUS, 1, 0x9200)
        .mov(MSG_IN, 1, 0x9208)
        .wait_disconnect()
        .int(6);
    tb.run(&a);
    tb.settle();
    assert_eq!(tb.r32(DSPS), 6);
    assert_eq!(
        tb.ram().read_vec(0x9200, 1),
        [2],
        "unit attention after reset"
    );
    // A queued READ aborted by ABORT TAG before it completes, then the
    // worker's completion finds nothing: harmless.
    tb.ram().write_all(0x9000, &[0xc0, 0x20, 0x09]);
    tb.ram()
        .write_all(0x9100, &[0x28, 0, 0, 0, 0, 0, 0, 0, 32, 0]);
    tb.ram().write_all(0x9010, &[0xc0, 0x20, 0x09, 0x0d]);
    let mut a = Asm::new();
    a.select_atn(0, 0)
        .mov(MSG_OUT, 3, 0x9000)
        .mov(COMMAND, 10, 0x9100)
        .mov(MSG_IN, 2, 0x9020)
        .wait_disconnect()
        .select_atn(0, 0)
        .mov(MSG_OUT, 4, 0x9010)
        .int(4);
    tb.run(&a);
    tb.settle();
    let (dsp, dstat, sist0) = (tb.r32(DSP), tb.r8(DSTAT), tb.r8(SIST0));
    assert_eq!(
        tb.r32(DSPS),
        4,
        "DSP {dsp:#x} DSTAT {dstat:#x} SIST0 {sist0:#x}"
    );
    assert_eq!(tb.ram().read_vec(0x9020, 2), [0x02, 0x04]);
}

#[test]
fn load_store_out_of_range_is_illegal() {
    let mut tb = linked("");
    let mut a = Asm::new();
    a.raw(&[0xe1fe_0004, BUF as u32]).int(1); // reg 0xfe + 4 > 0x100
    tb.run(&a);
    assert_eq!(u64::from(tb.r8(DSTAT)) & DSTAT_IID, DSTAT_IID);
    let mut a = Asm::new();
    a.raw(&[0xe134_0007, BUF as u32]).int(1); // count 7
    tb.run(&a);
    assert_eq!(u64::from(tb.r8(DSTAT)) & DSTAT_IID, DSTAT_IID);
    let mut a = Asm::new();
    a.raw(&[0xa000_0000, 0]).int(1); // undefined transfer-control opcode
    tb.run(&a);
    assert_eq!(u64::from(tb.r8(DSTAT)) & DSTAT_IID, DSTAT_IID);
}

#[test]
fn hostile_cdb_lengths_and_transfer_sizes() {
    let img = Image::new(64);
    let mut tb = linked(&settings_for(&[(&img, 0)]));
    // A 24-byte COMMAND move (more than any CDB) and a READ(16) asking for
    // 2^32-1 blocks: refused with status, never allocated.
    let mut cdb = vec![
        0x88, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0, 0,
    ];
    cdb.extend_from_slice(&[0xee; 8]);
    tb.ram().write_all(0x9000, &[0x80]);
    tb.ram().write_all(0x9100, &cdb);
    let mut a = Asm::new();
    a.select_atn(0, 0)
        .mov(MSG_OUT, 1, 0x9000)
        .mov(COMMAND, 24, 0x9100)
        .mov(STATUS, 1, 0x9200)
        .mov(MSG_IN, 1, 0x9208)
        .int(5);
    tb.run(&a);
    tb.settle();
    assert_eq!(tb.r32(DSPS), 5);
    assert_eq!(tb.ram().read_vec(0x9200, 1), [2], "CHECK CONDITION");
}

/// Commands that SCRIPTS never reselect keep their buffers: together they
/// may not pin more than `MAX_QUEUED_BYTES`; the command past it gets
/// TASK SET FULL, and a command fits again once the queue is gone.
#[test]
fn queued_commands_cannot_pin_unbounded_memory() {
    const MSGS: u64 = 0x9000;
    const CDB: u64 = 0x9100;
    const STAT: u64 = 0x9200;
    // 8 MiB each (the disk's largest transfer): eight fit, the ninth not.
    let blocks: u16 = 16384;
    let img = Image::new(u64::from(blocks) + 16);
    let mut tb = linked(&settings_for(&[(&img, 0)]));
    let [hi, lo] = blocks.to_be_bytes();
    tb.ram()
        .write_all(CDB, &[0x28, 0, 0, 0, 0, 0, 0, hi, lo, 0]); // READ(10)
                                                               // Two commands that disconnect and are never taken back.
    for tag in 1u8..=8 {
        tb.ram().write_all(MSGS, &[0xc0, 0x20, tag]);
        let mut a = Asm::new();
        a.select_atn(0, 0)
            .mov(MSG_OUT, 3, MSGS)
            .mov(COMMAND, 10, CDB)
            .mov(MSG_IN, 1, MSGS + 0x10) // SAVE DATA POINTER
            .mov(MSG_IN, 1, MSGS + 0x11) // DISCONNECT
            .wait_disconnect()
            .int(0x100 + u32::from(tag));
        tb.run(&a);
        tb.settle();
        let (dstat, sist0, sbcl) = (tb.r8(DSTAT), tb.r8(0x42), tb.r8(SBCL));
        assert_eq!(
            tb.r32(DSPS),
            0x100 + u32::from(tag),
            "command {tag} queued (DSTAT {dstat:#x} SIST0 {sist0:#x} SBCL {sbcl:#x})"
        );
        assert_eq!(tb.ram().read_vec(MSGS + 0x10, 2), [0x02, 0x04]);
    }
    // The ninth goes straight to STATUS with TASK SET FULL.
    tb.ram().write_all(MSGS, &[0xc0, 0x20, 9]);
    let mut a = Asm::new();
    a.select_atn(0, 0)
        .mov(MSG_OUT, 3, MSGS)
        .mov(COMMAND, 10, CDB)
        .mov(STATUS, 1, STAT)
        .mov(MSG_IN, 1, MSGS + 0x10)
        .wait_disconnect()
        .int(0x103);
    tb.run(&a);
    tb.settle();
    assert_eq!(tb.r32(DSPS), 0x103);
    assert_eq!(
        tb.ram().read_vec(STAT, 1),
        [lsi53c895a::scsi::STATUS_TASK_SET_FULL],
        "TASK SET FULL"
    );
    assert_eq!(
        tb.ram().read_vec(MSGS + 0x10, 1),
        [0x00],
        "COMMAND COMPLETE"
    );
    // A software reset drops the queue; a command fits again.
    tb.w8(ISTAT0, 0x40);
    tb.w8(ISTAT0, 0);
    tb.settle();
    let mut a = Asm::new();
    a.select_atn(0, 0)
        .mov(MSG_OUT, 3, MSGS)
        .mov(COMMAND, 10, CDB)
        .mov(MSG_IN, 1, MSGS + 0x10)
        .mov(MSG_IN, 1, MSGS + 0x11)
        .wait_disconnect()
        .int(0x104);
    tb.run(&a);
    tb.settle();
    assert_eq!(tb.r32(DSPS), 0x104, "queued again after the reset");
}
