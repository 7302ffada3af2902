//! Block nodes (`blockdev-add`/`-del`), `scsi-hd` drives attached to a
//! controller through its control operations, and `block_resize`.

use super::*;

impl Monitor {
    pub(super) fn blockdev_add(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
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
        // Relative to the config file, as every path of the VM.
        let path = config::resolve_path(&self.config.base_dir, &filename);
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

    pub(super) fn blockdev_del(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
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
    pub(super) fn device_control(
        &self,
        controller: &str,
        op: &str,
        args: Value,
    ) -> Result<Value, QmpError> {
        let Some(slot) = self.bus.pci.slot_of(controller) else {
            return Err(QmpError::device_not_found(controller));
        };
        let remote = self.bus.pci.label_of(slot).and_then(|l| l.remote);
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
    pub(super) fn drive_attach(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
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

    pub(super) fn drive_detach(&self, name: &str, node: &Node) -> Result<Value, QmpError> {
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

    pub(super) fn block_resize(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
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
                // A device that is a disk itself (virtio-blk) resizes
                // through its `resize` control operation, which also
                // tells the guest (a configuration change interrupt).
                if let (None, Some(d)) = (args.opt_str("node-name")?, args.opt_str("device")?) {
                    if self.bus.pci.slot_of(d).is_some() {
                        drop(nodes);
                        if size == 0 || size % 512 != 0 {
                            return Err(QmpError::generic(
                                "Parameter 'size' expects a multiple of 512",
                            ));
                        }
                        return self
                            .device_control(d, "resize", json!({ "size": size }))
                            .map(|_| json!({}));
                    }
                }
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

/// The drives the config gives controllers (`[[device.drive]]`), as
/// attached nodes named `<device id>-drive<scsi-id>`.
pub(super) fn config_drives(config: &Config) -> BTreeMap<String, Node> {
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
