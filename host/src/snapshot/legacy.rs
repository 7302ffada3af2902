//! The VMM's own legacy devices in a snapshot: COM1 (vm-superio's state),
//! the i8042, the CMOS index and ACPI's fixed hardware.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

use crate::acpi::pm::PmState;
use crate::bus::Bus;
use crate::exit::ExitSignal;
use crate::legacy::Ps2State;

/// vm-superio's `SerialState`, field by field (it has no serde).
#[derive(Serialize, Deserialize)]
struct SerialRegs {
    dll: u8,
    dlm: u8,
    ier: u8,
    iir: u8,
    lcr: u8,
    lsr: u8,
    mcr: u8,
    msr: u8,
    scr: u8,
    rx: Vec<u8>,
}

/// The legacy devices.
#[derive(Serialize, Deserialize)]
pub struct LegacyState {
    serial: SerialRegs,
    i8042: Ps2State,
    cmos_index: u8,
    pm: Option<PmState>,
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl LegacyState {
    /// Reads them from `bus`.
    pub fn read(bus: &Bus) -> Self {
        let s = lock(&bus.serial).state();
        LegacyState {
            serial: SerialRegs {
                dll: s.baud_divisor_low,
                dlm: s.baud_divisor_high,
                ier: s.interrupt_enable,
                iir: s.interrupt_identification,
                lcr: s.line_control,
                lsr: s.line_status,
                mcr: s.modem_control,
                msr: s.modem_status,
                scr: s.scratch,
                rx: s.in_buffer,
            },
            i8042: lock(&bus.i8042).state(),
            cmos_index: lock(&bus.cmos).index(),
            pm: bus.pm.as_ref().map(|pm| lock(pm).state()),
        }
    }

    /// Puts them into `bus` (COM1 keeps its console; its interrupt is
    /// raised again if the state has one pending).
    pub fn write(&self, bus: &Bus, exit: &std::sync::Arc<ExitSignal>) -> Result<()> {
        let r = &self.serial;
        let state = SerialState {
            baud_divisor_low: r.dll,
            baud_divisor_high: r.dlm,
            interrupt_enable: r.ier,
            interrupt_identification: r.iir,
            line_control: r.lcr,
            line_status: r.lsr,
            modem_control: r.mcr,
            modem_status: r.msr,
            scratch: r.scr,
            in_buffer: r.rx.clone(),
        };
        bus.set_com1(exit, &state).context("restoring COM1")?;
        lock(&bus.i8042).set_state(&self.i8042);
        lock(&bus.cmos).set_index(self.cmos_index);
        match (&bus.pm, &self.pm) {
            (Some(pm), Some(s)) => lock(pm).set_state(s),
            (None, None) => {}
            _ => anyhow::bail!("the snapshot's machine and this one differ in `acpi`"),
        }
        Ok(())
    }
}
