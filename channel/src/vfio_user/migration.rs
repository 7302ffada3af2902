//! vfio-user migration v2 (the spec's "Migration" and DEVICE_FEATURE;
//! Linux's `include/uapi/linux/vfio.h`; docs/vfio-user-migration.md has
//! the sources): the feature numbers, the device states and the path
//! between two of them, and the features' data. Pure: the server loop
//! ([`super::server`]) and the client ([`super::client`]) use it.

use super::messages::{put32, put64, ParseError, Rd};

/// DEVICE_FEATURE flags: the feature index, and what is asked.
pub const DEVICE_FEATURE_MASK: u32 = 0xffff;
pub const DEVICE_FEATURE_GET: u32 = 1 << 16;
pub const DEVICE_FEATURE_SET: u32 = 1 << 17;
pub const DEVICE_FEATURE_PROBE: u32 = 1 << 18;

/// Feature indices.
pub const FEATURE_MIGRATION: u32 = 1;
pub const FEATURE_MIG_DEVICE_STATE: u32 = 2;
pub const FEATURE_DMA_LOGGING_START: u32 = 6;
pub const FEATURE_DMA_LOGGING_STOP: u32 = 7;
pub const FEATURE_DMA_LOGGING_REPORT: u32 = 8;

/// `FEATURE_MIGRATION` flags.
pub const MIGRATION_STOP_COPY: u64 = 1 << 0;
pub const MIGRATION_P2P: u64 = 1 << 1;
pub const MIGRATION_PRE_COPY: u64 = 1 << 2;

/// A device's migration state (`enum vfio_device_mig_state`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum MigState {
    Error = 0,
    Stop = 1,
    Running = 2,
    StopCopy = 3,
    Resuming = 4,
    RunningP2p = 5,
    PreCopy = 6,
    PreCopyP2p = 7,
}

impl MigState {
    /// All states, by number.
    pub const ALL: [MigState; 8] = [
        MigState::Error,
        MigState::Stop,
        MigState::Running,
        MigState::StopCopy,
        MigState::Resuming,
        MigState::RunningP2p,
        MigState::PreCopy,
        MigState::PreCopyP2p,
    ];

    pub fn from_u32(v: u32) -> Option<MigState> {
        Self::ALL.get(v as usize).copied()
    }

    /// The states that produce migration data.
    pub fn is_saving(self) -> bool {
        matches!(self, MigState::StopCopy | MigState::PreCopy)
    }
}

/// The direct arcs the spec allows ("Direct State Transitions"); the P2P
/// states are not used in vfio-user.
const ARCS: [(MigState, MigState); 9] = [
    (MigState::Running, MigState::Stop),
    (MigState::StopCopy, MigState::Stop),
    (MigState::Resuming, MigState::Stop),
    (MigState::PreCopy, MigState::Running),
    (MigState::Stop, MigState::Running),
    (MigState::Running, MigState::PreCopy),
    (MigState::Stop, MigState::StopCopy),
    (MigState::PreCopy, MigState::StopCopy),
    (MigState::Stop, MigState::Resuming),
];

/// The next state on the way from `from` to `to`: the shortest path over
/// the direct arcs with no saving state (PRE_COPY, STOP_COPY) inside it,
/// without PRE_COPY's arcs unless `pre_copy` (the device offers it).
/// `None` when `to` cannot be reached (ERROR, a P2P state, PRE_COPY not
/// offered, or STOP_COPY → PRE_COPY) or `from == to`.
pub fn next_step(from: MigState, to: MigState, pre_copy: bool) -> Option<MigState> {
    // The spec refuses STOP_COPY -> PRE_COPY outright (libvfio-user's
    // table goes through STOP).
    if from == to || (from, to) == (MigState::StopCopy, MigState::PreCopy) {
        return None;
    }
    let usable = |(a, b): &(MigState, MigState)| {
        pre_copy || (*a != MigState::PreCopy && *b != MigState::PreCopy)
    };
    // Breadth first from `from`, carrying each state's first step.
    let mut frontier = vec![(from, None::<MigState>)];
    let mut seen = vec![from];
    while !frontier.is_empty() {
        let mut next = Vec::new();
        for (state, step) in frontier {
            // A saving state is an end, never a stop on the way.
            if state != from && state.is_saving() && state != to {
                continue;
            }
            for &(a, b) in ARCS.iter().filter(|arc| usable(arc)) {
                if a != state || seen.contains(&b) {
                    continue;
                }
                let s = step.unwrap_or(b);
                if b == to {
                    return Some(s);
                }
                seen.push(b);
                next.push((b, Some(s)));
            }
        }
        frontier = next;
    }
    None
}

