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
//!
//! Control operations ([`Device::control`], from the VMM's QMP
//! `device_add`/`device_del` of a `scsi-hd` and `block_resize`), JSON
//! objects with the same kebab-case keys as `[[device.drive]]`:
//! - `drive-add` `{"scsi-id": N, "file": PATH, "read-only": B, ...}` →
//!   `{"scsi-id": N, "capacity": BYTES}`: opens the image and attaches it;
//!   the new disk reports POWER ON/RESET (unit attention 6/29/00) on its
//!   first command.
//! - `drive-del` `{"scsi-id": N}` → `{"scsi-id": N}`: detaches; commands
//!   already on the I/O worker finish first (waited for, up to
//!   [`DRAIN_TIMEOUT`]), a command still receiving DATA OUT completes with
//!   BUSY; then selecting that ID times out as for an absent target.
//! - `drive-resize` `{"scsi-id": N, "size": BYTES}` → `{"scsi-id": N,
//!   "capacity": BYTES}`: sets the image's length; the disk reports
//!   CAPACITY DATA HAS CHANGED (6/2a/09) on its next command.
//! - `drive-list` → `[{"scsi-id", "lun", "file", "read-only", "capacity"}]`.
//! - `posted-writes` `{"on": B}` (the host's notice,
//!   [`plugin_api::control::POSTED_WRITES`]): while on, a READ or WRITE
//!   that a BAR write's SCRIPTS start runs at once in that write, target
//!   connected, instead of on the I/O worker with a disconnect and a
//!   reselection (only while the worker is idle, so no command overtakes
//!   another, and while the disk's last command took less than
//!   [`scsi::INLINE_LIMIT`]).

pub mod chip;
pub mod instruction;
pub mod regs;
pub mod scripts;
pub mod scsi;
pub mod state;
pub mod worker;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use block::{DriveConfig, ScsiDisk};
use plugin_api::control::{self, json, Value};
use plugin_api::{BarDesc, Device, DeviceDesc, Host, MirroredRead, PciIdentity};

use chip::{Chip, SCRIPT_RAM_SIZE};
use worker::{Pending, WorkerHandle};

pub const VENDOR_ID: u16 = 0x1000;
pub const DEVICE_ID: u16 = 0x0012;

/// The controller's own SCSI ID as Linux programs it.
const INITIATOR_ID: u8 = 7;

/// The controller's settings: its `[[device.drive]]` tables.
#[derive(plugin_api::Deserialize)]
#[serde(crate = "plugin_api::serde", deny_unknown_fields)]
pub struct Settings {
    /// The disks attached at start.
    #[serde(default)]
    pub drive: Vec<DriveConfig>,
}

/// How long `drive-del` waits for the drive's commands on the I/O worker.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// The plugin's device.
pub struct Lsi53c895a {
    chip: Arc<Mutex<Chip>>,
    pending: Arc<Pending>,
    worker: Option<JoinHandle<()>>,
    /// Image path of each drive (for `drive-list`; the disk does not keep it).
    files: BTreeMap<u8, PathBuf>,
    /// Where relative drive paths are resolved.
    base: PathBuf,
    /// The host said no vCPU waits for our BAR writes
    /// (`control::POSTED_WRITES`).
    posted_writes: bool,
}

/// `drive-del` arguments.
#[derive(plugin_api::Deserialize)]
#[serde(
    crate = "plugin_api::serde",
    deny_unknown_fields,
    rename_all = "kebab-case"
)]
struct DriveDel {
    scsi_id: u8,
}

/// `drive-resize` arguments.
#[derive(plugin_api::Deserialize)]
#[serde(
    crate = "plugin_api::serde",
    deny_unknown_fields,
    rename_all = "kebab-case"
)]
struct DriveResize {
    scsi_id: u8,
    size: u64,
}

/// Checks a drive's target ID (the same rule for config and `drive-add`).
fn check_scsi_id(d: &DriveConfig) -> Result<(), String> {
    if d.scsi_id > 15 || d.scsi_id == INITIATOR_ID {
        return Err(format!(
            "drive {}: scsi-id {} is not usable (0..=15, and {INITIATOR_ID} is the controller)",
            d.file.display(),
            d.scsi_id
        ));
    }
    Ok(())
}

fn open_disk(d: &DriveConfig, base: &Path) -> Result<ScsiDisk, String> {
    ScsiDisk::open(d, base).map_err(|e| format!("drive {}: {e}", d.file.display()))
}

fn resolve(base: &Path, file: &Path) -> PathBuf {
    if file.is_absolute() {
        file.to_owned()
    } else {
        base.join(file)
    }
}

fn capacity(disk: &ScsiDisk) -> u64 {
    disk.capacity_blocks() * u64::from(disk.block_size())
}

