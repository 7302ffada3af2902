//! `stop`, `cont`, `migrate`, `migrate_cancel`, `query-migrate` and the
//! migration parameters, as QEMU users know them (docs/migration.md). A
//! migration runs on its own thread; `query-migrate` shows where it is.
//! A failure or a cancel leaves the source as it was: running if it ran.
//!
//! - `file:PATH`: the vCPUs stop, the snapshot is written (to a
//!   temporary name, renamed when whole), and the VM stays stopped;
//! - `tcp:`/`unix:`: pre-copy while the guest runs, then stop-and-copy,
//!   and the destination's acknowledgement before the source counts it
//!   done (and stays stopped: "postmigrate").
//!
//! A destination started with `--incoming defer` waits, stopped
//! ("inmigrate"), for `migrate-incoming URI`: its monitor serves
//! meanwhile, so the devices the source hot-added can be added first
//! (`device_add` with the same `id` and `addr`), as with QEMU.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use qmp::{Arguments, QmpError};
use serde_json::{json, Map, Value};

use super::{lock, Monitor};
use crate::exit::ExitReason;
use crate::reset::Machine;
use crate::snapshot::uri::{Listener, MigrationUri, Stream, GO, HANDSHAKE_TIMEOUT, TAKEN};
use crate::snapshot::{handover, Precopy, Round};

/// What `query-migrate` shows.
#[derive(Debug, Default, Clone)]
pub(super) struct Progress {
    status: &'static str,
    started: Option<Instant>,
    total_ms: Option<u128>,
    stopped: Option<Instant>,
    downtime_ms: Option<u128>,
    round: Round,
    device_bytes: u64,
    error: Option<String>,
}

/// `migrate-set-parameters`.
#[derive(Debug, Clone, Copy)]
struct Parameters {
    downtime_limit_ms: u64,
    /// Bytes a second; 0: as fast as the link goes.
    max_bandwidth: u64,
    /// `x-remote-handover`: on a `unix:` migration, hand the remotes this
    /// VMM spawned over to the destination instead of copying their
    /// devices' states (`crate::snapshot::handover`).
    remote_handover: bool,
}

impl Default for Parameters {
    fn default() -> Self {
        // QEMU's default downtime; no bandwidth cap (QEMU caps at 128 MiB/s
        // by default, which on a local link only lengthens the migration).
        Parameters {
            downtime_limit_ms: 300,
            max_bandwidth: 0,
            remote_handover: false,
        }
    }
}

/// Pre-copy rounds before the vCPUs are stopped anyway.
const MAX_ROUNDS: u32 = 30;

/// Where a destination started with `--incoming defer` is.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Incoming {
    /// Not a deferred destination, or restored already.
    #[default]
    No,
    /// Waiting for `migrate-incoming`.
    Waiting,
    /// Listening for, or reading, the stream.
    Receiving,
}

/// The monitor's migration state.
#[derive(Default)]
pub(super) struct Migration {
    progress: Mutex<Progress>,
    cancel: AtomicBool,
    params: Mutex<Parameters>,
    incoming: Mutex<Incoming>,
}

impl Migration {
    fn active(&self) -> bool {
        matches!(lock(&self.progress).status, "setup" | "active")
    }
}

impl Monitor {
    /// Makes this VM a destination that waits for `migrate-incoming`
    /// (`--incoming defer`; its vCPUs are held).
    pub fn await_incoming(&self) {
        *lock(&self.migration.incoming) = Incoming::Waiting;
    }

    /// Whether this VM waits for, or reads, its incoming stream.
    pub(super) fn inmigrate(&self) -> bool {
        *lock(&self.migration.incoming) != Incoming::No
    }

