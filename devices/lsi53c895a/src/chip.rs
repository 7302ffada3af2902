//! The chip's register file, its read/write side effects, the interrupt
//! logic and DMA routing (guest memory, or the chip's own BARs).
//!
//! All state lives in [`Chip`], behind one lock held by whoever drives the
//! chip: a BAR access, or the I/O worker completing a command. Nothing in
//! here runs SCRIPTS recursively: a register write that would start
//! SCRIPTS only records the request ([`Chip::start_pending`]); the caller
//! runs the processor after the access, and a write made *by* SCRIPTS
//! (memory move into BAR1) just changes the registers the running loop
//! reads next. That removes the reentrancy class of bugs by construction.

use std::collections::BTreeMap;
use std::sync::Arc;

use block::ScsiDisk;
use plugin_api::Host;

use crate::instruction::phase;
use crate::regs::*;
use crate::scsi::Bus;
use crate::worker::WorkerHandle;

/// Size of the SCRIPTS RAM (BAR2).
pub const SCRIPT_RAM_SIZE: usize = 0x2000;
/// Size of the register window in memory space (BAR1).
pub const REG_BAR_SIZE: u64 = 0x400;

/// Whether the SCRIPTS processor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    Stopped,
    Running,
    /// Stopped in WAIT RESELECT: a reselection or SIGP resumes it.
    WaitReselect,
    /// The instruction budget ran out; the worker resumes it shortly.
    Paused,
}

/// The controller.
pub struct Chip {
    pub(crate) regs: [u8; 256],
    pub(crate) script_ram: Vec<u8>,
    /// Guest addresses of BAR1 (registers) and BAR2 (SCRIPTS RAM), as the
    /// guest programmed them; 0 = not placed.
    pub(crate) bar1: u64,
    pub(crate) bar2: u64,
    pub(crate) bar_shadow: [[u8; 4]; 3],
    pub(crate) host: Host,
    pub(crate) state: RunState,
    pub(crate) start_pending: bool,
    pub(crate) carry: bool,
    pub(crate) irq_level: bool,
    pub(crate) bus: Bus,
    pub(crate) targets: BTreeMap<u8, Arc<ScsiDisk>>,
    pub(crate) worker: Option<WorkerHandle>,
    /// Set while SCRIPTS run inside a posted BAR write (no vCPU waits for
    /// it: `control::POSTED_WRITES`): a disk command then runs at once,
    /// without the worker.
    pub(crate) posted: bool,
    /// How long the disk's last command took (inline or on the worker).
    pub(crate) last_execute: std::time::Duration,
    /// Work units a run may do before it pauses (see
    /// [`crate::scripts::DEFAULT_BUDGET`]).
    pub(crate) budget: u32,
    /// A memory move still copying: it goes on in later steps (and runs),
    /// so one instruction never copies more than a step's share.
    pub(crate) pending_move: Option<PendingMove>,
    pub(crate) stats: Stats,
}

/// The rest of a MEMORY MOVE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PendingMove {
    pub source: u32,
    pub dest: u32,
    pub remaining: u32,
}

/// Counters for the log at shutdown (and for tuning).
#[derive(Default, Debug, Clone, Copy)]
pub struct Stats {
    pub bar_reads: u64,
    pub bar_writes: u64,
    pub scripts_runs: u64,
    pub instructions: u64,
    pub commands: u64,
    /// Medium commands run at once in a posted access (no worker, no
    /// disconnect: `control::POSTED_WRITES`).
    pub commands_inline: u64,
    pub reselections: u64,
    /// Bytes SCRIPTS memory moves copied.
    pub bytes_moved: u64,
    /// The most work units one run did (the budget bounds it, give or take
    /// one step): what a BAR access that starts SCRIPTS can cost.
    pub max_run_work: u64,
    /// The most bytes one run's memory moves copied.
    pub max_run_bytes: u64,
}

impl Chip {
    pub fn new(host: Host, targets: BTreeMap<u8, Arc<ScsiDisk>>) -> Chip {
        let mut chip = Chip {
            regs: [0; 256],
            script_ram: vec![0; SCRIPT_RAM_SIZE],
            bar1: 0,
            bar2: 0,
            bar_shadow: [[0; 4]; 3],
            host,
            state: RunState::Stopped,
            start_pending: false,
            carry: false,
            irq_level: false,
            bus: Bus::default(),
            targets,
            worker: None,
            posted: false,
            last_execute: std::time::Duration::ZERO,
            budget: crate::scripts::DEFAULT_BUDGET,
            pending_move: None,
            stats: Stats::default(),
        };
        chip.soft_reset();
        chip
    }

