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
//!
//! `docs/channel.md` explains the design.

pub mod framing;
pub mod vfio_user;

pub use framing::{Framed, FramingError};
