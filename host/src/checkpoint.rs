//! The last saved state of each device of a remote, for bringing the
//! device back as it was after its process died.
//!
//! A state is saved only when the device has gone a whole heartbeat
//! period without the guest reaching it (an access on the socket or the
//! ring, a configuration write: the proxy's activity counter; a doorbell
//! the remote's device took: the ring's count), after
//! activity since the last save; and it is used only while the counter
//! still shows the count it was saved at. So a restored device has seen
//! every access the guest made: a crash while the guest left the device
//! alone is invisible to it. Work the device did on its own since (an I/O
//! its worker completed) is redone by the restored device, as its
//! `restore_state` promises (the LSI runs reads again and answers writes
//! with BUSY; dma-example copies again). A device the guest touched after
//! its last save is offered that save as stale (`Save::Stale` from `Checkpoints::last`,
//! `control::RESUME_AFTER_LOSS`): one that can say its guest's work since
//! was lost comes back from it (the LSI, as its driver set it up, with a
//! reset of its SCSI bus that makes the driver issue its commands again);
//! any other comes back reset.
//!
//! Doorbells do not count for a device whose saved state outlives them
//! (`Device::state_outlives_doorbells`, said in `device-doorbells`): its
//! restore finds where it stands in guest RAM (virtio-blk: the used
//! rings), so its save from after the driver's set-up stays current while
//! the guest only rings it, and a crash in the middle of its I/O brings it
//! back as it was. Its proxy leaves those writes out of the count too when
//! they exit to the VMM (during a restart, or beyond the eventfds).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

/// How much the guest has done to a device: the accesses its proxy let
/// through, plus the doorbells its remote took (writes KVM delivers
/// without the VMM, counted by the remote in the ring's page).
#[derive(Clone)]
pub struct Activity {
    pub accesses: Arc<AtomicU64>,
    pub doorbells: Option<channel::ring::DoorbellsTaken>,
}

impl Activity {
    fn load(&self) -> u64 {
        let d = self.doorbells.as_ref().map_or(0, |d| d.load());
        self.accesses.load(Ordering::Acquire).wrapping_add(d)
    }
}

impl From<Arc<AtomicU64>> for Activity {
    fn from(accesses: Arc<AtomicU64>) -> Self {
        Activity {
            accesses,
            doorbells: None,
        }
    }
}

struct Entry {
    /// What the guest has done to the device.
    activity: Activity,
    /// The count at the previous look (a heartbeat ago).
    seen: u64,
    /// The last state saved, and the count it was saved at.
    saved: Option<(u64, Vec<u8>)>,
    /// The count a save was last tried at and failed (not asked again at
    /// that count). A failed try never replaces a good save: a device
    /// that fails (a plugin's panic) cannot save, but the access that
    /// broke it may yet prove not to have reached it, and its save
    /// before is then still current.
    refused_at: Option<u64>,
}

/// A device's last saved state, as [`Checkpoints::last`] finds it.
#[derive(Debug, PartialEq, Eq)]
pub enum Save {
    /// The guest has not reached the device since: restoring it brings
    /// the device back as the guest left it.
    Current(Vec<u8>),
    /// The guest has reached the device since: a device can come back
    /// from it only by saying its guest's work since was lost
    /// (`control::RESUME_AFTER_LOSS`).
    Stale(Vec<u8>),
}

