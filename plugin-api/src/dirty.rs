//! The pages of guest RAM a device wrote by DMA while a migration logs
//! them: KVM's dirty log sees only the vCPUs' writes, so a host counts
//! its devices' (vfio-user's DMA dirty page logging, done by the host
//! that serves the device's DMA calls).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The unit of the log.
pub const PAGE: u64 = 4096;

/// A device's DMA dirty log. Off until [`start`](Self::start); while off
/// a write costs one atomic load.
#[derive(Debug, Default)]
pub struct DirtyLog {
    on: AtomicBool,
    /// Page numbers written since the last take; bounded by the pages of
    /// guest RAM (only successful writes are marked).
    pages: Mutex<BTreeSet<u64>>,
}

impl DirtyLog {
    fn pages(&self) -> std::sync::MutexGuard<'_, BTreeSet<u64>> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts logging, with an empty log.
    pub fn start(&self) {
        let mut p = self.pages();
        p.clear();
        self.on.store(true, Ordering::SeqCst);
    }

    /// Stops logging and forgets the log.
    pub fn stop(&self) {
        let mut p = self.pages();
        self.on.store(false, Ordering::SeqCst);
        p.clear();
    }

    /// Whether it logs.
    pub fn is_on(&self) -> bool {
        self.on.load(Ordering::SeqCst)
    }

    /// Notes a successful DMA write of `len` bytes at `gpa`.
    pub fn mark(&self, gpa: u64, len: usize) {
        if len == 0 || !self.on.load(Ordering::Relaxed) {
            return;
        }
        let last = gpa.saturating_add(len as u64 - 1);
        let mut p = self.pages();
        // Checked again under the lock: a stop meanwhile leaves it empty.
        if self.on.load(Ordering::Relaxed) {
            p.extend(gpa / PAGE..=last / PAGE);
        }
    }

    /// The pages written since the last take, as `(gpa, len)` runs, and
    /// an empty log.
    pub fn take(&self) -> Vec<(u64, u64)> {
        runs(std::mem::take(&mut *self.pages()))
    }
}

impl DirtyLog {
    /// The page numbers of `[gpa, gpa + len)` written since they were last
    /// taken, removed from the log; pages outside stay (vfio-user's
    /// DMA_LOGGING_REPORT reads and clears one range).
    pub fn take_range(&self, gpa: u64, len: u64) -> Vec<u64> {
        if len == 0 {
            return Vec::new();
        }
        let first = gpa / PAGE;
        let last = gpa.saturating_add(len - 1) / PAGE;
        let mut p = self.pages();
        let taken: Vec<u64> = p.range(first..=last).copied().collect();
        for page in &taken {
            p.remove(page);
        }
        taken
    }
}

/// Page numbers, in ascending order, as `(gpa, len)` runs of adjacent
/// pages.
pub fn runs(pages: impl IntoIterator<Item = u64>) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for p in pages {
        match runs.last_mut() {
            Some((start, len)) if start.checked_add(*len) == Some(p * PAGE) => *len += PAGE,
            _ => runs.push((p * PAGE, PAGE)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_range_is_taken_alone() {
        let log = DirtyLog::default();
        log.start();
        for gpa in [0x1000, 0x5000, 0x9000] {
            log.mark(gpa, 1);
        }
        assert_eq!(log.take_range(0x2000, 0x4000), [5]);
        assert!(log.take_range(0x2000, 0x4000).is_empty());
        assert!(log.take_range(0, 0).is_empty());
        assert_eq!(log.take(), [(0x1000, PAGE), (0x9000, PAGE)]);
    }

    #[test]
    fn writes_are_logged_only_while_on_and_come_back_as_runs() {
        let log = DirtyLog::default();
        log.mark(0x1000, 8);
        assert!(log.take().is_empty());
        log.start();
        log.mark(0x1ff8, 16); // crosses into the next page
        log.mark(0x5000, 1);
        log.mark(0x3000, 4096);
        assert_eq!(log.take(), vec![(0x1000, 0x3000), (0x5000, 0x1000)]);
        assert!(log.take().is_empty(), "a take empties the log");
        log.mark(0x9000, 1);
        log.stop();
        assert!(log.take().is_empty());
        log.mark(u64::MAX, 1);
        log.start();
        log.mark(u64::MAX - 1, 2);
        assert_eq!(log.take(), vec![((u64::MAX / PAGE) * PAGE, PAGE)]);
    }
}
