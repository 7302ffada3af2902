//! `device_add` and `device_del` of PCI functions, in a remote or
//! in-process.

use super::*;

impl Monitor {
    pub(super) fn device_add(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
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
                let proxy = self.supervised(r, id, self.add_to_remote(r, &spec)?);
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
                    plugin: config::resolve_plugin(&self.config.base_dir, driver),
                    kind: kind.map(str::to_owned),
                    slot,
                    settings,
                    base_dir: self.config.base_dir.clone(),
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
                .and_then(|f| f.with_msix(&self.bus.msi_routes))
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
        self.announce_plug(slot);
        Ok(json!({}))
    }

    pub(super) fn undo_remote_add(&self, remote: Option<&Arc<Remote>>, id: &str) {
        if let Some(r) = remote {
            r.remove_device(id);
            let _ = r.with_control(|c| c.device_del(id));
        }
    }

    /// Asks `r` to create the device on a new connection, then sets up
    /// its proxy function (not yet [`supervised`](Self::supervised)).
    pub(super) fn add_to_remote(
        &self,
        r: &Arc<Remote>,
        a: &AddedDevice,
    ) -> Result<ProxyFunction, QmpError> {
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
            .and_then(|client| ProxyFunction::new(id, client, &self.ram, &self.vm, gsi))
            .and_then(|p| p.with_msix(&self.vm, &self.bus.msi_routes));
        setup.map_err(|e| {
            let _ = r.with_control(|c| c.device_del(id));
            QmpError::generic(format!("{e:#}"))
        })
    }

    /// `proxy`, a function of remote `r`, under that remote's supervision:
    /// it fails with the remote and reports its own failure, and the
    /// supervisor polls its channel; on the fast path when the remote is
    /// ours.
    pub(super) fn supervised(
        &self,
        r: &Arc<Remote>,
        id: &str,
        proxy: ProxyFunction,
    ) -> ProxyFunction {
        let mut proxy =
            proxy.with_supervision(r.failed.clone(), fail_hook(&self.events, Some(&r.id)));
        r.attach_fast_path(&self.vm, id, &mut proxy);
        r.add_device(id, Some(proxy.socket_fd()), proxy.activity());
        proxy
    }

    pub(super) fn free_slot(&self) -> Result<u8, QmpError> {
        let used = self.bus.pci.slot_numbers();
        (1..=31u8)
            .find(|s| !used.contains(s))
            .ok_or_else(|| QmpError::generic("No free PCI slot on bus 0"))
    }

    pub(super) fn device_del(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
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
        if let Some(posted) = self.request_unplug(id, slot) {
            return posted;
        }
        self.remove_function(id, slot);
        Ok(json!({}))
    }

    /// Takes the function `id` out of `slot` (and out of its remote), then
    /// `DEVICE_DELETED`.
    pub(super) fn remove_function(&self, id: &str, slot: u8) {
        // Out of supervision first: closing its channel (the proxy's drop)
        // must not look like the remote hanging up.
        let remote = self
            .bus
            .pci
            .label_of(slot)
            .and_then(|l| l.remote)
            .and_then(|rid| self.remote(&rid).ok());
        if let Some(r) = &remote {
            r.remove_device(id);
        }
        self.bus.pci.remove(slot);
        lock(&self.added).retain(|a| a.id != id);
        if let Some(r) = remote.filter(|r| r.has_control()) {
            if let Err(e) = r.with_control(|c| c.device_del(id)) {
                tracing::warn!("device_del {id}: remote {}: {e}", r.id);
            }
        }
        self.events.emit(
            "DEVICE_DELETED",
            json!({"device": id, "path": format!("/machine/peripheral/{id}")}),
        );
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

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    pub(super) fn addr_parsing() {
        assert_eq!(parse_addr("0x7").unwrap(), 7);
        assert_eq!(parse_addr("07.0").unwrap(), 7);
        assert_eq!(parse_addr("1f").unwrap(), 31);
        assert!(parse_addr("0").is_err());
        assert!(parse_addr("20").is_err());
        assert!(parse_addr("7.1").is_err());
        assert!(parse_addr("zz").is_err());
    }

    #[test]
    pub(super) fn device_settings_become_the_plugins_toml() {
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
