//! SCRIPTS instructions, decoded into typed values (manual chapter 5).
//!
//! Every instruction is two dwords; memory moves have a third (the
//! destination), fetched by the engine when `needs_third_word` says so.
//! Decoding never fails: encodings the chip does not define decode to
//! [`Instruction::Illegal`], which the engine reports as DSTAT.IID.

/// SCSI phases as the SBCL/SSTAT1 encoding (MSG, C/D, I/O).
pub mod phase {
    pub const DATA_OUT: u8 = 0;
    pub const DATA_IN: u8 = 1;
    pub const COMMAND: u8 = 2;
    pub const STATUS: u8 = 3;
    pub const MSG_OUT: u8 = 6;
    pub const MSG_IN: u8 = 7;

    /// Phases in which data flows from initiator to target.
    pub fn is_out(p: u8) -> bool {
        p & 1 == 0
    }
}

/// I/O instruction operations (bits 29:27 of an `01` instruction).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoOp {
    Select,
    WaitDisconnect,
    WaitReselect,
    Set,
    Clear,
}

/// Read/modify/write register operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RwOp {
    /// reg = SFBR op imm
    SfbrToReg,
    /// SFBR = reg op imm
    RegToSfbr,
    /// reg = reg op imm
    ReadModifyWrite,
}

/// ALU operators of register instructions (bits 26:24).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AluOp {
    Move,
    ShiftLeft,
    Or,
    Xor,
    And,
    ShiftRight,
    Add,
    AddWithCarry,
}

/// Transfer control operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TcOp {
    Jump,
    Call,
    Return,
    Interrupt,
}

/// The condition of a transfer-control instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Condition {
    /// Bit 21: test the ALU carry instead of phase/data.
    pub carry: bool,
    /// Bit 19: act when the comparison is true (else when false).
    pub if_true: bool,
    /// Bit 18: compare SFBR with `data` under `mask`.
    pub compare_data: bool,
    /// Bit 17: compare the SCSI phase with `phase`.
    pub compare_phase: bool,
    /// Bit 16: wait for a valid phase before comparing.
    pub wait_valid: bool,
    pub phase: u8,
    /// Bits set in `mask` are ignored in the data comparison.
    pub mask: u8,
    pub data: u8,
}

/// A decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Instruction {
    BlockMove {
        indirect: bool,
        table_indirect: bool,
        phase: u8,
        count: u32,
        /// Second dword: address, or table offset (24-bit signed) from DSA.
        operand: u32,
    },
    Io {
        op: IoOp,
        relative: bool,
        table_indirect: bool,
        atn: bool,
        /// Target ID (bits 19:16), unless table indirect.
        id: u8,
        set_carry: bool,
        set_target: bool,
        set_ack: bool,
        set_atn: bool,
        /// Second dword: jump address (or table offset when table indirect).
        operand: u32,
    },
    Register {
        op: RwOp,
        alu: AluOp,
        reg: u8,
        imm: u8,
        use_sfbr: bool,
    },
    TransferControl {
        op: TcOp,
        relative: bool,
        cond: Condition,
        /// Jump target, or interrupt vector for INT.
        operand: u32,
    },
    MemoryMove {
        count: u32,
        source: u32,
    },
    LoadStore {
        load: bool,
        dsa_relative: bool,
        reg: u8,
        count: u8,
        operand: u32,
    },
    Illegal,
}

