//! A per-device test bench in the spirit of QEMU's qtest: no VM, no
//! processes; a plugin's device with 16 MiB of guest RAM at address 0,
//! configuration accesses as a guest makes them, BAR sizing and placement,
//! MMIO and port I/O, and an interrupt line that records its history.
//!
//! ## The same tests, linked and from the `.so`
//!
//! A plugin's tests should pass both against its rlib linked into the
//! test (quick to debug) and against its `.so` loaded through the ABI
//! checks, as `remote-host` loads it. [`plugin_tests!`](crate::plugin_tests)
//! runs each test function both ways:
//!
//! ```ignore
//! // tests/device.rs of crate `dma-example`
//! use plugin_api::harness::TestBench;
//!
//! plugin_api::plugin_tests! {
//!     plugin: dma_example,                    // the crate (its rlib and its .so)
//!     bench: |source| TestBench::new(source, None, "max-transfer = 4096"),
//!     tests: [registers, dma_copies],
//! }
//!
//! fn registers(mut tb: TestBench) {
//!     tb.map_bars();
//!     let bar0 = tb.bar_address(0);
//!     tb.mmio_write(bar0 + 0x08, 4, 0x1234);
//!     assert_eq!(tb.mmio_read(bar0 + 0x08, 4), 0x1234);
//! }
//! # fn dma_copies(_: TestBench) {}
//! ```
//!
//! The `.so` is found beside the test executable, so `cargo test` of the
//! plugin's crate (which builds its `cdylib` too) is all it takes; see
//! [`plugin_library_path`].
//!
//! ## Addresses
//!
//! [`TestBench::map_bars`] places BARs as PC firmware does: memory BARs
//! from `0xe000_0000`, I/O BARs from port `0xc000`, each aligned to its
//! size, in BAR order; then it enables memory and I/O decoding and bus
//! mastering. [`TestBench::bar_address`] gives the base either way.
//! Accesses take guest addresses (`bar_address(i) + offset`): memory with
//! [`mmio_read`](TestBench::mmio_read)/[`mmio_write`](TestBench::mmio_write)
//! (1, 2, 4 or 8 bytes), ports with
//! [`pio_read`](TestBench::pio_read)/[`pio_write`](TestBench::pio_write)
//! (1, 2 or 4 bytes, as `in`/`out`). The device sees either as
//! [`Device::bar_read`](crate::Device::bar_read)/[`bar_write`](crate::Device::bar_write)
//! of the BAR at the offset from its base. An address no BAR decodes
//! reads all-ones, as does a failed device.
//!
//! DMA goes to [`TestBench::ram`]; the interrupt line is [`TestBench::irq`].

#![allow(clippy::panic)] // test helpers report misuse by panicking, as assertions do

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pci::{command, regs, BarType};

use crate::abi::MirroredRead;
use crate::abi::PluginModuleRef;
use crate::function::{create_device, GuestMemory, IrqSink, PciFunction, Services};
use crate::loader::{load_path, LoadedPlugin};

/// Where the bench gets the plugin from.
pub enum PluginSource {
    /// Linked into the test binary (the plugin's rlib).
    Linked(PluginModuleRef),
    /// Loaded from a shared library through the ABI checks.
    Library(PathBuf),
}

impl std::fmt::Debug for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginSource::Linked(_) => write!(f, "Linked({self})"),
            PluginSource::Library(p) => f.debug_tuple("Library").field(p).finish(),
        }
    }
}

impl std::fmt::Display for PluginSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PluginSource::Linked(m) => write!(f, "{} linked", m.name()()),
            PluginSource::Library(p) => write!(f, "{}", p.display()),
        }
    }
}

