//! Command descriptor blocks: one typed struct per command, each with its own
//! `parse(&[u8]) -> Result<Self, Sense>`, and [`Command::parse`] to dispatch on
//! the operation code. Parsing validates every field the target does not
//! support (reserved protection fields, NACA/LINK, ...) so that execution only
//! sees commands it can carry out; bounds against the medium (LBA ranges) are
//! checked at execution time, where the capacity is known.

mod control;
mod rw;

pub use control::{
    Inquiry, ModeSelect10, ModeSelect6, ModeSense10, ModeSense6, PageControl, ReadCapacity10,
    ReadCapacity16, ReportLuns, RequestSense, StartStopUnit, TestUnitReady,
};
pub use rw::{
    Read10, Read12, Read16, Read6, SynchronizeCache10, SynchronizeCache16, Unmap, Verify10,
    Verify16, Write10, Write12, Write16, Write6, WriteAndVerify10, WriteAndVerify16, WriteSame10,
    WriteSame16,
};

use crate::sense::Sense;

/// Operation codes this target knows (SPC-4 / SBC-3).
pub mod opcode {
    pub const TEST_UNIT_READY: u8 = 0x00;
    pub const REQUEST_SENSE: u8 = 0x03;
    pub const READ_6: u8 = 0x08;
    pub const WRITE_6: u8 = 0x0a;
    pub const INQUIRY: u8 = 0x12;
    pub const MODE_SELECT_6: u8 = 0x15;
    pub const MODE_SENSE_6: u8 = 0x1a;
    pub const START_STOP_UNIT: u8 = 0x1b;
    pub const READ_CAPACITY_10: u8 = 0x25;
    pub const READ_10: u8 = 0x28;
    pub const WRITE_10: u8 = 0x2a;
    pub const WRITE_AND_VERIFY_10: u8 = 0x2e;
    pub const VERIFY_10: u8 = 0x2f;
    pub const SYNCHRONIZE_CACHE_10: u8 = 0x35;
    pub const WRITE_SAME_10: u8 = 0x41;
    pub const UNMAP: u8 = 0x42;
    pub const MODE_SELECT_10: u8 = 0x55;
    pub const MODE_SENSE_10: u8 = 0x5a;
    pub const READ_16: u8 = 0x88;
    pub const WRITE_16: u8 = 0x8a;
    pub const WRITE_AND_VERIFY_16: u8 = 0x8e;
    pub const VERIFY_16: u8 = 0x8f;
    pub const SYNCHRONIZE_CACHE_16: u8 = 0x91;
    pub const WRITE_SAME_16: u8 = 0x93;
    pub const SERVICE_ACTION_IN_16: u8 = 0x9e;
    pub const REPORT_LUNS: u8 = 0xa0;
    pub const READ_12: u8 = 0xa8;
    pub const WRITE_12: u8 = 0xaa;

    /// Service action of SERVICE ACTION IN(16) for READ CAPACITY(16).
    pub const SAI_READ_CAPACITY_16: u8 = 0x10;
}

/// Length of the CDB that starts with `opcode`, from its group code (SAM):
/// what a controller must collect in the COMMAND phase. Groups 3 (reserved)
/// and 6/7 (vendor specific) have no defined length; `None` for those.
pub fn cdb_length(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

/// True when [`crate::ScsiDisk::execute`] may do blocking I/O for a command
/// with this operation code (reads, writes, verifies, cache flushes, unmapping; also
/// START STOP UNIT, which flushes when stopping, and MODE SELECT, which
/// flushes when the write cache is turned off). A controller runs these on a
/// worker thread; every other command only reports state and is fast.
pub fn may_block(opcode: u8) -> bool {
    use opcode::*;
    matches!(
        opcode,
        READ_6
            | READ_10
            | READ_12
            | READ_16
            | WRITE_6
            | WRITE_10
            | WRITE_12
            | WRITE_16
            | WRITE_AND_VERIFY_10
            | WRITE_AND_VERIFY_16
            | VERIFY_10
            | VERIFY_16
            | SYNCHRONIZE_CACHE_10
            | SYNCHRONIZE_CACHE_16
            | WRITE_SAME_10
            | WRITE_SAME_16
            | UNMAP
            | START_STOP_UNIT
            | MODE_SELECT_6
            | MODE_SELECT_10
    )
}

/// True for a plain READ or WRITE (6, 10, 12, 16): the commands whose
/// time follows their length, which a controller may run at once when
/// they are short (the LSI in a posted write). Not flushes, verifies,
/// WRITE SAME or UNMAP, whose time the disk decides.
pub fn plain_transfer(opcode: u8) -> bool {
    use opcode::*;
    matches!(
        opcode,
        READ_6 | READ_10 | READ_12 | READ_16 | WRITE_6 | WRITE_10 | WRITE_12 | WRITE_16
    )
}

/// A parsed command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    TestUnitReady(TestUnitReady),
    RequestSense(RequestSense),
    Inquiry(Inquiry),
    ModeSense6(ModeSense6),
    ModeSense10(ModeSense10),
    ModeSelect6(ModeSelect6),
    ModeSelect10(ModeSelect10),
    StartStopUnit(StartStopUnit),
    ReadCapacity10(ReadCapacity10),
    ReadCapacity16(ReadCapacity16),
    ReportLuns(ReportLuns),
    Read6(Read6),
    Read10(Read10),
    Read12(Read12),
    Read16(Read16),
    Write6(Write6),
    Write10(Write10),
    Write12(Write12),
    Write16(Write16),
    WriteAndVerify10(WriteAndVerify10),
    WriteAndVerify16(WriteAndVerify16),
    Verify10(Verify10),
    Verify16(Verify16),
    SynchronizeCache10(SynchronizeCache10),
    SynchronizeCache16(SynchronizeCache16),
    WriteSame10(WriteSame10),
    WriteSame16(WriteSame16),
    Unmap(Unmap),
}

