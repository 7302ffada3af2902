//! A tiny SCRIPTS assembler and a bench with disks, for the controller's
//! harness tests.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::Duration;

use plugin_api::harness::{PluginSource, TestBench};

pub const DATA_OUT: u32 = 0;
pub const DATA_IN: u32 = 1;
pub const COMMAND: u32 = 2;
pub const STATUS: u32 = 3;
pub const MSG_OUT: u32 = 6;
pub const MSG_IN: u32 = 7;

// Register offsets used by tests.
pub const SCNTL0: u64 = 0x00;
pub const SCNTL1: u64 = 0x01;
pub const SCID: u64 = 0x04;
pub const GPREG: u64 = 0x07;
pub const SFBR: u64 = 0x08;
pub const SSID: u64 = 0x0a;
pub const SBCL: u64 = 0x0b;
pub const DSTAT: u64 = 0x0c;
pub const SSTAT0: u64 = 0x0d;
pub const SSTAT1: u64 = 0x0e;
pub const SSTAT2: u64 = 0x0f;
pub const DSA: u64 = 0x10;
pub const ISTAT0: u64 = 0x14;
pub const CTEST2: u64 = 0x1a;
pub const TEMP: u64 = 0x1c;
pub const DBC: u64 = 0x24;
pub const DNAD: u64 = 0x28;
pub const DSP: u64 = 0x2c;
pub const DSPS: u64 = 0x30;
pub const SCRATCHA: u64 = 0x34;
pub const DIEN: u64 = 0x39;
pub const DCNTL: u64 = 0x3b;
pub const SIEN0: u64 = 0x40;
pub const SIEN1: u64 = 0x41;
pub const SIST0: u64 = 0x42;
pub const SIST1: u64 = 0x43;
pub const STEST3: u64 = 0x4f;
pub const SIDL: u64 = 0x50;
pub const STEST4: u64 = 0x52;
pub const CCNTL0: u64 = 0x56;
pub const SBDL: u64 = 0x58;
pub const SCRATCHB: u64 = 0x5c;
pub const PMJAD1: u64 = 0xc0;
pub const PMJAD2: u64 = 0xc4;
pub const RBC: u64 = 0xc8;
pub const UA: u64 = 0xcc;
pub const IA: u64 = 0xd4;

pub const DSTAT_DFE: u64 = 0x80;
pub const DSTAT_BF: u64 = 0x20;
pub const DSTAT_ABRT: u64 = 0x10;
pub const DSTAT_SIR: u64 = 0x04;
pub const DSTAT_IID: u64 = 0x01;

/// Where tests put their SCRIPTS.
pub const SCRIPT: u64 = 0x1000;
/// A data buffer area.
pub const BUF: u64 = 0x10_0000;
/// Where the DSA points.
pub const TABLE: u64 = 0x8000;

/// SCRIPTS as dwords.
#[derive(Default)]
pub struct Asm {
    pub words: Vec<u32>,
}

