//! MSI (PCI Local Bus 3.0, section 6.8.1), as one model every function
//! uses: the capability in configuration space ([`add_capability`]) and
//! what the guest programmed in it ([`MsiState`]).
//!
//! The capability offered is always the 24-byte form: a 64-bit message
//! address and per-vector masking, so a guest can mask each vector and
//! see what is pending, as with MSI-X. The rules kept here, from the
//! specification:
//! - the function asks for 1, 2, 4, 8, 16 or 32 vectors (Multiple Message
//!   Capable); the guest grants a power of two (Multiple Message Enable),
//!   taken here as at most what was asked;
//! - vector `v` sends the one programmed address with the programmed
//!   data's low bits replaced by `v` (as many bits as vectors granted);
//! - a vector sends only while MSI is enabled, it was granted, and its
//!   Mask Bit is clear; raised while masked it sets its Pending Bit
//!   instead and sends once unmasked;
//! - while MSI is disabled nothing is sent or left pending (the function
//!   uses INTx then), and the Pending Bits register is read-only.
//!
//! Who delivers the message and keeps the pending bits is the caller's
//! business (the VMM: a KVM MSI route and an eventfd per vector), so this
//! is testable alone.

use crate::config_space::{ConfigSpace, LayoutError};
use crate::msix::MsiMessage;

/// The MSI capability ID.
pub const CAP_ID_MSI: u8 = 0x05;
/// Bytes of the capability (header included): control, 64-bit address,
/// data, reserved, mask bits, pending bits.
pub const CAP_LEN: usize = 24;
/// The most vectors a function can ask for.
pub const MAX_VECTORS: u8 = 32;

/// Offsets in the capability.
pub const CONTROL: usize = 2;
pub const ADDRESS_LO: usize = 4;
pub const ADDRESS_HI: usize = 8;
pub const DATA: usize = 12;
pub const MASK: usize = 16;
pub const PENDING: usize = 20;

const CTRL_ENABLE: u16 = 1 << 0;
const CTRL_64BIT: u16 = 1 << 7;
const CTRL_PER_VECTOR_MASK: u16 = 1 << 8;

/// Multiple Message Capable or Enable (a 3-bit log2) for `vectors`.
fn log2(vectors: u8) -> u16 {
    u16::from(vectors.max(1)).trailing_zeros() as u16
}

/// Refuses a vector count no function may ask for.
pub fn check_vectors(vectors: u8) -> Result<(), String> {
    if vectors == 0 || vectors > MAX_VECTORS || !vectors.is_power_of_two() {
        return Err(format!("MSI: {vectors} vectors (1, 2, 4, 8, 16 or 32)"));
    }
    Ok(())
}

/// The capability's bytes after its two-byte header, and which of their
/// bits the guest may write: enable and Multiple Message Enable, the
/// address (dword aligned), the data, the mask bits of the vectors asked
/// for.
pub fn body(vectors: u8) -> (Vec<u8>, Vec<u8>) {
    let ctrl = log2(vectors) << 1 | CTRL_64BIT | CTRL_PER_VECTOR_MASK;
    let mut body = vec![0u8; CAP_LEN - 2];
    body[..2].copy_from_slice(&ctrl.to_le_bytes());
    let mut writable = vec![0u8; CAP_LEN - 2];
    let at = |o: usize| o - 2;
    writable[at(CONTROL)..at(CONTROL) + 2].copy_from_slice(&(CTRL_ENABLE | 0x70).to_le_bytes());
    writable[at(ADDRESS_LO)..at(ADDRESS_LO) + 4].copy_from_slice(&0xffff_fffcu32.to_le_bytes());
    writable[at(ADDRESS_HI)..at(ADDRESS_HI) + 4].fill(0xff);
    writable[at(DATA)..at(DATA) + 2].fill(0xff);
    let mask = if vectors >= 32 {
        u32::MAX
    } else {
        (1u32 << vectors) - 1
    };
    writable[at(MASK)..at(MASK) + 4].copy_from_slice(&mask.to_le_bytes());
    (body, writable)
}

/// Adds the MSI capability asking for `vectors` to `cs`; returns its
/// offset.
pub fn add_capability(cs: &mut ConfigSpace, vectors: u8) -> Result<usize, LayoutError> {
    let (body, writable) = body(vectors);
    cs.add_capability(CAP_ID_MSI, &body, &writable)
}