impl Lsi53c895a {
    /// Constructor registered with `export_plugin!`.
    pub fn create(s: Settings, host: Host) -> Result<Box<dyn Device>, String> {
        let base = host.resolve_path("");
        let mut targets = BTreeMap::new();
        let mut files = BTreeMap::new();
        for d in &s.drive {
            check_scsi_id(d)?;
            if targets.contains_key(&d.scsi_id) {
                return Err(format!("two drives use scsi-id {}", d.scsi_id));
            }
            let disk = open_disk(d, &base)?;
            targets.insert(d.scsi_id, Arc::new(disk));
            files.insert(d.scsi_id, resolve(&base, &d.file));
        }
        let mut dev = Self::with_targets(host, targets)?;
        dev.files = files;
        dev.base = base;
        Ok(Box::new(dev))
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
        let base = lock(&chip).host.resolve_path("");
        Ok(Lsi53c895a {
            chip,
            pending,
            worker: Some(worker),
            files: BTreeMap::new(),
            base,
            posted_writes: false,
        })
    }

    fn chip(&self) -> MutexGuard<'_, Chip> {
        lock(&self.chip)
    }

    fn disk(&self, scsi_id: u8) -> Result<Arc<ScsiDisk>, String> {
        self.chip()
            .targets
            .get(&scsi_id)
            .cloned()
            .ok_or_else(|| format!("no drive at scsi-id {scsi_id}"))
    }

    /// `drive-add`: the image is opened without the chip lock (it is file
    /// I/O); the disk joins the targets in one step under it.
    fn drive_add(&mut self, d: DriveConfig) -> Result<Value, String> {
        check_scsi_id(&d)?;
        if self.chip().targets.contains_key(&d.scsi_id) {
            return Err(format!("scsi-id {} is in use", d.scsi_id));
        }
        let disk = open_disk(&d, &self.base)?;
        // A disk that appears on the bus tells the initiator so on its
        // first command, as after power on.
        disk.reset();
        let cap = capacity(&disk);
        {
            let mut chip = self.chip();
            if chip.targets.contains_key(&d.scsi_id) {
                return Err(format!("scsi-id {} is in use", d.scsi_id));
            }
            chip.targets.insert(d.scsi_id, Arc::new(disk));
        }
        self.files.insert(d.scsi_id, resolve(&self.base, &d.file));
        let host = self.chip().host.clone();
        host.info(&format!(
            "drive {} attached at scsi-id {}",
            d.file.display(),
            d.scsi_id
        ));
        Ok(json!({"scsi-id": d.scsi_id, "capacity": cap}))
    }

    /// `drive-del`: off the target map at once (new selections time out),
    /// then wait for the worker to let go of the disk.
    fn drive_del(&mut self, a: DriveDel) -> Result<Value, String> {
        let disk = {
            let mut chip = self.chip();
            let disk = chip
                .targets
                .remove(&a.scsi_id)
                .ok_or_else(|| format!("no drive at scsi-id {}", a.scsi_id))?;
            chip.drop_target(a.scsi_id);
            disk
        };
        self.files.remove(&a.scsi_id);
        // Every command handed to the worker holds a reference to the
        // disk until it has completed; ours is then the last one.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while Arc::strong_count(&disk) > 1 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        if Arc::strong_count(&disk) > 1 {
            let host = self.chip().host.clone();
            host.warn(&format!(
                "drive at scsi-id {} detached with commands still on the I/O worker",
                a.scsi_id
            ));
        }
        Ok(json!({"scsi-id": a.scsi_id}))
    }

    fn drive_resize(&mut self, a: DriveResize) -> Result<Value, String> {
        let size = a.size;
        if size == 0 || size % 512 != 0 {
            return Err(format!(
                "size {size} is not a positive multiple of 512 bytes"
            ));
        }
        let disk = self.disk(a.scsi_id)?;
        if disk.read_only() {
            return Err(format!("drive at scsi-id {} is read-only", a.scsi_id));
        }
        disk.resize(size)
            .map_err(|e| format!("drive at scsi-id {}: {e}", a.scsi_id))?;
        Ok(json!({"scsi-id": a.scsi_id, "capacity": capacity(&disk)}))
    }

    /// `control::RESUME_AFTER_LOSS`: the state a VMM saved while the
    /// guest left the controller alone (registers and SCRIPTS as the
    /// driver set them up), then a reset of the SCSI bus, as if another
    /// initiator had reset it. The commands the driver had issued since
    /// died with the old process, and SCRIPTS cannot be run again exactly
    /// once against guest RAM that has moved on: the reset makes the
    /// driver issue them again (Linux: `sym_start_up`, DID_RESET, which
    /// the midlayer retries without an error to user space). A command
    /// the old process had completed is then done twice, with the same
    /// buffers: a read reads again, a write writes the same data.
    fn resume_after_loss(&mut self, state: &[u8]) -> Result<Value, String> {
        let mut chip = self.chip();
        chip.restore_state(state)?;
        chip.bus_reset_detected();
        Ok(json!({"bus-reset": true}))
    }

    /// The chip's counters: BAR accesses, SCRIPTS runs and instructions,
    /// commands, reselections, bytes memory moves copied, and the most work
    /// one run did (bounded by the SCRIPTS budget).
    fn stats(&self) -> Value {
        let s = self.chip().stats;
        json!({
            "bar-reads": s.bar_reads,
            "bar-writes": s.bar_writes,
            "scripts-runs": s.scripts_runs,
            "instructions": s.instructions,
            "commands": s.commands,
            "commands-inline": s.commands_inline,
            "reselections": s.reselections,
            "bytes-moved": s.bytes_moved,
            "max-run-work": s.max_run_work,
            "max-run-bytes": s.max_run_bytes,
            "budget": scripts::DEFAULT_BUDGET,
        })
    }

    fn drive_list(&self) -> Value {
        let chip = self.chip();
        let list: Vec<Value> = chip
            .targets
            .iter()
            .map(|(id, disk)| {
                json!({
                    "scsi-id": id,
                    "lun": 0,
                    "file": self.files.get(id).map(|p| p.display().to_string()),
                    "read-only": disk.read_only(),
                    "capacity": capacity(disk),
                })
            })
            .collect();
        Value::Array(list)
    }
}

