//! The control channel (`serve --control FD`): the VMM adds, removes and
//! operates devices of this remote while it runs ([`channel::control`]).
//!
//! - `ping` → `{"failed": [{"device", "reason"}]}`: devices whose plugin
//!   failed (panicked), so the VMM can report them.
//! - `device-add` (+ one fd, a connected socket): builds the device through
//!   the same path as config devices ([`devices::build_one`]) and serves it
//!   on that socket with this remote's protocol, on its own thread.
//! - `device-del`: shuts the device's connection down, waits for its
//!   thread, shuts the device down and forgets it. Only devices added on
//!   this channel can be removed: a config device's listener cannot be
//!   stopped safely (see docs/channel.md).
//! - `device-control`: [`PciFunction::control`](plugin_api::function::PciFunction::control)
//!   under the device's lock, so it never overlaps a guest access.
//! - `device-doorbells`: the writes the device lets the VMM deliver
//!   through KVM ioeventfds (`Device::doorbells`, checked).
//! - `ring-setup` (+ three fds: the ring's memory, its kick and reply
//!   eventfds, then one eventfd per doorbell listed in `doorbells`):
//!   serves the device's BAR accesses from the shared-memory access ring
//!   too, and its doorbells ([`crate::ring`]); a second setup replaces
//!   the first.
//! - `device-connect` (+ one fd, a connected socket): serves an existing
//!   device on a new connection once its current client has gone (the
//!   device keeps its state; its access ring, the leaving client's, stops
//!   now): how a VMM that was handed this remote reaches its devices.
//! - `handover-prepare`: every device's ring drained and its own work
//!   finished (bounded), before its guest's last RAM is copied.
//! - `handover-release`: the process no longer dies with the VMM that
//!   spawned it (its parent-death signal is cleared), so that VMM may end
//!   once another took this remote over (docs/migration.md).
//!
//! When the control socket reaches EOF the VMM is gone, and so is the
//! reason to run: the caller exits.

use std::collections::BTreeMap;
use std::net::Shutdown;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use channel::control::{serve_control, str_arg};
use serde_json::{json, Value};

use crate::devices::{build_one, DeviceSpec, RemoteDevice};
use crate::dialect::Dialect;

/// How long `device-del` waits for the connection thread to end.
const JOIN_TIMEOUT: Duration = Duration::from_secs(5);

struct Entry {
    dev: Arc<RemoteDevice>,
    /// For devices added here: a handle on the connection (to shut it
    /// down) and the thread serving it. `None` for config devices: their
    /// listener or connection is the config path's; removing one shuts the
    /// device down (it gets no call after that, see `PciFunction`) and
    /// whatever still reaches it reads all-ones.
    served: Option<(UnixStream, JoinHandle<()>)>,
    /// The device's access ring, once the VMM set one up.
    ring: Option<crate::ring::RingThread>,
}

/// The devices the control channel knows, and how to make new ones.
pub struct Control {
    devices: BTreeMap<String, Entry>,
    plugin_dirs: Vec<PathBuf>,
    /// Relative paths in added devices' settings are relative to this
    /// (the config file's directory, as for config devices).
    base_dir: PathBuf,
    dialect: Dialect,
    /// Tell devices that their ring's writes are posted (`[[remote]]
    /// posted-writes`).
    posted_writes: bool,
}

impl Control {
    /// `config_devices`: the devices built from the config, reachable by
    /// `device-control`.
    pub fn new(
        config_devices: &[Arc<RemoteDevice>],
        plugin_dirs: Vec<PathBuf>,
        base_dir: PathBuf,
        dialect: Dialect,
    ) -> Self {
        let devices = config_devices
            .iter()
            .map(|d| {
                (
                    d.id.clone(),
                    Entry {
                        dev: d.clone(),
                        served: None,
                        ring: None,
                    },
                )
            })
            .collect();
        Control {
            devices,
            plugin_dirs,
            base_dir,
            dialect,
            posted_writes: false,
        }
    }

