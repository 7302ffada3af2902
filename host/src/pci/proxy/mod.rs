//! A proxy PCI function: the guest sees an ordinary function whose
//! configuration space and BARs live in a remote process, reached over
//! vfio-user or mpqemu (QEMU's `x-remote`, or `remote-host --protocol
//! mpqemu`) through one [`Transport`].
//!
//! - Configuration reads and writes are forwarded; writes to the BARs and
//!   the command register are mirrored into a local shadow
//!   [`ConfigSpace`] (built from the remote's region sizes and BAR flags)
//!   so the VMM decodes BAR exits without asking the remote.
//! - BAR reads wait for the reply; BAR writes are posted (vfio-user
//!   `No_reply`; mpqemu `RET`s collected later): the remote handles a
//!   socket's messages in order, so a later read still sees them.
//! - INTx: a KVM irqfd with a resample fd on the function's IOAPIC pin;
//!   both eventfds go to the remote (SET_IRQS, or mpqemu SET_IRQFD), so an
//!   interrupt and its EOI never pass through the VMM.
//! - All guest RAM is shared from the memfd (DMA_MAP, or mpqemu
//!   SYNC_SYSMEM).
//! - The fast path: with a remote of ours, BAR accesses go through a
//!   shared-memory access ring ([`channel::ring`], [`ProxyFunction::attach_ring`])
//!   instead of the socket; everything else still goes on the socket, after
//!   the ring is drained, so nothing overtakes a posted write.
//! - Doorbells: writes the device declared as such (a virtio queue
//!   notify) are KVM ioeventfds on the ring's remote end
//!   ([`doorbells`]): they never exit to the VMM.
//! - After a transport error the function is dead and reads all-ones.
//! - Every access is counted by register ([`AccessStats`]).

pub mod doorbells;
mod mpqemu;
pub mod transport;
mod vfio_user;

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use kvm_ioctls::VmFd;
use pci::{regs, BarType, ConfigSpace, Identity};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::msi::MsiRouter;
use super::msix::{GsiRoutes, MsixRouter};
use super::stats::AccessStats;
use super::PciDevice;
use crate::memory::GuestRam;
pub use transport::{BarTarget, Transport};

/// Called once when a function fails: (device id, reason).
pub type FailHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// What a dialect's setup hands the proxy function.
pub(crate) struct Setup {
    transport: Box<dyn Transport>,
    shadow: ConfigSpace,
    /// INTx (trigger, resample), when the function has a pin.
    intx: Option<(EventFd, EventFd)>,
    /// The function's MSI-X, found in its configuration space.
    msix: Option<plugin_api::function::Msix>,
    /// The function's MSI, found there too.
    msi: Option<plugin_api::function::Msi>,
}

/// One remote function.
pub struct ProxyFunction {
    id: String,
    transport: Box<dyn Transport>,
    shadow: ConfigSpace,
    dead: bool,
    /// Set by the supervisor when the remote died or hung: from then on
    /// the function reads all-ones without waiting for the channel.
    remote_failed: Option<Arc<AtomicBool>>,
    on_fail: Option<FailHook>,
    /// Kept alive for the irqfd (trigger, resample).
    _intx: Option<(EventFd, EventFd)>,
    /// The fast path, once attached.
    ring: Option<channel::ring::RingClient>,
    /// Accesses that reached the device (`checkpoint`: a saved state is
    /// current while this has not moved).
    activity: Arc<std::sync::atomic::AtomicU64>,
    stats: AccessStats,
    /// Where the function's MSI-X is, and (after `with_msix`) the table
    /// the VMM emulates for it.
    msix_found: Option<plugin_api::function::Msix>,
    msix: Option<MsixRouter>,
    /// Where the function's MSI is, and (after `with_msix`) its routes.
    msi_found: Option<plugin_api::function::Msi>,
    msi: Option<MsiRouter>,
    /// Writes KVM delivers to the remote by itself (with the ring).
    doorbells: Option<doorbells::Doorbells>,
    /// The device's doorbells, when its saved states outlive them
    /// (`Device::state_outlives_doorbells`): neither those KVM delivers nor
    /// those that exit here (before the fast path, during a restart) count
    /// as the guest reaching the device for [`crate::checkpoint`].
    state_doorbells: Option<Vec<channel::ring::DoorbellKey>>,
}