impl Command {
    /// Parses a CDB. Unknown operation codes give INVALID COMMAND OPERATION
    /// CODE; a known command with a bad field or a short buffer gives
    /// INVALID FIELD IN CDB.
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        use opcode::*;
        let op = *cdb.first().ok_or_else(Sense::invalid_opcode)?;
        Ok(match op {
            TEST_UNIT_READY => Self::TestUnitReady(TestUnitReady::parse(cdb)?),
            REQUEST_SENSE => Self::RequestSense(RequestSense::parse(cdb)?),
            INQUIRY => Self::Inquiry(Inquiry::parse(cdb)?),
            MODE_SENSE_6 => Self::ModeSense6(ModeSense6::parse(cdb)?),
            MODE_SENSE_10 => Self::ModeSense10(ModeSense10::parse(cdb)?),
            MODE_SELECT_6 => Self::ModeSelect6(ModeSelect6::parse(cdb)?),
            MODE_SELECT_10 => Self::ModeSelect10(ModeSelect10::parse(cdb)?),
            START_STOP_UNIT => Self::StartStopUnit(StartStopUnit::parse(cdb)?),
            READ_CAPACITY_10 => Self::ReadCapacity10(ReadCapacity10::parse(cdb)?),
            SERVICE_ACTION_IN_16 => Self::ReadCapacity16(ReadCapacity16::parse(cdb)?),
            REPORT_LUNS => Self::ReportLuns(ReportLuns::parse(cdb)?),
            READ_6 => Self::Read6(Read6::parse(cdb)?),
            READ_10 => Self::Read10(Read10::parse(cdb)?),
            READ_12 => Self::Read12(Read12::parse(cdb)?),
            READ_16 => Self::Read16(Read16::parse(cdb)?),
            WRITE_6 => Self::Write6(Write6::parse(cdb)?),
            WRITE_10 => Self::Write10(Write10::parse(cdb)?),
            WRITE_12 => Self::Write12(Write12::parse(cdb)?),
            WRITE_16 => Self::Write16(Write16::parse(cdb)?),
            WRITE_AND_VERIFY_10 => Self::WriteAndVerify10(WriteAndVerify10::parse(cdb)?),
            WRITE_AND_VERIFY_16 => Self::WriteAndVerify16(WriteAndVerify16::parse(cdb)?),
            VERIFY_10 => Self::Verify10(Verify10::parse(cdb)?),
            VERIFY_16 => Self::Verify16(Verify16::parse(cdb)?),
            SYNCHRONIZE_CACHE_10 => Self::SynchronizeCache10(SynchronizeCache10::parse(cdb)?),
            SYNCHRONIZE_CACHE_16 => Self::SynchronizeCache16(SynchronizeCache16::parse(cdb)?),
            WRITE_SAME_10 => Self::WriteSame10(WriteSame10::parse(cdb)?),
            WRITE_SAME_16 => Self::WriteSame16(WriteSame16::parse(cdb)?),
            UNMAP => Self::Unmap(Unmap::parse(cdb)?),
            _ => return Err(Sense::invalid_opcode()),
        })
    }
}

/// The first `N` bytes of `cdb` as an array, or INVALID FIELD IN CDB when the
/// buffer is too short. Indexing the array with constants cannot panic.
fn fixed<const N: usize>(cdb: &[u8]) -> Result<&[u8; N], Sense> {
    cdb.get(..N)
        .and_then(|s| <&[u8; N]>::try_from(s).ok())
        .ok_or_else(Sense::invalid_field_in_cdb)
}

