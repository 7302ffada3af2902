//! `virtio-blk`: a modern (virtio 1.x) virtio-blk PCI device as a plugin,
//! on the same block backends as the LSI's SCSI disks (`devices/block`).
//! Linux's `virtio_pci` and `virtio_blk` drive it unmodified.
//!
//! | PCI | value |
//! |-----|-------|
//! | vendor, device | 0x1af4, 0x1042 (virtio, modern block device) |
//! | class | 0x018000 (mass storage, other) |
//! | subsystem | 0x1af4, 0x0002 |
//! | BAR0 | 32-bit memory, 16 KiB: the virtio structures ([`transport`]) |
//! | BAR1 | the MSI-X table and pending bits (the host's) |
//! | interrupt | MSI-X (queues + 1 vectors); INTA, level: high while the ISR has a bit set |
//!
//! Interrupts: MSI-X with one vector for configuration changes and one
//! per queue (the host emulates the table; the device raises vector
//! numbers), or INTx with the ISR for a source the driver gave no vector.
//!
//! Features offered: `VERSION_1`, `EVENT_IDX`, `SEG_MAX`, `BLK_SIZE`, `FLUSH`, `MQ`
//! (with `queues` > 1), `RO` (a read-only drive), `WRITE_ZEROES` (a
//! writable drive) and `DISCARD` (a backend that can deallocate).
//!
//! Control operation: `resize {"size": BYTES}` (QMP `block_resize` with
//! the device's id) grows the image and raises a configuration change
//! interrupt; the driver reads the new capacity.
//!
//! Settings (the device's table in the VM config, see [`Settings`]):
//! `file` (relative paths resolve against the config's directory),
//! `read-only`, `direct`, `serial`, `queues`, `queue-size`, `delay-us`,
//! `event-idx`, `io-threads`.
//!
//! Requests are served by one worker thread per device: a notification
//! (the hottest write of the guest) only wakes it, and reading the ISR
//! never waits for disk I/O. The worker takes requests in batches and
//! runs a batch on up to `io-threads` threads (itself and helpers started
//! with the device, [`pool`]), publishing completions in the queue's
//! order. A reset waits for the batch in flight, so the device never
//! touches the rings of a driver that reset it.

pub mod pool;
pub mod queue;
pub mod request;
pub mod state;
pub mod transport;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use block::{delayed::Delayed, Backend, RawFile};
use plugin_api::control::{self, Value};
use plugin_api::{BarDesc, Device, DeviceDesc, Doorbell, Host, PciIdentity};

use pool::Pool;
use queue::SplitQueue;
use transport::{status, Effect, Transport, ISR_CONFIG, ISR_QUEUE};
use virtio_bindings::virtio_blk as vb;

pub const VENDOR_ID: u16 = 0x1af4;
/// 0x1040 + the virtio device ID of a block device (2).
pub const DEVICE_ID: u16 = 0x1042;
/// Mass storage, other.
pub const CLASS: u32 = 0x01_80_00;

/// Feature bits of a block device (§5.2.3).
pub const F_SEG_MAX: u64 = 1 << vb::VIRTIO_BLK_F_SEG_MAX;
pub const F_RO: u64 = 1 << vb::VIRTIO_BLK_F_RO;
pub const F_BLK_SIZE: u64 = 1 << vb::VIRTIO_BLK_F_BLK_SIZE;
pub const F_FLUSH: u64 = 1 << vb::VIRTIO_BLK_F_FLUSH;
pub const F_MQ: u64 = 1 << vb::VIRTIO_BLK_F_MQ;
pub const F_DISCARD: u64 = 1 << vb::VIRTIO_BLK_F_DISCARD;
pub const F_WRITE_ZEROES: u64 = 1 << vb::VIRTIO_BLK_F_WRITE_ZEROES;
/// `VIRTIO_RING_F_EVENT_IDX`: interrupts and notifications only when the
/// other side asked for them (§2.7.10).
pub const F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Segments one DISCARD or WRITE_ZEROES request may carry.
pub const MAX_DISCARD_SEGMENTS: u32 = 1;
/// Sectors one DISCARD or WRITE_ZEROES segment may cover (2 GiB).
pub const MAX_ZERO_SECTORS: u32 = 1 << 22;