    /// `migrate-incoming {"uri"}`: listens now (a source may connect as
    /// soon as this replies) and restores the machine on a thread; the
    /// guest runs once the source let it go. A failure ends this VM (its
    /// RAM and devices may be half-written), as QEMU's destination exits.
    pub(super) fn migrate_incoming(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        args.allow_only(&["uri"])?;
        let uri = MigrationUri::parse(args.str("uri")?).map_err(QmpError::generic)?;
        let machine = self.machine()?;
        let mut state = lock(&self.migration.incoming);
        match *state {
            Incoming::No => return Err(QmpError::generic(
                "'-incoming' was not specified on the command line (start with --incoming defer)",
            )),
            Incoming::Receiving => {
                return Err(QmpError::generic(
                    "The incoming migration has already been started",
                ))
            }
            Incoming::Waiting => {}
        }
        let listener = uri
            .listen()
            .map_err(|e| QmpError::generic(format!("{e:#}")))?;
        let Some(this) = self.this.get().and_then(std::sync::Weak::upgrade) else {
            return Err(QmpError::generic("the monitor is not armed"));
        };
        std::thread::Builder::new()
            .name("incoming".into())
            .spawn(move || this.run_incoming(&machine, &uri, listener))
            .map_err(|e| QmpError::generic(format!("starting the incoming migration: {e}")))?;
        *state = Incoming::Receiving;
        Ok(json!({}))
    }

    fn run_incoming(&self, machine: &Machine, uri: &MigrationUri, listener: Listener) {
        let remotes = lock(&self.remotes).clone();
        let restored = crate::snapshot::restore_incoming(&machine.parts(remotes), uri, listener);
        *lock(&self.migration.incoming) = Incoming::No;
        match restored {
            Ok(handed) => {
                // The guest runs at once; only its accesses to the
                // handed-over remotes' devices wait for them.
                let held = super::handover::hold(&self.bus.pci, &handed);
                machine.resume();
                self.events.emit("RESUME", json!({}));
                self.adopt_held(handed, held);
            }
            Err(e) => self
                .exit
                .set(ExitReason::Error(format!("migrate-incoming {uri}: {e:#}"))),
        }
    }

    /// Answers the destination's `TAKEN` with [`GO`]: from then on the
    /// guest is the destination's. Should `GO` be lost, the destination
    /// ends and the source stays stopped ("postmigrate"): the guest runs
    /// nowhere rather than twice; `cont` runs it here again.
    ///
    /// Remotes being handed over are marked so, and their processes taken
    /// out of this VMM's list, before `GO` goes: a `quit` meanwhile must
    /// neither shut their channels down nor kill them. Once it went, their
    /// processes are let go (not stopped with this VMM) and this VMM's
    /// connections to their devices are shut down, so that each remote
    /// serves the destination's (`device-connect` waits for them to go).
    /// If it did not go, everything is put back.
    fn go(
        &self,
        stream: &mut Box<dyn Stream>,
        uri: &MigrationUri,
        lent: Option<handover::Lent>,
    ) -> anyhow::Result<()> {
        let mut held = Vec::new();
        for r in lent
            .as_ref()
            .map(handover::Lent::remotes)
            .unwrap_or_default()
        {
            let before = r.handing_over();
            let process = self.take_process(r.pid);
            held.push((r, before, process));
        }
        let sent = stream
            .write_all(&[GO])
            .and_then(|()| stream.flush())
            .with_context(|| format!("handing the VM over to {uri}"));
        if let Err(e) = sent {
            for (r, before, process) in held {
                r.not_handed_over(before);
                lock(&self.processes).extend(process);
            }
            // Dropped: the control channels go back.
            drop(lent);
            return Err(e);
        }
        if let Some(l) = lent {
            l.commit();
        }
        if held.is_empty() {
            return Ok(());
        }
        // The rest on a thread of its own: the destination waits for the
        // connections to go, and the migration counts as done (its
        // downtime ends) now, not after this VMM's device statistics are
        // printed. Should this VMM end first, its connections close with
        // it and the processes, out of its list, are not killed.
        let let_go: Vec<(String, Vec<u8>, Option<crate::remote::RemoteProcess>)> = held
            .into_iter()
            .map(|(r, _, process)| (r.id.clone(), self.slots_of(&r.id), process))
            .collect();
        let pci = self.bus.pci.clone();
        let work = move || {
            for (id, slots, process) in let_go {
                for slot in slots {
                    pci.with_function(slot, |d| d.shutdown());
                }
                if let Some(p) = process {
                    p.release();
                }
                tracing::info!("remote {id} handed over to the destination");
            }
        };
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let spawned = std::thread::Builder::new()
            .name("handed-over".into())
            .spawn(move || {
                if let Ok(work) = rx.recv() {
                    work();
                }
            });
        let work: Box<dyn FnOnce() + Send> = Box::new(work);
        match spawned {
            Ok(_) => {
                if let Err(std::sync::mpsc::SendError(work)) = tx.send(work) {
                    work();
                }
            }
            Err(_) => work(),
        }
        Ok(())
    }

