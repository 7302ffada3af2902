//! A proxy PCI function: the guest sees an ordinary function whose
//! configuration space and BARs live in a remote process, reached over
//! vfio-user or mpqemu (QEMU's `x-remote`, or `remote-host --protocol
//! mpqemu`).
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
//! - mpqemu specifics: BAR accesses carry absolute addresses (the shadow's
//!   BAR base plus the offset); configuration accesses with
//!   `offset + 4 > 256` are not forwarded (QEMU 7.2's `x-remote` shuts
//!   down on them); and before the first BAR access the remote's BARs and
//!   command register are checked against the shadow and written again if
//!   they differ (QEMU 7.2 resets its device after it has started reading
//!   the socket, which can wipe the VMM's early configuration writes).
//! - After a transport error the function is dead and reads all-ones.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use channel::mpqemu::{MpqemuClient, SysmemRegion};
use channel::vfio_user::{
    VfioUserClient, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_EVENTFD, PCI_CONFIG_REGION_INDEX,
    PCI_INTX_IRQ_INDEX,
};
use kvm_ioctls::VmFd;
use pci::{regs, BarSpec, BarType, ConfigSpace, Identity};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::PciDevice;
use crate::memory::GuestRam;

/// Access counters of one proxy function.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProxyStats {
    pub bar_reads: u64,
    pub bar_read_time: Duration,
    pub bar_writes: u64,
    pub config_reads: u64,
    pub config_writes: u64,
}

/// The connection to the remote function.
enum Transport {
    VfioUser(VfioUserClient),
    Mpqemu {
        client: MpqemuClient,
        /// Whether the remote's BAR placement has been checked against the
        /// shadow since setup.
        verified: bool,
    },
}

/// Called once when a function fails: (device id, reason).
pub type FailHook = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// One remote function.
pub struct ProxyFunction {
    id: String,
    client: Transport,
    shadow: ConfigSpace,
    dead: bool,
    /// Set by the supervisor when the remote died or hung: from then on
    /// the function reads all-ones without waiting for the channel.
    remote_failed: Option<Arc<AtomicBool>>,
    on_fail: Option<FailHook>,
    /// Kept alive for the irqfd (trigger, resample).
    _intx: Option<(EventFd, EventFd)>,
    stats: ProxyStats,
}

