//! Mode parameters (SPC-4 §7.5, SBC-3 §6.4): the mode parameter header,
//! the block descriptor and the pages this disk has - Read-Write Error
//! Recovery (01h), Caching (08h) and Control (0Ah). Only WCE in the caching
//! page is changeable, and nothing can be saved.

use crate::cdb::PageControl;
use crate::sense::Sense;

pub const PAGE_RW_ERROR_RECOVERY: u8 = 0x01;
pub const PAGE_CACHING: u8 = 0x08;
pub const PAGE_CONTROL: u8 = 0x0a;
pub const PAGE_ALL: u8 = 0x3f;

/// Pages in the order MODE SENSE returns them for "all pages".
const PAGES: [u8; 3] = [PAGE_RW_ERROR_RECOVERY, PAGE_CACHING, PAGE_CONTROL];

/// WCE bit in byte 2 of the caching page.
const WCE: u8 = 0x04;

/// Device-specific parameter byte: WP (write protected).
const DEVSPEC_WP: u8 = 0x80;
/// Device-specific parameter byte: DPOFUA (DPO and FUA are supported).
const DEVSPEC_DPOFUA: u8 = 0x10;

/// MODE SENSE(6) or MODE SENSE(10).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Six,
    /// With LLBAA: long (16-byte) block descriptor.
    Ten {
        llbaa: bool,
    },
}

/// The state mode parameters describe.
#[derive(Debug, Clone, Copy)]
pub struct ModeState {
    pub wce: bool,
    pub read_only: bool,
    pub block_size: u32,
    pub capacity_blocks: u64,
}

/// One page as MODE SENSE returns it, for page control `pc`.
fn page(code: u8, pc: PageControl, wce: bool) -> Option<Vec<u8>> {
    let changeable = pc == PageControl::Changeable;
    let mut p = match code {
        PAGE_RW_ERROR_RECOVERY => {
            let mut p = vec![0u8; 12];
            if !changeable {
                // AWRE | ARRE: automatic reallocation (nothing to do for us,
                // but what a disk reports).
                p[2] = 0xc0;
            }
            p
        }
        PAGE_CACHING => {
            let mut p = vec![0u8; 20];
            p[2] = match pc {
                PageControl::Changeable => WCE,
                PageControl::Current if !wce => 0,
                // Default (and current with the cache on): write back.
                _ => WCE,
            };
            p
        }
        PAGE_CONTROL => {
            let mut p = vec![0u8; 12];
            if !changeable {
                // QUEUE ALGORITHM MODIFIER 1: unrestricted reordering.
                p[3] = 0x10;
                // BUSY TIMEOUT PERIOD: unlimited.
                p[8..10].copy_from_slice(&[0xff, 0xff]);
            }
            p
        }
        _ => return None,
    };
    p[0] = code;
    p[1] = (p.len() - 2) as u8;
    Some(p)
}

