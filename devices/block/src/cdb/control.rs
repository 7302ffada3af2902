//! Non-medium commands (SPC-4 and SBC-3): TEST UNIT READY, REQUEST SENSE,
//! INQUIRY, MODE SENSE/SELECT, START STOP UNIT, READ CAPACITY, REPORT LUNS.

use super::{be, check_control, fixed, opcode, require};
use crate::sense::Sense;

/// TEST UNIT READY: no fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TestUnitReady;

impl TestUnitReady {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<6>(cdb)?;
        check_control(c[5])?;
        Ok(TestUnitReady)
    }
}

/// REQUEST SENSE. Only fixed-format sense is supported, so DESC must be 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestSense {
    pub alloc_len: u8,
}

impl RequestSense {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<6>(cdb)?;
        check_control(c[5])?;
        require(c[1] & 0x01 == 0)?;
        Ok(RequestSense { alloc_len: c[4] })
    }
}

/// INQUIRY: standard data or, with EVPD, a vital product data page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Inquiry {
    pub evpd: bool,
    pub page_code: u8,
    pub alloc_len: u16,
}

impl Inquiry {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<6>(cdb)?;
        check_control(c[5])?;
        let evpd = c[1] & 0x01 != 0;
        // CMDDT (obsolete) must be 0; PAGE CODE must be 0 without EVPD.
        require(c[1] & 0x02 == 0)?;
        require(evpd || c[2] == 0)?;
        Ok(Inquiry {
            evpd,
            page_code: c[2],
            alloc_len: be(&c[3..5]) as u16,
        })
    }
}

/// PC field of MODE SENSE.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageControl {
    Current,
    Changeable,
    Default,
    Saved,
}

impl PageControl {
    fn from_bits(b: u8) -> Self {
        match b & 3 {
            0 => PageControl::Current,
            1 => PageControl::Changeable,
            2 => PageControl::Default,
            _ => PageControl::Saved,
        }
    }
}

/// MODE SENSE(6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSense6 {
    /// Disable block descriptors.
    pub dbd: bool,
    pub pc: PageControl,
    pub page_code: u8,
    pub subpage: u8,
    pub alloc_len: u8,
}

impl ModeSense6 {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<6>(cdb)?;
        check_control(c[5])?;
        Ok(ModeSense6 {
            dbd: c[1] & 0x08 != 0,
            pc: PageControl::from_bits(c[2] >> 6),
            page_code: c[2] & 0x3f,
            subpage: c[3],
            alloc_len: c[4],
        })
    }
}

/// MODE SENSE(10). LLBAA asks for the 16-byte block descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSense10 {
    pub llbaa: bool,
    pub dbd: bool,
    pub pc: PageControl,
    pub page_code: u8,
    pub subpage: u8,
    pub alloc_len: u16,
}

impl ModeSense10 {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<10>(cdb)?;
        check_control(c[9])?;
        Ok(ModeSense10 {
            llbaa: c[1] & 0x10 != 0,
            dbd: c[1] & 0x08 != 0,
            pc: PageControl::from_bits(c[2] >> 6),
            page_code: c[2] & 0x3f,
            subpage: c[3],
            alloc_len: be(&c[7..9]) as u16,
        })
    }
}

/// Byte 1 of MODE SELECT: SP (save pages) is not supported; PF (page
/// format) must be set whenever a parameter list is sent.
fn check_mode_select_byte1(b: u8, param_len: usize) -> Result<(), Sense> {
    require(b & 0x01 == 0)?;
    require(param_len == 0 || b & 0x10 != 0)
}

/// MODE SELECT(6); the parameter list comes as data out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSelect6 {
    pub param_len: u8,
}

impl ModeSelect6 {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<6>(cdb)?;
        check_control(c[5])?;
        check_mode_select_byte1(c[1], usize::from(c[4]))?;
        Ok(ModeSelect6 { param_len: c[4] })
    }
}

/// MODE SELECT(10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeSelect10 {
    pub param_len: u16,
}

impl ModeSelect10 {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<10>(cdb)?;
        check_control(c[9])?;
        let param_len = be(&c[7..9]) as u16;
        check_mode_select_byte1(c[1], usize::from(param_len))?;
        Ok(ModeSelect10 { param_len })
    }
}

/// START STOP UNIT. The medium is not removable: LOEJ is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartStopUnit {
    pub immed: bool,
    pub power_condition: u8,
    /// Stop without writing back the cache.
    pub no_flush: bool,
    pub start: bool,
}

