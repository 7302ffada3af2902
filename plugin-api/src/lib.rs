//! # plugin-api: write a PCI device as a plugin
//!
//! A device plugin is a shared library (`cdylib`) that exports one root
//! module ([`PluginModule`]): its name, its version, the device kinds it
//! provides and a constructor. Hosts (`remote-host`, the VMM when a device
//! runs in-process, and the test harness) load it with [`loader`]. The ABI
//! is built on `abi_stable`, which checks the plugin's version and the
//! layout of every type in [`abi`] at load time; a plugin author never
//! names abi_stable: this crate is the only dependency a plugin needs.
//!
//! **plugin-api's crate version is the ABI version.** A plugin built against
//! an incompatible plugin-api is refused with a message naming both
//! versions (the rule is [`loader::abi_compatible`]).
//!
//! ## Writing a plugin
//!
//! `Cargo.toml`:
//!
//! ```toml
//! [package]
//! name = "my-device"          # the plugin's name; its library is libmy_device.so
//!
//! [lib]
//! crate-type = ["cdylib", "rlib"]   # the .so hosts load; the rlib for tests
//!
//! [dependencies]
//! plugin-api = "0.1"          # or { path = ".../plugin-api" }
//! ```
//!
//! `src/lib.rs`: implement [`Device`] on a plain struct, take the settings
//! as a type of your own, and export the constructor:
//!
//! ```
//! use plugin_api::{BarDesc, Device, DeviceDesc, Host, PciIdentity};
//!
//! /// The device's `[[device]]` table in the VM config (less `id`,
//! /// `plugin`, `kind`, `slot`, `remote`, `in-process`).
//! #[derive(plugin_api::Deserialize)]
//! #[serde(crate = "plugin_api::serde", deny_unknown_fields, rename_all = "kebab-case")]
//! pub struct Settings {
//!     #[serde(default)]
//!     initial: u32,
//! }
//!
//! pub struct MyDevice {
//!     host: Host,
//!     reg: u32,
//! }
//!
//! impl MyDevice {
//!     pub fn create(settings: Settings, host: Host) -> Result<Box<dyn Device>, String> {
//!         Ok(Box::new(MyDevice { host, reg: settings.initial }))
//!     }
//! }
//!
//! impl Device for MyDevice {
//!     fn describe(&self) -> DeviceDesc {
//!         DeviceDesc::new(PciIdentity::new(0x1234, 0x5678, 0xff0000).with_intx())
//!             .with_bar(BarDesc::mmio32(0, 0x1000))
//!     }
//!     fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
//!         let v = if offset == 0 { self.reg } else { 0 };
//!         let n = data.len().min(4);
//!         data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
//!     }
//!     fn bar_write(&mut self, _bar: u8, offset: u64, data: &[u8]) {
//!         if let (0, Ok(b)) = (offset, <[u8; 4]>::try_from(data)) {
//!             self.reg = u32::from_le_bytes(b);
//!             self.host.set_intx(self.reg != 0); // a level, not a pulse
//!         }
//!     }
//!     fn reset(&mut self) {
//!         self.reg = 0;
//!         self.host.set_intx(false);
//!     }
//! }
//!
//! plugin_api::export_plugin! {
//!     name: "my-device",
//!     devices: { "my-device" => MyDevice::create },
//! }
//! ```
//!
//! A constructor takes its settings either deserialized (any
//! `S: DeserializeOwned`, as above; errors name the key, see [`settings()`])
//! or as the TOML text (`fn(&str, Host)`). Test it with [`harness`] and
//! [`plugin_tests!`], linked and from its `.so`. `docs/plugins.md` in this
//! repository walks through writing, building, testing, loading, running
//! in a guest and debugging a plugin; `remote-host new-plugin NAME` writes
//! a crate to start from.
//!
//! ## Naming
//!
//! A host finds plugin `NAME` as `libNAME.so` with every `-` written `_`
//! (Cargo's rule for the library of crate `NAME`): the crate's name and the
//! `name:` given to [`export_plugin!`] must agree, or `remote-host` finds
//! the file but not the plugin by name.
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
//!
//! ## Features
//!
//! - `harness` (default): the test bench ([`harness`], [`plugin_tests!`]);
//!   implies `host`.
//! - `host`: the [`loader`] and the [`function`] glue that hosts use.
//!
//! Both are on by default so that a plugin author has the harness by
//! depending on plugin-api alone; what a plugin's `.so` calls of them is
//! only the harness in its tests.