/// An eventfd as the borrowed fd the channels take.
pub(crate) fn borrow(e: &EventFd) -> BorrowedFd<'_> {
    // SAFETY: the eventfd is open for as long as `e`, which the borrow
    // cannot outlive.
    unsafe { BorrowedFd::borrow_raw(e.as_raw_fd()) }
}

fn u16_at(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}

/// The identity a remote's configuration space gives, whatever the
/// protocol it was read over.
fn identity_of(cfg: &[u8; 256]) -> Identity {
    Identity {
        vendor_id: u16_at(cfg, regs::VENDOR_ID),
        device_id: u16_at(cfg, regs::DEVICE_ID),
        class_code: u32::from_le_bytes([cfg[9], cfg[10], cfg[11], 0]),
        revision: cfg[regs::REVISION_ID],
        subsystem_vendor_id: u16_at(cfg, regs::SUBSYSTEM_VENDOR_ID),
        subsystem_id: u16_at(cfg, regs::SUBSYSTEM_ID),
        interrupt_pin: cfg[regs::INTERRUPT_PIN],
    }
}

/// INTx on `gsi` as KVM injects it without the VMM: an irqfd (trigger)
/// with a resample fd (EOI), both to be handed to the remote.
fn intx_irqfd(vm: &VmFd, gsi: u32) -> Result<(EventFd, EventFd)> {
    let trigger = EventFd::new(EFD_NONBLOCK).context("eventfd")?;
    let resample = EventFd::new(EFD_NONBLOCK).context("eventfd")?;
    vm.register_irqfd_with_resample(&trigger, &resample, gsi)
        .context("KVM_IRQFD with resample")?;
    Ok((trigger, resample))
}

impl ProxyFunction {
    /// Sets up the function behind `client`: reads its config space and
    /// regions, maps guest RAM, wires INTx to `gsi`.
    pub fn new(
        id: &str,
        client: crate::remote::RemoteClient,
        ram: &GuestRam,
        vm: &VmFd,
        gsi: u32,
    ) -> Result<ProxyFunction> {
        let setup = match client {
            crate::remote::RemoteClient::VfioUser(c) => vfio_user::setup(id, c, ram, vm, gsi)?,
            crate::remote::RemoteClient::Mpqemu { client, timeout } => {
                mpqemu::setup(id, client, timeout, ram, vm, gsi)?
            }
        };
        Ok(ProxyFunction {
            id: id.to_owned(),
            transport: setup.transport,
            shadow: setup.shadow,
            dead: false,
            remote_failed: None,
            on_fail: None,
            _intx: setup.intx,
            ring: None,
            activity: Arc::default(),
            stats: AccessStats::default(),
            msix_found: setup.msix,
            msix: None,
            msi_found: setup.msi,
            msi: None,
            doorbells: None,
            state_doorbells: None,
        })
    }

    /// Serves the function's MSI-X, if it has one: the VMM emulates its
    /// table (KVM routes from `routes`) and hands the remote one eventfd
    /// per vector, which the remote signals straight to KVM. An error when
    /// the remote does not take them.
    pub fn with_msix(mut self, vm: &Arc<VmFd>, routes: &Arc<GsiRoutes>) -> Result<Self> {
        if let Some(m) = self.msi_found {
            let router = MsiRouter::new(vm.clone(), routes.clone(), m)
                .with_context(|| format!("{}: MSI", self.id))?;
            self.hand_msi_eventfds(&router)
                .map_err(|e| anyhow::anyhow!("{}: MSI eventfds: {e}", self.id))?;
            self.msi = Some(router);
        }
        let Some(m) = self.msix_found else {
            return Ok(self);
        };
        let router = MsixRouter::new(vm.clone(), routes.clone(), m)
            .with_context(|| format!("{}: MSI-X", self.id))?;
        self.hand_eventfds(&router)
            .map_err(|e| anyhow::anyhow!("{}: MSI-X eventfds: {e}", self.id))?;
        self.msix = Some(router);
        Ok(self)
    }