/// Message Control `ctrl` with the enable bit and Multiple Message Enable
/// set for `granted` vectors (a power of two), the other bits kept.
pub fn encode_control(ctrl: u16, enabled: bool, granted: u8) -> u16 {
    (ctrl & !(CTRL_ENABLE | 0x70)) | log2(granted) << 4 | u16::from(enabled)
}

/// The vectors a capability's Message Control asks for.
pub fn vectors_asked(ctrl: u16) -> u8 {
    1u8 << ((ctrl >> 1) & 7).min(5)
}

/// Finds the MSI capability in the first 256 bytes of a function's
/// configuration space: its offset and the vectors it asks for. `None`
/// without one, with one of another form than [`add_capability`]'s (no
/// 64-bit address or no per-vector masking), or with a list that loops
/// or leaves the space.
pub fn find(cfg: &[u8; 256]) -> Option<(usize, u8)> {
    let cap = crate::find_capability(cfg, CAP_ID_MSI)?;
    if cap + CAP_LEN > cfg.len() {
        return None;
    }
    let ctrl = u16::from_le_bytes([cfg[cap + CONTROL], cfg[cap + CONTROL + 1]]);
    let form = CTRL_64BIT | CTRL_PER_VECTOR_MASK;
    (ctrl & form == form).then(|| (cap, vectors_asked(ctrl)))
}

/// What the guest programmed in the capability.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiState {
    pub enabled: bool,
    /// Vectors granted (Multiple Message Enable, at most those asked).
    pub granted: u8,
    pub address: u64,
    pub data: u16,
    /// Mask Bits: bit `v` masks vector `v`.
    pub mask: u32,
}

impl MsiState {
    /// Decodes the capability's bytes (`cap` as [`CAP_LEN`] bytes from
    /// its header).
    pub fn decode(cap: &[u8]) -> MsiState {
        let b = |o: usize| cap.get(o).copied().unwrap_or(0);
        let u16_at = |o: usize| u16::from_le_bytes([b(o), b(o + 1)]);
        let u32_at = |o: usize| u32::from_le_bytes([b(o), b(o + 1), b(o + 2), b(o + 3)]);
        let ctrl = u16_at(CONTROL);
        let asked = vectors_asked(ctrl);
        let granted = (1u8 << ((ctrl >> 4) & 7).min(5)).min(asked);
        MsiState {
            enabled: ctrl & CTRL_ENABLE != 0,
            granted,
            address: u64::from(u32_at(ADDRESS_LO)) | u64::from(u32_at(ADDRESS_HI)) << 32,
            data: u16_at(DATA),
            mask: u32_at(MASK),
        }
    }

    /// Reads the capability at `cap` from `cs` and decodes it.
    pub fn read(cs: &ConfigSpace, cap: usize) -> MsiState {
        let mut b = [0u8; CAP_LEN];
        cs.read(cap, &mut b);
        Self::decode(&b)
    }

    /// Whether vector `v` sends now (enabled, granted, not masked).
    pub fn live(&self, v: u8) -> bool {
        self.enabled && v < self.granted && self.mask & (1u32 << (v & 31)) == 0
    }

    /// The message of vector `v`: the programmed address, the data with
    /// its low bits (as many as vectors granted) replaced by `v`.
    pub fn message(&self, v: u8) -> MsiMessage {
        let low = u16::from(self.granted.max(1)) - 1;
        MsiMessage {
            address: self.address,
            data: u32::from((self.data & !low) | (u16::from(v) & low)),
        }
    }
}

