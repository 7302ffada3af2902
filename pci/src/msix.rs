//! MSI-X (PCI Local Bus 3.0, section 6.8.2), as one model every function
//! uses: the capability in configuration space ([`add_capability`],
//! [`control`]) and the table and pending-bit array a BAR holds
//! ([`MsixTable`]).
//!
//! The rules kept here, from the specification:
//! - a vector sends its message only while MSI-X is enabled, the function
//!   is not masked (Message Control bit 14) and the vector is not masked
//!   (bit 0 of its Vector Control);
//! - a vector raised while masked sets its pending bit instead, and sends
//!   its message once unmasked (then the bit clears);
//! - while MSI-X is disabled nothing is sent or left pending (the function
//!   uses INTx then);
//! - every vector starts masked, with address and data 0;
//! - the PBA is read-only.
//!
//! Who delivers the message is the caller's business (the VMM turns it
//! into a KVM MSI route), so this is testable alone.

use crate::config_space::{ConfigSpace, LayoutError};

/// The MSI-X capability ID.
pub const CAP_ID_MSIX: u8 = 0x11;
/// Bytes of one table entry: address low, address high, data, vector
/// control.
pub const ENTRY_SIZE: u64 = 16;
/// The most vectors a function can have.
pub const MAX_VECTORS: u16 = 2048;

const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;

/// Where a function's table and PBA are, and how many vectors it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsixLayout {
    pub vectors: u16,
    pub table_bar: u8,
    /// Offset in `table_bar`; a multiple of 8.
    pub table_offset: u32,
    pub pba_bar: u8,
    /// Offset in `pba_bar`; a multiple of 8.
    pub pba_offset: u32,
}

impl MsixLayout {
    /// Bytes of the table.
    pub fn table_size(&self) -> u64 {
        u64::from(self.vectors) * ENTRY_SIZE
    }

    /// Bytes of the PBA (one bit per vector, in whole quadwords).
    pub fn pba_size(&self) -> u64 {
        u64::from(self.vectors).div_ceil(64) * 8
    }

    /// Refuses a layout no function may have: no vectors or too many,
    /// offsets not 8-byte aligned, a BAR index past 5, table and PBA
    /// overlapping in one BAR.
    pub fn check(&self) -> Result<(), String> {
        if self.vectors == 0 || self.vectors > MAX_VECTORS {
            return Err(format!(
                "MSI-X: {} vectors (1 to {MAX_VECTORS})",
                self.vectors
            ));
        }
        if self.table_bar > 5 || self.pba_bar > 5 {
            return Err("MSI-X: a BAR index past 5".into());
        }
        if self.table_offset % 8 != 0 || self.pba_offset % 8 != 0 {
            return Err("MSI-X: table and PBA offsets must be multiples of 8".into());
        }
        let (t, p) = (u64::from(self.table_offset), u64::from(self.pba_offset));
        if self.table_bar == self.pba_bar && t < p + self.pba_size() && p < t + self.table_size() {
            return Err("MSI-X: table and PBA overlap".into());
        }
        Ok(())
    }
}

/// Adds the MSI-X capability for `layout` to `cs`: Message Control with
/// the table size (enable and function mask writable by the guest), then
/// the table's and the PBA's offset and BAR. Returns its offset.
pub fn add_capability(cs: &mut ConfigSpace, layout: &MsixLayout) -> Result<usize, LayoutError> {
    let ctrl = (layout.vectors - 1) & 0x7ff;
    let table = layout.table_offset | u32::from(layout.table_bar);
    let pba = layout.pba_offset | u32::from(layout.pba_bar);
    let mut body = Vec::with_capacity(10);
    body.extend_from_slice(&ctrl.to_le_bytes());
    body.extend_from_slice(&table.to_le_bytes());
    body.extend_from_slice(&pba.to_le_bytes());
    let mut writable = vec![0u8; body.len()];
    writable[1] = ((CTRL_ENABLE | CTRL_FUNCTION_MASK) >> 8) as u8;
    cs.add_capability(CAP_ID_MSIX, &body, &writable)
}