    /// Gives the remote `router`'s eventfd for each MSI vector.
    fn hand_msi_eventfds(&mut self, router: &MsiRouter) -> std::result::Result<(), String> {
        let fds: Vec<BorrowedFd<'_>> = router.eventfds().into_iter().map(borrow).collect();
        self.transport.set_msi_eventfds(&fds)
    }

    /// Takes over `router` (a replaced function's): the new remote gets
    /// its eventfds, and the capability as the guest programmed it
    /// (address, data and masks first, Message Control last).
    fn adopt_msi_router(&mut self, router: MsiRouter) -> std::result::Result<(), String> {
        self.hand_msi_eventfds(&router)?;
        let (cap, s) = (router.cap(), router.state());
        use pci::msi::{ADDRESS_HI, ADDRESS_LO, CONTROL, DATA, MASK};
        self.transport
            .config_write(cap + ADDRESS_LO, &(s.address as u32).to_le_bytes())?;
        self.transport
            .config_write(cap + ADDRESS_HI, &((s.address >> 32) as u32).to_le_bytes())?;
        self.transport
            .config_write(cap + DATA, &s.data.to_le_bytes())?;
        self.transport
            .config_write(cap + MASK, &s.mask.to_le_bytes())?;
        let mut ctrl = [0u8; 2];
        self.transport.config_read(cap + CONTROL, &mut ctrl)?;
        let c = pci::msi::encode_control(u16::from_le_bytes(ctrl), s.enabled, s.granted);
        self.transport
            .config_write(cap + CONTROL, &c.to_le_bytes())?;
        self.msi = Some(router);
        Ok(())
    }

    /// Reads the MSI capability back from the remote after a write that
    /// touched it, and puts the routes in step.
    fn refresh_msi(&mut self) {
        let Some(cap) = self.msi.as_ref().map(MsiRouter::cap) else {
            return;
        };
        let mut b = [0u8; pci::msi::CAP_LEN];
        match self.transport.config_read(cap, &mut b) {
            Ok(()) => {
                if let Some(m) = self.msi.as_mut() {
                    m.update(pci::msi::MsiState::decode(&b));
                }
            }
            Err(e) => self.fail("MSI read-back", &e),
        }
    }

    /// Gives the remote `router`'s eventfd for each vector.
    fn hand_eventfds(&mut self, router: &MsixRouter) -> std::result::Result<(), String> {
        let fds: Vec<BorrowedFd<'_>> = router.eventfds().into_iter().map(borrow).collect();
        self.transport.set_msix_eventfds(&fds)
    }

    /// Takes over `router` (a replaced function's): the new remote gets
    /// its eventfds, and Message Control as the guest left it.
    fn adopt(&mut self, router: MsixRouter) -> std::result::Result<(), String> {
        self.hand_eventfds(&router)?;
        let cap = router.cap();
        let mut ctrl = [0u8; 2];
        self.transport.config_read(cap + 2, &mut ctrl)?;
        let c = pci::msix::encode_control(
            u16::from_le_bytes(ctrl),
            router.enabled(),
            router.function_masked(),
        );
        self.transport.config_write(cap + 2, &c.to_le_bytes())?;
        self.msix = Some(router);
        Ok(())
    }

    /// The MSI-X BAR is the VMM's: `Some(router)` when `bar` is it.
    fn msix_bar(&mut self, bar: usize) -> Option<&mut MsixRouter> {
        self.msix.as_mut().filter(|m| usize::from(m.bar()) == bar)
    }