    // ---- plain register helpers -------------------------------------

    pub(crate) fn get32(&self, off: usize) -> u32 {
        let o = off & 0xfc;
        u32::from_le_bytes([
            self.regs[o],
            self.regs[o + 1],
            self.regs[o + 2],
            self.regs[o + 3],
        ])
    }

    pub(crate) fn set32(&mut self, off: usize, v: u32) {
        let o = off & 0xfc;
        self.regs[o..o + 4].copy_from_slice(&v.to_le_bytes());
    }

    pub(crate) fn dsp(&self) -> u32 {
        self.get32(DSP)
    }
    pub(crate) fn set_dsp(&mut self, v: u32) {
        self.set32(DSP, v);
    }
    pub(crate) fn dsa(&self) -> u32 {
        self.get32(DSA)
    }
    pub(crate) fn dbc(&self) -> u32 {
        self.get32(DBC) & 0x00ff_ffff
    }
    pub(crate) fn set_dbc(&mut self, v: u32) {
        let dcmd = self.regs[DCMD];
        self.set32(DBC, (v & 0x00ff_ffff) | u32::from(dcmd) << 24);
    }
    pub(crate) fn dnad(&self) -> u32 {
        self.get32(DNAD)
    }
    pub(crate) fn set_dnad(&mut self, v: u32) {
        self.set32(DNAD, v);
    }
    pub(crate) fn connected(&self) -> bool {
        self.regs[SCNTL1] & SCNTL1_CON != 0
    }

    /// Current SCSI phase (SSTAT1 bits 2:0).
    pub(crate) fn phase(&self) -> u8 {
        self.regs[SSTAT1] & 7
    }

    pub(crate) fn set_phase(&mut self, p: u8) {
        self.regs[SSTAT1] = (self.regs[SSTAT1] & !7) | (p & 7);
        self.regs[SBCL] = (self.regs[SBCL] & !7) | (p & 7) | SBCL_REQ;
    }

    // ---- resets --------------------------------------------------------

    /// Power-on / software reset of the chip (ISTAT.SRST, PCI reset).
    pub fn soft_reset(&mut self) {
        self.regs = [0; 256];
        self.regs[SCNTL0] = 0xc0;
        self.regs[SCID] = 0x07;
        self.regs[CTEST2] = 0x01;
        self.regs[MACNTL] = 0x50;
        self.regs[GPREG] = 0x0f;
        self.state = RunState::Stopped;
        self.start_pending = false;
        self.pending_move = None;
        self.carry = false;
        self.cancel_all_requests();
        self.bus.reset();
        self.update_irq();
    }

    /// SCSI bus reset: every target drops its commands and reports a unit
    /// attention; the controller is disconnected.
    pub(crate) fn scsi_bus_reset(&mut self) {
        self.cancel_all_requests();
        self.disconnect();
        for disk in self.targets.values() {
            disk.reset();
        }
    }

    /// Another initiator reset the SCSI bus: what this controller reports
    /// when it comes back from a state its guest has moved past
    /// (`control::RESUME_AFTER_LOSS`). The bus and its targets reset as
    /// for a reset the driver asserts, and the chip reports it (SIST0
    /// RST, a fatal interrupt: SCRIPTS stop, and the driver enables it).
    /// The Linux driver then starts the chip up again and completes every
    /// command it had outstanding with DID_RESET, which the SCSI midlayer
    /// issues again; the RST line itself is not left asserted (SSTAT0).
    pub(crate) fn bus_reset_detected(&mut self) {
        self.scsi_bus_reset();
        self.scsi_interrupt(SIST0_RST, 0);
    }

    // ---- interrupts ----------------------------------------------------

    /// Recomputes ISTAT's DIP/SIP and the INTx level.
    pub(crate) fn update_irq(&mut self) {
        let dstat = self.regs[DSTAT];
        let (sist0, sist1) = (self.regs[SIST0], self.regs[SIST1]);
        let mut level = false;
        if dstat != 0 {
            level |= dstat & self.regs[DIEN] != 0;
            self.regs[ISTAT0] |= ISTAT0_DIP;
        } else {
            self.regs[ISTAT0] &= !ISTAT0_DIP;
        }
        if sist0 != 0 || sist1 != 0 {
            level |= sist0 & self.regs[SIEN0] != 0 || sist1 & self.regs[SIEN1] != 0;
            self.regs[ISTAT0] |= ISTAT0_SIP;
        } else {
            self.regs[ISTAT0] &= !ISTAT0_SIP;
        }
        level |= self.regs[ISTAT0] & ISTAT0_INTF != 0;
        if level != self.irq_level {
            self.irq_level = level;
            self.host.set_intx(level);
        }
    }

