//! The plugin-side view of the services its host provides.

use abi_stable::std_types::{RResult, RSlice, RSliceMut, RStr};

use crate::abi::{HostBox, LogLevel};

/// Handle to the host's services: guest memory (DMA), the interrupt line
/// and logging. Cheap to clone; `Send + Sync`, so a device's worker threads
/// may keep their own copy. Every method may be called from any thread at
/// any time, including during a BAR access.
///
/// Where a device's log goes: [`Host::log`] writes into the log of the
/// process hosting the device, tagged with the device's `id` from the
/// config: `remote-host`'s log (standard error, which a remote spawned by
/// the VMM shares with it, or the file given by the remote's `log` key or
/// `serve --log`; level from `RUST_LOG`, default `info`), or the VMM's
/// standard error for an `in-process` device (level from `HOST_LOG`,
/// default `warn`). The harness sends it nowhere unless the test installs
/// a `tracing` subscriber. A plugin's own `eprintln!` goes to the process's standard
/// error, which is the remote's log only when that is standard error.
#[derive(Clone)]
pub struct Host {
    inner: HostBox,
}

/// `set_irq_level`'s interrupt numbers: 0 is INTx, `MSIX_IRQ_BASE + n`
/// is MSI-X vector `n` (an edge: only `true` counts). Hosts that predate
/// MSI-X ignore numbers other than 0.
pub const MSIX_IRQ_BASE: u32 = 1;

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
    /// Wraps the ABI object (what [`crate::export_plugin!`] does with the
    /// object a host passes to the constructor).
    pub fn new(inner: HostBox) -> Self {
        Host { inner }
    }

    /// The ABI object, for handing on.
    pub fn as_ffi(&self) -> &HostBox {
        &self.inner
    }

    /// Reads guest-physical memory at `gpa` into `data` (the guest's RAM as
    /// the VMM shared it; a range outside it is an error, never a fault).
    pub fn dma_read(&self, gpa: u64, data: &mut [u8]) -> Result<(), DmaError> {
        dma(self.inner.dma_read(gpa, RSliceMut::from_mut_slice(data)))
    }

    /// Writes `data` into guest-physical memory at `gpa` (same rule as
    /// [`dma_read`](Self::dma_read)).
    pub fn dma_write(&self, gpa: u64, data: &[u8]) -> Result<(), DmaError> {
        dma(self.inner.dma_write(gpa, RSlice::from_slice(data)))
    }

    /// Reads a little-endian u32 from guest memory.
    pub fn dma_read_u32(&self, gpa: u64) -> Result<u32, DmaError> {
        let mut b = [0u8; 4];
        self.dma_read(gpa, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    /// Sets the level of the function's INTx line (the pin declared in
    /// [`PciIdentity::interrupt_pin`](crate::PciIdentity::interrupt_pin)).
    ///
    /// It is a **level**, not a pulse: `true` keeps the line asserted until
    /// the device calls `set_intx(false)`, which it does when the guest has
    /// acknowledged the cause in the device's registers. A line still high
    /// when the guest's interrupt controller sees the end of interrupt is
    /// delivered again (KVM's resample; the harness's
    /// [`IrqLine::eoi`](crate::harness::IrqLine::eoi) models it). Repeating
    /// the same level is harmless. Any thread may call it.
    pub fn set_intx(&self, asserted: bool) {
        self.inner.set_irq_level(0, asserted);
    }

    /// Raises MSI-X vector `vector` (declared with
    /// [`DeviceDesc::with_msix`](crate::DeviceDesc::with_msix)): one
    /// message, an edge. The host sends it if the guest enabled MSI-X and
    /// left the vector unmasked, or keeps it pending until it unmasks it;
    /// with MSI-X disabled it is dropped (the device then uses INTx). A
    /// vector the device did not declare is ignored. Any thread may call
    /// it; in a remote the signal goes to the VMM's interrupt routing
    /// without a round trip.
    pub fn msix_notify(&self, vector: u16) {
        self.inner
            .set_irq_level(MSIX_IRQ_BASE + u32::from(vector), true);
    }

    /// Raises MSI vector `vector` (declared with
    /// [`DeviceDesc::with_msi`](crate::DeviceDesc::with_msi)): one message,
    /// an edge. The host sends it if the guest enabled MSI, granted the
    /// vector and left it unmasked, or keeps it pending until it unmasks
    /// it; with MSI disabled it is dropped (the device's INTx serves
    /// then). The same call as [`msix_notify`](Self::msix_notify): a
    /// function's vectors are numbered alike whichever capability the
    /// guest enabled.
    pub fn msi_notify(&self, vector: u16) {
        self.msix_notify(vector);
    }

    /// Tells the host that the device changed, from a thread of its own
    /// (not inside a call from the host), state that a register declared
    /// in [`Device::mirrored_reads`](crate::Device::mirrored_reads) shows:
    /// the host stops answering from its mirrors until it has read them
    /// again. Call it after the change and before any interrupt that
    /// announces it ([`set_intx`](Self::set_intx) itself also counts as
    /// a notice). Cheap; harmless when nothing is mirrored, and a no-op
    /// on a host that predates mirrors.
    pub fn registers_changed(&self) {
        self.inner.registers_changed();
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

    /// Logs `message` at `level` into the host's log (see the type's docs
    /// for where that is).
    pub fn log(&self, level: LogLevel, message: &str) {
        self.inner.log(level, RStr::from_str(message));
    }

    /// Logs at [`LogLevel::Error`].
    pub fn error(&self, message: &str) {
        self.log(LogLevel::Error, message);
    }
    /// Logs at [`LogLevel::Warn`].
    pub fn warn(&self, message: &str) {
        self.log(LogLevel::Warn, message);
    }
    /// Logs at [`LogLevel::Info`].
    pub fn info(&self, message: &str) {
        self.log(LogLevel::Info, message);
    }
    /// Logs at [`LogLevel::Debug`].
    pub fn debug(&self, message: &str) {
        self.log(LogLevel::Debug, message);
    }
}