#![warn(missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![allow(non_local_definitions)] // #[sabi_trait] expansions trigger it on rustc 1.95
#![deny(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

pub mod abi;
pub mod control;
mod desc;
mod device;
mod host;
mod settings;

#[cfg(feature = "host")]
#[cfg_attr(docsrs, doc(cfg(feature = "host")))]
pub mod dirty;
#[cfg(feature = "host")]
#[cfg_attr(docsrs, doc(cfg(feature = "host")))]
pub mod function;
#[cfg(feature = "harness")]
#[cfg_attr(docsrs, doc(cfg(feature = "harness")))]
pub mod harness;
#[cfg(feature = "host")]
#[cfg_attr(docsrs, doc(cfg(feature = "host")))]
pub mod loader;

pub use abi::{
    BarDesc, BarKind, CapabilityDesc, DeviceBox, DeviceDesc, DeviceError, DeviceErrorKind,
    Doorbell, HostBox, LogLevel, MirroredRead, PciIdentity, PluginModule, PluginModuleRef,
    ABI_VERSION,
};
pub use device::{create_guarded, into_ffi, panic_message, Device, DeviceConstructor};
pub use host::{DmaError, Host, MSIX_IRQ_BASE};
/// The PCI models the host uses (configuration space, MSI, MSI-X), for
/// plugin tests that check registers by their specification offsets.
pub use pci;
pub use settings::settings;

/// serde, for `#[serde(crate = "plugin_api::serde")]` on a plugin's
/// settings and control types (a plugin needs no serde dependency).
pub use serde;
/// The `Deserialize` trait and derive (settings, control arguments). The
/// derive needs `#[serde(crate = "plugin_api::serde")]` unless the plugin
/// depends on serde itself.
pub use serde::Deserialize;
/// The `Serialize` trait and derive (control replies); same note as
/// [`Deserialize`].
pub use serde::Serialize;
/// serde_json, whose `Value` is [`Device::control`]'s argument and result
/// (also re-exported as [`control::Value`]).
pub use serde_json;

