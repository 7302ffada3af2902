//! Test fixture: a root module claiming the host's own plugin-api version
//! whose types have another layout (refused by abi_stable's layout check,
//! with both versions named).
#![allow(non_local_definitions)]

include!("../src/foreign.rs");
foreign_plugin!(plugin_api::ABI_VERSION);
