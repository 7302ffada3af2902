//! `dma-example`: a small but real PCI device, in the spirit of QEMU's
//! `edu`, written as the template for third-party plugins.
//!
//! BAR0 is 4 KiB of 32-bit MMIO registers (little-endian):
//!
//! | offset | name        | access | meaning |
//! |-------:|-------------|--------|---------|
//! | 0x00   | `ID`        | RO     | [`ID_VALUE`] |
//! | 0x04   | `LIVENESS`  | RW     | reads back the bitwise NOT of what was written |
//! | 0x08   | `SCRATCH`   | RW     | plain storage |
//! | 0x20   | `STATUS`    | RO     | bit 0: DMA running |
//! | 0x24   | `IRQ_STATUS`| RO     | pending interrupt causes; INTx is high while non-zero |
//! | 0x28   | `IRQ_RAISE` | WO     | sets the written bits in `IRQ_STATUS` |
//! | 0x2c   | `IRQ_ACK`   | WO     | clears the written bits in `IRQ_STATUS` |
//! | 0x40   | `DMA_SRC`   | RW     | 64-bit guest-physical source (0x40 low, 0x44 high) |
//! | 0x48   | `DMA_DST`   | RW     | 64-bit guest-physical destination |
//! | 0x50   | `DMA_LEN`   | RW     | bytes to copy (at most `max-transfer`) |
//! | 0x58   | `DMA_CMD`   | RW     | bit 0: start; bit 2: raise [`IRQ_DMA_DONE`] when done |
//! | 0x5c   | `DMA_RESULT`| RO     | 0 = ok, 1 = DMA error (address not in guest RAM), 2 = too long |
//!
//! The copy runs on the device's own worker thread, never inside the BAR
//! write that starts it: that is how a plugin keeps slow work off the vCPU.

//!
//! ID, STATUS, IRQ_STATUS, DMA_CMD and DMA_RESULT are declared mirrored
//! (`Device::mirrored_reads`): reading them has no side effect, so in a
//! remote the VMM answers a guest polling them without a round trip. The
//! worker changes three of them outside any access, and says so with
//! `Host::registers_changed` when the copy ends.
//!
//! Settings (the device's table in the VM config, see [`Settings`]):
//! `max-transfer = 1048576` (bytes); `interrupt = "intx" | "msi" |
//! "msix"` (default `"intx"`).
//!
//! Interrupts: INTx is high while `IRQ_STATUS` is non-zero. With
//! `interrupt = "msi"` the function also offers MSI (one vector), with
//! `"msix"` MSI-X (one vector): each new cause set in `IRQ_STATUS` (a
//! raise, a finished DMA) raises vector 0 too. The device does not track
//! which the guest enabled: the host drops INTx while MSI or MSI-X is
//! enabled, and the vector while neither is, so a device may always
//! raise both.
//!
//! Control operation (`Device::control`, asked for by the VMM's operator,
//! not the guest; the harness's `TestBench::control` calls it):
//! `set-max-transfer {"bytes": N}` replies `{"max-transfer": N,
//! "previous": M}`.
//!
//! The crate depends on `plugin-api` alone: settings and control arguments
//! are deserialized for it, the test macro is `plugin_api::plugin_tests!`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use plugin_api::control::{self, Value};
use plugin_api::{BarDesc, Device, DeviceDesc, Host, MirroredRead, PciIdentity};

pub const VENDOR_ID: u16 = 0x1234;
pub const DEVICE_ID: u16 = 0x11e9;
pub const ID_VALUE: u32 = 0xd3a0_0001;

pub const REG_ID: u64 = 0x00;
pub const REG_LIVENESS: u64 = 0x04;
pub const REG_SCRATCH: u64 = 0x08;
pub const REG_STATUS: u64 = 0x20;
pub const REG_IRQ_STATUS: u64 = 0x24;
pub const REG_IRQ_RAISE: u64 = 0x28;
pub const REG_IRQ_ACK: u64 = 0x2c;
pub const REG_DMA_SRC: u64 = 0x40;
pub const REG_DMA_DST: u64 = 0x48;
pub const REG_DMA_LEN: u64 = 0x50;
pub const REG_DMA_CMD: u64 = 0x58;
pub const REG_DMA_RESULT: u64 = 0x5c;