/// Finds the MSI-X capability in the first 256 bytes of a function's
/// configuration space as another process serves it: its offset and
/// layout. `None` without one, or with a list that loops or leaves the
/// space (bounded: at most 48 capabilities).
pub fn find(cfg: &[u8; 256]) -> Option<(usize, MsixLayout)> {
    let ptr = crate::find_capability(cfg, CAP_ID_MSIX)?;
    if ptr + 12 > cfg.len() {
        return None;
    }
    let ctrl = u16::from_le_bytes([cfg[ptr + 2], cfg[ptr + 3]]);
    let word = |o: usize| u32::from_le_bytes([cfg[o], cfg[o + 1], cfg[o + 2], cfg[o + 3]]);
    let (table, pba) = (word(ptr + 4), word(ptr + 8));
    let layout = MsixLayout {
        vectors: (ctrl & 0x7ff) + 1,
        table_bar: (table & 7) as u8,
        table_offset: table & !7,
        pba_bar: (pba & 7) as u8,
        pba_offset: pba & !7,
    };
    layout.check().is_ok().then_some((ptr, layout))
}

/// MSI-X's state in Message Control as the guest set it: `(enabled,
/// function masked)`; `cap` is [`add_capability`]'s offset.
pub fn control(cs: &ConfigSpace, cap: usize) -> (bool, bool) {
    decode_control(cs.read_value(cap + 2, 2) as u16)
}

/// Message Control's `(enabled, function masked)` bits.
pub fn decode_control(ctrl: u16) -> (bool, bool) {
    (ctrl & CTRL_ENABLE != 0, ctrl & CTRL_FUNCTION_MASK != 0)
}

/// `ctrl` (Message Control as read) with its enable and function mask
/// bits set to `enabled` and `function_masked`, the rest kept.
pub fn encode_control(ctrl: u16, enabled: bool, function_masked: bool) -> u16 {
    let mut c = ctrl & !(CTRL_ENABLE | CTRL_FUNCTION_MASK);
    if enabled {
        c |= CTRL_ENABLE;
    }
    if function_masked {
        c |= CTRL_FUNCTION_MASK;
    }
    c
}

/// One message: the address and the data a vector writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsiMessage {
    pub address: u64,
    pub data: u32,
}

/// The table and the pending bits of one function.
#[derive(Clone, Debug)]
pub struct MsixTable {
    layout: MsixLayout,
    /// Per vector: address low, address high, data, vector control.
    entries: Vec<[u32; 4]>,
    pending: Vec<u64>,
}

impl MsixTable {
    /// The power-on table: every vector masked, nothing pending.
    pub fn new(layout: MsixLayout) -> Self {
        let n = usize::from(layout.vectors);
        MsixTable {
            layout,
            entries: vec![[0, 0, 0, VECTOR_MASKED]; n],
            pending: vec![0; n.div_ceil(64)],
        }
    }

    pub fn layout(&self) -> &MsixLayout {
        &self.layout
    }

    /// Back to the power-on state (a function reset).
    pub fn reset(&mut self) {
        *self = MsixTable::new(self.layout);
    }