    /// Devices are told that the writes their access ring delivers are
    /// posted (`[[remote]] posted-writes`, `control::POSTED_WRITES`).
    pub fn with_posted_writes(mut self, on: bool) -> Self {
        self.posted_writes = on;
        self
    }

    /// Serves the control protocol on `stream` until EOF.
    pub fn run(mut self, stream: UnixStream) -> Result<(), channel::control::ControlError> {
        let r = serve_control(stream, |op, req, fds| self.handle(op, req, fds));
        // The VMM is gone: stop what we started, in order.
        let ids: Vec<String> = self.devices.keys().cloned().collect();
        for id in ids {
            if self.devices.get(&id).is_some_and(|e| e.served.is_some()) {
                let _ = self.device_del(&id);
            } else if let Some(ring) = self.devices.get_mut(&id).and_then(|e| e.ring.take()) {
                // A config device keeps its socket, but its ring thread
                // was ours.
                ring.stop(JOIN_TIMEOUT);
            }
        }
        r
    }

    fn handle(&mut self, op: &str, req: &Value, fds: Vec<OwnedFd>) -> Result<Value, String> {
        if !matches!(op, "device-add" | "ring-setup" | "device-connect") && !fds.is_empty() {
            return Err(format!("`{op}` takes no file descriptors"));
        }
        match op {
            "ping" => Ok(self.ping()),
            "device-add" => self.device_add(req, fds),
            "ring-setup" => self.ring_setup(req, fds),
            "device-doorbells" => self.device_doorbells(str_arg(req, "device")?),
            "device-del" => self.device_del(str_arg(req, "device")?),
            "device-control" => self.device_control(req),
            "device-save" => self.device_save(req),
            "device-restore" => self.device_restore(req),
            "dirty-log" => self.dirty_log(req),
            "device-connect" => self.device_connect(req, fds),
            "handover-prepare" => self.handover_prepare(),
            "handover-release" => crate::main_thread::clear_parent_death_signal()
                .map(|()| json!({}))
                .map_err(|e| format!("handover-release: {e}")),
            _ => Err(format!(
                "unknown op `{op}` (ping, device-add, device-del, device-control, device-save, device-restore, dirty-log, device-doorbells, ring-setup, device-connect, handover-prepare, handover-release)"
            )),
        }
    }

    /// The answer to a heartbeat, with the devices whose plugin failed,
    /// so that the VMM can report them (`DEVICE_FAILED`).
    fn ping(&self) -> Value {
        let failed: Vec<Value> = self
            .devices
            .iter()
            .filter_map(|(id, e)| {
                e.dev
                    .failure_now()
                    .map(|reason| json!({"device": id, "reason": reason}))
            })
            .collect();
        json!({ "failed": failed })
    }