/// What [`export_plugin!`] expands to refers to; not for plugin authors.
#[doc(hidden)]
pub mod __private {
    pub use crate::device::{Constructor, TextConstructor, TypedConstructor};
    pub use abi_stable::library::{
        __call_root_module_loader, CheckTypeLayout, LibHeader, RootModuleResult,
    };
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

/// Exports a plugin: its root module (the symbol hosts look for in the
/// `.so`) and a `pub fn plugin_module() -> PluginModuleRef` that returns
/// the same module for direct (rlib) linking, as the harness's
/// [`PluginSource::Linked`](crate::harness::PluginSource::Linked) and
/// in-process hosts use it.
///
/// ```ignore
/// plugin_api::export_plugin! {
///     name: "dma-example",
///     devices: {
///         "dma-example" => DmaExample::create,
///         // "another-kind" => Other::create,
///     },
/// }
/// ```
///
/// - `name`: the plugin's name; its library must be `lib<name, - as _>.so`,
///   so the crate has the same name.
/// - `devices`: each device kind with its constructor, a function path of
///   either signature:
///   - `fn(S, Host) -> Result<Box<dyn Device>, String>` where
///     `S: serde::de::DeserializeOwned`: the settings arrive deserialized
///     (by [`settings()`](crate::settings()); a bad key is refused with
///     its name before the constructor runs);
///   - `fn(&str, Host) -> Result<Box<dyn Device>, String>`: the settings'
///     TOML text.
///
///   A constructor of neither shape is refused with "no method named
///   `construct`".
///
/// The plugin's version (reported by `remote-host plugins`) is its crate
/// version. Use the macro once per crate, at its root.
#[macro_export]
macro_rules! export_plugin {
    (name: $name:expr, devices: { $($kind:literal => $ctor:expr),+ $(,)? } $(,)?) => {
        const __PLUGIN_DEVICE_KINDS: &[(&str, $crate::DeviceConstructor)] = &[$((
            $kind,
            |settings: &str, host: $crate::Host| {
                #[allow(unused_imports)]
                use $crate::__private::{TextConstructor as _, TypedConstructor as _};
                (&$crate::__private::Constructor($ctor)).construct(settings, host)
            },
        )),+];

        /// This plugin's root module, for linking the plugin directly (as an
        /// rlib) instead of loading its shared library.
        pub fn plugin_module() -> $crate::PluginModuleRef {
            use $crate::__private::PrefixTypeTrait;
            // Made once: `leak_into_prefix` leaks a new module at every
            // call (a bench per fuzz input leaked one per input).
            static MODULE: ::std::sync::OnceLock<$crate::PluginModuleRef> =
                ::std::sync::OnceLock::new();
            *MODULE.get_or_init(|| {
                $crate::PluginModule {
                    name: __plugin_name,
                    version: __plugin_version,
                    device_kinds: __plugin_device_kinds,
                    create_device: __plugin_create_device,
                }
                .leak_into_prefix()
            })
        }

        /// The root module as abi_stable's loader finds it: what
        /// `#[abi_stable::export_root_module]` expands to, written out so
        /// that the plugin needs no abi_stable of its own. The name is
        /// `abi_stable::library::ROOT_MODULE_LOADER_NAME` (a test in
        /// plugin-api checks the literal).
        // SAFETY: the symbol is exported under abi_stable's reserved name,
        // which nothing else in a plugin defines; hosts read it as a
        // `LibHeader`, which is its type.
        #[unsafe(export_name = "_1as_0lib_1header_0root_bmodule_bloader")]
        static __PLUGIN_LIB_HEADER: $crate::__private::LibHeader = {
            extern "C" fn __plugin_erased_root_module() -> $crate::__private::RootModuleResult {
                $crate::__private::__call_root_module_loader(__plugin_root_module)
            }
            // SAFETY: `from_constructor::<M>` requires the constructor to
            // return a prefix reference made from an `M`.
            // `__call_root_module_loader` makes it from the
            // `PluginModuleRef` that `__plugin_root_module` returns, and `M`
            // is `PluginModuleRef`: exactly what abi_stable's own attribute
            // generates for a function returning that type.
            unsafe {
                $crate::__private::LibHeader::from_constructor::<$crate::PluginModuleRef>(
                    __plugin_erased_root_module,
                    $crate::__private::CheckTypeLayout::Yes,
                )
            }
        };

        fn __plugin_root_module() -> $crate::PluginModuleRef {
            // Only when loaded as a library: linked as an rlib, the hook
            // would be the host's own.
            $crate::__private::install_quiet_panic_hook($name);
            plugin_module()
        }

        // Plain `extern "C"` functions: none of them can panic except
        // through author code, and `create_guarded` catches that (a panic
        // reaching an `extern "C"` boundary would abort the process).
        extern "C" fn __plugin_name() -> $crate::__private::RStr<'static> {
            $crate::__private::RStr::from_str($name)
        }

        extern "C" fn __plugin_version() -> $crate::__private::RStr<'static> {
            $crate::__private::RStr::from_str(env!("CARGO_PKG_VERSION"))
        }

        extern "C" fn __plugin_device_kinds(
        ) -> $crate::__private::RVec<$crate::__private::RStr<'static>> {
            __PLUGIN_DEVICE_KINDS
                .iter()
                .map(|(k, _)| $crate::__private::RStr::from_str(k))
                .collect()
        }

        extern "C" fn __plugin_create_device(
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

#[cfg(test)]
mod tests {
    #[test]
    fn export_plugin_names_the_root_module_as_abi_stable_does() {
        // The literal in `export_plugin!`'s `export_name`.
        let in_macro = include_str!("lib.rs")
            .lines()
            .find_map(|l| l.trim().strip_prefix("#[unsafe(export_name = \""))
            .and_then(|l| l.strip_suffix("\")]"));
        assert_eq!(
            in_macro,
            Some(abi_stable::library::ROOT_MODULE_LOADER_NAME),
            "export_plugin!'s export_name must be abi_stable's root module loader name"
        );
    }
}