    /// Stops the SCRIPTS processor.
    pub(crate) fn stop(&mut self) {
        self.state = RunState::Stopped;
    }

    /// A DMA interrupt (DSTAT): always stops SCRIPTS.
    pub(crate) fn dma_interrupt(&mut self, stat: u8) {
        self.regs[DSTAT] |= stat;
        self.update_irq();
        self.stop();
    }

    /// A SCSI interrupt (SIST0/1). Stops SCRIPTS when fatal or enabled;
    /// selection timeout never stops at once (the next bus instruction
    /// does), as the real chip behaves.
    pub(crate) fn scsi_interrupt(&mut self, stat0: u8, stat1: u8) {
        self.regs[SIST0] |= stat0;
        self.regs[SIST1] |= stat1;
        let mask0 = self.regs[SIEN0] | !(SIST0_CMP | SIST0_SEL | SIST0_RSL);
        let mask1 = (self.regs[SIEN1] | !(SIST1_GEN | SIST1_HTH)) & !SIST1_STO;
        if self.regs[SIST0] & mask0 != 0 || self.regs[SIST1] & mask1 != 0 {
            self.stop();
        }
        self.update_irq();
    }

    // ---- register access with side effects -----------------------------

    /// A register read as the guest (or SCRIPTS) makes it.
    pub fn read_reg(&mut self, off: usize) -> u8 {
        let off = off & 0xff;
        match off {
            GPREG => GPREG_READ,
            SBCL => {
                if self.connected() {
                    self.regs[SBCL] | SBCL_BSY
                } else {
                    0
                }
            }
            DSTAT => {
                let v = self.regs[DSTAT] | DSTAT_DFE;
                if self.regs[ISTAT0] & ISTAT0_INTF == 0 {
                    self.regs[DSTAT] = 0;
                    self.update_irq();
                }
                v
            }
            SSTAT2 => 0,
            ISTAT0 => {
                let con = if self.connected() { ISTAT0_CON } else { 0 };
                (self.regs[ISTAT0] & !ISTAT0_CON) | con
            }
            ISTAT1 => {
                let run = if self.state == RunState::Running {
                    ISTAT1_SRUN
                } else {
                    0
                };
                (self.regs[ISTAT1] & !ISTAT1_SRUN) | run
            }
            CTEST2 => {
                let mut v = self.regs[CTEST2] | 0x08; // DACK | CM
                if self.regs[ISTAT0] & ISTAT0_SIGP != 0 {
                    self.regs[ISTAT0] &= !ISTAT0_SIGP;
                    v |= CTEST2_SIGP;
                }
                v
            }
            DFIFO => self.dbc() as u8,
            SIST0 | SIST1 => {
                let v = self.regs[off];
                self.regs[off] = 0;
                self.update_irq();
                v
            }
            STEST4 => STEST4_LVD_LOCKED,
            SBDL => {
                if self.connected() && self.phase() == phase::MSG_IN {
                    self.bus.msg_in.front().copied().unwrap_or(0)
                } else {
                    0
                }
            }
            _ => self.regs[off],
        }
    }

    /// A register write as the guest (or SCRIPTS) makes it.
    pub fn write_reg(&mut self, off: usize, val: u8) {
        let off = off & 0xff;
        match off {
            SCNTL1 => {
                let was_connected = self.connected();
                self.regs[SCNTL1] = val & !0x01;
                if val & SCNTL1_RST != 0 {
                    if self.regs[SSTAT0] & SSTAT0_RST == 0 {
                        self.scsi_bus_reset();
                        self.regs[SSTAT0] |= SSTAT0_RST;
                        self.scsi_interrupt(SIST0_RST, 0);
                    }
                } else {
                    self.regs[SSTAT0] &= !SSTAT0_RST;
                }
                if was_connected && val & SCNTL1_CON == 0 {
                    self.disconnect();
                }
            }
            // Status registers are read-only (the driver's register test
            // relies on writes to 0x0c..0x0f not sticking).
            DSTAT
            | SSTAT0
            | SSTAT1
            | SSTAT2
            | SIST0
            | SIST1
            | STEST0
            | SIDL
            | STEST4
            | SBDL
            | 0x3c..=0x3f => {}
            ISTAT0 => {
                self.regs[ISTAT0] = (self.regs[ISTAT0] & 0x0f) | (val & 0xf0);
                if val & ISTAT0_ABRT != 0 {
                    self.dma_interrupt(DSTAT_ABRT);
                }
                if val & ISTAT0_INTF != 0 {
                    self.regs[ISTAT0] &= !ISTAT0_INTF;
                    self.update_irq();
                }
                if val & ISTAT0_SIGP != 0 && self.state == RunState::WaitReselect {
                    // Woken from WAIT RESELECT: continue at its alternate
                    // address (kept in DNAD).
                    self.state = RunState::Stopped;
                    let alt = self.dnad();
                    self.set_dsp(alt);
                    self.start_pending = true;
                }
                if val & ISTAT0_SRST != 0 {
                    self.soft_reset();
                }
            }
            CTEST2 => {}
            DSP..=0x2f => {
                self.regs[off] = val;
                if off == DSP + 3 && self.regs[DMODE] & DMODE_MAN == 0 {
                    self.start_pending = true;
                }
            }
            DCNTL => {
                self.regs[DCNTL] = val & !DCNTL_STD;
                if val & DCNTL_STD != 0 {
                    self.start_pending = true;
                }
            }
            DIEN | SIEN0 | SIEN1 => {
                self.regs[off] = val;
                self.update_irq();
            }
            _ => self.regs[off] = val,
        }
    }

