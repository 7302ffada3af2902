//! `remote-host`: the generic device process.
//!
//! It knows no device. It loads device plugins ([`plugin_api::loader`]),
//! maps the guest RAM the VMM passes as file descriptors ([`memory`]),
//! builds the PCI functions of one `[[remote]]` of the config
//! ([`devices`]) and serves them over a wire protocol: vfio-user
//! ([`serve_vfio_user`]) or QEMU's mpqemu ([`serve_mpqemu`]). Interrupts leave
//! through eventfds ([`irq`]) that KVM injects directly (irqfd). With
//! `--control`, the VMM adds, removes and operates devices at run time
//! ([`control`]).

pub mod control;
pub mod devices;
pub mod dialect;
pub mod irq;
pub mod logging;
pub mod memory;
pub mod new_plugin;
pub mod ring;
pub mod sandbox;
pub mod serve_mpqemu;
pub mod serve_vfio_user;
pub mod sockets;
