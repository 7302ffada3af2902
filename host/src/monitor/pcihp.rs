//! ACPI PCI hotplug seen from the monitor: `device_add` announces the new
//! function to the guest (it finds it without a rescan), and
//! `device_del` asks the guest to release the function and removes it
//! only once the guest has ejected it (`_EJ0`), with `DEVICE_DELETED` at
//! that moment, as QEMU does. A guest that ignores the request keeps the
//! function (`query-pci` shows `unplug-pending`); `device_del` again says
//! the unplug is pending and sends the request once more.
//!
//! Ejects arrive on a vCPU thread (a port write); they are handed to a
//! thread of the monitor, which takes the hotplug lock and tells the
//! remote, so no vCPU ever waits on a remote here.

use std::sync::mpsc;

use super::*;

impl Monitor {
    /// Installs the eject sink in the ACPI hardware and starts the thread
    /// that completes unplugs. Without ACPI nothing is armed: `device_del`
    /// removes at once.
    pub fn arm_hotplug(self: &Arc<Self>) {
        let Some(pm) = &self.bus.pm else {
            return;
        };
        let (tx, rx) = mpsc::channel::<u32>();
        lock(pm).set_eject_sink(Box::new(move |slots| {
            let _ = tx.send(slots);
        }));
        let this = Arc::downgrade(self);
        let spawned = std::thread::Builder::new()
            .name("pci-eject".into())
            .spawn(move || {
                while let Ok(slots) = rx.recv() {
                    let Some(m) = this.upgrade() else { return };
                    for slot in (1..=31u8).filter(|s| slots & (1 << s) != 0) {
                        m.ejected(slot);
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::error!("cannot start the PCI eject thread: {e}");
        }
    }

    /// Tells the guest a function was added in `slot` (no-op without ACPI).
    pub(super) fn announce_plug(&self, slot: u8) {
        if let Some(pm) = &self.bus.pm {
            lock(pm).plug(slot);
        }
    }

    /// `device_del` of a PCI function on a machine with ACPI: the request
    /// is posted and the function stays until the guest ejects it. `None`
    /// when the machine has no ACPI (the caller removes at once).
    pub(super) fn request_unplug(&self, id: &str, slot: u8) -> Option<Result<Value, QmpError>> {
        let pm = self.bus.pm.as_ref()?;
        let mut pending = lock(&self.unplugging);
        let again = pending.get(&slot).is_some_and(|p| p == id);
        pending.insert(slot, id.to_owned());
        drop(pending);
        // Posted again when repeated: a guest that missed the event (its
        // GPE was disabled, it was busy booting) hears it now.
        lock(pm).request_unplug(slot);
        if again {
            return Some(Err(QmpError::generic(format!(
                "Device {id} is already in the process of unplug (the guest has not released it; \
                 the request was sent again)"
            ))));
        }
        tracing::info!("device_del: asked the guest to release {id} (slot {slot})");
        Some(Ok(json!({})))
    }

    /// The guest ejected `slot`: the function goes, `DEVICE_DELETED` says
    /// so. An eject nobody asked for (the guest powering a slot off by
    /// itself) removes the function too.
    fn ejected(&self, slot: u8) {
        let _one = lock(&self.hotplug);
        let asked = lock(&self.unplugging).remove(&slot);
        let Some(id) = self.bus.pci.label_of(slot).map(|l| l.id) else {
            return;
        };
        if asked.is_none() {
            tracing::info!("the guest ejected {id} (slot {slot}) by itself");
        }
        self.remove_function(&id, slot);
    }

    /// Whether `id`'s unplug is waiting for the guest.
    pub(super) fn unplug_pending(&self, id: &str) -> bool {
        lock(&self.unplugging).values().any(|p| p == id)
    }
}
