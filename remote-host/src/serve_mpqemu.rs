//! Serving a device of one remote over mpqemu, standing in for QEMU's
//! `qemu-system-x86_64 -machine x-remote` behind `-device
//! x-pci-proxy-dev`.
//!
//! Each connection runs [`channel::mpqemu::serve_connection`] over an
//! [`Adapter`] that maps mpqemu onto the device's
//! [`PciFunction`](plugin_api::function::PciFunction), its guest memory
//! ([`GuestRam`](crate::memory::GuestRam)) and its INTx line
//! ([`IntxLine`](crate::irq::IntxLine)):
//! - SYNC_SYSMEM drops every earlier mapping and maps each region's fd
//!   shared at its guest address (QEMU's `remote_sysmem_reconfig`).
//! - Configuration reads and writes go to the function's configuration
//!   space; the BAR addresses and the command register the guest writes
//!   there are where BAR accesses are decoded from
//!   (`ConfigSpace::decode`): a BAR_READ or
//!   BAR_WRITE carries an absolute address. An address no enabled BAR
//!   decodes gets a `RET` of `u64::MAX` (x-remote would shut down).
//! - SET_IRQFD installs the irqfd and the resample fd on the INTx line,
//!   and a thread waits on the resample fd and re-signals the irqfd while
//!   the level is still high (QEMU's `remote_iohub`). The command
//!   register's INTX_DISABLE masks the line, and the status register's
//!   INTERRUPT bit shows its level, so a guest's generic INTx handling
//!   (`pci_check_and_mask_intx`: uio_pci_generic, VFIO) works.
//! - DEVICE_RESET resets function and configuration space and answers an
//!   empty `RET`, as QEMU 7.2 does.
//!
//! ## Where
//!
//! `--fd N` (the remote must have exactly one device): an inherited
//! socket. A connected one (a socketpair end, as an orchestrator passes
//! it to `x-remote`) is served until the VMM goes away, and then the
//! process exits 0, as `x-remote` does; a listening one is accepted on.
//! `--socket PATH` listens, with the path rule of [`crate::sockets`] (one
//! device: `PATH`; several: `PATH/<device-id>.sock`), and keeps listening
//! after a client leaves. A device serves one client at a time. A bad
//! message closes that connection only.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use channel::mpqemu::messages::SysmemSlot;
use channel::mpqemu::{serve_connection, DeviceError, MpqemuDevice, ServerOptions};

use crate::devices::RemoteDevice;
use crate::irq::EventfdWatcher;
use crate::irq::IntxFds;
use crate::serve_vfio_user::eventfd_from;
use crate::sockets::{DeviceSessions, Endpoint};

/// Serves `devices` at `endpoint` until every listener ends (normally
/// never), or, for a connected `--fd`, until its client goes away.
pub fn serve(
    devices: Vec<Arc<RemoteDevice>>,
    endpoint: Endpoint,
    options: &ServerOptions,
) -> anyhow::Result<()> {
    crate::sockets::serve_endpoint(devices, endpoint, "mpqemu", |dev| sessions(dev, options))
}

/// Serves one connected client of `dev` until it goes away (or the
/// socket is shut down): the per-connection path `--fd` and the control
/// channel's `device-add` share.
pub fn serve_stream(dev: Arc<RemoteDevice>, sock: UnixStream, options: &ServerOptions) {
    sessions(dev, options).serve(sock);
}

/// One device's mpqemu server: its adapter, shared by its connections.
fn sessions(dev: Arc<RemoteDevice>, options: &ServerOptions) -> DeviceSessions {
    let options = ServerOptions {
        name: dev.id.clone(),
        ..options.clone()
    };
    let adapter = Mutex::new(Adapter::new(dev.clone()));
    DeviceSessions::new(&dev, "mpqemu", move |sock| {
        // Errors are logged by serve_connection; the device goes on.
        let _ = serve_connection(sock, &adapter, &options);
    })
}

/// mpqemu on top of one [`RemoteDevice`].
pub struct Adapter {
    dev: Arc<RemoteDevice>,
    watcher: Option<EventfdWatcher>,
}

impl Adapter {
    pub fn new(dev: Arc<RemoteDevice>) -> Self {
        Adapter { dev, watcher: None }
    }

