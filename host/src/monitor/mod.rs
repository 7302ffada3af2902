//! The VMM's QMP commands (docs/qmp.md, "The commands the VMM maps"):
//! status, PCI listing, quit and reset, the remotes, and hotplug of PCI
//! functions (in a remote or in-process) and of drives on a controller.
//!
//! Every command checks all its arguments before it changes anything, and
//! hotplug commands run one at a time, so an error leaves the VM as it was.
//!
//! - this file holds the state, the queries, quit/reset and dispatch;
//! - `devices.rs`, `device_add`/`device_del` of PCI functions;
//! - `drives.rs`, block nodes and `scsi-hd` drives on a controller, and
//!   `block_resize`;
//! - `restart.rs`, `remote-restart`.

mod device_recovery;
mod devices;
mod drives;
pub mod handover;
pub mod migration;
mod pcihp;
mod recovery;
mod restart;

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use config::{Config, DeviceConfig, OnReboot, Placement};
use kvm_ioctls::VmFd;
use qmp::{Arguments, Commands, QmpError};
use serde_json::{json, Map, Value};

use crate::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::memory::GuestRam;
use crate::pci::inprocess::InProcessFunction;
use crate::pci::proxy::{FailHook, ProxyFunction};
use crate::pci::root::SlotLabel;
use crate::pci::PciDevice;
use crate::remote::{self, Processes};
use crate::supervisor::{self, DeathCause, Remote};
use crate::vm::pci_gsi;

/// A named drive (QEMU's block node): an image file, maybe attached to a
/// controller as a `scsi-hd`.
#[derive(Clone, Debug)]
struct Node {
    file: PathBuf,
    read_only: bool,
    attached: Option<Attachment>,
    /// For a drive of the config: where the config puts it (a restarted
    /// remote attaches it there again by itself).
    from_config: Option<(String, u8)>,
}

#[derive(Clone, Debug)]
struct Attachment {
    /// The `scsi-hd` device id.
    device: String,
    controller: String,
    scsi_id: u8,
}

/// A PCI function added with `device_add`, remembered so that a
/// restarted remote gets it again.
#[derive(Clone, Debug)]
struct AddedDevice {
    id: String,
    driver: String,
    remote: Option<String>,
    slot: u8,
    kind: Option<String>,
    settings: String,
}