    // ---- BAR placement, tracked from config writes ---------------------

    /// Notes a guest configuration write, to know where BAR1/BAR2 sit so
    /// SCRIPTS DMA aimed at them is served locally.
    pub fn note_config_write(&mut self, offset: u16, data: &[u8]) {
        for (i, b) in data.iter().enumerate() {
            let off = usize::from(offset) + i;
            if (0x14..0x1c).contains(&off) {
                let bar = (off - 0x10) / 4;
                self.bar_shadow[bar][off & 3] = *b;
            }
        }
        let bar1 = u32::from_le_bytes(self.bar_shadow[1]);
        let bar2 = u32::from_le_bytes(self.bar_shadow[2]);
        self.bar1 = u64::from(bar1) & !(REG_BAR_SIZE - 1);
        self.bar2 = u64::from(bar2) & !(SCRIPT_RAM_SIZE as u64 - 1);
    }

    fn local_window(&self, addr: u64) -> Option<(bool, usize)> {
        if self.bar1 != 0 && addr >= self.bar1 && addr < self.bar1 + REG_BAR_SIZE {
            return Some((true, ((addr - self.bar1) & 0xff) as usize));
        }
        if self.bar2 != 0 && addr >= self.bar2 && addr < self.bar2 + SCRIPT_RAM_SIZE as u64 {
            return Some((false, (addr - self.bar2) as usize));
        }
        None
    }

    fn overlaps_local(&self, addr: u64, len: u64) -> bool {
        let end = addr.saturating_add(len);
        let hit = |base: u64, size: u64| base != 0 && addr < base + size && base < end;
        hit(self.bar1, REG_BAR_SIZE) || hit(self.bar2, SCRIPT_RAM_SIZE as u64)
    }

    /// DMA read by the chip. Addresses in the chip's own BARs are served
    /// locally (register reads keep their side effects); the rest goes to
    /// guest memory. `Err` is a bus fault.
    pub(crate) fn dma_read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), ()> {
        if !self.overlaps_local(addr, buf.len() as u64) {
            return self.host.dma_read(addr, buf).map_err(|_| ());
        }
        for (i, b) in buf.iter_mut().enumerate() {
            let a = addr.wrapping_add(i as u64);
            *b = match self.local_window(a) {
                Some((true, reg)) => self.read_reg(reg),
                Some((false, off)) => self.script_ram[off],
                None => {
                    let mut one = [0u8];
                    self.host.dma_read(a, &mut one).map_err(|_| ())?;
                    one[0]
                }
            };
        }
        Ok(())
    }

    /// DMA write by the chip; same routing as [`Chip::dma_read`].
    pub(crate) fn dma_write(&mut self, addr: u64, data: &[u8]) -> Result<(), ()> {
        if !self.overlaps_local(addr, data.len() as u64) {
            return self.host.dma_write(addr, data).map_err(|_| ());
        }
        for (i, b) in data.iter().enumerate() {
            let a = addr.wrapping_add(i as u64);
            match self.local_window(a) {
                Some((true, reg)) => self.write_reg(reg, *b),
                Some((false, off)) => self.script_ram[off] = *b,
                None => self.host.dma_write(a, &[*b]).map_err(|_| ())?,
            }
        }
        Ok(())
    }

    pub(crate) fn read_dword(&mut self, addr: u64) -> Result<u32, ()> {
        let mut b = [0u8; 4];
        self.dma_read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }
}
