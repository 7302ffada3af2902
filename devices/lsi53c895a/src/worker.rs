//! The controller's I/O thread: runs disk commands off the BAR-access
//! path, then completes them under the chip lock (reselection and the
//! interrupt follow from there), and resumes SCRIPTS paused by the
//! instruction budget.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use block::ScsiDisk;

use crate::chip::Chip;

/// Work for the I/O thread.
pub enum WorkerMsg {
    Execute {
        seq: u64,
        disk: Arc<ScsiDisk>,
        lun: u8,
        cdb: Vec<u8>,
        data_out: Vec<u8>,
    },
    /// SCRIPTS paused on their budget: let the vCPU go, then continue.
    Resume,
}

/// Counts work the worker has not finished (for `is_busy`).
#[derive(Default)]
pub struct Pending(AtomicUsize);

impl Pending {
    pub fn add(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
    pub fn done(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
    pub fn busy(&self) -> bool {
        self.0.load(Ordering::Acquire) > 0
    }
}

/// The chip's way to hand work to the thread.
pub struct WorkerHandle {
    tx: Sender<WorkerMsg>,
    pending: Arc<Pending>,
}

impl WorkerHandle {
    pub fn new(tx: Sender<WorkerMsg>, pending: Arc<Pending>) -> Self {
        WorkerHandle { tx, pending }
    }

    /// Whether the thread has no work queued or in hand.
    pub fn idle(&self) -> bool {
        !self.pending.busy()
    }

    /// Queues `msg`; false when the thread is gone.
    pub fn send(&self, msg: WorkerMsg) -> bool {
        self.pending.add();
        if self.tx.send(msg).is_err() {
            self.pending.done();
            return false;
        }
        true
    }
}

/// Pause before resuming budget-limited SCRIPTS.
const RESUME_DELAY: Duration = Duration::from_micros(100);

pub fn run(chip: Arc<Mutex<Chip>>, rx: Receiver<WorkerMsg>, pending: Arc<Pending>) {
    while let Ok(msg) = rx.recv() {
        match msg {
            WorkerMsg::Execute {
                seq,
                disk,
                lun,
                cdb,
                data_out,
            } => {
                let (completion, took) = crate::scsi::timed_execute(&disk, lun, &cdb, &data_out);
                let mut c = chip.lock().unwrap_or_else(|e| e.into_inner());
                c.last_execute = took;
                c.complete_request(seq, completion);
                c.kick();
                // ISTAT is mirrored (Device::mirrored_reads): a change
                // made here, outside an access, must be announced even
                // when the interrupt level stays as it was.
                c.host.registers_changed();
                drop(c);
                pending.done();
            }
            WorkerMsg::Resume => {
                std::thread::sleep(RESUME_DELAY);
                let mut c = chip.lock().unwrap_or_else(|e| e.into_inner());
                c.resume();
                c.host.registers_changed();
                drop(c);
                pending.done();
            }
        }
    }
}