/// Guest RAM of the bench: `size` bytes at guest-physical 0.
pub struct Ram {
    bytes: Mutex<Vec<u8>>,
    /// `bytes.len()`, which never changes: bounds are checked without
    /// the lock (one lock per access, not two; the LSI's SCRIPTS fetch
    /// each instruction through here).
    size: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not poison the bench for the rest.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Ram {
    fn range(&self, gpa: u64, len: usize) -> Result<std::ops::Range<usize>, String> {
        let size = self.size;
        let start = usize::try_from(gpa).map_err(|_| format!("DMA at {gpa:#x}: outside RAM"))?;
        match start.checked_add(len) {
            Some(end) if end <= size => Ok(start..end),
            _ => Err(format!(
                "DMA of {len} bytes at {gpa:#x} is outside guest RAM (0..{size:#x})"
            )),
        }
    }

    /// Copies guest RAM at `gpa` into a vector.
    pub fn read_vec(&self, gpa: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        if let Err(e) = GuestMemory::read(self, gpa, &mut v) {
            panic!("test bench RAM read: {e}");
        }
        v
    }

    /// Writes `data` into guest RAM at `gpa`.
    pub fn write_all(&self, gpa: u64, data: &[u8]) {
        if let Err(e) = GuestMemory::write(self, gpa, data) {
            panic!("test bench RAM write: {e}");
        }
    }
}

impl GuestMemory for Ram {
    fn read(&self, gpa: u64, data: &mut [u8]) -> Result<(), String> {
        let r = self.range(gpa, data.len())?;
        data.copy_from_slice(&lock(&self.bytes)[r]);
        Ok(())
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let r = self.range(gpa, data.len())?;
        lock(&self.bytes)[r].copy_from_slice(data);
        Ok(())
    }
}

#[derive(Default)]
struct IrqState {
    level: bool,
    /// Every level the device set, in order (repeats included).
    history: Vec<bool>,
    /// Interrupts the guest would have taken: rising edges, plus
    /// re-deliveries at EOI while the line stays high.
    deliveries: usize,
}

/// The MSI-X a VMM would emulate for the device: its table and pending
/// bits (the one model, [`pci::msix::MsixTable`]), Message Control as the
/// guest set it, and every message sent.
struct BenchMsix {
    table: pci::msix::MsixTable,
    enabled: bool,
    function_masked: bool,
    sent: Vec<(u16, pci::msix::MsiMessage)>,
}

/// The MSI a VMM would serve for the device: what the guest programmed
/// (the one model, [`pci::msi::MsiState`]), the pending bits it keeps,
/// and every message sent.
struct BenchMsi {
    state: pci::msi::MsiState,
    pending: u32,
    sent: Vec<(u16, pci::msix::MsiMessage)>,
}

impl BenchMsi {
    /// Sends vector `v` if live, else keeps it pending (dropped while MSI
    /// is disabled or for a vector not granted).
    fn raise(&mut self, v: u8) {
        if self.state.live(v) {
            self.sent.push((u16::from(v), self.state.message(v)));
        } else if self.state.enabled && v < self.state.granted {
            self.pending |= 1 << v;
        }
    }

    /// The guest changed the capability: pending vectors now live go out.
    fn update(&mut self, state: pci::msi::MsiState) {
        self.state = state;
        if !state.enabled {
            self.pending = 0;
            return;
        }
        for v in 0..32u8 {
            if self.pending & (1 << v) != 0 && state.live(v) {
                self.pending &= !(1 << v);
                self.sent.push((u16::from(v), state.message(v)));
            }
        }
    }
}

/// The INTx line as KVM's irqfd + resample would present it, and the
/// MSI-X and MSI messages the device sent.
#[derive(Default)]
pub struct IrqLine {
    state: Mutex<IrqState>,
    changed: Condvar,
    msix: Mutex<Option<BenchMsix>>,
    msi: Mutex<Option<BenchMsi>>,
}

impl IrqSink for IrqLine {
    fn set_level(&self, irq: u32, asserted: bool) {
        if irq >= crate::MSIX_IRQ_BASE {
            if asserted {
                let vector = u16::try_from(irq - crate::MSIX_IRQ_BASE).unwrap_or(u16::MAX);
                if lock(&self.msix).as_ref().is_some_and(|m| m.enabled) {
                    self.msix_signal(vector);
                } else {
                    self.msi_signal(vector);
                }
            }
            return;
        }
        if irq != 0 {
            return;
        }
        // While MSI-X or MSI is enabled the function does not use INTx
        // (PCI 3.0, 6.8.1.3, 6.8.3.3): hosts hold the line low whatever the
        // device says.
        if asserted && self.messages_enabled() {
            return;
        }
        let mut s = lock(&self.state);
        if asserted && !s.level {
            s.deliveries += 1;
        }
        s.level = asserted;
        s.history.push(asserted);
        self.changed.notify_all();
    }
}

impl IrqLine {
    fn messages_enabled(&self) -> bool {
        lock(&self.msix).as_ref().is_some_and(|m| m.enabled)
            || lock(&self.msi).as_ref().is_some_and(|m| m.state.enabled)
    }

    fn msi_signal(&self, vector: u16) {
        let mut m = lock(&self.msi);
        let Some(m) = m.as_mut() else { return };
        if let Ok(v) = u8::try_from(vector) {
            if v < 32 {
                m.raise(v);
            }
        }
        self.changed.notify_all();
    }

    /// The guest changed the MSI capability.
    fn msi_update(&self, state: pci::msi::MsiState) {
        let mut m = lock(&self.msi);
        let Some(m) = m.as_mut() else { return };
        m.update(state);
        self.changed.notify_all();
    }

    /// Every MSI message sent so far: (vector, address and data as the
    /// guest programmed them, the vector in the data's low bits), in
    /// order.
    pub fn msi_messages(&self) -> Vec<(u16, pci::msix::MsiMessage)> {
        lock(&self.msi)
            .as_ref()
            .map_or(Vec::new(), |m| m.sent.clone())
    }

    /// MSI messages sent for `vector` so far.
    pub fn msi_count(&self, vector: u16) -> usize {
        lock(&self.msi)
            .as_ref()
            .map_or(0, |m| m.sent.iter().filter(|(v, _)| *v == vector).count())
    }

    /// The MSI Pending Bits as the guest reads them.
    pub fn msi_pending_bits(&self) -> u32 {
        lock(&self.msi).as_ref().map_or(0, |m| m.pending)
    }