    /// From now on BAR accesses go through `ring` (the remote serves it:
    /// the control channel's `ring-setup` succeeded).
    pub fn attach_ring(&mut self, mut ring: channel::ring::RingClient) {
        match ring.load_mirrors() {
            Ok(m) if !m.is_empty() => {
                tracing::info!("{}: {} register(s) read from mirrors", self.id, m.len())
            }
            Ok(_) => {}
            Err(e) => {
                // A table no remote of ours writes: every read goes to
                // the device, as without mirrors.
                tracing::warn!("{}: mirrors refused ({e}); reads reach the device", self.id);
            }
        }
        self.ring = Some(ring);
    }

    /// From now on the guest's writes of `d` reach the remote through KVM
    /// (the remote took their eventfds with `ring-setup`), wherever the
    /// guest places the BAR.
    pub fn attach_doorbells(&mut self, mut d: doorbells::Doorbells) {
        // The remote's word is checked against the function's own BARs: a
        // doorbell past its BAR's end (another device's registers, or
        // RAM) or in the MSI-X table the VMM emulates would swallow the
        // guest's writes meant for something else.
        let msix_bar = self.msix.as_ref().map(|m| m.bar());
        let shadow = &self.shadow;
        let id = &self.id;
        d.retain(|k| {
            let fits = shadow.bar_spec(usize::from(k.bar)).is_some_and(|s| {
                k.offset
                    .checked_add(u64::from(k.len))
                    .is_some_and(|end| end <= s.size)
            });
            let ok = fits && msix_bar != Some(k.bar);
            if !ok {
                tracing::warn!(
                    "{id}: the remote's doorbell BAR{} {:#x} ({} bytes) is not inside one of the device's BARs; refused",
                    k.bar,
                    k.offset,
                    k.len
                );
            }
            ok
        });
        d.sync(&self.shadow);
        tracing::info!("{}: {} doorbell(s) through KVM", self.id, d.len());
        self.doorbells = Some(d);
    }

    /// Doorbells the device took, as its remote counts them (0 without).
    fn doorbells_taken(&self) -> u64 {
        self.ring
            .as_ref()
            .filter(|_| self.doorbells.is_some())
            .map_or(0, |r| r.doorbells_taken().load())
    }

    /// How many doorbells KVM delivers for this function.
    pub fn doorbell_count(&self) -> usize {
        self.doorbells.as_ref().map_or(0, doorbells::Doorbells::len)
    }

    /// The doorbells follow the shadow's BAR placement.
    fn sync_doorbells(&mut self) {
        if let Some(d) = self.doorbells.as_mut() {
            d.sync(&self.shadow);
        }
    }

    /// The device's saved states stay good after its doorbells `keys`
    /// (the remote said so in `device-doorbells`).
    pub fn set_state_doorbells(&mut self, keys: Vec<channel::ring::DoorbellKey>) {
        self.state_doorbells = Some(keys);
    }

    /// What the guest has done to the device: the accesses that reached
    /// it, and (on the ring) the doorbells it took, unless the device's
    /// state outlives them.
    pub fn activity(&self) -> crate::checkpoint::Activity {
        crate::checkpoint::Activity {
            accesses: self.activity.clone(),
            doorbells: self
                .ring
                .as_ref()
                .filter(|_| self.doorbells.is_some() && self.state_doorbells.is_none())
                .map(channel::ring::RingClient::doorbells_taken),
        }
    }

    /// Whether a write of `data` at `offset` in BAR `bar` is one of the
    /// doorbells the device's state outlives.
    fn is_state_doorbell(&self, bar: usize, offset: u64, data: &[u8]) -> bool {
        self.state_doorbells
            .as_ref()
            .is_some_and(|keys| keys.iter().any(|k| k.matches(bar, offset, data)))
    }