fn borrow(e: &EventFd) -> BorrowedFd<'_> {
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
        match client {
            crate::remote::RemoteClient::VfioUser(c) => Self::new_vfio_user(id, c, ram, vm, gsi),
            crate::remote::RemoteClient::Mpqemu { client, timeout } => {
                Self::new_mpqemu(id, client, timeout, ram, vm, gsi)
            }
        }
    }

    fn new_vfio_user(
        id: &str,
        mut client: VfioUserClient,
        ram: &GuestRam,
        vm: &VmFd,
        gsi: u32,
    ) -> Result<ProxyFunction> {
        let info = client.device_info().context("DEVICE_GET_INFO")?;
        if info.num_regions <= PCI_CONFIG_REGION_INDEX {
            bail!("{id}: the remote has no PCI config region");
        }
        let mut cfg = [0u8; 256];
        client
            .region_read(PCI_CONFIG_REGION_INDEX, 0, &mut cfg)
            .context("reading config space")?;
        let mut shadow = ConfigSpace::new(identity_of(&cfg));
        let mut index = 0u32;
        while index < 6 {
            let (ri, _) = client
                .region_info(index)
                .with_context(|| format!("region {index} info"))?;
            let off = regs::BAR0 + index as usize * 4;
            let flags = cfg[off];
            let bar_type = if flags & 1 != 0 {
                BarType::Io
            } else if flags & 0x6 == 0x4 {
                BarType::Memory64
            } else {
                BarType::Memory32
            };
            if ri.size > 0 {
                shadow
                    .add_bar(
                        index as usize,
                        BarSpec {
                            bar_type,
                            size: ri.size,
                            prefetchable: flags & 0x8 != 0,
                        },
                    )
                    .with_context(|| format!("{id}: BAR {index}"))?;
            }
            index += if ri.size > 0 && bar_type == BarType::Memory64 {
                2
            } else {
                1
            };
        }
        for r in &ram.regions {
            client
                .dma_map(r.gpa, r.size, ram.fd(), r.fd_offset)
                .with_context(|| format!("DMA_MAP of guest RAM at {:#x}", r.gpa))?;
        }
        let mut intx = None;
        if cfg[regs::INTERRUPT_PIN] != 0 && info.num_irqs > PCI_INTX_IRQ_INDEX {
            let irq = client
                .irq_info(PCI_INTX_IRQ_INDEX)
                .context("GET_IRQ_INFO")?;
            if irq.count > 0 {
                let (trigger, resample) = intx_irqfd(vm, gsi)?;
                client
                    .set_irq_eventfds(PCI_INTX_IRQ_INDEX, 0, &[borrow(&trigger)])
                    .context("SET_IRQS trigger")?;
                client
                    .set_irqs(
                        PCI_INTX_IRQ_INDEX,
                        IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK,
                        0,
                        1,
                        &[],
                        &[borrow(&resample)],
                    )
                    .context("SET_IRQS unmask eventfd")?;
                intx = Some((trigger, resample));
            }
        }
        Ok(ProxyFunction {
            id: id.to_owned(),
            client: Transport::VfioUser(client),
            shadow,
            dead: false,
            remote_failed: None,
            on_fail: None,
            _intx: intx,
            stats: ProxyStats::default(),
        })
    }

    /// Setup over mpqemu, in the order of QEMU's `x-pci-proxy-dev`:
    /// SYNC_SYSMEM, then the probe (config space, BAR sizing), then
    /// SET_IRQFD. The client's timeout is the startup one (the remote may
    /// still be starting); `timeout` applies afterwards.
    fn new_mpqemu(
        id: &str,
        mut client: MpqemuClient,
        timeout: Duration,
        ram: &GuestRam,
        vm: &VmFd,
        gsi: u32,
    ) -> Result<ProxyFunction> {
        let regions: Vec<SysmemRegion<'_>> = ram
            .regions
            .iter()
            .map(|r| SysmemRegion {
                gpa: r.gpa,
                size: r.size,
                offset: r.fd_offset,
                fd: ram.fd(),
            })
            .collect();
        client
            .sync_sysmem(&regions)
            .context("SYNC_SYSMEM of guest RAM")?;
        let mut cfg = [0u8; 256];
        for off in (0..256u32).step_by(4) {
            let v = client
                .config_read(off, 4)
                .with_context(|| format!("config read at {off:#x}"))?;
            cfg[off as usize..off as usize + 4].copy_from_slice(&v.to_le_bytes());
        }
        client.set_timeout(timeout);
        let mut shadow = ConfigSpace::new(identity_of(&cfg));
        if shadow.identity().vendor_id == 0xffff {
            bail!("{id}: the remote has no function (vendor id 0xffff)");
        }
        // BAR sizing, as x-pci-proxy-dev does it: all-ones, read back,
        // restore.
        let size_of = |c: &mut MpqemuClient, off: u32| -> Result<(u32, u32)> {
            let orig = c.config_read(off, 4)?;
            c.config_write(off, 0xffff_ffff, 4)?;
            let v = c.config_read(off, 4)?;
            c.config_write(off, orig, 4)?;
            Ok((orig, v))
        };
        let mut index = 0usize;
        while index < 6 {
            let off = (regs::BAR0 + index * 4) as u32;
            let (orig, v) =
                size_of(&mut client, off).with_context(|| format!("{id}: sizing BAR {index}"))?;
            let io = orig & 1 != 0;
            let bar_type = if io {
                BarType::Io
            } else if orig & 0x6 == 0x4 {
                BarType::Memory64
            } else {
                BarType::Memory32
            };
            let size = match bar_type {
                BarType::Io => u64::from((!(v & !0x3)).wrapping_add(1) & 0xffff),
                BarType::Memory32 => u64::from((!(v & !0xf)).wrapping_add(1)),
                BarType::Memory64 => {
                    let (_, hi) = size_of(&mut client, off + 4)
                        .with_context(|| format!("{id}: sizing BAR {}", index + 1))?;
                    let mask = (u64::from(hi) << 32) | u64::from(v & !0xf);
                    (!mask).wrapping_add(1)
                }
            };
            let size = if v == 0 { 0 } else { size };
            if size > 0 {
                shadow
                    .add_bar(
                        index,
                        BarSpec {
                            bar_type,
                            size,
                            prefetchable: orig & 0x8 != 0 && !io,
                        },
                    )
                    .with_context(|| format!("{id}: BAR {index}"))?;
            }
            index += if size > 0 && bar_type == BarType::Memory64 {
                2
            } else {
                1
            };
        }
        let mut intx = None;
        if cfg[regs::INTERRUPT_PIN] != 0 {
            let (trigger, resample) = intx_irqfd(vm, gsi)?;
            client
                .set_irqfd(borrow(&trigger), borrow(&resample))
                .context("SET_IRQFD")?;
            intx = Some((trigger, resample));
        }
        Ok(ProxyFunction {
            id: id.to_owned(),
            client: Transport::Mpqemu {
                client,
                verified: false,
            },
            shadow,
            dead: false,
            remote_failed: None,
            on_fail: None,
            _intx: intx,
            stats: ProxyStats::default(),
        })
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
        if !self.dead
            && self
                .remote_failed
                .as_ref()
                .is_some_and(|f| f.load(Ordering::Acquire))
        {
            // Quietly: the supervisor already reported the remote.
            self.dead = true;
        }
        self.dead
    }

    /// The channel's socket (the supervisor polls a duplicate for hang-up).
    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        match &self.client {
            Transport::VfioUser(c) => c.socket().as_raw_fd(),
            Transport::Mpqemu { client, .. } => client.socket().as_raw_fd(),
        }
    }

    /// The access counters.
    pub fn stats(&self) -> ProxyStats {
        self.stats
    }
}

