//! `remote-restart`, and stopping the remotes when the VM ends.

use super::*;
use crate::checkpoint::Save;
use crate::supervisor::RemoteState;

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
    pub(super) fn remote_restart(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        args.allow_only(&["id", "keep-state"])?;
        let id = args.str("id")?;
        let keep_state = match args.get("keep-state") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(QmpError::invalid_parameter_type("keep-state", "bool")),
        };
        let problems = self.restart_remote(id, None, keep_state)?;
        if problems.is_empty() {
            Ok(json!({}))
        } else {
            Err(QmpError::generic(format!(
                "Remote '{id}' restarted, but: {}",
                problems.join("; ")
            )))
        }
    }

    /// Replaces remote `id` (see [`remote_restart`](Self::remote_restart))
    /// and returns what could not be set up again. `automatic`: the time
    /// its failure was noticed, for a restart the failure hook asked for
    /// (`REMOTE_RESTARTED` then says `"reason": "automatic"` and the
    /// recovery time).
    pub(super) fn restart_remote(
        &self,
        id: &str,
        automatic: Option<std::time::Instant>,
        keep_state: bool,
    ) -> Result<Vec<String>, QmpError> {
        let _one = lock(&self.hotplug);
        let t0 = std::time::Instant::now();
        let old = self.remote(id)?;
        if old.state() == RemoteState::HandedOver || old.is_lent() {
            return Err(QmpError::generic(format!(
                "Remote '{id}' is being handed over, or was, to a migration's destination"
            )));
        }
        let rcfg = self
            .config
            .remote(id)
            .ok_or_else(|| QmpError::generic(format!("Remote '{id}' is not in the config")))?;
        if old.pid.is_none() && rcfg.socket.is_none() {
            return Err(QmpError::generic(format!(
                "Remote '{id}' was handed to this VMM as a connected socket (--remote-fd): it cannot be restarted from here"
            )));
        }
        let mut problems = Vec::new();
        // The guest's accesses to its functions wait until they are back
        // (bounded), instead of reading all-ones.
        let held = self.slots_of(id);
        self.bus.pci.hold(&held, super::recovery::RECOVERY_HOLD);
        // Doorbells too: from here on a queue notify exits to the VMM and
        // waits with the other accesses, instead of reaching the old
        // process after its state was saved.
        for slot in &held {
            self.bus.pci.with_function(*slot, |d| d.release_doorbells());
        }
        let _release = super::recovery::Released(&self.bus.pci, held);
        // A remote that still answers keeps its devices' state across the
        // restart: the guest's accesses stop reaching it first (they read
        // until the devices are back), each device saves once its
        // ring is drained, and the new process restores it below.
        let mut states: Vec<(String, Vec<u8>)> = Vec::new();
        // Saves the guest has moved past, for devices that can say their
        // guest's work since was lost (`control::RESUME_AFTER_LOSS`).
        let mut stale: Vec<(String, Vec<u8>)> = Vec::new();
        if keep_state && old.state() == RemoteState::Running && old.has_control() {
            old.failed.store(true, std::sync::atomic::Ordering::Release);
            for dev in old.device_ids() {
                match old.with_control(|c| c.device_save(&dev)) {
                    Ok(state) => states.push((dev, state)),
                    Err(e) => problems.push(format!(
                        "{dev}: its state was not kept ({e}); it comes back reset"
                    )),
                }
            }
        } else if keep_state {
            // Dead or hung: what was saved while the guest left each
            // device alone (`crate::checkpoint`), where still current.
            if let Some(cp) = &old.checkpoints {
                for dev in old.device_ids() {
                    match cp.last(&dev) {
                        Some(Save::Current(state)) => states.push((dev, state)),
                        Some(Save::Stale(state)) => stale.push((dev, state)),
                        None => {}
                    }
                }
            }
        }
        // The old remote goes first: its devices fail now, its supervisor
        // stops reporting, its process is killed and reaped.
        old.retire();
        if let Some(mut p) = self.take_process(old.pid) {
            p.stop(std::time::Duration::ZERO);
        }
        // One a migration handed over (not our child): it ends with its
        // control channel, just shut down, or is killed; either way it is
        // gone before another process opens its images.
        old.end_adopted_process(std::time::Duration::from_secs(5));
        // Where a restart's time goes (`HOST_LOG=info`).
        tracing::info!("restart {id}: old process gone after {:?}", t0.elapsed());
        let cold = || {
            remote::connect_supervised(&self.config, rcfg, None)
                .map_err(|e| QmpError::generic(format!("restarting remote '{id}': {e:#}")))
        };
        // The standby started ahead, if one is ready; else a new process.
        let s = match self.take_standby(id).map(|sb| sb.connect(rcfg)) {
            Some(Ok(s)) => s,
            Some(Err(e)) => {
                tracing::warn!("restart {id}: the standby failed ({e:#}); starting a new process");
                cold()?
            }
            None => cold()?,
        };
        tracing::info!(
            "restart {id}: new process connected after {:?}",
            t0.elapsed()
        );
        let pid = s.process.as_ref().map(remote::RemoteProcess::pid);
        let new = Arc::new(Remote::new(rcfg, pid, s.control, s.control_hangup));
        if let Some(p) = s.process {
            let (sup, events) = (new.clone(), self.events.clone());
            p.watch(move |end| sup.died(DeathCause::Process(end), &events));
            lock(&self.processes).push(p);
        }
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
                .and_then(|p| p.with_msix(&self.vm, &self.bus.msi_routes))
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
                .and_then(|p| self.put_back(&new, &a.id, a.slot, p));
            if let Err(e) = r {
                problems.push(format!("{}: {e}", a.id));
            }
        }
        let devices = new.device_ids();
        tracing::info!(
            "restart {id}: devices back in their slots after {:?}",
            t0.elapsed()
        );
        problems.extend(self.reattach_drives(&new, &devices));
        // The saved states, now that the devices have their drives again.
        let mut kept = Vec::new();
        for (dev, state) in states {
            if !devices.contains(&dev) {
                continue;
            }
            match self.restore_into(&new, &dev, state) {
                Ok(()) => kept.push(dev),
                Err(e) => problems.push(format!(
                    "{dev}: its state was not restored ({e}); it comes back reset"
                )),
            }
        }
        let mut resumed = Vec::new();
        for (dev, state) in stale {
            if !devices.contains(&dev) {
                continue;
            }
            // A refusal is not a problem: such a device comes back reset,
            // as every device of a dead remote did before the operation
            // existed, and the event's lists say which kept what.
            match self.resume_into(&new, &dev, state) {
                Ok(()) => resumed.push(dev),
                Err(e) => tracing::info!(
                    "restart {id}: {dev} comes back reset: the guest used it since its last save, and it cannot resume from that save ({e})"
                ),
            }
        }
        {
            let mut remotes = lock(&self.remotes);
            if let Some(slot) = remotes.iter_mut().find(|r| r.id == id) {
                *slot = new.clone();
            }
        }
        tracing::info!("restart {id}: states restored after {:?}", t0.elapsed());
        self.arm_one(&new);
        supervisor::spawn(new.clone(), self.bus.pci.clone(), self.events.clone());
        let mut data = json!({"id": id, "pid": pid, "devices": new.device_ids(), "problems": problems,
                   "reason": if automatic.is_some() { "automatic" } else { "operator" },
                   "state-kept": kept, "state-resumed": resumed});
        if let Some(t) = automatic {
            data["recovery-ms"] = (t.elapsed().as_millis() as u64).into();
        }
        self.events.emit("REMOTE_RESTARTED", data);
        Ok(problems)
    }

    /// The VM ends: every remote stops being supervised, and those we
    /// spawned see their control channel close (and exit).
    pub fn stop_remotes(&self) {
        for r in lock(&self.remotes).iter() {
            r.stopped();
        }
        // Standbys end with their pipe (and are reaped here).
        lock(&self.standbys).clear();
    }

    /// Drives of remade `controllers` (in `remote`): each has its config
    /// drives again; make its targets what the operator left them. Returns
    /// what could not be done.
    pub(super) fn reattach_drives(
        &self,
        remote: &Arc<Remote>,
        controllers: &[String],
    ) -> Vec<String> {
        let mut problems = Vec::new();
        let nodes: Vec<(String, Node)> = lock(&self.nodes)
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, node) in nodes {
            let op = match (&node.attached, &node.from_config) {
                // Attached with device_add scsi-hd: attach it again.
                (Some(a), None) if controllers.contains(&a.controller) => (
                    a.controller.clone(),
                    "drive-add",
                    json!({"id": name, "file": node.file, "scsi-id": a.scsi_id, "lun": 0,
                           "read-only": node.read_only}),
                ),
                // A config drive the operator removed: remove it again.
                (None, Some((controller, scsi_id))) if controllers.contains(controller) => {
                    (controller.clone(), "drive-del", json!({"scsi-id": scsi_id}))
                }
                _ => continue,
            };
            let (controller, control, args) = op;
            if let Err(e) = remote.with_control(|c| c.device_control(&controller, control, args)) {
                problems.push(format!("drive {name}: {e}"));
            }
        }
        problems
    }

    /// Puts a restarted remote's proxy in the slot its predecessor had.
    pub(super) fn put_back(
        &self,
        remote: &Arc<Remote>,
        id: &str,
        slot: u8,
        proxy: ProxyFunction,
    ) -> Result<(), String> {
        let proxy = self.supervised(remote, id, proxy);
        self.bus
            .pci
            .replace(slot, Box::new(proxy))
            .map_err(|e| e.to_string())
    }
}