    /// Adopts the remotes the source handed over ([`Self::adopt_all`]),
    /// then lets the guest's accesses to `held` through. A remote that
    /// cannot be adopted ends this VM with the error, as a cut stream
    /// does: its devices have no state here.
    pub fn adopt_held(&self, handed: Vec<crate::snapshot::handover::Received>, held: Vec<u8>) {
        let _release = super::recovery::Released(&self.bus.pci, held);
        if let Err(e) = self.adopt_all(handed) {
            self.exit.set(ExitReason::Error(format!(
                "adopting a handed-over remote: {e:#}"
            )));
        }
    }

    /// Puts the remotes the source handed over in place of those this VMM
    /// spawned for them ([`super::handover`]), supervised from here on.
    fn adopt_all(&self, handed: Vec<crate::snapshot::handover::Received>) -> anyhow::Result<()> {
        let adopter = super::handover::Adopter {
            config: &self.config,
            vm: &self.vm,
            ram: &self.ram,
            bus: &self.bus,
            events: &self.events,
        };
        let t = Instant::now();
        let n = handed.len();
        for h in handed {
            let new = adopter.adopt(h)?;
            let old = {
                let mut remotes = lock(&self.remotes);
                remotes
                    .iter_mut()
                    .find(|r| r.id == new.id)
                    .map(|slot| std::mem::replace(slot, new.clone()))
            };
            if let Some(old) = old {
                old.retire();
                if let Some(mut p) = self.take_process(old.pid) {
                    p.stop(Duration::ZERO);
                }
            }
            self.arm_one(&new);
            crate::supervisor::spawn(new, self.bus.pci.clone(), self.events.clone());
        }
        super::handover::report(n, t);
        Ok(())
    }

    /// Whether the last migration completed (the VM stays stopped after).
    pub(super) fn migration_completed(&self) -> bool {
        lock(&self.migration.progress).status == "completed"
    }

    pub(super) fn machine(&self) -> Result<Arc<Machine>, QmpError> {
        self.machine
            .get()
            .cloned()
            .ok_or_else(|| QmpError::generic("the machine is not running yet"))
    }

    pub(super) fn stop(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        args.allow_only(&[])?;
        let m = self.machine()?;
        if m.hold().map_err(|e| QmpError::generic(format!("{e:#}")))? {
            self.events.emit("STOP", json!({}));
        }
        Ok(json!({}))
    }

    pub(super) fn cont(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        args.allow_only(&[])?;
        if self.inmigrate() {
            return Err(QmpError::generic(
                "the VM waits for its incoming migration (migrate-incoming)",
            ));
        }
        if self.migration.active() {
            return Err(QmpError::generic("a migration is in progress"));
        }
        if self.machine()?.resume() {
            self.events.emit("RESUME", json!({}));
        }
        Ok(json!({}))
    }

    pub(super) fn migrate_set_parameters(
        &self,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        args.allow_only(&["downtime-limit", "max-bandwidth", "x-remote-handover"])?;
        let mut p = *lock(&self.migration.params);
        if let Some(v) = args.value("downtime-limit") {
            p.downtime_limit_ms = v
                .as_u64()
                .filter(|&ms| (1..=2_000_000).contains(&ms))
                .ok_or_else(|| {
                    QmpError::generic(
                        "Parameter 'downtime_limit' expects an integer in the range of 1 to 2000000 milliseconds",
                    )
                })?;
        }
        if let Some(v) = args.value("max-bandwidth") {
            p.max_bandwidth = v
                .as_u64()
                .ok_or_else(|| QmpError::invalid_parameter_type("max-bandwidth", "integer"))?;
        }
        if let Some(v) = args.value("x-remote-handover") {
            p.remote_handover = v
                .as_bool()
                .ok_or_else(|| QmpError::invalid_parameter_type("x-remote-handover", "bool"))?;
        }
        *lock(&self.migration.params) = p;
        Ok(json!({}))
    }

    pub(super) fn query_migrate_parameters(
        &self,
        args: &Map<String, Value>,
    ) -> Result<Value, QmpError> {
        args.allow_only(&[])?;
        let p = *lock(&self.migration.params);
        Ok(
            json!({"downtime-limit": p.downtime_limit_ms, "max-bandwidth": p.max_bandwidth,
                  "x-remote-handover": p.remote_handover}),
        )
    }