impl StartStopUnit {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<6>(cdb)?;
        check_control(c[5])?;
        require(c[4] & 0x02 == 0)?;
        // POWER CONDITION values SBC-3 defines: START_VALID, ACTIVE, IDLE,
        // STANDBY, LU_CONTROL, FORCE_IDLE_0, FORCE_STANDBY_0.
        require(matches!(c[4] >> 4, 0x0..=0x3 | 0x7 | 0xa | 0xb))?;
        Ok(StartStopUnit {
            immed: c[1] & 0x01 != 0,
            power_condition: c[4] >> 4,
            no_flush: c[4] & 0x04 != 0,
            start: c[4] & 0x01 != 0,
        })
    }
}

/// READ CAPACITY(10). Without PMI the LBA field must be 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCapacity10 {
    pub pmi: bool,
    pub lba: u32,
}

impl ReadCapacity10 {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<10>(cdb)?;
        check_control(c[9])?;
        let pmi = c[8] & 0x01 != 0;
        let lba = be(&c[2..6]) as u32;
        require(pmi || lba == 0)?;
        Ok(ReadCapacity10 { pmi, lba })
    }
}

/// READ CAPACITY(16): SERVICE ACTION IN(16) with service action 10h.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadCapacity16 {
    pub pmi: bool,
    pub lba: u64,
    pub alloc_len: u32,
}

impl ReadCapacity16 {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<16>(cdb)?;
        check_control(c[15])?;
        require(c[1] & 0x1f == opcode::SAI_READ_CAPACITY_16)?;
        let pmi = c[14] & 0x01 != 0;
        let lba = be(&c[2..10]);
        require(pmi || lba == 0)?;
        Ok(ReadCapacity16 {
            pmi,
            lba,
            alloc_len: be(&c[10..14]) as u32,
        })
    }
}

/// REPORT LUNS. SELECT REPORT 00h..02h and 10h..12h are accepted; this target
/// has only LUN 0 and no well-known LUNs, so they all give the same list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportLuns {
    pub select_report: u8,
    pub alloc_len: u32,
}

