//! The SCRIPTS processor: fetch, decode, execute, with a work budget so
//! that guest SCRIPTS that never wait cannot hold the caller (a vCPU inside
//! a BAR write) for long. Work is counted in instructions and in bytes
//! copied: a MEMORY MOVE of up to 16 MiB is split into steps of
//! [`MOVE_STEP`] bytes, each costing its share, so neither a loop of small
//! instructions nor a loop of huge moves runs long. When the budget runs
//! out the processor pauses and the I/O worker resumes it a moment later.

use crate::chip::{Chip, PendingMove, RunState};
use crate::instruction::{phase, sext24, AluOp, Condition, Instruction, IoOp, RwOp, TcOp};
use crate::regs::*;
use crate::worker::WorkerMsg;

/// Work units per run before pausing: one per instruction, and one per
/// [`BYTES_PER_UNIT`] bytes a memory move copies (so at most about 2.5 MiB
/// of copying per run).
#[cfg(not(fuzzing))]
pub const DEFAULT_BUDGET: u32 = 10_000;
/// Under the fuzzer (`scripts/fuzz` builds with `--cfg fuzzing`), a
/// twentieth: an input that loops its SCRIPTS otherwise spends its time
/// running them, 10 000 instructions per access, the same paths each
/// time (the budget's own edges, pause and resume, are reached sooner).
#[cfg(fuzzing)]
pub const DEFAULT_BUDGET: u32 = 500;
/// Bytes of memory move that cost one work unit.
pub const BYTES_PER_UNIT: u32 = 256;
/// The most a memory move copies in one step.
pub const MOVE_STEP: u32 = 64 << 10;

/// Why a step could not go on: a bus fault on a DMA the chip made.
struct BusFault;

impl From<()> for BusFault {
    fn from(_: ()) -> Self {
        BusFault
    }
}

impl Chip {
    /// Runs SCRIPTS if a register write asked for it, or a finished
    /// request can be reselected while SCRIPTS wait for one.
    pub fn kick(&mut self) {
        if self.start_pending && self.state != RunState::Running {
            self.start_pending = false;
            self.pending_move = None;
            self.run();
        } else if self.state == RunState::WaitReselect && self.reselect_ready() {
            self.run();
        }
    }

    /// Resumes a paused processor (called by the worker).
    pub fn resume(&mut self) {
        if self.state == RunState::Paused {
            self.run();
        }
    }

    /// Runs until SCRIPTS stop, wait, or exhaust the budget.
    pub fn run(&mut self) {
        if self.state == RunState::Running {
            return; // never reentered
        }
        self.state = RunState::Running;
        self.stats.scripts_runs += 1;
        let mut executed = 0u32;
        let mut work = 0u64;
        let moved_at_start = self.stats.bytes_moved;
        while self.state == RunState::Running {
            if work >= u64::from(self.budget) {
                self.state = RunState::Paused;
                if let Some(w) = &self.worker {
                    w.send(WorkerMsg::Resume);
                }
                break;
            }
            executed += 1;
            let moved_before = self.stats.bytes_moved;
            let r = match self.pending_move {
                Some(m) => self.continue_move(m),
                None => self.step(),
            };
            if r.is_err() {
                self.pending_move = None;
                self.dma_interrupt(DSTAT_BF);
            }
            work += 1 + (self.stats.bytes_moved - moved_before) / u64::from(BYTES_PER_UNIT);
            // Single-step mode stops between instructions, not inside a
            // move's steps.
            if self.state == RunState::Running
                && self.pending_move.is_none()
                && self.regs[DCNTL] & DCNTL_SSM != 0
            {
                self.dma_interrupt(DSTAT_SSI);
            }
        }
        if self.state != RunState::Paused {
            // Stopped, aborted, reset, or waiting: a move cannot outlive
            // the run that was copying it.
            self.pending_move = None;
        }
        self.stats.max_run_work = self.stats.max_run_work.max(work);
        self.stats.max_run_bytes = self
            .stats
            .max_run_bytes
            .max(self.stats.bytes_moved - moved_at_start);
        if self.regs[DSTAT] & (DSTAT_IID | DSTAT_BF) != 0 {
            // Worth a line in the log: the guest's SCRIPTS went wrong.
            self.host.debug(&format!(
                "SCRIPTS stopped after {executed} instructions: DSP {:#x} DSTAT {:#x} SIST {:#x}/{:#x} phase {} connected {}",
                self.dsp(),
                self.regs[DSTAT],
                self.regs[SIST0],
                self.regs[SIST1],
                self.phase(),
                self.connected()
            ));
        }
        self.stats.instructions += u64::from(executed);
        // Writes SCRIPTS made to DSP/DCNTL while running only moved DSP;
        // they must not restart the processor once it stopped.
        self.start_pending = false;
        self.update_irq();
    }

