//! The types that cross the plugin boundary. Everything here is
//! `#[repr(C)]`/`StableAbi`; abi_stable checks the layout of all of it when a
//! plugin is loaded, so a plugin built against another layout is refused
//! instead of misbehaving.
//!
//! Changing anything in this file changes the ABI: bump plugin-api's version.
//! New trait methods and module fields go after the `last_prefix_field`
//! markers, which keeps *newer* plugins loadable in older hosts; but
//! abi_stable refuses a plugin with fewer methods than the host's, so any
//! addition makes every older plugin a rebuild. Prefer a control
//! operation the host sends (`control::POSTED_WRITES`): docs/plugins.md,
//! "Versions and the ABI".

use abi_stable::{
    declare_root_module_statics,
    library::RootModule,
    package_version_strings, sabi_trait,
    sabi_types::VersionStrings,
    std_types::{RArc, RBox, RErr, ROption, RResult, RSlice, RSliceMut, RStr, RString, RVec},
    StableAbi,
};

/// PCI identity of a function.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct PciIdentity {
    /// Vendor ID (config offset 0x00).
    pub vendor_id: u16,
    /// Device ID (config offset 0x02).
    pub device_id: u16,
    /// `class << 16 | subclass << 8 | prog_if`.
    pub class_code: u32,
    /// Revision ID (config offset 0x08).
    pub revision: u8,
    /// Subsystem vendor ID (config offset 0x2c).
    pub subsystem_vendor_id: u16,
    /// Subsystem ID (config offset 0x2e).
    pub subsystem_id: u16,
    /// 0 = none, 1..=4 = INTA#..INTD#.
    pub interrupt_pin: u8,
}

/// What a BAR decodes.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports (at most 256 bytes). Firmware places it in port space;
    /// the device sees BAR-relative offsets, as for memory.
    Io,
    /// 32-bit memory (MMIO).
    Memory32,
    /// Uses this BAR index and the next.
    Memory64,
}

/// One BAR of a function.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarDesc {
    /// 0..=5.
    pub index: u8,
    /// What it decodes.
    pub kind: BarKind,
    /// Power of two.
    pub size: u64,
    /// Prefetchable memory (reads have no side effects).
    pub prefetchable: bool,
}

/// A capability in the function's configuration space.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct CapabilityDesc {
    /// Capability ID (e.g. 0x01 power management).
    pub id: u8,
    /// Bytes after the two-byte header (ID, next pointer).
    pub body: RVec<u8>,
    /// Guest-writable bits of `body` (empty: read-only).
    pub writable: RVec<u8>,
}

/// A register whose reads the host may answer from a mirror the device
/// keeps current, without calling the device (see
/// [`crate::Device::mirrored_reads`]). Added in plugin-api 0.1.2.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MirroredRead {
    /// The BAR.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Access width the mirror answers: 1, 2 or 4 bytes (a read of another
    /// width or offset still reaches the device).
    pub len: u8,
}

impl MirroredRead {
    /// The `len`-byte register at `offset` in BAR `bar`.
    pub fn new(bar: u8, offset: u64, len: u8) -> Self {
        MirroredRead { bar, offset, len }
    }
}

/// A doorbell: a BAR write that only asks the device to look for work
/// (a virtio queue notify), which a VMM may deliver without a VM exit to
/// itself: KVM signals an eventfd the device's process waits on (see
/// [`crate::Device::doorbells`]). Added in plugin-api 0.1.3.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Doorbell {
    /// The BAR.
    pub bar: u8,
    /// Offset in the BAR.
    pub offset: u64,
    /// Width of the guest's write: 1, 2, 4 or 8 bytes.
    pub len: u8,
    /// The value the guest writes; a write of another value or width
    /// reaches the device as any other access.
    pub value: u64,
}

impl Doorbell {
    /// The guest writing `value` (`len` bytes) at `offset` in BAR `bar`.
    pub fn new(bar: u8, offset: u64, len: u8, value: u64) -> Self {
        Doorbell {
            bar,
            offset,
            len,
            value,
        }
    }
}

