//! The ACPI fixed hardware of this machine, a plain device with port
//! `read`/`write` (in the style of `vm-superio`):
//!
//! | port | register |
//! |------|----------|
//! | 0x600 | PM1_STS (W1C): PWRBTN_STS (bit 8) |
//! | 0x602 | PM1_EN: PWRBTN_EN (bit 8) |
//! | 0x604 | PM1_CNT: SCI_EN (bit 0, always 1: no SMI to switch modes), SLP_TYP (10–12), SLP_EN (13, write-only) |
//! | 0x608 | PM_TMR: 32-bit, 3.579545 MHz |
//! | 0x620 | GPE0_STS (W1C): bit 1, a PCI hotplug event |
//! | 0x622 | GPE0_EN |
//! | 0x640 | PCIU: slots with a new function to check (cleared when read) |
//! | 0x644 | PCID: slots whose function the host asks the guest to release |
//! | 0x648 | B0EJ: the guest writes the slots it released (`_EJ0`) |
//! | 0x60c | reset register: writing 1 resets the machine |
//! | 0x505 | pvpanic: reads its capabilities, a write of bit 0 says the guest panicked |
//!
//! The SCI is a level: high while an enabled event is pending: the power
//! button (QMP `system_powerdown`) or a PCI hotplug event (`device_add`,
//! `device_del`). The timer's overflow event is not implemented (Linux
//! never enables it).

use std::sync::Arc;
use std::time::Instant;

use super::{
    GPE0_BLK, GPE_PCI_HOTPLUG, PCI_HOTPLUG, PM1A_CNT, PM1A_EVT, PM_TMR, PVPANIC_PORT, RESET_PORT,
    RESET_VALUE, S5_SLP_TYP,
};
use crate::exit::{ExitReason, ExitSignal};

/// PM1_STS / PM1_EN: the power button.
const PWRBTN: u16 = 1 << 8;
/// PM1_CNT: SCI enabled (ACPI mode).
const SCI_EN: u16 = 1;
/// PM1_CNT: sleep enable (write-only).
const SLP_EN: u16 = 1 << 13;
/// pvpanic: the guest panicked / a crash kernel is loaded.
const PVPANIC_PANICKED: u8 = 1;
const PVPANIC_CRASH_LOADED: u8 = 2;
/// The PM timer's frequency.
const PM_TIMER_HZ: u128 = 3_579_545;

/// Sets the SCI's level.
pub type SciLine = Box<dyn Fn(bool) + Send>;
/// Told the slots (a bitmap) whose functions the guest released.
pub type EjectSink = Box<dyn Fn(u32) + Send>;

/// PM1 registers, PM timer, reset register and pvpanic.
pub struct PowerManagement {
    sts: u16,
    en: u16,
    /// SLP_TYP and the other read/write bits of PM1_CNT.
    cnt: u16,
    start: Instant,
    gpe_sts: u16,
    gpe_en: u16,
    /// PCIU and PCID.
    pci_up: u32,
    pci_down: u32,
    on_eject: Option<EjectSink>,
    sci: SciLine,
    sci_level: bool,
    exit: Arc<ExitSignal>,
}

/// What a snapshot keeps of the fixed hardware: the guest's enables and
/// the events not yet taken. The PM timer starts again from the restore.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PmState {
    sts: u16,
    en: u16,
    cnt: u16,
    gpe_sts: u16,
    gpe_en: u16,
    pci_up: u32,
    pci_down: u32,
}

impl PowerManagement {
    /// The registers.
    pub fn state(&self) -> PmState {
        PmState {
            sts: self.sts,
            en: self.en,
            cnt: self.cnt,
            gpe_sts: self.gpe_sts,
            gpe_en: self.gpe_en,
            pci_up: self.pci_up,
            pci_down: self.pci_down,
        }
    }

    /// Puts the registers back, and the SCI level they imply.
    pub fn set_state(&mut self, s: &PmState) {
        self.sts = s.sts;
        self.en = s.en;
        self.cnt = s.cnt;
        self.gpe_sts = s.gpe_sts;
        self.gpe_en = s.gpe_en;
        self.pci_up = s.pci_up;
        self.pci_down = s.pci_down;
        self.update_sci();
    }

    pub fn new(exit: Arc<ExitSignal>, sci: SciLine) -> Self {
        PowerManagement {
            sts: 0,
            en: 0,
            cnt: 0,
            start: Instant::now(),
            gpe_sts: 0,
            gpe_en: 0,
            pci_up: 0,
            pci_down: 0,
            on_eject: None,
            sci,
            sci_level: false,
            exit,
        }
    }

