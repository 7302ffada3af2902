//! `stop`, `cont`, `migrate`, `migrate_cancel` and `query-migrate`, as
//! QEMU users know them (docs/migration.md). A migration runs on its own
//! thread; `query-migrate` shows where it is. A failure or a cancel
//! leaves the source as it was: running if it ran.

use std::fs::File;
use std::io::BufWriter;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Context;
use qmp::{Arguments, QmpError};
use serde_json::{json, Map, Value};

use super::{lock, Monitor};
use crate::reset::Machine;

/// Where a migration goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrationUri {
    /// `file:PATH`: a snapshot of the stopped VM.
    File(PathBuf),
}

impl std::fmt::Display for MigrationUri {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MigrationUri::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl MigrationUri {
    /// Parses QEMU's URI syntax; the error says what is supported.
    pub fn parse(uri: &str) -> Result<Self, String> {
        match uri.split_once(':') {
            Some(("file", path)) if !path.is_empty() => Ok(MigrationUri::File(path.into())),
            _ => Err(format!(
                "Migration URI '{uri}' is not supported: this VMM migrates to file:PATH"
            )),
        }
    }
}

/// What `query-migrate` shows.
#[derive(Debug, Default, Clone)]
pub(super) struct Progress {
    status: &'static str,
    started: Option<Instant>,
    total_ms: Option<u128>,
    downtime_ms: Option<u128>,
    ram_transferred: u64,
    ram_zero: u64,
    ram_total: u64,
    device_bytes: u64,
    error: Option<String>,
}

/// The monitor's migration state.
#[derive(Default)]
pub(super) struct Migration {
    progress: Mutex<Progress>,
    cancel: AtomicBool,
}

impl Migration {
    fn active(&self) -> bool {
        matches!(lock(&self.progress).status, "setup" | "active")
    }
}

impl Monitor {
    /// Whether the last migration completed (the VM stays stopped after).
    pub(super) fn migration_completed(&self) -> bool {
        lock(&self.migration.progress).status == "completed"
    }

    fn machine(&self) -> Result<Arc<Machine>, QmpError> {
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
        if self.migration.active() {
            return Err(QmpError::generic("a migration is in progress"));
        }
        if self.machine()?.resume() {
            self.events.emit("RESUME", json!({}));
        }
        Ok(json!({}))
    }

    pub(super) fn migrate(&self, args: &Map<String, Value>) -> Result<Value, QmpError> {
        args.allow_only(&["uri", "detach"])?;
        let uri = MigrationUri::parse(args.str("uri")?).map_err(QmpError::generic)?;
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
            .spawn(move || this.run_migration(&machine, uri))
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
        let mut v = json!({
            "status": p.status,
            "ram": {
                "transferred": p.ram_transferred,
                "total": p.ram_total,
                "duplicate": p.ram_zero / crate::snapshot::ram::PAGE,
                "normal": p.ram_transferred / crate::snapshot::ram::PAGE,
                "normal-bytes": p.ram_transferred,
            },
            "device-state-bytes": p.device_bytes,
        });
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

    /// The migration thread: stop the vCPUs, write the stream, and either
    /// leave the VM stopped (done: QEMU's "postmigrate") or let it run
    /// again as it did (failed or cancelled).
    fn run_migration(&self, machine: &Machine, uri: MigrationUri) {
        let _one = lock(&self.hotplug);
        self.set_status("active");
        let t_stop = Instant::now();
        let result = machine
            .hold()
            .map_err(|e| anyhow::anyhow!("stopping the vCPUs: {e:#}"))
            .and_then(|was_running| {
                if was_running {
                    self.events.emit("STOP", json!({}));
                }
                self.write_migration(machine, &uri)
                    .map(|()| was_running)
                    .inspect_err(|_| {
                        if was_running && machine.resume() {
                            self.events.emit("RESUME", json!({}));
                        }
                    })
            });
        let mut p = lock(&self.migration.progress);
        p.total_ms = p.started.map(|t| t.elapsed().as_millis());
        match result {
            Ok(_) => {
                p.downtime_ms = Some(t_stop.elapsed().as_millis());
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

    fn write_migration(&self, machine: &Machine, uri: &MigrationUri) -> anyhow::Result<()> {
        let MigrationUri::File(path) = uri;
        let path = config::resolve_path(&self.config.base_dir, path);
        let tmp = temp_beside(&path);
        let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = Cancellable {
            inner: BufWriter::with_capacity(1 << 20, file),
            cancel: &self.migration.cancel,
        };
        let remotes = lock(&self.remotes).clone();
        let saved = crate::snapshot::save(&machine.parts(remotes), &mut w);
        let saved = match saved {
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
        p.ram_transferred = saved.ram.data_bytes;
        p.ram_zero = saved.ram.zero_bytes;
        p.ram_total = saved.ram.data_bytes + saved.ram.zero_bytes;
        p.device_bytes = saved.device_bytes;
        tracing::info!(
            "snapshot {}: {} MiB of RAM with data, {} device state bytes",
            path.display(),
            saved.ram.data_bytes >> 20,
            saved.device_bytes
        );
        Ok(())
    }
}

/// `PATH.tmp-PID`: the stream is written there and renamed when whole, so
/// a failed or cancelled snapshot never leaves a partial file at PATH.
fn temp_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".tmp-{}", std::process::id()));
    path.with_file_name(name)
}

/// A writer that fails once the migration is cancelled.
struct Cancellable<'a, W> {
    inner: W,
    cancel: &'a AtomicBool,
}

impl<W: std::io::Write> std::io::Write for Cancellable<'_, W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Interrupted,
                "migration cancelled",
            ));
        }
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_qemu_users_write() {
        assert_eq!(
            MigrationUri::parse("file:/tmp/vm.snap"),
            Ok(MigrationUri::File("/tmp/vm.snap".into()))
        );
        let e = MigrationUri::parse("exec:cat").unwrap_err();
        assert!(e.contains("file:PATH"), "{e}");
        assert!(MigrationUri::parse("file:").is_err());
        assert!(MigrationUri::parse("nothing").is_err());
    }

    #[test]
    fn a_partial_snapshot_is_never_at_the_path() {
        let t = temp_beside(Path::new("dir/vm.snap"));
        assert_eq!(t.parent(), Some(Path::new("dir")));
        assert!(t.to_string_lossy().starts_with("dir/vm.snap.tmp-"));
    }
}
