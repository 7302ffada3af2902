//! INQUIRY data: the standard data (SPC-4 §6.6.2) and the vital product data
//! pages a direct-access block device reports (SPC-4 §7.8, SBC-3 §6.6).
//! Builders return the full response; the caller truncates it to the
//! allocation length.

use crate::sense::Sense;

/// T10 vendor identification, 8 bytes, space padded.
pub const VENDOR_ID: &[u8; 8] = b"RUSTVMM ";
/// Product identification, 16 bytes, space padded.
pub const PRODUCT_ID: &[u8; 16] = b"SCSI DISK       ";
/// Product revision level, 4 bytes.
pub const PRODUCT_REV: &[u8; 4] = b"0.1 ";

/// PERIPHERAL QUALIFIER 000b, PERIPHERAL DEVICE TYPE 00h (direct access).
pub const PERIPHERAL_DISK: u8 = 0x00;
/// PERIPHERAL QUALIFIER 011b (no logical unit here), device type 1Fh.
pub const PERIPHERAL_NO_LUN: u8 = 0x7f;

/// VPD pages answered, in ascending order (the Supported VPD Pages list).
pub const SUPPORTED_VPD_PAGES: [u8; 6] = [0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2];

/// Length of standard INQUIRY data returned.
pub const STANDARD_INQUIRY_LEN: usize = 36;

/// What the VPD pages describe.
#[derive(Debug, Clone)]
pub struct VpdInfo<'a> {
    /// Unit serial number: printable ASCII.
    pub serial: &'a str,
    /// 60-bit locally administered identifier for the NAA designator.
    pub naa_id: u64,
    pub block_size: u32,
    pub max_transfer_blocks: u32,
    pub max_write_same_blocks: u64,
    /// Logical block provisioning (UNMAP, WRITE SAME with UNMAP).
    pub unmap: Option<UnmapLimits>,
}

/// Block Limits values for UNMAP.
#[derive(Debug, Clone, Copy)]
pub struct UnmapLimits {
    pub max_lba_count: u32,
    pub max_descriptors: u32,
}

/// Standard INQUIRY data with the given peripheral byte.
pub fn standard(peripheral: u8) -> Vec<u8> {
    let mut d = vec![0u8; STANDARD_INQUIRY_LEN];
    d[0] = peripheral;
    // RMB=0: not removable.
    d[1] = 0x00;
    // VERSION 05h: SPC-3.
    d[2] = 0x05;
    // HISUP | RESPONSE DATA FORMAT 2.
    d[3] = 0x12;
    // ADDITIONAL LENGTH.
    d[4] = (STANDARD_INQUIRY_LEN - 5) as u8;
    // Byte 7: SYNC (parallel SCSI synchronous transfers) | CMDQUE (tagged
    // command queuing).
    d[7] = 0x12;
    d[8..16].copy_from_slice(VENDOR_ID);
    d[16..32].copy_from_slice(PRODUCT_ID);
    d[32..36].copy_from_slice(PRODUCT_REV);
    d
}

/// A VPD page, or INVALID FIELD IN CDB for a page not in
/// [`SUPPORTED_VPD_PAGES`].
pub fn vpd_page(peripheral: u8, page: u8, info: &VpdInfo<'_>) -> Result<Vec<u8>, Sense> {
    let body = match page {
        0x00 => SUPPORTED_VPD_PAGES.to_vec(),
        0x80 => info.serial.as_bytes().to_vec(),
        0x83 => device_identification(info),
        0xb0 => block_limits(info),
        0xb1 => block_device_characteristics(),
        0xb2 => logical_block_provisioning(info),
        _ => return Err(Sense::invalid_field_in_cdb()),
    };
    // Every page body here is far below 64 KiB; clamp anyway.
    let len = u16::try_from(body.len()).unwrap_or(u16::MAX);
    let mut d = Vec::with_capacity(4 + body.len());
    d.push(peripheral);
    d.push(page);
    d.extend_from_slice(&len.to_be_bytes());
    d.extend_from_slice(body.get(..usize::from(len)).unwrap_or(&body));
    Ok(d)
}

