//! Serving the devices of one remote over vfio-user.
//!
//! Each device gets its own listening socket, and each accepted
//! connection its own thread running [`channel::vfio_user::serve_connection`]
//! over an [`Adapter`] that maps vfio-user onto the device's
//! [`PciFunction`](plugin_api::function::PciFunction), its guest memory
//! ([`GuestRam`]) and its INTx line ([`IntxLine`]).
//!
//! Where the sockets are and how connections are taken is the same for
//! every protocol: [`crate::sockets`].
//!
//! ## Connections
//!
//! vfio-user has one client per device; a second client waits (and its
//! VERSION times out on its side) until the first has gone. When a client
//! goes away, for whatever reason, its DMA mappings and eventfds are
//! dropped and the device keeps its state for the next client. A bad
//! message closes that connection only.
//!
//! ## Regions and interrupts
//!
//! Regions 0..=5 are the BARs the device declared (size 0 for unused
//! slots and the upper half of a 64-bit BAR), 6 (ROM) and 8 (VGA) are
//! empty, 7 is the 256-byte configuration space. IRQ index 0 is INTx;
//! MSI, MSI-X, ERR and REQ have no vectors. INTx is reported as VFIO
//! reports it (eventfd, maskable, automasked); what we do: the trigger
//! eventfd is signalled on a rising level, and an unmask (SET_IRQS
//! ACTION_UNMASK, or a write to the unmask eventfd, which a KVM VMM
//! registers as the irqfd resample fd) re-signals while the level is
//! still high. A client that unmasks after each interrupt (QEMU, KVM
//! resample) sees exactly VFIO's behaviour; the line is not masked
//! between a signal and the unmask, so a client that never unmasks still
//! gets every new rising edge.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use channel::vfio_user::migration::{DmaLoggingReport, DmaLoggingStart, MigState};
use channel::vfio_user::{
    self, serve_connection, DeviceError, DeviceInfo, DmaMap, DmaUnmap, IrqInfo, RegionInfo,
    ServerOptions, SetIrqs, VfioUserDevice,
};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::RemoteDevice;
use crate::irq::EventfdWatcher;
use crate::irq::IntxFds;
use crate::memory::MemoryError;
use crate::sockets::{DeviceSessions, Endpoint};

mod migration;

/// Size of the configuration-space region.
const CONFIG_SIZE: u64 = 256;

/// Serves `devices` at `endpoint` until every listener ends (normally
/// never), or, for a connected `--fd`, until its client goes away.
pub fn serve(
    devices: Vec<Arc<RemoteDevice>>,
    endpoint: Endpoint,
    options: &ServerOptions,
) -> anyhow::Result<()> {
    crate::sockets::serve_endpoint(devices, endpoint, "vfio-user", |dev| sessions(dev, options))
}

/// Serves one connected client of `dev` until it goes away (or the
/// socket is shut down): the per-connection path `--fd` and the control
/// channel's `device-add` share.
pub fn serve_stream(dev: Arc<RemoteDevice>, sock: UnixStream, options: &ServerOptions) {
    sessions(dev, options).serve(sock);
}

/// One device's vfio-user server: its adapter, shared by its connections.
fn sessions(dev: Arc<RemoteDevice>, options: &ServerOptions) -> DeviceSessions {
    let options = ServerOptions {
        name: dev.id.clone(),
        ..options.clone()
    };
    let adapter = Mutex::new(Adapter::new(dev.clone(), options.max_dma_maps));
    DeviceSessions::new(&dev, "vfio-user", move |sock| {
        // Errors are logged by serve_connection; the device goes on.
        let _ = serve_connection(sock, &adapter, &options);
    })
}

/// vfio-user on top of one [`RemoteDevice`].
pub struct Adapter {
    dev: Arc<RemoteDevice>,
    max_dma_maps: u32,
    /// Size of regions 0..=5 (the BARs) from the device's description.
    bar_sizes: [u64; 6],
    /// The device has an interrupt pin.
    has_intx: bool,
    /// MSI-X vectors (0: none).
    msix_vectors: u32,
    /// MSI vectors (0: none).
    msi_vectors: u32,
    trigger: Option<EventFd>,
    unmask: Option<EventFd>,
    watcher: Option<EventfdWatcher>,
    /// vfio-user migration v2 ([`migration`]).
    migration: migration::Migration,
}

