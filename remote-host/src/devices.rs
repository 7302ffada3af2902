//! The devices of one `[[remote]]`: each loaded from its plugin, given its
//! own guest-memory view and INTx line, and joined with its configuration
//! space. A device whose plugin is missing, incompatible, or whose
//! constructor fails or panics is reported and left out; the others run.

use std::path::PathBuf;
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
}

/// Status register low byte and its INTERRUPT bit; Command.INTX_DISABLE.
const STATUS: usize = 0x06;
const STATUS_INTERRUPT: u8 = 1 << 3;
const COMMAND_INTX_DISABLE: u16 = 1 << 10;

impl RemoteDevice {
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
        effect
    }

    /// Function-level reset (the command register comes back with INTx
    /// enabled).
    pub fn reset(&self) -> Result<(), plugin_api::DeviceError> {
        let r = self.function().reset();
        self.intx.set_disabled(false);
        r
    }
}

impl Drop for RemoteDevice {
    fn drop(&mut self) {
        self.function().shutdown();
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

/// Creates one device from its config entry.
pub fn create(cfg: &DeviceConfig, plugin: &LoadedPlugin) -> Result<RemoteDevice, String> {
    let memory = Arc::new(GuestRam::new());
    let intx = Arc::new(IntxLine::new());
    let services =
        Services::new(&cfg.id, memory.clone(), intx.clone()).with_base_dir(&cfg.base_dir);
    let device = create_device(plugin, cfg.kind.as_deref(), &cfg.settings, services)?;
    let function = PciFunction::new(device)?;
    Ok(RemoteDevice {
        id: cfg.id.clone(),
        slot: cfg.slot,
        plugin_name: plugin.name.clone(),
        plugin_version: plugin.version.clone(),
        memory,
        intx,
        function: Mutex::new(function),
    })
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
        let result = loader::find(&cfg.plugin, dirs)
            .map_err(|e| e.to_string())
            .and_then(|plugin| create(cfg, &plugin));
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