    /// Whether `port` is one of this device's.
    pub fn handles(port: u16) -> bool {
        (PM1A_EVT..PM1A_EVT + 4).contains(&port)
            || (PM1A_CNT..PM1A_CNT + 2).contains(&port)
            || (PM_TMR..PM_TMR + 4).contains(&port)
            || (GPE0_BLK..GPE0_BLK + 4).contains(&port)
            || (PCI_HOTPLUG..PCI_HOTPLUG + 12).contains(&port)
            || port == RESET_PORT
            || port == PVPANIC_PORT
    }

    /// Where ejected slots are reported (the monitor completes the
    /// `device_del` there).
    pub fn set_eject_sink(&mut self, sink: EjectSink) {
        self.on_eject = Some(sink);
    }

    /// A read of `data.len()` bytes at `port` (each byte from its register).
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        let timer = self.timer();
        let (up, down) = (self.pci_up, self.pci_down);
        // PCIU is cleared by a read of any of its bytes (ACPI reads it
        // whole, as a DWord field).
        if (PCI_HOTPLUG..PCI_HOTPLUG + 4).contains(&port) {
            self.pci_up = 0;
        }
        for (i, b) in data.iter_mut().enumerate() {
            let p = port.wrapping_add(i as u16);
            *b = match p {
                _ if (PM1A_EVT..PM1A_EVT + 2).contains(&p) => byte(self.sts, p - PM1A_EVT),
                _ if (PM1A_EVT + 2..PM1A_EVT + 4).contains(&p) => byte(self.en, p - PM1A_EVT - 2),
                _ if (PM1A_CNT..PM1A_CNT + 2).contains(&p) => {
                    byte((self.cnt & !SLP_EN) | SCI_EN, p - PM1A_CNT)
                }
                _ if (PM_TMR..PM_TMR + 4).contains(&p) => (timer >> (8 * (p - PM_TMR))) as u8,
                _ if (GPE0_BLK..GPE0_BLK + 2).contains(&p) => byte(self.gpe_sts, p - GPE0_BLK),
                _ if (GPE0_BLK + 2..GPE0_BLK + 4).contains(&p) => {
                    byte(self.gpe_en, p - GPE0_BLK - 2)
                }
                _ if (PCI_HOTPLUG..PCI_HOTPLUG + 4).contains(&p) => {
                    (up >> (8 * (p - PCI_HOTPLUG))) as u8
                }
                _ if (PCI_HOTPLUG + 4..PCI_HOTPLUG + 8).contains(&p) => {
                    (down >> (8 * (p - PCI_HOTPLUG - 4))) as u8
                }
                PVPANIC_PORT => PVPANIC_PANICKED | PVPANIC_CRASH_LOADED,
                _ => 0xff,
            };
        }
    }

    /// A write of `data` at `port`, byte by byte (a 16-bit write to PM1_CNT
    /// acts once its high byte, which holds SLP_EN, is in).
    pub fn write(&mut self, port: u16, data: &[u8]) {
        let mut ejected = 0u32;
        for (i, &b) in data.iter().enumerate() {
            let p = port.wrapping_add(i as u16);
            match p {
                _ if (PM1A_EVT..PM1A_EVT + 2).contains(&p) => {
                    // Write one to clear.
                    self.sts &= !(u16::from(b) << (8 * (p - PM1A_EVT)));
                }
                _ if (PM1A_EVT + 2..PM1A_EVT + 4).contains(&p) => {
                    set_byte(&mut self.en, p - PM1A_EVT - 2, b);
                }
                _ if (PM1A_CNT..PM1A_CNT + 2).contains(&p) => {
                    set_byte(&mut self.cnt, p - PM1A_CNT, b);
                    if p == PM1A_CNT + 1 {
                        self.sleep_request();
                    }
                }
                _ if (GPE0_BLK..GPE0_BLK + 2).contains(&p) => {
                    self.gpe_sts &= !(u16::from(b) << (8 * (p - GPE0_BLK)));
                }
                _ if (GPE0_BLK + 2..GPE0_BLK + 4).contains(&p) => {
                    set_byte(&mut self.gpe_en, p - GPE0_BLK - 2, b);
                }
                _ if (PCI_HOTPLUG + 8..PCI_HOTPLUG + 12).contains(&p) => {
                    ejected |= u32::from(b) << (8 * (p - PCI_HOTPLUG - 8));
                }
                RESET_PORT if b == RESET_VALUE => self.exit.guest_reset(),
                PVPANIC_PORT => {
                    if b & PVPANIC_PANICKED != 0 {
                        self.exit.set(ExitReason::Panic);
                    } else if b & PVPANIC_CRASH_LOADED != 0 {
                        tracing::warn!("pvpanic: the guest panicked; its crash kernel runs");
                    }
                }
                _ => {}
            }
        }
        // Slot 0 is the host bridge: never ejected.
        let ejected = ejected & !1;
        if ejected != 0 {
            self.pci_down &= !ejected;
            match &self.on_eject {
                Some(sink) => sink(ejected),
                None => {
                    tracing::warn!("ACPI: the guest ejected slots {ejected:#x}; nobody listens")
                }
            }
        }
        self.update_sci();
    }

    /// A function was added in `slot`: the guest is told to check it.
    pub fn plug(&mut self, slot: u8) {
        self.pci_up |= 1 << (slot & 31);
        self.gpe_sts |= GPE_PCI_HOTPLUG;
        self.update_sci();
    }

    /// Asks the guest to release the function in `slot`; it answers by
    /// ejecting it (B0EJ), or not at all.
    pub fn request_unplug(&mut self, slot: u8) {
        self.pci_down |= 1 << (slot & 31);
        self.gpe_sts |= GPE_PCI_HOTPLUG;
        self.update_sci();
    }

    /// QMP `system_powerdown`: the power button is pressed. The guest
    /// sees an SCI if it enabled the button's event.
    pub fn press_power_button(&mut self) {
        self.sts |= PWRBTN;
        self.update_sci();
    }

    /// Whether the guest enabled the power button's event (it listens).
    pub fn power_button_enabled(&self) -> bool {
        self.en & PWRBTN != 0
    }

    /// The power-on state (a machine reset).
    pub fn reset(&mut self) {
        self.sts = 0;
        self.en = 0;
        self.cnt = 0;
        self.gpe_sts = 0;
        self.gpe_en = 0;
        self.pci_up = 0;
        self.pci_down = 0;
        self.update_sci();
    }

    fn sleep_request(&mut self) {
        if self.cnt & SLP_EN == 0 {
            return;
        }
        let typ = ((self.cnt >> 10) & 7) as u8;
        self.cnt &= !SLP_EN;
        if typ == S5_SLP_TYP {
            self.exit.set(ExitReason::PowerOff);
        } else {
            tracing::warn!("ACPI: sleep type {typ} requested; only S5 (power off) is offered");
        }
    }

    fn timer(&self) -> u32 {
        (self.start.elapsed().as_nanos() * PM_TIMER_HZ / 1_000_000_000) as u32
    }

    fn update_sci(&mut self) {
        let level = self.sts & self.en & PWRBTN != 0 || self.gpe_sts & self.gpe_en != 0;
        if level != self.sci_level {
            self.sci_level = level;
            (self.sci)(level);
        }
    }
}

