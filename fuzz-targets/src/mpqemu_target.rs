//! mpqemu, the device side: a stream of proxy messages into
//! `channel::mpqemu::serve_connection` over remote-host's adapter.

use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

use channel::mpqemu::messages::SysmemSlot;
use channel::mpqemu::{self, serve_connection, DeviceError, MpqemuDevice, ServerOptions};
use remote_host::serve_mpqemu::Adapter;

use crate::wire::{exchange, make_fd, split, FdKind};
use crate::{assert_not_failed, lsi_device, timed, Checked};

/// Fds the peer attaches to a message: the header's padding (bytes 4..8,
/// which nothing reads) chooses them (bits 0..=3: how many, up to 9, so
/// "too many" is reachable; bits 4..=5: which kind).
pub(crate) fn fds_for_header(header: &[u8]) -> Vec<OwnedFd> {
    let pad = header.get(4).copied().unwrap_or(0);
    let count = (pad & 0xf).min(9);
    let kind = FdKind::from_bits(u32::from(pad >> 4));
    (0..count).map(|_| make_fd(kind)).collect()
}

impl MpqemuDevice for Checked<Adapter> {
    fn sync_sysmem(&mut self, regions: Vec<(SysmemSlot, OwnedFd)>) -> Result<(), DeviceError> {
        self.call("SYNC_SYSMEM", |a| a.sync_sysmem(regions))
    }
    fn set_irqfd(&mut self, irqfd: OwnedFd, resamplefd: OwnedFd) -> Result<(), DeviceError> {
        self.call("SET_IRQFD", |a| a.set_irqfd(irqfd, resamplefd))
    }
    fn config_read(&mut self, addr: u32, data: &mut [u8]) -> Result<(), DeviceError> {
        self.call("PCI_CFGREAD", |a| a.config_read(addr, data))
    }
    fn config_write(&mut self, addr: u32, data: &[u8]) -> Result<(), DeviceError> {
        self.call("PCI_CFGWRITE", |a| a.config_write(addr, data))
    }
    fn bar_read(&mut self, addr: u64, memory: bool, data: &mut [u8]) -> Result<(), DeviceError> {
        self.call("BAR_READ", |a| a.bar_read(addr, memory, data))
    }
    fn bar_write(&mut self, addr: u64, memory: bool, data: &[u8]) -> Result<(), DeviceError> {
        self.call("BAR_WRITE", |a| a.bar_write(addr, memory, data))
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.call("DEVICE_RESET", |a| a.reset())
    }
    fn client_disconnected(&mut self) {
        self.call("disconnect", |a| a.client_disconnected())
    }
}

/// Serves `data`, cut into messages by their headers, to a fresh LSI
/// controller with no disk.
pub fn mpqemu(data: &[u8]) {
    let dev = lsi_device("fuzz-mpqemu", "", std::path::Path::new("."));
    let device = Mutex::new(Checked {
        inner: Adapter::new(dev.clone()),
        dev: dev.clone(),
    });
    let opts = ServerOptions {
        name: "fuzz".into(),
        poll: Duration::ZERO,
        adaptive_poll: false,
        timeout: Duration::from_secs(1),
        idle_timeout: Some(Duration::from_secs(1)),
    };
    let chunks = split(
        data,
        mpqemu::HEADER_SIZE,
        mpqemu::Header::size_of,
        fds_for_header,
    );
    exchange(chunks, |sock| {
        let _ = serve_connection(sock, &device, &opts);
    });
    drop(device);
    timed("shutdown", || dev.shutdown());
    assert_not_failed(&dev);
}