/// Everything the host needs to present a function to the guest.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct DeviceDesc {
    /// The IDs and class of the function.
    pub identity: PciIdentity,
    /// Its BARs ([`DeviceDesc::with_bar`] builds the list).
    pub bars: RVec<BarDesc>,
    /// Its capabilities, in list order.
    pub capabilities: RVec<CapabilityDesc>,
    /// MSI-X vectors the device raises ([`DeviceDesc::with_msix`]); 0:
    /// INTx only. The host adds the MSI-X capability and a BAR of its own
    /// for the table and the pending bits, and emulates both: the device
    /// only raises vector numbers ([`crate::Host::msix_notify`]).
    pub msi_vectors: u16,
}

/// Why a device call failed.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceErrorKind {
    /// The device panicked during this call; it is now failed.
    Panicked,
    /// The device panicked earlier and refuses further work.
    Failed,
    /// The request was not valid for this device (bad BAR, bad width...).
    InvalidAccess,
    /// The operation is not supported (e.g. save/restore).
    Unsupported,
    /// Anything else; see the message.
    Other,
}

/// An error returned by a device across the ABI.
#[repr(C)]
#[derive(StableAbi, Clone, Debug, PartialEq, Eq)]
pub struct DeviceError {
    /// The class of failure.
    pub kind: DeviceErrorKind,
    /// What happened, in words.
    pub message: RString,
}

impl DeviceError {
    /// An error of `kind` saying `message`.
    pub fn new(kind: DeviceErrorKind, message: impl Into<String>) -> Self {
        DeviceError {
            kind,
            message: RString::from(message.into()),
        }
    }
}

impl std::fmt::Display for DeviceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

impl std::error::Error for DeviceError {}

/// Log levels a plugin can use.
#[repr(u8)]
#[derive(StableAbi, Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    /// Something failed.
    Error,
    /// Something the user should know (e.g. a guest error).
    Warn,
    /// Normal events (shown by default).
    Info,
    /// Detail for debugging (`RUST_LOG=debug`).
    Debug,
    /// Very verbose detail (`RUST_LOG=trace`).
    Trace,
}

