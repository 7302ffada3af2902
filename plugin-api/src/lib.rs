//! # plugin-api: the stable ABI between device plugins and their hosts
//!
//! A device plugin is a shared library (`cdylib`) that exports one root
//! module ([`PluginModule`]): its name, its version, the device kinds it
//! provides and a constructor. Hosts (`remote-host`, the VMM when a device
//! runs in-process, and the test harness) load it with [`loader`] (feature
//! `host`). The ABI is built on `abi_stable`, which checks the plugin's
//! version and the layout of every type in [`abi`] at load time.
//!
//! **plugin-api's crate version is the ABI version.** A plugin built against
//! an incompatible plugin-api is refused with a message naming both
//! versions.
//!
//! ## Writing a plugin
//!
//! Implement [`Device`] on a plain struct and export it:
//!
//! ```ignore
//! plugin_api::export_plugin! {
//!     name: "my-device",
//!     devices: { "my-device" => MyDevice::create },
//! }
//! ```
//!
//! `MyDevice::create(settings: &str, host: Host) -> Result<Box<dyn Device>, String>`
//! parses the device's own TOML table (the keys of its `[[device]]` entry
//! other than id/plugin/kind/slot/remote/in-process). The plugin crate must
//! depend on `abi_stable` (same 0.11.x as plugin-api) and be built with
//! `crate-type = ["cdylib", "rlib"]`; see `devices/dma-example` for the
//! template.
//!
//! ## Threading rules
//!
//! - The host calls a device's [`Device`] methods one at a time (never
//!   concurrently), possibly from different threads over the device's life
//!   (a vCPU thread in-process, the channel thread in `remote-host`).
//! - Config and BAR accesses must return promptly: a vCPU waits for every
//!   read. Anything slow (block I/O, long DMA) runs on a thread the device
//!   starts itself; the device may start as many as it needs and must join
//!   them in [`Device::shutdown`].
//! - [`Host`] (DMA, interrupt level, logging) may be called from any
//!   thread at any time, including while a BAR access is in progress.
//! - A DMA outside the guest memory the VMM shared returns an error; it is
//!   never undefined behaviour.
//! - Only [`Device::is_busy`] and the host services are meant for polling.
//!
//! ## Panics
//!
//! abi_stable exits the process when a panic reaches the ABI boundary. The
//! wrapper made by [`export_plugin!`] catches every panic in author code,
//! reports it as a [`DeviceError`] of kind `Panicked`, and marks the device
//! failed; later calls return `Failed`. A panicking constructor is reported
//! as an ordinary constructor error.

#![allow(non_local_definitions)] // #[sabi_trait] expansions trigger it on rustc 1.95
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod abi;
mod device;
mod host;

#[cfg(feature = "host")]
pub mod function;
#[cfg(feature = "harness")]
pub mod harness;
#[cfg(feature = "host")]
pub mod loader;

pub use abi::{
    BarDesc, BarKind, CapabilityDesc, DeviceBox, DeviceDesc, DeviceError, DeviceErrorKind, HostBox,
    LogLevel, PciIdentity, PluginModule, PluginModuleRef, ABI_VERSION,
};
pub use device::{create_guarded, into_ffi, panic_message, Device, DeviceConstructor};
pub use host::{DmaError, Host};

#[doc(hidden)]
pub mod __private {
    pub use abi_stable::prefix_type::PrefixTypeTrait;
    pub use abi_stable::std_types::{RResult, RStr, RString, RVec};

    /// Makes a panic inside a loaded plugin print one line instead of the
    /// default report. A plugin library links its own copy of `std`, so
    /// this sets the hook of that copy only (the host's stays as it is).
    /// Why: the panic guard already turns the panic into a failed device
    /// with its message; a backtrace symbolized by the default hook (when
    /// `RUST_BACKTRACE` is set) can take seconds on a slow machine, while a
    /// vCPU waits for the access that panicked.
    pub fn install_quiet_panic_hook(plugin: &'static str) {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            std::panic::set_hook(Box::new(move |info| {
                let thread = std::thread::current();
                eprintln!(
                    "plugin {plugin}: thread '{}' {}",
                    thread.name().unwrap_or("?"),
                    info.to_string().replace('\n', " ")
                );
            }));
        });
    }
}

/// Exports a plugin's root module and a `plugin_module()` function that
/// returns the same module for direct (rlib) linking.
///
/// ```ignore
/// plugin_api::export_plugin! {
///     name: "dma-example",
///     devices: { "dma-example" => DmaExample::create },
/// }
/// ```
#[macro_export]
macro_rules! export_plugin {
    (name: $name:expr, devices: { $($kind:literal => $ctor:expr),+ $(,)? } $(,)?) => {
        const __PLUGIN_DEVICE_KINDS: &[(&str, $crate::DeviceConstructor)] = &[$(($kind, $ctor)),+];

        /// This plugin's root module, for linking the plugin directly (as an
        /// rlib) instead of loading its shared library.
        pub fn plugin_module() -> $crate::PluginModuleRef {
            use $crate::__private::PrefixTypeTrait;
            $crate::PluginModule {
                name: __plugin_name,
                version: __plugin_version,
                device_kinds: __plugin_device_kinds,
                create_device: __plugin_create_device,
            }
            .leak_into_prefix()
        }

        #[::abi_stable::export_root_module]
        fn __plugin_root_module() -> $crate::PluginModuleRef {
            // Only when loaded as a library: linked as an rlib, the hook
            // would be the host's own.
            $crate::__private::install_quiet_panic_hook($name);
            plugin_module()
        }

        #[::abi_stable::sabi_extern_fn]
        fn __plugin_name() -> $crate::__private::RStr<'static> {
            $crate::__private::RStr::from_str($name)
        }

        #[::abi_stable::sabi_extern_fn]
        fn __plugin_version() -> $crate::__private::RStr<'static> {
            $crate::__private::RStr::from_str(env!("CARGO_PKG_VERSION"))
        }

        #[::abi_stable::sabi_extern_fn]
        fn __plugin_device_kinds() -> $crate::__private::RVec<$crate::__private::RStr<'static>> {
            __PLUGIN_DEVICE_KINDS
                .iter()
                .map(|(k, _)| $crate::__private::RStr::from_str(k))
                .collect()
        }

        #[::abi_stable::sabi_extern_fn]
        fn __plugin_create_device(
            kind: $crate::__private::RStr<'_>,
            settings: $crate::__private::RStr<'_>,
            host: $crate::HostBox,
        ) -> $crate::__private::RResult<$crate::DeviceBox, $crate::__private::RString> {
            $crate::create_guarded(
                __PLUGIN_DEVICE_KINDS,
                kind.as_str(),
                settings.as_str(),
                $crate::Host::new(host),
            )
            .map_err($crate::__private::RString::from)
            .into()
        }
    };
}