    /// Waits until MSI `vector` sent at least `n` messages, at most
    /// `timeout`.
    pub fn wait_msi(&self, vector: u16, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, || self.msi_count(vector) >= n)
    }

    /// Waits until `done` holds, at most `timeout`, woken by each change
    /// the device makes (and every 10 ms).
    fn wait_until(&self, timeout: Duration, done: impl Fn() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.state);
        loop {
            if done() {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = match self
                .changed
                .wait_timeout(s, (deadline - now).min(Duration::from_millis(10)))
            {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }

    fn msix_signal(&self, vector: u16) {
        let mut m = lock(&self.msix);
        let Some(m) = m.as_mut() else { return };
        if let Some(msg) = m.table.signal(vector, m.enabled, m.function_masked) {
            m.sent.push((vector, msg));
        }
        self.changed.notify_all();
    }

    /// Every MSI-X message sent so far: (vector, address and data as the
    /// guest programmed them), in order.
    pub fn msix_messages(&self) -> Vec<(u16, pci::msix::MsiMessage)> {
        lock(&self.msix)
            .as_ref()
            .map_or(Vec::new(), |m| m.sent.clone())
    }

    /// MSI-X messages sent for `vector` so far.
    pub fn msix_count(&self, vector: u16) -> usize {
        lock(&self.msix)
            .as_ref()
            .map_or(0, |m| m.sent.iter().filter(|(v, _)| *v == vector).count())
    }

    /// Whether `vector` is pending (raised while masked).
    pub fn msix_pending(&self, vector: u16) -> bool {
        lock(&self.msix)
            .as_ref()
            .is_some_and(|m| m.table.is_pending(vector))
    }

    /// Waits until `vector` sent at least `n` messages, at most `timeout`.
    pub fn wait_msix(&self, vector: u16, n: usize, timeout: Duration) -> bool {
        self.wait_until(timeout, || self.msix_count(vector) >= n)
    }

    /// Message Control changed: pending vectors now due are sent.
    fn msix_control(&self, enabled: bool, function_masked: bool) {
        let mut m = lock(&self.msix);
        let Some(m) = m.as_mut() else { return };
        m.enabled = enabled;
        m.function_masked = function_masked;
        let due = m.table.due(enabled, function_masked);
        m.sent.extend(due);
        self.changed.notify_all();
    }

    /// A table write: unmasked pending vectors are sent.
    fn msix_table_write(&self, offset: u64, data: &[u8]) {
        let mut m = lock(&self.msix);
        let Some(m) = m.as_mut() else { return };
        let due = m
            .table
            .write_table(offset, data, m.enabled, m.function_masked);
        m.sent.extend(due);
        self.changed.notify_all();
    }

    /// A read of the MSI-X BAR at `offset`.
    fn msix_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let m = lock(&self.msix);
        let Some(m) = m.as_ref() else { return };
        let l = *m.table.layout();
        let (t, p) = (u64::from(l.table_offset), u64::from(l.pba_offset));
        if (t..t + l.table_size()).contains(&offset) {
            m.table.read_table(offset - t, data);
        } else if (p..p + l.pba_size()).contains(&offset) {
            m.table.read_pba(offset - p, data);
        }
    }

    /// Current level.
    pub fn level(&self) -> bool {
        lock(&self.state).level
    }

    /// Every level set so far.
    pub fn history(&self) -> Vec<bool> {
        lock(&self.state).history.clone()
    }

    /// Interrupts delivered so far.
    pub fn deliveries(&self) -> usize {
        lock(&self.state).deliveries
    }

    /// Forgets the history (not the level).
    pub fn clear_history(&self) {
        let mut s = lock(&self.state);
        s.history.clear();
        s.deliveries = 0;
    }

    /// End of interrupt: like KVM's resample, a line still high is
    /// delivered again. Returns whether it was.
    pub fn eoi(&self) -> bool {
        let mut s = lock(&self.state);
        if s.level {
            s.deliveries += 1;
        }
        s.level
    }

    /// Waits until the level is `level`, at most `timeout`.
    pub fn wait_for(&self, level: bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.state);
        while s.level != level {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            s = match self.changed.wait_timeout(s, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

/// Counts the device's mirror notices ([`Host::registers_changed`] and
/// interrupt level changes), as a VMM's ring does.
///
/// [`Host::registers_changed`]: crate::Host::registers_changed
#[derive(Default)]
struct Notices {
    count: Mutex<u64>,
    changed: Condvar,
}

impl Notices {
    fn notify(&self) {
        *lock(&self.count) += 1;
        self.changed.notify_all();
    }

    fn now(&self) -> u64 {
        *lock(&self.count)
    }

    /// Whether a notice after `seen` arrives within `timeout`.
    fn wait_past(&self, seen: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut n = lock(&self.count);
        while *n == seen {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            n = match self.changed.wait_timeout(n, deadline - now) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        true
    }
}

/// One mirrored register as the bench keeps it: its value after the last
/// call and the notice count then.
struct Mirror {
    key: MirroredRead,
    value: u32,
    notices: u64,
}

/// How long a bench waits for the notice that must follow a change of a
/// mirrored register made outside an access.
const NOTICE_GRACE: Duration = Duration::from_secs(2);

/// A device under test.
///
/// It checks the device's [`Device::mirrored_reads`](crate::Device::mirrored_reads)
/// declaration on every read of a mirrored register: where a VMM would
/// answer from its mirror (no notice since the last call), the device
/// must read the same value, or announce the change within 2 s; a test
/// that reads such a register panics otherwise, naming it.
pub struct TestBench {
    function: PciFunction,
    ram: Arc<Ram>,
    irq: Arc<IrqLine>,
    plugin: LoadedPlugin,
    notices: Arc<Notices>,
    mirrors: Vec<Mirror>,
    /// What the device was made from, to make it again
    /// ([`TestBench::restart_device`]).
    kind: Option<String>,
    settings: String,
}

/// Guest RAM size of a bench.
pub const BENCH_RAM_SIZE: usize = 16 << 20;

impl TestBench {
    /// Creates device `kind` (or the plugin's only kind) with `settings`
    /// (TOML text) and 16 MiB of guest RAM at address 0.
    pub fn new(source: PluginSource, kind: Option<&str>, settings: &str) -> Result<Self, String> {
        let plugin = match source {
            PluginSource::Linked(m) => LoadedPlugin::linked(m),
            PluginSource::Library(p) => load_path(&p).map_err(|e| e.to_string())?,
        };
        let ram = Arc::new(Ram {
            bytes: Mutex::new(vec![0; BENCH_RAM_SIZE]),
            size: BENCH_RAM_SIZE,
        });
        let irq = Arc::new(IrqLine::default());
        let notices = Arc::new(Notices::default());
        let function = Self::make(&plugin, kind, settings, &ram, &irq, &notices)?;
        // A declaration a VMM would cut short is an error here, not a
        // warning in some log.
        let (keys, refused) = function.mirrored_reads();
        if !refused.is_empty() {
            return Err(refused.join("; "));
        }
        let (_, refused) = function.doorbells();
        if !refused.is_empty() {
            return Err(refused.join("; "));
        }
        if function.msi().is_some() {
            *lock(&irq.msi) = Some(BenchMsi {
                state: pci::msi::MsiState::default(),
                pending: 0,
                sent: Vec::new(),
            });
        }
        if let Some(m) = function.msix() {
            *lock(&irq.msix) = Some(BenchMsix {
                table: pci::msix::MsixTable::new(m.layout),
                enabled: false,
                function_masked: false,
                sent: Vec::new(),
            });
        }
        let mut bench = TestBench {
            function,
            ram,
            irq,
            plugin,
            notices,
            kind: kind.map(str::to_owned),
            settings: settings.to_owned(),
            mirrors: keys
                .into_iter()
                .map(|key| Mirror {
                    key,
                    value: 0,
                    notices: u64::MAX,
                })
                .collect(),
        };
        bench.refresh_mirrors();
        Ok(bench)
    }

    /// A device of the plugin on this bench's RAM and interrupt line.
    fn make(
        plugin: &LoadedPlugin,
        kind: Option<&str>,
        settings: &str,
        ram: &Arc<Ram>,
        irq: &Arc<IrqLine>,
        notices: &Arc<Notices>,
    ) -> Result<PciFunction, String> {
        let n = notices.clone();
        let services = Services::new("bench", ram.clone(), irq.clone())
            .with_change_notice(Arc::new(move || n.notify()));
        let device = create_device(plugin, kind, settings, services)?;
        PciFunction::new(device)
    }

    /// Simulates a restart of the device's process that carries its
    /// state, as a VMM restarting a remote does: the device's state is
    /// saved (`Device::save_state`), the device shut down, a new one made
    /// from the same plugin and settings on the same guest RAM and
    /// interrupt line, with the configuration the guest gave the old one
    /// (BARs where it put them, command register), and the state restored
    /// into it (`Device::restore_state`). Errors: the device cannot save,
    /// or its new instance cannot be made or refuses the state.
    pub fn restart_device(&mut self) -> Result<(), String> {
        let state = self
            .function
            .save_state()
            .map_err(|e| format!("save_state: {}", e.message))?;
        self.restore_into_new(&state)
    }

    /// Simulates the device's process dying and a VMM bringing the device
    /// back from `state`, a save taken earlier (`function().save_state()`)
    /// and perhaps stale: the guest may have used the device since. The
    /// old instance is stopped without a save; a new one is made as in
    /// [`restart_device`](Self::restart_device) and given `state`. This is
    /// what a device that declares
    /// [`Device::state_outlives_doorbells`](crate::Device::state_outlives_doorbells)
    /// must survive after doorbells alone.
    pub fn crash_and_restore(&mut self, state: &[u8]) -> Result<(), String> {
        self.restore_into_new(state)
    }

    /// Simulates the device's process dying when the VMM's last save of
    /// it is stale (the guest used the device since, and what that set
    /// going died with the process): a new instance is made as in
    /// [`restart_device`](Self::restart_device) and asked to come back
    /// from `state` with [`crate::control::RESUME_AFTER_LOSS`]. Returns the
    /// device's answer; a device without the operation refuses it and is
    /// left as it was made (reset), as a VMM then reports.
    pub fn crash_and_resume(&mut self, state: &[u8]) -> Result<serde_json::Value, String> {
        let mut function = self.remake()?;
        let args = serde_json::to_value(crate::control::ResumeAfterLoss::new(state))
            .map_err(|e| format!("{}: {e}", crate::control::RESUME_AFTER_LOSS))?;
        let r = function.control(crate::control::RESUME_AFTER_LOSS, &args);
        self.function = function;
        self.forget_mirrors();
        self.refresh_mirrors();
        r
    }

    /// Shuts the device down and makes a new instance with the guest's
    /// configuration, restoring `state` into it.
    fn restore_into_new(&mut self, state: &[u8]) -> Result<(), String> {
        let mut function = self.remake()?;
        function
            .restore_state(state)
            .map_err(|e| format!("restore_state: {}", e.message))?;
        self.function = function;
        self.forget_mirrors();
        self.refresh_mirrors();
        Ok(())
    }

    /// Shuts the device down and makes a new instance with the guest's
    /// configuration (BARs where it put them, command register).
    fn remake(&mut self) -> Result<PciFunction, String> {
        // The guest's view of the configuration header: command and BARs.
        let command = self.cfg_read(regs::COMMAND, 2);
        let bars: Vec<u32> = (0..6)
            .map(|i| self.cfg_read(regs::BAR0 + 4 * i, 4))
            .collect();
        self.function.shutdown();
        let mut function = Self::make(
            &self.plugin,
            self.kind.as_deref(),
            &self.settings,
            &self.ram,
            &self.irq,
            &self.notices,
        )?;
        for (i, v) in bars.iter().enumerate() {
            function.config_write(regs::BAR0 + 4 * i, &v.to_le_bytes());
        }
        function.config_write(regs::COMMAND, &(command as u16).to_le_bytes());
        Ok(function)
    }

    /// Reads every mirrored register into the bench's mirror, as a VMM's
    /// ring does after each call.
    fn refresh_mirrors(&mut self) {
        let seen = self.notices.now();
        for m in &mut self.mirrors {
            let mut b = [0u8; 4];
            let n = usize::from(m.key.len);
            if self
                .function
                .bar_read(m.key.bar, m.key.offset, &mut b[..n])
                .is_ok()
            {
                m.value = u32::from_le_bytes(b);
                m.notices = seen;
            } else {
                m.notices = u64::MAX;
            }
        }
    }

    /// Until the next refresh no read is checked against the mirrors.
    fn forget_mirrors(&mut self) {
        for m in &mut self.mirrors {
            m.notices = u64::MAX;
        }
    }

    /// A read of `value` from a mirrored register that a VMM would have
    /// answered from its mirror must agree with it (or the device must
    /// announce the change soon).
    fn check_mirror(&self, bar: u8, offset: u64, data: &[u8]) {
        let Some(m) = self.mirrors.iter().find(|m| {
            m.key.bar == bar && m.key.offset == offset && usize::from(m.key.len) == data.len()
        }) else {
            return;
        };
        let mut b = [0u8; 4];
        b[..data.len()].copy_from_slice(data);
        let live = u32::from_le_bytes(b);
        if m.notices != u64::MAX
            && live != m.value
            && !self.notices.wait_past(m.notices, NOTICE_GRACE)
        {
            panic!(
                "mirrored register BAR{bar} {offset:#x} ({} bytes) changed from {:#x} to {live:#x} outside an access, and the device did not call Host::registers_changed: a VMM would still answer {:#x} (Device::mirrored_reads)",
                data.len(),
                m.value,
                m.value
            );
        }
    }

    /// The plugin as loaded (name, version, kinds, path).
    pub fn plugin(&self) -> &LoadedPlugin {
        &self.plugin
    }

    /// Guest RAM: 16 MiB at guest-physical 0 ([`BENCH_RAM_SIZE`]); a DMA
    /// outside it is refused to the device.
    pub fn ram(&self) -> &Ram {
        &self.ram
    }

    /// The function's INTx line.
    pub fn irq(&self) -> &IrqLine {
        &self.irq
    }

    /// The device's doorbells (`Device::doorbells`), as a VMM would take
    /// them.
    pub fn doorbells(&self) -> Vec<crate::Doorbell> {
        self.function.doorbells().0
    }

    /// Rings doorbell `index` as KVM delivers it (the guest wrote its
    /// value at its address, with the BAR placed and decoding on): the
    /// device sees that write. Panics when the device has no such
    /// doorbell.
    pub fn ring_doorbell(&mut self, index: usize) {
        let Some(d) = self.doorbells().get(index).copied() else {
            panic!("the device declares no doorbell {index}");
        };
        let io = self
            .function
            .config()
            .bar_spec(usize::from(d.bar))
            .is_some_and(|s| s.bar_type == BarType::Io);
        let addr = self.bar_address(usize::from(d.bar)) + d.offset;
        let mut b = d.value.to_le_bytes();
        self.access(io, addr, &mut b[..usize::from(d.len)], true);
    }

    /// The function as a host drives it (reset, save/restore, direct BAR
    /// accesses by index and offset).
    pub fn function(&mut self) -> &mut PciFunction {
        // Whatever the test does with it (a reset, a restore) is a call a
        // VMM would refresh its mirrors after: the next access does.
        self.forget_mirrors();
        &mut self.function
    }

    /// A configuration read of `len` (1, 2 or 4) bytes at `offset`.
    pub fn cfg_read(&mut self, offset: usize, len: usize) -> u32 {
        let mut b = [0u8; 4];
        let len = len.min(4);
        self.function.config_read(offset, &mut b[..len]);
        // MSI's Pending Bits are the host's, as a VMM serves them.
        if let Some(m) = self.function.msi() {
            if offset == m.cap + pci::msi::PENDING && len == 4 {
                return self.irq.msi_pending_bits();
            }
        }
        u32::from_le_bytes(b)
    }

    /// A configuration write of the low `len` (1, 2 or 4) bytes of
    /// `value` at `offset`.
    pub fn cfg_write(&mut self, offset: usize, len: usize, value: u32) {
        let b = value.to_le_bytes();
        self.function.config_write(offset, &b[..len.min(4)]);
        self.forget_mirrors();
        let (enabled, masked) = self.function.msix_control();
        self.irq.msix_control(enabled, masked);
        if let Some(state) = self.function.msi_state() {
            self.irq.msi_update(state);
        }
    }

    /// The function's MSI (capability offset, vectors asked for), if the
    /// device declared it.
    pub fn msi(&self) -> Option<crate::function::Msi> {
        self.function.msi()
    }

    /// Sets MSI up as a driver does: address `0xfee0_0000`, data `0x4000`,
    /// `granted` vectors (a power of two, at most those asked for), none
    /// masked, MSI enabled. An error if the device has no MSI.
    pub fn enable_msi(&mut self, granted: u8) -> Result<(), String> {
        let m = self.msi().ok_or("the device declared no MSI")?;
        pci::msi::check_vectors(granted)?;
        self.cfg_write(m.cap + pci::msi::ADDRESS_LO, 4, 0xfee0_0000);
        self.cfg_write(m.cap + pci::msi::ADDRESS_HI, 4, 0);
        self.cfg_write(m.cap + pci::msi::DATA, 2, 0x4000);
        self.cfg_write(m.cap + pci::msi::MASK, 4, 0);
        let ctrl = self.cfg_read(m.cap + pci::msi::CONTROL, 2) as u16;
        let ctrl = pci::msi::encode_control(ctrl, true, granted);
        self.cfg_write(m.cap + pci::msi::CONTROL, 2, u32::from(ctrl));
        Ok(())
    }

    /// The function's MSI-X (capability offset, table and PBA), if the
    /// device declared vectors.
    pub fn msix(&self) -> Option<crate::function::Msix> {
        self.function.msix()
    }

    /// Sets MSI-X up as a driver does: vector `v` of `vectors` gets
    /// address `0xfee0_0000` and data `0x4000 + v`, unmasked, and MSI-X
    /// is enabled. Needs [`map_bars`](Self::map_bars) first. An error if
    /// the device has no MSI-X.
    pub fn enable_msix(&mut self, vectors: &[u16]) -> Result<(), String> {
        let m = self.msix().ok_or("the device declared no MSI-X vectors")?;
        let base = self.bar_address(usize::from(m.layout.table_bar));
        for &v in vectors {
            let e = base + u64::from(m.layout.table_offset) + 16 * u64::from(v);
            self.mmio_write(e, 4, 0xfee0_0000);
            self.mmio_write(e + 4, 4, 0);
            self.mmio_write(e + 8, 4, 0x4000 + u64::from(v));
            self.mmio_write(e + 12, 4, 0);
        }
        let ctrl = self.cfg_read(m.cap + 2, 2) as u16;
        let (_, masked) = pci::msix::decode_control(ctrl);
        let ctrl = pci::msix::encode_control(ctrl, true, masked);
        self.cfg_write(m.cap + 2, 2, u32::from(ctrl));
        Ok(())
    }

    /// Sizes every BAR as firmware does (write all-ones, read back,
    /// restore): `(index, size, is_io)` for each implemented BAR.
    pub fn probe_bars(&mut self) -> Vec<(usize, u64, bool)> {
        let mut found = Vec::new();
        let mut i = 0;
        while i < 6 {
            let off = regs::BAR0 + i * 4;
            let orig = self.cfg_read(off, 4);
            self.cfg_write(off, 4, 0xffff_ffff);
            let v = self.cfg_read(off, 4);
            self.cfg_write(off, 4, orig);
            if v == 0 {
                i += 1;
                continue;
            }
            let is_io = v & 1 == 1;
            let is64 = !is_io && (v >> 1) & 3 == 2;
            let mut mask = u64::from(v & if is_io { !0x3 } else { !0xf });
            if is64 {
                let hi_off = off + 4;
                let orig_hi = self.cfg_read(hi_off, 4);
                self.cfg_write(hi_off, 4, 0xffff_ffff);
                mask |= u64::from(self.cfg_read(hi_off, 4)) << 32;
                self.cfg_write(hi_off, 4, orig_hi);
            } else {
                mask |= 0xffff_ffff_0000_0000;
            }
            if is_io {
                mask |= 0xffff_0000;
            }
            found.push((i, (!mask).wrapping_add(1), is_io));
            i += if is64 { 2 } else { 1 };
        }
        found
    }

    /// Places every BAR the way firmware would (I/O BARs from port
    /// `0xc000`, memory BARs from `0xe000_0000`, each aligned to its size,
    /// in BAR order) and enables I/O, memory decoding and bus mastering.
    pub fn map_bars(&mut self) {
        let mut next_io: u64 = 0xc000;
        let mut next_mem: u64 = 0xe000_0000;
        for (i, size, is_io) in self.probe_bars() {
            let next = if is_io { &mut next_io } else { &mut next_mem };
            let base = next.next_multiple_of(size);
            *next = base + size;
            self.map_bar(i, base);
        }
        let cmd = command::IO_SPACE | command::MEMORY_SPACE | command::BUS_MASTER;
        self.cfg_write(regs::COMMAND, 2, u32::from(cmd));
    }

    /// Programs BAR `index` to `base` (both halves of a 64-bit BAR).
    pub fn map_bar(&mut self, index: usize, base: u64) {
        let off = regs::BAR0 + index * 4;
        self.cfg_write(off, 4, base as u32);
        if self
            .function
            .config()
            .bar_spec(index)
            .is_some_and(|s| s.bar_type == BarType::Memory64)
        {
            self.cfg_write(off + 4, 4, (base >> 32) as u32);
        }
    }

    /// The guest address of BAR `index`.
    pub fn bar_address(&self, index: usize) -> u64 {
        self.function.config().bar_base(index).unwrap_or(0)
    }

    fn access(&mut self, io: bool, addr: u64, data: &mut [u8], write: bool) {
        let Some(region) = self.function.config().decode(io, addr, data.len() as u64) else {
            if !write {
                data.fill(0xff); // nothing decodes it: master abort
            }
            return;
        };
        let bar = region.index as u8;
        // The MSI-X BAR is the host's, not the device's.
        if let Some(m) = self.function.msix() {
            if bar == m.layout.table_bar {
                let l = m.layout;
                let t = u64::from(l.table_offset);
                if write {
                    if (t..t + l.table_size()).contains(&region.offset) {
                        self.irq.msix_table_write(region.offset - t, data);
                    }
                } else {
                    self.irq.msix_read(region.offset, data);
                }
                return;
            }
        }
        // Errors (a failed device) read as all-ones, as the VMM serves them.
        if write {
            let _ = self.function.bar_write(bar, region.offset, data);
        } else if self.function.bar_read(bar, region.offset, data).is_ok() {
            self.check_mirror(bar, region.offset, data);
        }
        if !self.mirrors.is_empty() {
            self.refresh_mirrors();
        }
    }

    /// A memory read of `len` (1, 2, 4 or 8) bytes at guest address
    /// `addr`, little-endian; all-ones where nothing answers.
    pub fn mmio_read(&mut self, addr: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.access(false, addr, &mut b[..len.min(8)], false);
        u64::from_le_bytes(b)
    }

    /// A memory write of the low `len` (1, 2, 4 or 8) bytes of `value` at
    /// guest address `addr`.
    pub fn mmio_write(&mut self, addr: u64, len: usize, value: u64) {
        let mut b = value.to_le_bytes();
        self.access(false, addr, &mut b[..len.min(8)], true);
    }

    /// A port read (`in`) of `len` (1, 2 or 4) bytes at `port`; an I/O BAR
    /// decodes it once [`map_bars`](Self::map_bars) (or
    /// [`map_bar`](Self::map_bar)) placed it. All-ones where nothing
    /// answers.
    pub fn pio_read(&mut self, port: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.access(true, port, &mut b[..len.min(4)], false);
        u64::from_le_bytes(b)
    }

    /// A port write (`out`) of the low `len` (1, 2 or 4) bytes of `value`
    /// at `port`.
    pub fn pio_write(&mut self, port: u64, len: usize, value: u64) {
        let mut b = value.to_le_bytes();
        self.access(true, port, &mut b[..len.min(4)], true);
    }

    /// Tells the device that its BAR writes are posted from now on, or no
    /// longer are ([`control::POSTED_WRITES`](crate::control::POSTED_WRITES)),
    /// as `remote-host` does when a remote's access ring starts and stops
    /// delivering them. The device's refusal (it does not know the notice)
    /// is returned, as the hosts that ignore it see it.
    pub fn set_posted_writes(&mut self, on: bool) -> Result<(), String> {
        self.control(
            crate::control::POSTED_WRITES,
            &serde_json::json!({ "on": on }),
        )
        .map(|_| ())
    }

    /// Waits until the device's background work is done.
    pub fn wait_idle(&self, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while self.function.is_busy() {
            if Instant::now() >= deadline {
                return Err(format!("device still busy after {timeout:?}"));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// The device's control operation `op` with `args` (as the VMM's
    /// control channel would call it).
    pub fn control(
        &mut self,
        op: &str,
        args: &serde_json::Value,
    ) -> Result<serde_json::Value, String> {
        self.forget_mirrors();
        self.function.control(op, args)
    }

    /// The device's failure message, once it panicked.
    pub fn failure(&self) -> Option<String> {
        self.function.failure()
    }
}

impl Drop for TestBench {
    fn drop(&mut self) {
        self.function.shutdown();
    }
}

/// Path of the shared library of plugin (or crate) `name`, built in the
/// target directory of the running test: `lib<name, - as _>.so` in the
/// test executable's directory (`target/<profile>/deps`, where `cargo
/// test` of the plugin's own crate builds its `cdylib`) or one of its
/// parents up to `target` (where `cargo build` puts it). A test of one
/// crate that loads another crate's plugin needs that one built first
/// (`cargo build --workspace`, as `scripts/test` does).
pub fn plugin_library_path(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let file = crate::loader::library_file_name(name);
    let mut tried = Vec::new();
    let mut dir: Option<&Path> = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join(&file);
        if candidate.is_file() {
            return Ok(candidate);
        }
        tried.push(candidate);
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent();
    }
    Err(format!(
        "plugin library {file} not built (looked at {}); build it first (`cargo build`)",
        tried
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    ))
}

/// [`plugin_tests!`](crate::plugin_tests)'s bench: `make(source)`, or a
/// panic that names the source and the error.
#[doc(hidden)]
pub fn __make_bench(
    source: PluginSource,
    make: impl FnOnce(PluginSource) -> Result<TestBench, String>,
) -> TestBench {
    let what = source.to_string();
    match make(source) {
        Ok(tb) => tb,
        Err(e) => panic!("cannot make the test bench ({what}): {e}"),
    }
}

/// [`plugin_tests!`](crate::plugin_tests)'s `.so` source, or a panic that
/// says how to build it.
#[doc(hidden)]
pub fn __library(crate_name: &str) -> PluginSource {
    match plugin_library_path(crate_name) {
        Ok(p) => PluginSource::Library(p),
        Err(e) => panic!("{e}"),
    }
}

/// Runs each test function twice: against the plugin linked into the test
/// (its rlib's `plugin_module()`, tests `linked::NAME`) and against its
/// `.so` loaded through the ABI checks as a host loads it (tests
/// `library::NAME`).
///
/// ```ignore
/// plugin_api::plugin_tests! {
///     plugin: my_device,                      // the plugin's crate name, with _
///     // optional; this is the default:
///     bench: |source| TestBench::new(source, None, ""),
///     tests: [registers, interrupt, dma],
/// }
///
/// fn registers(mut tb: TestBench) { /* ... */ }
/// ```
///
/// - `plugin`: the crate that calls [`export_plugin!`](crate::export_plugin)
///   (so it has `plugin_module()`); its library is found as
///   `lib<plugin>.so` with [`plugin_library_path`]. With `cargo test` of
///   that crate, its `cdylib` is built beside the test, so nothing else
///   needs building.
/// - `bench`: makes a [`TestBench`] from the [`PluginSource`]: choose the
///   device kind and settings here. An error fails the test with the
///   source named.
/// - `tests`: functions `fn(TestBench)` in the calling module. The macro
///   defines the modules `linked` and `library` and a function
///   `__plugin_tests_bench` there, so use it once per module.
#[cfg_attr(docsrs, doc(cfg(feature = "harness")))]
#[macro_export]
macro_rules! plugin_tests {
    (plugin: $krate:ident, tests: [$($name:ident),+ $(,)?] $(,)?) => {
        $crate::plugin_tests! {
            plugin: $krate,
            bench: |source| $crate::harness::TestBench::new(source, None, ""),
            tests: [$($name),+],
        }
    };
    (plugin: $krate:ident, bench: $bench:expr, tests: [$($name:ident),+ $(,)?] $(,)?) => {
        fn __plugin_tests_bench(
            source: $crate::harness::PluginSource,
        ) -> $crate::harness::TestBench {
            $crate::harness::__make_bench(source, $bench)
        }

        /// Each test against the plugin's rlib, linked into the test.
        mod linked {
            $(
                #[test]
                fn $name() {
                    super::$name(super::__plugin_tests_bench(
                        $crate::harness::PluginSource::Linked($krate::plugin_module()),
                    ))
                }
            )+
        }

        /// Each test against the plugin's `.so`, loaded as a host loads it.
        mod library {
            $(
                #[test]
                fn $name() {
                    super::$name(super::__plugin_tests_bench($crate::harness::__library(
                        stringify!($krate),
                    )))
                }
            )+
        }
    };
}
