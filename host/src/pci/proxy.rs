//! A proxy PCI function: the guest sees an ordinary function whose
//! configuration space and BARs live in a remote process, reached over
//! vfio-user.
//!
//! - Configuration reads and writes are forwarded; writes to the BARs and
//!   the command register are mirrored into a local shadow
//!   [`ConfigSpace`] (built from the remote's region sizes and BAR flags)
//!   so the VMM decodes BAR exits without asking the remote.
//! - BAR reads wait for the reply; BAR writes are posted (vfio-user
//!   `No_reply`): the remote handles a socket's messages in order, so a
//!   later read still sees them.
//! - INTx: a KVM irqfd with a resample fd on the function's IOAPIC pin;
//!   both eventfds go to the remote with SET_IRQS, so an interrupt and its
//!   EOI never pass through the VMM.
//! - All guest RAM is DMA_MAPped from the memfd.
//! - After a transport error the function is dead and reads all-ones.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
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

/// One remote function.
pub struct ProxyFunction {
    id: String,
    client: VfioUserClient,
    shadow: ConfigSpace,
    dead: bool,
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

impl ProxyFunction {
    /// Sets up the function behind `client`: reads its config space and
    /// regions, maps guest RAM, wires INTx to `gsi`.
    pub fn new(
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
        let class = u32::from_le_bytes([cfg[9], cfg[10], cfg[11], 0]);
        let mut shadow = ConfigSpace::new(Identity {
            vendor_id: u16_at(&cfg, regs::VENDOR_ID),
            device_id: u16_at(&cfg, regs::DEVICE_ID),
            class_code: class,
            revision: cfg[regs::REVISION_ID],
            subsystem_vendor_id: u16_at(&cfg, regs::SUBSYSTEM_VENDOR_ID),
            subsystem_id: u16_at(&cfg, regs::SUBSYSTEM_ID),
            interrupt_pin: cfg[regs::INTERRUPT_PIN],
        });
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
                let trigger = EventFd::new(EFD_NONBLOCK).context("eventfd")?;
                let resample = EventFd::new(EFD_NONBLOCK).context("eventfd")?;
                vm.register_irqfd_with_resample(&trigger, &resample, gsi)
                    .context("KVM_IRQFD with resample")?;
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
            client,
            shadow,
            dead: false,
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
        }
        self.dead = true;
    }

    /// The access counters.
    pub fn stats(&self) -> ProxyStats {
        self.stats
    }
}

impl PciDevice for ProxyFunction {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.stats.config_reads += 1;
        if self.dead {
            data.fill(0xff);
            return;
        }
        if let Err(e) = self
            .client
            .region_read(PCI_CONFIG_REGION_INDEX, offset as u64, data)
        {
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
        if self.dead {
            return;
        }
        if let Err(e) = self
            .client
            .region_write(PCI_CONFIG_REGION_INDEX, offset as u64, data)
        {
            self.fail("config write", &e);
        }
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if self.dead {
            data.fill(0xff);
            return;
        }
        let t = Instant::now();
        let r = self.client.region_read(bar as u32, offset, data);
        self.stats.bar_reads += 1;
        self.stats.bar_read_time += t.elapsed();
        if let Err(e) = r {
            data.fill(0xff);
            self.fail("BAR read", &e);
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if self.dead {
            return;
        }
        self.stats.bar_writes += 1;
        if let Err(e) = self.client.region_write_posted(bar as u32, offset, data) {
            self.fail("BAR write", &e);
        }
    }

    fn config_space(&self) -> &ConfigSpace {
        &self.shadow
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
        if std::env::var_os("HOST_STATS").is_some() {
            eprintln!(
                "host-stats: device={} bar_reads={} bar_read_mean_us={avg:.1} bar_writes={} config_reads={} config_writes={}",
                self.id, s.bar_reads, s.bar_writes, s.config_reads, s.config_writes
            );
        }
        // The remote sees EOF, drops this client and (when spawned for us
        // on an inherited fd) exits.
        let _ = self.client.socket().shutdown(std::net::Shutdown::Both);
        self.dead = true;
    }
}