    fn device_add(&mut self, req: &Value, fds: Vec<OwnedFd>) -> Result<Value, String> {
        let id = str_arg(req, "device")?;
        let plugin = str_arg(req, "plugin")?;
        let kind = match req.get("kind") {
            None | Some(Value::Null) => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err("`kind` must be a string or null".into()),
        };
        let slot = req
            .get("slot")
            .and_then(Value::as_u64)
            .and_then(|s| u8::try_from(s).ok())
            .ok_or("`slot` must be an integer 0..=255")?;
        let settings = match req.get("settings") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err("`settings` must be TOML text (a string)".into()),
        };
        let sock = one_socket("device-add", fds)?;
        if self.devices.contains_key(id) {
            return Err(format!("device `{id}` already exists"));
        }
        let spec = DeviceSpec {
            id: id.to_owned(),
            plugin: plugin.to_owned(),
            kind,
            slot,
            settings,
            base_dir: self.base_dir.clone(),
        };
        let dev = Arc::new(build_one(&spec, &self.plugin_dirs)?);
        let served = self.serve_on(&dev, sock)?;
        tracing::info!(device = %id, plugin = %dev.plugin_name, "device added");
        self.devices.insert(
            id.to_owned(),
            Entry {
                dev,
                served: Some(served),
                ring: None,
            },
        );
        Ok(json!({}))
    }

    /// `device-connect {"device"}` + a connected socket: serves the
    /// device on it, on a thread of its own, once the client it has now
    /// went away (the device's session lock): its state stays, its DMA
    /// mappings and eventfds are the new client's to give.
    fn device_connect(&mut self, req: &Value, fds: Vec<OwnedFd>) -> Result<Value, String> {
        let id = str_arg(req, "device")?;
        let sock = one_socket("device-connect", fds)?;
        let dev = self
            .devices
            .get(id)
            .map(|e| e.dev.clone())
            .ok_or_else(|| format!("no device `{id}`"))?;
        let served = self.serve_on(&dev, sock)?;
        tracing::info!(device = %id, "device connected again (served once its last client has gone)");
        let Some(entry) = self.devices.get_mut(id) else {
            return Err(format!("no device `{id}`"));
        };
        // An earlier connection's thread ends with its client. Its access
        // ring was that client's: the new one sets up its own, or none.
        entry.served = Some(served);
        if let Some(ring) = entry.ring.take() {
            ring.stop(JOIN_TIMEOUT);
        }
        Ok(json!({}))
    }

    /// Serves `dev` on `sock` with this remote's protocol, on a thread of
    /// its own; returns a handle on the socket (to shut it down) and the
    /// thread.
    fn serve_on(
        &self,
        dev: &Arc<RemoteDevice>,
        sock: UnixStream,
    ) -> Result<(UnixStream, JoinHandle<()>), String> {
        let id = &dev.id;
        let handle = sock
            .try_clone()
            .map_err(|e| format!("device `{id}`: cannot keep a handle on its socket: {e}"))?;
        let (thread_dev, dialect) = (dev.clone(), self.dialect.clone());
        let thread = std::thread::Builder::new()
            .name(format!("conn-{id}"))
            .spawn(move || dialect.serve_stream(thread_dev, sock))
            .map_err(|e| format!("device `{id}`: cannot start its thread: {e}"))?;
        Ok((handle, thread))
    }

    /// `handover-prepare`: each device's ring drained and its own work
    /// finished (each bounded), as `device-save` with `quiesce` does but
    /// without taking the state: the guest is stopped, and its last RAM
    /// goes after this (with what the devices wrote until now).
    fn handover_prepare(&mut self) -> Result<Value, String> {
        let mut busy = Vec::new();
        for (id, entry) in &self.devices {
            drained(id, entry)?;
            if !entry.dev.function().wait_idle(QUIESCE) {
                busy.push(id.clone());
            }
        }
        Ok(json!({ "busy": busy }))
    }

    /// The device's doorbells as its function checked them (the reasons
    /// for any left out go to the log).
    fn declared_doorbells(&self, id: &str) -> Result<Vec<channel::ring::DoorbellKey>, String> {
        let entry = self
            .devices
            .get(id)
            .ok_or_else(|| format!("no device `{id}`"))?;
        let (kept, refused) = entry.dev.function().doorbells();
        for why in refused {
            tracing::warn!(device = %id, "{why}");
        }
        Ok(kept
            .iter()
            .map(|d| channel::ring::DoorbellKey {
                bar: d.bar,
                offset: d.offset,
                len: d.len,
                value: d.value,
            })
            .collect())
    }

    fn device_doorbells(&mut self, id: &str) -> Result<Value, String> {
        let keys = self.declared_doorbells(id)?;
        let list: Vec<Value> = keys.iter().map(channel::control::doorbell_json).collect();
        let outlives = self
            .devices
            .get(id)
            .is_some_and(|e| e.dev.function().state_outlives_doorbells());
        Ok(json!({ "doorbells": list, "state-outlives-doorbells": outlives }))
    }

    fn ring_setup(&mut self, req: &Value, mut fds: Vec<OwnedFd>) -> Result<Value, String> {
        let id = str_arg(req, "device")?;
        let asked = match req.get("doorbells") {
            None => Vec::new(),
            Some(v) => channel::control::parse_doorbells(v)?,
        };
        if fds.len() != 3 + asked.len() {
            return Err(format!(
                "ring-setup takes three file descriptors (memory, kick, reply) and one per doorbell ({}), got {}",
                asked.len(),
                fds.len()
            ));
        }
        // Only doorbells the device declared: a VMM's list is checked
        // against it, so a write the device did not offer is never
        // delivered behind its back.
        let declared = self.declared_doorbells(id)?;
        if let Some(k) = asked.iter().find(|k| !declared.contains(k)) {
            return Err(format!(
                "doorbell BAR{} {:#x} ({} bytes, value {:#x}) is not one the device declared",
                k.bar, k.offset, k.len, k.value
            ));
        }
        let bells: Vec<OwnedFd> = fds.split_off(3);
        let [memory, kick, reply] = <[OwnedFd; 3]>::try_from(fds)
            .map_err(|_| "ring-setup: three ring file descriptors expected".to_string())?;
        let entry = self
            .devices
            .get_mut(id)
            .ok_or_else(|| format!("no device `{id}`"))?;
        if let Some(old) = entry.ring.take() {
            old.stop(JOIN_TIMEOUT);
        }
        let fds = channel::ring::RingFds {
            memory,
            kick,
            reply,
        };
        let doorbells: Vec<(OwnedFd, channel::ring::DoorbellKey)> =
            bells.into_iter().zip(asked).collect();
        let n = doorbells.len();
        entry.ring = Some(crate::ring::start(
            entry.dev.clone(),
            fds,
            doorbells,
            self.dialect.poll(),
            self.posted_writes,
        )?);
        tracing::info!(device = %id, doorbells = n, "access ring set up");
        Ok(json!({}))
    }

    fn device_del(&mut self, id: &str) -> Result<Value, String> {
        let Some(Entry { dev, served, ring }) = self.devices.remove(id) else {
            return Err(format!("no device `{id}`"));
        };
        if let Some(r) = ring {
            if !r.stop(JOIN_TIMEOUT) {
                tracing::error!(device = %id, "ring thread did not end; device left running");
                return Ok(json!({}));
            }
        }
        if let Some((sock, thread)) = served {
            // The serving thread sees EOF and returns; the client sees EOF.
            let _ = sock.shutdown(Shutdown::Both);
            if !crate::join_within(thread, JOIN_TIMEOUT) {
                // A device call that does not return: shutting the device
                // down under it would break the plugin's contract.
                tracing::error!(device = %id, "connection thread did not end; device left running");
                return Ok(json!({}));
            }
        }
        dev.shutdown();
        tracing::info!(device = %id, "device removed");
        Ok(json!({}))
    }

    /// `device-save {"device", "quiesce"?}` → `{"state": HEX}`: the device's
    /// `save_state`, once every access the VMM published on its ring has
    /// been applied (at most [`SAVE_DRAIN`]; a posted write still waiting
    /// would be missing from the state). A state too large for one
    /// control line is refused: the caller restarts the device reset.
    fn device_save(&mut self, req: &Value) -> Result<Value, String> {
        let id = str_arg(req, "device")?;
        let entry = self
            .devices
            .get(id)
            .ok_or_else(|| format!("no device `{id}`"))?;
        drained(id, entry)?;
        if req.get("quiesce").and_then(Value::as_bool) == Some(true) {
            // A migration: the guest is stopped; let the I/O it started
            // finish, so that the state has none in flight (bounded: a
            // device still busy then is saved as it is, and redoes its
            // work when restored).
            entry.dev.function().wait_idle(QUIESCE);
        }
        let state = entry
            .dev
            .function()
            .save_state()
            .map_err(|e| format!("device `{id}`: {}", e.message))?;
        // Hex doubles it; the line also holds the reply's other fields.
        if 2 * state.len() + 256 > channel::control::MAX_LINE {
            return Err(format!(
                "device `{id}`: its state ({} bytes) does not fit a control line",
                state.len()
            ));
        }
        Ok(json!({"state": channel::control::encode_hex(&state)}))
    }

    /// `device-restore {"device", "state": HEX}`: the device's
    /// `restore_state` (which refuses a state it cannot take, unchanged).
    fn device_restore(&mut self, req: &Value) -> Result<Value, String> {
        let id = str_arg(req, "device")?;
        let state = channel::control::decode_hex(str_arg(req, "state")?)?;
        let entry = self
            .devices
            .get(id)
            .ok_or_else(|| format!("no device `{id}`"))?;
        let r = entry
            .dev
            .function()
            .restore_state(&state)
            .map_err(|e| format!("device `{id}`: {}", e.message));
        entry.dev.mirrors.notify();
        r.map(|()| json!({}))
    }

    /// `dirty-log {"device", "action": "start"|"take"|"stop"}`: the
    /// device's DMA dirty log for a migration; `take` answers
    /// `{"runs": [[GPA, LEN], ...]}` and empties it. Runs that would not
    /// fit one control line are answered as everything the device maps
    /// (the caller sends more pages, never fewer).
    fn dirty_log(&mut self, req: &Value) -> Result<Value, String> {
        let id = str_arg(req, "device")?;
        let entry = self
            .devices
            .get(id)
            .ok_or_else(|| format!("no device `{id}`"))?;
        let log = &entry.dev.dirty;
        match str_arg(req, "action")? {
            "start" => log.start(),
            "stop" => log.stop(),
            "take" => {
                let mut runs = log.take();
                // At most about 48 bytes of JSON per run.
                if runs.len() * 48 + 256 > channel::control::MAX_LINE {
                    runs = entry.dev.memory.layout();
                }
                return Ok(json!({ "runs": runs }));
            }
            other => {
                return Err(format!(
                    "dirty-log: unknown action `{other}` (start, take, stop)"
                ))
            }
        }
        Ok(json!({}))
    }

    fn device_control(&mut self, req: &Value) -> Result<Value, String> {
        let id = str_arg(req, "device")?;
        let control = str_arg(req, "control")?;
        let args = req.get("args").cloned().unwrap_or(Value::Null);
        let dev = self
            .devices
            .get(id)
            .map(|e| e.dev.clone())
            .ok_or_else(|| format!("no device `{id}`"))?;
        let r = dev.function().control(control, &args);
        dev.mirrors.notify();
        r
    }
}