fn one() -> u16 {
    1
}

fn default_queue_size() -> u16 {
    256
}

/// The device's settings: its `[[device]]` table less the placement keys.
///
/// ```toml
/// [[device]]
/// id = "vd0"
/// remote = "storage"
/// plugin = "virtio-blk"
/// slot = 5
/// file = "disk.img"   # raw image (or block device)
/// read-only = false
/// direct = false      # O_DIRECT
/// serial = "VD0"      # what GET_ID returns (at most 20 bytes)
/// queues = 1          # 1..=16
/// queue-size = 256    # a power of two, 2..=1024
/// delay-us = 0        # testing: each read, write and flush waits this long
/// event-idx = true    # offer VIRTIO_RING_F_EVENT_IDX (QEMU's `event_idx`)
/// io-threads = 2      # 1..=8: threads a batch of requests runs on
/// ```
#[derive(plugin_api::Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(
    crate = "plugin_api::serde",
    deny_unknown_fields,
    rename_all = "kebab-case"
)]
pub struct Settings {
    pub file: String,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub direct: bool,
    pub serial: Option<String>,
    #[serde(default = "one")]
    pub queues: u16,
    #[serde(default = "default_queue_size")]
    pub queue_size: u16,
    #[serde(default)]
    pub delay_us: u64,
    /// Offer `VIRTIO_RING_F_EVENT_IDX`; off, the driver notifies for
    /// every request and the device interrupts once per pass.
    #[serde(default = "yes")]
    pub event_idx: bool,
    /// Threads a batch of requests taken from a queue runs on (the
    /// worker and `io-threads - 1` helpers); completions are published in
    /// the queue's order all the same.
    #[serde(default = "two")]
    pub io_threads: u8,
}

fn yes() -> bool {
    true
}

fn two() -> u8 {
    2
}

/// Requests taken from a queue at once.
const BATCH: usize = 32;
/// A batch runs on more than one thread from this many requests (a
/// handoff costs about what a 4 KiB request does).
const PARALLEL_FROM: usize = 4;

/// What a request needs of the negotiated features.
#[derive(Clone, Copy)]
struct Negotiated {
    discard: bool,
    write_zeroes: bool,
}

/// `resize`'s arguments.
#[derive(plugin_api::Deserialize)]
#[serde(crate = "plugin_api::serde", deny_unknown_fields)]
struct ResizeArgs {
    size: u64,
}

/// `resize`'s reply: the new capacity.
#[derive(plugin_api::Serialize)]
#[serde(crate = "plugin_api::serde")]
struct Resized {
    sectors: u64,
}

/// The registers and what the line shows.
struct Regs {
    t: Transport,
    /// Bumped by every reset (the worker drops work of an older one).
    generation: u64,
    /// The INTx level last given to the host.
    line: bool,
}

/// The device's side of the rings, held by the worker while it serves
/// them (and by a reset, which so waits for the request in flight).
struct Rings {
    generation: u64,
    /// Set up from the queues' configuration at DRIVER_OK.
    queues: Vec<SplitQueue>,
    /// A state was restored: before serving, take each queue's indexes
    /// from its used ring in guest RAM (the state may be older than the
    /// guest's last requests) and raise each queue's interrupt once.
    resync: bool,
}

#[derive(Default)]
struct Kick {
    pending: bool,
    stop: bool,
}

struct Shared {
    regs: Mutex<Regs>,
    rings: Mutex<Rings>,
    kick: Mutex<Kick>,
    kicked: Condvar,
    host: Host,
    backend: Box<dyn Backend>,
    serial: Vec<u8>,
    stats: Stats,
}

/// What the `stats` control operation reports.
#[derive(Default)]
struct Stats {
    /// Requests taken from the queues.
    requests: AtomicU64,
    /// Of those, the ones a helper thread ran.
    on_helpers: AtomicU64,
    /// Batches taken from a queue.
    batches: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Gives the host the level the ISR implies.
    fn update_line(&self, r: &mut Regs, force: bool) {
        let level = r.t.isr != 0;
        if level != r.line || force {
            r.line = level;
            self.host.set_intx(level);
        }
    }

