//! One device of a remote comes back by itself when its plugin fails (it
//! panicked, or its channel broke) while the remote goes on: with the
//! remote's `restart` other than `"never"`, the VMM asks the remote to
//! drop the failed instance and make a new one from the same plugin and
//! settings (its QMP-added drives attached again), served on a new
//! connection in the same slot, with the state saved while the guest left
//! it alone if that is still current; else resumed from that save if the
//! device can say its guest's work since was lost
//! (`control::RESUME_AFTER_LOSS`), or reset. Its neighbours in the
//! remote are not touched. The guest's accesses to it wait meanwhile
//! (bounded, as for a remote's restart); the access that failed is not
//! made again (it may be what broke the plugin). `restart-limit` counts
//! these restarts per device; past it the device stays failed.
//! Event `DEVICE_RESTARTED {"device", "remote", "recovery-ms",
//! "state-kept": bool, "state-resumed": bool}`, or `DEVICE_FAILED` naming
//! the limit.

use std::collections::BTreeSet;
use std::time::Instant;

use super::recovery::{Released, RECOVERY_HOLD};
use super::*;
use crate::checkpoint::Save;
use crate::supervisor::RemoteState;
use config::RestartPolicy;

impl Monitor {
    /// Listens for `DEVICE_FAILED` of functions in remotes that restart.
    pub fn arm_device_recovery(self: &Arc<Self>) {
        let this = Arc::downgrade(self);
        let active: Arc<Mutex<BTreeSet<String>>> = Arc::default();
        self.events
            .listen(Arc::new(move |name: &str, data: &Value| {
                if name != "DEVICE_FAILED" {
                    return;
                }
                let (Some(device), Some(remote)) = (
                    data.get("device").and_then(Value::as_str),
                    data.get("remote").and_then(Value::as_str),
                ) else {
                    return;
                };
                let Some(m) = this.upgrade() else { return };
                let policy = m.config.remote(remote).map(|r| r.restart);
                if policy.is_none_or(|p| p == RestartPolicy::Never) {
                    return;
                }
                // One recovery per device at a time (a failure is reported by
                // the access that saw it and again by the next heartbeat).
                if !lock(&active).insert(device.to_owned()) {
                    return;
                }
                let (device, remote, active) =
                    (device.to_owned(), remote.to_owned(), active.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("recover-{device}"))
                    .spawn(move || {
                        m.recover_device(&remote, &device);
                        lock(&active).remove(&device);
                    });
                if let Err(e) = spawned {
                    tracing::error!("no device restart: {e}");
                }
            }));
    }

    fn recover_device(&self, remote_id: &str, device: &str) {
        let noticed = Instant::now();
        // The whole remote failed (an access in flight saw it): its own
        // restart, if any, brings the device back.
        if self
            .remote(remote_id)
            .map_or(true, |r| r.state() != RemoteState::Running)
        {
            return;
        }
        if let Err(why) = self.count_restart(&format!("{remote_id}/{device}"), remote_id) {
            eprintln!("host: device `{device}` failed again: {why}; left failed");
            self.events.emit(
                "DEVICE_FAILED",
                json!({"device": device, "remote": remote_id, "reason": why}),
            );
            return;
        }
        match self.restart_device(remote_id, device, noticed) {
            Ok((kept, resumed)) => {
                eprintln!("host: device `{device}` failed; restarted in remote `{remote_id}`");
                self.events.emit(
                    "DEVICE_RESTARTED",
                    json!({"device": device, "remote": remote_id, "state-kept": kept,
                           "state-resumed": resumed,
                           "recovery-ms": noticed.elapsed().as_millis() as u64}),
                );
            }
            Err(e) => {
                eprintln!("host: device `{device}` could not be restarted: {e}");
                self.events.emit(
                    "DEVICE_FAILED",
                    json!({"device": device, "remote": remote_id,
                           "reason": format!("restart failed: {e}")}),
                );
            }
        }
    }

    /// Replaces the failed instance of `device` in its (running) remote;
    /// returns whether its state was kept, and whether it was resumed
    /// from a stale save instead.
    fn restart_device(
        &self,
        remote_id: &str,
        device: &str,
        noticed: Instant,
    ) -> Result<(bool, bool), String> {
        let _one = lock(&self.hotplug);
        let r = self.remote(remote_id).map_err(|e| e.desc)?;
        if r.state() != RemoteState::Running || !r.has_control() {
            // The whole remote failed: its own restart brings the device back.
            return Err(format!("remote `{remote_id}` is not running"));
        }
        let slot = self
            .bus
            .pci
            .slot_of(device)
            .ok_or_else(|| format!("`{device}` is no longer on the bus"))?;
        let spec = self.spec_of(device, remote_id, slot)?;
        self.bus.pci.hold_without_retry(&[slot], RECOVERY_HOLD);
        // Its doorbells stop reaching the failed instance: the guest's
        // notifies exit and wait for the new one.
        self.bus.pci.with_function(slot, |d| d.release_doorbells());
        let _release = Released(&self.bus.pci, vec![slot]);
        // Posted writes the failed device refused (the one that broke it
        // among them) never reached it: its idle save may still be current.
        self.bus.pci.with_function(slot, |d| d.settle());
        let (state, stale) = match r.checkpoints.as_ref().and_then(|cp| cp.last(device)) {
            Some(Save::Current(s)) => (Some(s), None),
            Some(Save::Stale(s)) => (None, Some(s)),
            None => (None, None),
        };
        // Out of supervision before its channel closes; then the remote
        // drops the failed instance.
        r.remove_device(device);
        r.forget_failure(device);
        if let Err(e) = r.with_control(|c| c.device_del(device)) {
            tracing::warn!("device {device}: remote {remote_id}: device-del: {e}");
        }
        let proxy = self.add_to_remote(&r, &spec).map_err(|e| e.desc)?;
        self.put_back(&r, device, slot, proxy)?;
        for problem in self.reattach_drives(&r, &[device.to_owned()]) {
            tracing::warn!("device {device}: {problem}");
        }
        let kept = match state.map(|s| self.restore_into(&r, device, s)) {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                tracing::warn!("device {device}: state not restored ({e}); it comes back reset");
                false
            }
            None => false,
        };
        let resumed = match stale.map(|s| self.resume_into(&r, device, s)) {
            Some(Ok(())) => true,
            Some(Err(e)) => {
                tracing::info!("device {device}: comes back reset: the guest used it since its last save, and it cannot resume from that save ({e})");
                false
            }
            None => false,
        };
        tracing::info!(
            "device {device} restarted in {} ms",
            noticed.elapsed().as_millis()
        );
        Ok((kept, resumed))
    }

    /// What `device` was made from: its `device_add`, or its `[[device]]`.
    fn spec_of(&self, device: &str, remote_id: &str, slot: u8) -> Result<AddedDevice, String> {
        if let Some(a) = lock(&self.added).iter().find(|a| a.id == device) {
            return Ok(a.clone());
        }
        let d = self
            .config
            .devices
            .iter()
            .find(|d| d.id == device)
            .ok_or_else(|| format!("`{device}` is neither in the config nor added"))?;
        Ok(AddedDevice {
            id: device.to_owned(),
            driver: d.plugin.clone(),
            remote: Some(remote_id.to_owned()),
            slot,
            kind: d.kind.clone(),
            settings: d.settings.clone(),
        })
    }
}