    fn reached(&self) {
        self.activity
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// The access just counted by [`reached`](Self::reached) failed: to
    /// the device's saved state it never happened (a restart restores the
    /// state from before it; whole-remote restarts make it again, device
    /// restarts drop it as the request that broke the plugin).
    fn not_reached(&self) {
        self.activity
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Whether BAR accesses take the fast path.
    pub fn has_ring(&self) -> bool {
        self.ring.is_some()
    }

    /// Whether the supervisor reported the remote dead or hung (also the
    /// `give_up` of ring waits).
    fn reported(flag: &Option<Arc<AtomicBool>>) -> bool {
        flag.as_ref().is_some_and(|f| f.load(Ordering::Acquire))
    }

    /// A `give_up` for ring waits.
    fn give_up(flag: &Option<Arc<AtomicBool>>) -> impl Fn() -> bool + '_ {
        move || Self::reported(flag)
    }

    /// Before anything goes on the socket: every access on the ring is
    /// applied. False when the function failed (waiting or before).
    fn drain_ring(&mut self) -> bool {
        let Some(ring) = self.ring.as_mut() else {
            return true;
        };
        let r = ring.drain(&Self::give_up(&self.remote_failed));
        if let Err(e) = r {
            // A posted access failed (see `not_reached`).
            self.not_reached();
            self.fail("access ring", &e);
            return false;
        }
        true
    }

    fn fail(&mut self, what: &str, e: &dyn std::fmt::Display) {
        if !self.dead {
            tracing::error!("{}: {what}: {e}; the device now reads all-ones", self.id);
            eprintln!(
                "host: device {}: {what}: {e}; it now reads all-ones",
                self.id
            );
            if let Some(hook) = &self.on_fail {
                hook(&self.id, &format!("{what}: {e}"));
            }
        }
        self.dead = true;
    }

    /// Ties the function to its remote's failure flag (set by the
    /// supervisor) and reports its own failure through `on_fail`.
    pub fn with_supervision(mut self, remote_failed: Arc<AtomicBool>, on_fail: FailHook) -> Self {
        self.remote_failed = Some(remote_failed);
        self.on_fail = Some(on_fail);
        self
    }

    /// Whether accesses must not reach the remote any more.
    fn unusable(&mut self) -> bool {
        if !self.dead && Self::reported(&self.remote_failed) {
            // Quietly: the supervisor already reported the remote.
            self.dead = true;
        }
        self.dead
    }

    /// The channel's socket (the supervisor polls a duplicate for hang-up).
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        self.transport.socket_fd()
    }

    /// The access counters.
    pub fn access_stats(&self) -> &AccessStats {
        &self.stats
    }

    /// Where an access to BAR `bar` goes, or `None` when the guest may
    /// not reach the remote (dead, or its BAR placement is lost).
    fn target(&mut self, bar: usize) -> Option<BarTarget> {
        if self.unusable() {
            return None;
        }
        if let Err(e) = self.transport.before_bar_access(&self.shadow) {
            self.fail("BAR placement check", &e);
            return None;
        }
        Some(BarTarget {
            index: bar,
            base: self.shadow.bar_base(bar).unwrap_or(0),
            memory: self
                .shadow
                .bar_spec(bar)
                .is_some_and(|s| s.bar_type != BarType::Io),
        })
    }
}

impl PciDevice for ProxyFunction {
    fn failed(&mut self) -> bool {
        self.unusable()
    }

    // A remote's state crosses our control channel when it has one (the
    // snapshot code asks it there); these are for one without.
    fn wire_migration(&mut self) -> std::result::Result<(), String> {
        if self.unusable() {
            return Err("its remote has failed".into());
        }
        self.transport.migration()
    }

    fn save_state_quiesced(
        &mut self,
        within: std::time::Duration,
    ) -> Option<std::result::Result<Vec<u8>, String>> {
        if self.unusable() {
            return Some(Err("its remote has failed".into()));
        }
        Some(self.transport.save_state(within))
    }

    fn restore_state(&mut self, state: &[u8]) -> Option<std::result::Result<(), String>> {
        if self.unusable() {
            return Some(Err("its remote has failed".into()));
        }
        Some(self.transport.restore_state(state))
    }

    fn wire_dirty_log(
        &mut self,
        action: &str,
        regions: &[(u64, u64)],
    ) -> std::result::Result<Vec<(u64, u64)>, String> {
        if self.unusable() {
            return Err("its remote has failed".into());
        }
        self.transport.dma_log(action, regions)
    }