fn lock(m: &Mutex<Chip>) -> MutexGuard<'_, Chip> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Device for Lsi53c895a {
    fn describe(&self) -> DeviceDesc {
        let identity = PciIdentity::new(VENDOR_ID, DEVICE_ID, 0x01_00_00)
            .with_subsystem(0x1000, 0x1000)
            .with_intx();
        DeviceDesc::new(identity).with_bars([
            BarDesc::io(0, 256),
            BarDesc::mmio32(1, chip::REG_BAR_SIZE),
            BarDesc::mmio32(2, SCRIPT_RAM_SIZE as u64),
        ])
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.chip().note_config_write(offset, data);
    }

    /// ISTAT, the register the Linux driver reads twice per command (in
    /// its interrupt handler and to check for pending work): reading it
    /// has no side effect, and it changes only in an access or in the
    /// worker, which says so (`Host::registers_changed`). DSTAT and SIST,
    /// which clear on read, are never mirrored.
    fn mirrored_reads(&self) -> Vec<MirroredRead> {
        vec![
            MirroredRead::new(0, regs::ISTAT0 as u64, 1),
            MirroredRead::new(1, regs::ISTAT0 as u64, 1),
        ]
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
        // Posted (no vCPU waits): a disk command these SCRIPTS start runs
        // at once, without the worker (`Chip::posted`).
        chip.posted = self.posted_writes;
        chip.kick();
        chip.posted = false;
    }

    fn reset(&mut self) {
        let mut chip = self.chip();
        chip.soft_reset();
        chip.script_ram.fill(0);
    }

    fn is_busy(&self) -> bool {
        self.pending.busy()
    }

    /// Registers, SCRIPTS RAM, the SCRIPTS processor and the bus with its
    /// commands (`state.rs`).
    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        Ok(self.chip().save_state())
    }

    /// Refuses a blob that is too large, truncated, of another version or
    /// inconsistent, leaving the controller as it was (`state.rs`).
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        self.chip().restore_state(state)
    }

    fn control(&mut self, op: &str, args: &Value) -> Result<Value, String> {
        match op {
            "drive-add" => control::call(op, args, |d| self.drive_add(d)),
            "drive-del" => control::call(op, args, |a| self.drive_del(a)),
            "drive-resize" => control::call(op, args, |a| self.drive_resize(a)),
            // Arguments ignored, as before typed arguments.
            "drive-list" => Ok(self.drive_list()),
            "stats" => Ok(self.stats()),
            // Fault injection, for recovery tests (only the operator
            // reaches control operations, never the guest): the plugin
            // panics here, as a bug in it would, with its worker running.
            "x-panic" => panic!("x-panic: a fault injected by the operator"),
            control::RESUME_AFTER_LOSS => {
                control::call(op, args, |a: control::ResumeAfterLoss| {
                    self.resume_after_loss(&a.state()?)
                })
            }
            control::POSTED_WRITES => control::call(op, args, |a: control::PostedWrites| {
                self.posted_writes = a.on;
                Ok(a)
            }),
            _ => Err(format!(
                "lsi53c895a has no control operation `{op}` (it has drive-add, drive-del, drive-resize, drive-list, stats, posted-writes)"
            )),
        }
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
