//! Test fixture: every way a plugin can misbehave short of memory unsafety.
//!
//! - `fails`: the constructor returns an error.
//! - `panics`: the constructor panics.
//! - `panics-on-read`: a working device whose BAR reads panic.
#![allow(clippy::panic)]

use abi_stable::std_types::RVec;
use plugin_api::{BarDesc, BarKind, Device, DeviceDesc, Host, PciIdentity};

fn fails(_settings: &str, _host: Host) -> Result<Box<dyn Device>, String> {
    Err("disk on fire".into())
}

fn panics(_settings: &str, _host: Host) -> Result<Box<dyn Device>, String> {
    panic!("constructor exploded");
}

fn panics_on_read(_settings: &str, _host: Host) -> Result<Box<dyn Device>, String> {
    Ok(Box::new(PanicsOnRead { writes: 0 }))
}

struct PanicsOnRead {
    writes: u32,
}

impl Device for PanicsOnRead {
    fn describe(&self) -> DeviceDesc {
        DeviceDesc {
            identity: PciIdentity {
                vendor_id: 0x1234,
                device_id: 0xdead,
                class_code: 0xff0000,
                interrupt_pin: 1,
                ..Default::default()
            },
            bars: RVec::from(vec![BarDesc {
                index: 0,
                kind: BarKind::Memory32,
                size: 0x100,
                prefetchable: false,
            }]),
            capabilities: RVec::new(),
            msi_vectors: 0,
        }
    }

    fn bar_read(&mut self, _bar: u8, offset: u64, _data: &mut [u8]) {
        panic!("read at {offset:#x} went wrong");
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {
        self.writes += 1;
    }

    fn reset(&mut self) {}
}

plugin_api::export_plugin! {
    name: "faulty-plugin",
    devices: {
        "fails" => fails,
        "panics" => panics,
        "panics-on-read" => panics_on_read,
    },
}