    pub(super) fn migrate(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        args.allow_only(&["uri", "detach"])?;
        let uri = MigrationUri::parse(args.str("uri")?).map_err(QmpError::generic)?;
        if self.inmigrate() {
            return Err(QmpError::generic(
                "the VM waits for its incoming migration: it has nothing to migrate yet",
            ));
        }
        // Read once: a `migrate-set-parameters` during the migration
        // does not change it.
        let handover = lock(&self.migration.params).remote_handover;
        if handover && !matches!(uri, MigrationUri::Unix(_)) {
            return Err(QmpError::generic(
                "x-remote-handover passes the remotes' sockets to the destination: it needs a unix: URI",
            ));
        }
        let machine = self.machine()?;
        {
            let mut p = lock(&self.migration.progress);
            if matches!(p.status, "setup" | "active") {
                return Err(QmpError::generic("There's a migration process in progress"));
            }
            let remotes = lock(&self.remotes).clone();
            crate::snapshot::check_savable(&machine.parts(remotes))
                .map_err(|e| QmpError::generic(format!("{e:#}")))?;
            *p = Progress {
                status: "setup",
                started: Some(Instant::now()),
                ..Progress::default()
            };
        }
        self.migration.cancel.store(false, Ordering::SeqCst);
        let Some(this) = self.this.get().and_then(std::sync::Weak::upgrade) else {
            return Err(QmpError::generic("the monitor is not armed"));
        };
        self.events.emit("MIGRATION", json!({"status": "setup"}));
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || this.run_migration(&machine, uri, handover))
            .map_err(|e| QmpError::generic(format!("starting the migration: {e}")))?;
        Ok(json!({}))
    }

    pub(super) fn migrate_cancel(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        args.allow_only(&[])?;
        self.migration.cancel.store(true, Ordering::SeqCst);
        Ok(json!({}))
    }

    pub(super) fn query_migrate(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        args.allow_only(&[])?;
        let p = lock(&self.migration.progress).clone();
        if p.status.is_empty() {
            return Ok(json!({}));
        }
        let page = crate::snapshot::ram::PAGE;
        let s = p.round.sent;
        let mut v = json!({
            "status": p.status,
            "ram": {
                "transferred": p.round.stream_bytes,
                "total": s.data_bytes + s.zero_bytes,
                "duplicate": s.zero_bytes / page,
                "normal": s.data_bytes / page,
                "normal-bytes": s.data_bytes,
                "dirty-sync-count": p.round.rounds,
                "remaining": p.round.dirty_bytes,
                "mbps": p.round.bytes_per_second * 8.0 / 1e6,
            },
            "device-state-bytes": p.device_bytes,
        });
        // A live migration's (a snapshot is all stop-and-copy).
        if p.stopped.is_some() && p.round.rounds > 0 {
            let s = p.round.stop_and_copy;
            // Ours: where the downtime went.
            v["stop-and-copy"] = json!({
                "devices-ms": s.devices_ms,
                "ram-ms": s.ram_ms,
                "acknowledged-ms": s.acknowledged_ms,
            });
        }
        let elapsed = p
            .total_ms
            .or_else(|| p.started.map(|t| t.elapsed().as_millis()));
        if let Some(t) = elapsed {
            v["total-time"] = json!(t);
        }
        if let Some(d) = p.downtime_ms {
            v["downtime"] = json!(d);
        }
        if let Some(e) = p.error {
            v["error-desc"] = json!(e);
        }
        Ok(v)
    }

    fn set_status(&self, status: &'static str) {
        lock(&self.migration.progress).status = status;
        self.events.emit("MIGRATION", json!({"status": status}));
    }

    /// The migration thread: the stream, then either a VM left stopped
    /// (done) or one that runs again as it did (failed or cancelled).
    fn run_migration(&self, machine: &Machine, uri: MigrationUri, handover: bool) {
        let _one = lock(&self.hotplug);
        self.set_status("active");
        let was_running = !machine.is_held();
        let result = if uri.is_live() {
            self.migrate_live(machine, &uri, handover)
        } else {
            self.stop_for_migration(machine)
                .and_then(|()| self.write_snapshot(machine, &uri))
        };
        if result.is_err() && was_running && machine.resume() {
            self.events.emit("RESUME", json!({}));
        }
        let mut p = lock(&self.migration.progress);
        p.total_ms = p.started.map(|t| t.elapsed().as_millis());
        match result {
            Ok(()) => {
                p.downtime_ms = p.stopped.map(|t| t.elapsed().as_millis());
                drop(p);
                self.set_status("completed");
            }
            Err(e) if self.migration.cancel.load(Ordering::SeqCst) => {
                tracing::info!("migration cancelled: {e:#}");
                drop(p);
                self.set_status("cancelled");
            }
            Err(e) => {
                tracing::warn!("migration failed: {e:#}");
                p.error = Some(format!("{e:#}"));
                drop(p);
                self.set_status("failed");
            }
        }
    }

    /// Stops the vCPUs for the stream's last part (`STOP` if they ran) and
    /// notes when: the downtime starts there.
    fn stop_for_migration(&self, machine: &Machine) -> anyhow::Result<()> {
        let was_running = machine
            .hold()
            .map_err(|e| anyhow::anyhow!("stopping the vCPUs: {e:#}"))?;
        lock(&self.migration.progress).stopped = Some(Instant::now());
        if was_running {
            self.events.emit("STOP", json!({}));
        }
        Ok(())
    }

    fn writer<W: Write>(&self, inner: W) -> Throttled<'_, W> {
        Throttled {
            inner,
            cancel: &self.migration.cancel,
            max_bandwidth: lock(&self.migration.params).max_bandwidth,
            start: Instant::now(),
            bytes: 0,
        }
    }

    fn write_snapshot(&self, machine: &Machine, uri: &MigrationUri) -> anyhow::Result<()> {
        let MigrationUri::File(path) = uri else {
            bail!("{uri} is not a file");
        };
        let path = config::resolve_path(&self.config.base_dir, path);
        let tmp = temp_beside(&path);
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = self.writer(BufWriter::with_capacity(1 << 20, file));
        let remotes = lock(&self.remotes).clone();
        let saved = match crate::snapshot::save(&machine.parts(remotes), &mut w) {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let file = w
            .inner
            .into_inner()
            .map_err(|e| e.into_error())
            .context("writing the snapshot")?;
        file.sync_all().context("syncing the snapshot")?;
        std::fs::rename(&tmp, &path).with_context(|| format!("renaming to {}", path.display()))?;
        let mut p = lock(&self.migration.progress);
        p.round.sent = saved.ram;
        p.round.stream_bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
        p.device_bytes = saved.device_bytes;
        tracing::info!(
            "snapshot {}: {} MiB of RAM with data, {} device state bytes",
            path.display(),
            saved.ram.data_bytes >> 20,
            saved.device_bytes
        );
        Ok(())
    }

    /// Pre-copy to a destination that listens, then stop-and-copy; done
    /// once the destination says it took the VM.
    fn migrate_live(
        &self,
        machine: &Machine,
        uri: &MigrationUri,
        handover: bool,
    ) -> anyhow::Result<()> {
        let mut stream = uri.connect()?;
        let params = *lock(&self.migration.params);
        let precopy = Precopy {
            downtime: Duration::from_millis(params.downtime_limit_ms),
            max_rounds: MAX_ROUNDS,
        };
        let remotes = lock(&self.remotes).clone();
        let mut parts = machine.parts(remotes);
        parts.handover = handover;
        let mut w = self.writer(BufWriter::with_capacity(1 << 20, &mut stream));
        let stop = || self.stop_for_migration(machine);
        let mut progress = |r: &Round| lock(&self.migration.progress).round = *r;
        let saved = crate::snapshot::save_live(&parts, &mut w, precopy, stop, &mut progress)?;
        w.flush()?;
        drop(w);
        lock(&self.migration.progress).device_bytes = saved.device_bytes;
        let t = Instant::now();
        let taken = wait_taken(&mut stream, uri, &saved.offered)
            .and_then(|lent| self.go(&mut stream, uri, lent));
        let mut p = lock(&self.migration.progress);
        p.round.stop_and_copy.acknowledged_ms = t.elapsed().as_secs_f64() * 1e3;
        if std::env::var_os("HOST_STATS").is_some() {
            let s = p.round.stop_and_copy;
            eprintln!(
                "host-stats: migration rounds={} stop_devices_ms={:.1} stop_ram_ms={:.1} acknowledged_ms={:.1}",
                p.round.rounds, s.devices_ms, s.ram_ms, s.acknowledged_ms
            );
        }
        taken
    }
}

