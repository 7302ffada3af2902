//! Port I/O and MMIO dispatch for vCPU exits: legacy devices (COM1,
//! i8042), the PCI configuration mechanism and PCI BARs.

use std::sync::{Arc, Mutex};

use vm_superio::serial::{NoEvents, SerialState};
use vm_superio::{I8042Device, Serial};

use crate::acpi::pm::PowerManagement;
use crate::exit::ExitSignal;
use crate::legacy::{Cmos, Ps2Controller, CMOS_PORT};
use crate::pci::root::PciRoot;
use crate::serial::{Com1, ConsoleOut, EventFdTrigger, ResetTrigger, I8042_PORT, SERIAL_PORT};

/// Everything a vCPU exit can reach.
pub struct Bus {
    pub serial: Mutex<Com1>,
    pub i8042: Mutex<Ps2Controller>,
    pub cmos: Mutex<Cmos>,
    /// ACPI's fixed hardware; `None` on a machine without ACPI.
    pub pm: Option<Mutex<PowerManagement>>,
    /// Shared with the supervisors (device-channel heartbeats).
    pub pci: std::sync::Arc<PciRoot>,
    /// The VM's GSI routing (MSI-X vectors' routes), shared by every
    /// function with MSI-X, those added later included.
    pub msi_routes: std::sync::Arc<crate::pci::msix::GsiRoutes>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").finish_non_exhaustive()
    }
}

impl Bus {
    /// A VM reset of the legacy devices, as a power-on would leave them:
    /// COM1 gets a fresh 16550A (registers, FIFOs) writing to the same
    /// console, the i8042 a fresh controller (no reset pending, no bytes
    /// queued, CTR at its default) and the CMOS its index register. A
    /// partial console line of the old boot is written out first.
    /// Puts COM1 in `state` (its interrupt raised if the state has one
    /// pending), writing to the same console.
    pub fn set_com1(&self, exit: &Arc<ExitSignal>, state: &SerialState) -> anyhow::Result<()> {
        let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let evt = s.interrupt_evt().0.try_clone()?;
        let placeholder = Serial::new(
            EventFdTrigger(evt.try_clone()?),
            ConsoleOut::new(Box::new(std::io::sink()), exit.clone()),
        );
        let out = std::mem::replace(&mut *s, placeholder).into_writer();
        *s = Serial::from_state(state, EventFdTrigger(evt), NoEvents, out)
            .map_err(|e| anyhow::anyhow!("COM1's state: {e:?}"))?;
        Ok(())
    }

    pub fn reset_legacy(&self, exit: &Arc<ExitSignal>) -> anyhow::Result<()> {
        {
            let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            let _ = s.writer_mut().finish();
        }
        self.set_com1(exit, &SerialState::default())?;
        *self.i8042.lock().unwrap_or_else(|e| e.into_inner()) =
            Ps2Controller::new(I8042Device::new(ResetTrigger(exit.clone())));
        *self.cmos.lock().unwrap_or_else(|e| e.into_inner()) = Cmos::default();
        if let Some(pm) = &self.pm {
            pm.lock().unwrap_or_else(|e| e.into_inner()).reset();
        }
        Ok(())
    }

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
            p if PowerManagement::handles(p) && self.pm.is_some() => {
                if let Some(pm) = &self.pm {
                    pm.lock().unwrap_or_else(|e| e.into_inner()).read(p, data);
                }
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
            p if PowerManagement::handles(p) && self.pm.is_some() => {
                if let Some(pm) = &self.pm {
                    pm.lock().unwrap_or_else(|e| e.into_inner()).write(p, data);
                }
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