impl Instruction {
    /// Decodes the first two dwords (DCMD/DBC and DSPS).
    pub fn decode(w0: u32, w1: u32) -> Instruction {
        let bit = |n: u32| w0 & (1 << n) != 0;
        match w0 >> 30 {
            0 => Instruction::BlockMove {
                indirect: bit(29),
                table_indirect: bit(28),
                phase: ((w0 >> 24) & 7) as u8,
                count: w0 & 0x00ff_ffff,
                operand: w1,
            },
            1 => {
                let opcode = (w0 >> 27) & 7;
                if opcode >= 5 {
                    let op = match opcode {
                        5 => RwOp::SfbrToReg,
                        6 => RwOp::RegToSfbr,
                        _ => RwOp::ReadModifyWrite,
                    };
                    let alu = match (w0 >> 24) & 7 {
                        0 => AluOp::Move,
                        1 => AluOp::ShiftLeft,
                        2 => AluOp::Or,
                        3 => AluOp::Xor,
                        4 => AluOp::And,
                        5 => AluOp::ShiftRight,
                        6 => AluOp::Add,
                        _ => AluOp::AddWithCarry,
                    };
                    let reg = (((w0 >> 16) & 0x7f) | (w0 & 0x80)) as u8;
                    return Instruction::Register {
                        op,
                        alu,
                        reg,
                        imm: (w0 >> 8) as u8,
                        use_sfbr: bit(23),
                    };
                }
                let op = match opcode {
                    0 => IoOp::Select,
                    1 => IoOp::WaitDisconnect,
                    2 => IoOp::WaitReselect,
                    3 => IoOp::Set,
                    _ => IoOp::Clear,
                };
                Instruction::Io {
                    op,
                    relative: bit(26),
                    table_indirect: bit(25),
                    atn: bit(24),
                    id: ((w0 >> 16) & 0xf) as u8,
                    set_carry: bit(10),
                    set_target: bit(9),
                    set_ack: bit(6),
                    set_atn: bit(3),
                    operand: w1,
                }
            }
            2 => {
                let op = match (w0 >> 27) & 7 {
                    0 => TcOp::Jump,
                    1 => TcOp::Call,
                    2 => TcOp::Return,
                    3 => TcOp::Interrupt,
                    _ => return Instruction::Illegal,
                };
                Instruction::TransferControl {
                    op,
                    relative: bit(23),
                    cond: Condition {
                        carry: bit(21),
                        if_true: bit(19),
                        compare_data: bit(18),
                        compare_phase: bit(17),
                        wait_valid: bit(16),
                        phase: ((w0 >> 24) & 7) as u8,
                        mask: (w0 >> 8) as u8,
                        data: w0 as u8,
                    },
                    operand: w1,
                }
            }
            _ => {
                if bit(29) {
                    Instruction::LoadStore {
                        load: bit(24),
                        dsa_relative: bit(28),
                        reg: (w0 >> 16) as u8,
                        count: (w0 & 7) as u8,
                        operand: w1,
                    }
                } else {
                    Instruction::MemoryMove {
                        count: w0 & 0x00ff_ffff,
                        source: w1,
                    }
                }
            }
        }
    }

    /// Whether this instruction is INTFLY (interrupt on the fly).
    pub fn is_interrupt_on_the_fly(w0: u32) -> bool {
        w0 >> 30 == 2 && (w0 >> 27) & 7 == 3 && w0 & (1 << 20) != 0
    }
}