pub const DMA_CMD_START: u32 = 1;
pub const DMA_CMD_IRQ: u32 = 4;
pub const IRQ_DMA_DONE: u32 = 0x100;
pub const DMA_OK: u32 = 0;
pub const DMA_FAULT: u32 = 1;
pub const DMA_TOO_LONG: u32 = 2;

/// The device's settings: its `[[device]]` table less the placement keys.
#[derive(plugin_api::Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(
    crate = "plugin_api::serde",
    deny_unknown_fields,
    rename_all = "kebab-case"
)]
pub struct Settings {
    /// The longest DMA the engine accepts, in bytes (default 1 MiB).
    #[serde(default = "default_max_transfer")]
    pub max_transfer: u32,
    /// The interrupts offered besides INTx.
    #[serde(default)]
    pub interrupt: Interrupt,
}

/// What the function offers besides INTx.
#[derive(plugin_api::Deserialize, Debug, Clone, Copy, Default, PartialEq, Eq)]
#[serde(crate = "plugin_api::serde", rename_all = "kebab-case")]
pub enum Interrupt {
    /// INTx only.
    #[default]
    Intx,
    /// An MSI capability with one vector.
    Msi,
    /// MSI-X with one vector.
    Msix,
}

/// `set-max-transfer`'s arguments.
#[derive(plugin_api::Deserialize)]
#[serde(crate = "plugin_api::serde", deny_unknown_fields)]
struct SetMaxTransfer {
    bytes: u32,
}

/// `set-max-transfer`'s reply.
#[derive(plugin_api::Serialize)]
#[serde(crate = "plugin_api::serde", rename_all = "kebab-case")]
struct MaxTransfer {
    max_transfer: u32,
    previous: u32,
}

fn default_max_transfer() -> u32 {
    1 << 20
}

/// Registers shared between the BAR handlers and the DMA worker.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
struct Regs {
    liveness: u32,
    scratch: u32,
    irq_status: u32,
    dma_src: u64,
    dma_dst: u64,
    dma_len: u32,
    dma_cmd: u32,
    dma_result: u32,
}

struct Shared {
    regs: Mutex<Regs>,
    busy: AtomicBool,
    host: Host,
    interrupt: Interrupt,
}

impl Shared {
    fn regs(&self) -> MutexGuard<'_, Regs> {
        self.regs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drives INTx from `irq_status`, and raises the message vector for
    /// the causes in `new` just set; call with the lock held.
    fn update_irq(&self, regs: &Regs, new: u32) {
        self.host.set_intx(regs.irq_status != 0);
        if self.interrupt != Interrupt::Intx && regs.irq_status & new != 0 {
            // The same call for MSI and MSI-X (`Host::msi_notify`).
            self.host.msix_notify(0);
        }
    }
}

struct DmaJob {
    src: u64,
    dst: u64,
    len: u32,
    raise_irq: bool,
}

/// The device.
pub struct DmaExample {
    shared: Arc<Shared>,
    max_transfer: u32,
    jobs: Option<Sender<DmaJob>>,
    worker: Option<JoinHandle<()>>,
}