/// The pending bits of `vectors` vectors as the guest reads them, from
/// whether each is pending.
pub fn pending_bits(pending: impl Iterator<Item = bool>) -> u32 {
    pending
        .take(32)
        .enumerate()
        .fold(0, |acc, (i, p)| acc | (u32::from(p) << i))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Identity;

    fn space(vectors: u8) -> (ConfigSpace, usize) {
        let mut cs = ConfigSpace::new(Identity {
            vendor_id: 0x1234,
            device_id: 0x11,
            class_code: 0xff0000,
            ..Default::default()
        });
        let cap = add_capability(&mut cs, vectors).unwrap();
        (cs, cap)
    }

    #[test]
    fn the_capability_is_found_with_what_it_asks_for() {
        for v in [1u8, 2, 4, 8, 16, 32] {
            let (cs, cap) = space(v);
            let mut cfg = [0u8; 256];
            cs.read(0, &mut cfg);
            assert_eq!(find(&cfg), Some((cap, v)));
            assert_eq!(cfg[cap], CAP_ID_MSI);
            let ctrl = u16::from_le_bytes([cfg[cap + 2], cfg[cap + 3]]);
            assert_eq!(ctrl & 1, 0, "disabled at reset");
            assert_ne!(ctrl & (1 << 7), 0, "64-bit");
            assert_ne!(ctrl & (1 << 8), 0, "per-vector masking");
        }
        assert!(check_vectors(3).is_err());
        assert!(check_vectors(0).is_err());
        assert!(check_vectors(64).is_err());
        assert!(check_vectors(8).is_ok());
    }

    #[test]
    fn the_guest_writes_only_what_the_specification_lets_it() {
        let (mut cs, cap) = space(4);
        // Everything written as ones: Multiple Message Capable and the
        // form bits stay, the address keeps its two low bits clear, mask
        // bits exist only for the 4 vectors asked for, pending is
        // read-only.
        for off in (cap..cap + CAP_LEN).step_by(4) {
            cs.write_value(off, 4, u32::MAX);
        }
        let s = MsiState::read(&cs, cap);
        let ctrl = cs.read_value(cap + CONTROL, 2) as u16;
        assert_eq!(vectors_asked(ctrl), 4);
        assert_eq!(ctrl & 0x0180, 0x0180);
        assert!(s.enabled);
        assert_eq!(s.granted, 4, "a grant past what was asked is clamped");
        assert_eq!(s.address, 0xffff_ffff_ffff_fffc);
        assert_eq!(s.data, 0xffff);
        assert_eq!(s.mask, 0xf);
        assert_eq!(cs.read_value(cap + PENDING, 4), 0);
        assert_eq!(cs.read_value(cap, 1) as u8, CAP_ID_MSI, "the header stays");
    }

    #[test]
    fn each_vector_sends_the_data_with_its_number_in_the_low_bits() {
        let (mut cs, cap) = space(8);
        cs.write_value(cap + ADDRESS_LO, 4, 0xfee0_1000);
        cs.write_value(cap + ADDRESS_HI, 4, 0);
        cs.write_value(cap + DATA, 2, 0x4023);
        // Four of the eight granted (MME = 2), enabled.
        cs.write_value(cap + CONTROL, 2, 1 | 2 << 4);
        let s = MsiState::read(&cs, cap);
        assert_eq!(s.granted, 4);
        assert_eq!(s.message(0).data, 0x4020);
        assert_eq!(s.message(3).data, 0x4023);
        assert_eq!(s.message(1).address, 0xfee0_1000);
        assert!(s.live(3));
        assert!(!s.live(4), "not granted");
        cs.write_value(cap + MASK, 4, 0b0100);
        let s = MsiState::read(&cs, cap);
        assert!(!s.live(2), "masked");
        assert!(s.live(1));
        cs.write_value(cap + CONTROL, 2, 2 << 4);
        assert!(!MsiState::read(&cs, cap).live(1), "disabled");
        // Encoded as the guest wrote it above, the capability bits kept.
        let ctrl = cs.read_value(cap + CONTROL, 2) as u16;
        assert_eq!(encode_control(ctrl, true, 4), ctrl | 1);
        cs.write_value(cap + CONTROL, 2, u32::from(encode_control(ctrl, true, 8)));
        let s = MsiState::read(&cs, cap);
        assert_eq!((s.enabled, s.granted), (true, 8));
        // One vector: the data goes out as programmed.
        let one = MsiState {
            enabled: true,
            granted: 1,
            address: 0xfee0_0000,
            data: 0x4025,
            mask: 0,
        };
        assert_eq!(one.message(0).data, 0x4025);
    }

    #[test]
    fn pending_bits_pack_in_vector_order() {
        assert_eq!(pending_bits([true, false, true].into_iter()), 0b101);
        assert_eq!(pending_bits(std::iter::empty()), 0);
    }
}
