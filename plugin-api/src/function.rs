//! A loaded device joined with its configuration space: the PCI function
//! as a host serves it (remote-host, the VMM in-process, the harness).
//!
//! The standard header and declared capabilities live in the shared
//! [`pci::ConfigSpace`] helper; the device sees config writes as
//! notifications and answers reads of its device-specific area.

use std::path::Path;
use std::sync::Arc;

use abi_stable::{
    sabi_trait::TD_Opaque,
    std_types::{RArc, RErr, ROk, RResult, RSlice, RSliceMut, RStr, RString},
};
use pci::{BarSpec, BarType, ConfigSpace, ConfigWriteEffect, Identity};

use crate::abi::{
    BarKind, DeviceBox, DeviceDesc, DeviceError, DeviceErrorKind, Doorbell, FfiHost, FfiHost_TO,
    HostBox, LogLevel, MirroredRead,
};
use crate::loader::LoadedPlugin;

/// Registers a host mirrors per device at most.
pub const MAX_MIRRORS: usize = 16;
/// Doorbells a host delivers per device at most ([`crate::Device::doorbells`]).
pub const MAX_DOORBELLS: usize = 12;

/// Guest memory as a host exposes it to DMA.
pub trait GuestMemory: Send + Sync + 'static {
    /// Reads `data.len()` bytes at `gpa`; the whole range must be shared.
    fn read(&self, gpa: u64, data: &mut [u8]) -> Result<(), String>;
    /// Writes `data` at `gpa`; the whole range must be shared.
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), String>;
}

/// Where a device's interrupt levels go (irqfd, recorder, ...).
pub trait IrqSink: Send + Sync + 'static {
    /// Interrupt `irq` (0: INTx) is now at `asserted`; a level, repeated
    /// levels included.
    fn set_level(&self, irq: u32, asserted: bool);
}

/// Where a device's [`Host::registers_changed`](crate::Host::registers_changed)
/// notices go (a host that keeps mirrors invalidates them).
pub type ChangeNotice = Arc<dyn Fn() + Send + Sync>;

/// The host services object handed to a device.
#[derive(Clone)]
pub struct Services {
    memory: Arc<dyn GuestMemory>,
    irq: Arc<dyn IrqSink>,
    device_id: Arc<str>,
    base_dir: Arc<Path>,
    changed: Option<ChangeNotice>,
    dirty: Option<Arc<crate::dirty::DirtyLog>>,
}

impl Services {
    /// Services for device `device_id` (the tag of its log records) over
    /// `memory` and `irq`; relative paths resolve from `.` until
    /// [`with_base_dir`](Self::with_base_dir).
    pub fn new(device_id: &str, memory: Arc<dyn GuestMemory>, irq: Arc<dyn IrqSink>) -> Self {
        Services {
            memory,
            irq,
            device_id: Arc::from(device_id),
            base_dir: Arc::from(Path::new(".")),
            changed: None,
            dirty: None,
        }
    }

    /// Notes the device's DMA writes in `log` while it is on (a
    /// migration's device dirty log).
    pub fn with_dirty_log(mut self, log: Arc<crate::dirty::DirtyLog>) -> Self {
        self.dirty = Some(log);
        self
    }

    /// Sends the device's `registers_changed` notices to `notice`, and a
    /// notice before each interrupt level the device sets: the guest's
    /// handler must not read a register from a mirror that predates the
    /// interrupt (`Device::mirrored_reads`).
    pub fn with_change_notice(mut self, notice: ChangeNotice) -> Self {
        self.changed = Some(notice);
        self
    }

    /// Sets the directory relative paths in the settings are relative to.
    pub fn with_base_dir(mut self, dir: &Path) -> Self {
        self.base_dir = Arc::from(dir);
        self
    }

    /// As an ABI object.
    pub fn into_ffi(self) -> HostBox {
        FfiHost_TO::from_ptr(RArc::new(self), TD_Opaque)
    }
}

