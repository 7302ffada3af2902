//! The PCI root bus: configuration mechanism #1 (0xCF8 address latch,
//! 0xCFC data window), a host bridge at 00:00.0, BAR assignment the way
//! firmware would do it, and BAR access dispatch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use pci::{command, regs, BarAddress, BarType, ConfigSpace, Identity};

use super::PciDevice;
use crate::memory::{PCI_IO_END, PCI_IO_START, PCI_MMIO_END, PCI_MMIO_START};

/// Configuration address port.
pub const CONFIG_ADDRESS: u16 = 0xcf8;
/// Configuration data ports.
pub const CONFIG_DATA: u16 = 0xcfc;

/// The host bridge at 00:00.0.
pub struct HostBridge {
    config: ConfigSpace,
}

impl HostBridge {
    pub fn new() -> Self {
        HostBridge {
            config: ConfigSpace::new(Identity {
                vendor_id: 0x1b36, // Red Hat / QEMU
                device_id: 0x0008, // generic host bridge
                class_code: 0x06_00_00,
                ..Default::default()
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
    fn config_space(&self) -> &ConfigSpace {
        &self.config
    }
}

struct Slot {
    slot: u8,
    /// Who the function is (for `query-pci`, `device_del`).
    label: SlotLabel,
    dev: Mutex<Box<dyn PciDevice>>,
    /// The function's decoding BARs, refreshed after every config write,
    /// so that decoding an exit never waits for a function that is busy
    /// (e.g. a proxy waiting for its remote on another vCPU).
    bars: RwLock<Vec<BarAddress>>,
}

/// The name of a function on the bus.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SlotLabel {
    /// The device id (`[[device]] id`, `device_add id`).
    pub id: String,
    /// The `[[remote]]` serving it; `None` in-process (or the host bridge).
    pub remote: Option<String>,
}

impl Slot {
    fn new(slot: u8, label: SlotLabel, dev: Box<dyn PciDevice>) -> Slot {
        let bars = RwLock::new(dev.config_space().active_bars());
        Slot {
            slot,
            label,
            dev: Mutex::new(dev),
            bars,
        }
    }

    fn config_write(&self, dev: &mut Box<dyn PciDevice>, reg: usize, data: &[u8]) {
        dev.config_write(reg, data);
        *self.bars.write().unwrap_or_else(|e| e.into_inner()) = dev.config_space().active_bars();
    }
}

/// What `query-pci` shows of one function.
#[derive(Clone, Debug)]
pub struct FunctionInfo {
    pub slot: u8,
    pub label: SlotLabel,
    pub identity: Identity,
    pub interrupt_line: u8,
    /// BARs the function decodes now (memory or I/O enabled).
    pub bars: Vec<BarAddress>,
}

/// Held slots: deadline, and whether a failed access is made again.
type Held = std::collections::BTreeMap<u8, (Instant, bool)>;

/// Bus 0. Functions may be added and removed while vCPUs run (hotplug):
/// an exit takes a reference to its slot and releases the bus at once, so
/// a function busy with its remote never delays another's exits, nor a
/// `device_add`.
pub struct PciRoot {
    address: Mutex<u32>,
    slots: RwLock<Vec<Arc<Slot>>>,
    /// Where the next BAR goes in the MMIO and I/O windows (firmware-style
    /// bump allocation; hot-added functions continue after the boot ones,
    /// and freed space is not reused).
    cursor: Mutex<(u64, u64)>,
    /// Slots whose function is being brought back (its remote restarts),
    /// each until a deadline, and whether a failed access is made again:
    /// accesses to them wait ([`Self::hold`]).
    held: Mutex<Held>,
    held_changed: Condvar,
    /// Whether any slot is held (the one check an access pays otherwise).
    any_held: AtomicBool,
}

impl std::fmt::Debug for PciRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PciRoot")
            .field("slots", &self.slot_numbers())
            .finish()
    }
}

fn lock(dev: &Mutex<Box<dyn PciDevice>>) -> std::sync::MutexGuard<'_, Box<dyn PciDevice>> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

impl PciRoot {
    /// A bus with only the host bridge.
    pub fn new() -> Self {
        let bridge = SlotLabel {
            id: "host-bridge".into(),
            remote: None,
        };
        PciRoot {
            address: Mutex::new(0),
            slots: RwLock::new(vec![Arc::new(Slot::new(
                0,
                bridge,
                Box::new(HostBridge::new()),
            ))]),
            cursor: Mutex::new((PCI_MMIO_START, PCI_IO_START)),
            held: Mutex::new(std::collections::BTreeMap::new()),
            held_changed: Condvar::new(),
            any_held: AtomicBool::new(false),
        }
    }