/// Device Identification (83h): an NAA locally assigned designator (what
/// Linux uses for the WWN) and a T10 vendor ID designator, both associated
/// with the logical unit.
fn device_identification(info: &VpdInfo<'_>) -> Vec<u8> {
    let mut d = Vec::new();
    // NAA: CODE SET 1 (binary), ASSOCIATION 0 (LU), TYPE 3 (NAA), 8 bytes.
    d.extend_from_slice(&[0x01, 0x03, 0x00, 0x08]);
    let naa = (0x3u64 << 60) | (info.naa_id & 0x0fff_ffff_ffff_ffff);
    d.extend_from_slice(&naa.to_be_bytes());
    // T10 vendor ID: CODE SET 2 (ASCII), TYPE 1; vendor then serial.
    let mut t10 = VENDOR_ID.to_vec();
    t10.extend_from_slice(info.serial.as_bytes());
    t10.truncate(255);
    d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
    d.extend_from_slice(&t10);
    d
}

/// Block Limits (B0h), page length 3Ch.
fn block_limits(info: &VpdInfo<'_>) -> Vec<u8> {
    let mut d = vec![0u8; 0x3c];
    // Offsets below are page offsets minus the 4-byte header.
    // Byte 4: WSNZ - WRITE SAME with NUMBER OF LOGICAL BLOCKS 0 is refused.
    d[0] = 0x01;
    // Bytes 6-7: OPTIMAL TRANSFER LENGTH GRANULARITY: 4 KiB.
    let gran = u16::try_from((4096 / info.block_size.max(1)).max(1)).unwrap_or(1);
    d[2..4].copy_from_slice(&gran.to_be_bytes());
    // Bytes 8-11: MAXIMUM TRANSFER LENGTH.
    d[4..8].copy_from_slice(&info.max_transfer_blocks.to_be_bytes());
    if let Some(u) = info.unmap {
        // Bytes 20-23: MAXIMUM UNMAP LBA COUNT; 24-27: MAXIMUM UNMAP BLOCK
        // DESCRIPTOR COUNT; 28-31: OPTIMAL UNMAP GRANULARITY.
        d[16..20].copy_from_slice(&u.max_lba_count.to_be_bytes());
        d[20..24].copy_from_slice(&u.max_descriptors.to_be_bytes());
        d[24..28].copy_from_slice(&u32::from(gran).to_be_bytes());
    }
    // Bytes 36-43: MAXIMUM WRITE SAME LENGTH.
    d[32..40].copy_from_slice(&info.max_write_same_blocks.to_be_bytes());
    d
}

/// Block Device Characteristics (B1h), page length 3Ch: non-rotating medium.
fn block_device_characteristics() -> Vec<u8> {
    let mut d = vec![0u8; 0x3c];
    // Bytes 4-5: MEDIUM ROTATION RATE 0001h (non-rotating, e.g. solid state).
    d[0..2].copy_from_slice(&1u16.to_be_bytes());
    d
}

/// Logical Block Provisioning (B2h), page length 4.
fn logical_block_provisioning(info: &VpdInfo<'_>) -> Vec<u8> {
    let mut d = vec![0u8; 4];
    if info.unmap.is_some() {
        // Byte 5: LBPU | LBPWS | LBPWS10. LBPRZ stays 0: a host file system
        // without hole punching leaves the old data.
        d[1] = 0x80 | 0x40 | 0x20;
        // Byte 6: PROVISIONING TYPE 010b: thin provisioned.
        d[2] = 0x02;
    }
    d
}

