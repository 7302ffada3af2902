//! Automatic restart of a remote that died or hung (`[[remote]] restart`,
//! `restart-limit`): the remote's failure hook hands the failure to a
//! thread of its own, which waits out the back-off and runs the same
//! replacement as the operator's `remote-restart` (devices back in their
//! slots with the guest's BARs, drives attached again). Device state does
//! not survive yet: the guest sees the devices reset.
//!
//! Back-off: the first restart within a minute runs at once, each further
//! one waits twice as long as the one before (200 ms, 400 ms, ... at most
//! 5 s). More than `restart-limit` failures within a minute leave the
//! remote failed (its devices read all-ones), with `REMOTE_FAILED`.

use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use config::RestartPolicy;

use super::*;
use crate::supervisor::{Failure, RemoteState};

/// Automatic restarts are counted over this window.
const WINDOW: Duration = Duration::from_secs(60);
/// The longest wait before a restart.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A remote that ran this long before it failed is restarted at once: the
/// back-off is for one that fails again as soon as it starts.
const STABLE_RUN: Duration = Duration::from_secs(1);
/// How long a vCPU waits for a restarting remote's function beyond the
/// back-off, before it gets all-ones (a failed restart ends the wait at
/// once). Long enough for a loaded machine: a nested guest under CI load
/// took 5.8 s to start a new remote-host and reach it, and the guest's
/// virtio-blk driver, reading its capacity after a resize, read
/// all-ones from a 5 s hold. Short enough that a vCPU held this long
/// stays under the guest kernel's soft-lockup (20 s) and RCU-stall
/// (21 s) warnings.
pub(super) const RECOVERY_HOLD: Duration = Duration::from_secs(15);

/// The wait before the restart that follows `earlier` restarts within the
/// window: none for the first, then 200 ms doubling up to [`MAX_BACKOFF`].
pub(super) fn backoff(earlier: usize) -> Duration {
    if earlier == 0 {
        return Duration::ZERO;
    }
    let shift = u32::try_from(earlier).unwrap_or(u32::MAX).min(16);
    (Duration::from_millis(100) * (1u32 << shift)).min(MAX_BACKOFF)
}

/// Whether `policy` restarts a remote that failed so.
pub(super) fn wanted(policy: RestartPolicy, failure: Failure) -> bool {
    match policy {
        RestartPolicy::Never => false,
        RestartPolicy::OnFailure => !failure.clean_exit(),
        RestartPolicy::Always => true,
    }
}

impl Monitor {
    /// Arms automatic restart for every remote (once the monitor is in an
    /// `Arc`; remotes restarted later are armed as they are made).
    pub fn arm_recovery(self: &Arc<Self>) {
        let _ = self.this.set(Arc::downgrade(self));
        let remotes: Vec<Arc<Remote>> = lock(&self.remotes).clone();
        for r in &remotes {
            self.arm_one(r);
        }
    }

    /// Sets `remote`'s failure hook per its `restart` policy. A remote
    /// that already failed before it was armed is handled at once.
    pub(super) fn arm_one(&self, remote: &Arc<Remote>) {
        let Some(this) = self.this.get().cloned() else {
            return;
        };
        let Some(policy) = self.config.remote(&remote.id).map(|r| r.restart) else {
            return;
        };
        if policy == RestartPolicy::Never {
            return;
        }
        let failed: Weak<Remote> = Arc::downgrade(remote);
        let hook: crate::supervisor::FailureHook = Arc::new(move |failure: Failure| {
            if !wanted(policy, failure) {
                return false;
            }
            let (Some(monitor), Some(remote)) = (this.upgrade(), failed.upgrade()) else {
                return false;
            };
            // From now until the restart (or its refusal) the guest's
            // accesses to these functions wait instead of reading all-ones.
            monitor
                .bus
                .pci
                .hold(&monitor.slots_of(&remote.id), RECOVERY_HOLD);
            let noticed = Instant::now();
            let name = format!("recover-{}", remote.id);
            let spawned = std::thread::Builder::new()
                .name(name)
                .spawn(move || monitor.recover(&remote, failure, noticed));
            match spawned {
                Ok(_) => true,
                Err(e) => {
                    tracing::error!("no automatic restart: {e}");
                    false
                }
            }
        });
        remote.on_failure(hook.clone());
        self.prepare_standby(remote);
        match remote.state() {
            RemoteState::Dead => {
                hook(Failure::Died(crate::supervisor::DeathCause::HangUp));
            }
            RemoteState::Hung => {
                hook(Failure::Hung);
            }
            _ => {}
        }
    }

