//! Each SCRIPTS instruction family, executed from guest RAM and from the
//! chip's own SCRIPTS RAM.

#![allow(clippy::unwrap_used)]
mod common;
use common::*;

fn done(tb: &mut plugin_api::harness::TestBench, vector: u32) {
    let dstat = u64::from(tb.r8(DSTAT));
    assert_eq!(dstat & DSTAT_SIR, DSTAT_SIR, "DSTAT {dstat:#x}");
    assert_eq!(tb.r32(DSPS), vector);
}

#[test]
fn int_stops_with_vector_and_raises_irq() {
    let mut tb = linked("");
    tb.w8(DIEN, 0x04);
    let mut a = Asm::new();
    a.int(0x1234);
    tb.run(&a);
    assert!(tb.irq().level());
    assert_eq!(tb.r8(ISTAT0) & 0x01, 0x01, "DIP");
    assert_eq!(tb.r32(DSP), (SCRIPT + 8) as u32);
    done(&mut tb, 0x1234);
    assert!(!tb.irq().level(), "DSTAT read clears");
}

#[test]
fn register_arithmetic_and_carry() {
    let mut tb = linked("");
    let mut a = Asm::new();
    a.reg_op(SCRATCHA, 0, 0xf0) // move
        .reg_op(SCRATCHA, 6, 0x20) // add -> 0x10, carry
        .jump_if_carry(0) // placeholder, patched below
        .int(1)
        .int(2);
    // Patch the carry jump to land on `int(2)`.
    a.words[5] = (SCRIPT + 4 * 8) as u32;
    tb.run(&a);
    done(&mut tb, 2);
    assert_eq!(tb.r8(SCRATCHA), 0x10);

    let mut a = Asm::new();
    a.reg_op(SCRATCHA, 0, 0x81)
        .reg_op(SCRATCHA, 1, 0) // shl with carry-in 1 (left by the ADD above): 0x03, carry 1
        .reg_op(SCRATCHA + 1, 0, 0x0f)
        .reg_op(SCRATCHA + 1, 4, 0x3c) // and: 0x0c
        .reg_op(SCRATCHA + 2, 0, 0x0f)
        .reg_op(SCRATCHA + 2, 3, 0xff) // xor: 0xf0
        .reg_op(SCRATCHA + 3, 0, 0x01)
        .reg_op(SCRATCHA + 3, 7, 0x01) // adc with carry 1: 0x03
        .reg_to_sfbr(SCRATCHA + 3, 2, 0x40) // sfbr = 0x43
        .int(3);
    tb.run(&a);
    done(&mut tb, 3);
    assert_eq!(tb.r32(SCRATCHA), 0x03f0_0c03);
    assert_eq!(tb.r8(SFBR), 0x43);
}

#[test]
fn data_compare_jump() {
    let mut tb = linked("");
    let mut a = Asm::new();
    a.reg_op(SFBR, 0, 0x5a);
    let target = a.here() + 8 * 3;
    a.jump_if_data(0x5a, target).int(1).int(2).int(3);
    tb.run(&a);
    done(&mut tb, 3);
}

#[test]
fn call_return_and_relative_jump() {
    let mut tb = linked("");
    let mut a = Asm::new();
    let sub = SCRIPT + 8 * 4;
    a.call(sub) // 0
        .int(7) // 1: after return
        .int(99) // 2
        .int(98) // 3
        .reg_op(SCRATCHA, 0, 0x42) // 4: sub
        .jump_rel(8) // 5: skip one instruction
        .int(97) // 6
        .ret(); // 7
    tb.run(&a);
    done(&mut tb, 7);
    assert_eq!(tb.r8(SCRATCHA), 0x42);
    assert_eq!(
        tb.r32(TEMP),
        (SCRIPT + 8) as u32,
        "return address kept in TEMP"
    );
}

#[test]
fn interrupt_on_the_fly_keeps_running() {
    let mut tb = linked("");
    let mut a = Asm::new();
    a.int_fly().reg_op(SCRATCHA, 0, 9).int(5);
    tb.run(&a);
    assert_eq!(tb.r8(ISTAT0) & 0x04, 0x04, "INTF");
    assert!(tb.irq().level(), "INTF raises the line whatever the masks");
    done(&mut tb, 5);
    assert_eq!(tb.r8(SCRATCHA), 9);
    tb.w8(ISTAT0, 0x04);
    assert_eq!(tb.r8(ISTAT0) & 0x04, 0);
    assert!(!tb.irq().level());
}

#[test]
fn memory_move_between_ram_and_into_own_registers() {
    let mut tb = linked("");
    let bar1 = tb.bar_address(1);
    tb.ram().write_all(BUF, b"0123456789abcdef");
    tb.ram()
        .write_all(BUF + 0x100, &0xcafe_f00du32.to_le_bytes());
    let mut a = Asm::new();
    a.mem_move(16, BUF, BUF + 0x800)
        .mem_move(4, BUF + 0x100, bar1 + SCRATCHB) // like Linux's register relocation
        .mem_move(4, bar1 + SCRATCHB, BUF + 0x200)
        .int(1);
    tb.w32(TEMP, 0x1111);
    tb.run(&a);
    done(&mut tb, 1);
    assert_eq!(tb.ram().read_vec(BUF + 0x800, 16), b"0123456789abcdef");
    assert_eq!(tb.r32(SCRATCHB), 0xcafe_f00d);
    assert_eq!(
        tb.ram().read_vec(BUF + 0x200, 4),
        0xcafe_f00du32.to_le_bytes()
    );
    assert_eq!(tb.r32(TEMP), 0x1111, "memory move keeps TEMP");
}

