//! LSI53C895A PCI-to-Ultra2 SCSI controller, as a device plugin.
//!
//! Layout, by file:
//! - [`regs`]: register offsets and bits.
//! - [`instruction`]: typed decoding of SCRIPTS instructions.
//! - [`chip`]: the register file with its side effects, interrupts, DMA
//!   routing (guest RAM, or the chip's own BARs served locally).
//! - [`scripts`]: the SCRIPTS processor (budgeted, never reentered).
//! - [`scsi`]: the SCSI bus: selection, phases, messages, disconnect and
//!   reselection, requests.
//! - [`worker`]: the I/O thread that runs disk commands off the vCPU.
//!
//! Settings (the `[[device]]` table's own keys):
//!
//! ```toml
//! [[device.drive]]
//! file = "disk.img"   # raw image; relative to the config file
//! scsi-id = 0         # 0..=15 except 7 (the controller's own ID)
//! read-only = false
//! ```

pub mod chip;
pub mod instruction;
pub mod regs;
pub mod scripts;
pub mod scsi;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use abi_stable::std_types::RVec;
use block::{DriveConfig, ScsiDisk};
use plugin_api::{BarDesc, BarKind, Device, DeviceDesc, Host, PciIdentity};
use serde::Deserialize;

use chip::{Chip, SCRIPT_RAM_SIZE};
use worker::{Pending, WorkerHandle};

pub const VENDOR_ID: u16 = 0x1000;
pub const DEVICE_ID: u16 = 0x0012;

/// The controller's own SCSI ID as Linux programs it.
const INITIATOR_ID: u8 = 7;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Settings {
    #[serde(default)]
    drive: Vec<DriveConfig>,
}

/// The plugin's device.
pub struct Lsi53c895a {
    chip: Arc<Mutex<Chip>>,
    pending: Arc<Pending>,
    worker: Option<JoinHandle<()>>,
}

impl Lsi53c895a {
    /// Constructor registered with `export_plugin!`.
    pub fn create(settings: &str, host: Host) -> Result<Box<dyn Device>, String> {
        let s: Settings = toml::from_str(settings).map_err(|e| format!("settings: {e}"))?;
        let base = host.resolve_path("");
        let mut targets = BTreeMap::new();
        for d in &s.drive {
            if d.scsi_id > 15 || d.scsi_id == INITIATOR_ID {
                return Err(format!(
                    "drive {}: scsi-id {} is not usable (0..=15, and {INITIATOR_ID} is the controller)",
                    d.file.display(),
                    d.scsi_id
                ));
            }
            if targets.contains_key(&d.scsi_id) {
                return Err(format!("two drives use scsi-id {}", d.scsi_id));
            }
            let disk =
                ScsiDisk::open(d, &base).map_err(|e| format!("drive {}: {e}", d.file.display()))?;
            targets.insert(d.scsi_id, Arc::new(disk));
        }
        Ok(Box::new(Self::with_targets(host, targets)?))
    }

    /// A controller with the given targets (for tests and embedding).
    pub fn with_targets(host: Host, targets: BTreeMap<u8, Arc<ScsiDisk>>) -> Result<Self, String> {
        let chip = Arc::new(Mutex::new(Chip::new(host, targets)));
        let pending = Arc::new(Pending::default());
        let (tx, rx) = channel();
        let worker_chip = chip.clone();
        let worker_pending = pending.clone();
        let worker = std::thread::Builder::new()
            .name("lsi53c895a-io".into())
            .spawn(move || worker::run(worker_chip, rx, worker_pending))
            .map_err(|e| format!("cannot start I/O thread: {e}"))?;
        lock(&chip).worker = Some(WorkerHandle::new(tx, pending.clone()));
        Ok(Lsi53c895a {
            chip,
            pending,
            worker: Some(worker),
        })
    }

    fn chip(&self) -> MutexGuard<'_, Chip> {
        lock(&self.chip)
    }
}

fn lock(m: &Mutex<Chip>) -> MutexGuard<'_, Chip> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Device for Lsi53c895a {
    fn describe(&self) -> DeviceDesc {
        let bar = |index, kind, size| BarDesc {
            index,
            kind,
            size,
            prefetchable: false,
        };
        DeviceDesc {
            identity: PciIdentity {
                vendor_id: VENDOR_ID,
                device_id: DEVICE_ID,
                class_code: 0x01_00_00,
                revision: 0,
                subsystem_vendor_id: 0x1000,
                subsystem_id: 0x1000,
                interrupt_pin: 1,
            },
            bars: RVec::from(vec![
                bar(0, BarKind::Io, 256),
                bar(1, BarKind::Memory32, chip::REG_BAR_SIZE),
                bar(2, BarKind::Memory32, SCRIPT_RAM_SIZE as u64),
            ]),
            capabilities: RVec::new(),
            msi_vectors: 0,
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.chip().note_config_write(offset, data);
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        let mut chip = self.chip();
        chip.stats.bar_reads += 1;
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset.wrapping_add(i as u64);
            *b = match bar {
                0 | 1 => chip.read_reg((off & 0xff) as usize),
                2 => chip.script_ram.get(off as usize).copied().unwrap_or(0xff),
                _ => 0xff,
            };
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        let mut chip = self.chip();
        chip.stats.bar_writes += 1;
        for (i, b) in data.iter().enumerate() {
            let off = offset.wrapping_add(i as u64);
            match bar {
                0 | 1 => chip.write_reg((off & 0xff) as usize, *b),
                2 => {
                    if let Some(r) = chip.script_ram.get_mut(off as usize) {
                        *r = *b;
                    }
                }
                _ => {}
            }
        }
        chip.kick();
    }

    fn reset(&mut self) {
        let mut chip = self.chip();
        chip.soft_reset();
        chip.script_ram.fill(0);
    }

    fn is_busy(&self) -> bool {
        self.pending.busy()
    }

    fn shutdown(&mut self) {
        // Dropping the handle closes the channel; the thread finishes the
        // command in hand and exits.
        let stats = {
            let mut chip = self.chip();
            chip.worker = None;
            chip.stats
        };
        if stats.commands > 0 {
            let host = self.chip().host.clone();
            host.info(&format!("shutdown: {stats:?}"));
        }
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for Lsi53c895a {
    fn drop(&mut self) {
        self.shutdown();
    }
}

plugin_api::export_plugin! {
    name: "lsi53c895a",
    devices: { "lsi53c895a" => Lsi53c895a::create },
}
