// A root module with plugin-api's module name but a version and a layout
// of the caller's choosing: what a plugin built against another plugin-api
// exports. Included (not imported) by the library and by each example, so
// that each is a cdylib of its own exporting one root module.

/// `foreign_plugin!("X.Y.Z")` exports a root module claiming plugin-api
/// X.Y.Z, with a layout that differs from plugin-api's.
macro_rules! foreign_plugin {
    ($version:expr) => {
        use abi_stable::{
            declare_root_module_statics, export_root_module, library::RootModule,
            prefix_type::PrefixTypeTrait, sabi_extern_fn, sabi_types::VersionStrings,
            std_types::RStr, StableAbi,
        };

        #[repr(C)]
        #[derive(StableAbi)]
        #[sabi(kind(Prefix(prefix_ref = ForeignPluginRef)))]
        #[sabi(missing_field(panic))]
        pub struct ForeignPlugin {
            #[sabi(last_prefix_field)]
            pub name: extern "C" fn() -> RStr<'static>,
        }

        impl RootModule for ForeignPluginRef {
            declare_root_module_statics! {ForeignPluginRef}
            const BASE_NAME: &'static str = "device_plugin";
            const NAME: &'static str = "device_plugin";
            const VERSION_STRINGS: VersionStrings = VersionStrings::new($version);
        }

        #[sabi_extern_fn]
        fn name() -> RStr<'static> {
            RStr::from_str("foreign")
        }

        #[export_root_module]
        fn root() -> ForeignPluginRef {
            ForeignPlugin { name }.leak_into_prefix()
        }
    };
}