    /// Holds the accesses to `slots` for at most `limit`: a vCPU that
    /// touches one of them waits until [`release`](Self::release) (the
    /// function is back, restored) or the limit (then it gets what the
    /// failed function answers: all-ones). An access that fails while
    /// held is made again once released, on the function then in the
    /// slot. This is how a remote's restart is a pause to the guest, not
    /// an error.
    pub fn hold(&self, slots: &[u8], limit: Duration) {
        self.hold_with(slots, limit, true);
    }

    /// [`hold`](Self::hold), except that an access that failed is not made
    /// again: for a device whose plugin failed on a request, which must not
    /// be sent to its new instance.
    pub fn hold_without_retry(&self, slots: &[u8], limit: Duration) {
        self.hold_with(slots, limit, false);
    }

    fn hold_with(&self, slots: &[u8], limit: Duration, retry: bool) {
        let deadline = Instant::now() + limit;
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for &s in slots {
            h.insert(s, (deadline, retry));
        }
        self.any_held.store(!h.is_empty(), Ordering::Release);
    }

    /// Ends the hold on `slots`; waiting accesses go on.
    pub fn release(&self, slots: &[u8]) {
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        for s in slots {
            h.remove(s);
        }
        self.any_held.store(!h.is_empty(), Ordering::Release);
        drop(h);
        self.held_changed.notify_all();
    }

    /// `slot`'s hold (deadline, retry) if it has one that has not
    /// expired; an expired one is dropped.
    fn live_hold(&self, h: &mut Held, slot: u8) -> Option<(Instant, bool)> {
        let (deadline, retry) = *h.get(&slot)?;
        if Instant::now() < deadline {
            return Some((deadline, retry));
        }
        h.remove(&slot);
        self.any_held.store(!h.is_empty(), Ordering::Release);
        None
    }

    /// Whether `slot` is held now so that a failed access is made again.
    fn is_held(&self, slot: u8) -> bool {
        if !self.any_held.load(Ordering::Acquire) {
            return false;
        }
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        self.live_hold(&mut h, slot).is_some_and(|(_, retry)| retry)
    }

