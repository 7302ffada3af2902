//! The VMM's QMP commands (docs/qmp.md, "The commands the VMM maps"):
//! status, PCI listing, quit and reset, the remotes, and hotplug of PCI
//! functions (in a remote or in-process) and of drives on a controller.
//!
//! Every command checks all its arguments before it changes anything, and
//! hotplug commands run one at a time, so an error leaves the VM as it was.

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
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

const COMMANDS: &[&str] = &[
    "query-status",
    "query-pci",
    "quit",
    "system_reset",
    "query-remote",
    "device_add",
    "device_del",
    "blockdev-add",
    "blockdev-del",
    "block_resize",
    "query-block",
    "remote-restart",
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
        let nodes = config_drives(&config);
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
        }
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
        let running = !self.exit.is_set();
        json!({"status": if running { "running" } else { "shutdown" }, "running": running})
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

    fn device_add(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let _one = lock(&self.hotplug);
        let driver = args.str("driver")?;
        if driver == "scsi-hd" {
            return self.drive_attach(args);
        }
        let id = args.str("id")?;
        self.check_new_id(id)?;
        let remote = args
            .opt_str("remote")?
            .map(|r| self.remote(r))
            .transpose()?;
        let slot = match args.opt_str("addr")? {
            Some(a) => parse_addr(a)?,
            None => self.free_slot()?,
        };
        if let Some(f) = self
            .bus
            .pci
            .functions()
            .into_iter()
            .find(|f| f.slot == slot)
        {
            return Err(QmpError::generic(format!(
                "PCI slot {slot} is in use by '{}'",
                f.label.id
            )));
        }
        let kind = args.opt_str("kind")?;
        let settings = settings_toml(args, &["driver", "id", "remote", "addr", "kind"])?;
        let gsi = pci_gsi(slot);
        let spec = AddedDevice {
            id: id.into(),
            driver: driver.into(),
            remote: remote.as_ref().map(|r| r.id.clone()),
            slot,
            kind: kind.map(str::to_owned),
            settings: settings.clone(),
        };
        let (dev, label): (Box<dyn PciDevice>, SlotLabel) = match &remote {
            Some(r) => {
                let proxy = self.add_to_remote(r, &spec)?;
                (
                    Box::new(proxy),
                    SlotLabel {
                        id: id.into(),
                        remote: Some(r.id.clone()),
                    },
                )
            }
            None => {
                let d = DeviceConfig {
                    id: id.into(),
                    placement: Placement::InProcess,
                    plugin: driver.into(),
                    kind: kind.map(str::to_owned),
                    slot,
                    settings,
                    base_dir: std::env::current_dir().unwrap_or_default(),
                    location: config::Location {
                        file: PathBuf::from("<qmp device_add>"),
                        line: 1,
                        column: 1,
                    },
                };
                let f = InProcessFunction::new(
                    &d,
                    &self.plugin_dirs,
                    self.ram.mem.clone(),
                    self.vm.clone(),
                    gsi,
                )
                .map_err(|e| QmpError::generic(format!("{e:#}")))?
                .with_fail_hook(fail_hook(&self.events, None));
                (
                    Box::new(f),
                    SlotLabel {
                        id: id.into(),
                        remote: None,
                    },
                )
            }
        };
        if let Err(e) = self.bus.pci.insert(slot, label, dev) {
            self.undo_remote_add(remote.as_ref(), id);
            return Err(QmpError::generic(e.to_string()));
        }
        if let Err(e) = self.bus.pci.assign_resources_of(slot, Some(gsi as u8)) {
            self.bus.pci.remove(slot);
            self.undo_remote_add(remote.as_ref(), id);
            return Err(QmpError::generic(e.to_string()));
        }
        lock(&self.added).push(spec);
        tracing::info!("device_add: {id} ({driver}) at slot {slot}");
        Ok(json!({}))
    }

    fn undo_remote_add(&self, remote: Option<&Arc<Remote>>, id: &str) {
        if let Some(r) = remote {
            r.remove_device(id);
            let _ = r.with_control(|c| c.device_del(id));
        }
    }

    /// Asks `r` to create the device on a new connection, then sets up
    /// its proxy function.
    fn add_to_remote(&self, r: &Arc<Remote>, a: &AddedDevice) -> Result<ProxyFunction, QmpError> {
        let (id, driver, slot) = (a.id.as_str(), a.driver.as_str(), a.slot);
        let (kind, settings, gsi) = (a.kind.as_deref(), a.settings.as_str(), pci_gsi(slot));
        let rcfg = self
            .config
            .remote(&r.id)
            .ok_or_else(|| QmpError::generic(format!("Remote '{}' is not in the config", r.id)))?;
        let (ours, theirs) =
            UnixStream::pair().map_err(|e| QmpError::generic(format!("socketpair: {e}")))?;
        r.with_control(|c| c.device_add(id, driver, kind, slot, settings, OwnedFd::from(theirs)))
            .map_err(|e| {
                // QEMU's words for an unknown device model.
                if e.contains(&format!("plugin `{driver}` not found")) {
                    QmpError::generic(format!("'{driver}' is not a valid device model name"))
                } else {
                    QmpError::generic(e)
                }
            })?;
        let setup = crate::remote::client_over(rcfg, ours)
            .and_then(|client| ProxyFunction::new(id, client, &self.ram, &self.vm, gsi));
        match setup {
            Ok(p) => {
                let p = p.with_supervision(r.failed.clone(), fail_hook(&self.events, Some(&r.id)));
                r.add_device(id, Some(p.socket_fd()));
                Ok(p)
            }
            Err(e) => {
                let _ = r.with_control(|c| c.device_del(id));
                Err(QmpError::generic(format!("{e:#}")))
            }
        }
    }

    fn free_slot(&self) -> Result<u8, QmpError> {
        let used = self.bus.pci.slot_numbers();
        (1..=31u8)
            .find(|s| !used.contains(s))
            .ok_or_else(|| QmpError::generic("No free PCI slot on bus 0"))
    }

    fn device_del(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let _one = lock(&self.hotplug);
        args.allow_only(&["id"])?;
        let id = args.str("id")?;
        let drive = lock(&self.nodes)
            .iter()
            .find(|(_, n)| n.attached.as_ref().is_some_and(|a| a.device == id))
            .map(|(name, n)| (name.clone(), n.clone()));
        if let Some((name, node)) = drive {
            return self.drive_detach(&name, &node);
        }
        let Some(slot) = self.bus.pci.slot_of(id) else {
            return Err(QmpError::device_not_found(id));
        };
        let in_use: Vec<String> = lock(&self.nodes)
            .values()
            .filter_map(|n| n.attached.as_ref())
            .filter(|a| a.controller == id)
            .map(|a| a.device.clone())
            .collect();
        if !in_use.is_empty() {
            return Err(QmpError::generic(format!(
                "Device '{id}' is in use by {}: remove them first",
                in_use.join(", ")
            )));
        }
        let label = self.bus.pci.remove(slot);
        lock(&self.added).retain(|a| a.id != id);
        if let Some(rid) = label.and_then(|l| l.remote) {
            if let Ok(r) = self.remote(&rid) {
                r.remove_device(id);
                if r.has_control() {
                    if let Err(e) = r.with_control(|c| c.device_del(id)) {
                        tracing::warn!("device_del {id}: remote {rid}: {e}");
                    }
                }
            }
        }
        self.events.emit(
            "DEVICE_DELETED",
            json!({"device": id, "path": format!("/machine/peripheral/{id}")}),
        );
        Ok(json!({}))
    }

    fn blockdev_add(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let _one = lock(&self.hotplug);
        args.allow_only(&["driver", "node-name", "read-only", "file", "filename"])?;
        let driver = args.str("driver")?;
        let name = args.str("node-name")?;
        let filename = match driver {
            "raw" => {
                let file = args.object("file")?;
                file.allow_only(&["driver", "filename"])?;
                let d = file.str("driver")?;
                if d != "file" {
                    return Err(QmpError::generic(format!(
                        "Parameter 'driver' does not accept value '{d}'"
                    )));
                }
                file.str("filename")?.to_owned()
            }
            "file" => args.str("filename")?.to_owned(),
            d => {
                return Err(QmpError::generic(format!(
                    "Parameter 'driver' does not accept value '{d}'"
                )))
            }
        };
        let read_only = args.opt_bool("read-only")?.unwrap_or(false);
        if name.is_empty() {
            return Err(QmpError::generic(
                "Parameter 'node-name' expects a non-empty string",
            ));
        }
        let mut nodes = lock(&self.nodes);
        if nodes.contains_key(name) {
            return Err(QmpError::generic(format!(
                "Duplicate nodes with node-name='{name}'"
            )));
        }
        let path = std::path::absolute(&filename).unwrap_or_else(|_| PathBuf::from(&filename));
        let open = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path);
        if let Err(e) = open {
            return Err(QmpError::generic(format!(
                "Could not open '{filename}': {e}"
            )));
        }
        nodes.insert(
            name.into(),
            Node {
                file: path,
                read_only,
                attached: None,
                from_config: None,
            },
        );
        Ok(json!({}))
    }

    fn blockdev_del(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let _one = lock(&self.hotplug);
        args.allow_only(&["node-name"])?;
        let name = args.str("node-name")?;
        let mut nodes = lock(&self.nodes);
        match nodes.get(name) {
            None => Err(QmpError::device_not_found(name)),
            Some(n) if n.attached.is_some() => {
                Err(QmpError::generic(format!("Node '{name}' is in use")))
            }
            Some(_) => {
                nodes.remove(name);
                Ok(json!({}))
            }
        }
    }

    /// Runs a control operation on the device `controller`, wherever it
    /// runs.
    fn device_control(&self, controller: &str, op: &str, args: Value) -> Result<Value, QmpError> {
        let Some(slot) = self.bus.pci.slot_of(controller) else {
            return Err(QmpError::device_not_found(controller));
        };
        let remote = self
            .bus
            .pci
            .functions()
            .into_iter()
            .find(|f| f.slot == slot)
            .and_then(|f| f.label.remote);
        match remote {
            Some(rid) => {
                let r = self.remote(&rid)?;
                r.with_control(|c| c.device_control(controller, op, args))
                    .map_err(QmpError::generic)
            }
            None => self
                .bus
                .pci
                .with_function(slot, |f| f.control(op, &args))
                .unwrap_or_else(|| Err(format!("Device '{controller}' not found")))
                .map_err(QmpError::generic),
        }
    }

    /// `device_add driver=scsi-hd`: attaches a node to a controller.
    fn drive_attach(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        args.allow_only(&["driver", "id", "drive", "bus", "scsi-id", "lun"])?;
        let id = args.str("id")?;
        let drive = args.str("drive")?;
        let bus = args.str("bus")?;
        let scsi_id = args.u64("scsi-id")?;
        let lun = args.opt_u64("lun")?.unwrap_or(0);
        self.check_new_id(id)?;
        let controller = bus.strip_suffix(".0").unwrap_or(bus);
        if self.bus.pci.slot_of(controller).is_none() {
            return Err(QmpError::new(
                qmp::ErrorClass::DeviceNotFound,
                format!("Bus '{bus}' not found"),
            ));
        }
        if scsi_id > 15 || scsi_id == 7 {
            return Err(QmpError::generic(format!(
                "Parameter 'scsi-id' expects 0..=15 except 7 (the controller), not {scsi_id}"
            )));
        }
        if lun != 0 {
            return Err(QmpError::generic(
                "Parameter 'lun' expects 0 (one LUN per target)",
            ));
        }
        let scsi_id = scsi_id as u8;
        let node = {
            let nodes = lock(&self.nodes);
            let Some(node) = nodes.get(drive) else {
                return Err(QmpError::device_not_found(drive));
            };
            if node.attached.is_some() {
                return Err(QmpError::generic(format!(
                    "Drive '{drive}' is already in use"
                )));
            }
            if let Some(a) = nodes
                .values()
                .filter_map(|n| n.attached.as_ref())
                .find(|a| a.controller == controller && a.scsi_id == scsi_id)
            {
                return Err(QmpError::generic(format!(
                    "scsi-id {scsi_id} is in use by '{}'",
                    a.device
                )));
            }
            node.clone()
        };
        let reply = self.device_control(
            controller,
            "drive-add",
            json!({"id": drive, "file": node.file, "scsi-id": scsi_id, "lun": 0,
                   "read-only": node.read_only}),
        )?;
        if let Some(n) = lock(&self.nodes).get_mut(drive) {
            n.attached = Some(Attachment {
                device: id.into(),
                controller: controller.into(),
                scsi_id,
            });
        }
        tracing::info!("drive {drive} attached to {controller} target {scsi_id}: {reply}");
        self.events.emit(
            "DRIVE_ADDED",
            json!({"device": id, "node-name": drive, "controller": controller,
                   "scsi-id": scsi_id, "lun": 0}),
        );
        Ok(json!({}))
    }

    fn drive_detach(&self, name: &str, node: &Node) -> Result<Value, QmpError> {
        let Some(a) = &node.attached else {
            return Err(QmpError::device_not_found(name));
        };
        self.device_control(&a.controller, "drive-del", json!({"scsi-id": a.scsi_id}))?;
        if let Some(n) = lock(&self.nodes).get_mut(name) {
            n.attached = None;
        }
        self.events.emit(
            "DRIVE_REMOVED",
            json!({"device": a.device, "node-name": name, "controller": a.controller,
                   "scsi-id": a.scsi_id, "lun": 0}),
        );
        self.events.emit(
            "DEVICE_DELETED",
            json!({"device": a.device, "path": format!("/machine/peripheral/{}", a.device)}),
        );
        Ok(json!({}))
    }

    fn block_resize(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let _one = lock(&self.hotplug);
        args.allow_only(&["node-name", "device", "size"])?;
        let size = args.u64("size")?;
        let (name, node) = {
            let nodes = lock(&self.nodes);
            let found = match (args.opt_str("node-name")?, args.opt_str("device")?) {
                (Some(n), _) => nodes.get_key_value(n),
                (None, Some(d)) => nodes
                    .iter()
                    .find(|(_, n)| n.attached.as_ref().is_some_and(|a| a.device == d)),
                (None, None) => return Err(QmpError::missing_parameter("node-name")),
            };
            let Some((name, node)) = found else {
                let what = args
                    .opt_str("node-name")?
                    .or(args.opt_str("device")?)
                    .unwrap_or_default();
                return Err(QmpError::device_not_found(what));
            };
            (name.clone(), node.clone())
        };
        if size == 0 || size % 512 != 0 {
            return Err(QmpError::generic(
                "Parameter 'size' expects a multiple of 512",
            ));
        }
        if node.read_only {
            return Err(QmpError::generic(format!("Node '{name}' is read only")));
        }
        // Shrinking cuts off whatever the guest keeps at the end of its
        // disk: refused, so that a typo cannot lose data.
        let current = std::fs::metadata(&node.file)
            .map(|m| m.len())
            .map_err(|e| {
                QmpError::generic(format!("Could not open '{}': {e}", node.file.display()))
            })?;
        if size < current {
            return Err(QmpError::generic(format!(
                "Node '{name}' is {current} bytes: shrinking it to {size} would lose data, and is refused"
            )));
        }
        match &node.attached {
            Some(a) => {
                self.device_control(
                    &a.controller,
                    "drive-resize",
                    json!({"scsi-id": a.scsi_id, "size": size}),
                )?;
            }
            None => {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&node.file)
                    .and_then(|f| f.set_len(size))
                    .map_err(|e| {
                        QmpError::generic(format!(
                            "Could not resize '{}': {e}",
                            node.file.display()
                        ))
                    })?;
            }
        }
        Ok(json!({}))
    }
}