impl ProxyFunction {
    /// mpqemu: before the first BAR access, makes sure the remote decodes
    /// the BARs where the shadow has them (QEMU 7.2's startup reset may
    /// have wiped the placement). Returns false if the remote failed.
    fn mpqemu_verify(&mut self) -> bool {
        let Transport::Mpqemu { client, verified } = &mut self.client else {
            return true;
        };
        if *verified {
            return true;
        }
        let shadow = &self.shadow;
        let want_cmd = shadow.command() & 0x7;
        let check = |c: &mut MpqemuClient| -> Result<bool, channel::mpqemu::ClientError> {
            for (index, _) in shadow.bar_specs() {
                let off = (regs::BAR0 + index * 4) as u32;
                if c.config_read(off, 4)? != shadow.read_value(off as usize, 4) {
                    return Ok(false);
                }
            }
            Ok(c.config_read(regs::COMMAND as u32, 2)? & 0x7 == u32::from(want_cmd))
        };
        let r = (|| {
            for attempt in 0..3 {
                if check(client)? {
                    return Ok(true);
                }
                tracing::warn!(
                    "{}: the remote lost the BAR placement (attempt {attempt}); writing it again",
                    self.id
                );
                if std::env::var_os("HOST_STATS").is_some() {
                    eprintln!("host-stats: device={} bar_placement_rewritten=1", self.id);
                }
                for (index, spec) in shadow.bar_specs() {
                    let off = regs::BAR0 + index * 4;
                    client.config_write(off as u32, shadow.read_value(off, 4), 4)?;
                    if spec.bar_type == BarType::Memory64 {
                        client.config_write(off as u32 + 4, shadow.read_value(off + 4, 4), 4)?;
                    }
                }
                let cmd = client.config_read(regs::COMMAND as u32, 2)?;
                client.config_write(regs::COMMAND as u32, (cmd & !0x7) | u32::from(want_cmd), 2)?;
            }
            check(client)
        })();
        match r {
            Ok(true) => {
                *verified = true;
                true
            }
            Ok(false) => {
                self.fail("BAR placement", &"the remote does not keep its BARs");
                false
            }
            Err(e) => {
                self.fail("BAR placement check", &e);
                false
            }
        }
    }
}

