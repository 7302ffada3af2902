//! The client's side of migration v2 (docs/vfio-user-migration.md): the
//! device's migration state, its data in `max_data_xfer_size` chunks, and
//! its DMA dirty log.

use super::{ClientError, VfioUserClient};
use crate::vfio_user::messages::{Command, DeviceFeature, MigData};
use crate::vfio_user::migration::{
    DmaLoggingReport, DmaLoggingStart, DmaRange, MigDeviceState, MigState, DEVICE_FEATURE_GET,
    DEVICE_FEATURE_PROBE, DEVICE_FEATURE_SET, FEATURE_DMA_LOGGING_REPORT,
    FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_MIGRATION,
    FEATURE_MIG_DEVICE_STATE,
};

impl VfioUserClient {
    /// DEVICE_FEATURE `feature` | `ops` with `data`; the reply's data
    /// (after its 8-byte head).
    fn feature(
        &mut self,
        feature: u32,
        ops: u32,
        data: &[u8],
        reply: usize,
    ) -> Result<Vec<u8>, ClientError> {
        let mut head = Vec::with_capacity(DeviceFeature::LEN);
        DeviceFeature {
            argsz: (DeviceFeature::LEN + reply.max(data.len())) as u32,
            flags: feature | ops,
        }
        .encode(&mut head);
        self.call(Command::DeviceFeature, &head, data, &[])?;
        let (_, rest) = DeviceFeature::parse(self.reply_payload())?;
        Ok(rest.to_vec())
    }

