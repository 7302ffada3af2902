//! Test fixture: every way a plugin can misbehave short of memory unsafety.
//!
//! - `fails`: the constructor returns an error.
//! - `panics`: the constructor panics.
//! - `panics-on-read`: a working device whose BAR reads panic.
//! - `panics-on-magic`: a working device (offset 0: an ID, 0xfa17_0001;
//!   offset 4: a scratch register) whose plugin panics when 0xdead is
//!   written at offset 8: one bad request, as a guest could send a buggy
//!   plugin.
//! - `escapes`: a device whose BAR reads try what a subverted device would
//!   (offset 0: run a program, 4: connect to 127.0.0.1 at the TCP port
//!   its `tcp-port` setting names, 12: read the
//!   file its `secret` setting names, 16: connect to the abstract UNIX
//!   socket its `abstract-socket` setting names), and a UNIX socketpair
//!   as a control (8): each read returns 1 if the attempt worked, 2 if
//!   refused.
#![allow(clippy::panic)]

use plugin_api::{BarDesc, Device, DeviceDesc, Host, PciIdentity};

/// 1234:`device_id`, class 0xff, one 256-byte memory BAR; INTA when
/// `interrupt_pin` is 1.
fn one_bar_device(device_id: u16, interrupt_pin: u8) -> DeviceDesc {
    let identity = PciIdentity {
        interrupt_pin,
        subsystem_vendor_id: 0,
        subsystem_id: 0,
        ..PciIdentity::new(0x1234, device_id, 0xff0000)
    };
    DeviceDesc::new(identity).with_bar(BarDesc::mmio32(0, 0x100))
}

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
        one_bar_device(0xdead, 1)
    }

    fn bar_read(&mut self, _bar: u8, offset: u64, _data: &mut [u8]) {
        panic!("read at {offset:#x} went wrong");
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {
        self.writes += 1;
    }

    fn reset(&mut self) {}
}

fn panics_on_magic(_settings: &str, _host: Host) -> Result<Box<dyn Device>, String> {
    Ok(Box::new(PanicsOnMagic { scratch: 0 }))
}

/// `panics-on-magic`'s ID register.
pub const MAGIC_ID: u32 = 0xfa17_0001;

struct PanicsOnMagic {
    scratch: u32,
}

impl Device for PanicsOnMagic {
    fn describe(&self) -> DeviceDesc {
        one_bar_device(0xfa17, 0)
    }

    fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
        let v = match offset {
            0 => MAGIC_ID,
            4 => self.scratch,
            _ => 0,
        };
        let b = v.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }

    fn bar_write(&mut self, _bar: u8, offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match offset {
            4 => self.scratch = v,
            8 if v == 0xdead => panic!("magic write: the plugin's bug"),
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.scratch = 0;
    }

    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        Ok(self.scratch.to_le_bytes().to_vec())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        let b: [u8; 4] = state
            .try_into()
            .map_err(|_| format!("state is {} bytes, expected 4", state.len()))?;
        self.scratch = u32::from_le_bytes(b);
        Ok(())
    }
}

fn escapes(settings: &str, _host: Host) -> Result<Box<dyn Device>, String> {
    Ok(Box::new(Escapes(plugin_api::settings(settings)?)))
}

#[derive(plugin_api::Deserialize, Default)]
#[serde(
    crate = "plugin_api::serde",
    deny_unknown_fields,
    rename_all = "kebab-case"
)]
struct EscapeTargets {
    #[serde(default)]
    tcp_port: u16,
    #[serde(default)]
    secret: String,
    #[serde(default)]
    abstract_socket: String,
}

struct Escapes(EscapeTargets);

impl Escapes {
    /// 1: it worked; 2: it was refused.
    fn attempt(&self, offset: u64) -> u32 {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixStream};
        let worked = match offset {
            0 => std::process::Command::new("/bin/true").status().is_ok(),
            4 => std::net::TcpStream::connect(("127.0.0.1", self.0.tcp_port)).is_ok(),
            12 => std::fs::read(&self.0.secret).is_ok(),
            16 => SocketAddr::from_abstract_name(&self.0.abstract_socket)
                .and_then(|a| UnixStream::connect_addr(&a))
                .is_ok(),
            _ => UnixStream::pair().is_ok(),
        };
        if worked {
            1
        } else {
            2
        }
    }
}

impl Device for Escapes {
    fn describe(&self) -> DeviceDesc {
        one_bar_device(0xbad0, 0)
    }

    fn bar_read(&mut self, _bar: u8, offset: u64, data: &mut [u8]) {
        let v = self.attempt(offset).to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&v[..n]);
    }

    fn bar_write(&mut self, _bar: u8, _offset: u64, _data: &[u8]) {}

    fn reset(&mut self) {}
}

plugin_api::export_plugin! {
    name: "faulty-plugin",
    devices: {
        "fails" => fails,
        "panics" => panics,
        "panics-on-read" => panics_on_read,
        "panics-on-magic" => panics_on_magic,
        "escapes" => escapes,
    },
}
