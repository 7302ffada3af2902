//! Migration v2 between our client and our server: a device's state
//! moved from one server to another through the wire, the state machine
//! and each limit the server applies, and the DMA dirty log.

use std::collections::BTreeSet;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::vfio_user::client::{ClientError, ClientOptions, VfioUserClient};
use crate::vfio_user::messages::Command;
use crate::vfio_user::migration::*;
use crate::vfio_user::server::{serve_connection, DeviceError, ServerOptions, VfioUserDevice};
use crate::vfio_user::{
    DeviceInfo, DmaMap, DmaUnmap, IrqInfo, RegionInfo, SetIrqs, DEVICE_FLAGS_PCI,
    PCI_CONFIG_REGION_INDEX, PCI_NUM_IRQS, PCI_NUM_REGIONS, REGION_INFO_FLAG_READ,
    REGION_INFO_FLAG_WRITE,
};

/// BAR0: 256 bytes of RAM, its whole state. A write to BAR0 at 0xf8 is a
/// "DMA" to the page its value names (logged when the log is on).
struct MigDevice {
    bar0: Vec<u8>,
    state: MigState,
    arcs: Vec<MigState>,
    out: Vec<u8>,
    read_at: usize,
    resume: Vec<u8>,
    logging: Option<BTreeSet<u64>>,
}

impl MigDevice {
    fn new() -> Self {
        MigDevice {
            bar0: vec![0; 256],
            state: MigState::Running,
            arcs: Vec::new(),
            out: Vec::new(),
            read_at: 0,
            resume: Vec::new(),
            logging: None,
        }
    }
}

impl VfioUserDevice for MigDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            argsz: 0,
            flags: DEVICE_FLAGS_PCI,
            num_regions: PCI_NUM_REGIONS,
            num_irqs: PCI_NUM_IRQS,
        }
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let size = match index {
            0 => 256,
            PCI_CONFIG_REGION_INDEX => 256,
            i if i < PCI_NUM_REGIONS => 0,
            _ => return None,
        };
        Some(RegionInfo {
            flags: REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE,
            size,
            ..Default::default()
        })
    }
    fn irq_info(&self, _index: u32) -> Option<IrqInfo> {
        None
    }
    fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        if region == 0 {
            let o = offset as usize;
            data.copy_from_slice(&self.bar0[o..o + data.len()]);
        } else {
            data.fill(0x5a);
        }
        Ok(())
    }
    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        if region != 0 {
            return Ok(());
        }
        if offset == 0xf8 && data.len() == 8 {
            let page = u64::from_le_bytes(data.try_into().unwrap_or_default());
            if let Some(l) = &mut self.logging {
                l.insert(page);
            }
            return Ok(());
        }
        let o = offset as usize;
        self.bar0[o..o + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn dma_map(&mut self, _map: &DmaMap, _fd: Option<OwnedFd>) -> Result<(), DeviceError> {
        Ok(())
    }
    fn dma_unmap(&mut self, _unmap: &DmaUnmap) -> Result<(), DeviceError> {
        Ok(())
    }
    fn set_irqs(&mut self, _s: &SetIrqs, _d: &[u8], _f: Vec<OwnedFd>) -> Result<(), DeviceError> {
        Ok(())
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.bar0.fill(0);
        self.state = MigState::Running;
        Ok(())
    }
    fn client_disconnected(&mut self) {}

    fn migration_flags(&self) -> u64 {
        MIGRATION_STOP_COPY
    }
    fn mig_state(&self) -> MigState {
        self.state
    }
    fn mig_arc(&mut self, to: MigState) -> Result<(), DeviceError> {
        self.arcs.push(to);
        match (self.state, to) {
            (MigState::Stop, MigState::StopCopy) => {
                self.out = self.bar0.clone();
                self.read_at = 0;
            }
            (MigState::Stop, MigState::Resuming) => self.resume.clear(),
            (MigState::Resuming, MigState::Stop) => {
                if self.resume.len() != 256 {
                    self.state = MigState::Error;
                    return Err(DeviceError::invalid(format!(
                        "{} bytes of state, not 256",
                        self.resume.len()
                    )));
                }
                self.bar0 = std::mem::take(&mut self.resume);
            }
            _ => {}
        }
        self.state = to;
        Ok(())
    }
    fn mig_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let rest = &self.out[self.read_at..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.read_at += n;
        Ok(n)
    }
    fn mig_write(&mut self, data: &[u8]) -> Result<(), DeviceError> {
        self.resume.extend_from_slice(data);
        Ok(())
    }
    fn dma_logging(&self) -> bool {
        true
    }
    fn dma_logging_start(&mut self, _start: &DmaLoggingStart) -> Result<u64, DeviceError> {
        if self.logging.is_some() {
            return Err(DeviceError::new(libc::EBUSY, "already logging"));
        }
        self.logging = Some(BTreeSet::new());
        Ok(4096)
    }
    fn dma_logging_stop(&mut self) -> Result<(), DeviceError> {
        self.logging = None;
        Ok(())
    }
    fn dma_logging_report(
        &mut self,
        r: &DmaLoggingReport,
        bitmap: &mut [u8],
    ) -> Result<(), DeviceError> {
        let log = self
            .logging
            .as_mut()
            .ok_or_else(|| DeviceError::invalid("not logging"))?;
        let hits: Vec<u64> = log.range(r.iova..r.iova + r.length).copied().collect();
        for a in hits {
            log.remove(&a);
            let n = (a - r.iova) / r.page_size;
            bitmap[(n / 8) as usize] |= 1 << (n % 8);
        }
        Ok(())
    }
}

