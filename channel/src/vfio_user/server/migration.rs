//! The server's side of migration v2: DEVICE_FEATURE (migration states,
//! DMA dirty logging) and MIG_DATA_READ / MIG_DATA_WRITE, checked here so
//! that a device only sees well-formed requests in a state that allows
//! them (docs/vfio-user-migration.md part 6 lists each limit).

use std::sync::Mutex;

use super::{lock, DeviceError, VfioUserDevice};
use crate::vfio_user::messages::{DeviceFeature, MigData};
use crate::vfio_user::migration::{
    next_step, DmaLoggingReport, DmaLoggingStart, MigDeviceState, MigState, DEVICE_FEATURE_GET,
    DEVICE_FEATURE_MASK, DEVICE_FEATURE_PROBE, DEVICE_FEATURE_SET, FEATURE_DMA_LOGGING_REPORT,
    FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_MIGRATION,
    FEATURE_MIG_DEVICE_STATE, MIGRATION_PRE_COPY,
};

/// The limits of one connection that these requests need.
pub(super) struct Limits {
    pub max_data_xfer_size: u32,
    pub max_dma_maps: u32,
}

/// DEVICE_FEATURE: the reply payload goes to `tx`.
pub(super) fn device_feature<D: VfioUserDevice + ?Sized>(
    device: &Mutex<D>,
    f: &DeviceFeature,
    data: &[u8],
    limits: &Limits,
    tx: &mut Vec<u8>,
) -> Result<(), DeviceError> {
    let index = f.flags & DEVICE_FEATURE_MASK;
    let ops = f.flags & !DEVICE_FEATURE_MASK;
    let (get, set, probe) = (
        ops & DEVICE_FEATURE_GET != 0,
        ops & DEVICE_FEATURE_SET != 0,
        ops & DEVICE_FEATURE_PROBE != 0,
    );
    if ops & !(DEVICE_FEATURE_GET | DEVICE_FEATURE_SET | DEVICE_FEATURE_PROBE) != 0
        || (get && set && !probe)
        || !(get || set || probe)
    {
        return Err(DeviceError::invalid(format!(
            "DEVICE_FEATURE flags {:#x}",
            f.flags
        )));
    }
    let mut dev = lock(device);
    let migration = dev.migration_flags();
    let logging = dev.dma_logging();
    let supported = match index {
        FEATURE_MIGRATION if migration != 0 => DEVICE_FEATURE_GET,
        FEATURE_MIG_DEVICE_STATE if migration != 0 => DEVICE_FEATURE_GET | DEVICE_FEATURE_SET,
        FEATURE_DMA_LOGGING_START | FEATURE_DMA_LOGGING_STOP if logging => DEVICE_FEATURE_SET,
        FEATURE_DMA_LOGGING_REPORT if logging => DEVICE_FEATURE_GET,
        _ => 0,
    };
    if supported == 0 {
        return Err(DeviceError::unsupported(format!(
            "device feature {index} is not supported"
        )));
    }
    let asked = ops & (DEVICE_FEATURE_GET | DEVICE_FEATURE_SET);
    if asked & !supported != 0 {
        return Err(DeviceError::invalid(format!(
            "device feature {index} does not take {}",
            if asked & !supported & DEVICE_FEATURE_GET != 0 {
                "GET"
            } else {
                "SET"
            }
        )));
    }
    let head = |tx: &mut Vec<u8>, payload: usize| {
        DeviceFeature {
            argsz: (DeviceFeature::LEN + payload) as u32,
            flags: f.flags,
        }
        .encode(tx)
    };
    if probe {
        head(tx, data.len());
        tx.extend_from_slice(data);
        return Ok(());
    }
    let room = |need: usize| {
        if (f.argsz as usize) < DeviceFeature::LEN + need {
            Err(DeviceError::invalid(format!(
                "DEVICE_FEATURE argsz {} is below the {} bytes of the reply",
                f.argsz,
                DeviceFeature::LEN + need
            )))
        } else {
            Ok(())
        }
    };
    match (index, get) {
        (FEATURE_MIGRATION, _) => {
            room(8)?;
            head(tx, 8);
            tx.extend_from_slice(&migration.to_le_bytes());
        }
        (FEATURE_MIG_DEVICE_STATE, true) => {
            room(MigDeviceState::LEN)?;
            head(tx, MigDeviceState::LEN);
            MigDeviceState {
                device_state: dev.mig_state() as u32,
                data_fd: u32::MAX,
            }
            .encode(tx);
        }
        (FEATURE_MIG_DEVICE_STATE, false) => {
            let want =
                MigDeviceState::parse(data).map_err(|e| DeviceError::invalid(e.to_string()))?;
            let to = MigState::from_u32(want.device_state).ok_or_else(|| {
                DeviceError::invalid(format!("no device state {}", want.device_state))
            })?;
            walk(&mut *dev, to, migration & MIGRATION_PRE_COPY != 0)?;
            head(tx, MigDeviceState::LEN);
            MigDeviceState {
                device_state: dev.mig_state() as u32,
                data_fd: u32::MAX,
            }
            .encode(tx);
        }
        (FEATURE_DMA_LOGGING_START, _) => {
            let start = DmaLoggingStart::parse(data, limits.max_dma_maps)
                .map_err(|e| DeviceError::invalid(e.to_string()))?;
            if !start.page_size.is_power_of_two() {
                return Err(DeviceError::invalid(format!(
                    "DMA logging page size {:#x}",
                    start.page_size
                )));
            }
            let chosen = dev.dma_logging_start(&start)?;
            head(tx, data.len());
            DmaLoggingStart {
                page_size: chosen,
                ..start
            }
            .encode(tx);
        }
        (FEATURE_DMA_LOGGING_STOP, _) => {
            if !data.is_empty() {
                return Err(DeviceError::invalid("DMA_LOGGING_STOP takes no data"));
            }
            dev.dma_logging_stop()?;
            head(tx, 0);
        }
        (FEATURE_DMA_LOGGING_REPORT, _) => {
            let report =
                DmaLoggingReport::parse(data).map_err(|e| DeviceError::invalid(e.to_string()))?;
            let bytes = report
                .bitmap_bytes()
                .ok_or_else(|| DeviceError::invalid(format!("DMA logging report {report:?}")))?;
            if bytes > limits.max_data_xfer_size as usize {
                return Err(DeviceError::new(
                    libc::E2BIG,
                    format!("a bitmap of {bytes} bytes; ask with a larger page"),
                ));
            }
            room(DmaLoggingReport::LEN + bytes)?;
            head(tx, DmaLoggingReport::LEN + bytes);
            report.encode(tx);
            let start = tx.len();
            tx.resize(start + bytes, 0);
            dev.dma_logging_report(&report, &mut tx[start..])?;
        }
        _ => {
            return Err(DeviceError::unsupported(format!(
                "device feature {index} is not supported"
            )))
        }
    }
    Ok(())
}