impl Adapter {
    pub fn new(dev: Arc<RemoteDevice>, max_dma_maps: u32) -> Self {
        let mut bar_sizes = [0u64; 6];
        let has_intx;
        let msix_vectors;
        let msi_vectors;
        {
            let f = dev.function();
            let desc = f.description();
            for b in desc.bars.iter() {
                if let Some(s) = bar_sizes.get_mut(usize::from(b.index)) {
                    *s = b.size;
                }
            }
            has_intx = desc.identity.interrupt_pin != 0;
            // The MSI-X BAR is a region too (the VMM emulates it: an
            // access that reaches us is refused like any undeclared BAR).
            if let Some(m) = f.msix() {
                if let Some(s) = bar_sizes.get_mut(usize::from(m.layout.table_bar)) {
                    *s = m.bar_size;
                }
                msix_vectors = u32::from(m.layout.vectors);
            } else {
                msix_vectors = 0;
            }
            msi_vectors = f.msi().map_or(0, |m| u32::from(m.vectors));
        }
        Adapter {
            dev,
            max_dma_maps,
            bar_sizes,
            has_intx,
            msix_vectors,
            msi_vectors,
            trigger: None,
            unmask: None,
            watcher: None,
            migration: migration::Migration::default(),
        }
    }

    /// Hands the current trigger/unmask eventfds to the INTx line and
    /// (re)starts the unmask watcher.
    fn apply_intx(&mut self) -> Result<(), DeviceError> {
        self.watcher = None;
        let io = |e: std::io::Error| DeviceError::new(libc::EIO, e.to_string());
        let fds = match &self.trigger {
            Some(t) => Some(IntxFds {
                trigger: t.try_clone().map_err(io)?,
                resample: match &self.unmask {
                    Some(u) => Some(u.try_clone().map_err(io)?),
                    None => None,
                },
            }),
            None => None,
        };
        self.dev.intx.set_fds(fds);
        if let Some(u) = &self.unmask {
            let u = u.try_clone().map_err(io)?;
            let dev = self.dev.clone();
            let name = format!("intx-unmask-{}", dev.id);
            // Unmasks, and re-signals while the level is high.
            let watcher = EventfdWatcher::start(name, u, move || dev.intx.set_masked(false));
            self.watcher = Some(watcher.map_err(io)?);
        }
        Ok(())
    }
}

/// Takes an fd the client sent as an eventfd, refusing anything else
/// (a pipe or a file would take our 8-byte writes as data). Where
/// `/proc` is not readable (a sandbox), the fd is taken on trust.
pub(crate) fn eventfd_from(fd: OwnedFd) -> Result<EventFd, DeviceError> {
    if let Ok(link) = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())) {
        let link = link.to_string_lossy();
        if link != "anon_inode:[eventfd]" {
            return Err(DeviceError::invalid(format!(
                "fd is not an eventfd ({link})"
            )));
        }
    }
    // SAFETY: the fd is open and ours (moved out of the OwnedFd); EventFd
    // takes over closing it.
    Ok(unsafe { EventFd::from_raw_fd(fd.into_raw_fd()) })
}

fn is_set(data_type: u32, data: &[u8]) -> bool {
    data_type == vfio_user::IRQ_SET_DATA_NONE || data.first().is_some_and(|&b| b != 0)
}