fn serve(dev: &Arc<Mutex<MigDevice>>, chunk: u32) -> VfioUserClient {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let d = dev.clone();
    std::thread::spawn(move || {
        let opts = ServerOptions {
            name: "mig".into(),
            max_data_xfer_size: 4096,
            ..Default::default()
        };
        serve_connection(b, &*d, &opts)
    });
    VfioUserClient::from_stream(
        a,
        ClientOptions {
            max_data_xfer_size: chunk,
            ..Default::default()
        },
    )
    .expect("negotiate")
}

fn errno(r: Result<impl std::fmt::Debug, ClientError>) -> i32 {
    match r {
        Err(ClientError::Remote { errno, .. }) => errno,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_devices_state_moves_to_another_server_through_the_wire() {
    let src = Arc::new(Mutex::new(MigDevice::new()));
    let dst = Arc::new(Mutex::new(MigDevice::new()));
    // 64-byte chunks: the 256 bytes take four full reads and a short one.
    let mut a = serve(&src, 64);
    let mut b = serve(&dst, 64);
    assert_eq!(a.migration_flags().unwrap(), MIGRATION_STOP_COPY);
    assert!(a
        .probe_feature(
            FEATURE_MIG_DEVICE_STATE,
            DEVICE_FEATURE_GET | DEVICE_FEATURE_SET
        )
        .unwrap());
    assert!(!a
        .probe_feature(FEATURE_MIGRATION, DEVICE_FEATURE_SET)
        .unwrap());
    let pattern: Vec<u8> = (0..=255u8).collect();
    a.region_write(0, 0, &pattern).unwrap();
    assert_eq!(a.mig_state().unwrap(), MigState::Running);

    assert_eq!(
        a.set_mig_state(MigState::StopCopy).unwrap(),
        MigState::StopCopy
    );
    assert_eq!(
        src.lock().unwrap().arcs,
        [MigState::Stop, MigState::StopCopy]
    );
    // BARs are refused out of RUNNING; the configuration space answers.
    let mut four = [0u8; 4];
    assert_eq!(errno(a.region_read(0, 0, &mut four)), libc::EBUSY);
    a.region_read(PCI_CONFIG_REGION_INDEX, 0, &mut four)
        .unwrap();
    assert_eq!(four, [0x5a; 4]);
    let data = a.mig_read_all(1 << 20).unwrap();
    assert_eq!(data, pattern);
    a.set_mig_state(MigState::Stop).unwrap();

    b.set_mig_state(MigState::Resuming).unwrap();
    assert_eq!(
        dst.lock().unwrap().arcs,
        [MigState::Stop, MigState::Resuming]
    );
    b.mig_write_all(&data).unwrap();
    b.set_mig_state(MigState::Running).unwrap();
    let mut got = vec![0u8; 256];
    b.region_read(0, 0, &mut got).unwrap();
    assert_eq!(got, pattern);

    // The source, told to run again, runs as it was.
    a.set_mig_state(MigState::Running).unwrap();
    a.region_read(0, 0, &mut got).unwrap();
    assert_eq!(got, pattern);
}

#[test]
fn a_truncated_stream_fails_into_error_and_a_reset_recovers() {
    let dst = Arc::new(Mutex::new(MigDevice::new()));
    let mut b = serve(&dst, 4096);
    b.set_mig_state(MigState::Resuming).unwrap();
    b.mig_write_all(&[1; 10]).unwrap();
    assert_eq!(errno(b.set_mig_state(MigState::Running)), libc::EINVAL);
    assert_eq!(b.mig_state().unwrap(), MigState::Error);
    let mut four = [0u8; 4];
    assert_eq!(errno(b.region_read(0, 0, &mut four)), libc::EBUSY);
    assert_eq!(errno(b.set_mig_state(MigState::Running)), libc::EINVAL);
    b.reset().unwrap();
    assert_eq!(b.mig_state().unwrap(), MigState::Running);
    b.region_read(0, 0, &mut four).unwrap();
}

/// Raw DEVICE_FEATURE / MIG_DATA requests the client would not send.
fn raw(c: &mut VfioUserClient, cmd: Command, payload: &[u8]) -> i32 {
    let mut m = Vec::new();
    crate::vfio_user::messages::Header::command(9, cmd, payload.len(), false).encode(&mut m);
    m.extend_from_slice(payload);
    c.send_raw(&m).unwrap();
    let mut reply = [0u8; 16];
    use std::io::Read;
    let mut s = c.socket();
    s.read_exact(&mut reply).unwrap();
    let h = crate::vfio_user::messages::Header::parse(&reply).unwrap();
    // Drain a successful reply's payload.
    let mut rest = vec![0u8; h.msg_size as usize - 16];
    s.read_exact(&mut rest).unwrap();
    if h.is_error() {
        h.error as i32
    } else {
        0
    }
}

fn feature(flags: u32, argsz: u32, data: &[u8]) -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&argsz.to_le_bytes());
    p.extend_from_slice(&flags.to_le_bytes());
    p.extend_from_slice(data);
    p
}