    /// Starts a standby `remote-host` for `remote` on a thread of its own
    /// (`remote::spawn_standby`): ready, jailed, waiting to replace it, so
    /// that a restart does not wait for a process to start. Only for a
    /// remote this VMM spawned; a standby already kept is replaced.
    pub(super) fn prepare_standby(&self, remote: &Arc<Remote>) {
        if remote.pid.is_none() {
            return;
        }
        let Some(this) = self.this.get().and_then(std::sync::Weak::upgrade) else {
            return;
        };
        let id = remote.id.clone();
        let spawned = std::thread::Builder::new()
            .name(format!("standby-{id}"))
            .spawn(move || {
                let Some(rcfg) = this.config.remote(&id) else {
                    return;
                };
                if rcfg.socket.is_some() || !rcfg.standby {
                    return;
                }
                match crate::remote::spawn_standby(&this.config, rcfg) {
                    Ok(s) => {
                        tracing::info!("remote {id}: standby process {} ready", s.pid());
                        let replaced = lock(&this.standbys).insert(id, s);
                        drop(replaced);
                    }
                    Err(e) => tracing::warn!(
                        "remote {id}: no standby process ({e:#}); a restart starts one then"
                    ),
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("remote {}: no standby ({e})", remote.id);
        }
    }

    /// The standby kept for remote `id`, taken.
    pub(super) fn take_standby(&self, id: &str) -> Option<crate::remote::Spawned> {
        lock(&self.standbys).remove(id)
    }

    /// Restarts `failed` after its back-off, unless it failed too often,
    /// was replaced meanwhile, or the VM is ending.
    fn recover(&self, failed: &Arc<Remote>, failure: Failure, noticed: Instant) {
        let id = failed.id.clone();
        let earlier = match self.count_restart(&id, &id) {
            Ok(n) => n,
            Err(why) => {
                self.bus.pci.release(&self.slots_of(&id));
                eprintln!("host: remote `{id}` failed again ({failure:?}): {why}; left failed");
                self.events
                    .emit("REMOTE_FAILED", json!({"id": id, "reason": why}));
                return;
            }
        };
        let wait = if failed.started.elapsed() >= STABLE_RUN {
            Duration::ZERO
        } else {
            backoff(earlier)
        };
        let held = self.slots_of(&id);
        self.bus.pci.hold(&held, wait + RECOVERY_HOLD);
        let _release = Released(&self.bus.pci, held);
        std::thread::sleep(wait);
        // Still the failed remote, and not stopped (the VM ends) or
        // replaced by the operator meanwhile?
        let current = match self.remote(&id) {
            Ok(r) => r,
            Err(_) => return,
        };
        if !Arc::ptr_eq(&current, failed)
            || matches!(
                current.state(),
                RemoteState::Stopped | RemoteState::HandedOver
            )
            || current.is_lent()
        {
            return;
        }
        eprintln!("host: remote `{id}` failed ({failure:?}); restarting it");
        match self.restart_remote(&id, Some(noticed), true) {
            Ok(problems) if problems.is_empty() => {}
            Ok(problems) => eprintln!(
                "host: remote `{id}` restarted, but: {}",
                problems.join("; ")
            ),
            Err(e) => {
                eprintln!(
                    "host: automatic restart of remote `{id}` failed: {}",
                    e.desc
                );
                self.events.emit(
                    "REMOTE_FAILED",
                    json!({"id": id, "reason": format!("restart failed: {}", e.desc)}),
                );
            }
        }
    }
}

/// Ends a hold on slots when dropped (however the restart went).
pub(crate) struct Released<'a>(pub &'a crate::pci::root::PciRoot, pub Vec<u8>);

impl Drop for Released<'_> {
    fn drop(&mut self) {
        self.0.release(&self.1);
    }
}