    /// Waits while `slot` is held (up to its deadline).
    fn wait_while_held(&self, slot: u8) {
        if !self.any_held.load(Ordering::Acquire) {
            return;
        }
        let mut h = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while let Some((deadline, _)) = self.live_hold(&mut h, slot) {
            let left = deadline.saturating_duration_since(Instant::now());
            h = self
                .held_changed
                .wait_timeout(h, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Runs one access on the function of `s`: after any hold, and again
    /// if the function failed under it while held.
    fn access(&self, s: &Slot, mut f: impl FnMut(&mut Box<dyn PciDevice>)) {
        loop {
            self.wait_while_held(s.slot);
            let mut dev = lock(&s.dev);
            f(&mut dev);
            if !self.any_held.load(Ordering::Acquire) || !dev.failed() || !self.is_held(s.slot) {
                return;
            }
        }
    }

    fn slots(&self) -> Vec<Arc<Slot>> {
        self.slots.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The occupied slot numbers.
    pub fn slot_numbers(&self) -> Vec<u8> {
        self.slots().iter().map(|s| s.slot).collect()
    }

    /// Adds a function at `slot` (function 0), unnamed (tests, boot).
    pub fn add(&mut self, slot: u8, dev: Box<dyn PciDevice>) -> Result<()> {
        self.insert(slot, SlotLabel::default(), dev)
    }

    /// Adds a named function at `slot`, also while the VM runs. Its BARs
    /// stay unassigned until [`assign_resources`](Self::assign_resources).
    pub fn insert(&self, slot: u8, label: SlotLabel, dev: Box<dyn PciDevice>) -> Result<()> {
        let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
        if slot == 0 || slot > 31 {
            bail!("PCI slot {slot} is invalid (1..=31)");
        }
        if let Some(s) = slots.iter().find(|s| s.slot == slot) {
            bail!("PCI slot {slot} is in use by '{}'", s.label.id);
        }
        if !label.id.is_empty() && slots.iter().any(|s| s.label.id == label.id) {
            bail!("Duplicate ID '{}' for device", label.id);
        }
        slots.push(Arc::new(Slot::new(slot, label, dev)));
        Ok(())
    }

    /// Every function's slot and label, without touching the functions
    /// (a vCPU may hold one, waiting on its remote).
    pub fn labels(&self) -> Vec<(u8, SlotLabel)> {
        self.slots()
            .iter()
            .filter(|s| s.slot != 0)
            .map(|s| (s.slot, s.label.clone()))
            .collect()
    }

    /// The label (id, remote) of the function at `slot`.
    pub fn label_of(&self, slot: u8) -> Option<SlotLabel> {
        self.slots()
            .iter()
            .find(|s| s.slot == slot && slot != 0)
            .map(|s| s.label.clone())
    }

    /// The slot of the function named `id`.
    pub fn slot_of(&self, id: &str) -> Option<u8> {
        self.slots()
            .iter()
            .find(|s| s.slot != 0 && s.label.id == id)
            .map(|s| s.slot)
    }

    /// Removes the function at `slot` and shuts it down, once any access
    /// in flight has finished; from then on the slot reads all-ones.
    pub fn remove(&self, slot: u8) -> Option<SlotLabel> {
        let removed = {
            let mut slots = self.slots.write().unwrap_or_else(|e| e.into_inner());
            let pos = slots.iter().position(|s| s.slot == slot && slot != 0)?;
            slots.remove(pos)
        };
        lock(&removed.dev).shutdown();
        Some(removed.label.clone())
    }

    /// Puts `dev` in place of the function at `slot` (a restarted remote's
    /// new connection), giving it the placement the guest sees: BARs,
    /// interrupt line and command register, as the old function had them,
    /// and its MSI-X as the guest set it up.
    /// The old function is shut down on a thread of its own once the new
    /// one is in place. Accesses in flight finish on the old one first
    /// (they hold its lock).
    pub fn replace(&self, slot: u8, mut dev: Box<dyn PciDevice>) -> Result<()> {
        let s = self
            .slots()
            .into_iter()
            .find(|s| s.slot == slot && slot != 0)
            .ok_or_else(|| anyhow::anyhow!("PCI slot {slot} is empty"))?;
        let t0 = Instant::now();
        let mut old = lock(&s.dev);
        let locked = t0.elapsed();
        old.release_doorbells();
        let cs = old.config_space();
        for (index, spec) in cs.bar_specs() {
            let off = regs::BAR0 + index * 4;
            dev.config_write(off, &cs.read_value(off, 4).to_le_bytes());
            if spec.bar_type == BarType::Memory64 {
                dev.config_write(off + 4, &cs.read_value(off + 4, 4).to_le_bytes());
            }
        }
        let line = cs.read_value(regs::INTERRUPT_LINE, 1) as u8;
        let command = cs.command();
        dev.config_write(regs::INTERRUPT_LINE, &[line]);
        dev.config_write(regs::COMMAND, &command.to_le_bytes());
        // The guest's MSI-X set-up (table, enable, masks) stays as it was.
        if let Some(m) = old.take_msix() {
            dev.adopt_msix(m);
        }
        if let Some(m) = old.take_msi() {
            dev.adopt_msi(m);
        }
        let mut previous = std::mem::replace(&mut *old, dev);
        *s.bars.write().unwrap_or_else(|e| e.into_inner()) = old.config_space().active_bars();
        drop(old);
        // Where a restart's time goes (`HOST_LOG=info`).
        tracing::info!(
            "slot {slot}: old function's lock after {locked:?}, new one in place after {:?}",
            t0.elapsed()
        );
        // The old function is shut down beside the guest, not before its
        // accesses go on: a proxy's shutdown closes its channel and
        // writes its statistics (`HOST_STATS`: a line per register the
        // guest touched, two thousand for the LSI's SCRIPTS RAM), which
        // took 0.5-1 s of each restart in the nested L1.
        let retire = std::thread::Builder::new()
            .name(format!("retire-slot-{slot}"))
            .spawn(move || previous.shutdown());
        if let Err(e) = retire {
            tracing::warn!(
                "slot {slot}: no thread to shut the old function down ({e}); it is dropped unshut"
            );
        }
        Ok(())
    }

    /// Runs `f` on the function at `slot` (under its lock).
    pub fn with_function<T>(&self, slot: u8, f: impl FnOnce(&mut dyn PciDevice) -> T) -> Option<T> {
        let s = self.slots().into_iter().find(|s| s.slot == slot)?;
        let mut dev = lock(&s.dev);
        Some(f(dev.as_mut()))
    }

    /// Writes `writes` (offset, bytes) into the configuration space of the
    /// function at `slot` as the guest would, then lets the bus decode its
    /// BARs where they now are (a restored snapshot).
    pub fn restore_config(
        &self,
        slot: u8,
        f: impl FnOnce(&mut dyn PciDevice) -> Result<()>,
    ) -> Result<()> {
        let s = self
            .slots()
            .into_iter()
            .find(|s| s.slot == slot)
            .ok_or_else(|| anyhow::anyhow!("PCI slot {slot} is empty"))?;
        let mut dev = lock(&s.dev);
        f(dev.as_mut())?;
        *s.bars.write().unwrap_or_else(|e| e.into_inner()) = dev.config_space().active_bars();
        Ok(())
    }

    /// What `query-pci` shows, by slot.
    pub fn functions(&self) -> Vec<FunctionInfo> {
        let mut v: Vec<FunctionInfo> = self
            .slots()
            .iter()
            .map(|s| {
                let bars = s.bars.read().unwrap_or_else(|e| e.into_inner()).clone();
                let dev = lock(&s.dev);
                let cs = dev.config_space();
                FunctionInfo {
                    slot: s.slot,
                    label: s.label.clone(),
                    identity: cs.identity(),
                    interrupt_line: cs.read_value(regs::INTERRUPT_LINE, 1) as u8,
                    bars,
                }
            })
            .collect();
        v.sort_by_key(|f| f.slot);
        v
    }

    /// Assigns every function's BARs an address in the PCI windows
    /// (largest first, naturally aligned), writes the interrupt line and
    /// enables decoding, as firmware does before an OS boots.
    /// `irq_line(slot)` gives the IOAPIC pin of a slot's INTx.
    pub fn assign_resources(&self, irq_line: &dyn Fn(u8) -> Option<u8>) -> Result<()> {
        for s in self.slots() {
            if s.slot != 0 {
                self.assign(&s, irq_line(s.slot))?;
            }
        }
        Ok(())
    }

    /// The same for the one function at `slot`, added while the VM runs
    /// (what a hotplug-aware firmware does): it goes after everything
    /// placed so far, and no other function is touched.
    pub fn assign_resources_of(&self, slot: u8, irq_line: Option<u8>) -> Result<()> {
        let s = self
            .slots()
            .into_iter()
            .find(|s| s.slot == slot)
            .ok_or_else(|| anyhow::anyhow!("PCI slot {slot} is empty"))?;
        self.assign(&s, irq_line)
    }

    fn assign(&self, s: &Slot, irq_line: Option<u8>) -> Result<()> {
        let mut cursor = self.cursor.lock().unwrap_or_else(|e| e.into_inner());
        let mut dev = lock(&s.dev);
        let mut bars: Vec<(usize, pci::BarSpec)> = dev.config_space().bar_specs().collect();
        bars.sort_by_key(|b| std::cmp::Reverse(b.1.size));
        // Place on a copy of the cursors: a function that does not fit
        // takes no space.
        let (mut mmio, mut io) = *cursor;
        let mut placed = Vec::new();
        let mut cmd = 0u16;
        for (index, spec) in bars {
            let (cur, end) = match spec.bar_type {
                BarType::Io => (&mut io, PCI_IO_END),
                _ => (&mut mmio, PCI_MMIO_END),
            };
            let base = cur.next_multiple_of(spec.size.max(16));
            if base + spec.size > end {
                bail!(
                    "slot {}: no room for BAR {index} of {:#x} bytes",
                    s.slot,
                    spec.size
                );
            }
            *cur = base + spec.size;
            placed.push((index, spec, base));
            cmd |= match spec.bar_type {
                BarType::Io => command::IO_SPACE,
                _ => command::MEMORY_SPACE,
            };
        }
        *cursor = (mmio, io);
        for (index, spec, base) in placed {
            let off = regs::BAR0 + index * 4;
            dev.config_write(off, &(base as u32).to_le_bytes());
            if spec.bar_type == BarType::Memory64 {
                dev.config_write(off + 4, &((base >> 32) as u32).to_le_bytes());
            }
            tracing::debug!(
                slot = s.slot,
                index,
                base = format_args!("{base:#x}"),
                "BAR"
            );
        }
        if let Some(line) = irq_line {
            dev.config_write(regs::INTERRUPT_LINE, &[line]);
        }
        let mut c = [0u8; 2];
        dev.config_read(regs::COMMAND, &mut c);
        let c = u16::from_le_bytes(c) | cmd;
        dev.config_write(regs::COMMAND, &c.to_le_bytes());
        *s.bars.write().unwrap_or_else(|e| e.into_inner()) = dev.config_space().active_bars();
        Ok(())
    }

    fn target(&self, port: u16) -> Option<(Arc<Slot>, usize)> {
        let addr = *self.address.lock().unwrap_or_else(|e| e.into_inner());
        if addr & 0x8000_0000 == 0 {
            return None;
        }
        let bus = (addr >> 16) & 0xff;
        let dev = ((addr >> 11) & 0x1f) as u8;
        let func = (addr >> 8) & 0x7;
        if bus != 0 || func != 0 {
            return None;
        }
        let reg = (addr & 0xfc) as usize + usize::from(port - CONFIG_DATA);
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots
            .iter()
            .find(|s| s.slot == dev)
            .map(|s| (s.clone(), reg))
    }

    fn decode(&self, io: bool, addr: u64, len: u64) -> Option<(Arc<Slot>, usize, u64)> {
        let slots = self.slots.read().unwrap_or_else(|e| e.into_inner());
        slots.iter().find_map(|s| {
            let bars = s.bars.read().unwrap_or_else(|e| e.into_inner());
            bars.iter().find_map(|b| {
                if (b.spec.bar_type == BarType::Io) != io {
                    return None;
                }
                let offset = addr.checked_sub(b.base)?;
                (offset.checked_add(len)? <= b.spec.size).then_some((s.clone(), b.index, offset))
            })
        })
    }

    /// A port read; false when nothing on the bus decodes it.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> bool {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            let a = *self.address.lock().unwrap_or_else(|e| e.into_inner());
            data.copy_from_slice(&a.to_le_bytes());
            return true;
        }
        if (CONFIG_DATA..CONFIG_DATA + 4).contains(&port) {
            match self.target(port) {
                Some((s, reg)) if reg + data.len() <= 256 => {
                    self.access(&s, |d| d.config_read(reg, data))
                }
                _ => data.fill(0xff),
            }
            return true;
        }
        match self.decode(true, u64::from(port), data.len() as u64) {
            Some((s, bar, off)) => {
                self.access(&s, |d| d.bar_read(bar, off, data));
                true
            }
            None => false,
        }
    }

    /// A port write; false when nothing on the bus decodes it.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> bool {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            let mut v = [0u8; 4];
            v.copy_from_slice(data);
            *self.address.lock().unwrap_or_else(|e| e.into_inner()) = u32::from_le_bytes(v);
            return true;
        }
        if (CONFIG_DATA..CONFIG_DATA + 4).contains(&port) {
            if let Some((s, reg)) = self.target(port) {
                if reg + data.len() <= 256 {
                    self.access(&s, |d| s.config_write(d, reg, data));
                }
            }
            return true;
        }
        match self.decode(true, u64::from(port), data.len() as u64) {
            Some((s, bar, off)) => {
                self.access(&s, |d| d.bar_write(bar, off, data));
                true
            }
            None => false,
        }
    }