    fn fetch(&mut self, addr: u32) -> Result<u32, BusFault> {
        Ok(self.read_dword(u64::from(addr))?)
    }

    fn jump_target(&self, relative: bool, operand: u32) -> u32 {
        if relative {
            (i64::from(self.dsp()) + sext24(operand)) as u32
        } else {
            operand
        }
    }

    fn step(&mut self) -> Result<(), BusFault> {
        let start = self.dsp();
        let w0 = self.fetch(start)?;
        if w0 == 0 {
            // As QEMU does: an all-zero dword is skipped by 4 bytes (some
            // guests pad SCRIPTS); the budget bounds long runs of them.
            self.set_dsp(start.wrapping_add(4));
            return Ok(());
        }
        let w1 = self.fetch(start.wrapping_add(4))?;
        self.set_dsp(start.wrapping_add(8));
        self.set32(DBC, w0);
        self.set32(DSPS, w1);
        match Instruction::decode(w0, w1) {
            Instruction::BlockMove {
                indirect,
                table_indirect,
                phase,
                count,
                operand,
            } => self.block_move(start, indirect, table_indirect, phase, count, operand),
            Instruction::Io {
                op,
                relative,
                table_indirect,
                atn,
                id,
                set_carry,
                set_target,
                set_atn,
                operand,
                ..
            } => {
                self.set_dnad(operand);
                self.io(
                    op,
                    relative,
                    table_indirect,
                    atn,
                    id,
                    w0,
                    (set_carry, set_target, set_atn),
                    operand,
                )
            }
            Instruction::Register {
                op,
                alu,
                reg,
                imm,
                use_sfbr,
            } => {
                self.register_op(op, alu, reg, imm, use_sfbr);
                Ok(())
            }
            Instruction::TransferControl {
                op,
                relative,
                cond,
                operand,
            } => {
                self.transfer_control(op, relative, cond, operand);
                Ok(())
            }
            Instruction::MemoryMove { count, source } => {
                let dest = self.fetch(self.dsp())?;
                self.set_dsp(self.dsp().wrapping_add(4));
                self.memory_move(count, source, dest)
            }
            Instruction::LoadStore {
                load,
                dsa_relative,
                reg,
                count,
                operand,
            } => self.load_store(load, dsa_relative, reg, count, operand),
            Instruction::Illegal => {
                self.dma_interrupt(DSTAT_IID);
                Ok(())
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn block_move(
        &mut self,
        start: u32,
        indirect: bool,
        table_indirect: bool,
        move_phase: u8,
        count: u32,
        operand: u32,
    ) -> Result<(), BusFault> {
        if self.regs[SIST1] & SIST1_STO != 0 {
            self.stop(); // a pending selection timeout stops here
            return Ok(());
        }
        let (count, addr) = if table_indirect {
            let entry = (i64::from(self.dsa()) + sext24(operand)) as u32;
            self.set32(ESA, entry);
            let c = self.fetch(entry)?;
            let a = self.fetch(entry.wrapping_add(4))?;
            let ccntl1 = self.regs[CCNTL1];
            let high = if ccntl1 & CCNTL1_EN64TIBMV != 0 && ccntl1 & CCNTL1_64TIMOD != 0 {
                u64::from(c >> 24) << 32
            } else {
                0
            };
            (c & 0x00ff_ffff, high | u64::from(a))
        } else if indirect {
            (count, u64::from(self.fetch(operand)?))
        } else {
            (count, u64::from(operand))
        };
        self.set_dnad(addr as u32);
        self.set32(DNAD64, (addr >> 32) as u32);
        self.set_dbc(count);
        self.set32(RBC, count);
        self.set32(UA, addr as u32);
        if count == 0 || !self.connected() {
            // No target is driving the bus, or a zero-length move: the
            // chip reports an illegal instruction rather than hang.
            self.dma_interrupt(DSTAT_IID);
            return Ok(());
        }
        if move_phase != self.phase() {
            let current = self.phase();
            self.set32(IA, start);
            self.phase_mismatch(phase::is_out(move_phase), current);
            return Ok(());
        }
        let moved = match move_phase {
            phase::DATA_OUT => self.data_out(addr, count)?,
            phase::DATA_IN => self.data_in(addr, count)?,
            phase::COMMAND => {
                self.command(addr, count)?;
                count
            }
            phase::STATUS => self.status(addr, count)?,
            phase::MSG_OUT => {
                self.msg_out(addr, count)?;
                count
            }
            phase::MSG_IN => self.msg_in(addr, count)?,
            _ => {
                self.dma_interrupt(DSTAT_IID);
                return Ok(());
            }
        };
        let moved = moved.min(count);
        let remaining = count - moved;
        if matches!(
            move_phase,
            phase::DATA_IN | phase::DATA_OUT | phase::STATUS | phase::MSG_IN
        ) {
            self.set_dnad((addr as u32).wrapping_add(moved));
            self.set_dbc(remaining);
        }
        let csbc = self.get32(CSBC).wrapping_add(moved);
        self.set32(CSBC, csbc);
        self.set32(SBC, moved);
        self.set32(RBC, remaining);
        self.set32(UA, (addr as u32).wrapping_add(moved));
        self.regs[DFIFO] = remaining as u8;
        // A MESSAGE IN move longer than the message is not a mismatch:
        // drivers read "up to N" message bytes (SeaBIOS reads 2 after a
        // reselection that sends only IDENTIFY), as QEMU's model allows.
        if remaining > 0 && move_phase != phase::MSG_IN && self.state == RunState::Running {
            // The target changed phase before the move was done.
            let current = self.phase();
            self.set32(IA, start);
            self.phase_mismatch(phase::is_out(move_phase), current);
        }
        Ok(())
    }

    /// A block move found another phase than it expected: jump through
    /// PMJAD when enabled (Linux does its residual handling there), else
    /// raise MA and stop.
    fn phase_mismatch(&mut self, out: bool, _new_phase: u8) {
        if self.regs[CCNTL0] & CCNTL0_ENPMJ != 0 {
            // Manual: PMJCTL = 0 decides by direction (out → PMJAD1, in →
            // PMJAD2); PMJCTL = 1 decides by SCNTL2.WSR.
            let use_pmjad2 = if self.regs[CCNTL0] & CCNTL0_PMJCTL == 0 {
                !out
            } else {
                self.regs[SCNTL2] & SCNTL2_WSR != 0
            };
            let target = self.get32(if use_pmjad2 { PMJAD2 } else { PMJAD1 });
            self.set_dsp(target);
        } else {
            self.scsi_interrupt(SIST0_MA, 0);
            self.stop();
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn io(
        &mut self,
        op: IoOp,
        relative: bool,
        table_indirect: bool,
        atn: bool,
        id: u8,
        w0: u32,
        (set_carry, set_target, set_atn): (bool, bool, bool),
        operand: u32,
    ) -> Result<(), BusFault> {
        let alt = self.jump_target(relative, operand);
        match op {
            IoOp::Select => {
                let id = if table_indirect {
                    let entry = (i64::from(self.dsa()) + sext24(w0 & 0x00ff_ffff)) as u32;
                    let d = self.fetch(entry)?;
                    self.regs[SCNTL3] = (d >> 24) as u8;
                    self.regs[SXFER] = (d >> 8) as u8;
                    ((d >> 16) & 0xf) as u8
                } else {
                    id
                };
                if self.connected() {
                    // Reselected meanwhile: take the alternate path.
                    self.set_dsp(alt);
                    return Ok(());
                }
                self.select(id, atn);
            }
            IoOp::WaitDisconnect => {
                if self.connected() {
                    self.disconnect();
                }
            }
            IoOp::WaitReselect => {
                if self.regs[ISTAT0] & ISTAT0_SIGP != 0 {
                    self.set_dsp(alt);
                } else if !self.connected() && !self.reselect_ready() {
                    self.state = RunState::WaitReselect;
                }
            }
            IoOp::Set | IoOp::Clear => {
                let set = op == IoOp::Set;
                if set_target && set {
                    self.dma_interrupt(DSTAT_IID); // target mode is not implemented
                    return Ok(());
                }
                if set_atn {
                    if set {
                        self.regs[SOCL] |= SOCL_ATN;
                        if self.connected() {
                            self.set_phase(phase::MSG_OUT);
                        }
                    } else {
                        self.regs[SOCL] &= !SOCL_ATN;
                    }
                }
                if set_carry {
                    self.carry = set;
                }
            }
        }
        Ok(())
    }

    fn register_op(&mut self, op: RwOp, alu: AluOp, reg: u8, imm: u8, use_sfbr: bool) {
        let reg = usize::from(reg);
        let sfbr = self.regs[SFBR];
        let (mut a, b) = match op {
            RwOp::SfbrToReg => (sfbr, imm),
            RwOp::RegToSfbr => (
                if alu == AluOp::Move {
                    0
                } else {
                    self.read_reg(reg)
                },
                imm,
            ),
            RwOp::ReadModifyWrite => (
                if alu == AluOp::Move {
                    0
                } else {
                    self.read_reg(reg)
                },
                if use_sfbr { sfbr } else { imm },
            ),
        };
        match alu {
            AluOp::Move => a = b,
            AluOp::ShiftLeft => {
                let c = a >> 7;
                a = (a << 1) | u8::from(self.carry);
                self.carry = c != 0;
            }
            AluOp::Or => a |= b,
            AluOp::Xor => a ^= b,
            AluOp::And => a &= b,
            AluOp::ShiftRight => {
                let c = a & 1;
                a = (a >> 1) | (u8::from(self.carry) << 7);
                self.carry = c != 0;
            }
            AluOp::Add => {
                let (r, c) = a.overflowing_add(b);
                a = r;
                self.carry = c;
            }
            AluOp::AddWithCarry => {
                let sum = u16::from(a) + u16::from(b) + u16::from(self.carry);
                a = sum as u8;
                self.carry = sum > 0xff;
            }
        }
        match op {
            RwOp::SfbrToReg | RwOp::ReadModifyWrite => self.write_reg(reg, a),
            RwOp::RegToSfbr => self.regs[SFBR] = a,
        }
    }

    fn condition_holds(&self, cond: Condition) -> bool {
        let want = cond.if_true;
        let mut result = want;
        if result == want && cond.carry {
            result = self.carry;
        }
        if result == want && cond.compare_phase {
            result = self.phase() == cond.phase;
        }
        if result == want && cond.compare_data {
            let care = !cond.mask;
            result = self.regs[SFBR] & care == cond.data & care;
        }
        result == want
    }

    fn transfer_control(&mut self, op: TcOp, relative: bool, cond: Condition, operand: u32) {
        if self.regs[SIST1] & SIST1_STO != 0 {
            self.stop();
            return;
        }
        if !(cond.carry || cond.if_true || cond.compare_data || cond.compare_phase) {
            return; // no condition selected: a no-op
        }
        if !self.condition_holds(cond) {
            return;
        }
        match op {
            TcOp::Jump => {
                let t = self.jump_target(relative, operand);
                self.set_dsp(t);
            }
            TcOp::Call => {
                let t = self.jump_target(relative, operand);
                let ret = self.dsp();
                self.set32(TEMP, ret);
                self.set_dsp(t);
            }
            TcOp::Return => {
                let t = self.get32(TEMP);
                self.set_dsp(t);
            }
            TcOp::Interrupt => {
                if Instruction::is_interrupt_on_the_fly(self.get32(DBC)) {
                    self.regs[ISTAT0] |= ISTAT0_INTF;
                    self.update_irq();
                } else {
                    self.set32(DSPS, operand);
                    self.dma_interrupt(DSTAT_SIR);
                }
            }
        }
    }

    fn memory_move(&mut self, count: u32, source: u32, dest: u32) -> Result<(), BusFault> {
        // Snapshot of the length: a move that rewrites DBC through our own
        // registers cannot change how much this instruction copies.
        self.continue_move(PendingMove {
            source,
            dest,
            remaining: count,
        })
    }

    /// Copies up to [`MOVE_STEP`] bytes of `m`; what is left stays pending
    /// for the next step (of this run, or of the run that resumes it).
    fn continue_move(&mut self, m: PendingMove) -> Result<(), BusFault> {
        let total = m.remaining.min(MOVE_STEP) as usize;
        let mut done = 0usize;
        let mut buf = vec![0u8; total.min(4096)];
        while done < total {
            let n = (total - done).min(buf.len());
            let chunk = &mut buf[..n];
            self.dma_read(u64::from(m.source.wrapping_add(done as u32)), chunk)?;
            let data = chunk.to_vec();
            self.dma_write(u64::from(m.dest.wrapping_add(done as u32)), &data)?;
            done += n;
            self.stats.bytes_moved += n as u64;
            if self.state != RunState::Running {
                break; // the copy reset or aborted the chip
            }
        }
        let rest = m.remaining - done as u32;
        self.pending_move = (rest > 0 && self.state == RunState::Running).then_some(PendingMove {
            source: m.source.wrapping_add(done as u32),
            dest: m.dest.wrapping_add(done as u32),
            remaining: rest,
        });
        self.set_dnad(m.dest.wrapping_add(done as u32));
        Ok(())
    }

    fn load_store(
        &mut self,
        load: bool,
        dsa_relative: bool,
        reg: u8,
        count: u8,
        operand: u32,
    ) -> Result<(), BusFault> {
        let n = usize::from(count);
        let reg = usize::from(reg);
        if !(1..=4).contains(&n) || reg + n > 256 {
            self.dma_interrupt(DSTAT_IID);
            return Ok(());
        }
        let addr = if dsa_relative {
            (i64::from(self.dsa()) + sext24(operand)) as u32
        } else {
            operand
        };
        let mut buf = [0u8; 4];
        if load {
            self.dma_read(u64::from(addr), &mut buf[..n])?;
            for (i, b) in buf[..n].iter().enumerate() {
                self.write_reg(reg + i, *b);
            }
        } else {
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = self.read_reg(reg + i);
            }
            self.dma_write(u64::from(addr), &buf[..n])?;
        }
        Ok(())
    }
}
