//! A PCI function whose plugin is loaded into the VMM (`in-process =
//! true`): the same plugin as in a remote, driven directly through
//! `plugin_api::function::PciFunction`. DMA goes straight to guest RAM;
//! INTx drives the IOAPIC pin with KVM_IRQ_LINE. No IPC at all.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, Result};
use config::DeviceConfig;
use kvm_ioctls::VmFd;
use pci::ConfigSpace;
use plugin_api::function::{create_device, GuestMemory, IrqSink, PciFunction, Services};
use plugin_api::loader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::msi::MsiRouter;
use super::msix::{GsiRoutes, MsixRouter};
use super::proxy::FailHook;
use super::stats::AccessStats;
use super::PciDevice;

struct Ram(GuestMemoryMmap);

impl GuestMemory for Ram {
    fn read(&self, gpa: u64, data: &mut [u8]) -> Result<(), String> {
        self.0
            .read_slice(data, GuestAddress(gpa))
            .map_err(|e| e.to_string())
    }
    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        self.0
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| e.to_string())
    }
}

struct Line {
    vm: Arc<VmFd>,
    gsi: u32,
    /// The function's MSI-X, once made (after the device described
    /// itself): vector signals go to its eventfds, and INTx is held low
    /// while the guest has MSI-X enabled.
    msix: Arc<std::sync::OnceLock<Arc<Mutex<MsixRouter>>>>,
    /// The function's MSI, the same way.
    msi: Arc<std::sync::OnceLock<Arc<Mutex<MsiRouter>>>>,
}

impl Line {
    fn msix_enabled(&self) -> bool {
        self.msix
            .get()
            .is_some_and(|m| m.lock().unwrap_or_else(|e| e.into_inner()).enabled())
    }

    fn msi_enabled(&self) -> bool {
        self.msi
            .get()
            .is_some_and(|m| m.lock().unwrap_or_else(|e| e.into_inner()).state().enabled)
    }
}

impl IrqSink for Line {
    fn set_level(&self, irq: u32, asserted: bool) {
        if irq >= plugin_api::MSIX_IRQ_BASE {
            if !asserted {
                return;
            }
            let v = u16::try_from(irq - plugin_api::MSIX_IRQ_BASE).unwrap_or(u16::MAX);
            // The vector of whichever capability the guest enabled.
            if self.msix_enabled() {
                if let Some(m) = self.msix.get() {
                    m.lock().unwrap_or_else(|e| e.into_inner()).signal(v);
                }
            } else if let Some(m) = self.msi.get() {
                m.lock().unwrap_or_else(|e| e.into_inner()).signal(v);
            }
            return;
        }
        if irq != 0 {
            return;
        }
        // While MSI-X or MSI is enabled the function does not use INTx.
        if asserted && (self.msix_enabled() || self.msi_enabled()) {
            return;
        }
        if let Err(e) = self.vm.set_irq_line(self.gsi, asserted) {
            tracing::warn!("KVM_IRQ_LINE {}: {e}", self.gsi);
        }
    }
}

/// An in-process function.
pub struct InProcessFunction {
    id: String,
    func: PciFunction,
    /// Shared with the device's interrupt sink.
    msix_slot: Arc<std::sync::OnceLock<Arc<Mutex<MsixRouter>>>>,
    msi_slot: Arc<std::sync::OnceLock<Arc<Mutex<MsiRouter>>>>,
    vm: Arc<VmFd>,
    stats: AccessStats,
    on_fail: Option<FailHook>,
    failed: bool,
    /// Guest pages the device wrote by DMA while a migration logs them.
    dirty: Arc<plugin_api::dirty::DirtyLog>,
}

impl InProcessFunction {
    /// Loads the device's plugin and creates the device.
    pub fn new(
        cfg: &DeviceConfig,
        plugin_dirs: &[std::path::PathBuf],
        mem: GuestMemoryMmap,
        vm: Arc<VmFd>,
        gsi: u32,
    ) -> Result<Self> {
        let plugin = loader::find(&cfg.plugin, plugin_dirs)
            .map_err(|e| anyhow!("device {}: {e}", cfg.id))?;
        let msix_slot = Arc::new(std::sync::OnceLock::new());
        let msi_slot = Arc::new(std::sync::OnceLock::new());
        let line = Line {
            vm: vm.clone(),
            gsi,
            msix: msix_slot.clone(),
            msi: msi_slot.clone(),
        };
        let dirty = Arc::new(plugin_api::dirty::DirtyLog::default());
        let services = Services::new(&cfg.id, Arc::new(Ram(mem)), Arc::new(line))
            .with_base_dir(&cfg.base_dir)
            .with_dirty_log(dirty.clone());
        let device = create_device(&plugin, cfg.kind.as_deref(), &cfg.settings, services)
            .map_err(|e| anyhow!("device {}: {e}", cfg.id))?;
        let func = PciFunction::new(device).map_err(|e| anyhow!("device {}: {e}", cfg.id))?;
        Ok(InProcessFunction {
            id: cfg.id.clone(),
            func,
            msix_slot,
            msi_slot,
            vm,
            stats: AccessStats::default(),
            on_fail: None,
            failed: false,
            dirty,
        })
    }