#[test]
fn the_server_refuses_what_the_spec_does_and_the_channel_goes_on() {
    let dev = Arc::new(Mutex::new(MigDevice::new()));
    let mut c = serve(&dev, 4096);
    let state = |s: u32| {
        let mut d = Vec::new();
        MigDeviceState {
            device_state: s,
            data_fd: 0,
        }
        .encode(&mut d);
        d
    };
    let set_state = DEVICE_FEATURE_SET | FEATURE_MIG_DEVICE_STATE;
    for (what, cmd, payload, want) in [
        (
            "GET and SET without PROBE",
            Command::DeviceFeature,
            feature(DEVICE_FEATURE_GET | set_state, 64, &state(1)),
            libc::EINVAL,
        ),
        (
            "an unknown flag",
            Command::DeviceFeature,
            feature(1 << 20 | FEATURE_MIGRATION | DEVICE_FEATURE_GET, 64, &[]),
            libc::EINVAL,
        ),
        (
            "an unknown feature",
            Command::DeviceFeature,
            feature(99 | DEVICE_FEATURE_GET, 64, &[]),
            libc::ENOTSUP,
        ),
        (
            "state 8",
            Command::DeviceFeature,
            feature(set_state, 64, &state(8)),
            libc::EINVAL,
        ),
        (
            "PRE_COPY, not offered",
            Command::DeviceFeature,
            feature(set_state, 64, &state(6)),
            libc::EINVAL,
        ),
        (
            "ERROR",
            Command::DeviceFeature,
            feature(set_state, 64, &state(0)),
            libc::EINVAL,
        ),
        (
            "a short state",
            Command::DeviceFeature,
            feature(set_state, 64, &[1, 0, 0]),
            libc::EINVAL,
        ),
        (
            "a GET with no room",
            Command::DeviceFeature,
            feature(FEATURE_MIGRATION | DEVICE_FEATURE_GET, 8, &[]),
            libc::EINVAL,
        ),
        (
            "READ while RUNNING",
            Command::MigDataRead,
            [16u32.to_le_bytes(), 8u32.to_le_bytes()].concat(),
            libc::EINVAL,
        ),
        (
            "WRITE while RUNNING",
            Command::MigDataWrite,
            [12u32.to_le_bytes(), 4u32.to_le_bytes(), [0; 4]].concat(),
            libc::EINVAL,
        ),
        (
            "READ above max_data_xfer_size",
            Command::MigDataRead,
            [(8 + 8192u32).to_le_bytes(), 8192u32.to_le_bytes()].concat(),
            libc::E2BIG,
        ),
        (
            "READ with argsz below its size",
            Command::MigDataRead,
            [8u32.to_le_bytes(), 64u32.to_le_bytes()].concat(),
            libc::EINVAL,
        ),
        (
            "a REPORT whose bitmap passes max_data_xfer_size",
            Command::DeviceFeature,
            feature(
                FEATURE_DMA_LOGGING_REPORT | DEVICE_FEATURE_GET,
                u32::MAX,
                &[
                    0u64.to_le_bytes(),
                    (1u64 << 40).to_le_bytes(),
                    4096u64.to_le_bytes(),
                ]
                .concat(),
            ),
            libc::E2BIG,
        ),
        (
            "a REPORT of page 3000",
            Command::DeviceFeature,
            feature(
                FEATURE_DMA_LOGGING_REPORT | DEVICE_FEATURE_GET,
                u32::MAX,
                &[
                    0u64.to_le_bytes(),
                    4096u64.to_le_bytes(),
                    3000u64.to_le_bytes(),
                ]
                .concat(),
            ),
            libc::EINVAL,
        ),
        (
            "a START of page 3000",
            Command::DeviceFeature,
            feature(
                FEATURE_DMA_LOGGING_START | DEVICE_FEATURE_SET,
                64,
                &[3000u64.to_le_bytes(), 0u64.to_le_bytes()].concat(),
            ),
            libc::EINVAL,
        ),
    ] {
        assert_eq!(raw(&mut c, cmd, &payload), want, "{what}");
        assert_eq!(dev.lock().unwrap().state, MigState::Running, "{what}");
    }
    // The channel went on: a well-formed request still works.
    assert_eq!(c.mig_state().unwrap(), MigState::Running);
}