/// A PCI function as the host drives it. Plugin authors do not implement
/// this directly: they implement [`crate::Device`], and
/// [`crate::export_plugin!`] wraps it so that no panic crosses the ABI.
///
/// Threading: calls on one device never overlap (the host serializes
/// them), but may come from different threads over time.
#[sabi_trait]
pub trait FfiDevice: Send {
    /// Identity, BARs and capabilities.
    fn describe(&self) -> DeviceDesc;
    /// Reads device-specific configuration space (offsets the standard
    /// header and declared capabilities do not cover).
    fn config_read(&mut self, offset: u16, data: RSliceMut<'_, u8>) -> RResult<(), DeviceError>;
    /// Called after every guest configuration write, with the bytes written.
    fn config_write(&mut self, offset: u16, data: RSlice<'_, u8>) -> RResult<(), DeviceError>;
    /// A guest read of `data.len()` (1, 2, 4 or 8) bytes at `offset` in BAR `bar`.
    fn bar_read(
        &mut self,
        bar: u8,
        offset: u64,
        data: RSliceMut<'_, u8>,
    ) -> RResult<(), DeviceError>;
    /// A guest write at `offset` in BAR `bar`.
    fn bar_write(&mut self, bar: u8, offset: u64, data: RSlice<'_, u8>)
        -> RResult<(), DeviceError>;
    /// Function-level reset.
    fn reset(&mut self) -> RResult<(), DeviceError>;
    /// Serializes the device state.
    fn save_state(&mut self) -> RResult<RVec<u8>, DeviceError>;
    /// Restores state produced by `save_state`.
    fn restore_state(&mut self, state: RSlice<'_, u8>) -> RResult<(), DeviceError>;
    /// Whether background work (started by a BAR access) is still running.
    fn is_busy(&self) -> bool;
    /// Stops background work and releases resources; no call follows.
    fn shutdown(&mut self);
    /// The failure message once the device has panicked.
    #[sabi(last_prefix_field)]
    fn failure(&self) -> ROption<RString>;
    /// A device-specific control operation (e.g. attach a drive): `op`
    /// with `args` as JSON text; the result is JSON text. Added in
    /// plugin-api 0.1.1, after the last prefix field: a plugin built
    /// before it has no entry in its vtable, and abi_stable then runs
    /// this default body instead, so the host gets an error, not a panic.
    fn control(&mut self, op: RStr<'_>, args: RStr<'_>) -> RResult<RString, DeviceError> {
        let _ = args;
        RErr(DeviceError::new(
            DeviceErrorKind::Unsupported,
            format!("this device has no control operation `{op}` (its plugin predates control operations)"),
        ))
    }
    /// Registers whose reads may be answered from a mirror (plugin-api
    /// 0.1.2, after the last prefix field: older plugins get this default
    /// body, an empty list, and every read reaches them as before).
    fn mirrored_reads(&self) -> RVec<MirroredRead> {
        RVec::new()
    }
    /// Writes a host may deliver as doorbells (plugin-api 0.1.3, after
    /// the last prefix field: older plugins get this default body, an
    /// empty list, and every write reaches them as before).
    fn doorbells(&self) -> RVec<Doorbell> {
        RVec::new()
    }
    /// Whether a state the device saved stays good after the guest rang
    /// its doorbells ([`crate::Device::state_outlives_doorbells`];
    /// plugin-api 0.1.4, after the last prefix field: older plugins get
    /// this default body, `false`).
    fn state_outlives_doorbells(&self) -> bool {
        false
    }
}

/// A device object across the ABI.
pub type DeviceBox = FfiDevice_TO<'static, RBox<()>>;

/// Services the host gives a device. Callable from any thread, any time,
/// including the device's own worker threads.
#[sabi_trait]
pub trait FfiHost: Send + Sync + Clone {
    /// Reads guest memory at guest-physical `gpa`. Fails (never faults)
    /// when the range is not in memory the VMM shared.
    fn dma_read(&self, gpa: u64, data: RSliceMut<'_, u8>) -> RResult<(), RString>;
    /// Writes guest memory at `gpa`; same rules as `dma_read`.
    fn dma_write(&self, gpa: u64, data: RSlice<'_, u8>) -> RResult<(), RString>;
    /// Sets the level of interrupt `irq`: 0 is the function's INTx pin.
    /// (Indices from 1 are reserved for MSI vectors.)
    fn set_irq_level(&self, irq: u32, asserted: bool);
    /// The directory that relative paths in the device's settings are
    /// relative to (the config file's directory).
    fn base_dir(&self) -> RString;
    /// Writes a log record into the host's log.
    #[sabi(last_prefix_field)]
    fn log(&self, level: LogLevel, message: RStr<'_>);
    /// The device changed, outside a BAR access, state that a register it
    /// declared in `mirrored_reads` shows (plugin-api 0.1.2, after the last
    /// prefix field: a host that predates it runs this default body, which
    /// does nothing, and such a host keeps no mirrors).
    fn registers_changed(&self) {}
}

/// Host services across the ABI.
pub type HostBox = FfiHost_TO<'static, RArc<()>>;

/// The root module a plugin library exports.
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModuleRef)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The plugin's name, e.g. "lsi53c895a".
    pub name: extern "C" fn() -> RStr<'static>,
    /// The plugin's own version (its crate version).
    pub version: extern "C" fn() -> RStr<'static>,
    /// Device kinds this plugin can create.
    pub device_kinds: extern "C" fn() -> RVec<RStr<'static>>,
    /// Creates a device of `kind` from its TOML settings.
    #[sabi(last_prefix_field)]
    pub create_device: extern "C" fn(
        kind: RStr<'_>,
        settings: RStr<'_>,
        host: HostBox,
    ) -> RResult<DeviceBox, RString>,
}

impl RootModule for PluginModuleRef {
    declare_root_module_statics! {PluginModuleRef}
    const BASE_NAME: &'static str = "device_plugin";
    const NAME: &'static str = "device_plugin";
    /// plugin-api's own version: the ABI version.
    const VERSION_STRINGS: VersionStrings = package_version_strings!();
}

/// The ABI version this build of plugin-api speaks.
pub const ABI_VERSION: &str = env!("CARGO_PKG_VERSION");