    /// Serves the device's MSI-X and MSI (if it declared them) with KVM
    /// routes from `routes`. Without this call its MSI-X BAR reads as
    /// zeros and its vectors go nowhere (the guest then uses INTx).
    pub fn with_msix(self, routes: &Arc<GsiRoutes>) -> Result<Self> {
        if let Some(m) = self.func.msix() {
            let router = MsixRouter::new(self.vm.clone(), routes.clone(), m)
                .map_err(|e| anyhow!("device {}: {e:#}", self.id))?;
            let _ = self.msix_slot.set(Arc::new(Mutex::new(router)));
        }
        if let Some(m) = self.func.msi() {
            let router = MsiRouter::new(self.vm.clone(), routes.clone(), m)
                .map_err(|e| anyhow!("device {}: {e:#}", self.id))?;
            let _ = self.msi_slot.set(Arc::new(Mutex::new(router)));
        }
        Ok(self)
    }

    fn msix(&self) -> Option<std::sync::MutexGuard<'_, MsixRouter>> {
        self.msix_slot
            .get()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn msi(&self) -> Option<std::sync::MutexGuard<'_, MsiRouter>> {
        self.msi_slot
            .get()
            .map(|m| m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Reports the plugin's failure (a panic) once through `hook`.
    pub fn with_fail_hook(mut self, hook: FailHook) -> Self {
        self.on_fail = Some(hook);
        self
    }

    /// After a call into the plugin: whether it has just failed.
    fn check_failure(&mut self) {
        if self.failed {
            return;
        }
        if let Some(reason) = self.func.failure() {
            self.failed = true;
            eprintln!(
                "host: device {} failed: {reason}; it now reads all-ones",
                self.id
            );
            if let Some(hook) = &self.on_fail {
                hook(&self.id, &reason);
            }
        }
    }
}

impl PciDevice for InProcessFunction {
    fn control(
        &mut self,
        op: &str,
        args: &serde_json::Value,
    ) -> std::result::Result<serde_json::Value, String> {
        self.func.control(op, args)
    }
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.stats.config_reads += 1;
        self.func.config_read(offset, data);
        if let Some(m) = self.msi() {
            m.patch_read(offset, data);
        }
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.stats.config_writes += 1;
        self.func.config_write(offset, data);
        if let Some(mut m) = self.msix() {
            let (enabled, masked) = self.func.msix_control();
            m.set_control(enabled, masked);
        }
        if let Some(mut m) = self.msi().filter(|m| m.touches(offset, data.len())) {
            if let Some(state) = self.func.msi_state() {
                m.update(state);
            }
        }
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let t = Instant::now();
        let Ok(index) = u8::try_from(bar) else {
            data.fill(0xff);
            return;
        };
        if let Some(m) = self.msix().filter(|m| m.bar() == index) {
            m.read(offset, data);
            return;
        }
        if let Err(e) = self.func.bar_read(index, offset, data) {
            tracing::warn!("{}: BAR read: {e:?}", self.id);
            self.check_failure();
        }
        self.stats.read(bar, offset, data.len(), t.elapsed());
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        self.stats.write(bar, offset, data.len());
        let Ok(bar) = u8::try_from(bar) else {
            return;
        };
        if let Some(mut m) = self.msix().filter(|m| m.bar() == bar) {
            m.write(offset, data);
            return;
        }
        if let Err(e) = self.func.bar_write(bar, offset, data) {
            tracing::warn!("{}: BAR write: {e:?}", self.id);
            self.check_failure();
        }
    }
    fn config_space(&self) -> &ConfigSpace {
        self.func.config()
    }
    /// `PciFunction::reset`: the plugin's device reset, and its config
    /// space back to power-on values.
    fn reset(&mut self) {
        if self.failed {
            return;
        }
        if let Err(e) = self.func.reset() {
            tracing::warn!("{}: reset: {e:?}", self.id);
            self.check_failure();
        }
        if let Some(mut m) = self.msix() {
            m.reset();
        }
        if let Some(mut m) = self.msi() {
            m.reset();
        }
    }

    fn stats(&self) -> Option<serde_json::Value> {
        let mut v = self.stats.to_json();
        v["placement"] = "in-process".into();
        Some(v)
    }

    fn signal_msix(&mut self, vector: u16) {
        if let Some(m) = self.msix() {
            m.signal(vector);
        }
    }

    fn signal_msi(&mut self, vector: u16) {
        if let Some(m) = self.msi() {
            m.signal(vector);
        }
    }

    fn dirty_log(&self) -> Option<Arc<plugin_api::dirty::DirtyLog>> {
        Some(self.dirty.clone())
    }

    fn save_state(&mut self) -> Option<std::result::Result<Vec<u8>, String>> {
        Some(self.func.save_state().map_err(|e| e.message.into_string()))
    }

    fn save_state_quiesced(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::result::Result<Vec<u8>, String>> {
        self.func.wait_idle(within);
        self.save_state()
    }

    fn restore_state(&mut self, state: &[u8]) -> Option<std::result::Result<(), String>> {
        Some(
            self.func
                .restore_state(state)
                .map_err(|e| e.message.into_string()),
        )
    }

    fn shutdown(&mut self) {
        if std::env::var_os("HOST_STATS").is_some() {
            let (reads, _, writes) = self.stats.totals();
            eprintln!(
                "host-stats: device={} in-process bar_reads={reads} bar_read_mean_us={:.1} bar_writes={writes}",
                self.id,
                self.stats.read_mean_us()
            );
            for l in self.stats.register_lines(&self.id) {
                eprintln!("{l}");
            }
        }
        self.func.shutdown();
    }
}