fn byte(v: u16, i: u16) -> u8 {
    (v >> (8 * i)) as u8
}

fn set_byte(v: &mut u16, i: u16, b: u8) {
    let shift = 8 * i;
    *v = (*v & !(0xff << shift)) | (u16::from(b) << shift);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn pm() -> (PowerManagement, Arc<ExitSignal>, Arc<Mutex<Vec<bool>>>) {
        let exit = Arc::new(ExitSignal::default());
        let levels = Arc::new(Mutex::new(Vec::new()));
        let l = levels.clone();
        let pm = PowerManagement::new(exit.clone(), Box::new(move |v| l.lock().unwrap().push(v)));
        (pm, exit, levels)
    }

    fn read16(pm: &mut PowerManagement, port: u16) -> u16 {
        let mut b = [0u8; 2];
        pm.read(port, &mut b);
        u16::from_le_bytes(b)
    }

    #[test]
    fn acpi_mode_is_on_and_s5_powers_off() {
        let (mut pm, exit, _) = pm();
        assert_eq!(read16(&mut pm, PM1A_CNT) & SCI_EN, SCI_EN);
        // Another sleep type does nothing.
        pm.write(PM1A_CNT, &(3u16 << 10 | SLP_EN | SCI_EN).to_le_bytes());
        assert!(!exit.is_set());
        assert_eq!(read16(&mut pm, PM1A_CNT) & SLP_EN, 0, "SLP_EN reads 0");
        // SLP_TYP first, then SLP_EN, as ACPICA writes them.
        let typ = u16::from(S5_SLP_TYP) << 10;
        pm.write(PM1A_CNT, &typ.to_le_bytes());
        assert!(!exit.is_set());
        pm.write(PM1A_CNT, &(typ | SLP_EN).to_le_bytes());
        assert_eq!(exit.current(), Some(ExitReason::PowerOff));
    }

    #[test]
    fn power_button_raises_the_sci_until_acknowledged() {
        let (mut pm, _, levels) = pm();
        pm.press_power_button();
        assert!(levels.lock().unwrap().is_empty(), "not enabled: no SCI");
        assert_eq!(
            read16(&mut pm, PM1A_EVT) & PWRBTN,
            PWRBTN,
            "status set anyway"
        );
        pm.write(PM1A_EVT + 2, &PWRBTN.to_le_bytes());
        assert!(pm.power_button_enabled());
        assert_eq!(*levels.lock().unwrap(), vec![true], "enabled: SCI high");
        pm.write(PM1A_EVT, &PWRBTN.to_le_bytes()); // W1C
        assert_eq!(read16(&mut pm, PM1A_EVT) & PWRBTN, 0);
        assert_eq!(*levels.lock().unwrap(), vec![true, false]);
        pm.reset();
        assert!(!pm.power_button_enabled());
    }

    #[test]
    fn reset_register_and_pvpanic() {
        let (mut pm, exit, _) = pm();
        pm.write(RESET_PORT, &[0x02]);
        assert!(!exit.is_set(), "only the FADT's value resets");
        let mut cap = [0u8];
        pm.read(PVPANIC_PORT, &mut cap);
        assert_eq!(cap[0] & PVPANIC_PANICKED, PVPANIC_PANICKED);
        pm.write(PVPANIC_PORT, &[PVPANIC_CRASH_LOADED]);
        assert!(!exit.is_set());
        pm.write(PVPANIC_PORT, &[PVPANIC_PANICKED]);
        assert_eq!(exit.current(), Some(ExitReason::Panic));
        let (mut pm, exit, _) = super::tests::pm();
        exit.set_acpi(true);
        pm.write(RESET_PORT, &[RESET_VALUE]);
        assert_eq!(exit.current(), Some(ExitReason::Reboot));
    }

    #[test]
    fn hotplug_events_and_ejects() {
        let (mut pm, _, levels) = pm();
        let ejected = Arc::new(Mutex::new(Vec::new()));
        let e = ejected.clone();
        pm.set_eject_sink(Box::new(move |slots| e.lock().unwrap().push(slots)));
        pm.write(GPE0_BLK + 2, &GPE_PCI_HOTPLUG.to_le_bytes());
        pm.plug(5);
        assert_eq!(*levels.lock().unwrap(), vec![true]);
        let mut up = [0u8; 4];
        pm.read(PCI_HOTPLUG, &mut up);
        assert_eq!(u32::from_le_bytes(up), 1 << 5);
        pm.read(PCI_HOTPLUG, &mut up);
        assert_eq!(u32::from_le_bytes(up), 0, "PCIU clears when read");
        pm.write(GPE0_BLK, &GPE_PCI_HOTPLUG.to_le_bytes());
        assert_eq!(*levels.lock().unwrap(), vec![true, false]);
        pm.request_unplug(6);
        let mut down = [0u8; 4];
        pm.read(PCI_HOTPLUG + 4, &mut down);
        assert_eq!(u32::from_le_bytes(down), 1 << 6, "PCID stays until ejected");
        pm.write(PCI_HOTPLUG + 8, &(1u32 << 6 | 1).to_le_bytes());
        assert_eq!(
            *ejected.lock().unwrap(),
            vec![1 << 6],
            "slot 0 never ejected"
        );
        pm.read(PCI_HOTPLUG + 4, &mut down);
        assert_eq!(u32::from_le_bytes(down), 0);
    }

    #[test]
    fn timer_counts_at_3_58_mhz() {
        let (mut pm, _, _) = pm();
        let mut a = [0u8; 4];
        pm.read(PM_TMR, &mut a);
        let t0 = Instant::now();
        while t0.elapsed().as_millis() < 20 {
            std::hint::spin_loop();
        }
        let mut b = [0u8; 4];
        pm.read(PM_TMR, &mut b);
        let ticks = u32::from_le_bytes(b).wrapping_sub(u32::from_le_bytes(a));
        // At least 20 ms worth of ticks passed between the reads.
        assert!(ticks >= 71_000, "{ticks}");
    }
}
