//! The ACPI fixed hardware of this machine, a plain device with port
//! `read`/`write` (in the style of `vm-superio`):
//!
//! | port | register |
//! |------|----------|
//! | 0x600 | PM1_STS (W1C): PWRBTN_STS (bit 8) |
//! | 0x602 | PM1_EN: PWRBTN_EN (bit 8) |
//! | 0x604 | PM1_CNT: SCI_EN (bit 0, always 1: no SMI to switch modes), SLP_TYP (10–12), SLP_EN (13, write-only) |
//! | 0x608 | PM_TMR: 32-bit, 3.579545 MHz |
//! | 0x60c | reset register: writing 1 resets the machine |
//! | 0x505 | pvpanic: reads its capabilities, a write of bit 0 says the guest panicked |
//!
//! The SCI is a level: high while an enabled event is pending. Only the
//! power button raises events (QMP `system_powerdown`); the timer's
//! overflow event is not implemented (Linux never enables it).

use std::sync::Arc;
use std::time::Instant;

use super::{PM1A_CNT, PM1A_EVT, PM_TMR, PVPANIC_PORT, RESET_PORT, RESET_VALUE, S5_SLP_TYP};
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

/// PM1 registers, PM timer, reset register and pvpanic.
pub struct PowerManagement {
    sts: u16,
    en: u16,
    /// SLP_TYP and the other read/write bits of PM1_CNT.
    cnt: u16,
    start: Instant,
    sci: SciLine,
    sci_level: bool,
    exit: Arc<ExitSignal>,
}

impl PowerManagement {
    pub fn new(exit: Arc<ExitSignal>, sci: SciLine) -> Self {
        PowerManagement {
            sts: 0,
            en: 0,
            cnt: 0,
            start: Instant::now(),
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
            || port == RESET_PORT
            || port == PVPANIC_PORT
    }

    /// A read of `data.len()` bytes at `port` (each byte from its register).
    pub fn read(&mut self, port: u16, data: &mut [u8]) {
        let timer = self.timer();
        for (i, b) in data.iter_mut().enumerate() {
            let p = port.wrapping_add(i as u16);
            *b = match p {
                _ if (PM1A_EVT..PM1A_EVT + 2).contains(&p) => byte(self.sts, p - PM1A_EVT),
                _ if (PM1A_EVT + 2..PM1A_EVT + 4).contains(&p) => byte(self.en, p - PM1A_EVT - 2),
                _ if (PM1A_CNT..PM1A_CNT + 2).contains(&p) => {
                    byte((self.cnt & !SLP_EN) | SCI_EN, p - PM1A_CNT)
                }
                _ if (PM_TMR..PM_TMR + 4).contains(&p) => (timer >> (8 * (p - PM_TMR))) as u8,
                PVPANIC_PORT => PVPANIC_PANICKED | PVPANIC_CRASH_LOADED,
                _ => 0xff,
            };
        }
    }

    /// A write of `data` at `port`, byte by byte (a 16-bit write to PM1_CNT
    /// acts once its high byte, which holds SLP_EN, is in).
    pub fn write(&mut self, port: u16, data: &[u8]) {
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
        let level = self.sts & self.en & PWRBTN != 0;
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
