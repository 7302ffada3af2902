//! `plugin-template`: a PCI device plugin.
//!
//! BAR0 is 4 KiB of 32-bit MMIO registers (little-endian):
//!
//! | offset | name         | access | meaning |
//! |-------:|--------------|--------|---------|
//! | 0x00   | `ID`         | RO     | [`ID_VALUE`] |
//! | 0x04   | `SCRATCH`    | RW     | plain storage; `initial-scratch` after reset |
//! | 0x08   | `IRQ_STATUS` | RO     | pending interrupt causes; INTx is high while non-zero |
//! | 0x0c   | `IRQ_RAISE`  | WO     | sets the written bits in `IRQ_STATUS` |
//! | 0x10   | `IRQ_ACK`    | WO     | clears the written bits in `IRQ_STATUS` |
//!
//! Settings (the device's table in the VM config): `initial-scratch`
//! (default 0).
//!
//! Control operation: `set-scratch {"value": N}` → `{"previous": M}`.

use plugin_api::control::{self, Value};
use plugin_api::{BarDesc, Device, DeviceDesc, Host, PciIdentity};

/// PCI vendor ID (0x1234 is QEMU's, fine for experiments; use your own).
pub const VENDOR_ID: u16 = 0x1234;
/// PCI device ID.
pub const DEVICE_ID: u16 = 0x0001;
/// What `ID` reads.
pub const ID_VALUE: u32 = 0x7e57_0001;
/// BAR0's size.
pub const BAR0_SIZE: u64 = 0x1000;

/// `ID` register.
pub const REG_ID: u64 = 0x00;
/// `SCRATCH` register.
pub const REG_SCRATCH: u64 = 0x04;
/// `IRQ_STATUS` register.
pub const REG_IRQ_STATUS: u64 = 0x08;
/// `IRQ_RAISE` register.
pub const REG_IRQ_RAISE: u64 = 0x0c;
/// `IRQ_ACK` register.
pub const REG_IRQ_ACK: u64 = 0x10;

/// The device's settings: its `[[device]]` table, less the keys the VMM
/// uses to place it. Deserialized by plugin-api before the constructor
/// runs; an unknown key is refused with its name.
#[derive(plugin_api::Deserialize, Debug, Clone, Default)]
#[serde(
    crate = "plugin_api::serde",
    deny_unknown_fields,
    rename_all = "kebab-case"
)]
pub struct Settings {
    /// `SCRATCH` after creation and reset.
    #[serde(default)]
    pub initial_scratch: u32,
}

/// `set-scratch`'s arguments.
#[derive(plugin_api::Deserialize)]
#[serde(crate = "plugin_api::serde", deny_unknown_fields)]
struct SetScratch {
    value: u32,
}

/// `set-scratch`'s reply.
#[derive(plugin_api::Serialize)]
#[serde(crate = "plugin_api::serde")]
struct Previous {
    previous: u32,
}

/// The device: a plain struct; the host calls it one method at a time.
pub struct PluginTemplate {
    host: Host,
    settings: Settings,
    scratch: u32,
    irq_status: u32,
}

impl PluginTemplate {
    /// The constructor `export_plugin!` registers.
    pub fn create(settings: Settings, host: Host) -> Result<Box<dyn Device>, String> {
        host.info(&format!("created with {settings:?}"));
        Ok(Box::new(PluginTemplate {
            host,
            scratch: settings.initial_scratch,
            settings,
            irq_status: 0,
        }))
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            REG_ID => ID_VALUE,
            REG_SCRATCH => self.scratch,
            REG_IRQ_STATUS => self.irq_status,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        match offset {
            REG_SCRATCH => self.scratch = value,
            REG_IRQ_RAISE => self.irq_status |= value,
            REG_IRQ_ACK => self.irq_status &= !value,
            _ => {}
        }
        // INTx is a level: high while a cause is pending, low once the
        // guest acknowledged them all.
        self.host.set_intx(self.irq_status != 0);
    }
}

impl Device for PluginTemplate {
    fn describe(&self) -> DeviceDesc {
        let identity = PciIdentity::new(VENDOR_ID, DEVICE_ID, 0xff0000).with_intx();
        DeviceDesc::new(identity).with_bar(BarDesc::mmio32(0, BAR0_SIZE))
    }

    fn bar_read(&mut self, bar: u8, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if bar != 0 {
            return;
        }
        // Registers are 32-bit; other widths see the bytes they cover.
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset + i as u64;
            *b = (self.read_reg(off & !3) >> ((off & 3) * 8)) as u8;
        }
    }

    fn bar_write(&mut self, bar: u8, offset: u64, data: &[u8]) {
        // Only aligned 32-bit writes take effect.
        if let (0, 0, Ok(word)) = (bar, offset % 4, <[u8; 4]>::try_from(data)) {
            self.write_reg(offset, u32::from_le_bytes(word));
        }
    }

    fn reset(&mut self) {
        self.scratch = self.settings.initial_scratch;
        self.irq_status = 0;
        self.host.set_intx(false);
    }

    fn control(&mut self, op: &str, args: &Value) -> Result<Value, String> {
        match op {
            "set-scratch" => control::call(op, args, |a: SetScratch| {
                let previous = std::mem::replace(&mut self.scratch, a.value);
                Ok(Previous { previous })
            }),
            _ => Err(control::unknown(op)),
        }
    }
}

plugin_api::export_plugin! {
    name: "plugin-template",
    devices: { "plugin-template" => PluginTemplate::create },
}
