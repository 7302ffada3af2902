//! PCI: the root bus with its host bridge and configuration mechanism
//! ([`root`]), proxy functions whose device lives in a remote process
//! ([`proxy`]) and functions whose plugin runs inside the VMM
//! ([`inprocess`]).

pub mod inprocess;
pub mod msi;
pub mod msix;
pub mod proxy;
pub mod root;
pub mod stats;

use pci::ConfigSpace;

/// A PCI function on the root bus.
pub trait PciDevice: Send {
    /// A configuration read of `data.len()` bytes at `offset`.
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// A configuration write.
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// A read in BAR `bar` at `offset`.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A write in BAR `bar` at `offset`.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// The configuration space the VMM decodes BARs with (the function's
    /// own, or a shadow that tracks the guest's BAR and command writes).
    fn config_space(&self) -> &ConfigSpace;
    /// A liveness check on the function's channel, for supervision;
    /// `None` when the function has no channel (in-process).
    fn heartbeat(&mut self) -> Option<Result<(), String>> {
        None
    }
    /// A device control operation (e.g. the LSI plugin's `drive-add`),
    /// for functions whose device runs in this process; remote ones are
    /// reached through their remote's control channel instead.
    fn control(
        &mut self,
        op: &str,
        _args: &serde_json::Value,
    ) -> std::result::Result<serde_json::Value, String> {
        Err(format!("this device has no control operation `{op}`"))
    }
    /// A function-level reset for a VM reset: the function forgets its
    /// state and its configuration registers (BARs, command) go back to
    /// their power-on values; the VMM places the BARs again afterwards. A
    /// failure marks the function failed (it reads all-ones), as any other
    /// failed access does.
    fn reset(&mut self) {}
    /// The function's access counters by register (QMP
    /// `query-device-stats`), when it keeps them.
    fn stats(&self) -> Option<serde_json::Value> {
        None
    }
    /// Called once when the VM ends or the function is removed.
    fn shutdown(&mut self) {}
    /// Whether the function failed (its remote died or hung, its channel
    /// broke) and now answers all-ones. The bus uses it to retry an access
    /// that failed while the function is being brought back
    /// ([`root::PciRoot::hold`]).
    fn failed(&mut self) -> bool {
        false
    }
    /// Waits until every access the function took is applied and counts
    /// those the device refused as never having reached it (before its
    /// saved state is judged current: a device restart).
    fn settle(&mut self) {}
    /// Hands over the MSI-X the VMM emulates for this function (its table
    /// as the guest programmed it, its routes and eventfds), when it is
    /// being replaced ([`root::PciRoot::replace`]).
    fn take_msix(&mut self) -> Option<msix::MsixRouter> {
        None
    }
    /// Takes over the MSI-X of the function this one replaces: the guest
    /// sees no change to its table, its enable or its masks.
    fn adopt_msix(&mut self, _msix: msix::MsixRouter) {}
    /// The function's MSI (its routes and eventfds, and what the guest
    /// programmed), when it is being replaced.
    fn take_msi(&mut self) -> Option<msi::MsiRouter> {
        None
    }
    /// Takes over the MSI of the function this one replaces: what the
    /// guest programmed is written into this function's capability.
    fn adopt_msi(&mut self, _msi: msi::MsiRouter) {}
    /// Signals MSI-X vector `vector` as the device would: delivered now if
    /// the guest left it unmasked, else pending until it unmasks it. For a
    /// snapshot's vectors that were pending when it was taken.
    fn signal_msix(&mut self, _vector: u16) {}
    /// Signals MSI vector `vector` the same way (a snapshot's pending
    /// vector): delivered now if unmasked, else pending until unmasked;
    /// dropped while MSI is disabled or for a vector not granted.
    fn signal_msi(&mut self, _vector: u16) {}
    /// Drops the function's KVM ioeventfds (it is being replaced, and its
    /// successor registers the same addresses).
    fn release_doorbells(&mut self) {}
    /// The device's DMA dirty log, when its device runs in this process
    /// (a remote's devices keep theirs in the remote: control `dirty-log`).
    fn dirty_log(&self) -> Option<std::sync::Arc<plugin_api::dirty::DirtyLog>> {
        None
    }
    /// The device's state for a snapshot, when its device runs in this
    /// process (`None`: a remote's devices are saved over its control
    /// channel). Called with the vCPUs held.
    fn save_state(&mut self) -> Option<std::result::Result<Vec<u8>, String>> {
        None
    }
    /// [`save_state`](Self::save_state) once the device's own work in
    /// flight finished, waiting at most `within` (a migration: the guest
    /// is stopped).
    fn save_state_quiesced(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::result::Result<Vec<u8>, String>> {
        let _ = within;
        self.save_state()
    }
    /// Restores a state from [`save_state`](Self::save_state) (`None`:
    /// not a function that saves here).
    fn restore_state(&mut self, _state: &[u8]) -> Option<std::result::Result<(), String>> {
        None
    }
    /// Whether the function's own protocol carries its state, for a
    /// remote without our control channel (vfio-user migration v2; a
    /// proxy function then saves and restores through it).
    fn wire_migration(&mut self) -> std::result::Result<(), String> {
        Err("it has no protocol of its own to migrate through".into())
    }
    /// The function's DMA dirty log through its protocol: `"start"` over
    /// the guest RAM `regions`, `"take"`, `"stop"`.
    fn wire_dirty_log(
        &mut self,
        action: &str,
        regions: &[(u64, u64)],
    ) -> std::result::Result<Vec<(u64, u64)>, String> {
        let _ = (action, regions);
        Err("it has no protocol of its own to log DMA through".into())
    }
}