#[test]
fn load_store_like_the_driver_snoop_test() {
    // The Linux driver's snoop test: DSA = HCB, LOAD/STORE/LOAD, INT.
    let mut tb = linked("");
    tb.ram().write_all(TABLE + 0x10, &1u32.to_le_bytes());
    let mut a = Asm::new();
    a.load_rel(SCRATCHA, 4, 0x10)
        .store(SCRATCHA, 4, BUF)
        .load(TEMP, 4, BUF + 0x40)
        .int(99);
    tb.ram().write_all(BUF + 0x40, &2u32.to_le_bytes());
    tb.run(&a);
    done(&mut tb, 99);
    assert_eq!(tb.r32(SCRATCHA), 1);
    assert_eq!(tb.r32(TEMP), 2);
    assert_eq!(tb.ram().read_vec(BUF, 4), 1u32.to_le_bytes());
    assert_eq!(tb.r32(DSP), (SCRIPT + 8 * 4) as u32, "DSP == end + 8");
}

#[test]
fn scripts_fetched_from_scripts_ram() {
    let mut tb = linked("");
    let ram = tb.bar_address(2);
    let mut a = Asm::new();
    a.reg_op(SCRATCHA, 0, 0x77).int(0x55);
    for (i, w) in a.words.iter().enumerate() {
        tb.mmio_write(ram + 0x100 + 4 * i as u64, 4, u64::from(*w));
    }
    tb.w32(DSP, (ram + 0x100) as u32);
    done(&mut tb, 0x55);
    assert_eq!(tb.r8(SCRATCHA), 0x77);
}

#[test]
fn single_step_raises_ssi_after_each_instruction() {
    let mut tb = linked("");
    tb.w8(DCNTL, 0x10); // SSM
    let mut a = Asm::new();
    a.reg_op(SCRATCHA, 0, 1).reg_op(SCRATCHA, 0, 2).int(3);
    tb.run(&a);
    assert_eq!(tb.r8(DSTAT) & 0x08, 0x08, "SSI");
    assert_eq!(tb.r8(SCRATCHA), 1);
    tb.w8(DCNTL, 0x10 | 0x04); // STD: continue one more
    assert_eq!(tb.r8(SCRATCHA), 2);
}

#[test]
fn selection_timeout_reports_dsp_after_next_instruction() {
    let img = Image::new(8);
    let mut tb = linked(&settings_for(&[(&img, 0)]));
    tb.w8(SIEN1, 0x04); // STO
    let mut a = Asm::new();
    a.select_atn(3, 0); // nobody at ID 3
    let wf_sel_done = a.here();
    a.jump_if_phase(MSG_OUT, 0).int(1);
    tb.run(&a);
    assert_eq!(tb.r32(DSP), (wf_sel_done + 8) as u32);
    assert_eq!(tb.r8(SIST1) & 0x04, 0x04);
    assert!(!tb.irq().level(), "SIST1 read clears");
}

#[test]
fn abort_stops_scripts() {
    let mut tb = linked("");
    tb.w8(DIEN, 0x10);
    let mut a = Asm::new();
    a.wait_reselect(0x0);
    tb.run(&a);
    tb.w8(ISTAT0, 0x80);
    assert!(tb.irq().level());
    assert_eq!(u64::from(tb.r8(DSTAT)) & DSTAT_ABRT, DSTAT_ABRT);
    tb.w8(ISTAT0, 0);
}

#[test]
fn sigp_wakes_wait_reselect_to_its_alternate_address() {
    let mut tb = linked("");
    let mut a = Asm::new();
    let alt = SCRIPT + 8 * 2;
    a.wait_reselect(alt).int(1).int(2);
    tb.run(&a);
    assert_eq!(tb.r8(DSTAT) & 0x04, 0, "waiting");
    tb.w8(ISTAT0, 0x20);
    done(&mut tb, 2);
}

#[test]
fn table_indirect_move_uses_40_bit_addresses_as_linux_configures() {
    // CCNTL1 = EN64TIBMV | 64TIMOD: the table's count byte 3 is address
    // bits 39:32. With bits set, the address is above this bench's RAM:
    // the DMA faults (BF) instead of landing at the low address.
    let img = Image::new(16);
    let mut tb = linked(&settings_for(&[(&img, 0)]));
    tb.w8(0x57, 0x06);
    tb.ram().write_all(MSGS_TABLE, &[0x80]);
    // table: {count 1 | hi 0x01, addr MSGS_TABLE}
    tb.ram()
        .write_all(TABLE + 0x20, &(0x0100_0001u32).to_le_bytes());
    tb.ram()
        .write_all(TABLE + 0x24, &(MSGS_TABLE as u32).to_le_bytes());
    let mut a = Asm::new();
    a.select_atn(0, 0).mov_table(MSG_OUT, 0x20).int(1);
    tb.run(&a);
    assert_eq!(u64::from(tb.r8(DSTAT)) & DSTAT_BF, DSTAT_BF);
    // Same table with bits 39:32 = 0 works.
    tb.w8(SCNTL1, 0);
    tb.ram().write_all(TABLE + 0x20, &1u32.to_le_bytes());
    tb.run(&a);
    assert_eq!(u64::from(tb.r8(DSTAT)) & DSTAT_SIR, DSTAT_SIR);
    assert_eq!(tb.r8(SSTAT1) & 7, 2, "IDENTIFY taken: COMMAND phase");
}

const MSGS_TABLE: u64 = 0x9800;