    /// Whether the server takes `feature` with `ops` (GET and/or SET).
    pub fn probe_feature(&mut self, feature: u32, ops: u32) -> Result<bool, ClientError> {
        match self.feature(feature, ops | DEVICE_FEATURE_PROBE, &[], 0) {
            Ok(_) => Ok(true),
            Err(ClientError::Remote { errno, .. })
                if errno == libc::ENOTSUP || errno == libc::EINVAL =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// The device's `FEATURE_MIGRATION` flags; 0 when it has no migration.
    pub fn migration_flags(&mut self) -> Result<u64, ClientError> {
        match self.feature(FEATURE_MIGRATION, DEVICE_FEATURE_GET, &[], 8) {
            Ok(d) => {
                let b: [u8; 8] = d.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| {
                    ClientError::Protocol(format!("FEATURE_MIGRATION reply of {} bytes", d.len()))
                })?;
                Ok(u64::from_le_bytes(b))
            }
            Err(ClientError::Remote { errno, .. }) if errno == libc::ENOTSUP => Ok(0),
            Err(e) => Err(e),
        }
    }

    fn parse_state(d: &[u8]) -> Result<MigState, ClientError> {
        let s = MigDeviceState::parse(d.get(..MigDeviceState::LEN).unwrap_or(d))?;
        MigState::from_u32(s.device_state)
            .ok_or_else(|| ClientError::Protocol(format!("device state {}", s.device_state)))
    }

    /// The device's migration state.
    pub fn mig_state(&mut self) -> Result<MigState, ClientError> {
        let d = self.feature(
            FEATURE_MIG_DEVICE_STATE,
            DEVICE_FEATURE_GET,
            &[],
            MigDeviceState::LEN,
        )?;
        Self::parse_state(&d)
    }

    /// Takes the device to `to` (the server walks the path); the state it
    /// reports once there.
    pub fn set_mig_state(&mut self, to: MigState) -> Result<MigState, ClientError> {
        let mut data = Vec::with_capacity(MigDeviceState::LEN);
        MigDeviceState {
            device_state: to as u32,
            data_fd: u32::MAX,
        }
        .encode(&mut data);
        let d = self.feature(FEATURE_MIG_DEVICE_STATE, DEVICE_FEATURE_SET, &data, 0)?;
        let got = Self::parse_state(&d)?;
        if got != to {
            return Err(ClientError::Protocol(format!(
                "asked device state {to:?}, the server reports {got:?}"
            )));
        }
        Ok(got)
    }

    /// All of the device's migration data (in STOP_COPY), read in chunks
    /// until one comes back short; more than `max` bytes is an error.
    pub fn mig_read_all(&mut self, max: usize) -> Result<Vec<u8>, ClientError> {
        let chunk = self.chunk();
        let mut out = Vec::new();
        loop {
            let mut head = Vec::with_capacity(MigData::LEN);
            MigData {
                argsz: (MigData::LEN + chunk) as u32,
                size: chunk as u32,
            }
            .encode(&mut head);
            self.call(Command::MigDataRead, &head, &[], &[])?;
            let payload = self.reply_payload();
            let m = MigData::parse(
                payload.get(..MigData::LEN).unwrap_or(payload),
                "MIG_DATA_READ reply",
                false,
            )?
            .0;
            let data = payload
                .get(MigData::LEN..MigData::LEN + m.size as usize)
                .filter(|_| m.size as usize <= chunk)
                .ok_or_else(|| {
                    ClientError::Protocol(format!(
                        "MIG_DATA_READ reply says {} bytes, holds {} (asked {chunk})",
                        m.size,
                        payload.len().saturating_sub(MigData::LEN)
                    ))
                })?;
            if out.len() + data.len() > max {
                return Err(ClientError::Protocol(format!(
                    "the device's migration data passes {max} bytes"
                )));
            }
            out.extend_from_slice(data);
            if data.len() < chunk {
                return Ok(out);
            }
        }
    }

    /// Writes `data` as the device's migration data (in RESUMING).
    pub fn mig_write_all(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for piece in data.chunks(self.chunk()) {
            let mut head = Vec::with_capacity(MigData::LEN);
            MigData {
                argsz: (MigData::LEN + piece.len()) as u32,
                size: piece.len() as u32,
            }
            .encode(&mut head);
            self.call(Command::MigDataWrite, &head, piece, &[])?;
        }
        Ok(())
    }

    /// Starts the device's DMA dirty log over `ranges`; the page size it
    /// chose.
    pub fn dma_logging_start(
        &mut self,
        page_size: u64,
        ranges: &[DmaRange],
    ) -> Result<u64, ClientError> {
        let mut data = Vec::new();
        DmaLoggingStart {
            page_size,
            ranges: ranges.to_vec(),
        }
        .encode(&mut data);
        let d = self.feature(FEATURE_DMA_LOGGING_START, DEVICE_FEATURE_SET, &data, 0)?;
        let b: [u8; 8] = d
            .get(..8)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| ClientError::Protocol("DMA_LOGGING_START reply".into()))?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn dma_logging_stop(&mut self) -> Result<(), ClientError> {
        self.feature(FEATURE_DMA_LOGGING_STOP, DEVICE_FEATURE_SET, &[], 0)?;
        Ok(())
    }

    /// The addresses of the pages of `[iova, iova + length)` the device
    /// wrote since the last report of them (which clears them).
    pub fn dma_logging_report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
    ) -> Result<Vec<u64>, ClientError> {
        let report = DmaLoggingReport {
            iova,
            length,
            page_size,
        };
        let bytes = report
            .bitmap_bytes()
            .ok_or_else(|| ClientError::Invalid(format!("DMA logging report {report:?}")))?;
        let mut data = Vec::with_capacity(DmaLoggingReport::LEN);
        report.encode(&mut data);
        let d = self.feature(
            FEATURE_DMA_LOGGING_REPORT,
            DEVICE_FEATURE_GET,
            &data,
            DmaLoggingReport::LEN + bytes,
        )?;
        let bitmap = d
            .get(DmaLoggingReport::LEN..DmaLoggingReport::LEN + bytes)
            .ok_or_else(|| {
                ClientError::Protocol(format!("DMA_LOGGING_REPORT reply of {} bytes", d.len()))
            })?;
        let pages = length.div_ceil(page_size);
        Ok((0..pages)
            .filter(|&n| bitmap[(n / 8) as usize] & (1 << (n % 8)) != 0)
            .map(|n| iova + n * page_size)
            .collect())
    }
}
