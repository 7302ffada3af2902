//! # channel: the VMM <-> remote-host channel
//!
//! Shared by `host` and `remote-host`, never seen by plugins.
//!
//! - [`framing`]: messages on a UNIX stream socket with fds as
//!   `SCM_RIGHTS`, size and fd limits, a timeout on every wait and a short
//!   busy-poll before sleeping.
//! - [`vfio_user`]: the vfio-user protocol: message types, a client
//!   ([`vfio_user::VfioUserClient`]) and a generic per-connection server
//!   loop ([`vfio_user::serve_connection`] over
//!   [`vfio_user::VfioUserDevice`]).
//! - [`mpqemu`]: QEMU's multi-process protocol (QEMU 5.2–9.x): message
//!   types, a client ([`mpqemu::MpqemuClient`], the VMM side) and a
//!   per-connection server loop ([`mpqemu::serve_connection`] over
//!   [`mpqemu::MpqemuDevice`], the device side).
//! - [`control`]: the VMM <-> remote-host control channel (JSON lines:
//!   ping, device-add with its socket as an fd, device-del,
//!   device-control): [`control::ControlClient`] and
//!   [`control::serve_control`].
//!
//! `docs/channel.md` explains the design.

pub mod control;
pub mod framing;
pub mod mpqemu;
pub mod ring;
pub mod vfio_user;

pub use framing::{Framed, FramingError};
