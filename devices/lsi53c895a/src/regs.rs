//! Register offsets and bits of the LSI53C895A (manual §4.2, Linux
//! `sym_defs.h`). Registers are byte-addressed; multi-byte registers are
//! little-endian.

pub const SCNTL0: usize = 0x00;
pub const SCNTL1: usize = 0x01;
pub const SCNTL2: usize = 0x02;
pub const SCNTL3: usize = 0x03;
pub const SCID: usize = 0x04;
pub const SXFER: usize = 0x05;
pub const SDID: usize = 0x06;
pub const GPREG: usize = 0x07;
pub const SFBR: usize = 0x08;
pub const SOCL: usize = 0x09;
pub const SSID: usize = 0x0a;
pub const SBCL: usize = 0x0b;
pub const DSTAT: usize = 0x0c;
pub const SSTAT0: usize = 0x0d;
pub const SSTAT1: usize = 0x0e;
pub const SSTAT2: usize = 0x0f;
pub const DSA: usize = 0x10;
pub const ISTAT0: usize = 0x14;
pub const ISTAT1: usize = 0x15;
pub const CTEST2: usize = 0x1a;
pub const CTEST3: usize = 0x1b;
pub const TEMP: usize = 0x1c;
pub const DFIFO: usize = 0x20;
pub const CTEST5: usize = 0x22;
pub const DBC: usize = 0x24;
pub const DCMD: usize = 0x27;
pub const DNAD: usize = 0x28;
pub const DSP: usize = 0x2c;
pub const DSPS: usize = 0x30;
pub const SCRATCHA: usize = 0x34;
pub const DMODE: usize = 0x38;
pub const DIEN: usize = 0x39;
pub const DCNTL: usize = 0x3b;
pub const SIEN0: usize = 0x40;
pub const SIEN1: usize = 0x41;
pub const SIST0: usize = 0x42;
pub const SIST1: usize = 0x43;
pub const MACNTL: usize = 0x46;
pub const STEST0: usize = 0x4c;
pub const STEST1: usize = 0x4d;
pub const STEST2: usize = 0x4e;
pub const STEST3: usize = 0x4f;
pub const SIDL: usize = 0x50;
pub const STEST4: usize = 0x52;
pub const SODL: usize = 0x54;
pub const CCNTL0: usize = 0x56;
pub const CCNTL1: usize = 0x57;
pub const SBDL: usize = 0x58;
pub const SCRATCHB: usize = 0x5c;
pub const MMRS: usize = 0xa0;
pub const MMWS: usize = 0xa4;
pub const SFS: usize = 0xa8;
pub const DRS: usize = 0xac;
pub const SBMS: usize = 0xb0;
pub const DBMS: usize = 0xb4;
pub const DNAD64: usize = 0xb8;
pub const PMJAD1: usize = 0xc0;
pub const PMJAD2: usize = 0xc4;
pub const RBC: usize = 0xc8;
pub const UA: usize = 0xcc;
pub const ESA: usize = 0xd0;
pub const IA: usize = 0xd4;
pub const SBC: usize = 0xd8;
pub const CSBC: usize = 0xdc;

pub const SCNTL1_CON: u8 = 0x10;
pub const SCNTL1_RST: u8 = 0x08;
pub const SCNTL1_IARB: u8 = 0x02;
pub const SCNTL2_WSR: u8 = 0x01;
pub const SCID_RRE: u8 = 0x40;

pub const SOCL_ATN: u8 = 0x08;
pub const SBCL_REQ: u8 = 0x80;
pub const SBCL_BSY: u8 = 0x20;
pub const SBCL_ATN: u8 = 0x08;

pub const DSTAT_DFE: u8 = 0x80;
pub const DSTAT_BF: u8 = 0x20;
pub const DSTAT_ABRT: u8 = 0x10;
pub const DSTAT_SSI: u8 = 0x08;
pub const DSTAT_SIR: u8 = 0x04;
pub const DSTAT_IID: u8 = 0x01;

pub const SSTAT0_RST: u8 = 0x02;

pub const ISTAT0_ABRT: u8 = 0x80;
pub const ISTAT0_SRST: u8 = 0x40;
pub const ISTAT0_SIGP: u8 = 0x20;
pub const ISTAT0_SEM: u8 = 0x10;
pub const ISTAT0_CON: u8 = 0x08;
pub const ISTAT0_INTF: u8 = 0x04;
pub const ISTAT0_SIP: u8 = 0x02;
pub const ISTAT0_DIP: u8 = 0x01;
pub const ISTAT1_SRUN: u8 = 0x02;

pub const CTEST2_SIGP: u8 = 0x40;

pub const DMODE_MAN: u8 = 0x01;
pub const DCNTL_SSM: u8 = 0x10;
pub const DCNTL_STD: u8 = 0x04;
pub const DCNTL_COM: u8 = 0x01;

pub const SIST0_MA: u8 = 0x80;
pub const SIST0_CMP: u8 = 0x40;
pub const SIST0_SEL: u8 = 0x20;
pub const SIST0_RSL: u8 = 0x10;
pub const SIST0_UDC: u8 = 0x04;
pub const SIST0_RST: u8 = 0x02;
pub const SIST1_STO: u8 = 0x04;
pub const SIST1_GEN: u8 = 0x02;
pub const SIST1_HTH: u8 = 0x01;

pub const STEST4_LVD_LOCKED: u8 = 0xe0;

pub const CCNTL0_ENPMJ: u8 = 0x80;
pub const CCNTL0_PMJCTL: u8 = 0x40;
pub const CCNTL1_DDAC: u8 = 0x08;
pub const CCNTL1_64TIMOD: u8 = 0x04;
pub const CCNTL1_EN64TIBMV: u8 = 0x02;
pub const CCNTL1_EN64DBMV: u8 = 0x01;

/// GPREG reads with every GPIO pulled high: NVRAM probes see no ACK.
pub const GPREG_READ: u8 = 0x7f;
