//! Test fixture: what a plugin built against a future plugin-api 99.0.0
//! exports. Its root module has plugin-api's module name but another
//! version (and another layout), so a host must refuse it with a message
//! naming both versions instead of calling into it.
//!
//! The examples of this crate are the other refusals, each a cdylib:
//! `abi_older` (plugin-api 0.0.1), `abi_newer` (0.999.0) and `abi_layout`
//! (the host's own version with another layout).
#![allow(non_local_definitions)]

include!("foreign.rs");
foreign_plugin!("99.0.0");
