//! Medium access commands (SBC-3): READ, WRITE, VERIFY, SYNCHRONIZE CACHE,
//! WRITE SAME and UNMAP.

use super::{be, check_control, fixed, require};
use crate::sense::Sense;

/// PROTECT field (bits 7:5 of byte 1): this target has no protection
/// information, so it must be zero.
fn check_no_protect(byte1: u8) -> Result<(), Sense> {
    require(byte1 & 0xe0 == 0)
}

/// READ(6) / WRITE(6) share a layout: 21-bit LBA, 8-bit length where 0 means
/// 256 blocks (SBC-3 §5.15, §5.33).
fn parse_rw6(cdb: &[u8]) -> Result<(u64, u32), Sense> {
    let c = fixed::<6>(cdb)?;
    check_control(c[5])?;
    let lba = be(&[c[1] & 0x1f, c[2], c[3]]);
    let blocks = if c[4] == 0 { 256 } else { u32::from(c[4]) };
    Ok((lba, blocks))
}

/// READ(6): 21-bit LBA, TRANSFER LENGTH 0 means 256 blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Read6 {
    pub lba: u64,
    pub blocks: u32,
}

impl Read6 {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let (lba, blocks) = parse_rw6(cdb)?;
        Ok(Read6 { lba, blocks })
    }
}

/// WRITE(6): 21-bit LBA, TRANSFER LENGTH 0 means 256 blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Write6 {
    pub lba: u64,
    pub blocks: u32,
}

impl Write6 {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let (lba, blocks) = parse_rw6(cdb)?;
        Ok(Write6 { lba, blocks })
    }
}

/// Declares a READ/WRITE(10/12/16) CDB struct. Byte 1 holds RD/WRPROTECT
/// (must be 0), DPO (bit 4) and FUA (bit 3); the LBA and TRANSFER LENGTH
/// sit at the given byte ranges.
macro_rules! rw_cdb {
    ($(#[$m:meta])* $name:ident, $len:literal, lba: $lba:expr, blocks: $blk:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name {
            pub lba: u64,
            /// TRANSFER LENGTH in logical blocks; 0 transfers nothing.
            pub blocks: u32,
            pub dpo: bool,
            pub fua: bool,
        }

        impl $name {
            pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
                let c = fixed::<$len>(cdb)?;
                check_control(c[$len - 1])?;
                check_no_protect(c[1])?;
                let blocks = u32::try_from(be(&c[$blk])).map_err(|_| Sense::invalid_field_in_cdb())?;
                Ok($name {
                    lba: be(&c[$lba]),
                    blocks,
                    dpo: c[1] & 0x10 != 0,
                    fua: c[1] & 0x08 != 0,
                })
            }
        }
    };
}

rw_cdb!(
    /// READ(10) (SBC-3 §5.16).
    Read10, 10, lba: 2..6, blocks: 7..9
);
rw_cdb!(
    /// READ(12) (SBC-3 §5.17).
    Read12, 12, lba: 2..6, blocks: 6..10
);
rw_cdb!(
    /// READ(16) (SBC-3 §5.18).
    Read16, 16, lba: 2..10, blocks: 10..14
);
rw_cdb!(
    /// WRITE(10) (SBC-3 §5.34).
    Write10, 10, lba: 2..6, blocks: 7..9
);
rw_cdb!(
    /// WRITE(12) (SBC-3 §5.35).
    Write12, 12, lba: 2..6, blocks: 6..10
);
rw_cdb!(
    /// WRITE(16) (SBC-3 §5.36).
    Write16, 16, lba: 2..10, blocks: 10..14
);

/// BYTCHK (bits 2:1 of byte 1) of VERIFY and WRITE AND VERIFY, with
/// VRPROTECT/WRPROTECT (bits 7:5) required to be 0. 00b: check the medium
/// only; 01b: compare with data sent by the initiator; 11b (one block
/// compared with every block) is not supported. Returns "compare".
fn parse_bytchk(b: u8) -> Result<bool, Sense> {
    check_no_protect(b)?;
    match (b >> 1) & 0x03 {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Sense::invalid_field_in_cdb()),
    }
}