impl FfiHost for Services {
    fn dma_read(&self, gpa: u64, mut data: RSliceMut<'_, u8>) -> RResult<(), RString> {
        match self.memory.read(gpa, &mut data) {
            Ok(()) => ROk(()),
            Err(e) => RErr(e.into()),
        }
    }

    fn dma_write(&self, gpa: u64, data: RSlice<'_, u8>) -> RResult<(), RString> {
        match self.memory.write(gpa, &data) {
            Ok(()) => {
                if let Some(log) = &self.dirty {
                    log.mark(gpa, data.len());
                }
                ROk(())
            }
            Err(e) => RErr(e.into()),
        }
    }

    fn set_irq_level(&self, irq: u32, asserted: bool) {
        self.registers_changed();
        self.irq.set_level(irq, asserted);
    }

    fn base_dir(&self) -> RString {
        RString::from(self.base_dir.to_string_lossy().into_owned())
    }

    fn registers_changed(&self) {
        if let Some(n) = &self.changed {
            n();
        }
    }

    fn log(&self, level: LogLevel, message: RStr<'_>) {
        let id = &*self.device_id;
        let message = message.as_str();
        match level {
            LogLevel::Error => tracing::error!(device = id, "{message}"),
            LogLevel::Warn => tracing::warn!(device = id, "{message}"),
            LogLevel::Info => tracing::info!(device = id, "{message}"),
            LogLevel::Debug => tracing::debug!(device = id, "{message}"),
            LogLevel::Trace => tracing::trace!(device = id, "{message}"),
        }
    }
}

/// Creates device `kind` of `plugin` (the plugin's only kind when `None`).
pub fn create_device(
    plugin: &LoadedPlugin,
    kind: Option<&str>,
    settings: &str,
    services: Services,
) -> Result<DeviceBox, String> {
    let kind = match kind {
        Some(k) => k.to_owned(),
        None => match plugin.kinds.as_slice() {
            [only] => only.clone(),
            kinds => {
                return Err(format!(
                    "plugin `{}` provides several device kinds ({}); say which with `kind`",
                    plugin.name,
                    kinds.join(", ")
                ))
            }
        },
    };
    plugin.module.create_device()(
        RStr::from_str(&kind),
        RStr::from_str(settings),
        services.into_ffi(),
    )
    .into_result()
    .map_err(|e| format!("plugin `{}`: {}", plugin.name, e))
}

/// A device plus its configuration space.
///
/// After [`shutdown`](Self::shutdown) the device gets no call any more:
/// accesses still arriving (a connection not yet closed) read all-ones and
/// fail with "the device was shut down". So a host may shut a device down
/// while something may still reach it.
pub struct PciFunction {
    device: DeviceBox,
    config: ConfigSpace,
    desc: DeviceDesc,
    shut_down: bool,
    /// The MSI-X the host added for the device's `msi_vectors`.
    msix: Option<Msix>,
    /// The MSI capability the host made of the device's declared one.
    msi: Option<Msi>,
}

/// Where a function's MSI lives: the capability's offset in configuration
/// space and the vectors it asks for. What the guest programs there is
/// the host's to serve (routes, pending bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msi {
    /// The capability's offset in configuration space.
    pub cap: usize,
    /// Vectors it asks for (Multiple Message Capable): 1, 2, 4, 8, 16 or 32.
    pub vectors: u8,
}

/// Where a function's MSI-X lives: the capability's offset in
/// configuration space and the table and PBA (in a BAR the host added,
/// which the device never sees: the host emulates it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Msix {
    /// The capability's offset in configuration space.
    pub cap: usize,
    /// Vectors, and where the table and the pending bits are.
    pub layout: pci::msix::MsixLayout,
    /// Bytes of the table's BAR.
    pub bar_size: u64,
}

