//! Test fixture: what a plugin built against a future plugin-api 99.0.0
//! exports. Its root module has plugin-api's module name but another
//! version (and another layout), so a host must refuse it with a message
//! naming both versions instead of calling into it.
#![allow(non_local_definitions)]

use abi_stable::{
    declare_root_module_statics, export_root_module, library::RootModule,
    prefix_type::PrefixTypeTrait, sabi_extern_fn, sabi_types::VersionStrings, std_types::RStr,
    StableAbi,
};

#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = FuturePluginRef)))]
#[sabi(missing_field(panic))]
pub struct FuturePlugin {
    #[sabi(last_prefix_field)]
    pub name: extern "C" fn() -> RStr<'static>,
}

impl RootModule for FuturePluginRef {
    declare_root_module_statics! {FuturePluginRef}
    const BASE_NAME: &'static str = "device_plugin";
    const NAME: &'static str = "device_plugin";
    const VERSION_STRINGS: VersionStrings = VersionStrings::new("99.0.0");
}

#[sabi_extern_fn]
fn name() -> RStr<'static> {
    RStr::from_str("from-the-future")
}

#[export_root_module]
fn root() -> FuturePluginRef {
    FuturePlugin { name }.leak_into_prefix()
}
