//! MSI-X in the VMM (ARCHITECTURE.md, "the VMM owns the table"): a
//! function's table and pending bits are emulated here, in the process
//! that routes interrupts, and each vector is a KVM MSI route with an
//! irqfd. The device, in whichever process, only signals its vector's
//! eventfd: KVM turns that into the message the guest programmed, with no
//! VMM thread on the way, and a device cannot send a message the guest
//! did not program.
//!
//! Masking follows the specification with the irqfd detached: a vector
//! that is masked (or whose function is masked, or with MSI-X disabled)
//! has no irqfd, so a signal stays counted in its eventfd; that count is
//! its pending bit, and attaching the irqfd again at unmask delivers it
//! (KVM injects an eventfd already signalled when the irqfd is attached).
//! While MSI-X is disabled nothing stays pending.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use pci::msix::{MsiMessage, MsixTable};
use plugin_api::function::Msix;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The first GSI MSI routes take (0-23 are the IOAPIC's pins).
const FIRST_MSI_GSI: u32 = 24;
/// KVM takes at most 4096 routes (KVM_MAX_IRQ_ROUTES); the default ones
/// (40) come first.
const MAX_GSI: u32 = 4096 - 64;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The VM's GSI routing table: KVM's default routes (the PIC's and the
/// IOAPIC's pins) plus one MSI route per live MSI-X or MSI vector.
/// `KVM_SET_GSI_ROUTING` replaces the whole table, so one owner keeps it.
#[derive(Default)]
pub struct GsiRoutes {
    inner: Mutex<RoutesInner>,
}

#[derive(Default)]
struct RoutesInner {
    /// GSIs handed out (freed ones are reused).
    used: std::collections::BTreeSet<u32>,
    msi: BTreeMap<u32, MsiMessage>,
}

impl GsiRoutes {
    pub fn new() -> Arc<Self> {
        Arc::default()
    }

    fn allocate(&self, n: usize) -> Result<Vec<u32>> {
        let mut g = lock(&self.inner);
        let free: Vec<u32> = (FIRST_MSI_GSI..MAX_GSI)
            .filter(|gsi| !g.used.contains(gsi))
            .take(n)
            .collect();
        if free.len() < n {
            bail!("no {n} free GSIs for message vectors (KVM allows {MAX_GSI})");
        }
        g.used.extend(free.iter().copied());
        Ok(free)
    }

    fn free(&self, vm: &VmFd, gsis: &[u32]) {
        let mut g = lock(&self.inner);
        for gsi in gsis {
            g.used.remove(gsi);
            g.msi.remove(gsi);
        }
        if let Err(e) = Self::commit(vm, &g) {
            tracing::warn!("GSI routing: {e:#}");
        }
    }

    /// Routes `gsi` to `msg` and updates KVM's table.
    fn route(&self, vm: &VmFd, gsi: u32, msg: MsiMessage) -> Result<()> {
        let mut g = lock(&self.inner);
        let before = g.msi.insert(gsi, msg);
        if before == Some(msg) {
            return Ok(());
        }
        let r = Self::commit(vm, &g);
        if r.is_err() {
            // KVM kept its table: so does this one.
            match before {
                Some(m) => g.msi.insert(gsi, m),
                None => g.msi.remove(&gsi),
            };
        }
        r
    }

    fn commit(vm: &VmFd, g: &RoutesInner) -> Result<()> {
        let mut entries = Vec::new();
        let chip = |gsi: u32, irqchip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = irqchip;
            e.u.irqchip.pin = pin;
            e
        };
        // KVM's default routing on x86, which our INTx lines use.
        for gsi in 0..24 {
            entries.push(chip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 8 {
                entries.push(chip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(chip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
        }
        for (&gsi, m) in &g.msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = m.address as u32;
            e.u.msi.address_hi = (m.address >> 32) as u32;
            e.u.msi.data = m.data;
            entries.push(e);
        }
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| anyhow::anyhow!("GSI routing table: {e:?}"))?;
        vm.set_gsi_routing(&routing).context("KVM_SET_GSI_ROUTING")
    }
}

struct Vector {
    evt: EventFd,
    gsi: u32,
    /// The irqfd is attached (the vector is live).
    attached: bool,
}

/// A function's message vectors (MSI-X or MSI) as KVM sees them: an
/// eventfd and a GSI each; a live vector's eventfd is attached as an
/// irqfd to its GSI, routed to the message the guest programmed. A
/// detached vector's eventfd keeps what is signalled: that count is its
/// pending bit.
pub struct VectorSet {
    vm: Arc<VmFd>,
    routes: Arc<GsiRoutes>,
    vectors: Vec<Vector>,
    /// "MSI-X" or "MSI", for the log.
    what: &'static str,
}

impl VectorSet {
    /// `n` vectors, all detached.
    pub fn new(
        vm: Arc<VmFd>,
        routes: Arc<GsiRoutes>,
        n: usize,
        what: &'static str,
    ) -> Result<Self> {
        let gsis = routes.allocate(n)?;
        let mut vectors = Vec::with_capacity(n);
        for &gsi in &gsis {
            match EventFd::new(EFD_NONBLOCK) {
                Ok(evt) => vectors.push(Vector {
                    evt,
                    gsi,
                    attached: false,
                }),
                Err(e) => {
                    routes.free(&vm, &gsis);
                    return Err(e).with_context(|| format!("eventfd for an {what} vector"));
                }
            }
        }
        Ok(VectorSet {
            vm,
            routes,
            vectors,
            what,
        })
    }

    pub fn len(&self) -> usize {
        self.vectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vectors.is_empty()
    }

    /// The eventfd the device signals for each vector, in order.
    pub fn eventfds(&self) -> Vec<&EventFd> {
        self.vectors.iter().map(|v| &v.evt).collect()
    }

    /// Signals vector `v` as the device would.
    pub fn signal(&self, v: usize) {
        if let Some(vec) = self.vectors.get(v) {
            let _ = vec.evt.write(1);
        }
    }

    /// Whether vector `v` is pending: detached, with a signal kept.
    pub fn pending(&self, v: usize) -> bool {
        self.vectors
            .get(v)
            .is_some_and(|v| !v.attached && readable(&v.evt))
    }

    /// Forgets what vector `v` kept (nothing stays pending).
    pub fn drop_pending(&self, v: usize) {
        if let Some(vec) = self.vectors.get(v) {
            let _ = vec.evt.read();
        }
    }

    /// Makes vector `v` live with message `msg` (routed, irqfd attached:
    /// a signal kept meanwhile is delivered at once), or with `None`
    /// detached.
    pub fn set(&mut self, v: usize, msg: Option<MsiMessage>) {
        let what = self.what;
        let Some(vec) = self.vectors.get_mut(v) else {
            return;
        };
        match msg {
            Some(msg) => {
                if let Err(e) = self.routes.route(&self.vm, vec.gsi, msg) {
                    tracing::warn!("{what} vector {v}: {e:#}");
                    return;
                }
                if !vec.attached {
                    match self.vm.register_irqfd(&vec.evt, vec.gsi) {
                        Ok(()) => vec.attached = true,
                        Err(e) => tracing::warn!("{what} vector {v}: KVM_IRQFD: {e}"),
                    }
                }
            }
            None if vec.attached => {
                if let Err(e) = self.vm.unregister_irqfd(&vec.evt, vec.gsi) {
                    tracing::warn!("{what} vector {v}: KVM_IRQFD deassign: {e}");
                }
                vec.attached = false;
            }
            None => {}
        }
    }
}

impl Drop for VectorSet {
    fn drop(&mut self) {
        for v in &mut self.vectors {
            if v.attached {
                let _ = self.vm.unregister_irqfd(&v.evt, v.gsi);
            }
        }
        let gsis: Vec<u32> = self.vectors.iter().map(|v| v.gsi).collect();
        self.routes.free(&self.vm, &gsis);
    }
}

/// One function's MSI-X as the VMM serves it.
pub struct MsixRouter {
    msix: Msix,
    table: MsixTable,
    vectors: VectorSet,
    enabled: bool,
    function_masked: bool,
}

impl MsixRouter {
    /// Eventfds and GSIs for `msix`'s vectors, all masked.
    pub fn new(vm: Arc<VmFd>, routes: Arc<GsiRoutes>, msix: Msix) -> Result<Self> {
        let n = usize::from(msix.layout.vectors);
        Ok(MsixRouter {
            vectors: VectorSet::new(vm, routes, n, "MSI-X")?,
            table: MsixTable::new(msix.layout),
            msix,
            enabled: false,
            function_masked: false,
        })
    }

    /// The BAR holding the table and the PBA.
    pub fn bar(&self) -> u8 {
        self.msix.layout.table_bar
    }

    /// The capability's offset in configuration space.
    pub fn cap(&self) -> usize {
        self.msix.cap
    }

    /// The eventfd the device signals for each vector, in order.
    pub fn eventfds(&self) -> Vec<&EventFd> {
        self.vectors.eventfds()
    }

    /// Vector `v`'s eventfd (an in-process device signals it directly);
    /// dropped while MSI-X is disabled.
    pub fn signal(&self, v: u16) {
        if !self.enabled {
            return;
        }
        self.vectors.signal(usize::from(v));
    }

    /// A read of the MSI-X BAR at `offset`.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let l = self.msix.layout;
        let (t, p) = (u64::from(l.table_offset), u64::from(l.pba_offset));
        if (t..t + l.table_size()).contains(&offset) {
            self.table.read_table(offset - t, data);
        } else if (p..p + l.pba_size()).contains(&offset) {
            // A detached vector's eventfd count is its pending bit.
            let mut pba = vec![0u8; l.pba_size() as usize];
            for i in 0..self.vectors.len() {
                if self.vectors.pending(i) {
                    pba[i / 8] |= 1 << (i % 8);
                }
            }
            let start = (offset - p) as usize;
            for (i, d) in data.iter_mut().enumerate() {
                *d = pba.get(start + i).copied().unwrap_or(0);
            }
        }
    }

    /// A write to the MSI-X BAR at `offset` (the PBA is read-only).
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let l = self.msix.layout;
        let t = u64::from(l.table_offset);
        if !(t..t + l.table_size()).contains(&offset) {
            return;
        }
        let at = offset - t;
        let _ = self
            .table
            .write_table(at, data, self.enabled, self.function_masked);
        let first = (at / pci::msix::ENTRY_SIZE) as u16;
        let last = ((at + data.len() as u64 - 1) / pci::msix::ENTRY_SIZE) as u16;
        for v in first..=last {
            self.update(v);
        }
    }

    /// Message Control as the guest left it after a configuration write.
    pub fn set_control(&mut self, enabled: bool, function_masked: bool) {
        if (enabled, function_masked) == (self.enabled, self.function_masked) {
            return;
        }
        if enabled && !self.enabled {
            // What was raised while disabled was dropped, not pending.
            for v in 0..self.vectors.len() {
                self.vectors.drop_pending(v);
            }
        }
        self.enabled = enabled;
        self.function_masked = function_masked;
        for v in 0..self.msix.layout.vectors {
            self.update(v);
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    pub fn function_masked(&self) -> bool {
        self.function_masked
    }

    /// Whether this router serves the same layout as `other` (a replaced
    /// function's is taken over only then).
    pub fn same_layout(&self, other: &plugin_api::function::Msix) -> bool {
        self.msix.layout == other.layout && self.msix.cap == other.cap
    }

    /// A function reset: every vector masked, MSI-X disabled.
    pub fn reset(&mut self) {
        self.table.reset();
        self.enabled = false;
        self.function_masked = false;
        for v in 0..self.msix.layout.vectors {
            self.update(v);
        }
    }

    /// Attaches or detaches vector `v`'s irqfd as its state says.
    fn update(&mut self, v: u16) {
        let live = self.enabled && !self.function_masked && !self.table.masked(v);
        let msg = self.table.message(v);
        self.vectors.set(usize::from(v), live.then_some(msg));
        if !self.enabled {
            // Disabled: nothing stays pending.
            self.vectors.drop_pending(usize::from(v));
        }
    }
}

/// Whether `evt` has a count (without taking it).
fn readable(evt: &EventFd) -> bool {
    let mut p = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call; timeout 0.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLIN != 0
}