/// Adds the MSI-X capability and its BAR for `vectors` to `config`: the
/// table at the start of the first BAR index `bars` leave free, the PBA
/// on the next page.
fn add_msix(
    config: &mut ConfigSpace,
    bars: &[crate::abi::BarDesc],
    vectors: u16,
) -> Result<Msix, String> {
    let used = |i: u8| {
        bars.iter().any(|b| {
            b.index == i || (b.kind == BarKind::Memory64 && b.index.checked_add(1) == Some(i))
        })
    };
    let bar = (0..6u8)
        .find(|&i| !used(i))
        .ok_or("MSI-X: every BAR index is taken; the table needs one")?;
    let mut layout = pci::msix::MsixLayout {
        vectors,
        table_bar: bar,
        table_offset: 0,
        pba_bar: bar,
        pba_offset: 0,
    };
    let page = 4096u64;
    let pba_offset = layout.table_size().div_ceil(page) * page;
    layout.pba_offset = u32::try_from(pba_offset).map_err(|_| "MSI-X: table too large")?;
    layout.check()?;
    let bar_size = (pba_offset + layout.pba_size().div_ceil(page) * page).next_power_of_two();
    config
        .add_bar(
            usize::from(bar),
            BarSpec {
                bar_type: BarType::Memory32,
                size: bar_size,
                prefetchable: false,
            },
        )
        .map_err(|e| format!("MSI-X BAR: {e}"))?;
    let cap = pci::msix::add_capability(config, &layout).map_err(|e| format!("MSI-X: {e}"))?;
    Ok(Msix {
        cap,
        layout,
        bar_size,
    })
}

fn shut_down_error() -> DeviceError {
    DeviceError::new(DeviceErrorKind::Other, "the device was shut down")
}

impl PciFunction {
    /// Builds the configuration space from the device's description.
    pub fn new(device: DeviceBox) -> Result<Self, String> {
        Self::new_with_msix(device, true)
    }

    /// [`new`](Self::new); with `msix` false the function is presented
    /// without the MSI-X the device declared (a host whose wire carries
    /// none, such as mpqemu): the guest then uses INTx.
    pub fn new_with_msix(device: DeviceBox, msix: bool) -> Result<Self, String> {
        let desc = device.describe();
        if let Some(msg) = device.failure().into_option() {
            return Err(msg.into_string());
        }
        let id = desc.identity;
        let mut config = ConfigSpace::new(Identity {
            vendor_id: id.vendor_id,
            device_id: id.device_id,
            class_code: id.class_code,
            revision: id.revision,
            subsystem_vendor_id: id.subsystem_vendor_id,
            subsystem_id: id.subsystem_id,
            interrupt_pin: id.interrupt_pin,
        });
        for bar in desc.bars.iter() {
            let spec = BarSpec {
                bar_type: match bar.kind {
                    BarKind::Io => BarType::Io,
                    BarKind::Memory32 => BarType::Memory32,
                    BarKind::Memory64 => BarType::Memory64,
                },
                size: bar.size,
                prefetchable: bar.prefetchable,
            };
            config
                .add_bar(usize::from(bar.index), spec)
                .map_err(|e| format!("device description: {e}"))?;
        }
        let mut msi = None;
        for cap in desc.capabilities.iter() {
            if cap.id == pci::msi::CAP_ID_MSI {
                // The host's own model of it, whatever bytes were
                // declared; left out where the wire carries no vectors.
                let ctrl = u16::from_le_bytes([
                    cap.body.first().copied().unwrap_or(0),
                    cap.body.get(1).copied().unwrap_or(0),
                ]);
                let vectors = pci::msi::vectors_asked(ctrl);
                if msi.is_some() {
                    return Err("device description: more than one MSI capability".into());
                }
                if msix {
                    let at = pci::msi::add_capability(&mut config, vectors)
                        .map_err(|e| format!("device description: MSI: {e}"))?;
                    msi = Some(Msi { cap: at, vectors });
                }
                continue;
            }
            config
                .add_capability(cap.id, &cap.body, &cap.writable)
                .map_err(|e| format!("device description: {e}"))?;
        }
        let msix = match desc.msi_vectors {
            0 => None,
            _ if !msix => None,
            n => Some(
                add_msix(&mut config, &desc.bars, n)
                    .map_err(|e| format!("device description: {e}"))?,
            ),
        };
        Ok(PciFunction {
            device,
            config,
            desc,
            shut_down: false,
            msix,
            msi,
        })
    }

