//! A PCI function whose plugin is loaded into the VMM (`in-process =
//! true`): the same plugin as in a remote, driven directly through
//! `plugin_api::function::PciFunction`. DMA goes straight to guest RAM;
//! INTx drives the IOAPIC pin with KVM_IRQ_LINE. No IPC at all.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, Result};
use config::DeviceConfig;
use kvm_ioctls::VmFd;
use pci::ConfigSpace;
use plugin_api::function::{create_device, GuestMemory, IrqSink, PciFunction, Services};
use plugin_api::loader;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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
}

impl IrqSink for Line {
    fn set_level(&self, irq: u32, asserted: bool) {
        if irq != 0 {
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
    stats: AccessStats,
    on_fail: Option<FailHook>,
    failed: bool,
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
        let services = Services::new(&cfg.id, Arc::new(Ram(mem)), Arc::new(Line { vm, gsi }))
            .with_base_dir(&cfg.base_dir);
        let device = create_device(&plugin, cfg.kind.as_deref(), &cfg.settings, services)
            .map_err(|e| anyhow!("device {}: {e}", cfg.id))?;
        let func = PciFunction::new(device).map_err(|e| anyhow!("device {}: {e}", cfg.id))?;
        Ok(InProcessFunction {
            id: cfg.id.clone(),
            func,
            stats: AccessStats::default(),
            on_fail: None,
            failed: false,
        })
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
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.stats.config_writes += 1;
        self.func.config_write(offset, data);
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let t = Instant::now();
        let Ok(index) = u8::try_from(bar) else {
            data.fill(0xff);
            return;
        };
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
    }

    fn stats(&self) -> Option<serde_json::Value> {
        let mut v = self.stats.to_json();
        v["placement"] = "in-process".into();
        Some(v)
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