impl VfioUserDevice for Adapter {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            argsz: 0,
            flags: vfio_user::DEVICE_FLAGS_PCI | vfio_user::DEVICE_FLAGS_RESET,
            num_regions: vfio_user::PCI_NUM_REGIONS,
            num_irqs: vfio_user::PCI_NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let rw = vfio_user::REGION_INFO_FLAG_READ | vfio_user::REGION_INFO_FLAG_WRITE;
        let (size, flags) = match index {
            vfio_user::PCI_BAR0_REGION_INDEX..=vfio_user::PCI_BAR5_REGION_INDEX => {
                match self.bar_sizes.get(index as usize) {
                    Some(&size) if size > 0 => (size, rw),
                    _ => (0, 0),
                }
            }
            vfio_user::PCI_CONFIG_REGION_INDEX => (CONFIG_SIZE, rw),
            vfio_user::PCI_ROM_REGION_INDEX | vfio_user::PCI_VGA_REGION_INDEX => (0, 0),
            _ => return None,
        };
        Some(RegionInfo {
            argsz: 0,
            flags,
            index,
            cap_offset: 0,
            size,
            offset: 0,
        })
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        if index >= vfio_user::PCI_NUM_IRQS {
            return None;
        }
        let (flags, count) = if index == vfio_user::PCI_INTX_IRQ_INDEX {
            (
                vfio_user::IRQ_INFO_EVENTFD
                    | vfio_user::IRQ_INFO_MASKABLE
                    | vfio_user::IRQ_INFO_AUTOMASKED,
                u32::from(self.has_intx),
            )
        } else if index == vfio_user::PCI_MSIX_IRQ_INDEX {
            // Masking is the VMM's (it emulates the table).
            (
                vfio_user::IRQ_INFO_EVENTFD | vfio_user::IRQ_INFO_NORESIZE,
                self.msix_vectors,
            )
        } else if index == vfio_user::PCI_MSI_IRQ_INDEX {
            // Masking is the VMM's too (it serves the mask bits).
            (
                vfio_user::IRQ_INFO_EVENTFD | vfio_user::IRQ_INFO_NORESIZE,
                self.msi_vectors,
            )
        } else {
            (
                vfio_user::IRQ_INFO_EVENTFD | vfio_user::IRQ_INFO_NORESIZE,
                0,
            )
        };
        Some(IrqInfo {
            argsz: 0,
            flags,
            index,
            count,
        })
    }

    fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        if region == vfio_user::PCI_CONFIG_REGION_INDEX {
            self.dev.config_read(offset as usize, data);
            return Ok(());
        }
        let mut f = self.dev.function();
        let bar = u8::try_from(region).map_err(|_| DeviceError::invalid("region"))?;
        if let Err(e) = f.bar_read(bar, offset, data) {
            // A failed device reads all-ones (bar_read filled them).
            tracing::debug!(device = %self.dev.id, "BAR{bar} read at {offset:#x}: {e:?}");
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if region == vfio_user::PCI_CONFIG_REGION_INDEX {
            self.dev.config_write(offset as usize, data);
            let f = self.dev.function();
            let msix = f.msix_control().0;
            let msi = f.msi_state().is_some_and(|s| s.enabled);
            drop(f);
            self.dev.intx.set_message_enabled(msix, msi);
            return Ok(());
        }
        let mut f = self.dev.function();
        let bar = u8::try_from(region).map_err(|_| DeviceError::invalid("region"))?;
        f.bar_write(bar, offset, data).map_err(|e| {
            DeviceError::new(libc::EIO, format!("BAR{bar} write at {offset:#x}: {e:?}"))
        })
    }

    fn dma_map(&mut self, map: &DmaMap, fd: Option<OwnedFd>) -> Result<(), DeviceError> {
        let Some(fd) = fd else {
            return Err(DeviceError::unsupported(
                "DMA_MAP without an fd (DMA through messages) is not supported",
            ));
        };
        if self.dev.memory.layout().len() >= self.max_dma_maps as usize {
            return Err(DeviceError::new(libc::ENOSPC, "too many DMA mappings"));
        }
        let writable = map.flags & vfio_user::DMA_MAP_FLAG_WRITE != 0;
        let file = File::from(fd);
        self.dev
            .memory
            .map(file.as_fd(), map.offset, map.size, map.addr, writable)
            .map_err(|e| {
                let errno = match &e {
                    MemoryError::Overlap { .. } => libc::EEXIST,
                    MemoryError::Map { errno, .. } => errno.raw_os_error().unwrap_or(libc::EINVAL),
                    _ => libc::EINVAL,
                };
                DeviceError::new(errno, e.to_string())
            })?;
        tracing::debug!(device = %self.dev.id, "DMA map {:#x}+{:#x}", map.addr, map.size);
        Ok(())
    }

    fn dma_unmap(&mut self, unmap: &DmaUnmap) -> Result<(), DeviceError> {
        if unmap.flags & vfio_user::DMA_UNMAP_FLAG_ALL != 0 {
            self.dev.memory.clear();
            return Ok(());
        }
        self.dev
            .memory
            .unmap(unmap.addr, unmap.size)
            .map_err(|e| DeviceError::invalid(e.to_string()))
    }

    fn set_irqs(
        &mut self,
        set: &SetIrqs,
        data: &[u8],
        mut fds: Vec<OwnedFd>,
    ) -> Result<(), DeviceError> {
        let data_type = set.flags & vfio_user::IRQ_SET_DATA_TYPE_MASK;
        let action = set.flags & vfio_user::IRQ_SET_ACTION_TYPE_MASK;
        tracing::debug!(
            device = %self.dev.id,
            "SET_IRQS index {} flags {:#x} start {} count {} fds {}",
            set.index,
            set.flags,
            set.start,
            set.count,
            fds.len()
        );
        let vectors = match set.index {
            vfio_user::PCI_MSIX_IRQ_INDEX => Some((crate::irq::Vectors::Msix, self.msix_vectors)),
            vfio_user::PCI_MSI_IRQ_INDEX => Some((crate::irq::Vectors::Msi, self.msi_vectors)),
            _ => None,
        };
        if let Some((which, count)) = vectors {
            return match (action, data_type) {
                (vfio_user::IRQ_SET_ACTION_TRIGGER, vfio_user::IRQ_SET_DATA_EVENTFD) => {
                    if u64::from(set.start) + fds.len() as u64 > u64::from(count) {
                        return Err(DeviceError::invalid(format!(
                            "SET_IRQS of {which:?} vectors {}..{} past the {count} the device has",
                            set.start,
                            u64::from(set.start) + fds.len() as u64
                        )));
                    }
                    let fds = fds
                        .into_iter()
                        .map(eventfd_from)
                        .collect::<Result<Vec<_>, _>>()?;
                    self.dev.intx.set_vector_fds(which, set.start as usize, fds);
                    Ok(())
                }
                (vfio_user::IRQ_SET_ACTION_TRIGGER, vfio_user::IRQ_SET_DATA_NONE)
                    if set.count == 0 =>
                {
                    self.dev.intx.set_vector_fds(which, 0, Vec::new());
                    Ok(())
                }
                _ => Err(DeviceError::unsupported(format!(
                    "SET_IRQS of {which:?} with flags {:#x} (the VMM masks vectors itself)",
                    set.flags
                ))),
            };
        }
        if set.index != vfio_user::PCI_INTX_IRQ_INDEX {
            // No other index has vectors; only "release all" gets here.
            return Ok(());
        }
        match (action, data_type) {
            (vfio_user::IRQ_SET_ACTION_TRIGGER, vfio_user::IRQ_SET_DATA_EVENTFD) => {
                self.trigger = match fds.pop() {
                    Some(fd) => Some(eventfd_from(fd)?),
                    None => None,
                };
                self.apply_intx()
            }
            (vfio_user::IRQ_SET_ACTION_TRIGGER, vfio_user::IRQ_SET_DATA_NONE) if set.count == 0 => {
                self.trigger = None;
                self.unmask = None;
                self.apply_intx()
            }
            (vfio_user::IRQ_SET_ACTION_TRIGGER, _) => {
                // Loopback: fire the trigger as if the device had.
                if is_set(data_type, data) {
                    if let Some(t) = &self.trigger {
                        let _ = t.write(1);
                    }
                }
                Ok(())
            }
            (vfio_user::IRQ_SET_ACTION_UNMASK, vfio_user::IRQ_SET_DATA_EVENTFD) => {
                self.unmask = match fds.pop() {
                    Some(fd) => Some(eventfd_from(fd)?),
                    None => None,
                };
                self.apply_intx()
            }
            (vfio_user::IRQ_SET_ACTION_UNMASK, _) => {
                if is_set(data_type, data) {
                    self.dev.intx.set_masked(false);
                }
                Ok(())
            }
            (vfio_user::IRQ_SET_ACTION_MASK, vfio_user::IRQ_SET_DATA_EVENTFD) => {
                Err(DeviceError::unsupported("INTx mask through an eventfd"))
            }
            (vfio_user::IRQ_SET_ACTION_MASK, _) => {
                if is_set(data_type, data) {
                    self.dev.intx.set_masked(true);
                }
                Ok(())
            }
            _ => Err(DeviceError::invalid(format!(
                "SET_IRQS flags {:#x}",
                set.flags
            ))),
        }
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        // RUNNING again (the way out of ERROR), nothing buffered.
        self.migration.reset(&self.dev);
        // Configuration space back to power-on: MSI and MSI-X disabled.
        self.dev.intx.set_message_enabled(false, false);
        self.dev
            .reset()
            .map_err(|e| DeviceError::new(libc::EIO, format!("reset: {e:?}")))
    }

    fn client_disconnected(&mut self) {
        // A client that left mid-migration leaves a running device.
        self.migration.reset(&self.dev);
        self.dev.memory.clear();
        self.dev
            .intx
            .set_vector_fds(crate::irq::Vectors::Msix, 0, Vec::new());
        self.dev
            .intx
            .set_vector_fds(crate::irq::Vectors::Msi, 0, Vec::new());
        self.trigger = None;
        self.unmask = None;
        self.watcher = None;
        self.dev.intx.set_fds(None);
        self.dev.intx.set_masked(false);
    }

    fn migration_flags(&self) -> u64 {
        channel::vfio_user::migration::MIGRATION_STOP_COPY
    }

    fn mig_state(&self) -> MigState {
        self.migration.state()
    }

    fn mig_arc(&mut self, to: MigState) -> Result<(), DeviceError> {
        self.migration.arc(&self.dev, to)
    }

    fn mig_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        Ok(self.migration.read(buf))
    }

    fn mig_write(&mut self, data: &[u8]) -> Result<(), DeviceError> {
        self.migration.write(data)
    }

    fn dma_logging(&self) -> bool {
        true
    }

    fn dma_logging_start(&mut self, _start: &DmaLoggingStart) -> Result<u64, DeviceError> {
        // The ranges are the client's DMA mappings; the log covers all.
        self.migration.logging_start(&self.dev)
    }

    fn dma_logging_stop(&mut self) -> Result<(), DeviceError> {
        self.migration.logging_stop(&self.dev)
    }

    fn dma_logging_report(
        &mut self,
        report: &DmaLoggingReport,
        bitmap: &mut [u8],
    ) -> Result<(), DeviceError> {
        self.migration.report(&self.dev, report, bitmap)
    }
}