impl Asm {
    pub fn new() -> Self {
        Self::default()
    }
    /// Address of the next instruction.
    pub fn here(&self) -> u64 {
        SCRIPT + 4 * self.words.len() as u64
    }
    fn push(&mut self, w: &[u32]) -> &mut Self {
        self.words.extend_from_slice(w);
        self
    }
    pub fn int(&mut self, vector: u32) -> &mut Self {
        self.push(&[0x9808_0000, vector])
    }
    pub fn int_fly(&mut self) -> &mut Self {
        self.push(&[0x9818_0000, 0])
    }
    pub fn jump(&mut self, to: u64) -> &mut Self {
        self.push(&[0x8008_0000, to as u32])
    }
    pub fn jump_rel(&mut self, delta: i32) -> &mut Self {
        self.push(&[0x8088_0000, (delta as u32) & 0xff_ffff])
    }
    pub fn jump_if_phase(&mut self, phase: u32, to: u64) -> &mut Self {
        self.push(&[0x800a_0000 | phase << 24, to as u32])
    }
    pub fn jump_if_data(&mut self, data: u8, to: u64) -> &mut Self {
        self.push(&[0x800c_0000 | u32::from(data), to as u32])
    }
    pub fn jump_if_carry(&mut self, to: u64) -> &mut Self {
        self.push(&[0x8028_0000, to as u32])
    }
    pub fn call(&mut self, to: u64) -> &mut Self {
        self.push(&[0x8808_0000, to as u32])
    }
    pub fn ret(&mut self) -> &mut Self {
        self.push(&[0x9008_0000, 0])
    }
    pub fn nop(&mut self) -> &mut Self {
        self.push(&[0x8000_0000, 0])
    }
    /// reg = reg op imm (op: 0 move, 1 shl, 2 or, 3 xor, 4 and, 5 shr, 6 add, 7 adc)
    pub fn reg_op(&mut self, reg: u64, op: u32, imm: u8) -> &mut Self {
        let r = reg as u32;
        self.push(&[
            0x7800_0000 | op << 24 | (r & 0x7f) << 16 | (r & 0x80) | u32::from(imm) << 8,
            0,
        ])
    }
    /// SFBR = reg op imm
    pub fn reg_to_sfbr(&mut self, reg: u64, op: u32, imm: u8) -> &mut Self {
        let r = reg as u32;
        self.push(&[
            0x7000_0000 | op << 24 | (r & 0x7f) << 16 | (r & 0x80) | u32::from(imm) << 8,
            0,
        ])
    }
    pub fn select_atn(&mut self, id: u8, alt: u64) -> &mut Self {
        self.push(&[0x4100_0000 | u32::from(id) << 16, alt as u32])
    }
    pub fn wait_disconnect(&mut self) -> &mut Self {
        self.push(&[0x4800_0000, 0])
    }
    pub fn wait_reselect(&mut self, alt: u64) -> &mut Self {
        self.push(&[0x5000_0000, alt as u32])
    }
    pub fn set_atn(&mut self) -> &mut Self {
        self.push(&[0x5800_0008, 0])
    }
    pub fn clear_ack(&mut self) -> &mut Self {
        self.push(&[0x6000_0040, 0])
    }
    pub fn mov(&mut self, phase: u32, count: u32, addr: u64) -> &mut Self {
        self.push(&[0x0800_0000 | phase << 24 | count, addr as u32])
    }
    /// Table indirect CHMOV: {count, addr} at DSA + offset.
    pub fn mov_table(&mut self, phase: u32, offset: u32) -> &mut Self {
        self.push(&[0x1000_0000 | phase << 24, offset])
    }
    pub fn mem_move(&mut self, count: u32, src: u64, dst: u64) -> &mut Self {
        self.push(&[0xc000_0000 | count, src as u32, dst as u32])
    }
    pub fn load(&mut self, reg: u64, n: u32, addr: u64) -> &mut Self {
        self.push(&[0xe100_0000 | (reg as u32) << 16 | n, addr as u32])
    }
    pub fn store(&mut self, reg: u64, n: u32, addr: u64) -> &mut Self {
        self.push(&[0xe000_0000 | (reg as u32) << 16 | n, addr as u32])
    }
    pub fn load_rel(&mut self, reg: u64, n: u32, offset: u32) -> &mut Self {
        self.push(&[0xf100_0000 | (reg as u32) << 16 | n, offset])
    }
    pub fn store_rel(&mut self, reg: u64, n: u32, offset: u32) -> &mut Self {
        self.push(&[0xf000_0000 | (reg as u32) << 16 | n, offset])
    }
    pub fn raw(&mut self, w: &[u32]) -> &mut Self {
        self.push(w)
    }
    pub fn bytes(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

/// A disk image file with known contents.
pub struct Image {
    pub dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl Image {
    pub fn new(blocks: u64) -> Image {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");
        let data: Vec<u8> = (0..blocks * 512)
            .map(|i| ((i / 512) as u8) ^ (i as u8).wrapping_mul(31))
            .collect();
        std::fs::write(&path, data).unwrap();
        Image { dir, path }
    }

    pub fn read(&self) -> Vec<u8> {
        std::fs::read(&self.path).unwrap()
    }
}

pub fn settings_for(images: &[(&Image, u8)]) -> String {
    images
        .iter()
        .map(|(img, id)| format!("[[drive]]\nfile = {:?}\nscsi-id = {id}\n", img.path))
        .collect()
}

/// An LSI bench with BARs mapped. Which way the plugin comes (linked or
/// from its .so) is chosen by the caller.
pub fn bench(source: PluginSource, settings: &str) -> TestBench {
    let mut tb = TestBench::new(source, None, settings).unwrap();
    tb.map_bars();
    tb
}

pub fn linked(settings: &str) -> TestBench {
    bench(PluginSource::Linked(lsi53c895a::plugin_module()), settings)
}

/// Register access through BAR1.
pub trait Regs {
    fn r8(&mut self, reg: u64) -> u8;
    fn w8(&mut self, reg: u64, v: u8);
    fn r32(&mut self, reg: u64) -> u32;
    fn w32(&mut self, reg: u64, v: u32);
    /// Loads `asm` at SCRIPT and starts it by writing DSP.
    fn run(&mut self, asm: &Asm);
    fn settle(&mut self);
}

impl Regs for TestBench {
    fn r8(&mut self, reg: u64) -> u8 {
        let b = self.bar_address(1);
        self.mmio_read(b + reg, 1) as u8
    }
    fn w8(&mut self, reg: u64, v: u8) {
        let b = self.bar_address(1);
        self.mmio_write(b + reg, 1, u64::from(v));
    }
    fn r32(&mut self, reg: u64) -> u32 {
        let b = self.bar_address(1);
        self.mmio_read(b + reg, 4) as u32
    }
    fn w32(&mut self, reg: u64, v: u32) {
        let b = self.bar_address(1);
        self.mmio_write(b + reg, 4, u64::from(v));
    }
    fn run(&mut self, asm: &Asm) {
        self.ram().write_all(SCRIPT, &asm.bytes());
        self.w32(DSA, TABLE as u32);
        self.w32(DSP, SCRIPT as u32);
    }
    fn settle(&mut self) {
        TestBench::wait_idle(self, Duration::from_secs(10)).unwrap();
    }
}