    /// The function's MSI, if the device declared it.
    pub fn msi(&self) -> Option<Msi> {
        self.msi
    }

    /// What the guest programmed in the MSI capability; `None` without one.
    pub fn msi_state(&self) -> Option<pci::msi::MsiState> {
        self.msi
            .map(|m| pci::msi::MsiState::read(&self.config, m.cap))
    }

    /// The function's MSI-X, if the device declared vectors. Its BAR is
    /// the host's to emulate (with [`pci::msix::MsixTable`]): accesses to
    /// it are refused here like any BAR the device did not declare.
    pub fn msix(&self) -> Option<Msix> {
        self.msix
    }

    /// Whether the guest enabled MSI-X and whether it masked the whole
    /// function, from Message Control: `(enabled, function masked)`;
    /// `(false, false)` without MSI-X.
    pub fn msix_control(&self) -> (bool, bool) {
        self.msix
            .map_or((false, false), |m| pci::msix::control(&self.config, m.cap))
    }

    /// Refuses an access to a BAR the device did not declare, or one that
    /// reaches past the BAR's end, before the device sees it: the
    /// device's contract ([`crate::Device::bar_read`]) whichever way the
    /// access came (a protocol server, the VMM's BAR decoding, the access
    /// ring, the harness).
    fn check_bar(&self, bar: u8, offset: u64, len: usize) -> Result<(), DeviceError> {
        let size = self
            .desc
            .bars
            .iter()
            .find(|b| b.index == bar)
            .map(|b| b.size);
        match size {
            Some(size)
                if offset
                    .checked_add(len as u64)
                    .is_some_and(|end| end <= size) =>
            {
                Ok(())
            }
            _ => Err(DeviceError::new(
                DeviceErrorKind::InvalidAccess,
                format!(
                    "BAR{bar} access of {len} bytes at {offset:#x} is outside the device's BARs"
                ),
            )),
        }
    }

    /// The registers the device lets a host mirror
    /// ([`crate::Device::mirrored_reads`]), checked: each 1, 2 or 4 bytes
    /// inside a declared BAR, no duplicates, at most [`MAX_MIRRORS`]. The
    /// rest are left out, with the reason for each.
    pub fn mirrored_reads(&self) -> (Vec<MirroredRead>, Vec<String>) {
        if self.shut_down {
            return (Vec::new(), Vec::new());
        }
        let mut kept: Vec<MirroredRead> = Vec::new();
        let mut refused = Vec::new();
        for m in self.device.mirrored_reads() {
            let why = if !matches!(m.len, 1 | 2 | 4) {
                Some("its width is not 1, 2 or 4 bytes".to_string())
            } else if let Err(e) = self.check_bar(m.bar, m.offset, usize::from(m.len)) {
                Some(e.message.to_string())
            } else if kept.contains(&m) {
                Some("it is declared twice".to_string())
            } else if kept.len() >= MAX_MIRRORS {
                Some(format!("at most {MAX_MIRRORS} registers are mirrored"))
            } else {
                None
            };
            match why {
                Some(why) => refused.push(format!(
                    "mirrored read of BAR{} {:#x} ({} bytes) left out: {why}",
                    m.bar, m.offset, m.len
                )),
                None => kept.push(m),
            }
        }
        (kept, refused)
    }

    /// Whether the device's saved states stay good across its doorbells
    /// ([`crate::Device::state_outlives_doorbells`]); `false` once it is
    /// shut down or has failed.
    pub fn state_outlives_doorbells(&self) -> bool {
        !self.shut_down && self.device.state_outlives_doorbells()
    }