/// The MODE SENSE response (before allocation-length truncation).
pub fn mode_sense(
    st: &ModeState,
    form: Form,
    dbd: bool,
    pc: PageControl,
    page_code: u8,
    subpage: u8,
) -> Result<Vec<u8>, Sense> {
    if pc == PageControl::Saved {
        return Err(Sense::saving_params_not_supported());
    }
    // Subpage 00h, or FFh ("all subpages": these pages have none).
    if subpage != 0x00 && subpage != 0xff {
        return Err(Sense::invalid_field_in_cdb());
    }
    let mut pages = Vec::new();
    if page_code == PAGE_ALL {
        for code in PAGES {
            pages.extend(page(code, pc, st.wce).unwrap_or_default());
        }
    } else {
        pages = page(page_code, pc, st.wce).ok_or_else(Sense::invalid_field_in_cdb)?;
    }

    let changeable = pc == PageControl::Changeable;
    let long = matches!(form, Form::Ten { llbaa: true });
    let desc = if dbd {
        Vec::new()
    } else if long {
        let mut d = vec![0u8; 16];
        if !changeable {
            d[0..8].copy_from_slice(&st.capacity_blocks.to_be_bytes());
            d[12..16].copy_from_slice(&st.block_size.to_be_bytes());
        }
        d
    } else {
        // Short LBA mode parameter block descriptor (SBC-3 §6.4.2).
        let mut d = vec![0u8; 8];
        if !changeable {
            let n = u32::try_from(st.capacity_blocks).unwrap_or(u32::MAX);
            d[0..4].copy_from_slice(&n.to_be_bytes());
            d[5..8].copy_from_slice(&st.block_size.to_be_bytes()[1..4]);
        }
        d
    };
    let devspec = if changeable {
        0
    } else {
        DEVSPEC_DPOFUA | if st.read_only { DEVSPEC_WP } else { 0 }
    };

    let mut out = Vec::new();
    match form {
        Form::Six => {
            out.extend_from_slice(&[0, 0, devspec, desc.len() as u8]);
            out.extend(desc);
            out.extend(pages);
            // MODE DATA LENGTH excludes itself.
            out[0] = u8::try_from(out.len() - 1).map_err(|_| Sense::invalid_field_in_cdb())?;
        }
        Form::Ten { .. } => {
            out.extend_from_slice(&[0, 0, 0, devspec, u8::from(long && !dbd), 0]);
            out.extend_from_slice(&(desc.len() as u16).to_be_bytes());
            out.extend(desc);
            out.extend(pages);
            let n = u16::try_from(out.len() - 2).map_err(|_| Sense::invalid_field_in_cdb())?;
            out[0..2].copy_from_slice(&n.to_be_bytes());
        }
    }
    Ok(out)
}

/// What a valid MODE SELECT parameter list asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ModeSelectChanges {
    /// New WCE value, when the list carries a caching page.
    pub wce: Option<bool>,
}