    /// An MMIO read; false when no BAR decodes it.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.decode(false, addr, data.len() as u64) {
            Some((s, bar, off)) => {
                self.access(&s, |d| d.bar_read(bar, off, data));
                true
            }
            None => false,
        }
    }

    /// An MMIO write; false when no BAR decodes it.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) -> bool {
        match self.decode(false, addr, data.len() as u64) {
            Some((s, bar, off)) => {
                self.access(&s, |d| d.bar_write(bar, off, data));
                true
            }
            None => false,
        }
    }

    /// A VM reset: every function (not the host bridge) is reset, then all
    /// BARs are placed afresh from the start of the windows, exactly as at
    /// boot ([`assign_resources`](Self::assign_resources)). The caller
    /// holds the vCPUs, so no access is in flight.
    pub fn reset(&self, irq_line: &dyn Fn(u8) -> Option<u8>) -> Result<()> {
        for s in self.slots() {
            if s.slot != 0 {
                let mut dev = lock(&s.dev);
                dev.reset();
                *s.bars.write().unwrap_or_else(|e| e.into_inner()) =
                    dev.config_space().active_bars();
            }
        }
        *self.cursor.lock().unwrap_or_else(|e| e.into_inner()) = (PCI_MMIO_START, PCI_IO_START);
        *self.address.lock().unwrap_or_else(|e| e.into_inner()) = 0;
        self.assign_resources(irq_line)
    }

    /// Shuts every function down.
    pub fn shutdown(&self) {
        for s in self.slots() {
            lock(&s.dev).shutdown();
        }
    }
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg_read32(root: &PciRoot, slot: u8, reg: u32) -> u32 {
        let a = 0x8000_0000u32 | (u32::from(slot) << 11) | reg;
        root.pio_write(CONFIG_ADDRESS, &a.to_le_bytes());
        let mut d = [0u8; 4];
        root.pio_read(CONFIG_DATA, &mut d);
        u32::from_le_bytes(d)
    }

    /// A function with one 16-byte I/O BAR reading `value`, or failed.
    struct Answers {
        config: ConfigSpace,
        value: u8,
        failed: bool,
    }

    impl Answers {
        fn new(value: u8, failed: bool) -> Box<Self> {
            let mut config = ConfigSpace::new(Identity {
                vendor_id: 0x1234,
                device_id: 0x5678,
                ..Default::default()
            });
            let spec = pci::BarSpec {
                bar_type: BarType::Io,
                size: 16,
                prefetchable: false,
            };
            config.add_bar(0, spec).unwrap();
            Box::new(Answers {
                config,
                value,
                failed,
            })
        }
    }

    impl PciDevice for Answers {
        fn config_read(&mut self, offset: usize, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: usize, data: &[u8]) {
            self.config.write(offset, data);
        }
        fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
            data.fill(if self.failed { 0xff } else { self.value });
        }
        fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
        fn config_space(&self) -> &ConfigSpace {
            &self.config
        }
        fn failed(&mut self) -> bool {
            self.failed
        }
    }

    fn read_port(root: &PciRoot, port: u16) -> u8 {
        let mut d = [0u8];
        assert!(root.pio_read(port, &mut d));
        d[0]
    }

    #[test]
    fn a_held_slot_waits_for_the_function_that_comes_back() {
        let root = Arc::new(PciRoot::new());
        root.insert(3, SlotLabel::default(), Answers::new(0x11, false))
            .unwrap();
        root.assign_resources(&|_| Some(20)).unwrap();
        let port = root.functions()[1].bars[0].base as u16;
        assert_eq!(read_port(&root, port), 0x11);
        // Its remote dies: the function fails, and a restart is coming.
        root.hold(&[3], Duration::from_secs(30));
        root.replace(3, Answers::new(0x11, true)).unwrap();
        let reader = {
            let root = root.clone();
            std::thread::spawn(move || read_port(&root, port))
        };
        // The reader waits (bounded by the test's own deadline).
        let t0 = Instant::now();
        while !reader.is_finished() && t0.elapsed() < Duration::from_millis(200) {
            std::thread::yield_now();
        }
        assert!(!reader.is_finished(), "a held access must wait");
        root.replace(3, Answers::new(0x22, false)).unwrap();
        root.release(&[3]);
        assert_eq!(reader.join().unwrap(), 0x22, "served by the new function");
    }

    #[test]
    fn a_hold_ends_at_its_limit_with_all_ones() {
        let root = PciRoot::new();
        root.insert(3, SlotLabel::default(), Answers::new(0x11, true))
            .unwrap();
        root.assign_resources(&|_| Some(20)).unwrap();
        let port = root.functions()[1].bars[0].base as u16;
        root.hold(&[3], Duration::from_millis(50));
        let t0 = Instant::now();
        assert_eq!(read_port(&root, port), 0xff);
        assert!(t0.elapsed() >= Duration::from_millis(50));
        // Without a hold a failed function answers at once.
        assert!(!root.is_held(3));
        assert_eq!(read_port(&root, port), 0xff);
    }

    #[test]
    fn host_bridge_and_empty_slots() {
        let root = PciRoot::new();
        assert_eq!(cfg_read32(&root, 0, 0), 0x0008_1b36);
        assert_eq!(cfg_read32(&root, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(cfg_read32(&root, 5, 0), 0xffff_ffff);
        // The address latch reads back (Linux's type-1 probe).
        let mut d = [0u8; 4];
        root.pio_read(CONFIG_ADDRESS, &mut d);
        assert_eq!(u32::from_le_bytes(d) & 0x8000_0000, 0x8000_0000);
    }
}
