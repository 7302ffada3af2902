//! Test fixture: a root module claiming plugin-api 0.999.0 (an ABI this
//! host refuses by its version alone).
#![allow(non_local_definitions)]

include!("../src/foreign.rs");
foreign_plugin!("0.999.0");