impl Monitor {
    /// Counts one more automatic restart of `key` (a remote, or a device
    /// `remote/device`), under remote `remote`'s `restart-limit` per
    /// [`WINDOW`]: how many came before within the window, or why it is
    /// refused (the limit is reached; nothing is counted then).
    pub(super) fn count_restart(&self, key: &str, remote: &str) -> Result<usize, String> {
        let limit = self.config.remote(remote).map_or(0, |r| r.restart_limit) as usize;
        let mut all = lock(&self.restarts);
        let recent = all.entry(key.to_owned()).or_default();
        recent.retain(|t| t.elapsed() < WINDOW);
        if recent.len() >= limit {
            return Err(format!(
                "{limit} automatic restarts within {} s (restart-limit)",
                WINDOW.as_secs()
            ));
        }
        let earlier = recent.len();
        recent.push(Instant::now());
        Ok(earlier)
    }

    /// Restores a saved `state` into `dev`, a device just made again in
    /// `remote`, and makes it that device's current save there.
    pub(super) fn restore_into(
        &self,
        remote: &Remote,
        dev: &str,
        state: Vec<u8>,
    ) -> Result<(), String> {
        remote.with_control(|c| c.device_restore(dev, &state))?;
        if let Some(cp) = &remote.checkpoints {
            cp.seed(dev, state);
        }
        Ok(())
    }

    /// Brings `dev`, a device just made again in `remote`, back from a
    /// save the guest has moved past (`checkpoint::Save::Stale`),
    /// with `control::RESUME_AFTER_LOSS`. The save stays the device's
    /// last there, stale (the device has moved on from it), until its
    /// next idle save; a device without the operation refuses it and
    /// stays as it was made.
    pub(super) fn resume_into(
        &self,
        remote: &Remote,
        dev: &str,
        state: Vec<u8>,
    ) -> Result<(), String> {
        let op = plugin_api::control::RESUME_AFTER_LOSS;
        let args = serde_json::to_value(plugin_api::control::ResumeAfterLoss::new(&state))
            .map_err(|e| format!("{op}: {e}"))?;
        remote.with_control(|c| c.device_control(dev, op, args))?;
        if let Some(cp) = &remote.checkpoints {
            cp.seed_stale(dev, state);
        }
        Ok(())
    }

    /// The slots of the functions remote `id` serves. Never waits on a
    /// function: it runs in the failure hook, while a vCPU may still wait
    /// on the failed remote holding its function.
    /// Takes our spawned process `pid` out of the list (to stop it, or to
    /// let it go to another VMM); `None` when it is not our child.
    pub(super) fn take_process(&self, pid: Option<u32>) -> Option<crate::remote::RemoteProcess> {
        let pid = pid?;
        let mut procs = lock(&self.processes);
        let pos = procs.iter().position(|p| p.pid() == pid)?;
        Some(procs.remove(pos))
    }

    pub(super) fn slots_of(&self, id: &str) -> Vec<u8> {
        self.bus
            .pci
            .labels()
            .into_iter()
            .filter(|(_, l)| l.remote.as_deref() == Some(id))
            .map(|(slot, _)| slot)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::remote::ProcessEnd;
    use crate::supervisor::DeathCause;

    #[test]
    fn backoff_starts_at_zero_and_doubles_to_five_seconds() {
        let waits: Vec<u128> = (0..8).map(|n| backoff(n).as_millis()).collect();
        assert_eq!(waits, [0, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(backoff(usize::MAX), MAX_BACKOFF);
    }

    #[test]
    fn policies_decide_by_how_the_remote_ended() {
        let clean = Failure::Died(DeathCause::Process(ProcessEnd::Exited(0)));
        let crash = Failure::Died(DeathCause::Process(ProcessEnd::Signaled(9)));
        let eof = Failure::Died(DeathCause::HangUp);
        for f in [clean, crash, eof, Failure::Hung] {
            assert!(!wanted(RestartPolicy::Never, f));
            assert!(wanted(RestartPolicy::Always, f));
        }
        assert!(!wanted(RestartPolicy::OnFailure, clean));
        for f in [crash, eof, Failure::Hung] {
            assert!(wanted(RestartPolicy::OnFailure, f));
        }
    }
}