/// Declares a VERIFY / WRITE AND VERIFY CDB struct: BYTCHK in byte 1, LBA
/// and length at the given byte ranges.
macro_rules! verify_cdb {
    ($(#[$m:meta])* $name:ident, $len:literal, lba: $lba:expr, blocks: $blk:expr) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $name {
            pub lba: u64,
            pub blocks: u32,
            /// Compare with data out (BYTCHK 01b).
            pub bytchk: bool,
        }

        impl $name {
            pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
                let c = fixed::<$len>(cdb)?;
                check_control(c[$len - 1])?;
                let bytchk = parse_bytchk(c[1])?;
                Ok($name {
                    lba: be(&c[$lba]),
                    blocks: be(&c[$blk]) as u32,
                    bytchk,
                })
            }
        }
    };
}

verify_cdb!(
    /// WRITE AND VERIFY(10): a write that reaches the medium before status,
    /// read back and compared with the data when `bytchk`.
    WriteAndVerify10, 10, lba: 2..6, blocks: 7..9
);
verify_cdb!(
    /// WRITE AND VERIFY(16).
    WriteAndVerify16, 16, lba: 2..10, blocks: 10..14
);
verify_cdb!(
    /// VERIFY(10): without BYTCHK, checks that the range is on the medium;
    /// with it, compares the medium with the data sent.
    Verify10, 10, lba: 2..6, blocks: 7..9
);
verify_cdb!(
    /// VERIFY(16).
    Verify16, 16, lba: 2..10, blocks: 10..14
);

/// SYNCHRONIZE CACHE(10). NUMBER OF LOGICAL BLOCKS 0 means "to the end".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynchronizeCache10 {
    pub immed: bool,
    pub lba: u64,
    pub blocks: u32,
}

impl SynchronizeCache10 {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<10>(cdb)?;
        check_control(c[9])?;
        Ok(SynchronizeCache10 {
            immed: c[1] & 0x02 != 0,
            lba: be(&c[2..6]),
            blocks: be(&c[7..9]) as u32,
        })
    }
}

/// SYNCHRONIZE CACHE(16). NUMBER OF LOGICAL BLOCKS 0 means "to the end".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SynchronizeCache16 {
    pub immed: bool,
    pub lba: u64,
    pub blocks: u32,
}

impl SynchronizeCache16 {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<16>(cdb)?;
        check_control(c[15])?;
        Ok(SynchronizeCache16 {
            immed: c[1] & 0x02 != 0,
            lba: be(&c[2..10]),
            blocks: be(&c[10..14]) as u32,
        })
    }
}

/// Byte 1 of WRITE SAME: WRPROTECT must be 0, ANCHOR (bit 4) is not
/// supported, the obsolete PBDATA/LBDATA (bits 2:1) must be 0. Returns UNMAP.
fn parse_write_same_byte1(b: u8) -> Result<bool, Sense> {
    check_no_protect(b)?;
    require(b & 0x16 == 0)?;
    Ok(b & 0x08 != 0)
}

/// WRITE SAME(10): one block of data out, written to every block of the
/// range (or the range unmapped when UNMAP is set and the data is zero).
/// NUMBER OF LOGICAL BLOCKS 0 is refused (WSNZ=1 in the Block Limits page).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSame10 {
    pub unmap: bool,
    pub lba: u64,
    pub blocks: u32,
}

impl WriteSame10 {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<10>(cdb)?;
        check_control(c[9])?;
        let unmap = parse_write_same_byte1(c[1])?;
        let blocks = be(&c[7..9]) as u32;
        require(blocks != 0)?;
        Ok(WriteSame10 {
            unmap,
            lba: be(&c[2..6]),
            blocks,
        })
    }
}

/// WRITE SAME(16). With NDOB (no data-out buffer) the block is all zeros and
/// there is no data-out phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSame16 {
    pub unmap: bool,
    pub ndob: bool,
    pub lba: u64,
    pub blocks: u32,
}

impl WriteSame16 {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<16>(cdb)?;
        check_control(c[15])?;
        let unmap = parse_write_same_byte1(c[1] & !0x01)?;
        let blocks = be(&c[10..14]) as u32;
        require(blocks != 0)?;
        Ok(WriteSame16 {
            unmap,
            ndob: c[1] & 0x01 != 0,
            lba: be(&c[2..10]),
            blocks,
        })
    }
}

/// UNMAP: the block descriptors come in the data-out parameter list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unmap {
    pub param_len: u16,
}

impl Unmap {
    pub fn parse(cdb: &[u8]) -> Result<Self, Sense> {
        let c = fixed::<10>(cdb)?;
        check_control(c[9])?;
        // ANCHOR is not supported.
        require(c[1] & 0x01 == 0)?;
        Ok(Unmap {
            param_len: be(&c[7..9]) as u16,
        })
    }
}

