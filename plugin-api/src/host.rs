//! The plugin-side view of the services its host provides.

use abi_stable::std_types::{RResult, RSlice, RSliceMut, RStr};

use crate::abi::{HostBox, LogLevel};

/// Handle to the host's services: guest memory (DMA), the interrupt line
/// and logging. Cheap to clone; `Send + Sync`, so a device's worker threads
/// may keep their own copy.
#[derive(Clone)]
pub struct Host {
    inner: HostBox,
}

/// A DMA access the host refused (outside the memory the VMM shared).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmaError(pub String);

impl std::fmt::Display for DmaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DmaError {}

fn dma(r: RResult<(), abi_stable::std_types::RString>) -> Result<(), DmaError> {
    r.into_result().map_err(|e| DmaError(e.into_string()))
}

impl Host {
    pub fn new(inner: HostBox) -> Self {
        Host { inner }
    }

    /// The ABI object, for handing on.
    pub fn as_ffi(&self) -> &HostBox {
        &self.inner
    }

    /// Reads guest-physical memory.
    pub fn dma_read(&self, gpa: u64, data: &mut [u8]) -> Result<(), DmaError> {
        dma(self.inner.dma_read(gpa, RSliceMut::from_mut_slice(data)))
    }

    /// Writes guest-physical memory.
    pub fn dma_write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        dma(self.inner.dma_write(gpa, RSlice::from_slice(data)))
    }

    /// Reads a little-endian u32 from guest memory.
    pub fn dma_read_u32(&self, gpa: u64) -> Result<u32, DmaError> {
        let mut b = [0u8; 4];
        self.dma_read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Sets the INTx line level.
    pub fn set_intx(&self, asserted: bool) {
        self.inner.set_irq_level(0, asserted);
    }

    /// Resolves a path from the device's settings: relative paths are
    /// relative to the config file's directory.
    pub fn resolve_path(&self, path: &str) -> std::path::PathBuf {
        let p = std::path::PathBuf::from(path);
        if p.is_absolute() {
            p
        } else {
            std::path::PathBuf::from(self.inner.base_dir().into_string()).join(p)
        }
    }

    /// Logs into the host's log.
    pub fn log(&self, level: LogLevel, message: &str) {
        self.inner.log(level, RStr::from_str(message));
    }

    pub fn error(&self, message: &str) {
        self.log(LogLevel::Error, message);
    }
    pub fn warn(&self, message: &str) {
        self.log(LogLevel::Warn, message);
    }
    pub fn info(&self, message: &str) {
        self.log(LogLevel::Info, message);
    }
    pub fn debug(&self, message: &str) {
        self.log(LogLevel::Debug, message);
    }
}