    fn settle(&mut self) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        // The remote still runs (only the device failed): its ring thread
        // applies, or refuses, what is published.
        let _ = ring.drain(&Self::give_up(&self.remote_failed));
        for _ in 0..ring.take_refused_writes() {
            self.not_reached();
        }
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.stats.config_reads += 1;
        if self.unusable() || !self.drain_ring() {
            data.fill(0xff);
            return;
        }
        if let Err(e) = self.transport.config_read(offset, data) {
            data.fill(0xff);
            self.fail("config read", &e);
            return;
        }
        if let Some(m) = &self.msi {
            m.patch_read(offset, data);
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.stats.config_writes += 1;
        let end = offset + data.len();
        let touches = |a: usize, b: usize| offset < b && end > a;
        if touches(regs::BAR0, regs::BAR0 + 24) || touches(regs::COMMAND, regs::COMMAND + 2) {
            self.shadow.write(offset, data);
            self.sync_doorbells();
        }
        if self.unusable() || !self.drain_ring() {
            return;
        }
        self.reached();
        if let Err(e) = self.transport.config_write(offset, data) {
            self.fail("config write", &e);
            return;
        }
        if self
            .msi
            .as_ref()
            .is_some_and(|m| m.touches(offset, data.len()))
        {
            self.refresh_msi();
        }
        // Message Control (enable, function mask) lives in the remote's
        // configuration space; the routes follow it.
        if let Some(cap) = self.msix.as_ref().map(MsixRouter::cap) {
            if touches(cap + 2, cap + 4) {
                let mut ctrl = [0u8; 2];
                if self.transport.config_read(cap + 2, &mut ctrl).is_ok() {
                    let (enabled, masked) = pci::msix::decode_control(u16::from_le_bytes(ctrl));
                    if let Some(m) = self.msix.as_mut() {
                        m.set_control(enabled, masked);
                    }
                }
            }
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if let Some(m) = self.msix_bar(bar) {
            m.read(offset, data);
            return;
        }
        let Some(target) = self.target(bar) else {
            data.fill(0xff);
            return;
        };
        let t = Instant::now();
        if let Some(ring) = self.ring.as_ref() {
            if ring.read_mirror(bar as u8, offset, data) {
                self.stats
                    .mirrored_read(bar, offset, data.len(), t.elapsed());
                return;
            }
        }
        // A read the device declared free of side effects (a mirrored
        // register) leaves its state as it was: its idle save stays
        // current.
        let counted = !self
            .ring
            .as_ref()
            .is_some_and(|r| r.is_mirrored(bar as u8, offset, data.len()));
        if counted {
            self.reached();
        }
        let r = match self.ring.as_mut() {
            Some(ring) => ring
                .read(bar as u8, offset, data, &Self::give_up(&self.remote_failed))
                .map_err(|e| format!("access ring: {e}")),
            None => self.transport.bar_read(target, offset, data),
        };
        self.stats.read(bar, offset, data.len(), t.elapsed());
        if let Err(e) = r {
            data.fill(0xff);
            if counted {
                self.not_reached();
            }
            self.fail("BAR read", &e);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if let Some(m) = self.msix_bar(bar) {
            m.write(offset, data);
            return;
        }
        let Some(target) = self.target(bar) else {
            return;
        };
        self.stats.write(bar, offset, data.len());
        let counted = !self.is_state_doorbell(bar, offset, data);
        if counted {
            self.reached();
        }
        let r = match self.ring.as_mut() {
            Some(ring) => ring
                .write(bar as u8, offset, data, &Self::give_up(&self.remote_failed))
                .map_err(|e| format!("access ring: {e}")),
            None => self.transport.bar_write(target, offset, data),
        };
        if let Err(e) = r {
            if counted {
                self.not_reached();
            }
            self.fail("BAR write", &e);
        }
    }

    fn config_space(&self) -> &ConfigSpace {
        &self.shadow
    }

    fn take_msix(&mut self) -> Option<MsixRouter> {
        self.msix.take()
    }

    fn take_msi(&mut self) -> Option<MsiRouter> {
        self.msi.take()
    }

    fn adopt_msi(&mut self, router: MsiRouter) {
        if self.msi_found != Some(router.msi()) {
            tracing::warn!(
                "{}: the new function's MSI differs; the guest sets it up again",
                self.id
            );
            return;
        }
        if self.unusable() {
            return;
        }
        if let Err(e) = self.adopt_msi_router(router) {
            self.fail("MSI hand-over", &e);
        }
    }

    fn signal_msix(&mut self, vector: u16) {
        if let Some(m) = &self.msix {
            m.signal(vector);
        }
    }

    fn signal_msi(&mut self, vector: u16) {
        if let Some(m) = &self.msi {
            m.signal(vector);
        }
    }

    fn release_doorbells(&mut self) {
        if let Some(d) = self.doorbells.as_mut() {
            d.release();
        }
    }

    fn adopt_msix(&mut self, router: MsixRouter) {
        let same = self.msix_found.is_some_and(|m| router.same_layout(&m));
        if !same {
            tracing::warn!(
                "{}: the new function's MSI-X differs; the guest sets it up again",
                self.id
            );
            return;
        }
        if self.unusable() {
            return;
        }
        if let Err(e) = self.adopt(router) {
            self.fail("MSI-X hand-over", &e);
        }
    }

    /// A cheap request on the device's own channel (vfio-user
    /// DEVICE_GET_INFO, mpqemu a vendor-id read), for remotes the VMM has
    /// no control channel to.
    fn heartbeat(&mut self) -> Option<Result<(), String>> {
        // A failed channel is out of step with its remote: it can no
        // longer tell whether the remote answers.
        if self.unusable() {
            return None;
        }
        if !self.drain_ring() {
            return Some(Err("access ring".into()));
        }
        let r = self.transport.heartbeat();
        if let Err(e) = &r {
            self.fail("heartbeat", e);
        }
        Some(r)
    }

    /// The transport's device reset; the shadow forgets the placement: the
    /// VMM assigns BARs afresh and the writes reach both.
    fn reset(&mut self) {
        self.shadow.reset();
        self.sync_doorbells();
        if let Some(m) = self.msix.as_mut() {
            m.reset();
        }
        if let Some(m) = self.msi.as_mut() {
            m.reset();
        }
        if self.unusable() || !self.drain_ring() {
            return;
        }
        if let Err(e) = self.transport.reset() {
            self.fail("device reset", &e);
        }
    }

    fn stats(&self) -> Option<serde_json::Value> {
        let mut v = self.stats.to_json();
        v["placement"] = "remote".into();
        // Writes KVM delivered to the remote without the VMM, as the
        // remote counts them.
        v["doorbells"] = self.doorbells_taken().into();
        Some(v)
    }

    fn shutdown(&mut self) {
        // The remote sees EOF, drops this client and (when spawned for us
        // on an inherited fd) exits.
        self.release_doorbells();
        let healthy = !self.dead && self.drain_ring();
        let s = &self.stats;
        let (reads, _, writes) = s.totals();
        let avg = s.read_mean_us();
        tracing::info!(
            "{}: {reads} BAR reads (mean {avg:.1} µs), {writes} posted BAR writes, {} config reads, {} config writes",
            self.id,
            s.config_reads,
            s.config_writes
        );
        let posted_failures = self.transport.close(healthy);
        if std::env::var_os("HOST_STATS").is_some() {
            eprintln!(
                "host-stats: device={} bar_reads={reads} bar_read_mean_us={avg:.1} bar_writes={writes} config_reads={} config_writes={} posted_failures={posted_failures} doorbells={}",
                self.id, s.config_reads, s.config_writes, self.doorbells_taken()
            );
            for l in s.register_lines(&self.id) {
                eprintln!("{l}");
            }
        }
        self.dead = true;
    }
}
