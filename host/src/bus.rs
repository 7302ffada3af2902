//! Port I/O and MMIO dispatch for vCPU exits: legacy devices (COM1,
//! i8042), the PCI configuration mechanism and PCI BARs.

use std::sync::Mutex;

use crate::legacy::{Cmos, Ps2Controller, CMOS_PORT};
use crate::pci::root::PciRoot;
use crate::serial::{Com1, I8042_PORT, SERIAL_PORT};

/// Everything a vCPU exit can reach.
pub struct Bus {
    pub serial: Mutex<Com1>,
    pub i8042: Mutex<Ps2Controller>,
    pub cmos: Mutex<Cmos>,
    /// Shared with the supervisors (device-channel heartbeats).
    pub pci: std::sync::Arc<PciRoot>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

impl Bus {
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                data[0] = s.read((p - SERIAL_PORT) as u8);
            }
            p if (p == I8042_PORT || p == I8042_PORT + 4) && data.len() == 1 => {
                let mut k = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                data[0] = k.read(p);
            }
            p if (p == CMOS_PORT || p == CMOS_PORT + 1) && data.len() == 1 => {
                data[0] = self.cmos.lock().unwrap_or_else(|e| e.into_inner()).read(p);
            }
            p => {
                if !self.pci.pio_read(p, data) {
                    data.fill(0xff);
                }
            }
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                if let Err(e) = s.write((p - SERIAL_PORT) as u8, data[0]) {
                    tracing::warn!("serial: {e:?}");
                }
            }
            p if (p == I8042_PORT || p == I8042_PORT + 4) && data.len() == 1 => {
                let mut k = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                k.write(p, data[0]);
            }
            p if (p == CMOS_PORT || p == CMOS_PORT + 1) && data.len() == 1 => {
                self.cmos
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .write(p, data[0]);
            }
            p => {
                self.pci.pio_write(p, data);
            }
        }
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if !self.pci.mmio_read(addr, data) {
            data.fill(0xff);
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        self.pci.mmio_write(addr, data);
    }
}
