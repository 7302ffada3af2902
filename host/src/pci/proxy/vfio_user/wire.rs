//! vfio-user migration v2 as the VMM drives it for a remote without our
//! control channel (docs/vfio-user-migration.md part 5): the device's
//! state and its DMA dirty log through the protocol itself.

use std::time::Duration;

use channel::vfio_user::migration::{DmaRange, MigState, MIGRATION_STOP_COPY};
use channel::vfio_user::VfioUserClient;

use crate::pci::proxy::transport::TransportError;

/// The most state one device may send (the stream's limit on all devices'
/// states together is the same).
const MAX_STATE: usize = 64 << 20;

/// The page the VMM asks the dirty log in (KVM's).
const PAGE: u64 = 4096;

fn text(e: channel::vfio_user::ClientError) -> TransportError {
    e.to_string()
}

/// The remote offers STOP_COPY.
pub fn check(c: &mut VfioUserClient) -> Result<(), TransportError> {
    let flags = c.migration_flags().map_err(text)?;
    if flags & MIGRATION_STOP_COPY == 0 {
        return Err("the remote offers no vfio-user migration (STOP_COPY)".into());
    }
    Ok(())
}

/// RUNNING → STOP_COPY (through STOP: the remote lets its work finish,
/// which may take `quiesce` beyond the usual reply time), the data, then
/// RUNNING again, also when a step failed (best effort). Whether the
/// remote migrates at all was asked once before (`check`, from the
/// snapshot's `check_savable`); one that does not refuses the first step.
pub fn save(c: &mut VfioUserClient, quiesce: Duration) -> Result<Vec<u8>, TransportError> {
    let usual = c.timeout();
    c.set_timeout(usual + quiesce);
    let r = c
        .set_mig_state(MigState::StopCopy)
        .and_then(|_| c.mig_read_all(MAX_STATE));
    c.set_timeout(usual);
    let back = c.set_mig_state(MigState::Running);
    let data = r.map_err(text)?;
    back.map_err(|e| format!("the device did not run again after its save: {e}"))?;
    Ok(data)
}

/// RESUMING, the data, then RUNNING (through STOP, where the remote
/// checks and applies it). A refused state leaves the device in ERROR
/// and the error says why.
pub fn restore(c: &mut VfioUserClient, state: &[u8]) -> Result<(), TransportError> {
    c.set_mig_state(MigState::Resuming).map_err(text)?;
    c.mig_write_all(state).map_err(text)?;
    c.set_mig_state(MigState::Running)
        .map_err(|e| format!("the remote refused the state: {e}"))?;
    Ok(())
}

/// The smallest power-of-two page from [`PAGE`] up whose bitmap for
/// `len` bytes fits `max` bytes.
fn report_page(len: u64, max: usize) -> u64 {
    let mut page = PAGE;
    while len.div_ceil(page).div_ceil(8) > max as u64 && page < 1 << 40 {
        page *= 2;
    }
    page
}

pub fn dma_log(
    c: &mut VfioUserClient,
    action: &str,
    regions: &[(u64, u64)],
) -> Result<Vec<(u64, u64)>, TransportError> {
    match action {
        "start" => {
            let ranges: Vec<DmaRange> = regions
                .iter()
                .map(|&(iova, length)| DmaRange { iova, length })
                .collect();
            c.dma_logging_start(PAGE, &ranges).map_err(text)?;
            Ok(Vec::new())
        }
        "stop" => c.dma_logging_stop().map(|()| Vec::new()).map_err(text),
        "take" => {
            let mut runs: Vec<(u64, u64)> = Vec::new();
            // One report per region: libvfio-user wants each inside one
            // DMA mapping, and the VMM maps each region once.
            for &(gpa, len) in regions {
                let page = report_page(len, c.max_data_xfer_size());
                for addr in c.dma_logging_report(gpa, len, page).map_err(text)? {
                    let size = page.min(gpa + len - addr);
                    match runs.last_mut() {
                        Some((s, l)) if *s + *l == addr => *l += size,
                        _ => runs.push((addr, size)),
                    }
                }
            }
            Ok(runs)
        }
        other => Err(format!("dirty log action `{other}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_ask_with_a_page_whose_bitmap_fits() {
        // 4 GiB in 4 KiB pages: 128 KiB of bitmap.
        assert_eq!(report_page(4 << 30, 1 << 20), 4096);
        // 64 GiB: 2 MiB of bitmap at 4 KiB, so 8 KiB pages.
        assert_eq!(report_page(64 << 30, 1 << 20), 8192);
        // 512 pages at most: 128 MiB each.
        assert_eq!(report_page(64 << 30, 64), 1 << 27);
    }
}
