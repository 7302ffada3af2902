//! mpqemu: QEMU's multi-process protocol (QEMU 5.2–9.x;
//! `include/hw/remote/mpqemu-link.h`, `hw/remote/mpqemu-link.c`), as
//! Debian 12's QEMU 7.2 speaks it between `-device x-pci-proxy-dev` (the
//! VMM side) and `-machine x-remote` (the device process).
//!
//! - [`messages`]: the 16-byte native-endian header and the typed
//!   payloads, with parse/encode.
//! - [`client`]: [`MpqemuClient`], the VMM side (what `x-pci-proxy-dev`
//!   does): drives QEMU's `x-remote` or our `remote-host`.
//! - [`server`]: a generic per-connection loop over [`MpqemuDevice`], the
//!   device side (what `x-remote` does).
//!
//! Wire facts (see `docs/channel.md`):
//! - header: `int cmd; 4 bytes padding; size_t size`, then `size` payload
//!   bytes; fds ride as `SCM_RIGHTS` on the header;
//! - QEMU 7.2 refuses a message with 8 or more fds, so at most
//!   [`MAX_FDS`] (7) get through, hence at most 7 `SYNC_SYSMEM` regions;
//! - no version negotiation, no message ids, no error replies: a request
//!   gets a `RET` carrying a `u64` (`u64::MAX` reports a failure), and
//!   `SYNC_SYSMEM` and `SET_IRQFD` get no reply at all;
//! - BAR accesses carry the **absolute** address the guest programmed
//!   into the BAR (plus the offset), so the device side tracks BAR
//!   placement from the forwarded configuration writes.

pub mod client;
pub mod messages;
pub mod server;

pub use client::{ClientError, ClientOptions, MpqemuClient, SysmemRegion};
pub use messages::{BarAccess, Command, ConfigAccess, Header, Message, ParseError, SyncSysmem};
pub use server::{serve_connection, MpqemuDevice, ServerError, ServerOptions};

/// A refusal from the device (shared with vfio-user): an errno for the
/// log and, on the wire, a `RET` of `u64::MAX`.
pub use crate::vfio_user::DeviceError;

/// Size of the message header (`MPQEMU_MSG_HDR_SIZE`).
pub const HEADER_SIZE: usize = 16;

/// Most fds one message may carry: QEMU's `REMOTE_MAX_FDS` is 8, but
/// `mpqemu_msg_valid` refuses `num_fds >= 8`.
pub const MAX_FDS: usize = 7;

/// Regions in a `SYNC_SYSMEM` payload (`REMOTE_MAX_FDS`).
pub const SYSMEM_SLOTS: usize = 8;

/// Largest payload: the biggest member of QEMU's `data` union
/// (`SyncSysmemMsg`, 192 bytes). QEMU refuses anything larger.
pub const MAX_PAYLOAD: usize = SyncSysmem::LEN;

/// The failure value of a `RET`.
pub const RET_FAILURE: u64 = u64::MAX;

/// Size of PCI configuration space as the remote checks it.
pub const CONFIG_SPACE_SIZE: u32 = 256;