/// One UNMAP block descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnmapDescriptor {
    pub lba: u64,
    pub blocks: u32,
}

impl Unmap {
    /// Parses the UNMAP parameter list (SBC-3 §5.28.2): an 8-byte header
    /// with UNMAP DATA LENGTH and BLOCK DESCRIPTOR DATA LENGTH, then 16-byte
    /// descriptors. An empty list unmaps nothing; a list of 1..7 bytes, or
    /// one whose header claims more than was sent, is a PARAMETER LIST
    /// LENGTH ERROR.
    pub fn parse_params(data: &[u8]) -> Result<Vec<UnmapDescriptor>, Sense> {
        if data.is_empty() {
            return Ok(Vec::new());
        }
        if data.len() < 8 {
            return Err(Sense::param_list_length_error());
        }
        let data_len = be(&data[0..2]) as usize;
        let desc_len = be(&data[2..4]) as usize;
        // The header's lengths must fit in what was sent.
        if data_len.checked_add(2).is_none_or(|n| n > data.len())
            || desc_len.checked_add(8).is_none_or(|n| n > data.len())
        {
            return Err(Sense::param_list_length_error());
        }
        if desc_len % 16 != 0 {
            return Err(Sense::param_list_length_error());
        }
        let descs = data.get(8..8 + desc_len).unwrap_or(&[]);
        Ok(descs
            .chunks_exact(16)
            .map(|d| UnmapDescriptor {
                lba: be(&d[0..8]),
                blocks: be(&d[8..12]) as u32,
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read6_fields() {
        let r = Read6::parse(&[0x08, 0xff, 0x34, 0x56, 0x10, 0]).unwrap();
        // The top 3 bits of byte 1 are not part of the LBA.
        assert_eq!(
            r,
            Read6 {
                lba: 0x1f3456,
                blocks: 16
            }
        );
    }

    #[test]
    fn rw6_zero_length_is_256() {
        assert_eq!(Read6::parse(&[0x08, 0, 0, 0, 0, 0]).unwrap().blocks, 256);
        assert_eq!(Write6::parse(&[0x0a, 0, 0, 1, 0, 0]).unwrap().blocks, 256);
        assert_eq!(Write6::parse(&[0x0a, 0, 0, 1, 0, 0]).unwrap().lba, 1);
    }

    #[test]
    fn rw6_short_and_control() {
        assert_eq!(
            Read6::parse(&[0x08, 0, 0]),
            Err(Sense::invalid_field_in_cdb())
        );
        assert_eq!(
            Write6::parse(&[0x0a, 0, 0, 0, 1, 0x04]),
            Err(Sense::invalid_field_in_cdb())
        );
    }

    #[test]
    fn read10_fields() {
        let r = Read10::parse(&[0x28, 0x18, 0x12, 0x34, 0x56, 0x78, 0, 0xab, 0xcd, 0]).unwrap();
        assert_eq!(
            r,
            Read10 {
                lba: 0x1234_5678,
                blocks: 0xabcd,
                dpo: true,
                fua: true
            }
        );
    }

    #[test]
    fn read10_protect_rejected() {
        assert_eq!(
            Read10::parse(&[0x28, 0x20, 0, 0, 0, 0, 0, 0, 1, 0]),
            Err(Sense::invalid_field_in_cdb())
        );
    }

    #[test]
    fn read10_short() {
        assert_eq!(
            Read10::parse(&[0x28, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(Sense::invalid_field_in_cdb())
        );
    }

    #[test]
    fn read12_and_write12_fields() {
        let c = [0xa8, 0, 0, 0, 1, 0, 0, 1, 0, 0, 0, 0];
        assert_eq!(
            Read12::parse(&c).unwrap(),
            Read12 {
                lba: 256,
                blocks: 65536,
                dpo: false,
                fua: false
            }
        );
        let mut w = c;
        w[0] = 0xaa;
        w[1] = 0x08;
        let w = Write12::parse(&w).unwrap();
        assert!(w.fua);
        assert_eq!(w.blocks, 65536);
        assert_eq!(Read12::parse(&c[..11]), Err(Sense::invalid_field_in_cdb()));
    }

    #[test]
    fn read16_write16_fields() {
        let mut c = [0u8; 16];
        c[0] = 0x88;
        c[2..10].copy_from_slice(&0x0102_0304_0506_0708u64.to_be_bytes());
        c[10..14].copy_from_slice(&0xffff_ffffu32.to_be_bytes());
        let r = Read16::parse(&c).unwrap();
        assert_eq!(r.lba, 0x0102_0304_0506_0708);
        assert_eq!(r.blocks, u32::MAX);
        c[0] = 0x8a;
        c[1] = 0x40;
        assert_eq!(Write16::parse(&c), Err(Sense::invalid_field_in_cdb()));
        c[1] = 0;
        c[15] = 0x04;
        assert_eq!(Write16::parse(&c), Err(Sense::invalid_field_in_cdb()));
        assert_eq!(Write16::parse(&c[..15]), Err(Sense::invalid_field_in_cdb()));
    }

    #[test]
    fn write10_fields() {
        let w = Write10::parse(&[0x2a, 0, 0, 0, 0, 7, 0, 0, 3, 0]).unwrap();
        assert_eq!((w.lba, w.blocks, w.fua), (7, 3, false));
        assert_eq!(
            Write10::parse(&[0x2a, 0xe0, 0, 0, 0, 7, 0, 0, 3, 0]),
            Err(Sense::invalid_field_in_cdb())
        );
    }

    #[test]
    fn verify_fields() {
        let v = Verify10::parse(&[0x2f, 0x10, 0, 0, 0, 9, 0, 0, 2, 0]).unwrap();
        assert_eq!(
            v,
            Verify10 {
                lba: 9,
                blocks: 2,
                bytchk: false
            }
        );
        assert!(
            Verify10::parse(&[0x2f, 0x02, 0, 0, 0, 9, 0, 0, 2, 0])
                .unwrap()
                .bytchk
        );
        // BYTCHK=11b is not supported.
        assert_eq!(
            Verify10::parse(&[0x2f, 0x06, 0, 0, 0, 9, 0, 0, 2, 0]),
            Err(Sense::invalid_field_in_cdb())
        );
        let mut c = [0u8; 16];
        c[0] = 0x8f;
        c[9] = 5;
        c[13] = 1;
        assert_eq!(
            Verify16::parse(&c).unwrap(),
            Verify16 {
                lba: 5,
                blocks: 1,
                bytchk: false
            }
        );
        c[1] = 0x80;
        assert_eq!(Verify16::parse(&c), Err(Sense::invalid_field_in_cdb()));
        assert_eq!(Verify16::parse(&c[..8]), Err(Sense::invalid_field_in_cdb()));
    }

    #[test]
    fn write_and_verify_fields() {
        let w = WriteAndVerify10::parse(&[0x2e, 0x02, 0, 0, 0, 9, 0, 0, 2, 0]).unwrap();
        assert_eq!(
            w,
            WriteAndVerify10 {
                lba: 9,
                blocks: 2,
                bytchk: true
            }
        );
        assert!(
            !WriteAndVerify10::parse(&[0x2e, 0x10, 0, 0, 0, 9, 0, 0, 2, 0])
                .unwrap()
                .bytchk
        );
        assert_eq!(
            WriteAndVerify10::parse(&[0x2e, 0x06, 0, 0, 0, 9, 0, 0, 2, 0]),
            Err(Sense::invalid_field_in_cdb())
        );
        assert_eq!(
            WriteAndVerify10::parse(&[0x2e, 0x20, 0, 0, 0, 9, 0, 0, 2, 0]),
            Err(Sense::invalid_field_in_cdb())
        );
        assert_eq!(
            WriteAndVerify10::parse(&[0x2e, 0, 0, 0]),
            Err(Sense::invalid_field_in_cdb())
        );
        let mut c = [0u8; 16];
        c[0] = 0x8e;
        c[9] = 4;
        c[13] = 1;
        assert_eq!(
            WriteAndVerify16::parse(&c).unwrap(),
            WriteAndVerify16 {
                lba: 4,
                blocks: 1,
                bytchk: false
            }
        );
        assert_eq!(
            WriteAndVerify16::parse(&c[..15]),
            Err(Sense::invalid_field_in_cdb())
        );
    }

    #[test]
    fn sync_cache_fields() {
        let s = SynchronizeCache10::parse(&[0x35, 0x02, 0, 0, 0, 4, 0, 0, 0, 0]).unwrap();
        assert_eq!(
            s,
            SynchronizeCache10 {
                immed: true,
                lba: 4,
                blocks: 0
            }
        );
        let mut c = [0u8; 16];
        c[0] = 0x91;
        c[13] = 8;
        assert_eq!(SynchronizeCache16::parse(&c).unwrap().blocks, 8);
        assert_eq!(
            SynchronizeCache10::parse(&[0x35, 0, 0]),
            Err(Sense::invalid_field_in_cdb())
        );
        assert_eq!(
            SynchronizeCache16::parse(&c[..10]),
            Err(Sense::invalid_field_in_cdb())
        );
    }

    #[test]
    fn write_same_fields() {
        let w = WriteSame10::parse(&[0x41, 0x08, 0, 0, 0, 1, 0, 0, 4, 0]).unwrap();
        assert_eq!(
            w,
            WriteSame10 {
                unmap: true,
                lba: 1,
                blocks: 4
            }
        );
        // Zero blocks (whole medium) is refused: WSNZ=1.
        assert_eq!(
            WriteSame10::parse(&[0x41, 0, 0, 0, 0, 1, 0, 0, 0, 0]),
            Err(Sense::invalid_field_in_cdb())
        );
        // ANCHOR, LBDATA are refused.
        assert_eq!(
            WriteSame10::parse(&[0x41, 0x10, 0, 0, 0, 1, 0, 0, 1, 0]),
            Err(Sense::invalid_field_in_cdb())
        );
        assert_eq!(
            WriteSame10::parse(&[0x41, 0x02, 0, 0, 0, 1, 0, 0, 1, 0]),
            Err(Sense::invalid_field_in_cdb())
        );
        let mut c = [0u8; 16];
        c[0] = 0x93;
        c[1] = 0x09;
        c[9] = 2;
        c[13] = 3;
        assert_eq!(
            WriteSame16::parse(&c).unwrap(),
            WriteSame16 {
                unmap: true,
                ndob: true,
                lba: 2,
                blocks: 3
            }
        );
        assert_eq!(
            WriteSame16::parse(&c[..15]),
            Err(Sense::invalid_field_in_cdb())
        );
    }

    #[test]
    fn unmap_cdb() {
        assert_eq!(
            Unmap::parse(&[0x42, 0, 0, 0, 0, 0, 0, 0, 24, 0]).unwrap(),
            Unmap { param_len: 24 }
        );
        assert_eq!(
            Unmap::parse(&[0x42, 1, 0, 0, 0, 0, 0, 0, 24, 0]),
            Err(Sense::invalid_field_in_cdb())
        );
        assert_eq!(Unmap::parse(&[0x42, 0]), Err(Sense::invalid_field_in_cdb()));
    }

    fn unmap_list(descs: &[(u64, u32)]) -> Vec<u8> {
        let mut v = vec![0u8; 8];
        let dl = (descs.len() * 16) as u16;
        v[0..2].copy_from_slice(&(dl + 6).to_be_bytes());
        v[2..4].copy_from_slice(&dl.to_be_bytes());
        for &(lba, n) in descs {
            v.extend_from_slice(&lba.to_be_bytes());
            v.extend_from_slice(&n.to_be_bytes());
            v.extend_from_slice(&[0; 4]);
        }
        v
    }

    #[test]
    fn unmap_params() {
        let v = unmap_list(&[(1, 2), (100, 50)]);
        assert_eq!(
            Unmap::parse_params(&v).unwrap(),
            vec![
                UnmapDescriptor { lba: 1, blocks: 2 },
                UnmapDescriptor {
                    lba: 100,
                    blocks: 50
                }
            ]
        );
        assert!(Unmap::parse_params(&[]).unwrap().is_empty());
        assert_eq!(
            Unmap::parse_params(&[0, 6, 0, 0]),
            Err(Sense::param_list_length_error())
        );
        // A header alone: no descriptors.
        assert!(Unmap::parse_params(&[0, 6, 0, 0, 0, 0, 0, 0])
            .unwrap()
            .is_empty());
        // Header claims more descriptors than were sent.
        let mut bad = v.clone();
        bad.truncate(20);
        assert_eq!(
            Unmap::parse_params(&bad),
            Err(Sense::param_list_length_error())
        );
        // Descriptor length not a multiple of 16.
        let mut odd = v;
        odd[2..4].copy_from_slice(&8u16.to_be_bytes());
        assert_eq!(
            Unmap::parse_params(&odd),
            Err(Sense::param_list_length_error())
        );
    }
}
