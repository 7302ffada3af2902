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
#[cfg(test)]
mod forked;
pub mod irq;
pub mod jail;
pub mod logging;
pub mod main_thread;
pub mod memory;
pub mod new_plugin;
pub mod ring;
pub mod sandbox;
pub mod serve_mpqemu;
pub mod serve_vfio_user;
pub mod sockets;
pub mod standby;

/// Waits up to `within` for `thread` to end and joins it; `false` (the
/// thread left running) when it did not: a device call that never returns
/// must not hold the control channel, and shutting the device down under
/// it would break the plugin's contract.
pub(crate) fn join_within(
    thread: std::thread::JoinHandle<()>,
    within: std::time::Duration,
) -> bool {
    let deadline = std::time::Instant::now() + within;
    while !thread.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    if thread.is_finished() {
        let _ = thread.join();
        true
    } else {
        false
    }
}
