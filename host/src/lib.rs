//! `host`: a KVM VMM that boots Linux from the TOML config and gives the
//! guest PCI functions whose devices run in `remote-host` processes (proxy
//! functions over vfio-user) or in-process from the same plugins.
//! See `docs/host.md`.

pub mod acpi;
pub mod boot;
pub mod bus;
pub mod checkpoint;
pub mod cpu;
pub mod crash;
pub mod exit;
pub mod legacy;
pub mod memory;
pub mod monitor;
pub mod mptable;
pub mod pci;
pub mod remote;
pub mod reset;
pub mod serial;
pub mod snapshot;
pub mod supervisor;
pub mod vm;