/// Big-endian unsigned value of up to 8 bytes.
fn be(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
}

/// Checks the CONTROL byte: NACA (bit 2) and the obsolete LINK (bit 0) are
/// not supported and must be zero.
fn check_control(control: u8) -> Result<(), Sense> {
    if control & 0x05 != 0 {
        return Err(Sense::invalid_field_in_cdb());
    }
    Ok(())
}

/// Returns INVALID FIELD IN CDB unless `cond` holds.
fn require(cond: bool) -> Result<(), Sense> {
    if cond {
        Ok(())
    } else {
        Err(Sense::invalid_field_in_cdb())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_code_lengths() {
        assert_eq!(cdb_length(0x00), Some(6));
        assert_eq!(cdb_length(0x28), Some(10));
        assert_eq!(cdb_length(0x5a), Some(10));
        assert_eq!(cdb_length(0x88), Some(16));
        assert_eq!(cdb_length(0xa8), Some(12));
        assert_eq!(cdb_length(0x7f), None);
        assert_eq!(cdb_length(0xc0), None);
    }

    #[test]
    fn blocking_commands() {
        assert!(may_block(opcode::READ_10));
        assert!(may_block(opcode::SYNCHRONIZE_CACHE_16));
        assert!(may_block(opcode::START_STOP_UNIT));
        assert!(!may_block(opcode::INQUIRY));
        assert!(may_block(opcode::VERIFY_10));
        assert!(!may_block(opcode::TEST_UNIT_READY));
    }

    #[test]
    fn empty_cdb_is_invalid_opcode() {
        assert_eq!(Command::parse(&[]), Err(Sense::invalid_opcode()));
    }

    #[test]
    fn unknown_opcodes() {
        for op in [0x01u8, 0x04, 0x1e, 0x3b, 0xa3, 0xff] {
            assert_eq!(
                Command::parse(&[op, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
                Err(Sense::invalid_opcode()),
                "opcode {op:#x}"
            );
        }
    }

    #[test]
    fn dispatch() {
        assert!(matches!(
            Command::parse(&[0, 0, 0, 0, 0, 0]),
            Ok(Command::TestUnitReady(_))
        ));
        assert!(matches!(
            Command::parse(&[0x28, 0, 0, 0, 0, 1, 0, 0, 8, 0]),
            Ok(Command::Read10(Read10 {
                lba: 1,
                blocks: 8,
                ..
            }))
        ));
        let mut rc16 = [0u8; 16];
        rc16[0] = 0x9e;
        rc16[1] = 0x10;
        rc16[13] = 32;
        assert!(matches!(
            Command::parse(&rc16),
            Ok(Command::ReadCapacity16(_))
        ));
    }

    #[test]
    fn every_known_opcode_rejects_short_buffers() {
        use opcode::*;
        let ops = [
            TEST_UNIT_READY,
            REQUEST_SENSE,
            READ_6,
            WRITE_6,
            INQUIRY,
            MODE_SELECT_6,
            MODE_SENSE_6,
            START_STOP_UNIT,
            READ_CAPACITY_10,
            READ_10,
            WRITE_10,
            VERIFY_10,
            SYNCHRONIZE_CACHE_10,
            WRITE_SAME_10,
            UNMAP,
            MODE_SELECT_10,
            MODE_SENSE_10,
            READ_16,
            WRITE_16,
            WRITE_AND_VERIFY_10,
            WRITE_AND_VERIFY_16,
            VERIFY_16,
            SYNCHRONIZE_CACHE_16,
            WRITE_SAME_16,
            SERVICE_ACTION_IN_16,
            REPORT_LUNS,
            READ_12,
            WRITE_12,
        ];
        for op in ops {
            let len = cdb_length(op).unwrap();
            let mut cdb = vec![0u8; len - 1];
            cdb[0] = op;
            assert_eq!(
                Command::parse(&cdb),
                Err(Sense::invalid_field_in_cdb()),
                "opcode {op:#x}"
            );
        }
    }

    #[test]
    fn naca_and_link_rejected() {
        assert_eq!(
            Command::parse(&[0, 0, 0, 0, 0, 0x04]),
            Err(Sense::invalid_field_in_cdb())
        );
        assert_eq!(
            Command::parse(&[0, 0, 0, 0, 0, 0x01]),
            Err(Sense::invalid_field_in_cdb())
        );
        // Vendor-specific bits of CONTROL are ignored.
        assert!(Command::parse(&[0, 0, 0, 0, 0, 0xc0]).is_ok());
    }

    #[test]
    fn be_helper() {
        assert_eq!(be(&[]), 0);
        assert_eq!(be(&[0x12, 0x34]), 0x1234);
        assert_eq!(be(&[0xff; 8]), u64::MAX);
    }
}
