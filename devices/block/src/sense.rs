//! SCSI sense data (SPC-4 §4.5): the key/ASC/ASCQ triple a target reports
//! after CHECK CONDITION, and its fixed-format (response code 70h) encoding.

use std::fmt;

/// Sense keys (SPC-4 table 48) used by this target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum SenseKey {
    NoSense = 0x0,
    RecoveredError = 0x1,
    NotReady = 0x2,
    MediumError = 0x3,
    HardwareError = 0x4,
    IllegalRequest = 0x5,
    UnitAttention = 0x6,
    DataProtect = 0x7,
    AbortedCommand = 0xb,
    Miscompare = 0xe,
}

/// Length of fixed-format sense data as this target returns it.
pub const FIXED_SENSE_LEN: usize = 18;

/// One sense condition: key, additional sense code and qualifier, plus the
/// optional INFORMATION field (the first failing LBA for medium errors).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    pub key: SenseKey,
    pub asc: u8,
    pub ascq: u8,
    /// INFORMATION field; sets the VALID bit when present. Only the low 32
    /// bits fit in fixed format: larger values are not reported.
    pub info: Option<u64>,
}

impl Sense {
    pub const fn new(key: SenseKey, asc: u8, ascq: u8) -> Self {
        Sense {
            key,
            asc,
            ascq,
            info: None,
        }
    }

    /// Same condition with the INFORMATION field set.
    pub const fn with_info(mut self, info: u64) -> Self {
        self.info = Some(info);
        self
    }

    /// NO SENSE / NO ADDITIONAL SENSE INFORMATION (00h/00h).
    pub const fn no_sense() -> Self {
        Self::new(SenseKey::NoSense, 0x00, 0x00)
    }

    /// ILLEGAL REQUEST / INVALID COMMAND OPERATION CODE (20h/00h).
    pub const fn invalid_opcode() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x20, 0x00)
    }

    /// ILLEGAL REQUEST / LOGICAL BLOCK ADDRESS OUT OF RANGE (21h/00h).
    pub const fn lba_out_of_range() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x21, 0x00)
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN CDB (24h/00h).
    pub const fn invalid_field_in_cdb() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x24, 0x00)
    }

    /// ILLEGAL REQUEST / LOGICAL UNIT NOT SUPPORTED (25h/00h).
    pub const fn lun_not_supported() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x25, 0x00)
    }

    /// ILLEGAL REQUEST / INVALID FIELD IN PARAMETER LIST (26h/00h).
    pub const fn invalid_field_in_param_list() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x26, 0x00)
    }

    /// ILLEGAL REQUEST / PARAMETER LIST LENGTH ERROR (1Ah/00h).
    pub const fn param_list_length_error() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x1a, 0x00)
    }

    /// ILLEGAL REQUEST / SAVING PARAMETERS NOT SUPPORTED (39h/00h).
    pub const fn saving_params_not_supported() -> Self {
        Self::new(SenseKey::IllegalRequest, 0x39, 0x00)
    }

    /// DATA PROTECT / WRITE PROTECTED (27h/00h).
    pub const fn write_protected() -> Self {
        Self::new(SenseKey::DataProtect, 0x27, 0x00)
    }

    /// MEDIUM ERROR / UNRECOVERED READ ERROR (11h/00h).
    pub const fn unrecovered_read_error() -> Self {
        Self::new(SenseKey::MediumError, 0x11, 0x00)
    }

    /// MEDIUM ERROR / WRITE ERROR (0Ch/00h).
    pub const fn write_error() -> Self {
        Self::new(SenseKey::MediumError, 0x0c, 0x00)
    }

    /// A failed cache flush: data the initiator wrote did not reach the
    /// medium, so MEDIUM ERROR / WRITE ERROR (0Ch/00h) as well.
    pub const fn flush_error() -> Self {
        Self::write_error()
    }

    /// MISCOMPARE / MISCOMPARE DURING VERIFY OPERATION (1Dh/00h).
    pub const fn miscompare() -> Self {
        Self::new(SenseKey::Miscompare, 0x1d, 0x00)
    }

    /// ABORTED COMMAND / DATA PHASE ERROR (4Bh/00h): the initiator sent
    /// fewer data-out bytes than the command needs.
    pub const fn data_phase_error() -> Self {
        Self::new(SenseKey::AbortedCommand, 0x4b, 0x00)
    }

    /// UNIT ATTENTION / POWER ON, RESET, OR BUS DEVICE RESET OCCURRED (29h/00h).
    pub const fn power_on_reset() -> Self {
        Self::new(SenseKey::UnitAttention, 0x29, 0x00)
    }

    /// UNIT ATTENTION / CAPACITY DATA HAS CHANGED (2Ah/09h).
    pub const fn capacity_changed() -> Self {
        Self::new(SenseKey::UnitAttention, 0x2a, 0x09)
    }

    /// UNIT ATTENTION / MODE PARAMETERS CHANGED (2Ah/01h).
    pub const fn mode_parameters_changed() -> Self {
        Self::new(SenseKey::UnitAttention, 0x2a, 0x01)
    }

    pub fn is_unit_attention(&self) -> bool {
        self.key == SenseKey::UnitAttention
    }

    /// Fixed-format sense data, current error (response code 70h), 18 bytes.
    pub fn to_fixed(&self) -> [u8; FIXED_SENSE_LEN] {
        let mut b = [0u8; FIXED_SENSE_LEN];
        b[0] = 0x70;
        if let Some(info) = self.info.and_then(|i| u32::try_from(i).ok()) {
            b[0] |= 0x80; // VALID: the INFORMATION field is meaningful
            b[3..7].copy_from_slice(&info.to_be_bytes());
        }
        b[2] = self.key as u8;
        // ADDITIONAL SENSE LENGTH: bytes 8..18.
        b[7] = (FIXED_SENSE_LEN - 8) as u8;
        b[12] = self.asc;
        b[13] = self.ascq;
        b
    }
}