/// Whether an mpqemu config access may be forwarded: QEMU 7.2's
/// `x-remote` shuts down on any access with `offset + 4 > 256`.
fn mpqemu_config_ok(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset + 4 <= 256
}

impl PciDevice for ProxyFunction {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.stats.config_reads += 1;
        if self.unusable() {
            data.fill(0xff);
            return;
        }
        let r = match &mut self.client {
            Transport::VfioUser(c) => c
                .region_read(PCI_CONFIG_REGION_INDEX, offset as u64, data)
                .map_err(|e| e.to_string()),
            Transport::Mpqemu { client, .. } => {
                if mpqemu_config_ok(offset, data.len()) {
                    client
                        .config_read(offset as u32, data.len() as u32)
                        .map(|v| data.copy_from_slice(&v.to_le_bytes()[..data.len()]))
                        .map_err(|e| e.to_string())
                } else {
                    data.fill(0);
                    Ok(())
                }
            }
        };
        if let Err(e) = r {
            data.fill(0xff);
            self.fail("config read", &e);
        }
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.stats.config_writes += 1;
        let end = offset + data.len();
        let touches = |a: usize, b: usize| offset < b && end > a;
        if touches(regs::BAR0, regs::BAR0 + 24) || touches(regs::COMMAND, regs::COMMAND + 2) {
            self.shadow.write(offset, data);
        }
        if self.unusable() {
            return;
        }
        let r = match &mut self.client {
            Transport::VfioUser(c) => c
                .region_write(PCI_CONFIG_REGION_INDEX, offset as u64, data)
                .map_err(|e| e.to_string()),
            Transport::Mpqemu { client, .. } => {
                if mpqemu_config_ok(offset, data.len()) {
                    let mut v = [0u8; 4];
                    v[..data.len()].copy_from_slice(data);
                    client
                        .config_write(offset as u32, u32::from_le_bytes(v), data.len() as u32)
                        .map_err(|e| e.to_string())
                } else {
                    Ok(())
                }
            }
        };
        if let Err(e) = r {
            self.fail("config write", &e);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if self.unusable() || !self.mpqemu_verify() {
            data.fill(0xff);
            return;
        }
        let t = Instant::now();
        let r = match &mut self.client {
            Transport::VfioUser(c) => c
                .region_read(bar as u32, offset, data)
                .map_err(|e| e.to_string()),
            Transport::Mpqemu { client, .. } => {
                let spec = self.shadow.bar_spec(bar);
                let base = self.shadow.bar_base(bar).unwrap_or(0);
                let memory = spec.is_some_and(|s| s.bar_type != BarType::Io);
                if matches!(data.len(), 1 | 2 | 4 | 8) {
                    client
                        .bar_read(base + offset, data.len() as u32, memory)
                        .map(|v| data.copy_from_slice(&v.to_le_bytes()[..data.len()]))
                        .map_err(|e| e.to_string())
                } else {
                    Err(format!("a {}-byte access", data.len()))
                }
            }
        };
        self.stats.bar_reads += 1;
        self.stats.bar_read_time += t.elapsed();
        if let Err(e) = r {
            data.fill(0xff);
            self.fail("BAR read", &e);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if self.unusable() || !self.mpqemu_verify() {
            return;
        }
        self.stats.bar_writes += 1;
        let r = match &mut self.client {
            Transport::VfioUser(c) => c
                .region_write_posted(bar as u32, offset, data)
                .map_err(|e| e.to_string()),
            Transport::Mpqemu { client, .. } => {
                let spec = self.shadow.bar_spec(bar);
                let base = self.shadow.bar_base(bar).unwrap_or(0);
                let memory = spec.is_some_and(|s| s.bar_type != BarType::Io);
                if matches!(data.len(), 1 | 2 | 4 | 8) {
                    let mut v = [0u8; 8];
                    v[..data.len()].copy_from_slice(data);
                    client
                        .bar_write_posted(
                            base + offset,
                            u64::from_le_bytes(v),
                            data.len() as u32,
                            memory,
                        )
                        .map_err(|e| e.to_string())
                } else {
                    Err(format!("a {}-byte access", data.len()))
                }
            }
        };
        if let Err(e) = r {
            self.fail("BAR write", &e);
        }
    }

    fn config_space(&self) -> &ConfigSpace {
        &self.shadow
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
        let r = match &mut self.client {
            Transport::VfioUser(c) => c.device_info().map(|_| ()).map_err(|e| e.to_string()),
            Transport::Mpqemu { client, .. } => client
                .config_read(0, 4)
                .map(|_| ())
                .map_err(|e| e.to_string()),
        };
        if let Err(e) = &r {
            self.fail("heartbeat", e);
        }
        Some(r)
    }

    /// vfio-user: DEVICE_RESET. mpqemu: DEVICE_RESET too (QEMU's proxy
    /// sends it on a machine reset since QEMU 6.0, and `x-remote` answers it
    /// with a cold reset of the device and an empty `RET`); and the BAR
    /// placement is checked again before the next BAR access, as after
    /// setup. Either way the shadow forgets the placement: the VMM assigns
    /// BARs afresh and the writes reach both.
    fn reset(&mut self) {
        self.shadow.reset();
        if self.unusable() {
            return;
        }
        let r = match &mut self.client {
            Transport::VfioUser(c) => c.reset().map_err(|e| e.to_string()),
            Transport::Mpqemu { client, verified } => {
                *verified = false;
                // Posted writes first: a failure among them belongs to the
                // old boot.
                client
                    .flush()
                    .and_then(|()| client.reset())
                    .map_err(|e| e.to_string())
            }
        };
        if let Err(e) = r {
            self.fail("device reset", &e);
        }
    }

    fn shutdown(&mut self) {
        let s = self.stats;
        let avg = if s.bar_reads > 0 {
            s.bar_read_time.as_secs_f64() * 1e6 / s.bar_reads as f64
        } else {
            0.0
        };
        tracing::info!(
            "{}: {} BAR reads (mean {avg:.1} µs), {} posted BAR writes, {} config reads, {} config writes",
            self.id,
            s.bar_reads,
            s.bar_writes,
            s.config_reads,
            s.config_writes
        );
        let mut posted_failures = 0;
        // The remote sees EOF, drops this client and (when spawned for us
        // on an inherited fd) exits. QEMU's x-remote exits at EOF too.
        match &mut self.client {
            Transport::VfioUser(c) => {
                let _ = c.socket().shutdown(std::net::Shutdown::Both);
            }
            Transport::Mpqemu { client, .. } => {
                if !self.dead {
                    let _ = client.flush();
                }
                posted_failures = client.posted_failures();
                let _ = client.socket().shutdown(std::net::Shutdown::Both);
            }
        }
        if std::env::var_os("HOST_STATS").is_some() {
            eprintln!(
                "host-stats: device={} bar_reads={} bar_read_mean_us={avg:.1} bar_writes={} config_reads={} config_writes={} posted_failures={posted_failures}",
                self.id, s.bar_reads, s.bar_writes, s.config_reads, s.config_writes
            );
        }
        self.dead = true;
    }
}
