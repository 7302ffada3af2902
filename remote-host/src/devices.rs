//! The devices of one `[[remote]]`: each loaded from its plugin, given its
//! own guest-memory view and INTx line, and joined with its configuration
//! space. A device whose plugin is missing, incompatible, or whose
//! constructor fails or panics is reported and left out; the others run.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use config::{Config, DeviceConfig};
use plugin_api::function::{create_device, PciFunction, Services};
use plugin_api::loader::{self, LoadedPlugin};

use crate::irq::IntxLine;
use crate::memory::GuestRam;

/// One served device.
pub struct RemoteDevice {
    pub id: String,
    pub slot: u8,
    pub plugin_name: String,
    pub plugin_version: String,
    /// The guest memory this device may reach (what its client mapped).
    pub memory: Arc<GuestRam>,
    pub intx: Arc<IntxLine>,
    function: Mutex<PciFunction>,
    /// `shutdown` ran (the device is told once, whoever asks first).
    shut_down: AtomicBool,
    /// Where "a mirrored register changed" goes once an access ring
    /// mirrors the device's registers.
    pub mirrors: Arc<MirrorNotice>,
    /// Guest pages the device wrote by DMA while a migration logs them
    /// (control `dirty-log`).
    pub dirty: Arc<plugin_api::dirty::DirtyLog>,
    /// Held while a client is served: whichever way a connection came (a
    /// listener, `--fd`, control `device-add` or `device-connect`), the
    /// next is served only once the one before it has gone, so its DMA
    /// mappings and eventfds are dropped before the next client's come.
    pub session: Arc<Mutex<()>>,
}

/// The device's notices that registers it lets the VMM mirror changed
/// outside an access on the ring: its own `registers_changed`, any change
/// of its interrupt level (sent before the interrupt itself), and calls
/// that reach it by the socket or the control channel. Nothing to do
/// until a ring with mirrors is served.
#[derive(Default)]
pub struct MirrorNotice {
    invalidator: Mutex<Option<channel::ring::MirrorInvalidator>>,
}

impl MirrorNotice {
    /// The mirrors are out of date.
    pub fn notify(&self) {
        if let Some(i) = self
            .invalidator
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            i.invalidate();
        }
    }

    /// Sends later notices to `invalidator` (`None`: nowhere).
    pub fn attach(&self, invalidator: Option<channel::ring::MirrorInvalidator>) {
        *self.invalidator.lock().unwrap_or_else(|e| e.into_inner()) = invalidator;
    }
}

/// What a device is made from: a config `[[device]]` entry, or the
/// control channel's `device-add` with the same keys.
#[derive(Debug, Clone)]
pub struct DeviceSpec {
    pub id: String,
    /// Plugin name, or path to a plugin library (relative to `base_dir`).
    pub plugin: String,
    /// Device kind inside the plugin; `None`: the plugin's only kind.
    pub kind: Option<String>,
    pub slot: u8,
    /// The plugin's own settings, as TOML text.
    pub settings: String,
    /// Directory relative paths (in `settings`, and the plugin's) are
    /// relative to: the config file's.
    pub base_dir: PathBuf,
}

impl From<&DeviceConfig> for DeviceSpec {
    fn from(cfg: &DeviceConfig) -> Self {
        DeviceSpec {
            id: cfg.id.clone(),
            plugin: cfg.plugin.clone(),
            kind: cfg.kind.clone(),
            slot: cfg.slot,
            settings: cfg.settings.clone(),
            base_dir: cfg.base_dir.clone(),
        }
    }
}

/// Status register low byte and its INTERRUPT bit; Command.INTX_DISABLE.
const STATUS: usize = 0x06;
const STATUS_INTERRUPT: u8 = 1 << 3;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;

impl RemoteDevice {
    /// The plugin's failure message, if it failed; `None` too when the
    /// device is busy right now (never waits: heartbeats call this).
    pub fn failure_now(&self) -> Option<String> {
        match self.function.try_lock() {
            Ok(f) => f.failure(),
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner().failure(),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// The PCI function; calls on it are serialized by this lock.
    pub fn function(&self) -> MutexGuard<'_, PciFunction> {
        self.function.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A guest configuration read, whatever the protocol. Status.INTERRUPT
    /// shows the INTx level, as on real hardware: Linux's
    /// `pci_check_and_mask_intx` (uio_pci_generic, VFIO) relies on it.
    pub fn config_read(&self, offset: usize, data: &mut [u8]) {
        self.function().config_read(offset, data);
        if let Some(b) = STATUS.checked_sub(offset).and_then(|i| data.get_mut(i)) {
            *b &= !STATUS_INTERRUPT;
            if self.intx.level() {
                *b |= STATUS_INTERRUPT;
            }
        }
    }

    /// A guest configuration write. Command.INTX_DISABLE masks the line.
    pub fn config_write(&self, offset: usize, data: &[u8]) -> pci::ConfigWriteEffect {
        let (effect, command) = {
            let mut f = self.function();
            let effect = f.config_write(offset, data);
            (effect, f.config().command())
        };
        if effect.command_changed {
            self.intx.set_disabled(command & COMMAND_INTX_DISABLE != 0);
        }
        self.mirrors.notify();
        effect
    }

    /// Function-level reset (the command register comes back with INTx
    /// enabled).
    pub fn reset(&self) -> Result<(), plugin_api::DeviceError> {
        let r = self.function().reset();
        self.intx.set_disabled(false);
        self.mirrors.notify();
        r
    }
}

impl RemoteDevice {
    /// Stops the device's own threads; the device gets no call after it
    /// (its servers must be gone). Idempotent.
    pub fn shutdown(&self) {
        if !self.shut_down.swap(true, Ordering::AcqRel) {
            self.function().shutdown();
        }
    }
}

impl Drop for RemoteDevice {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A device that could not be created, with the reason.
#[derive(Debug, Clone)]
pub struct DeviceFailure {
    pub id: String,
    /// Where the device is in the config file.
    pub location: String,
    pub message: String,
}

impl std::fmt::Display for DeviceFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: device `{}`: {}",
            self.location, self.id, self.message
        )
    }
}