    /// The writes the device lets a host deliver as doorbells
    /// ([`crate::Device::doorbells`]), checked: each 1, 2, 4 or 8 bytes
    /// inside a BAR the device declared, no two overlapping, at
    /// most [`MAX_DOORBELLS`]. The rest are left out, with the reason for
    /// each.
    pub fn doorbells(&self) -> (Vec<Doorbell>, Vec<String>) {
        if self.shut_down {
            return (Vec::new(), Vec::new());
        }
        let mut kept: Vec<Doorbell> = Vec::new();
        let mut refused = Vec::new();
        let overlaps = |a: &Doorbell, b: &Doorbell| {
            a.bar == b.bar
                && a.offset < b.offset.saturating_add(u64::from(b.len))
                && b.offset < a.offset.saturating_add(u64::from(a.len))
        };
        for d in self.device.doorbells() {
            let why = if !matches!(d.len, 1 | 2 | 4 | 8) {
                Some("its width is not 1, 2, 4 or 8 bytes".to_string())
            } else if d.len < 8 && d.value >> (u32::from(d.len) * 8) != 0 {
                Some("its value does not fit its width".to_string())
            } else if let Err(e) = self.check_bar(d.bar, d.offset, usize::from(d.len)) {
                Some(e.message.to_string())
            } else if kept.iter().any(|k| overlaps(k, &d)) {
                Some("it overlaps another doorbell".to_string())
            } else if kept.len() >= MAX_DOORBELLS {
                Some(format!("at most {MAX_DOORBELLS} doorbells are delivered"))
            } else {
                None
            };
            match why {
                Some(why) => refused.push(format!(
                    "doorbell BAR{} {:#x} ({} bytes, value {:#x}) left out: {why}",
                    d.bar, d.offset, d.len, d.value
                )),
                None => kept.push(d),
            }
        }
        (kept, refused)
    }

    /// What the device described itself as.
    pub fn description(&self) -> &DeviceDesc {
        &self.desc
    }

    /// The configuration space (BAR bases, command register, decoding).
    pub fn config(&self) -> &ConfigSpace {
        &self.config
    }

