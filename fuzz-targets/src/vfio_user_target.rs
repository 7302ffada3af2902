//! vfio-user, the device side: a stream of client messages into
//! `channel::vfio_user::serve_connection` over remote-host's adapter.

use std::os::fd::OwnedFd;
use std::sync::Mutex;
use std::time::Duration;

use channel::vfio_user::migration::{DmaLoggingReport, DmaLoggingStart, MigState};
use channel::vfio_user::{
    self, serve_connection, DeviceError, DeviceInfo, DmaMap, DmaUnmap, IrqInfo, RegionInfo,
    ServerOptions, SetIrqs, VfioUserDevice,
};
use remote_host::serve_vfio_user::Adapter;

use crate::wire::{exchange, make_fd, split, FdKind};
use crate::{assert_not_failed, lsi_device, timed, Checked};

/// Fds the peer attaches to a message: the header's `error` field, which
/// a command does not use, chooses them (bits 0..=2: how many, bits 3..=4:
/// which kind), so the fuzzer can reach every fd path through bytes.
pub(crate) fn fds_for_header(header: &[u8]) -> Vec<OwnedFd> {
    let error = header
        .get(12..16)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    let count = error & 7;
    let kind = FdKind::from_bits(error >> 3);
    (0..count).map(|_| make_fd(kind)).collect()
}

impl VfioUserDevice for Checked<Adapter> {
    fn device_info(&self) -> DeviceInfo {
        self.inner.device_info()
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        self.inner.region_info(index)
    }
    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.inner.irq_info(index)
    }
    fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        self.call("REGION_READ", |a| a.region_read(region, offset, data))
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.call("REGION_WRITE", |a| a.region_write(region, offset, data))
    }
    fn dma_map(&mut self, map: &DmaMap, fd: Option<OwnedFd>) -> Result<(), DeviceError> {
        self.call("DMA_MAP", |a| a.dma_map(map, fd))
    }
    fn dma_unmap(&mut self, unmap: &DmaUnmap) -> Result<(), DeviceError> {
        self.call("DMA_UNMAP", |a| a.dma_unmap(unmap))
    }
    fn set_irqs(
        &mut self,
        set: &SetIrqs,
        data: &[u8],
        fds: Vec<OwnedFd>,
    ) -> Result<(), DeviceError> {
        self.call("SET_IRQS", |a| a.set_irqs(set, data, fds))
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.call("DEVICE_RESET", |a| a.reset())
    }
    fn client_disconnected(&mut self) {
        self.call("disconnect", |a| a.client_disconnected())
    }
    fn migration_flags(&self) -> u64 {
        self.inner.migration_flags()
    }
    fn mig_state(&self) -> MigState {
        self.inner.mig_state()
    }
    fn mig_arc(&mut self, to: MigState) -> Result<(), DeviceError> {
        self.call("a migration state", |a| a.mig_arc(to))
    }
    fn mig_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        self.call("MIG_DATA_READ", |a| a.mig_read(buf))
    }
    fn mig_write(&mut self, data: &[u8]) -> Result<(), DeviceError> {
        self.call("MIG_DATA_WRITE", |a| a.mig_write(data))
    }
    fn dma_logging(&self) -> bool {
        self.inner.dma_logging()
    }
    fn dma_logging_start(&mut self, start: &DmaLoggingStart) -> Result<u64, DeviceError> {
        self.call("DMA_LOGGING_START", |a| a.dma_logging_start(start))
    }
    fn dma_logging_stop(&mut self) -> Result<(), DeviceError> {
        self.call("DMA_LOGGING_STOP", |a| a.dma_logging_stop())
    }
    fn dma_logging_report(
        &mut self,
        report: &DmaLoggingReport,
        bitmap: &mut [u8],
    ) -> Result<(), DeviceError> {
        self.call("DMA_LOGGING_REPORT", |a| {
            a.dma_logging_report(report, bitmap)
        })
    }
}

/// Server options for fuzzing: no busy-polling (the peer's bytes are
/// already queued), short timeouts, small transfers.
pub(crate) fn options() -> ServerOptions {
    ServerOptions {
        name: "fuzz".into(),
        poll: Duration::ZERO,
        adaptive_poll: false,
        timeout: Duration::from_secs(1),
        idle_timeout: Some(Duration::from_secs(1)),
        max_data_xfer_size: 64 << 10,
        max_msg_fds: 8,
        max_dma_maps: 16,
    }
}

/// Serves `data`, cut into messages by their headers, to a fresh LSI
/// controller with no disk.
pub fn vfio_user(data: &[u8]) {
    let dev = lsi_device("fuzz-vfio-user", "", std::path::Path::new("."));
    let device = Mutex::new(Checked {
        inner: Adapter::new(dev.clone(), 16),
        dev: dev.clone(),
    });
    let opts = options();
    let chunks = split(
        data,
        vfio_user::HEADER_SIZE,
        vfio_user::Header::size_of,
        fds_for_header,
    );
    exchange(chunks, |sock| {
        let _ = serve_connection(sock, &device, &opts);
    });
    drop(device);
    timed("shutdown", || dev.shutdown());
    assert_not_failed(&dev);
}