impl DmaExample {
    /// The constructor `export_plugin!` registers: the settings arrive
    /// deserialized (an unknown or mistyped key never gets here).
    pub fn create(s: Settings, host: Host) -> Result<Box<dyn Device>, String> {
        if s.max_transfer == 0 {
            return Err("settings: max-transfer must be at least 1".into());
        }
        let shared = Arc::new(Shared {
            regs: Mutex::new(Regs::default()),
            busy: AtomicBool::new(false),
            host,
            interrupt: s.interrupt,
        });
        let (tx, rx) = channel::<DmaJob>();
        let worker_shared = shared.clone();
        let worker = std::thread::Builder::new()
            .name("dma-example".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    run_dma(&worker_shared, job);
                }
            })
            .map_err(|e| format!("cannot start DMA worker: {e}"))?;
        Ok(Box::new(DmaExample {
            shared,
            max_transfer: s.max_transfer,
            jobs: Some(tx),
            worker: Some(worker),
        }))
    }

    fn read_reg(&self, offset: u64) -> u32 {
        let r = self.shared.regs();
        match offset {
            REG_ID => ID_VALUE,
            REG_LIVENESS => !r.liveness,
            REG_SCRATCH => r.scratch,
            REG_STATUS => u32::from(self.shared.busy.load(Ordering::Acquire)),
            REG_IRQ_STATUS => r.irq_status,
            REG_DMA_SRC => r.dma_src as u32,
            0x44 => (r.dma_src >> 32) as u32,
            REG_DMA_DST => r.dma_dst as u32,
            0x4c => (r.dma_dst >> 32) as u32,
            REG_DMA_LEN => r.dma_len,
            REG_DMA_CMD => r.dma_cmd,
            REG_DMA_RESULT => r.dma_result,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let mut r = self.shared.regs();
        match offset {
            REG_LIVENESS => r.liveness = value,
            REG_SCRATCH => r.scratch = value,
            REG_IRQ_RAISE => {
                r.irq_status |= value;
                self.shared.update_irq(&r, value);
            }
            REG_IRQ_ACK => {
                r.irq_status &= !value;
                self.shared.update_irq(&r, 0);
            }
            REG_DMA_SRC => r.dma_src = (r.dma_src & !0xffff_ffff) | u64::from(value),
            0x44 => r.dma_src = (r.dma_src & 0xffff_ffff) | u64::from(value) << 32,
            REG_DMA_DST => r.dma_dst = (r.dma_dst & !0xffff_ffff) | u64::from(value),
            0x4c => r.dma_dst = (r.dma_dst & 0xffff_ffff) | u64::from(value) << 32,
            REG_DMA_LEN => r.dma_len = value,
            REG_DMA_CMD => {
                r.dma_cmd = value;
                // A start while a copy runs is ignored, like a busy engine.
                if value & DMA_CMD_START != 0 && !self.shared.busy.load(Ordering::Acquire) {
                    let job = DmaJob {
                        src: r.dma_src,
                        dst: r.dma_dst,
                        len: r.dma_len,
                        raise_irq: value & DMA_CMD_IRQ != 0,
                    };
                    if job.len > self.max_transfer {
                        r.dma_result = DMA_TOO_LONG;
                        r.dma_cmd &= !DMA_CMD_START;
                        return;
                    }
                    self.shared.busy.store(true, Ordering::Release);
                    drop(r);
                    if let Some(tx) = &self.jobs {
                        if tx.send(job).is_err() {
                            self.shared.busy.store(false, Ordering::Release);
                        }
                    }
                }
            }
            _ => {}
        }
    }
}

fn run_dma(shared: &Shared, job: DmaJob) {
    let mut buf = vec![0u8; job.len as usize];
    let result = shared
        .host
        .dma_read(job.src, &mut buf)
        .and_then(|()| shared.host.dma_write(job.dst, &buf));
    if let Err(e) = &result {
        shared.host.warn(&format!("DMA failed: {e}"));
    }
    let mut r = shared.regs();
    r.dma_result = if result.is_ok() { DMA_OK } else { DMA_FAULT };
    r.dma_cmd &= !DMA_CMD_START;
    shared.busy.store(false, Ordering::Release);
    if job.raise_irq {
        r.irq_status |= IRQ_DMA_DONE;
        shared.update_irq(&r, IRQ_DMA_DONE);
    }
    // STATUS, DMA_CMD and DMA_RESULT are mirrored (`mirrored_reads`) and
    // changed here, on the worker, outside any access: say so, even when
    // no interrupt was asked for (a guest may poll STATUS instead).
    shared.host.registers_changed();
}

impl Device for DmaExample {
    /// Registers a guest polls, whose reads have no side effect: in a
    /// remote the VMM answers them from its mirror, without a round trip.
    /// Those the worker changes (STATUS, DMA_CMD, DMA_RESULT) are
    /// announced by `run_dma`; IRQ_STATUS changes with the interrupt line,
    /// which is a notice by itself.
    fn mirrored_reads(&self) -> Vec<MirroredRead> {
        [
            REG_ID,
            REG_STATUS,
            REG_IRQ_STATUS,
            REG_DMA_CMD,
            REG_DMA_RESULT,
        ]
        .into_iter()
        .map(|offset| MirroredRead::new(0, offset, 4))
        .collect()
    }

