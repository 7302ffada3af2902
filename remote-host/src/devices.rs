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

impl RemoteDevice {
    /// The PCI function; calls on it are serialized by this lock.
    pub fn function(&self) -> MutexGuard<'_, PciFunction> {
        self.function.lock().unwrap_or_else(|e| e.into_inner())
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
