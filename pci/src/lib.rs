//! PCI building blocks shared by every PCI function in the project.
//!
//! [`ConfigSpace`] is the one type-0 configuration-space model: the VMM's own
//! functions, the proxy functions, `remote-host` and the plugin test harness
//! all use it, so BAR sizing, write masks and capability chaining behave the
//! same everywhere.

mod config_space;
pub mod msi;
pub mod msix;

pub use config_space::{
    BarAddress, BarRegion, BarSpec, BarType, ConfigSpace, ConfigWriteEffect, Identity, LayoutError,
    CONFIG_SPACE_SIZE,
};

/// The offset of capability `id` in the first 256 bytes of a function's
/// configuration space as another process serves it. `None` without a
/// capability list, without that capability, or with a list that loops or
/// leaves the space (bounded: at most 48 capabilities).
pub fn find_capability(cfg: &[u8; 256], id: u8) -> Option<usize> {
    if cfg[regs::STATUS] & 0x10 == 0 {
        return None;
    }
    let mut ptr = usize::from(cfg[regs::CAPABILITIES_POINTER] & 0xfc);
    for _ in 0..48 {
        if ptr < regs::FIRST_CAPABILITY || ptr + 2 > cfg.len() {
            return None;
        }
        if cfg[ptr] == id {
            return Some(ptr);
        }
        ptr = usize::from(cfg[ptr + 1] & 0xfc);
    }
    None
}

/// Standard register offsets of a type-0 header.
pub mod regs {
    pub const VENDOR_ID: usize = 0x00;
    pub const DEVICE_ID: usize = 0x02;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION_ID: usize = 0x08;
    pub const CLASS_CODE: usize = 0x09;
    pub const CACHE_LINE_SIZE: usize = 0x0c;
    pub const LATENCY_TIMER: usize = 0x0d;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BAR0: usize = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    pub const SUBSYSTEM_ID: usize = 0x2e;
    pub const EXPANSION_ROM: usize = 0x30;
    pub const CAPABILITIES_POINTER: usize = 0x34;
    pub const INTERRUPT_LINE: usize = 0x3c;
    pub const INTERRUPT_PIN: usize = 0x3d;
    pub const FIRST_CAPABILITY: usize = 0x40;
}

/// Bits of the command register.
pub mod command {
    pub const IO_SPACE: u16 = 1 << 0;
    pub const MEMORY_SPACE: u16 = 1 << 1;
    pub const BUS_MASTER: u16 = 1 << 2;
    pub const PARITY_ERROR_RESPONSE: u16 = 1 << 6;
    pub const SERR: u16 = 1 << 8;
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// Bits of the status register.
pub mod status {
    pub const INTERRUPT: u16 = 1 << 3;
    pub const CAPABILITIES_LIST: u16 = 1 << 4;
    /// Bits the guest clears by writing 1 (error bits 8, 11..15).
    pub const WRITE_ONE_TO_CLEAR: u16 = 0xf900;
}