    fn describe(&self) -> DeviceDesc {
        let identity = PciIdentity::new(VENDOR_ID, DEVICE_ID, 0x00ff00)
            .with_revision(1)
            .with_subsystem(VENDOR_ID, 0x0001)
            .with_intx();
        // INTx by default: MSI-X on this device once saw guests that only
        // poll it hang at boot on a loaded machine (docs/host.md, "Not
        // done yet"), so the whole-system tests keep the default.
        let desc = DeviceDesc::new(identity).with_bar(BarDesc::mmio32(0, 0x1000));
        match self.shared.interrupt {
            Interrupt::Intx => desc,
            Interrupt::Msi => desc.with_msi(1),
            Interrupt::Msix => desc.with_msix(1),
        }
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        // Registers are 32-bit; narrower and wider accesses see the bytes
        // of the registers they cover.
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            let reg = self.read_reg(off & !3);
            *b = (reg >> ((off & 3) * 8)) as u8;
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0 || offset % 4 != 0 {
            return; // only aligned 32/64-bit register writes take effect
        }
        for (i, chunk) in data.chunks(4).enumerate() {
            if let Ok(word) = <[u8; 4]>::try_from(chunk) {
                self.write_reg(offset + 4 * i as u64, u32::from_le_bytes(word));
            }
        }
    }

    fn reset(&mut self) {
        let mut r = self.shared.regs();
        *r = Regs::default();
        self.shared.update_irq(&r, 0);
    }

    /// The registers (40 bytes). A copy in progress is saved as started
    /// (DMA_CMD's start bit still set), and the restored device runs it
    /// again: copying the same bytes twice gives the same result, unless
    /// the guest made the ranges overlap.
    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        let r = *self.shared.regs();
        let mut out = Vec::with_capacity(48);
        for v in [r.liveness, r.scratch, r.irq_status] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&r.dma_src.to_le_bytes());
        out.extend_from_slice(&r.dma_dst.to_le_bytes());
        for v in [r.dma_len, r.dma_cmd, r.dma_result] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        Ok(out)
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        if state.len() != 40 {
            return Err(format!("state is {} bytes, expected 40", state.len()));
        }
        let u32_at = |o: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&state[o..o + 4]);
            u32::from_le_bytes(b)
        };
        let u64_at = |o: usize| u64::from(u32_at(o)) | u64::from(u32_at(o + 4)) << 32;
        let restored = Regs {
            liveness: u32_at(0),
            scratch: u32_at(4),
            irq_status: u32_at(8),
            dma_src: u64_at(12),
            dma_dst: u64_at(20),
            dma_len: u32_at(28),
            dma_cmd: u32_at(32),
            dma_result: u32_at(36),
        };
        let copying = restored.dma_cmd & DMA_CMD_START != 0;
        if copying && restored.dma_len > self.max_transfer {
            return Err(format!(
                "state has a copy of {} bytes in progress, more than max-transfer ({})",
                restored.dma_len, self.max_transfer
            ));
        }
        if self.is_busy() {
            return Err("cannot restore over a copy in progress".into());
        }
        let mut r = self.shared.regs();
        *r = restored;
        self.shared.update_irq(&r, 0);
        if copying {
            // The copy the old device had not finished: run it again.
            let job = DmaJob {
                src: r.dma_src,
                dst: r.dma_dst,
                len: r.dma_len,
                raise_irq: r.dma_cmd & DMA_CMD_IRQ != 0,
            };
            self.shared.busy.store(true, Ordering::Release);
            drop(r);
            let sent = self.jobs.as_ref().is_some_and(|tx| tx.send(job).is_ok());
            if !sent {
                self.shared.busy.store(false, Ordering::Release);
                let mut r = self.shared.regs();
                r.dma_cmd &= !DMA_CMD_START;
                r.dma_result = DMA_FAULT;
            }
        }
        Ok(())
    }

    fn is_busy(&self) -> bool {
        self.shared.busy.load(Ordering::Acquire)
    }

    fn control(&mut self, op: &str, args: &Value) -> Result<Value, String> {
        match op {
            "set-max-transfer" => control::call(op, args, |a: SetMaxTransfer| {
                if a.bytes == 0 {
                    return Err("set-max-transfer: bytes must be at least 1".to_string());
                }
                let previous = std::mem::replace(&mut self.max_transfer, a.bytes);
                Ok(MaxTransfer {
                    max_transfer: a.bytes,
                    previous,
                })
            }),
            _ => Err(control::unknown(op)),
        }
    }

    fn shutdown(&mut self) {
        self.jobs = None; // closes the channel: the worker's loop ends
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for DmaExample {
    fn drop(&mut self) {
        self.shutdown();
    }
}

plugin_api::export_plugin! {
    name: "dma-example",
    devices: { "dma-example" => DmaExample::create },
}
