//! `pci-serial`: QEMU's `pci-serial` as a plugin. One 16550A UART
//! (rust-vmm's `vm-superio`) behind an 8-byte I/O BAR, with an INTx line;
//! Linux's `8250_pci` drives it as a `ttyS` port.
//!
//! | PCI | value |
//! |-----|-------|
//! | vendor, device | 0x1b36, 0x0002 (Red Hat, QEMU's `pci-serial`) |
//! | class | 0x070002 (serial controller, 16550-compatible) |
//! | subsystem | 0x1af4, 0x1100 (as QEMU's) |
//! | BAR0 | I/O, 8 bytes: the UART's registers |
//! | interrupt | INTA, level: high while a cause is pending and enabled |
//!
//! Settings (the device's table in the VM config, see [`Settings`]):
//! `socket = "PATH"` listens on a UNIX socket: what a client writes is
//! what the guest reads, what the guest writes goes to the client (one
//! client at a time); `output = "PATH"` appends everything the guest
//! writes to a file. Relative paths resolve against the config file's
//! directory. Either, both or neither (output then goes nowhere).
//!
//! Control operation: `stats` replies `{"output-dropped": N}`, the bytes
//! of output dropped because the client did not read them fast enough.
//!
//! The device keeps no thread of its own in the guest's path: a BAR
//! access is a register access on the UART under one lock; the socket
//! and the file are served by two threads of [`stream`].

pub mod stream;
pub mod uart;

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use plugin_api::control::{self, Value};
use plugin_api::{BarDesc, Device, DeviceDesc, Host, PciIdentity};
use vm_superio::serial::NoEvents;
use vm_superio::Serial;

use stream::{OutQueue, Output, Streams};
use uart::{decode_state, encode_state, irq_level, new_uart, LevelFromState, Uart};

pub const VENDOR_ID: u16 = 0x1b36;
pub const DEVICE_ID: u16 = 0x0002;
/// Serial controller, 16550-compatible programming interface.
pub const CLASS: u32 = 0x07_00_02;
/// Bytes of the I/O BAR: the UART's eight registers.
pub const BAR_SIZE: u64 = 8;

/// The device's settings: its `[[device]]` table less the placement keys.
#[derive(plugin_api::Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(
    crate = "plugin_api::serde",
    deny_unknown_fields,
    rename_all = "kebab-case"
)]
pub struct Settings {
    /// A UNIX socket to listen on for the byte stream (both directions).
    pub socket: Option<String>,
    /// A file that receives everything the guest writes (appended).
    pub output: Option<String>,
}

/// `stats`'s reply.
#[derive(plugin_api::Serialize)]
#[serde(crate = "plugin_api::serde", rename_all = "kebab-case")]
struct Stats {
    output_dropped: u64,
}

struct Line {
    uart: Uart<OutQueue>,
    /// The INTx level last given to the host.
    level: bool,
}

/// The UART, shared by the BAR handlers and the input thread.
struct Shared {
    line: Mutex<Line>,
    /// Signalled when the guest reads the receive buffer.
    room: Condvar,
    out: OutQueue,
    host: Host,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gives the host the INTx level the UART's state implies (`force`:
    /// even when it did not change, after a reset or restore).
    fn update_irq(&self, l: &mut Line, force: bool) {
        let level = irq_level(&l.uart.state());
        if level != l.level || force {
            l.level = level;
            self.host.set_intx(level);
        }
    }
}

impl stream::Input for Shared {
    fn push(&self, bytes: &[u8]) -> usize {
        let mut l = self.lock();
        if l.uart.fifo_capacity() == 0 {
            return 0;
        }
        let n = l.uart.enqueue_raw_bytes(bytes).unwrap_or(0);
        self.update_irq(&mut l, false);
        n
    }

    fn wait_room(&self, t: Duration) {
        let l = self.lock();
        if l.uart.fifo_capacity() == 0 {
            let _ = self.room.wait_timeout(l, t);
        }
    }
}

/// The device.
pub struct PciSerial {
    shared: Arc<Shared>,
    streams: Option<Streams>,
}

impl PciSerial {
    /// The constructor `export_plugin!` registers.
    pub fn create(s: Settings, host: Host) -> Result<Box<dyn Device>, String> {
        let output = Arc::new(Output::default());
        let out = OutQueue(output.clone());
        let shared = Arc::new(Shared {
            line: Mutex::new(Line {
                uart: new_uart(out.clone()),
                level: false,
            }),
            room: Condvar::new(),
            out,
            host: host.clone(),
        });
        let log_host = host.clone();
        let streams = stream::start(
            s.socket.as_deref().map(|p| host.resolve_path(p)),
            s.output.as_deref().map(|p| host.resolve_path(p)),
            output,
            shared.clone(),
            move |m| log_host.warn(m),
        )?;
        Ok(Box::new(PciSerial {
            shared,
            streams: Some(streams),
        }))
    }
}

impl Device for PciSerial {
    fn describe(&self) -> DeviceDesc {
        let identity = PciIdentity::new(VENDOR_ID, DEVICE_ID, CLASS)
            .with_revision(1)
            .with_subsystem(0x1af4, 0x1100)
            .with_intx();
        DeviceDesc::new(identity).with_bar(BarDesc::io(0, BAR_SIZE))
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        let mut l = self.shared.lock();
        let mut read_rbr = false;
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            if off < BAR_SIZE {
                *b = l.uart.read(off as u8);
                read_rbr |= off == 0;
            }
        }
        self.shared.update_irq(&mut l, false);
        drop(l);
        if read_rbr {
            self.shared.room.notify_all();
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        let mut l = self.shared.lock();
        for (i, &b) in data.iter().enumerate() {
            let off = offset + i as u64;
            if off < BAR_SIZE {
                // The writer never fails (a full queue drops, and counts).
                let _ = l.uart.write(off as u8, b);
            }
        }
        self.shared.update_irq(&mut l, false);
    }

    fn reset(&mut self) {
        let mut l = self.shared.lock();
        l.uart = new_uart(self.shared.out.clone());
        self.shared.update_irq(&mut l, true);
    }

    /// The UART's registers and receive FIFO (at most 75 bytes).
    fn save_state(&mut self) -> Result<Vec<u8>, String> {
        Ok(encode_state(&self.shared.lock().uart.state()))
    }

    /// A blob that is not a state of this plugin's version is refused and
    /// the UART stays as it was.
    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        let s = decode_state(state)?;
        let uart = Serial::from_state(&s, LevelFromState, NoEvents, self.shared.out.clone())
            .map_err(|e| format!("state refused by the UART: {e:?}"))?;
        let mut l = self.shared.lock();
        l.uart = uart;
        self.shared.update_irq(&mut l, true);
        Ok(())
    }

    fn control(&mut self, op: &str, args: &Value) -> Result<Value, String> {
        match op {
            "stats" => control::call(op, args, |_: Value| {
                Ok::<_, String>(Stats {
                    output_dropped: self.streams.as_ref().map_or(0, Streams::dropped),
                })
            }),
            _ => Err(control::unknown(op)),
        }
    }

    fn shutdown(&mut self) {
        if let Some(mut s) = self.streams.take() {
            s.stop();
        }
    }
}

impl Drop for PciSerial {
    fn drop(&mut self) {
        self.shutdown();
    }
}

plugin_api::export_plugin! {
    name: "pci-serial",
    devices: { "pci-serial" => PciSerial::create },
}