impl Monitor {
    /// `remote-restart {"id": REMOTE}`: replaces a dead, hung or healthy
    /// remote by a new one. A `remote-host` we spawned is killed (if still
    /// there) and spawned again; for a remote an orchestrator started
    /// (`socket = ...`), the orchestrator restarts the process and this
    /// reconnects to its socket. Every device the remote served is set up
    /// again in its slot, with the BARs, interrupt line and command
    /// register the guest gave it, and drives added with `device_add
    /// scsi-hd` are attached again. Device state is not carried over: to
    /// the guest the devices look reset (fault recovery that the guest
    /// does not notice is a later step). Event `REMOTE_RESTARTED`.
    fn remote_restart(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        let _one = lock(&self.hotplug);
        args.allow_only(&["id"])?;
        let id = args.str("id")?;
        let old = self.remote(id)?;
        let rcfg = self
            .config
            .remote(id)
            .ok_or_else(|| QmpError::generic(format!("Remote '{id}' is not in the config")))?;
        if old.pid.is_none() && rcfg.socket.is_none() {
            return Err(QmpError::generic(format!(
                "Remote '{id}' was handed to this VMM as a connected socket (--remote-fd): it cannot be restarted from here"
            )));
        }
        // The old remote goes first: its devices fail now, its supervisor
        // stops reporting, its process is killed and reaped.
        old.retire();
        if let Some(pid) = old.pid {
            let mut procs = lock(&self.processes);
            if let Some(pos) = procs.iter().position(|p| p.pid() == pid) {
                let mut p = procs.remove(pos);
                p.stop(std::time::Duration::ZERO);
            }
        }
        let s = remote::connect_supervised(&self.config, rcfg, None)
            .map_err(|e| QmpError::generic(format!("restarting remote '{id}': {e:#}")))?;
        let pid = s.process.as_ref().map(remote::RemoteProcess::pid);
        let new = Arc::new(Remote::new(rcfg, pid, s.control, s.control_hangup));
        if let Some(p) = s.process {
            let (sup, events, exit) = (new.clone(), self.events.clone(), self.exit.clone());
            p.watch(move |end| sup.died(DeathCause::Process(end), &events, &exit));
            lock(&self.processes).push(p);
        }
        let mut problems = Vec::new();
        // Devices of the config: a fresh connection each.
        for (dev_id, client) in s.clients {
            // Removed with device_del (its id maybe reused elsewhere since):
            // the new connection just closes.
            let Some(slot) = self
                .bus
                .pci
                .functions()
                .into_iter()
                .find(|f| f.label.id == dev_id && f.label.remote.as_deref() == Some(id))
                .map(|f| f.slot)
            else {
                continue;
            };
            let r = ProxyFunction::new(&dev_id, client, &self.ram, &self.vm, pci_gsi(slot))
                .map_err(|e| format!("{e:#}"))
                .and_then(|p| self.put_back(&new, &dev_id, slot, p));
            if let Err(e) = r {
                problems.push(format!("{dev_id}: {e}"));
            }
        }
        // Devices added with device_add.
        let added: Vec<AddedDevice> = lock(&self.added)
            .iter()
            .filter(|a| a.remote.as_deref() == Some(id))
            .cloned()
            .collect();
        for a in added {
            let r = self
                .add_to_remote(&new, &a)
                .map_err(|e| e.desc)
                .and_then(|p| {
                    // add_to_remote registered it already.
                    new.remove_device(&a.id);
                    self.put_back(&new, &a.id, a.slot, p)
                });
            if let Err(e) = r {
                problems.push(format!("{}: {e}", a.id));
            }
        }
        // Drives: the restarted controller has its config drives again;
        // make its targets what the operator left them.
        let devices = new.device_ids();
        let nodes: Vec<(String, Node)> = lock(&self.nodes)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, node) in nodes {
            let op = match (&node.attached, &node.from_config) {
                // Attached with device_add scsi-hd: attach it again.
                (Some(a), None) if devices.contains(&a.controller) => (
                    a.controller.clone(),
                    "drive-add",
                    json!({"id": name, "file": node.file, "scsi-id": a.scsi_id, "lun": 0,
                           "read-only": node.read_only}),
                ),
                // A config drive the operator removed: remove it again.
                (None, Some((controller, scsi_id))) if devices.contains(controller) => {
                    (controller.clone(), "drive-del", json!({"scsi-id": scsi_id}))
                }
                _ => continue,
            };
            let (controller, control, args) = op;
            if let Err(e) = new.with_control(|c| c.device_control(&controller, control, args)) {
                problems.push(format!("drive {name}: {e}"));
            }
        }
        {
            let mut remotes = lock(&self.remotes);
            if let Some(slot) = remotes.iter_mut().find(|r| r.id == id) {
                *slot = new.clone();
            }
        }
        supervisor::spawn(
            new.clone(),
            self.bus.pci.clone(),
            self.events.clone(),
            self.exit.clone(),
        );
        self.events.emit(
            "REMOTE_RESTARTED",
            json!({"id": id, "pid": pid, "devices": new.device_ids(), "problems": problems}),
        );
        if problems.is_empty() {
            Ok(json!({}))
        } else {
            Err(QmpError::generic(format!(
                "Remote '{id}' restarted, but: {}",
                problems.join("; ")
            )))
        }
    }

    /// The VM ends: every remote stops being supervised, and those we
    /// spawned see their control channel close (and exit).
    pub fn stop_remotes(&self) {
        for r in lock(&self.remotes).iter() {
            r.stopped();
        }
    }

    /// Puts a restarted remote's proxy in the slot its predecessor had.
    fn put_back(
        &self,
        remote: &Arc<Remote>,
        id: &str,
        slot: u8,
        proxy: ProxyFunction,
    ) -> Result<(), String> {
        let proxy = proxy.with_supervision(
            remote.failed.clone(),
            fail_hook(&self.events, Some(&remote.id)),
        );
        remote.add_device(id, Some(proxy.socket_fd()));
        self.bus
            .pci
            .replace(slot, Box::new(proxy))
            .map_err(|e| e.to_string())
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
                if self.config.vm.on_reboot == OnReboot::Exit {
                    self.events.emit(
                        "RESET",
                        json!({"guest": false, "reason": "host-qmp-system-reset"}),
                    );
                }
                self.exit.set(ExitReason::HostReset);
                Ok(json!({}))
            }
            "device_add" => self.device_add(args),
            "device_del" => self.device_del(args),
            "blockdev-add" => self.blockdev_add(args),
            "blockdev-del" => self.blockdev_del(args),
            "block_resize" => self.block_resize(args),
            "remote-restart" => self.remote_restart(args),
            _ => Err(QmpError::command_not_found(name)),
        }
    }

    fn command_names(&self) -> Vec<String> {
        COMMANDS.iter().map(|s| (*s).to_owned()).collect()
    }
}