/// Waits for the destination's [`TAKEN`] (bounded). Remotes `offered`
/// in the stream are lent when the destination asks for their sockets
/// ([`handover::ASK`]) and released once it took the VM; they come back
/// as the [`handover::Lent`] for [`Monitor::go`]. On any error they are
/// given back (the `Lent` drops), and the source runs on.
fn wait_taken(
    stream: &mut Box<dyn Stream>,
    uri: &MigrationUri,
    offered: &[Arc<crate::supervisor::Remote>],
) -> anyhow::Result<Option<handover::Lent>> {
    stream.set_read_deadline(HANDSHAKE_TIMEOUT)?;
    let mut b = [0u8; 1];
    let mut lent = None;
    let mut read = stream.read(&mut b);
    if !offered.is_empty() && matches!(read, Ok(1)) && b[0] == handover::ASK {
        let sock = stream
            .unix()
            .context("the remotes' sockets need a unix: migration")?;
        lent = Some(handover::send_sockets(sock, offered)?);
        read = stream.read(&mut b);
    }
    match read {
        Ok(1) if b[0] == TAKEN => {
            if !offered.is_empty() && lent.is_none() {
                // Its devices' states were not in the stream: a
                // destination that runs without the remotes has no devices.
                bail!("the destination at {uri} took the VM without the remotes offered to it");
            }
            if let Some(l) = &mut lent {
                l.release()?;
            }
            Ok(lent)
        }
        Ok(_) => bail!("the destination at {uri} did not take the VM (it closed the stream)"),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            bail!("the destination at {uri} did not answer within {HANDSHAKE_TIMEOUT:?}")
        }
        Err(e) => bail!("the destination at {uri} did not take the VM: {e}"),
    }
}