/// Saved states of one remote's devices.
#[derive(Default)]
pub struct Checkpoints {
    devices: Mutex<BTreeMap<String, Entry>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Checkpoints {
    /// Follows device `id`, whose proxy counts its accesses in `activity`.
    pub fn track(&self, id: &str, activity: impl Into<Activity>) {
        let activity = activity.into();
        let seen = activity.load().wrapping_sub(1);
        lock(&self.devices).insert(
            id.to_owned(),
            Entry {
                activity,
                seen,
                saved: None,
                refused_at: None,
            },
        );
    }

    /// Stops following device `id`.
    pub fn forget(&self, id: &str) {
        lock(&self.devices).remove(id);
    }

    /// The devices to save now, with the count to save them at: idle for
    /// a whole period, and not saved at this count yet.
    pub fn due(&self) -> Vec<(String, u64)> {
        let mut due = Vec::new();
        for (id, e) in lock(&self.devices).iter_mut() {
            let now = e.activity.load();
            let idle = now == e.seen;
            e.seen = now;
            let saved_here =
                e.saved.as_ref().is_some_and(|(at, _)| *at == now) || e.refused_at == Some(now);
            if idle && !saved_here {
                due.push((id.clone(), now));
            }
        }
        due
    }

    /// Keeps `state` (or the failure to save) as device `id`'s save at
    /// `count`, unless the guest reached the device meanwhile.
    pub fn record(&self, id: &str, count: u64, state: Option<Vec<u8>>) {
        if let Some(e) = lock(&self.devices).get_mut(id) {
            if e.activity.load() == count {
                match state {
                    Some(state) => {
                        e.saved = Some((count, state));
                        e.refused_at = None;
                    }
                    None => e.refused_at = Some(count),
                }
            }
        }
    }

    /// Device `id`'s last saved state, and whether the guest has reached
    /// the device since it was saved.
    pub fn last(&self, id: &str) -> Option<Save> {
        let devices = lock(&self.devices);
        let e = devices.get(id)?;
        let (at, state) = e.saved.as_ref()?;
        Some(if *at == e.activity.load() {
            Save::Current(state.clone())
        } else {
            Save::Stale(state.clone())
        })
    }

    /// The devices with a current saved state.
    pub fn current_ids(&self) -> Vec<String> {
        let devices = lock(&self.devices);
        devices
            .iter()
            .filter(|(_, e)| matches!(&e.saved, Some((at, _)) if *at == e.activity.load()))
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// A device just resumed from `state`, a save the guest had moved
    /// past (`control::RESUME_AFTER_LOSS`): the save it has, stale from
    /// the start (the device has moved on from it: it reported the loss),
    /// so that a crash before its next save can resume from it again
    /// rather than come back reset. Its next idle save replaces it.
    pub fn seed_stale(&self, id: &str, state: Vec<u8>) {
        if let Some(e) = lock(&self.devices).get_mut(id) {
            let now = e.activity.load();
            e.seen = now;
            e.saved = Some((now.wrapping_sub(1), state));
            // A new instance: it may well save where the old one could not.
            e.refused_at = None;
        }
    }

    /// A device just restored with `state`: that is its save, as of now.
    pub fn seed(&self, id: &str, state: Vec<u8>) {
        if let Some(e) = lock(&self.devices).get_mut(id) {
            let now = e.activity.load();
            e.seen = now;
            e.saved = Some((now, state));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device `id`'s save, if current.
    fn current(cp: &Checkpoints, id: &str) -> Option<Vec<u8>> {
        match cp.last(id)? {
            Save::Current(state) => Some(state),
            Save::Stale(_) => None,
        }
    }

    /// Device `id`'s save, if stale.
    fn stale(cp: &Checkpoints, id: &str) -> Option<Vec<u8>> {
        match cp.last(id)? {
            Save::Stale(state) => Some(state),
            Save::Current(_) => None,
        }
    }

    #[test]
    fn a_save_is_due_after_an_idle_period_and_current_until_the_next_access() {
        let cp = Checkpoints::default();
        let a = Arc::new(AtomicU64::new(0));
        cp.track("d", a.clone());
        // First look: not idle yet (nothing seen before).
        assert!(cp.due().is_empty());
        // A period without accesses: due at count 0.
        assert_eq!(cp.due(), [("d".to_string(), 0)]);
        cp.record("d", 0, Some(vec![1]));
        assert_eq!(current(&cp, "d"), Some(vec![1]));
        assert!(cp.due().is_empty(), "saved at this count already");
        assert_eq!(stale(&cp, "d"), None);
        assert_eq!(cp.last("d"), Some(Save::Current(vec![1])));
        // The guest reaches the device: the save is stale at once.
        a.fetch_add(1, Ordering::AcqRel);
        assert_eq!(current(&cp, "d"), None);
        assert_eq!(stale(&cp, "d"), Some(vec![1]));
        assert_eq!(cp.last("d"), Some(Save::Stale(vec![1])));
        assert!(cp.due().is_empty(), "active during this period");
        assert_eq!(cp.due(), [("d".to_string(), 1)]);
        // A save the guest overtook is dropped.
        a.fetch_add(1, Ordering::AcqRel);
        cp.record("d", 1, Some(vec![2]));
        assert_eq!(current(&cp, "d"), None);
        // A device that cannot save is not asked again at the same count.
        assert!(cp.due().is_empty());
        assert_eq!(cp.due(), [("d".to_string(), 2)]);
        cp.record("d", 2, None);
        assert!(cp.due().is_empty());
        assert_eq!(current(&cp, "d"), None);
        assert!(cp.current_ids().is_empty());
        cp.seed_stale("d", vec![4]);
        assert_eq!(current(&cp, "d"), None, "a resumed device has moved on");
        assert_eq!(stale(&cp, "d"), Some(vec![4]));
        assert_eq!(
            cp.due(),
            [("d".to_string(), 2)],
            "its next idle save, though the old instance refused one here"
        );
        cp.seed("d", vec![3]);
        assert_eq!(cp.current_ids(), ["d"]);
        cp.forget("d");
        assert_eq!(current(&cp, "d"), None);
    }

    #[test]
    fn a_failed_save_keeps_the_good_one_before_it() {
        let cp = Checkpoints::default();
        let a = Arc::new(AtomicU64::new(0));
        cp.track("d", a.clone());
        assert!(cp.due().is_empty());
        assert_eq!(cp.due(), [("d".to_string(), 0)]);
        cp.record("d", 0, Some(vec![7]));
        // The write that breaks the plugin is counted; a save tried then
        // fails (the device has failed).
        a.fetch_add(1, Ordering::AcqRel);
        assert!(cp.due().is_empty());
        assert_eq!(cp.due(), [("d".to_string(), 1)]);
        cp.record("d", 1, None);
        assert!(cp.due().is_empty(), "not asked again at that count");
        // The write proves never to have reached the device (refused):
        // the save from before it is current again.
        a.fetch_sub(1, Ordering::AcqRel);
        assert_eq!(current(&cp, "d"), Some(vec![7]));
        assert_eq!(cp.current_ids(), ["d"]);
    }
}