/// QEMU's `addr`: `"SLOT[.FN]"` in hex, function 0 only.
fn parse_addr(a: &str) -> Result<u8, QmpError> {
    let bad = || {
        QmpError::generic(format!(
            "Parameter 'addr' expects a slot (hex, 1..1f), not '{a}'"
        ))
    };
    let (slot, func) = a.split_once('.').unwrap_or((a, "0"));
    let slot = slot.trim_start_matches("0x");
    let slot = u8::from_str_radix(slot, 16).map_err(|_| bad())?;
    if func.trim_start_matches("0x") != "0" {
        return Err(QmpError::generic("Only function 0 can be added"));
    }
    if !(1..=31).contains(&slot) {
        return Err(bad());
    }
    Ok(slot)
}

/// The device's own settings from `device_add`'s other members, as the
/// TOML its plugin reads from a `[[device]]` table.
fn settings_toml(args: &Map<String, Value>, skip: &[&str]) -> Result<String, QmpError> {
    let mut doc = toml_edit::DocumentMut::new();
    for (k, v) in args {
        if skip.contains(&k.as_str()) {
            continue;
        }
        let Some(v) = toml_value(v) else {
            return Err(QmpError::generic(format!(
                "Parameter '{k}' cannot be a device setting (null)"
            )));
        };
        doc.insert(k, toml_edit::Item::Value(v));
    }
    Ok(doc.to_string())
}