    fn kick(&self) {
        lock(&self.kick).pending = true;
        self.kicked.notify_one();
    }

    /// The worker's loop: serves the queues at every kick until stopped.
    fn work(self: &Arc<Self>, pool: &Pool) {
        loop {
            {
                let mut k = lock(&self.kick);
                while !k.pending && !k.stop {
                    k = self
                        .kicked
                        .wait_timeout(k, Duration::from_secs(1))
                        .map(|(g, _)| g)
                        .unwrap_or_else(|e| e.into_inner().0);
                }
                if k.stop {
                    return;
                }
                k.pending = false;
            }
            self.serve(pool);
        }
    }

    /// Resets the device (the caller holds the registers): waits for the
    /// batch in flight, forgets the rings, clears the registers.
    fn reset(&self, r: &mut Regs) {
        let mut rings = lock(&self.rings);
        rings.queues.clear();
        rings.resync = false;
        rings.generation += 1;
        r.generation = rings.generation;
        drop(rings);
        r.t.reset();
        self.update_line(r, true);
    }

    /// The device configuration structure (`virtio_blk_config`).
    fn device_config(&self, queues: u16, queue_size: u16) -> [u8; transport::DEVICE_LEN as usize] {
        let mut b = [0u8; transport::DEVICE_LEN as usize];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &(self.backend.size() / request::SECTOR).to_le_bytes());
        // seg_max: the chain also carries the header and the status.
        put(12, &u32::from(queue_size.saturating_sub(2)).to_le_bytes());
        put(20, &512u32.to_le_bytes());
        put(34, &queues.to_le_bytes());
        put(36, &MAX_ZERO_SECTORS.to_le_bytes());
        put(40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(44, &1u32.to_le_bytes());
        put(48, &MAX_ZERO_SECTORS.to_le_bytes());
        put(52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
        put(56, &[u8::from(self.backend.supports_discard())]);
        b
    }

    /// Serves every ready queue until it is empty. Interrupts: without
    /// `EVENT_IDX`, one per queue at the end of the pass; with it, as soon
    /// as a completion reaches the used index the driver asked for
    /// (`used_event`), so the driver can complete and queue more while
    /// the device serves on, and a queue the device keeps finding work in
    /// costs the driver no notification.
    fn serve(self: &Arc<Self>, pool: &Pool) {
        let (generation, configs, discard, write_zeroes, event_idx) = {
            let r = lock(&self.regs);
            if !r.t.driver_ok() {
                return;
            }
            (
                r.generation,
                r.t.queues.clone(),
                r.t.negotiated(F_DISCARD),
                r.t.negotiated(F_WRITE_ZEROES),
                r.t.negotiated(F_EVENT_IDX),
            )
        };
        let negotiated = Negotiated {
            discard,
            write_zeroes,
        };
        // Queues whose interrupt is due at the end of the pass.
        let mut due = vec![false; configs.len()];
        let mut broken: Option<String> = None;
        {
            let mut rings = lock(&self.rings);
            if rings.generation != generation {
                return;
            }
            if rings.queues.is_empty() {
                rings.queues = configs.iter().map(|c| SplitQueue::new(*c)).collect();
            }
            // A queue the driver enabled after DRIVER_OK (allowed, §4.1.4.3)
            // starts here; one the device already serves is fixed.
            for (q, c) in rings.queues.iter_mut().zip(&configs) {
                if !q.cfg.ready && c.ready {
                    *q = SplitQueue::new(*c);
                }
            }
            let resync = std::mem::take(&mut rings.resync);
            for (i, q) in rings.queues.iter_mut().enumerate() {
                q.event_idx = event_idx;
                if resync && q.cfg.ready {
                    if let Err(e) = q.resync(&self.host) {
                        broken = Some(format!("queue {i}: {e}"));
                    }
                    // The interrupt of a completion the old process
                    // published but did not signal (a spurious one is
                    // harmless: the driver finds nothing new).
                    due[i] = true;
                }
            }
            for (i, q) in rings.queues.iter_mut().enumerate() {
                if broken.is_some() {
                    break;
                }
                if !q.cfg.ready {
                    continue;
                }
                // A vector the device may signal from here (a reset, which
                // could change it, waits for the rings); INTx needs the
                // registers, so its ISR bit waits for the end of the pass.
                let vector = configs
                    .get(i)
                    .map(|c| c.msix_vector)
                    .filter(|v| *v != transport::NO_VECTOR);
                if let Err(e) = self.serve_queue(q, negotiated, pool, vector, &mut due[i]) {
                    broken = Some(format!("queue {i}: {e}"));
                }
            }
        }
        let mut r = lock(&self.regs);
        if r.generation != generation {
            return;
        }
        if let Some(why) = broken {
            // The driver broke a ring: stop serving until it resets us,
            // and say so through a configuration interrupt (§2.1.2).
            self.host
                .warn(&format!("virtio-blk: {why}; the device needs a reset"));
            r.t.status |= status::NEEDS_RESET;
            self.config_interrupt(&mut r);
        }
        for (i, due) in due.into_iter().enumerate() {
            if !due {
                continue;
            }
            match r.t.queues.get(i).map(|q| q.msix_vector) {
                Some(v) if v != transport::NO_VECTOR => self.host.msix_notify(v),
                _ => r.t.isr |= ISR_QUEUE,
            }
        }
        self.update_line(&mut r, false);
    }

    /// Serves one queue until it is empty, in batches of up to [`BATCH`]
    /// requests run on up to `io-threads` threads ([`Self::execute_all`]).
    /// Completions are published in the queue's order, so the used ring
    /// still shows every request before the first it does not show done
    /// (what [`SplitQueue::resync`] relies on after a restart). With
    /// `EVENT_IDX` and an MSI-X vector, each completion the driver asked
    /// an interrupt for is signalled at once; otherwise `due` is set for
    /// the end of the pass.
    fn serve_queue(
        self: &Arc<Self>,
        q: &mut SplitQueue,
        negotiated: Negotiated,
        pool: &Pool,
        vector: Option<u16>,
        due: &mut bool,
    ) -> Result<(), String> {
        loop {
            let mut batch = Vec::new();
            while batch.len() < BATCH {
                match q.pop(&self.host).map_err(|e| e.to_string())? {
                    Some(c) => batch.push(c),
                    None => break,
                }
            }
            if batch.is_empty() {
                if q.arm_notification(&self.host).map_err(|e| e.to_string())? {
                    continue;
                }
                break;
            }
            let heads: Vec<u16> = batch.iter().map(|c| c.head).collect();
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
            self.stats
                .requests
                .fetch_add(heads.len() as u64, Ordering::Relaxed);
            let outcomes = self.execute_all(negotiated, pool, batch);
            for (head, outcome) in heads.into_iter().zip(outcomes) {
                let Some((_, len)) = outcome else {
                    return Err(format!("request {head} has no room for its status"));
                };
                q.push_used(&self.host, head, len)
                    .map_err(|e| e.to_string())?;
                match vector {
                    Some(v) if q.event_idx => {
                        if q.needs_interrupt(&self.host).map_err(|e| e.to_string())? {
                            self.host.msix_notify(v);
                        }
                    }
                    _ => *due = true,
                }
            }
        }
        // Without a vector, the end of the pass asks the driver's
        // `used_event` once for all of this pass's completions.
        if *due && q.event_idx && !q.needs_interrupt(&self.host).map_err(|e| e.to_string())? {
            *due = false;
        }
        Ok(())
    }

    /// Runs requests one after another on this thread.
    fn execute_here(
        &self,
        negotiated: Negotiated,
        chains: &[queue::Chain],
    ) -> Vec<request::Outcome> {
        let disk = request::Disk {
            backend: self.backend.as_ref(),
            serial: &self.serial,
            discard: negotiated.discard,
            write_zeroes: negotiated.write_zeroes,
        };
        chains
            .iter()
            .map(|c| request::execute(&self.host, &disk, c))
            .collect()
    }

    /// Runs `batch`'s requests, their outcomes in its order. From
    /// [`PARALLEL_FROM`] requests on, the batch is cut into runs of
    /// neighbours, one here and one on each helper: requests in flight
    /// together may complete in any order (§5.2.6.4: a FLUSH covers the
    /// writes completed before it was made available, and a driver waits
    /// for a write before it depends on it; QEMU's thread pool runs them
    /// the same way). A helper that is gone leaves its run to this thread;
    /// one that panicked in the middle of a run leaves its requests
    /// without an outcome, which breaks the queue (the device needs a
    /// reset), as a panic here would.
    fn execute_all(
        self: &Arc<Self>,
        negotiated: Negotiated,
        pool: &Pool,
        batch: Vec<queue::Chain>,
    ) -> Vec<request::Outcome> {
        let threads = (pool.len() + 1).min(batch.len());
        if threads < 2 || batch.len() < PARALLEL_FROM {
            return self.execute_here(negotiated, &batch);
        }
        let per = batch.len().div_ceil(threads);
        let mut chains = batch.into_iter();
        let mine: Vec<_> = chains.by_ref().take(per).collect();
        let mut waits = Vec::new();
        let mut helper = 0;
        loop {
            let part: Vec<_> = chains.by_ref().take(per).collect();
            if part.is_empty() {
                break;
            }
            let (tx, rx) = std::sync::mpsc::channel();
            let n = part.len();
            let me = self.clone();
            let job: pool::Job = Box::new(move || {
                let _ = tx.send(me.execute_here(negotiated, &part));
            });
            match pool.run(helper, job) {
                Ok(()) => {
                    self.stats.on_helpers.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(job) => job(),
            }
            waits.push((rx, n));
            helper += 1;
        }
        let mut out = self.execute_here(negotiated, &mine);
        for (rx, n) in waits {
            match rx.recv() {
                Ok(v) => out.extend(v),
                Err(_) => out.extend(std::iter::repeat_n(None, n)),
            }
        }
        out
    }

    /// A configuration change: its MSI-X vector, or the ISR's bit and
    /// INTx when the driver gave it none.
    fn config_interrupt(&self, r: &mut Regs) {
        if r.t.msix_config != transport::NO_VECTOR {
            self.host.msix_notify(r.t.msix_config);
        } else {
            r.t.isr |= ISR_CONFIG;
            self.update_line(r, false);
        }
    }
}

/// The device.
pub struct VirtioBlk {
    shared: Arc<Shared>,
    worker: Option<JoinHandle<()>>,
    queue_size: u16,
}

impl VirtioBlk {
    /// The constructor `export_plugin!` registers.
    pub fn create(s: Settings, host: Host) -> Result<Box<dyn Device>, String> {
        if !(1..=transport::MAX_QUEUES).contains(&s.queues) {
            return Err(format!(
                "queues = {}: a device has 1 to {} queues",
                s.queues,
                transport::MAX_QUEUES
            ));
        }
        if !(1..=8).contains(&s.io_threads) {
            return Err(format!("io-threads = {}: 1 to 8", s.io_threads));
        }
        if !(2..=1024).contains(&s.queue_size) || !s.queue_size.is_power_of_two() {
            return Err(format!(
                "queue-size = {}: a power of two from 2 to 1024",
                s.queue_size
            ));
        }
        let path = host.resolve_path(&s.file);
        let file = RawFile::open(&path, s.read_only, s.direct)
            .map_err(|e| format!("cannot open disk image {}: {e}", path.display()))?;
        if file.size() < request::SECTOR {
            return Err(format!(
                "disk image {} is smaller than one 512-byte sector",
                path.display()
            ));
        }
        let backend: Box<dyn Backend> = if s.delay_us > 0 {
            Box::new(Delayed::new(
                Box::new(file),
                Duration::from_micros(s.delay_us.min(10_000_000)),
            ))
        } else {
            Box::new(file)
        };
        let mut features = F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if s.event_idx {
            features |= F_EVENT_IDX;
        }
        if s.queues > 1 {
            features |= F_MQ;
        }
        if backend.is_read_only() {
            features |= F_RO;
        } else {
            features |= F_WRITE_ZEROES;
            if backend.supports_discard() {
                features |= F_DISCARD;
            }
        }
        let serial = s
            .serial
            .clone()
            .unwrap_or_else(|| path.display().to_string())
            .into_bytes();
        let shared = Arc::new(Shared {
            regs: Mutex::new(Regs {
                t: Transport::new(features, s.queues, s.queue_size, s.queues + 1),
                generation: 0,
                line: false,
            }),
            rings: Mutex::new(Rings {
                generation: 0,
                queues: Vec::new(),
                resync: false,
            }),
            kick: Mutex::new(Kick::default()),
            kicked: Condvar::new(),
            host,
            backend,
            serial: serial[serial.len().saturating_sub(request::ID_BYTES)..].to_vec(),
            stats: Stats::default(),
        });
        let w = shared.clone();
        let helpers = usize::from(s.io_threads) - 1;
        let worker = std::thread::Builder::new()
            .name("virtio-blk".into())
            .spawn(move || {
                let pool = Pool::new(helpers, "virtio-blk-io");
                w.work(&pool);
            })
            .map_err(|e| format!("cannot start the worker thread: {e}"))?;
        Ok(Box::new(VirtioBlk {
            shared,
            worker: Some(worker),
            queue_size: s.queue_size,
        }))
    }

    fn resize(&self, size: u64) -> Result<Resized, String> {
        let backend = &self.shared.backend;
        if backend.is_read_only() {
            return Err("the drive is read-only".into());
        }
        if size == 0 || size % request::SECTOR != 0 {
            return Err(format!("size {size} is not a positive multiple of 512"));
        }
        let current = backend.size();
        if size < current {
            return Err(format!(
                "the drive is {current} bytes: shrinking it to {size} would lose data, and is refused"
            ));
        }
        backend
            .resize(size)
            .map_err(|e| format!("cannot resize the image: {e}"))?;
        let mut r = lock(&self.shared.regs);
        r.t.config_generation = r.t.config_generation.wrapping_add(1);
        if r.t.driver_ok() {
            self.shared.config_interrupt(&mut r);
        }
        Ok(Resized {
            sectors: size / request::SECTOR,
        })
    }

    fn queues(&self) -> u16 {
        lock(&self.shared.regs).t.queues.len() as u16
    }
}

impl Device for VirtioBlk {
    fn describe(&self) -> DeviceDesc {
        let identity = PciIdentity::new(VENDOR_ID, DEVICE_ID, CLASS)
            .with_revision(1)
            .with_subsystem(VENDOR_ID, 0x0002)
            .with_intx();
        // One vector for configuration changes, one per queue.
        let vectors = lock(&self.shared.regs).t.msix_vectors;
        let mut d = DeviceDesc::new(identity)
            .with_bar(BarDesc::mmio32(transport::BAR, transport::BAR_SIZE))
            .with_msix(vectors);
        for cap in transport::capabilities() {
            d = d.with_capability(cap);
        }
        d
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != transport::BAR {
            return;
        }
        use transport::{COMMON_LEN, COMMON_OFF, DEVICE_LEN, DEVICE_OFF, ISR_OFF};
        if (COMMON_OFF..COMMON_OFF + COMMON_LEN).contains(&offset) {
            lock(&self.shared.regs).t.read(offset - COMMON_OFF, data);
        } else if offset == ISR_OFF {
            let mut r = lock(&self.shared.regs);
            data[0] = r.t.take_isr();
            self.shared.update_line(&mut r, false);
        } else if (DEVICE_OFF..DEVICE_OFF + DEVICE_LEN).contains(&offset) {
            let cfg = self.shared.device_config(self.queues(), self.queue_size);
            for (i, d) in data.iter_mut().enumerate() {
                *d = cfg
                    .get((offset - DEVICE_OFF) as usize + i)
                    .copied()
                    .unwrap_or(0);
            }
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != transport::BAR {
            return;
        }
        use transport::{COMMON_LEN, COMMON_OFF, NOTIFY_OFF};
        if (COMMON_OFF..COMMON_OFF + COMMON_LEN).contains(&offset) {
            let mut r = lock(&self.shared.regs);
            match r.t.write(offset - COMMON_OFF, data) {
                Effect::Reset => self.shared.reset(&mut r),
                Effect::DriverOk => {
                    drop(r);
                    // Buffers made available before DRIVER_OK.
                    self.shared.kick();
                }
                Effect::None => {}
            }
        } else if offset >= NOTIFY_OFF {
            // Any queue's notification: the worker looks at them all.
            self.shared.kick();
        }
    }

    fn reset(&mut self) {
        let mut r = lock(&self.shared.regs);
        self.shared.reset(&mut r);
    }

    /// Each queue's notification (the driver writes the queue's index, 16
    /// bits, at index × multiplier): it only wakes the worker, which looks
    /// at every queue, so notifications coalesce and may be overtaken by
    /// later accesses, as doorbells may.
    fn doorbells(&self) -> Vec<Doorbell> {
        (0..self.queues())
            .map(|q| {
                let offset =
                    transport::NOTIFY_OFF + u64::from(q) * u64::from(transport::NOTIFY_MULTIPLIER);
                Doorbell::new(transport::BAR, offset, 2, u64::from(q))
            })
            .collect()
    }

    /// A restored device takes where it stands in each ring from the
    /// used ring (see [`restore_state`](Device::restore_state)), so a state
    /// saved before the guest's last notifications is still good.
    fn state_outlives_doorbells(&self) -> bool {
        true
    }

    /// The transport and where the device is in each ring, taken between
    /// requests (it waits for the batch in flight).
    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        let r = lock(&self.shared.regs);
        let rings = lock(&self.shared.rings);
        Ok(state::encode(&r.t, &rings.queues))
    }

    /// The transport as saved; where the device stands in each ring is
    /// read from guest RAM before it serves again, not taken from the
    /// blob: requests are served one at a time, in order, so every
    /// request the driver made available and the used ring does not show
    /// done is served (again, if the old process had started it: a read
    /// or a write of the same buffer gives the same result), and none the
    /// used ring shows done runs twice. Each queue's interrupt is raised
    /// once. So a state saved long before (a crash of the device's
    /// process in the middle of the guest's I/O) is as good as one saved
    /// at the last request.
    ///
    /// A blob of another version or queue count, or a truncated or
    /// inconsistent one, is refused and the device stays as it was.
    fn restore_state(&mut self, blob: &[u8]) -> Result<(), String> {
        let mut r = lock(&self.shared.regs);
        let saved = state::decode(blob, &r.t)?;
        let mut rings = lock(&self.shared.rings);
        rings.generation += 1;
        rings.queues = saved.rings;
        rings.resync = true;
        r.generation = rings.generation;
        drop(rings);
        r.t = saved.transport;
        self.shared.update_line(&mut r, true);
        drop(r);
        // Buffers the driver made available meanwhile.
        self.shared.kick();
        Ok(())
    }

    /// `resize {"size": BYTES}` (QMP `block_resize` of this device): grows
    /// the image and tells the driver with a configuration change
    /// interrupt. Shrinking (data the guest keeps at the end of its disk)
    /// and read-only drives are refused.
    ///
    /// `x-panic` (fault injection, for recovery tests; only the operator
    /// reaches control operations, never the guest): the plugin panics
    /// here, as a bug in it would, with its I/O thread serving the queues.
    fn control(&mut self, op: &str, args: &Value) -> Result<Value, String> {
        match op {
            "resize" => control::call(op, args, |a: ResizeArgs| self.resize(a.size)),
            "stats" => control::call(op, args, |_: control::NoArgs| {
                let s = &self.shared.stats;
                Ok(control::json!({
                    "requests": s.requests.load(Ordering::Relaxed),
                    "batches": s.batches.load(Ordering::Relaxed),
                    "on-helpers": s.on_helpers.load(Ordering::Relaxed),
                }))
            }),
            "x-panic" => panic!("x-panic: a fault injected by the operator"),
            _ => Err(control::unknown(op)),
        }
    }

    fn shutdown(&mut self) {
        {
            let mut k = lock(&self.shared.kick);
            k.stop = true;
        }
        self.shared.kicked.notify_all();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

impl Drop for VirtioBlk {
    fn drop(&mut self) {
        self.shutdown();
    }
}

plugin_api::export_plugin! {
    name: "virtio-blk",
    devices: { "virtio-blk" => VirtioBlk::create },
}