/// Everything the commands act on.
pub struct Monitor {
    config: Config,
    bus: Arc<Bus>,
    vm: Arc<VmFd>,
    ram: Arc<GuestRam>,
    /// Replaced one by one by `remote-restart`.
    remotes: Mutex<Vec<Arc<Remote>>>,
    processes: Processes,
    added: Mutex<Vec<AddedDevice>>,
    exit: Arc<ExitSignal>,
    events: qmp::EventSender,
    plugin_dirs: Vec<PathBuf>,
    nodes: Mutex<BTreeMap<String, Node>>,
    /// Serialises hotplug commands.
    hotplug: Mutex<()>,
    /// This monitor, for the failure hooks of the remotes it restarts
    /// (set by [`Monitor::arm_recovery`]).
    this: std::sync::OnceLock<std::sync::Weak<Monitor>>,
    /// When each remote was restarted automatically (the last minute).
    restarts: Mutex<BTreeMap<String, Vec<std::time::Instant>>>,
    /// `device_del` requests the guest has not answered yet: slot -> id.
    unplugging: Mutex<BTreeMap<u8, String>>,
    /// The vCPUs and the rest a snapshot reads (`stop`, `migrate`), set
    /// once the machine is built ([`Monitor::set_machine`]).
    machine: std::sync::OnceLock<Arc<crate::reset::Machine>>,
    migration: migration::Migration,
    /// A `remote-host` started ahead for each remote that restarts by
    /// itself, waiting to replace it (`recovery.rs`).
    standbys: Mutex<BTreeMap<String, crate::remote::Spawned>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const COMMANDS: &[&str] = &[
    "query-status",
    "query-pci",
    "quit",
    "system_reset",
    "system_powerdown",
    "query-remote",
    "device_add",
    "device_del",
    "blockdev-add",
    "blockdev-del",
    "block_resize",
    "query-block",
    "remote-restart",
    "query-device-stats",
    "stop",
    "cont",
    "migrate",
    "migrate_cancel",
    "x-debug-report",
    "x-device-control",
    "migrate-incoming",
    "query-migrate",
    "migrate-set-parameters",
    "query-migrate-parameters",
];

/// The hook that turns a function failure into a `DEVICE_FAILED` event.
pub fn fail_hook(events: &qmp::EventSender, remote: Option<&str>) -> FailHook {
    let events = events.clone();
    let remote = remote.map(str::to_owned);
    Arc::new(move |device: &str, reason: &str| {
        events.emit(
            "DEVICE_FAILED",
            json!({"device": device, "remote": remote, "reason": reason}),
        );
    })
}

impl Monitor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: Config,
        bus: Arc<Bus>,
        vm: Arc<VmFd>,
        ram: Arc<GuestRam>,
        remotes: Vec<Arc<Remote>>,
        processes: Processes,
        exit: Arc<ExitSignal>,
        events: qmp::EventSender,
        plugin_dirs: Vec<PathBuf>,
    ) -> Monitor {
        let nodes = drives::config_drives(&config);
        Monitor {
            config,
            bus,
            vm,
            ram,
            remotes: Mutex::new(remotes),
            processes,
            added: Mutex::new(Vec::new()),
            exit,
            events,
            plugin_dirs,
            nodes: Mutex::new(nodes),
            hotplug: Mutex::new(()),
            this: std::sync::OnceLock::new(),
            restarts: Mutex::new(BTreeMap::new()),
            unplugging: Mutex::new(BTreeMap::new()),
            machine: std::sync::OnceLock::new(),
            standbys: Mutex::new(BTreeMap::new()),
            migration: migration::Migration::default(),
        }
    }

    /// Hands the monitor the machine (its vCPUs), for `stop`, `cont` and
    /// `migrate`.
    pub fn set_machine(&self, m: Arc<crate::reset::Machine>) {
        let _ = self.machine.set(m);
    }

    fn remote(&self, id: &str) -> Result<Arc<Remote>, QmpError> {
        lock(&self.remotes)
            .iter()
            .find(|r| r.id == id)
            .cloned()
            .ok_or_else(|| {
                QmpError::new(
                    qmp::ErrorClass::DeviceNotFound,
                    format!("Remote '{id}' not found"),
                )
            })
    }

    fn query_status(&self) -> Value {
        if self.exit.is_set() {
            return json!({"status": "shutdown", "running": false});
        }
        if self.inmigrate() {
            return json!({"status": "inmigrate", "running": false});
        }
        if self.machine.get().is_some_and(|m| m.is_held()) {
            // QEMU's names: stopped after a completed migration, or by `stop`.
            let status = if self.migration_completed() {
                "postmigrate"
            } else {
                "paused"
            };
            return json!({"status": status, "running": false});
        }
        json!({"status": "running", "running": true})
    }

    /// Each function's access counters by register (all functions, or
    /// the one named `id`), for profiling a guest's I/O at run time.
    fn query_device_stats(&self, id: Option<&str>) -> Result<Value, QmpError> {
        let mut out = Vec::new();
        for f in self.bus.pci.functions() {
            let dev_id = f.label.id.clone();
            if id.is_some_and(|want| want != dev_id) {
                continue;
            }
            if let Some(Some(mut stats)) = self.bus.pci.with_function(f.slot, |d| d.stats()) {
                stats["id"] = dev_id.into();
                stats["slot"] = f.slot.into();
                out.push(stats);
            }
        }
        match id {
            Some(want) if out.is_empty() => Err(QmpError::device_not_found(want)),
            _ => Ok(Value::Array(out)),
        }
    }

    fn query_pci(&self) -> Value {
        let devices: Vec<Value> = self
            .bus
            .pci
            .functions()
            .into_iter()
            .map(|f| {
                let id = f.identity;
                let regions: Vec<Value> = f
                    .bars
                    .iter()
                    .map(|b| {
                        if b.spec.bar_type == pci::BarType::Io {
                            json!({"bar": b.index, "type": "io", "address": b.base, "size": b.spec.size})
                        } else {
                            json!({"bar": b.index, "type": "memory", "address": b.base,
                                   "size": b.spec.size, "prefetch": b.spec.prefetchable,
                                   "mem_type_64": b.spec.bar_type == pci::BarType::Memory64})
                        }
                    })
                    .collect();
                json!({
                    "bus": 0, "slot": f.slot, "function": 0,
                    "class_info": {"class": id.class_code >> 8},
                    "id": {"vendor": id.vendor_id, "device": id.device_id,
                           "subsystem-vendor": id.subsystem_vendor_id,
                           "subsystem": id.subsystem_id},
                    "irq": f.interrupt_line,
                    "qdev_id": f.label.id,
                    "remote": f.label.remote,
                    "regions": regions,
                    "unplug-pending": self.unplug_pending(&f.label.id),
                })
            })
            .collect();
        json!([{"bus": 0, "devices": devices}])
    }

    fn query_block(&self) -> Value {
        let nodes = lock(&self.nodes);
        let v: Vec<Value> = nodes
            .iter()
            .map(|(name, n)| {
                json!({
                    "node-name": name,
                    "file": n.file.display().to_string(),
                    "read-only": n.read_only,
                    "size": std::fs::metadata(&n.file).map(|m| m.len()).ok(),
                    "device": n.attached.as_ref().map(|a| a.device.clone()),
                    "controller": n.attached.as_ref().map(|a| a.controller.clone()),
                    "scsi-id": n.attached.as_ref().map(|a| a.scsi_id),
                })
            })
            .collect();
        Value::Array(v)
    }

    /// The id is free among functions and drives.
    fn check_new_id(&self, id: &str) -> Result<(), QmpError> {
        if id.is_empty() {
            return Err(QmpError::generic(
                "Parameter 'id' expects a non-empty string",
            ));
        }
        let taken = self.bus.pci.slot_of(id).is_some()
            || lock(&self.nodes)
                .values()
                .any(|n| n.attached.as_ref().is_some_and(|a| a.device == id));
        if taken {
            return Err(QmpError::generic(format!("Duplicate ID '{id}' for device")));
        }
        Ok(())
    }
}

