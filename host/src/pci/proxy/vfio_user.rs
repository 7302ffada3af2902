//! The proxy's vfio-user dialect: setup (device info, config space, region
//! sizes, DMA_MAP of guest RAM, INTx eventfds by SET_IRQS) and the
//! [`Transport`] over [`VfioUserClient`].

use std::os::fd::{AsRawFd, RawFd};

use anyhow::{bail, Context, Result};
use channel::vfio_user::{
    VfioUserClient, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_EVENTFD, PCI_CONFIG_REGION_INDEX,
    PCI_INTX_IRQ_INDEX,
};
use kvm_ioctls::VmFd;
use pci::{regs, BarSpec, BarType, ConfigSpace};

use super::transport::{BarTarget, Transport, TransportError};
use super::{borrow, identity_of, intx_irqfd, Setup};
use crate::memory::GuestRam;

/// A vfio-user connection to one remote function.
mod wire;

pub struct VfioUserTransport(VfioUserClient);

/// Sets up the function behind `client`.
pub fn setup(
    id: &str,
    mut client: VfioUserClient,
    ram: &GuestRam,
    vm: &VmFd,
    gsi: u32,
) -> Result<Setup> {
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
    // MSI-X: the table's BAR is the VMM's to emulate (`with_msix`), all
    // of it, so the PBA must be there too (remote-host's layout).
    if let Some((_, l)) = pci::msix::find(&cfg) {
        if l.pba_bar != l.table_bar {
            bail!(
                "{id}: MSI-X with its table in BAR {} and its PBA in BAR {}: the VMM emulates one BAR holding both",
                l.table_bar,
                l.pba_bar
            );
        }
    }
    let msi = pci::msi::find(&cfg).map(|(cap, vectors)| plugin_api::function::Msi { cap, vectors });
    let msix = pci::msix::find(&cfg).map(|(cap, layout)| plugin_api::function::Msix {
        cap,
        layout,
        bar_size: shadow
            .bar_spec(usize::from(layout.table_bar))
            .map_or(0, |b| b.size),
    });
    Ok(Setup {
        transport: Box::new(VfioUserTransport(client)),
        shadow,
        intx,
        msix,
        msi,
    })
}

impl VfioUserTransport {
    /// SET_IRQS of `index` with one eventfd per vector, in as many
    /// messages as the server's fd limit asks.
    fn set_vector_eventfds(
        &mut self,
        index: u32,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        let per = (self.0.server_capabilities().max_msg_fds() as usize).max(1);
        for (i, chunk) in fds.chunks(per).enumerate() {
            let start = u32::try_from(i * per).map_err(|e| e.to_string())?;
            self.0
                .set_irq_eventfds(index, start, chunk)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

impl Transport for VfioUserTransport {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) -> Result<(), TransportError> {
        self.0
            .region_read(PCI_CONFIG_REGION_INDEX, offset as u64, data)
            .map_err(|e| e.to_string())
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) -> Result<(), TransportError> {
        self.0
            .region_write(PCI_CONFIG_REGION_INDEX, offset as u64, data)
            .map_err(|e| e.to_string())
    }

    fn bar_read(
        &mut self,
        bar: BarTarget,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), TransportError> {
        self.0
            .region_read(bar.index as u32, offset, data)
            .map_err(|e| e.to_string())
    }

    fn bar_write(
        &mut self,
        bar: BarTarget,
        offset: u64,
        data: &[u8],
    ) -> Result<(), TransportError> {
        self.0
            .region_write_posted(bar.index as u32, offset, data)
            .map_err(|e| e.to_string())
    }

    fn set_msix_eventfds(
        &mut self,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        self.set_vector_eventfds(channel::vfio_user::PCI_MSIX_IRQ_INDEX, fds)
    }

    fn set_msi_eventfds(
        &mut self,
        fds: &[std::os::fd::BorrowedFd<'_>],
    ) -> Result<(), TransportError> {
        self.set_vector_eventfds(channel::vfio_user::PCI_MSI_IRQ_INDEX, fds)
    }

    /// DEVICE_GET_INFO.
    fn heartbeat(&mut self) -> Result<(), TransportError> {
        self.0.device_info().map(|_| ()).map_err(|e| e.to_string())
    }

    /// DEVICE_RESET.
    fn reset(&mut self) -> Result<(), TransportError> {
        self.0.reset().map_err(|e| e.to_string())
    }

    fn migration(&mut self) -> Result<(), TransportError> {
        wire::check(&mut self.0)
    }

    fn save_state(&mut self, quiesce: std::time::Duration) -> Result<Vec<u8>, TransportError> {
        wire::save(&mut self.0, quiesce)
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), TransportError> {
        wire::restore(&mut self.0, state)
    }

    fn dma_log(
        &mut self,
        action: &str,
        regions: &[(u64, u64)],
    ) -> Result<Vec<(u64, u64)>, TransportError> {
        wire::dma_log(&mut self.0, action, regions)
    }

    fn socket_fd(&self) -> RawFd {
        self.0.socket().as_raw_fd()
    }

    fn close(&mut self, _healthy: bool) -> u64 {
        let _ = self.0.socket().shutdown(std::net::Shutdown::Both);
        0
    }
}
