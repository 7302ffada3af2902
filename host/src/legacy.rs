//! Legacy PC devices Linux probes on port I/O: a CMOS RTC (so `rtc_cmos`
//! does not spin on an all-ones update flag) and an i8042 controller
//! that answers the controller commands Linux's probe issues. The CPU
//! reset command (0xFE) goes to `vm-superio`'s i8042, which ends the VM.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::serial::I8042;

/// CMOS index port; data is +1.
pub const CMOS_PORT: u16 = 0x70;

/// A read-only CMOS RTC showing the host's UTC time, binary-coded decimal.
#[derive(Debug, Default)]
pub struct Cmos {
    index: u8,
}

fn bcd(v: u64) -> u8 {
    (((v / 10) % 10) << 4 | (v % 10)) as u8
}

/// Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
fn civil(days: i64) -> (i64, u64, u64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u64;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u64;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

impl Cmos {
    /// The index register (the clock itself is the host's).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Sets the index register (a restored snapshot).
    pub fn set_index(&mut self, index: u8) {
        self.index = index;
    }

    pub fn read(&mut self, port: u16) -> u8 {
        if port == CMOS_PORT {
            return self.index;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (y, m, d) = civil((now / 86_400) as i64);
        let secs = now % 86_400;
        match self.index & 0x7f {
            0x00 => bcd(secs % 60),
            0x02 => bcd(secs / 60 % 60),
            0x04 => bcd(secs / 3600),
            0x06 => bcd((now / 86_400 + 4) % 7 + 1),
            0x07 => bcd(d),
            0x08 => bcd(m),
            0x09 => bcd(y.rem_euclid(100) as u64),
            0x32 => bcd((y / 100) as u64),
            0x0a => 0x26, // no update in progress, 32.768 kHz
            0x0b => 0x02, // 24-hour, BCD
            0x0d => 0x80, // battery good
            _ => 0,
        }
    }

    pub fn write(&mut self, port: u16, value: u8) {
        if port == CMOS_PORT {
            self.index = value;
        }
    }
}

/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command/status port.
pub const I8042_CMD: u16 = 0x64;

/// The controller side of an i8042 with no keyboard or mouse behind it.
pub struct Ps2Controller {
    reset: I8042,
    out: VecDeque<u8>,
    ctr: u8,
    /// The next data write is the CTR (after command 0x60).
    write_ctr: bool,
}

impl std::fmt::Debug for Ps2Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ps2Controller")
            .field("ctr", &self.ctr)
            .finish()
    }
}

/// What a snapshot keeps of the i8042.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Ps2State {
    out: Vec<u8>,
    ctr: u8,
    write_ctr: bool,
}

impl Ps2Controller {
    /// Its registers and queued bytes.
    pub fn state(&self) -> Ps2State {
        Ps2State {
            out: self.out.iter().copied().collect(),
            ctr: self.ctr,
            write_ctr: self.write_ctr,
        }
    }

    /// Puts `s` back (at most 16 queued bytes are kept).
    pub fn set_state(&mut self, s: &Ps2State) {
        self.out = s.out.iter().copied().take(16).collect();
        self.ctr = s.ctr;
        self.write_ctr = s.write_ctr;
    }

    pub fn new(reset: I8042) -> Self {
        Ps2Controller {
            reset,
            out: VecDeque::new(),
            ctr: 0x30, // both ports disabled, no interrupts
            write_ctr: false,
        }
    }

    pub fn read(&mut self, port: u16) -> u8 {
        if port == I8042_CMD {
            // Output buffer full when a byte waits; system flag set.
            return u8::from(!self.out.is_empty()) | 0x04;
        }
        self.out.pop_front().unwrap_or(0)
    }

    pub fn write(&mut self, port: u16, value: u8) {
        if port == I8042_DATA {
            if self.write_ctr {
                self.ctr = value;
                self.write_ctr = false;
            } else {
                // A byte for a device that is not there: no answer.
            }
            return;
        }
        match value {
            0x20 => self.out.push_back(self.ctr),
            0x60 => self.write_ctr = true,
            0xaa => self.out.push_back(0x55),
            0xa9 | 0xab => self.out.push_back(0x00),
            0xfe => {
                let _ = self.reset.write((I8042_CMD - I8042_DATA) as u8, value);
            }
            _ => {}
        }
        if self.out.len() > 16 {
            self.out.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil(0), (1970, 1, 1));
        assert_eq!(civil(20_454), (2026, 1, 1));
    }

    #[test]
    fn ctr_round_trip() {
        let exit = std::sync::Arc::new(crate::exit::ExitSignal::default());
        let mut k = Ps2Controller::new(vm_superio::I8042Device::new(crate::serial::ResetTrigger(
            exit.clone(),
        )));
        k.write(I8042_CMD, 0x60);
        k.write(I8042_DATA, 0x47);
        k.write(I8042_CMD, 0x20);
        assert_eq!(k.read(I8042_CMD) & 1, 1);
        assert_eq!(k.read(I8042_DATA), 0x47);
        assert!(!exit.is_set());
        k.write(I8042_CMD, 0xfe);
        assert!(exit.is_set());
    }
}