/// The one connected socket `op` takes, checked.
fn one_socket(op: &str, fds: Vec<OwnedFd>) -> Result<UnixStream, String> {
    let [fd] = <[OwnedFd; 1]>::try_from(fds).map_err(|v| {
        format!(
            "{op} takes one file descriptor (a connected socket), got {}",
            v.len()
        )
    })?;
    if !crate::sockets::is_stream_socket(fd.as_fd()) {
        return Err(format!("{op}: the file descriptor is not a stream socket"));
    }
    Ok(UnixStream::from(fd))
}

/// Waits until every access the VMM published on the device's ring has
/// been applied (at most [`SAVE_DRAIN`]).
fn drained(id: &str, entry: &Entry) -> Result<(), String> {
    let Some(ring) = &entry.ring else {
        return Ok(());
    };
    let deadline = std::time::Instant::now() + SAVE_DRAIN;
    while !ring.watch.drained() {
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "device `{id}`: accesses still wait on its ring after {SAVE_DRAIN:?}"
            ));
        }
        std::thread::sleep(std::time::Duration::from_micros(200));
    }
    Ok(())
}

/// How long `device-save {"quiesce": true}` waits for the device's own
/// work to finish.
const QUIESCE: std::time::Duration = std::time::Duration::from_secs(5);

/// How long `device-save` waits for the device's ring to drain.
const SAVE_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

/// Takes ownership of the inherited control socket `--control N`.
pub fn inherited_socket(n: std::os::fd::RawFd) -> anyhow::Result<UnixStream> {
    crate::sockets::inherited_socket(n).map(UnixStream::from)
}