impl Commands for Monitor {
    fn execute(&self, name: &str, args: &Map<String, Value>) -> Result<Value, QmpError> {
        match name {
            "query-status" => {
                args.allow_only(&[])?;
                Ok(self.query_status())
            }
            "query-pci" => {
                args.allow_only(&[])?;
                Ok(self.query_pci())
            }
            "query-block" => {
                args.allow_only(&[])?;
                Ok(self.query_block())
            }
            "query-remote" => {
                args.allow_only(&[])?;
                Ok(Value::Array(
                    lock(&self.remotes).iter().map(|r| r.query()).collect(),
                ))
            }
            "quit" => {
                args.allow_only(&[])?;
                // The main loop emits SHUTDOWN and stops the server after
                // this reply is written.
                self.exit.set(ExitReason::Quit);
                Ok(json!({}))
            }
            "system_reset" => {
                args.allow_only(&[])?;
                // With `on-reboot = "restart"` the main loop resets the
                // machine and emits RESET once the guest runs again; with
                // "exit" the VM ends (RESET, then SHUTDOWN).
                if self.config.vm.as_ref().map(|v| v.on_reboot) == Some(OnReboot::Exit) {
                    self.events.emit(
                        "RESET",
                        json!({"guest": false, "reason": "host-qmp-system-reset"}),
                    );
                }
                self.exit.set(ExitReason::HostReset);
                Ok(json!({}))
            }
            "system_powerdown" => {
                args.allow_only(&[])?;
                // QEMU's: the power button is pressed; whether the guest
                // shuts down is up to it (its ACPI button driver and
                // whatever listens to that key). The VM ends when it
                // writes S5, with SHUTDOWN "guest-shutdown".
                let Some(pm) = &self.bus.pm else {
                    return Err(QmpError::generic(
                        "this machine has no ACPI (acpi = false): it has no power button",
                    ));
                };
                lock(pm).press_power_button();
                Ok(json!({}))
            }
            "device_add" => self.device_add(args),
            "device_del" => self.device_del(args),
            "blockdev-add" => self.blockdev_add(args),
            "blockdev-del" => self.blockdev_del(args),
            "block_resize" => self.block_resize(args),
            "remote-restart" => self.remote_restart(args),
            "query-device-stats" => {
                args.allow_only(&["id"])?;
                self.query_device_stats(args.opt_str("id")?)
            }
            "stop" => self.stop(args),
            "cont" => self.cont(args),
            "migrate" => self.migrate(args),
            "migrate_cancel" => self.migrate_cancel(args),
            "query-migrate" => self.query_migrate(args),
            "migrate-set-parameters" => self.migrate_set_parameters(args),
            "query-migrate-parameters" => self.query_migrate_parameters(args),
            "migrate-incoming" => self.migrate_incoming(args),
            "x-device-control" => {
                // A plugin's own control operation (`Device::control`),
                // in this process or over the remote's control channel.
                args.allow_only(&["id", "op", "args"])?;
                let id = args.str("id")?;
                let op = args.str("op")?;
                let a = args.get("args").cloned().unwrap_or(Value::Null);
                self.device_control(id, op, a)
                    .map(|reply| serde_json::json!({ "reply": reply }))
            }
            "x-debug-report" => {
                args.allow_only(&[])?;
                Ok(serde_json::json!({ "report": self.machine()?.debug_report() }))
            }
            _ => Err(QmpError::command_not_found(name)),
        }
    }

    fn command_names(&self) -> Vec<String> {
        COMMANDS.iter().map(|s| (*s).to_owned()).collect()
    }
}