/// Plugin directories for a remote: its `plugin-dirs`, extra ones from
/// the command line, then the defaults.
pub fn plugin_dirs(config: &Config, remote_id: &str, extra: &[PathBuf]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = extra.to_vec();
    if let Some(r) = config.remote(remote_id) {
        dirs.extend(r.plugin_dirs.iter().cloned());
    }
    dirs.extend(loader::default_dirs());
    dirs
}

/// Whether devices get the MSI-X they declare: not when the process
/// serves mpqemu, which carries no MSI-X (its devices use INTx).
static MSIX: AtomicBool = AtomicBool::new(true);

/// Set once at start, before any device is made, from the protocol.
pub fn set_msix(allowed: bool) {
    MSIX.store(allowed, Ordering::Relaxed);
}

/// Creates one device from its config entry.
pub fn create(cfg: &DeviceConfig, plugin: &LoadedPlugin) -> Result<RemoteDevice, String> {
    create_from(&DeviceSpec::from(cfg), plugin)
}

/// Creates one device from its spec with an already loaded plugin.
pub fn create_from(spec: &DeviceSpec, plugin: &LoadedPlugin) -> Result<RemoteDevice, String> {
    let memory = Arc::new(GuestRam::new());
    let intx = Arc::new(IntxLine::new());
    let mirrors = Arc::new(MirrorNotice::default());
    let notice = mirrors.clone();
    let dirty = Arc::new(plugin_api::dirty::DirtyLog::default());
    let services = Services::new(&spec.id, memory.clone(), intx.clone())
        .with_base_dir(&spec.base_dir)
        .with_dirty_log(dirty.clone())
        .with_change_notice(Arc::new(move || notice.notify()));
    let device = create_device(plugin, spec.kind.as_deref(), &spec.settings, services)?;
    let function = PciFunction::new_with_msix(device, MSIX.load(Ordering::Relaxed))?;
    Ok(RemoteDevice {
        id: spec.id.clone(),
        slot: spec.slot,
        plugin_name: plugin.name.clone(),
        plugin_version: plugin.version.clone(),
        memory,
        intx,
        function: Mutex::new(function),
        shut_down: AtomicBool::new(false),
        mirrors,
        dirty,
        session: Arc::default(),
    })
}

/// Finds the spec's plugin in `dirs` (a plugin given as a path: relative
/// to the spec's base directory, the config file's) and creates the
/// device: the one path for config devices and `device-add`.
pub fn build_one(spec: &DeviceSpec, dirs: &[PathBuf]) -> Result<RemoteDevice, String> {
    let plugin = config::resolve_plugin(&spec.base_dir, &spec.plugin);
    let plugin = loader::find(&plugin, dirs).map_err(|e| e.to_string())?;
    create_from(spec, &plugin)
}

/// Builds every device of `remote_id`. Failures are returned beside the
/// devices that work.
pub fn build(
    config: &Config,
    remote_id: &str,
    dirs: &[PathBuf],
) -> (Vec<Arc<RemoteDevice>>, Vec<DeviceFailure>) {
    let mut devices = Vec::new();
    let mut failures = Vec::new();
    for cfg in config.devices_of_remote(remote_id) {
        let result = build_one(&DeviceSpec::from(cfg), dirs);
        match result {
            Ok(dev) => {
                tracing::info!(
                    device = %cfg.id,
                    plugin = %dev.plugin_name,
                    version = %dev.plugin_version,
                    "device created"
                );
                devices.push(Arc::new(dev));
            }
            Err(message) => {
                let failure = DeviceFailure {
                    id: cfg.id.clone(),
                    location: cfg.location.to_string(),
                    message,
                };
                tracing::error!("{failure}");
                failures.push(failure);
            }
        }
    }
    (devices, failures)
}
