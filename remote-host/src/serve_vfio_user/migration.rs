//! vfio-user migration v2 for a served device (docs/vfio-user-migration.md
//! part 4): what a VMM that is not ours, or ours without a control
//! channel, uses to move a device's state.
//!
//! - STOP_COPY only: a plugin's `save_state` is one blob, never
//!   incremental.
//! - RUNNING → STOP is the quiesce: the device's own work is let finish
//!   (at most [`QUIESCE`], as the control channel's `device-save`), and
//!   the server refuses BAR accesses from then on; the configuration
//!   space still answers.
//! - STOP → STOP_COPY takes `save_state` behind a header (magic, version,
//!   plugin name, length); MIG_DATA_READ hands it out in pieces.
//! - STOP → RESUMING starts an empty buffer that MIG_DATA_WRITE fills
//!   (at most [`MAX_STREAM`]); RESUMING → STOP checks the header against
//!   this device's plugin and calls `restore_state`, which refuses a
//!   state it cannot take and leaves the device as it was; the arc then
//!   fails into ERROR, which DEVICE_RESET leaves.
//! - DMA dirty logging is the device's [`DirtyLog`](plugin_api::dirty::DirtyLog),
//!   the one the control channel's `dirty-log` drives: one of the two at
//!   a time (a START while it logs is refused).

use std::time::Duration;

use channel::vfio_user::migration::{DmaLoggingReport, MigState};
use channel::vfio_user::DeviceError;

use crate::devices::RemoteDevice;

/// How long RUNNING → STOP waits for the device's own work to finish.
pub const QUIESCE: Duration = Duration::from_secs(5);

/// The most migration data a device sends or takes (the VMM's limit on
/// one device's state in its stream is the same).
pub const MAX_STREAM: usize = 64 << 20;

const MAGIC: &[u8; 8] = b"RHVUMIG\0";
const VERSION: u32 = 1;

/// One device's migration session (kept across connections; a new
/// client or a reset finds it RUNNING).
#[derive(Debug)]
pub struct Migration {
    state: MigState,
    out: Vec<u8>,
    read_at: usize,
    input: Vec<u8>,
    /// This session started the dirty log (and stops it on a reset).
    logging: bool,
}

impl Default for Migration {
    fn default() -> Self {
        Migration {
            state: MigState::Running,
            out: Vec::new(),
            read_at: 0,
            input: Vec::new(),
            logging: false,
        }
    }
}

impl Migration {
    pub fn state(&self) -> MigState {
        self.state
    }

    /// One direct arc (the server walks longer paths).
    pub fn arc(&mut self, dev: &RemoteDevice, to: MigState) -> Result<(), DeviceError> {
        match (self.state, to) {
            (MigState::Running, MigState::Stop) => {
                if !dev.function().wait_idle(QUIESCE) {
                    tracing::warn!(device = %dev.id, "still busy after {QUIESCE:?}: saved as it is, its work is redone on restore");
                }
            }
            (MigState::Stop, MigState::Running) => {}
            (MigState::Stop, MigState::StopCopy) => {
                let state = dev
                    .function()
                    .save_state()
                    .map_err(|e| DeviceError::new(libc::EIO, e.message))?;
                self.out = encode(&dev.plugin_name, &state);
                self.read_at = 0;
                tracing::info!(device = %dev.id, "state saved for vfio-user migration ({} bytes)", state.len());
                if self.out.len() > MAX_STREAM {
                    self.out = Vec::new();
                    return Err(DeviceError::new(
                        libc::EFBIG,
                        format!("a state of {} bytes", state.len()),
                    ));
                }
            }
            (MigState::StopCopy, MigState::Stop) => self.out = Vec::new(),
            (MigState::Stop, MigState::Resuming) => self.input = Vec::new(),
            (MigState::Resuming, MigState::Stop) => {
                let input = std::mem::take(&mut self.input);
                let restored = decode(&dev.plugin_name, &input).and_then(|state| {
                    dev.function()
                        .restore_state(state)
                        .map_err(|e| format!("the device refused its state: {}", e.message))
                });
                dev.mirrors.notify();
                if let Err(e) = restored {
                    tracing::warn!(device = %dev.id, "vfio-user migration: {e}");
                    self.state = MigState::Error;
                    return Err(DeviceError::invalid(e));
                }
                tracing::info!(device = %dev.id, "state restored by vfio-user migration ({} bytes)", input.len());
            }
            (from, to) => {
                return Err(DeviceError::invalid(format!(
                    "no direct arc from {from:?} to {to:?}"
                )))
            }
        }
        self.state = to;
        Ok(())
    }

    /// The next bytes of the saved state.
    pub fn read(&mut self, buf: &mut [u8]) -> usize {
        let rest = self.out.get(self.read_at..).unwrap_or(&[]);
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.read_at += n;
        n
    }

