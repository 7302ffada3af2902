//! vfio-user: the public protocol for a PCI device served by another
//! process (QEMU `docs/interop/vfio-user.rst`; structs in libvfio-user
//! `include/vfio-user.h`).
//!
//! - [`messages`]: the header and the typed payloads, with parse/encode.
//! - [`client`]: [`VfioUserClient`], what a VMM uses to drive a device.
//! - [`server`]: a generic per-connection loop over [`VfioUserDevice`].
//!
//! Region layout follows the VFIO PCI convention: regions 0..=5 are the
//! BARs, 6 the expansion ROM, 7 the configuration space
//! ([`PCI_CONFIG_REGION_INDEX`]), 8 VGA. IRQ index 0 is INTx.

pub mod client;
pub mod messages;
pub mod migration;
pub mod server;

pub use client::{ClientError, ClientOptions, VfioUserClient};
pub use messages::{
    Capabilities, Command, DeviceInfo, DmaMap, DmaUnmap, Header, IrqInfo, ParseError, RegionAccess,
    RegionInfo, Request, SetIrqs, Version,
};
pub use server::{serve_connection, DeviceError, ServerError, ServerOptions, VfioUserDevice};

/// Protocol version we speak (the spec's current one).
pub const VERSION_MAJOR: u16 = 0;
pub const VERSION_MINOR: u16 = 1;

/// Size of the message header.
pub const HEADER_SIZE: usize = 16;

/// Header flags: message type in bits 0..=3.
pub const FLAG_TYPE_MASK: u32 = 0xf;
pub const FLAG_TYPE_COMMAND: u32 = 0;
pub const FLAG_TYPE_REPLY: u32 = 1;
/// The sender wants no reply (commands only).
pub const FLAG_NO_REPLY: u32 = 1 << 4;
/// The reply reports an error in `error` (an errno).
pub const FLAG_ERROR: u32 = 1 << 5;

/// VFIO PCI region indices.
pub const PCI_BAR0_REGION_INDEX: u32 = 0;
pub const PCI_BAR5_REGION_INDEX: u32 = 5;
pub const PCI_ROM_REGION_INDEX: u32 = 6;
pub const PCI_CONFIG_REGION_INDEX: u32 = 7;
pub const PCI_VGA_REGION_INDEX: u32 = 8;
pub const PCI_NUM_REGIONS: u32 = 9;

/// VFIO PCI IRQ indices.
pub const PCI_INTX_IRQ_INDEX: u32 = 0;
pub const PCI_MSI_IRQ_INDEX: u32 = 1;
pub const PCI_MSIX_IRQ_INDEX: u32 = 2;
pub const PCI_ERR_IRQ_INDEX: u32 = 3;
pub const PCI_REQ_IRQ_INDEX: u32 = 4;
pub const PCI_NUM_IRQS: u32 = 5;

/// DEVICE_GET_INFO flags.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// GET_REGION_INFO flags.
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;

/// GET_IRQ_INFO flags.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// SET_IRQS flags: exactly one DATA_* and one ACTION_*.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
pub const IRQ_SET_DATA_TYPE_MASK: u32 = 0x7;
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
pub const IRQ_SET_ACTION_TYPE_MASK: u32 = 0x38;

/// DMA_MAP flags.
pub const DMA_MAP_FLAG_READ: u32 = 1 << 0;
pub const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;

/// DMA_UNMAP flags, as the spec takes them from Linux's `vfio.h`
/// (`VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP`, `VFIO_DMA_UNMAP_FLAG_ALL`) and
/// as libvfio-user and QEMU's client use them. (rust-vmm's `vfio-user`
/// 0.1 has them one bit higher; its client never sends them.)
pub const DMA_UNMAP_FLAG_GET_DIRTY_BITMAP: u32 = 1 << 0;
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// Default `max_data_xfer_size` (spec default, 1 MiB).
pub const DEFAULT_MAX_DATA_XFER: u32 = 1 << 20;