/// `FEATURE_MIG_DEVICE_STATE` data (8 bytes): the state, and `data_fd`
/// (unused in vfio-user).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigDeviceState {
    pub device_state: u32,
    pub data_fd: u32,
}

impl MigDeviceState {
    pub const LEN: usize = 8;

    pub fn parse(b: &[u8]) -> Result<MigDeviceState, ParseError> {
        let mut r = exactly(b, "MIG_DEVICE_STATE", Self::LEN)?;
        Ok(MigDeviceState {
            device_state: r.u32()?,
            data_fd: r.u32()?,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put32(out, self.device_state);
        put32(out, self.data_fd);
    }
}

/// One range of `FEATURE_DMA_LOGGING_START`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaRange {
    pub iova: u64,
    pub length: u64,
}

/// `FEATURE_DMA_LOGGING_START` data: 16 bytes, then 16 per range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DmaLoggingStart {
    pub page_size: u64,
    pub ranges: Vec<DmaRange>,
}

impl DmaLoggingStart {
    pub const LEN: usize = 16;

    /// Parses exactly 16 + 16 × `num_ranges` bytes, with at most
    /// `max_ranges` ranges (checked before anything is allocated).
    pub fn parse(b: &[u8], max_ranges: u32) -> Result<DmaLoggingStart, ParseError> {
        let mut r = Rd::new(b, "DMA_LOGGING_START", Self::LEN)?;
        let page_size = r.u64()?;
        let num_ranges = r.u32()?;
        let _reserved = r.u32()?;
        let body = r.rest();
        if num_ranges > max_ranges || body.len() != 16 * num_ranges as usize {
            return Err(ParseError::DataLength {
                what: "DMA_LOGGING_START",
                count: num_ranges,
                got: body.len(),
            });
        }
        let ranges = body
            .chunks_exact(16)
            .map(|c| {
                let mut r = Rd::new(c, "DMA_LOGGING_START range", 16)?;
                Ok(DmaRange {
                    iova: r.u64()?,
                    length: r.u64()?,
                })
            })
            .collect::<Result<_, ParseError>>()?;
        Ok(DmaLoggingStart { page_size, ranges })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put64(out, self.page_size);
        put32(out, self.ranges.len() as u32);
        put32(out, 0);
        for r in &self.ranges {
            put64(out, r.iova);
            put64(out, r.length);
        }
    }
}

/// `FEATURE_DMA_LOGGING_REPORT` data (24 bytes); the reply adds the
/// bitmap: page n of the range (`(addr - iova) / page_size`) at bit n % 64
/// of little-endian word n / 64, as libvfio-user lays it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaLoggingReport {
    pub iova: u64,
    pub length: u64,
    pub page_size: u64,
}

impl DmaLoggingReport {
    pub const LEN: usize = 24;

    pub fn parse(b: &[u8]) -> Result<DmaLoggingReport, ParseError> {
        let mut r = exactly(b, "DMA_LOGGING_REPORT", Self::LEN)?;
        Ok(DmaLoggingReport {
            iova: r.u64()?,
            length: r.u64()?,
            page_size: r.u64()?,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put64(out, self.iova);
        put64(out, self.length);
        put64(out, self.page_size);
    }

    /// The bitmap's size in bytes (pages rounded up to 64 bits), or `None`
    /// when the request is not valid (empty, overflowing, or a page size
    /// that is not a power of two).
    pub fn bitmap_bytes(&self) -> Option<usize> {
        if self.length == 0 || !self.page_size.is_power_of_two() {
            return None;
        }
        self.iova.checked_add(self.length)?;
        let pages = self.length.div_ceil(self.page_size);
        usize::try_from(pages.div_ceil(64).checked_mul(8)?).ok()
    }
}

/// A reader over `b`, which must be exactly `len` bytes.
fn exactly<'a>(b: &'a [u8], what: &'static str, len: usize) -> Result<Rd<'a>, ParseError> {
    if b.len() != len {
        return Err(ParseError::Short {
            what,
            need: len,
            got: b.len(),
        });
    }
    Rd::new(b, what, len)
}

#[cfg(test)]
mod tests;
