//! Test fixture: a root module claiming plugin-api 0.0.1 (an ABI this
//! host refuses by its version alone).
#![allow(non_local_definitions)]

include!("../src/foreign.rs");
foreign_plugin!("0.0.1");