/// The trait's defaults: a device that offers no migration.
struct NoMigration(MigDevice);

impl VfioUserDevice for NoMigration {
    fn device_info(&self) -> DeviceInfo {
        self.0.device_info()
    }
    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        self.0.region_info(index)
    }
    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        self.0.irq_info(index)
    }
    fn region_read(&mut self, r: u32, o: u64, d: &mut [u8]) -> Result<(), DeviceError> {
        self.0.region_read(r, o, d)
    }
    fn region_write(&mut self, r: u32, o: u64, d: &[u8]) -> Result<(), DeviceError> {
        self.0.region_write(r, o, d)
    }
    fn dma_map(&mut self, m: &DmaMap, f: Option<OwnedFd>) -> Result<(), DeviceError> {
        self.0.dma_map(m, f)
    }
    fn dma_unmap(&mut self, u: &DmaUnmap) -> Result<(), DeviceError> {
        self.0.dma_unmap(u)
    }
    fn set_irqs(&mut self, s: &SetIrqs, d: &[u8], f: Vec<OwnedFd>) -> Result<(), DeviceError> {
        self.0.set_irqs(s, d, f)
    }
    fn reset(&mut self) -> Result<(), DeviceError> {
        self.0.reset()
    }
    fn client_disconnected(&mut self) {}
}

#[test]
fn a_device_without_migration_refuses_all_of_it() {
    let dev = Arc::new(Mutex::new(NoMigration(MigDevice::new())));
    let (a, b) = UnixStream::pair().expect("socketpair");
    let d = dev.clone();
    std::thread::spawn(move || serve_connection(b, &*d, &ServerOptions::default()));
    let mut c = VfioUserClient::from_stream(a, ClientOptions::default()).unwrap();
    assert_eq!(c.migration_flags().unwrap(), 0);
    assert!(!c
        .probe_feature(FEATURE_MIGRATION, DEVICE_FEATURE_GET)
        .unwrap());
    assert_eq!(errno(c.mig_state()), libc::ENOTSUP);
    assert_eq!(errno(c.set_mig_state(MigState::Stop)), libc::ENOTSUP);
    assert_eq!(errno(c.dma_logging_start(4096, &[])), libc::ENOTSUP);
    assert_eq!(errno(c.mig_read_all(1 << 20)), libc::EINVAL);
    // And it runs on.
    let mut four = [0u8; 4];
    c.region_read(0, 0, &mut four).unwrap();
}

#[test]
fn dma_writes_are_reported_once_each_in_their_range() {
    let dev = Arc::new(Mutex::new(MigDevice::new()));
    let mut c = serve(&dev, 4096);
    let ranges = [DmaRange {
        iova: 0,
        length: 1 << 20,
    }];
    assert_eq!(c.dma_logging_start(4096, &ranges).unwrap(), 4096);
    assert_eq!(errno(c.dma_logging_start(4096, &ranges)), libc::EBUSY);
    for page in [0x1000u64, 0x3000, 0x20_0000] {
        c.region_write(0, 0xf8, &page.to_le_bytes()).unwrap();
    }
    assert_eq!(
        c.dma_logging_report(0, 0x10000, 4096).unwrap(),
        [0x1000, 0x3000]
    );
    assert!(c.dma_logging_report(0, 0x10000, 4096).unwrap().is_empty());
    // Outside the first report's range: still there.
    assert_eq!(
        c.dma_logging_report(0x20_0000, 0x1000, 4096).unwrap(),
        [0x20_0000]
    );
    c.dma_logging_stop().unwrap();
    assert_eq!(errno(c.dma_logging_report(0, 0x10000, 4096)), libc::EINVAL);
}