    /// A guest configuration read.
    pub fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        for i in 0..data.len() {
            let off = offset + i;
            if self.config.is_modelled(off) || off >= pci::CONFIG_SPACE_SIZE {
                self.config.read(off, &mut data[i..=i]);
            } else {
                let Ok(off16) = u16::try_from(off) else {
                    data[i] = 0xff;
                    continue;
                };
                if self.shut_down {
                    data[i] = 0xff;
                    continue;
                }
                if self
                    .device
                    .config_read(off16, RSliceMut::from_mut_slice(&mut data[i..=i]))
                    .is_err()
                {
                    data[i] = 0xff;
                }
            }
        }
    }

    /// A guest configuration write. Returns what moved.
    pub fn config_write(&mut self, offset: usize, data: &[u8]) -> ConfigWriteEffect {
        let effect = self.config.write(offset, data);
        if self.shut_down {
            return effect;
        }
        if let Ok(off16) = u16::try_from(offset) {
            // The device's error (e.g. failed) is visible through `failure`.
            let _ = self.device.config_write(off16, RSlice::from_slice(data));
        }
        effect
    }

    /// A read at `offset` in BAR `bar`; a failed device reads all-ones.
    pub fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) -> Result<(), DeviceError> {
        if self.shut_down {
            data.fill(0xff);
            return Err(shut_down_error());
        }
        if let Err(e) = self.check_bar(bar, offset, data.len()) {
            data.fill(0xff);
            return Err(e);
        }
        let r = self
            .device
            .bar_read(bar, offset, RSliceMut::from_mut_slice(data))
            .into_result();
        if r.is_err() {
            data.fill(0xff);
        }
        r
    }

    /// A write at `offset` in BAR `bar`.
    pub fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if self.shut_down {
            return Err(shut_down_error());
        }
        self.check_bar(bar, offset, data.len())?;
        self.device
            .bar_write(bar, offset, RSlice::from_slice(data))
            .into_result()
    }

    /// Function-level reset of device and configuration space.
    pub fn reset(&mut self) -> Result<(), DeviceError> {
        self.config.reset();
        if self.shut_down {
            return Err(shut_down_error());
        }
        self.device.reset().into_result()
    }

    /// Whether the device's background work is still running.
    pub fn is_busy(&self) -> bool {
        !self.shut_down && self.device.is_busy()
    }

    /// Waits until the device's background work is done
    /// ([`is_busy`](Self::is_busy)), at most `within` (a migration, with
    /// the guest stopped, lets its I/O in flight finish). Returns whether
    /// it is idle. The device's own threads never need this function's
    /// host-side lock, so holding it meanwhile is safe.
    pub fn wait_idle(&self, within: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        while self.is_busy() {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_micros(500));
        }
        true
    }

    /// The device's failure message once it panicked.
    pub fn failure(&self) -> Option<String> {
        self.device
            .failure()
            .into_option()
            .map(RString::into_string)
    }

    /// The device's saved state ([`crate::Device::save_state`]).
    pub fn save_state(&mut self) -> Result<Vec<u8>, DeviceError> {
        if self.shut_down {
            return Err(shut_down_error());
        }
        self.device.save_state().into_result().map(|v| v.into_vec())
    }

    /// Restores a state from [`save_state`](Self::save_state).
    pub fn restore_state(&mut self, state: &[u8]) -> Result<(), DeviceError> {
        if self.shut_down {
            return Err(shut_down_error());
        }
        self.device
            .restore_state(RSlice::from_slice(state))
            .into_result()
    }

    /// The device's control operation `op` (see [`crate::Device::control`]).
    /// The device's refusal is its message verbatim; a panic marks the
    /// device failed and is reported like any refusal.
    pub fn control(
        &mut self,
        op: &str,
        args: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        if self.shut_down {
            return Err(shut_down_error().message.into_string());
        }
        let text = self
            .device
            .control(RStr::from_str(op), RStr::from_str(&args.to_string()))
            .into_result()
            .map_err(|e| e.message.into_string())?;
        serde_json::from_str(text.as_str())
            .map_err(|e| format!("control `{op}`: the device's result is not JSON: {e}"))
    }

    /// Orderly shutdown of the device, once; it gets no call after it.
    pub fn shutdown(&mut self) {
        if !std::mem::replace(&mut self.shut_down, true) {
            self.device.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{into_ffi, BarDesc, Device, PciIdentity};

    /// Sixteen bytes of registers in BAR 0, indexed without a check, as a
    /// device may when the host promises in-bounds accesses.
    struct Sixteen([u8; 16]);

    impl Device for Sixteen {
        fn describe(&self) -> DeviceDesc {
            DeviceDesc::new(PciIdentity::new(0x1234, 0x5678, 0)).with_bars([BarDesc::mmio32(0, 16)])
        }
        fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.0[offset as usize + i];
            }
        }
        fn bar_write(&mut self, _bar: u8, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                self.0[offset as usize + i] = *b;
            }
        }
        fn reset(&mut self) {}
    }

    /// An access to a BAR the device does not have, or past the end of
    /// one it has, is refused before the device sees it, whatever path
    /// it came by (the access ring does not check offsets itself).
    #[test]
    fn accesses_outside_the_declared_bars_never_reach_the_device() {
        let mut f = PciFunction::new(into_ffi(Box::new(Sixteen([7; 16])))).unwrap();
        let mut b = [0u8; 4];
        f.bar_read(0, 12, &mut b).unwrap();
        assert_eq!(b, [7; 4]);
        for (bar, offset) in [(0, 13), (0, 16), (0, u64::MAX - 1), (1, 0), (5, 0)] {
            let e = f.bar_read(bar, offset, &mut b).unwrap_err();
            assert_eq!(
                e.kind,
                DeviceErrorKind::InvalidAccess,
                "BAR{bar} {offset:#x}"
            );
            assert_eq!(b, [0xff; 4], "a refused read is all-ones");
            let e = f.bar_write(bar, offset, &[1, 2, 3, 4]).unwrap_err();
            assert_eq!(
                e.kind,
                DeviceErrorKind::InvalidAccess,
                "BAR{bar} {offset:#x}"
            );
        }
        assert_eq!(f.failure(), None, "the device never panicked");
        f.bar_write(0, 0, &[1, 2, 3, 4, 5, 6, 7, 8]).unwrap();
        let mut b = [0u8; 8];
        f.bar_read(0, 8, &mut b).unwrap();
        assert_eq!(b, [7; 8]);
    }
}