    /// The BAR and offset that decode `[addr, addr + len)`.
    fn decode(&self, addr: u64, len: usize, memory: bool) -> Result<(u8, u64), DeviceError> {
        let f = self.dev.function();
        let r = f
            .config()
            .decode(!memory, addr, len as u64)
            .ok_or_else(|| {
                DeviceError::new(
                    libc::EFAULT,
                    format!(
                        "no enabled BAR decodes {len} bytes at {} {addr:#x}",
                        if memory { "memory" } else { "I/O" }
                    ),
                )
            })?;
        let bar = u8::try_from(r.index).map_err(|_| DeviceError::invalid("BAR index"))?;
        Ok((bar, r.offset))
    }
}

impl MpqemuDevice for Adapter {
    fn sync_sysmem(&mut self, regions: Vec<(SysmemSlot, OwnedFd)>) -> Result<(), DeviceError> {
        // Like remote_sysmem_reconfig: the new set replaces the old.
        self.dev.memory.clear();
        let mut failed = Vec::new();
        for (slot, fd) in regions {
            let file = File::from(fd);
            if let Err(e) =
                self.dev
                    .memory
                    .map(file.as_fd(), slot.offset, slot.size, slot.gpa, true)
            {
                failed.push(e.to_string());
            }
        }
        tracing::debug!(device = %self.dev.id, "guest RAM now {:x?}", self.dev.memory.layout());
        if failed.is_empty() {
            Ok(())
        } else {
            Err(DeviceError::invalid(failed.join("; ")))
        }
    }

    fn set_irqfd(&mut self, irqfd: OwnedFd, resamplefd: OwnedFd) -> Result<(), DeviceError> {
        self.watcher = None;
        let trigger = eventfd_from(irqfd)?;
        let resample = eventfd_from(resamplefd)?;
        let io = |e: std::io::Error| DeviceError::new(libc::EIO, e.to_string());
        let watch = resample.try_clone().map_err(io)?;
        self.dev.intx.set_fds(Some(IntxFds {
            trigger,
            resample: Some(resample),
        }));
        let dev = self.dev.clone();
        let name = format!("intx-resample-{}", dev.id);
        // KVM signalled resample (guest EOI): re-raise while still high.
        let watcher = EventfdWatcher::start(name, watch, move || dev.intx.on_resample());
        self.watcher = Some(watcher.map_err(io)?);
        Ok(())
    }

    fn config_read(&mut self, addr: u32, data: &mut [u8]) -> Result<(), DeviceError> {
        self.dev.config_read(addr as usize, data);
        Ok(())
    }

    fn config_write(&mut self, addr: u32, data: &[u8]) -> Result<(), DeviceError> {
        let effect = self.dev.config_write(addr as usize, data);
        if effect.bars_written != 0 || effect.command_changed {
            let f = self.dev.function();
            tracing::debug!(device = %self.dev.id, "BARs now {:x?}", f.config().active_bars().iter().map(|b| (b.index, b.base)).collect::<Vec<_>>());
        }
        Ok(())
    }

    fn bar_read(&mut self, addr: u64, memory: bool, data: &mut [u8]) -> Result<(), DeviceError> {
        let (bar, offset) = self.decode(addr, data.len(), memory)?;
        if let Err(e) = self.dev.function().bar_read(bar, offset, data) {
            // A failed device reads all-ones (bar_read filled them).
            tracing::debug!(device = %self.dev.id, "BAR{bar} read at {offset:#x}: {e:?}");
        }
        Ok(())
    }

    fn bar_write(&mut self, addr: u64, memory: bool, data: &[u8]) -> Result<(), DeviceError> {
        let (bar, offset) = self.decode(addr, data.len(), memory)?;
        self.dev
            .function()
            .bar_write(bar, offset, data)
            .map_err(|e| {
                DeviceError::new(libc::EIO, format!("BAR{bar} write at {offset:#x}: {e:?}"))
            })
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        let r = self.dev.reset();
        r.map_err(|e| DeviceError::new(libc::EIO, format!("reset: {e:?}")))
    }

    fn client_disconnected(&mut self) {
        self.watcher = None;
        self.dev.memory.clear();
        self.dev.intx.set_fds(None);
    }
}