fn toml_value(v: &Value) -> Option<toml_edit::Value> {
    Some(match v {
        Value::Null => return None,
        Value::Bool(b) => (*b).into(),
        Value::Number(n) => match n.as_i64() {
            Some(i) => i.into(),
            None => n.as_f64()?.into(),
        },
        Value::String(s) => s.as_str().into(),
        Value::Array(a) => {
            let mut arr = toml_edit::Array::new();
            for x in a {
                arr.push(toml_value(x)?);
            }
            toml_edit::Value::Array(arr)
        }
        Value::Object(o) => {
            let mut t = toml_edit::InlineTable::new();
            for (k, x) in o {
                t.insert(k, toml_value(x)?);
            }
            toml_edit::Value::InlineTable(t)
        }
    })
}

/// The drives the config gives controllers (`[[device.drive]]`), as
/// attached nodes named `<device id>-drive<scsi-id>`.
fn config_drives(config: &Config) -> BTreeMap<String, Node> {
    let mut nodes = BTreeMap::new();
    for d in &config.devices {
        let Ok(doc) = d.settings.parse::<toml_edit::DocumentMut>() else {
            continue;
        };
        let Some(drives) = doc.get("drive").and_then(|i| i.as_array_of_tables()) else {
            continue;
        };
        for t in drives.iter() {
            let (Some(file), Some(scsi_id)) = (
                t.get("file").and_then(|v| v.as_str()),
                t.get("scsi-id").and_then(|v| v.as_integer()),
            ) else {
                continue;
            };
            let name = format!("{}-drive{scsi_id}", d.id);
            let file = Path::new(file);
            nodes.insert(
                name.clone(),
                Node {
                    file: if file.is_absolute() {
                        file.to_path_buf()
                    } else {
                        d.base_dir.join(file)
                    },
                    read_only: t
                        .get("read-only")
                        .and_then(|v| v.as_bool())
                        .unwrap_or(false),
                    attached: Some(Attachment {
                        device: name,
                        controller: d.id.clone(),
                        scsi_id: scsi_id as u8,
                    }),
                    from_config: Some((d.id.clone(), scsi_id as u8)),
                },
            );
        }
    }
    nodes
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn addr_parsing() {
        assert_eq!(parse_addr("0x7").unwrap(), 7);
        assert_eq!(parse_addr("07.0").unwrap(), 7);
        assert_eq!(parse_addr("1f").unwrap(), 31);
        assert!(parse_addr("0").is_err());
        assert!(parse_addr("20").is_err());
        assert!(parse_addr("7.1").is_err());
        assert!(parse_addr("zz").is_err());
    }

    #[test]
    fn device_settings_become_the_plugins_toml() {
        let args = json!({"driver": "dma-example", "id": "d", "max-transfer": 65536,
                          "name": "x", "flags": [1, 2], "sub": {"a": true}});
        let t = settings_toml(args.as_object().unwrap(), &["driver", "id"]).unwrap();
        let doc: toml_edit::DocumentMut = t.parse().unwrap();
        assert_eq!(doc["max-transfer"].as_integer(), Some(65536));
        assert_eq!(doc["name"].as_str(), Some("x"));
        assert_eq!(doc["flags"].as_array().unwrap().len(), 2);
        assert_eq!(doc["sub"]["a"].as_bool(), Some(true));
        assert!(doc.get("driver").is_none());
        let bad = json!({"x": null});
        assert!(settings_toml(bad.as_object().unwrap(), &[]).is_err());
    }
}