/// 64-bit FNV-1a: a stable, dependency-free hash for deriving identifiers.
pub fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(unmap: bool) -> VpdInfo<'static> {
        VpdInfo {
            serial: "SER123",
            naa_id: 0x0123_4567_89ab_cdef,
            block_size: 512,
            max_transfer_blocks: 16384,
            max_write_same_blocks: 1 << 21,
            unmap: unmap.then_some(UnmapLimits {
                max_lba_count: 1 << 21,
                max_descriptors: 256,
            }),
        }
    }

    #[test]
    fn standard_data() {
        let d = standard(PERIPHERAL_DISK);
        assert_eq!(d.len(), 36);
        assert_eq!(d[0], 0);
        assert_eq!(usize::from(d[4]) + 5, d.len());
        assert_eq!(d[3] & 0x0f, 2);
        assert_eq!(d[7] & 0x02, 0x02);
        assert_eq!(&d[8..16], b"RUSTVMM ");
        assert_eq!(&d[16..32], b"SCSI DISK       ");
        assert_eq!(standard(PERIPHERAL_NO_LUN)[0], 0x7f);
    }

    #[test]
    fn every_supported_page_answers_with_right_length() {
        for unmap in [false, true] {
            let i = info(unmap);
            for &p in &SUPPORTED_VPD_PAGES {
                let d = vpd_page(0, p, &i).unwrap();
                assert_eq!(d[1], p);
                let len = usize::from(u16::from_be_bytes([d[2], d[3]]));
                assert_eq!(len + 4, d.len(), "page {p:#x}");
            }
        }
        assert_eq!(
            vpd_page(0, 0x81, &info(false)),
            Err(Sense::invalid_field_in_cdb())
        );
    }

    #[test]
    fn supported_list_is_sorted_and_self_listing() {
        let d = vpd_page(0, 0, &info(false)).unwrap();
        assert_eq!(&d[4..], &SUPPORTED_VPD_PAGES);
        assert!(SUPPORTED_VPD_PAGES.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn serial_page() {
        let d = vpd_page(0, 0x80, &info(false)).unwrap();
        assert_eq!(&d[4..], b"SER123");
    }

    #[test]
    fn device_identification_designators() {
        let d = vpd_page(0, 0x83, &info(false)).unwrap();
        let body = &d[4..];
        // NAA designator.
        assert_eq!(&body[0..4], &[0x01, 0x03, 0x00, 0x08]);
        assert_eq!(body[4] >> 4, 0x3);
        assert_eq!(
            u64::from_be_bytes(body[4..12].try_into().unwrap()) & 0x0fff_ffff_ffff_ffff,
            0x0123_4567_89ab_cdef
        );
        // T10 vendor ID designator.
        assert_eq!(&body[12..15], &[0x02, 0x01, 0x00]);
        let n = usize::from(body[15]);
        assert_eq!(&body[16..16 + n], b"RUSTVMM SER123");
        assert_eq!(16 + n, body.len());
    }

    #[test]
    fn block_limits_page() {
        let d = vpd_page(0, 0xb0, &info(true)).unwrap();
        assert_eq!(d.len(), 64);
        assert_eq!(d[4] & 1, 1);
        assert_eq!(u16::from_be_bytes([d[6], d[7]]), 8);
        assert_eq!(u32::from_be_bytes(d[8..12].try_into().unwrap()), 16384);
        assert_eq!(u32::from_be_bytes(d[20..24].try_into().unwrap()), 1 << 21);
        assert_eq!(u32::from_be_bytes(d[24..28].try_into().unwrap()), 256);
        assert_eq!(u64::from_be_bytes(d[36..44].try_into().unwrap()), 1 << 21);
        let no = vpd_page(0, 0xb0, &info(false)).unwrap();
        assert_eq!(&no[20..28], &[0; 8]);
    }

    #[test]
    fn characteristics_and_provisioning() {
        let d = vpd_page(0, 0xb1, &info(false)).unwrap();
        assert_eq!(d.len(), 64);
        assert_eq!(u16::from_be_bytes([d[4], d[5]]), 1);
        let p = vpd_page(0, 0xb2, &info(true)).unwrap();
        assert_eq!(p.len(), 8);
        assert_eq!(p[5] & 0xe0, 0xe0);
        assert_eq!(p[6] & 0x07, 2);
        let p = vpd_page(0, 0xb2, &info(false)).unwrap();
        assert_eq!(p[5], 0);
        assert_eq!(p[6], 0);
    }
}