/// Takes the device to `to` one direct arc at a time.
fn walk<D: VfioUserDevice + ?Sized>(
    dev: &mut D,
    to: MigState,
    pre_copy: bool,
) -> Result<(), DeviceError> {
    // No path is longer than the number of states.
    for _ in 0..MigState::ALL.len() {
        let from = dev.mig_state();
        if from == to {
            return Ok(());
        }
        let step = next_step(from, to, pre_copy).ok_or_else(|| {
            DeviceError::invalid(format!("no way from device state {from:?} to {to:?}"))
        })?;
        dev.mig_arc(step)?;
        if dev.mig_state() != step {
            return Err(DeviceError::new(
                libc::EIO,
                format!("the device did not reach {step:?}"),
            ));
        }
    }
    Err(DeviceError::new(libc::EIO, format!("{to:?} not reached")))
}

/// MIG_DATA_READ: the next bytes of the device's migration data.
pub(super) fn mig_read<D: VfioUserDevice + ?Sized>(
    device: &Mutex<D>,
    m: &MigData,
    limits: &Limits,
    tx: &mut Vec<u8>,
) -> Result<(), DeviceError> {
    if m.size > limits.max_data_xfer_size {
        return Err(DeviceError::new(
            libc::E2BIG,
            format!("MIG_DATA_READ of {} bytes", m.size),
        ));
    }
    if (m.argsz as usize) < MigData::LEN + m.size as usize {
        return Err(DeviceError::invalid(format!(
            "MIG_DATA_READ argsz {} for {} bytes",
            m.argsz, m.size
        )));
    }
    let mut dev = lock(device);
    if !dev.mig_state().is_saving() {
        return Err(DeviceError::invalid(format!(
            "MIG_DATA_READ in device state {:?}",
            dev.mig_state()
        )));
    }
    let head = tx.len();
    MigData::default().encode(tx);
    let start = tx.len();
    tx.resize(start + m.size as usize, 0);
    let n = dev.mig_read(&mut tx[start..])?.min(m.size as usize);
    tx.truncate(start + n);
    let mut h = Vec::with_capacity(MigData::LEN);
    MigData {
        argsz: (MigData::LEN + n) as u32,
        size: n as u32,
    }
    .encode(&mut h);
    tx[head..start].copy_from_slice(&h);
    Ok(())
}

/// MIG_DATA_WRITE: more migration data for a resuming device.
pub(super) fn mig_write<D: VfioUserDevice + ?Sized>(
    device: &Mutex<D>,
    m: &MigData,
    data: &[u8],
    limits: &Limits,
) -> Result<(), DeviceError> {
    if m.size > limits.max_data_xfer_size {
        return Err(DeviceError::new(
            libc::E2BIG,
            format!("MIG_DATA_WRITE of {} bytes", m.size),
        ));
    }
    if (m.argsz as usize) < MigData::LEN + m.size as usize {
        return Err(DeviceError::invalid(format!(
            "MIG_DATA_WRITE argsz {} for {} bytes",
            m.argsz, m.size
        )));
    }
    let mut dev = lock(device);
    if dev.mig_state() != MigState::Resuming {
        return Err(DeviceError::invalid(format!(
            "MIG_DATA_WRITE in device state {:?}",
            dev.mig_state()
        )));
    }
    dev.mig_write(data)
}

#[cfg(test)]
mod tests;