    /// More of the state to restore.
    pub fn write(&mut self, data: &[u8]) -> Result<(), DeviceError> {
        if self.input.len() + data.len() > MAX_STREAM {
            return Err(DeviceError::new(
                libc::EFBIG,
                format!("migration data past {MAX_STREAM} bytes"),
            ));
        }
        self.input.extend_from_slice(data);
        Ok(())
    }

    /// Starts the device's dirty log; it logs 4 KiB pages.
    pub fn logging_start(&mut self, dev: &RemoteDevice) -> Result<u64, DeviceError> {
        if dev.dirty.is_on() {
            return Err(DeviceError::new(
                libc::EBUSY,
                "the device's DMA is logged already",
            ));
        }
        dev.dirty.start();
        self.logging = true;
        Ok(plugin_api::dirty::PAGE)
    }

    pub fn logging_stop(&mut self, dev: &RemoteDevice) -> Result<(), DeviceError> {
        if !self.logging {
            return Err(DeviceError::invalid("DMA logging was not started"));
        }
        dev.dirty.stop();
        self.logging = false;
        Ok(())
    }

    /// The pages of `r`'s range written since they were last reported, as
    /// the bitmap lays them out: each 4 KiB page sets the bits of every
    /// report page it overlaps.
    pub fn report(
        &self,
        dev: &RemoteDevice,
        r: &DmaLoggingReport,
        bitmap: &mut [u8],
    ) -> Result<(), DeviceError> {
        if !self.logging {
            return Err(DeviceError::invalid("DMA logging was not started"));
        }
        let page = plugin_api::dirty::PAGE;
        let end = r.iova + r.length;
        for p in dev.dirty.take_range(r.iova, r.length) {
            let start = (p * page).max(r.iova);
            let last = (p * page + page).min(end) - 1;
            for n in (start - r.iova) / r.page_size..=(last - r.iova) / r.page_size {
                if let Some(b) = bitmap.get_mut((n / 8) as usize) {
                    *b |= 1 << (n % 8);
                }
            }
        }
        Ok(())
    }

    /// Back to RUNNING with nothing buffered, the log stopped if this
    /// session started it (DEVICE_RESET, a client gone).
    pub fn reset(&mut self, dev: &RemoteDevice) {
        if self.logging {
            dev.dirty.stop();
        }
        *self = Migration::default();
    }
}

/// The stream: magic, version, the plugin's name, the state's length,
/// the state.
fn encode(plugin: &str, state: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(24 + plugin.len() + state.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(plugin.len() as u32).to_le_bytes());
    out.extend_from_slice(plugin.as_bytes());
    out.extend_from_slice(&(state.len() as u64).to_le_bytes());
    out.extend_from_slice(state);
    out
}

/// The state in a stream made by [`encode`] for `plugin`.
fn decode<'a>(plugin: &str, b: &'a [u8]) -> Result<&'a [u8], String> {
    let short = || format!("the migration data ends early ({} bytes)", b.len());
    if b.get(..8) != Some(MAGIC.as_slice()) {
        return Err("the migration data is not a remote-host device's state".into());
    }
    let u32_at = |at: usize| {
        b.get(at..at + 4)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    let version = u32_at(8).ok_or_else(short)?;
    if version != VERSION {
        return Err(format!(
            "migration data version {version}; this remote-host reads {VERSION}"
        ));
    }
    let name_len = u32_at(12).ok_or_else(short)? as usize;
    let name = b.get(16..16 + name_len).ok_or_else(short)?;
    if name != plugin.as_bytes() {
        return Err(format!(
            "the state is of plugin `{}`, this device is `{plugin}`",
            String::from_utf8_lossy(name)
        ));
    }
    let at = 16 + name_len;
    let len = b
        .get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap_or_default()))
        .ok_or_else(short)?;
    let state = &b[at + 8..];
    if state.len() as u64 != len {
        return Err(format!("the state says {len} bytes, {} came", state.len()));
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stream_is_checked_before_the_plugin_sees_it() {
        let s = encode("dma-example", b"state!");
        assert_eq!(decode("dma-example", &s), Ok(&b"state!"[..]));
        assert!(decode("lsi53c895a", &s)
            .unwrap_err()
            .contains("plugin `dma-example`"));
        assert!(decode("dma-example", &s[..s.len() - 1])
            .unwrap_err()
            .contains("says 6 bytes"));
        for cut in 0..20 {
            assert!(decode("dma-example", &s[..cut]).is_err(), "{cut}");
        }
        let mut v2 = s.clone();
        v2[8] = 2;
        assert!(decode("dma-example", &v2)
            .unwrap_err()
            .contains("version 2"));
        assert!(decode("dma-example", b"garbage garbage garbage").is_err());
    }
}