/// Sign-extends a 24-bit value.
pub fn sext24(v: u32) -> i64 {
    i64::from(((v << 8) as i32) >> 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_move_table_indirect_chmov_data_in() {
        // SCR_CHMOV_TBL ^ SCR_DATA_IN, offsetof(data[0])
        let i = Instruction::decode(0x1100_0000, 0x0000_0040);
        assert_eq!(
            i,
            Instruction::BlockMove {
                indirect: false,
                table_indirect: true,
                phase: phase::DATA_IN,
                count: 0,
                operand: 0x40
            }
        );
        let i = Instruction::decode(0x0e00_0001, 0x1234);
        assert!(matches!(
            i,
            Instruction::BlockMove {
                phase: phase::MSG_OUT,
                count: 1,
                ..
            }
        ));
    }

    #[test]
    fn select_with_atn_table_indirect() {
        // SCR_SEL_TBL_ATN ^ offsetof(select), alt address
        let i = Instruction::decode(0x4300_0000, 0x100);
        match i {
            Instruction::Io {
                op: IoOp::Select,
                table_indirect: true,
                atn: true,
                relative: false,
                operand: 0x100,
                ..
            } => {}
            other => panic!("{other:?}"),
        }
        let i = Instruction::decode(0x5000_0000, 0x200);
        assert!(matches!(
            i,
            Instruction::Io {
                op: IoOp::WaitReselect,
                operand: 0x200,
                ..
            }
        ));
        // SET ATN / CLEAR ACK|CARRY
        let i = Instruction::decode(0x5800_0008, 0);
        assert!(matches!(
            i,
            Instruction::Io {
                op: IoOp::Set,
                set_atn: true,
                ..
            }
        ));
        let i = Instruction::decode(0x6000_0440, 0);
        assert!(matches!(
            i,
            Instruction::Io {
                op: IoOp::Clear,
                set_ack: true,
                set_carry: true,
                ..
            }
        ));
    }

    #[test]
    fn register_instructions() {
        // SCR_REG_REG(scratcha, SCR_OR, 0x01) = 0x7834_0100 | ...
        let i = Instruction::decode(0x7a34_0100, 0);
        assert_eq!(
            i,
            Instruction::Register {
                op: RwOp::ReadModifyWrite,
                alu: AluOp::Or,
                reg: 0x34,
                imm: 1,
                use_sfbr: false
            }
        );
        // A7 in bit 7: register 0xc0 (PMJAD1)
        let i = Instruction::decode(0x7840_0080, 0);
        assert!(matches!(i, Instruction::Register { reg: 0xc0, .. }));
        // SFBR to reg with SFBR as operand
        let i = Instruction::decode(0x6800_0000 | 0x34 << 16, 0);
        assert!(matches!(
            i,
            Instruction::Register {
                op: RwOp::SfbrToReg,
                alu: AluOp::Move,
                ..
            }
        ));
    }

    #[test]
    fn transfer_control() {
        // SCR_JUMP ^ IFTRUE (WHEN (SCR_DATA_IN)) = 0x810b_0000
        let i = Instruction::decode(0x810b_0000, 0x300);
        match i {
            Instruction::TransferControl {
                op: TcOp::Jump,
                cond,
                operand: 0x300,
                relative: false,
            } => {
                assert!(cond.if_true && cond.compare_phase && cond.wait_valid);
                assert_eq!(cond.phase, phase::DATA_IN);
            }
            other => panic!("{other:?}"),
        }
        // SCR_INT ^ IFFALSE (DATA (0x00)) ... INT with data compare
        let i = Instruction::decode(0x9804_0000, 99);
        assert!(matches!(
            i,
            Instruction::TransferControl {
                op: TcOp::Interrupt,
                operand: 99,
                ..
            }
        ));
        assert!(Instruction::is_interrupt_on_the_fly(0x9810_0000));
        assert!(!Instruction::is_interrupt_on_the_fly(0x9800_0000));
        assert_eq!(Instruction::decode(0xa000_0000, 0), Instruction::Illegal);
    }

    #[test]
    fn memory_move_and_load_store() {
        let i = Instruction::decode(0xc000_0004, 0x1000);
        assert_eq!(
            i,
            Instruction::MemoryMove {
                count: 4,
                source: 0x1000
            }
        );
        // SCR_LOAD_REL (scratcha, 4) = 0xf134_0004
        let i = Instruction::decode(0xf134_0004, 0x10);
        assert_eq!(
            i,
            Instruction::LoadStore {
                load: true,
                dsa_relative: true,
                reg: 0x34,
                count: 4,
                operand: 0x10
            }
        );
        let i = Instruction::decode(0xe010_0004, 0x2000);
        assert!(matches!(
            i,
            Instruction::LoadStore {
                load: false,
                dsa_relative: false,
                reg: 0x10,
                ..
            }
        ));
    }

    #[test]
    fn sign_extension() {
        assert_eq!(sext24(0xff_fff8), -8);
        assert_eq!(sext24(0x00_0010), 16);
        assert_eq!(sext24(0xab00_0001), 1, "upper byte ignored");
    }
}