    /// A read of the table at `offset` (from the table's start); bytes
    /// past the table read 0.
    pub fn read_table(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            let (v, word, byte) = (at / ENTRY_SIZE, (at % ENTRY_SIZE) / 4, at % 4);
            *b = self
                .entries
                .get(v as usize)
                .map_or(0, |e| (e[word as usize] >> (8 * byte)) as u8);
        }
    }

    /// A write to the table. Returns the vectors whose message is due now:
    /// pending ones the write unmasked (with MSI-X enabled and the
    /// function not masked); their pending bits are cleared.
    pub fn write_table(
        &mut self,
        offset: u64,
        data: &[u8],
        enabled: bool,
        function_masked: bool,
    ) -> Vec<(u16, MsiMessage)> {
        let mut touched = Vec::new();
        for (i, &b) in data.iter().enumerate() {
            let at = offset + i as u64;
            let (v, word, byte) = (at / ENTRY_SIZE, (at % ENTRY_SIZE) / 4, at % 4);
            let Some(e) = self.entries.get_mut(v as usize) else {
                continue;
            };
            let shift = 8 * byte;
            let w = &mut e[word as usize];
            *w = (*w & !(0xff << shift)) | (u32::from(b) << shift);
            if word == 3 {
                // Only the mask bit of Vector Control is writable.
                *w &= VECTOR_MASKED;
                touched.push(v as u16);
            }
        }
        touched.dedup();
        touched
            .into_iter()
            .filter_map(|v| self.take_if_due(v, enabled, function_masked))
            .collect()
    }

    /// A read of the PBA at `offset` (from the PBA's start).
    pub fn read_pba(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            let at = offset + i as u64;
            *b = self
                .pending
                .get((at / 8) as usize)
                .map_or(0, |q| (q >> (8 * (at % 8))) as u8);
        }
    }

    /// The function raises `vector`: its message if it may be sent now;
    /// `None` when masked (the vector is left pending), when MSI-X is
    /// disabled, or for a vector the function does not have.
    pub fn signal(
        &mut self,
        vector: u16,
        enabled: bool,
        function_masked: bool,
    ) -> Option<MsiMessage> {
        if !enabled || vector >= self.layout.vectors {
            return None;
        }
        if function_masked || self.masked(vector) {
            self.pending[usize::from(vector / 64)] |= 1 << (vector % 64);
            return None;
        }
        Some(self.message(vector))
    }

    /// After Message Control changed (enable, function mask): the pending
    /// vectors whose message is due now, their bits cleared.
    pub fn due(&mut self, enabled: bool, function_masked: bool) -> Vec<(u16, MsiMessage)> {
        (0..self.layout.vectors)
            .filter_map(|v| self.take_if_due(v, enabled, function_masked))
            .collect()
    }

    /// Whether `vector` is masked in its Vector Control.
    pub fn masked(&self, vector: u16) -> bool {
        self.entries
            .get(usize::from(vector))
            .is_none_or(|e| e[3] & VECTOR_MASKED != 0)
    }

    /// Whether `vector`'s pending bit is set.
    pub fn is_pending(&self, vector: u16) -> bool {
        self.pending
            .get(usize::from(vector / 64))
            .is_some_and(|q| q & (1 << (vector % 64)) != 0)
    }

    /// The message `vector` sends, as the guest programmed it.
    pub fn message(&self, vector: u16) -> MsiMessage {
        let e = self
            .entries
            .get(usize::from(vector))
            .copied()
            .unwrap_or_default();
        MsiMessage {
            address: u64::from(e[0]) | u64::from(e[1]) << 32,
            data: e[2],
        }
    }

    fn take_if_due(
        &mut self,
        v: u16,
        enabled: bool,
        function_masked: bool,
    ) -> Option<(u16, MsiMessage)> {
        if !enabled || function_masked || self.masked(v) || !self.is_pending(v) {
            return None;
        }
        self.pending[usize::from(v / 64)] &= !(1 << (v % 64));
        Some((v, self.message(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config_space::Identity;

    fn layout(vectors: u16) -> MsixLayout {
        MsixLayout {
            vectors,
            table_bar: 1,
            table_offset: 0,
            pba_bar: 1,
            pba_offset: 0x800,
        }
    }

    fn program(t: &mut MsixTable, v: u16, address: u64, data: u32) {
        let base = u64::from(v) * ENTRY_SIZE;
        t.write_table(base, &address.to_le_bytes(), true, false);
        t.write_table(base + 8, &data.to_le_bytes(), true, false);
    }

    fn unmask(t: &mut MsixTable, v: u16, enabled: bool, fmask: bool) -> Vec<(u16, MsiMessage)> {
        t.write_table(
            u64::from(v) * ENTRY_SIZE + 12,
            &[0, 0, 0, 0],
            enabled,
            fmask,
        )
    }

    #[test]
    fn the_capability_says_where_the_table_is_and_the_guest_sets_only_enable_and_mask() {
        let mut cs = ConfigSpace::new(Identity::default());
        let l = layout(3);
        let cap = add_capability(&mut cs, &l).unwrap();
        assert_eq!(cs.read_value(cap, 1), u32::from(CAP_ID_MSIX));
        assert_eq!(cs.read_value(cap + 2, 2), 2, "table size is N-1");
        assert_eq!(cs.read_value(cap + 4, 4), 1, "table at 0 in BAR 1");
        assert_eq!(cs.read_value(cap + 8, 4), 0x801, "PBA at 0x800 in BAR 1");
        assert_eq!(control(&cs, cap), (false, false));
        cs.write_value(cap + 2, 2, 0xffff);
        assert_eq!(
            cs.read_value(cap + 2, 2),
            0xc002,
            "only bits 14 and 15 move"
        );
        assert_eq!(control(&cs, cap), (true, true));
        cs.write_value(cap + 4, 4, 0xffff_ffff);
        assert_eq!(cs.read_value(cap + 4, 4), 1, "offsets are read-only");
    }

    #[test]
    fn layouts_no_function_may_have_are_refused() {
        assert!(layout(3).check().is_ok());
        assert!(layout(0).check().is_err());
        assert!(layout(MAX_VECTORS + 1).check().is_err());
        let overlap = MsixLayout {
            pba_offset: 0x10,
            ..layout(3)
        };
        assert!(overlap.check().unwrap_err().contains("overlap"));
        let odd = MsixLayout {
            table_offset: 4,
            ..layout(3)
        };
        assert!(odd.check().is_err());
    }

    #[test]
    fn vectors_start_masked_and_a_masked_vector_is_left_pending() {
        let mut t = MsixTable::new(layout(3));
        assert!((0..3).all(|v| t.masked(v)));
        program(&mut t, 1, 0xfee0_0000, 0x41);
        assert_eq!(t.signal(1, true, false), None, "masked");
        assert!(t.is_pending(1));
        let mut pba = [0u8; 8];
        t.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 0b10);
        // Unmasking sends it, once, and clears the bit.
        let due = unmask(&mut t, 1, true, false);
        assert_eq!(
            due,
            vec![(
                1,
                MsiMessage {
                    address: 0xfee0_0000,
                    data: 0x41
                }
            )]
        );
        assert!(!t.is_pending(1));
        assert_eq!(
            t.signal(1, true, false),
            Some(MsiMessage {
                address: 0xfee0_0000,
                data: 0x41
            })
        );
        assert!(!t.is_pending(1), "sent at once, never pending");
    }

    #[test]
    fn the_function_mask_holds_every_vector_and_disabled_sends_nothing() {
        let mut t = MsixTable::new(layout(2));
        program(&mut t, 0, 0xfee0_1000, 7);
        assert!(unmask(&mut t, 0, true, true).is_empty(), "nothing pending");
        assert_eq!(t.signal(0, true, true), None);
        assert!(t.is_pending(0));
        assert!(t.due(true, true).is_empty(), "still function-masked");
        assert_eq!(t.due(true, false).len(), 1);
        assert!(t.due(true, false).is_empty(), "sent once");
        // Disabled: not sent, not pending (the function uses INTx).
        assert_eq!(t.signal(0, false, false), None);
        assert!(!t.is_pending(0));
        assert_eq!(t.signal(5, true, false), None, "no such vector");
    }

    #[test]
    fn the_table_reads_back_in_any_width_and_only_the_mask_bit_sticks() {
        let mut t = MsixTable::new(layout(2));
        t.write_table(16, &0x1234_5678_9abc_def0u64.to_le_bytes(), true, false);
        let mut q = [0u8; 8];
        t.read_table(16, &mut q);
        assert_eq!(u64::from_le_bytes(q), 0x1234_5678_9abc_def0);
        let mut b = [0u8; 1];
        t.read_table(17, &mut b);
        assert_eq!(b[0], 0xde);
        t.write_table(28, &0xffff_fffeu32.to_le_bytes(), true, false);
        let mut ctl = [0u8; 4];
        t.read_table(28, &mut ctl);
        assert_eq!(u32::from_le_bytes(ctl), 0, "reserved bits read 0");
        let mut past = [0xaau8; 4];
        t.read_table(1 << 12, &mut past);
        assert_eq!(past, [0; 4]);
        t.reset();
        assert!(t.masked(1));
        assert_eq!(
            t.message(1),
            MsiMessage {
                address: 0,
                data: 0
            }
        );
    }

    #[test]
    fn find_reads_back_what_add_capability_wrote() {
        let mut cs = ConfigSpace::new(crate::Identity {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            class_code: 0x018000,
            revision: 1,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 2,
            interrupt_pin: 1,
        });
        let layout = MsixLayout {
            vectors: 3,
            table_bar: 1,
            table_offset: 0,
            pba_bar: 1,
            pba_offset: 0x1000,
        };
        let cap = add_capability(&mut cs, &layout).unwrap();
        let mut cfg = [0u8; 256];
        for (i, b) in cfg.iter_mut().enumerate() {
            *b = cs.read_value(i, 1) as u8;
        }
        assert_eq!(find(&cfg), Some((cap, layout)));
        // A list that loops is no capability.
        cfg[cap] = 0x09;
        cfg[cap + 1] = cap as u8;
        assert_eq!(find(&cfg), None);
    }
}