/// `PATH.tmp-PID`: the stream is written there and renamed when whole, so
/// a failed or cancelled snapshot never leaves a partial file at PATH.
fn temp_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// The stream's writer: fails once the migration is cancelled, and keeps
/// to `max-bandwidth`.
struct Throttled<'a, W> {
    inner: W,
    cancel: &'a AtomicBool,
    max_bandwidth: u64,
    start: Instant,
    bytes: u64,
}

impl<W: Write> Write for Throttled<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            // Not `Interrupted`: `write_all` would try again forever.
            return Err(std::io::Error::other("migration cancelled"));
        }
        let n = self.inner.write(buf)?;
        self.bytes += n as u64;
        if self.max_bandwidth > 0 {
            let due = Duration::from_secs_f64(self.bytes as f64 / self.max_bandwidth as f64);
            let ahead = due.saturating_sub(self.start.elapsed());
            // In slices, so that a cancel is seen soon.
            let until = Instant::now() + ahead;
            while Instant::now() < until && !self.cancel.load(Ordering::Relaxed) {
                std::thread::sleep((until - Instant::now()).min(Duration::from_millis(20)));
            }
        }
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partial_snapshot_is_never_at_the_path() {
        let t = temp_beside(Path::new("dir/vm.snap"));
        assert_eq!(t.parent(), Some(Path::new("dir")));
        assert!(t.to_string_lossy().starts_with("dir/vm.snap.tmp-"));
    }

    #[test]
    fn the_writer_keeps_to_the_bandwidth_and_stops_on_cancel() {
        let cancel = AtomicBool::new(false);
        let mut w = Throttled {
            inner: Vec::new(),
            cancel: &cancel,
            max_bandwidth: 1 << 20,
            start: Instant::now(),
            bytes: 0,
        };
        let t = Instant::now();
        w.write_all(&[0u8; 256 << 10]).unwrap();
        // A quarter of a second's worth at 1 MiB/s.
        assert!(
            t.elapsed() >= Duration::from_millis(240),
            "{:?}",
            t.elapsed()
        );
        cancel.store(true, Ordering::SeqCst);
        let e = w.write_all(&[0u8; 16]).unwrap_err();
        assert_eq!(e.to_string(), "migration cancelled");
    }
}