impl Default for Sense {
    fn default() -> Self {
        Self::no_sense()
    }
}

impl fmt::Display for Sense {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?} {:02x}h/{:02x}h", self.key, self.asc, self.ascq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_format_layout() {
        let b = Sense::lba_out_of_range().to_fixed();
        assert_eq!(b[0], 0x70);
        assert_eq!(b[2], 0x05);
        assert_eq!(b[7], 10);
        assert_eq!(b[12], 0x21);
        assert_eq!(b[13], 0x00);
        assert_eq!(&b[3..7], &[0, 0, 0, 0]);
    }

    #[test]
    fn info_sets_valid_bit() {
        let b = Sense::unrecovered_read_error().with_info(0x1234).to_fixed();
        assert_eq!(b[0], 0xf0);
        assert_eq!(b[2], 0x03);
        assert_eq!(&b[3..7], &[0, 0, 0x12, 0x34]);
        assert_eq!(b[12], 0x11);
    }

    #[test]
    fn info_too_large_is_omitted() {
        let b = Sense::write_error().with_info(1 << 40).to_fixed();
        assert_eq!(b[0], 0x70);
        assert_eq!(&b[3..7], &[0, 0, 0, 0]);
    }

    #[test]
    fn unit_attentions() {
        let s = Sense::capacity_changed();
        assert!(s.is_unit_attention());
        let b = s.to_fixed();
        assert_eq!((b[2], b[12], b[13]), (0x06, 0x2a, 0x09));
        let b = Sense::power_on_reset().to_fixed();
        assert_eq!((b[2], b[12], b[13]), (0x06, 0x29, 0x00));
        assert!(!Sense::write_protected().is_unit_attention());
        assert_eq!(Sense::write_protected().to_fixed()[2], 0x07);
    }
}