impl ReportLuns {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<12>(cdb)?;
        check_control(c[11])?;
        require(matches!(c[2], 0x00..=0x02 | 0x10..=0x12))?;
        Ok(ReportLuns {
            select_report: c[2],
            alloc_len: be(&c[6..10]) as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BAD: Result<(), Sense> = Err(Sense::invalid_field_in_cdb());

    fn err<T>(r: Result<T, Sense>) -> Result<(), Sense> {
        r.map(|_| ())
    }

    #[test]
    fn test_unit_ready() {
        assert_eq!(TestUnitReady::parse(&[0; 6]), Ok(TestUnitReady));
        assert_eq!(err(TestUnitReady::parse(&[0; 5])), BAD);
    }

    #[test]
    fn request_sense() {
        assert_eq!(
            RequestSense::parse(&[3, 0, 0, 0, 18, 0]),
            Ok(RequestSense { alloc_len: 18 })
        );
        // Descriptor format is not supported.
        assert_eq!(err(RequestSense::parse(&[3, 1, 0, 0, 18, 0])), BAD);
        assert_eq!(err(RequestSense::parse(&[3, 0, 0, 0])), BAD);
    }

    #[test]
    fn inquiry() {
        assert_eq!(
            Inquiry::parse(&[0x12, 0, 0, 0x01, 0x00, 0]),
            Ok(Inquiry {
                evpd: false,
                page_code: 0,
                alloc_len: 256
            })
        );
        assert_eq!(
            Inquiry::parse(&[0x12, 1, 0x83, 0, 0xff, 0]),
            Ok(Inquiry {
                evpd: true,
                page_code: 0x83,
                alloc_len: 255
            })
        );
        // Page code without EVPD, CMDDT, short buffer.
        assert_eq!(err(Inquiry::parse(&[0x12, 0, 0x80, 0, 0xff, 0])), BAD);
        assert_eq!(err(Inquiry::parse(&[0x12, 2, 0, 0, 0xff, 0])), BAD);
        assert_eq!(err(Inquiry::parse(&[0x12, 0, 0, 0])), BAD);
    }

    #[test]
    fn mode_sense6() {
        assert_eq!(
            ModeSense6::parse(&[0x1a, 0x08, 0x48, 0, 192, 0]),
            Ok(ModeSense6 {
                dbd: true,
                pc: PageControl::Changeable,
                page_code: 0x08,
                subpage: 0,
                alloc_len: 192
            })
        );
        assert_eq!(
            ModeSense6::parse(&[0x1a, 0, 0xff, 0xff, 4, 0]).map(|m| (m.pc, m.page_code, m.subpage)),
            Ok((PageControl::Saved, 0x3f, 0xff))
        );
        assert_eq!(err(ModeSense6::parse(&[0x1a, 0, 0x3f, 0, 4])), BAD);
    }

    #[test]
    fn mode_sense10() {
        assert_eq!(
            ModeSense10::parse(&[0x5a, 0x10, 0x8a, 0, 0, 0, 0, 0x10, 0x00, 0]),
            Ok(ModeSense10 {
                llbaa: true,
                dbd: false,
                pc: PageControl::Default,
                page_code: 0x0a,
                subpage: 0,
                alloc_len: 0x1000
            })
        );
        assert_eq!(
            err(ModeSense10::parse(&[0x5a, 0, 0x3f, 0, 0, 0, 0, 0, 4])),
            BAD
        );
    }

    #[test]
    fn mode_select() {
        assert_eq!(
            ModeSelect6::parse(&[0x15, 0x10, 0, 0, 24, 0]),
            Ok(ModeSelect6 { param_len: 24 })
        );
        // SP not supported; PF required with a list; zero-length list is fine.
        assert_eq!(err(ModeSelect6::parse(&[0x15, 0x11, 0, 0, 24, 0])), BAD);
        assert_eq!(err(ModeSelect6::parse(&[0x15, 0x00, 0, 0, 24, 0])), BAD);
        assert_eq!(
            ModeSelect6::parse(&[0x15, 0x00, 0, 0, 0, 0]),
            Ok(ModeSelect6 { param_len: 0 })
        );
        assert_eq!(
            ModeSelect10::parse(&[0x55, 0x10, 0, 0, 0, 0, 0, 0x01, 0x02, 0]),
            Ok(ModeSelect10 { param_len: 0x102 })
        );
        assert_eq!(
            err(ModeSelect10::parse(&[0x55, 0x11, 0, 0, 0, 0, 0, 0, 8, 0])),
            BAD
        );
        assert_eq!(err(ModeSelect10::parse(&[0x55, 0x10, 0, 0, 0])), BAD);
    }

    #[test]
    fn start_stop_unit() {
        assert_eq!(
            StartStopUnit::parse(&[0x1b, 1, 0, 0, 0x01, 0]),
            Ok(StartStopUnit {
                immed: true,
                power_condition: 0,
                no_flush: false,
                start: true
            })
        );
        // Eject on a fixed disk; an undefined power condition.
        assert_eq!(err(StartStopUnit::parse(&[0x1b, 0, 0, 0, 0x02, 0])), BAD);
        assert_eq!(err(StartStopUnit::parse(&[0x1b, 0, 0, 0, 0x50, 0])), BAD);
        assert_eq!(
            StartStopUnit::parse(&[0x1b, 0, 0, 0, 0x30, 0]).map(|s| s.power_condition),
            Ok(3)
        );
        assert_eq!(
            StartStopUnit::parse(&[0x1b, 0, 0, 0, 0x04, 0]).map(|s| (s.no_flush, s.start)),
            Ok((true, false))
        );
        assert_eq!(err(StartStopUnit::parse(&[0x1b, 0, 0, 0, 1])), BAD);
    }

    #[test]
    fn read_capacity10() {
        assert_eq!(
            ReadCapacity10::parse(&[0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
            Ok(ReadCapacity10 { pmi: false, lba: 0 })
        );
        assert_eq!(
            ReadCapacity10::parse(&[0x25, 0, 0, 0, 1, 0, 0, 0, 1, 0]),
            Ok(ReadCapacity10 {
                pmi: true,
                lba: 256
            })
        );
        // LBA without PMI.
        assert_eq!(
            err(ReadCapacity10::parse(&[0x25, 0, 0, 0, 1, 0, 0, 0, 0, 0])),
            BAD
        );
        assert_eq!(err(ReadCapacity10::parse(&[0x25, 0, 0, 0, 0, 0])), BAD);
    }

    #[test]
    fn read_capacity16() {
        let mut c = [0u8; 16];
        c[0] = 0x9e;
        c[1] = 0x10;
        c[13] = 32;
        assert_eq!(
            ReadCapacity16::parse(&c),
            Ok(ReadCapacity16 {
                pmi: false,
                lba: 0,
                alloc_len: 32
            })
        );
        let mut wrong_sa = c;
        wrong_sa[1] = 0x11;
        assert_eq!(err(ReadCapacity16::parse(&wrong_sa)), BAD);
        let mut lba = c;
        lba[9] = 1;
        assert_eq!(err(ReadCapacity16::parse(&lba)), BAD);
        assert_eq!(err(ReadCapacity16::parse(&c[..12])), BAD);
    }

    #[test]
    fn report_luns() {
        let mut c = [0u8; 12];
        c[0] = 0xa0;
        c[9] = 16;
        assert_eq!(
            ReportLuns::parse(&c),
            Ok(ReportLuns {
                select_report: 0,
                alloc_len: 16
            })
        );
        c[2] = 0x03;
        assert_eq!(err(ReportLuns::parse(&c)), BAD);
        assert_eq!(err(ReportLuns::parse(&c[..10])), BAD);
    }
}