/// Validates a MODE SELECT parameter list against the current state. Fields
/// that are not changeable must hold their current value; only WCE may
/// differ. Nothing is applied here: the caller applies the result only when
/// the whole list is valid.
pub fn mode_select(st: &ModeState, ten: bool, data: &[u8]) -> Result<ModeSelectChanges, Sense> {
    let mut changes = ModeSelectChanges::default();
    if data.is_empty() {
        return Ok(changes);
    }
    let hdr_len = if ten { 8 } else { 4 };
    let hdr = data
        .get(..hdr_len)
        .ok_or_else(Sense::param_list_length_error)?;
    let (medium_type, long, bd_len) = if ten {
        (
            hdr[2],
            hdr[4] & 0x01 != 0,
            usize::from(u16::from_be_bytes([hdr[6], hdr[7]])),
        )
    } else {
        (hdr[1], false, usize::from(hdr[3]))
    };
    if medium_type != 0 {
        return Err(Sense::invalid_field_in_param_list());
    }
    let desc_size = if long { 16 } else { 8 };
    if bd_len % desc_size != 0 || bd_len > desc_size {
        return Err(Sense::invalid_field_in_param_list());
    }
    let descs = data
        .get(hdr_len..hdr_len + bd_len)
        .ok_or_else(Sense::param_list_length_error)?;
    if let Some(d) = descs.get(..desc_size) {
        // The block length must stay what it is (no FORMAT UNIT here); a
        // zero block length means "unchanged".
        let bl = if long {
            u32::from_be_bytes([d[12], d[13], d[14], d[15]])
        } else {
            u32::from_be_bytes([0, d[5], d[6], d[7]])
        };
        if bl != 0 && bl != st.block_size {
            return Err(Sense::invalid_field_in_param_list());
        }
    }

    let mut rest = data.get(hdr_len + bd_len..).unwrap_or(&[]);
    while !rest.is_empty() {
        let (&b0, &len) = match rest {
            [b0, len, ..] => (b0, len),
            _ => return Err(Sense::param_list_length_error()),
        };
        // SPF (subpage format): none of our pages has subpages.
        if b0 & 0x40 != 0 {
            return Err(Sense::invalid_field_in_param_list());
        }
        let code = b0 & 0x3f;
        let total = usize::from(len) + 2;
        let sent = rest
            .get(..total)
            .ok_or_else(Sense::param_list_length_error)?;
        let current = page(code, PageControl::Current, st.wce)
            .ok_or_else(Sense::invalid_field_in_param_list)?;
        if sent.len() != current.len() {
            return Err(Sense::invalid_field_in_param_list());
        }
        // PS (bit 7 of byte 0) is reserved in MODE SELECT: ignore it.
        let differs = |i: usize, mask: u8| -> bool {
            let s = sent.get(i).copied().unwrap_or(0);
            let c = current.get(i).copied().unwrap_or(0);
            (s ^ c) & mask != 0
        };
        for i in 1..sent.len() {
            let mask = if code == PAGE_CACHING && i == 2 {
                !WCE
            } else {
                0xff
            };
            if differs(i, mask) {
                return Err(Sense::invalid_field_in_param_list());
            }
        }
        if code == PAGE_CACHING {
            changes.wce = Some(sent.get(2).is_some_and(|b| b & WCE != 0));
        }
        rest = rest.get(total..).unwrap_or(&[]);
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(wce: bool, ro: bool) -> ModeState {
        ModeState {
            wce,
            read_only: ro,
            block_size: 512,
            capacity_blocks: 2048,
        }
    }

    #[test]
    fn all_pages_six() {
        let d = mode_sense(
            &st(true, false),
            Form::Six,
            false,
            PageControl::Current,
            0x3f,
            0,
        )
        .unwrap();
        assert_eq!(usize::from(d[0]) + 1, d.len());
        assert_eq!(d[2], DEVSPEC_DPOFUA);
        assert_eq!(d[3], 8);
        assert_eq!(u32::from_be_bytes(d[4..8].try_into().unwrap()), 2048);
        assert_eq!(&d[9..12], &[0, 2, 0]);
        // Pages follow: 01h (12), 08h (20), 0Ah (12).
        assert_eq!(d[12], 0x01);
        assert_eq!(d[24], 0x08);
        assert_eq!(d[26] & WCE, WCE);
        assert_eq!(d[44], 0x0a);
        assert_eq!(d.len(), 12 + 12 + 20 + 12);
    }

    #[test]
    fn write_protect_and_dbd() {
        let d = mode_sense(
            &st(false, true),
            Form::Six,
            true,
            PageControl::Current,
            0x08,
            0,
        )
        .unwrap();
        assert_eq!(d[2] & DEVSPEC_WP, DEVSPEC_WP);
        assert_eq!(d[3], 0);
        assert_eq!(d[4], 0x08);
        assert_eq!(d[5], 0x12);
        assert_eq!(d[6] & WCE, 0);
        assert_eq!(d.len(), 4 + 20);
    }

    #[test]
    fn ten_with_long_descriptor() {
        let d = mode_sense(
            &st(true, false),
            Form::Ten { llbaa: true },
            false,
            PageControl::Current,
            0x0a,
            0,
        )
        .unwrap();
        assert_eq!(usize::from(u16::from_be_bytes([d[0], d[1]])) + 2, d.len());
        assert_eq!(d[4] & 1, 1);
        assert_eq!(u16::from_be_bytes([d[6], d[7]]), 16);
        assert_eq!(u64::from_be_bytes(d[8..16].try_into().unwrap()), 2048);
        assert_eq!(u32::from_be_bytes(d[20..24].try_into().unwrap()), 512);
        assert_eq!(d[24], 0x0a);
        assert_eq!(d.len(), 8 + 16 + 12);
    }

    #[test]
    fn changeable_shows_only_wce() {
        let d = mode_sense(
            &st(true, false),
            Form::Six,
            true,
            PageControl::Changeable,
            0x3f,
            0,
        )
        .unwrap();
        // 01h page: nothing changeable.
        assert!(d[6..16].iter().all(|&b| b == 0));
        assert_eq!(d[16 + 2], WCE);
        assert!(d[16 + 3..16 + 20].iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_requests() {
        let s = st(true, false);
        assert_eq!(
            mode_sense(&s, Form::Six, false, PageControl::Saved, 0x08, 0),
            Err(Sense::saving_params_not_supported())
        );
        assert_eq!(
            mode_sense(&s, Form::Six, false, PageControl::Current, 0x1c, 0),
            Err(Sense::invalid_field_in_cdb())
        );
        assert_eq!(
            mode_sense(&s, Form::Six, false, PageControl::Current, 0x08, 1),
            Err(Sense::invalid_field_in_cdb())
        );
        assert!(mode_sense(&s, Form::Six, false, PageControl::Current, 0x3f, 0xff).is_ok());
        assert!(mode_sense(&s, Form::Six, false, PageControl::Default, 0x08, 0).is_ok());
    }

    /// A MODE SELECT(6) list built from MODE SENSE(6) output, as Linux does.
    fn select_list_from_sense(s: &ModeState, page: u8, wce: bool) -> Vec<u8> {
        let mut d = mode_sense(s, Form::Six, false, PageControl::Current, page, 0).unwrap();
        d[0] = 0;
        d[2] = 0;
        if page == PAGE_CACHING {
            let p = 4 + 8 + 2;
            d[p] = (d[p] & !WCE) | if wce { WCE } else { 0 };
        }
        d
    }

    #[test]
    fn select_caching_wce() {
        let s = st(true, false);
        let l = select_list_from_sense(&s, PAGE_CACHING, false);
        assert_eq!(
            mode_select(&s, false, &l),
            Ok(ModeSelectChanges { wce: Some(false) })
        );
        // Other pages may be sent back unchanged.
        let l = select_list_from_sense(&s, PAGE_CONTROL, false);
        assert_eq!(
            mode_select(&s, false, &l),
            Ok(ModeSelectChanges { wce: None })
        );
        assert_eq!(
            mode_select(&s, false, &[]),
            Ok(ModeSelectChanges { wce: None })
        );
    }

    #[test]
    fn select_ten() {
        let s = st(false, false);
        let mut d = mode_sense(
            &s,
            Form::Ten { llbaa: false },
            true,
            PageControl::Current,
            8,
            0,
        )
        .unwrap();
        d[0] = 0;
        d[1] = 0;
        d[3] = 0;
        d[8 + 2] |= WCE;
        assert_eq!(
            mode_select(&s, true, &d),
            Ok(ModeSelectChanges { wce: Some(true) })
        );
    }

    #[test]
    fn select_rejections() {
        let s = st(true, false);
        let good = select_list_from_sense(&s, PAGE_CACHING, true);
        // Non-changeable bit changed (RCD).
        let mut l = good.clone();
        l[4 + 8 + 2] |= 0x01;
        assert_eq!(
            mode_select(&s, false, &l),
            Err(Sense::invalid_field_in_param_list())
        );
        // Truncated page.
        assert_eq!(
            mode_select(&s, false, &good[..good.len() - 3]),
            Err(Sense::param_list_length_error())
        );
        // Truncated header.
        assert_eq!(
            mode_select(&s, false, &good[..3]),
            Err(Sense::param_list_length_error())
        );
        // Wrong block length in the descriptor.
        let mut l = good.clone();
        l[4 + 6] = 0x10;
        assert_eq!(
            mode_select(&s, false, &l),
            Err(Sense::invalid_field_in_param_list())
        );
        // Unknown page.
        let l = [0u8, 0, 0, 0, 0x1c, 2, 0, 0];
        assert_eq!(
            mode_select(&s, false, &l),
            Err(Sense::invalid_field_in_param_list())
        );
        // Subpage format.
        let l = [0u8, 0, 0, 0, 0x48, 2, 0, 0];
        assert_eq!(
            mode_select(&s, false, &l),
            Err(Sense::invalid_field_in_param_list())
        );
        // Wrong page length.
        let l = [0u8, 0, 0, 0, 0x08, 2, 0, 0];
        assert_eq!(
            mode_select(&s, false, &l),
            Err(Sense::invalid_field_in_param_list())
        );
        // Medium type.
        let l = [0u8, 1, 0, 0];
        assert_eq!(
            mode_select(&s, false, &l),
            Err(Sense::invalid_field_in_param_list())
        );
        // Block descriptor length not a descriptor multiple.
        let l = [0u8, 0, 0, 4, 0, 0, 0, 0];
        assert_eq!(
            mode_select(&s, false, &l),
            Err(Sense::invalid_field_in_param_list())
        );
        // A lone page byte.
        let l = [0u8, 0, 0, 0, 0x08];
        assert_eq!(
            mode_select(&s, false, &l),
            Err(Sense::param_list_length_error())
        );
    }
}
