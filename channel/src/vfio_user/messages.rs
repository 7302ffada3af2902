//! vfio-user messages: the 16-byte header and the payload of each command
//! we speak, each with `parse` (never panics: short or inconsistent input
//! is a [`ParseError`]) and `encode`. All fields are little-endian.

use serde::{Deserialize, Serialize};

use super::{
    FLAG_ERROR, FLAG_NO_REPLY, FLAG_TYPE_COMMAND, FLAG_TYPE_MASK, FLAG_TYPE_REPLY, HEADER_SIZE,
    IRQ_SET_DATA_BOOL, IRQ_SET_DATA_TYPE_MASK,
};

/// A message the peer got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("{what}: need {need} bytes, got {got}")]
    Short {
        what: &'static str,
        need: usize,
        got: usize,
    },
    #[error("{what}: count {count} does not match the {got} data bytes")]
    DataLength {
        what: &'static str,
        count: u32,
        got: usize,
    },
    #[error("version: capabilities are not valid JSON: {0}")]
    Capabilities(String),
    #[error("message type {0} is not a command")]
    NotCommand(u32),
    #[error("message type {0} is not a reply")]
    NotReply(u32),
}

/// Commands (the `cmd` header field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Command {
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    GetRegionIoFds = 6,
    GetIrqInfo = 7,
    SetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DmaRead = 11,
    DmaWrite = 12,
    DeviceReset = 13,
    DirtyPages = 14,
    RegionWriteMulti = 15,
    DeviceFeature = 16,
    MigDataRead = 17,
    MigDataWrite = 18,
}

impl Command {
    pub fn from_u16(v: u16) -> Option<Command> {
        use Command::*;
        Some(match v {
            1 => Version,
            2 => DmaMap,
            3 => DmaUnmap,
            4 => DeviceGetInfo,
            5 => DeviceGetRegionInfo,
            6 => GetRegionIoFds,
            7 => GetIrqInfo,
            8 => SetIrqs,
            9 => RegionRead,
            10 => RegionWrite,
            11 => DmaRead,
            12 => DmaWrite,
            13 => DeviceReset,
            14 => DirtyPages,
            15 => RegionWriteMulti,
            16 => DeviceFeature,
            17 => MigDataRead,
            18 => MigDataWrite,
            _ => return None,
        })
    }
}

/// Little-endian reader over a payload that reports short input.
pub(super) struct Rd<'a> {
    b: &'a [u8],
    pos: usize,
    what: &'static str,
    need: usize,
}

impl<'a> Rd<'a> {
    pub(super) fn new(b: &'a [u8], what: &'static str, need: usize) -> Result<Self, ParseError> {
        if b.len() < need {
            return Err(ParseError::Short {
                what,
                need,
                got: b.len(),
            });
        }
        Ok(Rd {
            b,
            pos: 0,
            what,
            need,
        })
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], ParseError> {
        let end = self.pos + N;
        let s = self.b.get(self.pos..end).ok_or(ParseError::Short {
            what: self.what,
            need: self.need.max(end),
            got: self.b.len(),
        })?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        self.pos = end;
        Ok(a)
    }

    fn u16(&mut self) -> Result<u16, ParseError> {
        self.take::<2>().map(u16::from_le_bytes)
    }

    pub(super) fn u32(&mut self) -> Result<u32, ParseError> {
        self.take::<4>().map(u32::from_le_bytes)
    }

    pub(super) fn u64(&mut self) -> Result<u64, ParseError> {
        self.take::<8>().map(u64::from_le_bytes)
    }

    pub(super) fn rest(&self) -> &'a [u8] {
        self.b.get(self.pos..).unwrap_or(&[])
    }

    /// The rest, which must be exactly `count` bytes of data when
    /// `with_data`, else empty (a payload head whose data follows it).
    fn data(
        &self,
        what: &'static str,
        count: u32,
        with_data: bool,
    ) -> Result<&'a [u8], ParseError> {
        let data = self.rest();
        let want = if with_data { count as usize } else { 0 };
        if data.len() != want {
            return Err(ParseError::DataLength {
                what,
                count,
                got: data.len(),
            });
        }
        Ok(data)
    }
}

fn put16(out: &mut Vec<u8>, v: u16) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub(super) fn put32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}
pub(super) fn put64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

/// The header that starts every message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub msg_id: u16,
    pub cmd: u16,
    /// Whole message, header included.
    pub msg_size: u32,
    pub flags: u32,
    /// errno of an error reply.
    pub error: u32,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header, ParseError> {
        let mut r = Rd::new(b, "header", HEADER_SIZE)?;
        Ok(Header {
            msg_id: r.u16()?,
            cmd: r.u16()?,
            msg_size: r.u32()?,
            flags: r.u32()?,
            error: r.u32()?,
        })
    }

    /// Reads `msg_size` from a header buffer (0 when too short).
    pub fn size_of(b: &[u8]) -> usize {
        b.get(4..8)
            .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]) as usize)
            .unwrap_or(0)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put16(out, self.msg_id);
        put16(out, self.cmd);
        put32(out, self.msg_size);
        put32(out, self.flags);
        put32(out, self.error);
    }

    /// A command header for a payload of `payload_len` bytes.
    pub fn command(msg_id: u16, cmd: Command, payload_len: usize, no_reply: bool) -> Header {
        Header {
            msg_id,
            cmd: cmd as u16,
            msg_size: (HEADER_SIZE + payload_len) as u32,
            flags: FLAG_TYPE_COMMAND | if no_reply { FLAG_NO_REPLY } else { 0 },
            error: 0,
        }
    }

    /// The success reply to this command, for a payload of `payload_len`.
    pub fn reply(&self, payload_len: usize) -> Header {
        Header {
            msg_id: self.msg_id,
            cmd: self.cmd,
            msg_size: (HEADER_SIZE + payload_len) as u32,
            flags: FLAG_TYPE_REPLY,
            error: 0,
        }
    }

    /// The error reply to this command (header only).
    pub fn error_reply(&self, errno: i32) -> Header {
        Header {
            msg_id: self.msg_id,
            cmd: self.cmd,
            msg_size: HEADER_SIZE as u32,
            flags: FLAG_TYPE_REPLY | FLAG_ERROR,
            error: errno as u32,
        }
    }

    pub fn msg_type(&self) -> u32 {
        self.flags & FLAG_TYPE_MASK
    }

    pub fn is_command(&self) -> bool {
        self.msg_type() == FLAG_TYPE_COMMAND
    }

    pub fn is_reply(&self) -> bool {
        self.msg_type() == FLAG_TYPE_REPLY
    }

    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }

    pub fn is_error(&self) -> bool {
        self.flags & FLAG_ERROR != 0
    }

    pub fn command_kind(&self) -> Option<Command> {
        Command::from_u16(self.cmd)
    }
}

/// The capabilities object of VERSION. Absent fields take the spec's
/// defaults (see the accessors); unknown fields are ignored.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_msg_fds: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_data_xfer_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_dma_maps: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pgsizes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub twin_socket: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub write_multiple: Option<bool>,
}

impl Capabilities {
    pub fn max_msg_fds(&self) -> u32 {
        self.max_msg_fds.unwrap_or(1)
    }
    pub fn max_data_xfer_size(&self) -> u32 {
        self.max_data_xfer_size
            .unwrap_or(super::DEFAULT_MAX_DATA_XFER)
    }
    pub fn max_dma_maps(&self) -> u32 {
        self.max_dma_maps.unwrap_or(65535)
    }
    pub fn pgsizes(&self) -> u64 {
        self.pgsizes.unwrap_or(4096)
    }
}

#[derive(Serialize, Deserialize)]
struct CapabilitiesData {
    #[serde(default)]
    capabilities: Capabilities,
}

/// VERSION payload: `u16 major, u16 minor`, NUL-terminated JSON.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Version {
    pub major: u16,
    pub minor: u16,
    pub capabilities: Capabilities,
}

impl Version {
    pub const LEN: usize = 4;

    pub fn parse(b: &[u8]) -> Result<Version, ParseError> {
        let mut r = Rd::new(b, "VERSION", Self::LEN)?;
        let major = r.u16()?;
        let minor = r.u16()?;
        let json = r.rest();
        // The string ends at its NUL; an absent string means defaults.
        let json = match json.iter().position(|&c| c == 0) {
            Some(n) => &json[..n],
            None => json,
        };
        let capabilities = if json.iter().all(|c| c.is_ascii_whitespace()) {
            Capabilities::default()
        } else {
            serde_json::from_slice::<CapabilitiesData>(json)
                .map_err(|e| ParseError::Capabilities(e.to_string()))?
                .capabilities
        };
        Ok(Version {
            major,
            minor,
            capabilities,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put16(out, self.major);
        put16(out, self.minor);
        let data = CapabilitiesData {
            capabilities: self.capabilities.clone(),
        };
        // Serializing plain fields and JSON values cannot fail; fall back
        // to an empty object all the same rather than panic.
        let json = serde_json::to_vec(&data).unwrap_or_else(|_| b"{}".to_vec());
        out.extend_from_slice(&json);
        out.push(0);
    }
}

/// DMA_MAP payload (32 bytes); the fd, if any, travels alongside.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaMap {
    pub argsz: u32,
    pub flags: u32,
    /// Offset of the region in the fd.
    pub offset: u64,
    /// Guest-physical (DMA) address.
    pub addr: u64,
    pub size: u64,
}

impl DmaMap {
    pub const LEN: usize = 32;

    pub fn parse(b: &[u8]) -> Result<DmaMap, ParseError> {
        let mut r = Rd::new(b, "DMA_MAP", Self::LEN)?;
        Ok(DmaMap {
            argsz: r.u32()?,
            flags: r.u32()?,
            offset: r.u64()?,
            addr: r.u64()?,
            size: r.u64()?,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put32(out, self.argsz);
        put32(out, self.flags);
        put64(out, self.offset);
        put64(out, self.addr);
        put64(out, self.size);
    }
}

/// DMA_UNMAP payload (24 bytes); the reply echoes it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DmaUnmap {
    pub argsz: u32,
    pub flags: u32,
    pub addr: u64,
    pub size: u64,
}

impl DmaUnmap {
    pub const LEN: usize = 24;

    pub fn parse(b: &[u8]) -> Result<DmaUnmap, ParseError> {
        let mut r = Rd::new(b, "DMA_UNMAP", Self::LEN)?;
        Ok(DmaUnmap {
            argsz: r.u32()?,
            flags: r.u32()?,
            addr: r.u64()?,
            size: r.u64()?,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put32(out, self.argsz);
        put32(out, self.flags);
        put64(out, self.addr);
        put64(out, self.size);
    }
}

/// DEVICE_GET_INFO payload (16 bytes), request and reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceInfo {
    pub argsz: u32,
    pub flags: u32,
    pub num_regions: u32,
    pub num_irqs: u32,
}

impl DeviceInfo {
    pub const LEN: usize = 16;

    pub fn parse(b: &[u8]) -> Result<DeviceInfo, ParseError> {
        let mut r = Rd::new(b, "DEVICE_GET_INFO", Self::LEN)?;
        Ok(DeviceInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            num_regions: r.u32()?,
            num_irqs: r.u32()?,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put32(out, self.argsz);
        put32(out, self.flags);
        put32(out, self.num_regions);
        put32(out, self.num_irqs);
    }
}

/// GET_REGION_INFO payload (`struct vfio_region_info`, 32 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub cap_offset: u32,
    pub size: u64,
    /// Offset for mmap in the fd sent with the reply (when MMAP is set).
    pub offset: u64,
}

impl RegionInfo {
    pub const LEN: usize = 32;

    pub fn parse(b: &[u8]) -> Result<RegionInfo, ParseError> {
        let mut r = Rd::new(b, "GET_REGION_INFO", Self::LEN)?;
        Ok(RegionInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            cap_offset: r.u32()?,
            size: r.u64()?,
            offset: r.u64()?,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put32(out, self.argsz);
        put32(out, self.flags);
        put32(out, self.index);
        put32(out, self.cap_offset);
        put64(out, self.size);
        put64(out, self.offset);
    }
}

/// GET_IRQ_INFO payload (`struct vfio_irq_info`, 16 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IrqInfo {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub count: u32,
}

impl IrqInfo {
    pub const LEN: usize = 16;

    pub fn parse(b: &[u8]) -> Result<IrqInfo, ParseError> {
        let mut r = Rd::new(b, "GET_IRQ_INFO", Self::LEN)?;
        Ok(IrqInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            count: r.u32()?,
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put32(out, self.argsz);
        put32(out, self.flags);
        put32(out, self.index);
        put32(out, self.count);
    }
}

/// SET_IRQS payload (`struct vfio_irq_set` without data, 20 bytes). With
/// `DATA_BOOL`, `count` bytes follow; with `DATA_EVENTFD`, the fds travel
/// as ancillary data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SetIrqs {
    pub argsz: u32,
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

impl SetIrqs {
    pub const LEN: usize = 20;

    pub fn parse(b: &[u8]) -> Result<(SetIrqs, &[u8]), ParseError> {
        let mut r = Rd::new(b, "SET_IRQS", Self::LEN)?;
        let s = SetIrqs {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            start: r.u32()?,
            count: r.u32()?,
        };
        let data = r.rest();
        if s.flags & IRQ_SET_DATA_TYPE_MASK == IRQ_SET_DATA_BOOL && data.len() != s.count as usize {
            return Err(ParseError::DataLength {
                what: "SET_IRQS (DATA_BOOL)",
                count: s.count,
                got: data.len(),
            });
        }
        Ok((s, data))
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put32(out, self.argsz);
        put32(out, self.flags);
        put32(out, self.index);
        put32(out, self.start);
        put32(out, self.count);
    }
}

/// REGION_READ / REGION_WRITE payload head (16 bytes); data follows in a
/// write request and a read reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

impl RegionAccess {
    pub const LEN: usize = 16;

    /// Parses the head and returns the data after it, which must be
    /// exactly `count` bytes when `with_data`, else empty.
    pub fn parse<'a>(
        b: &'a [u8],
        what: &'static str,
        with_data: bool,
    ) -> Result<(RegionAccess, &'a [u8]), ParseError> {
        let mut r = Rd::new(b, what, Self::LEN)?;
        let a = RegionAccess {
            offset: r.u64()?,
            region: r.u32()?,
            count: r.u32()?,
        };
        let data = r.data(what, a.count, with_data)?;
        Ok((a, data))
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put64(out, self.offset);
        put32(out, self.region);
        put32(out, self.count);
    }
}

/// DEVICE_FEATURE payload head (8 bytes, `struct vfio_user_device_feature`);
/// the feature's data follows (see [`super::migration`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeviceFeature {
    /// The largest reply payload the client takes.
    pub argsz: u32,
    /// The feature index (bits 0-15) and GET, SET, PROBE.
    pub flags: u32,
}

impl DeviceFeature {
    pub const LEN: usize = 8;

    pub fn parse(b: &[u8]) -> Result<(DeviceFeature, &[u8]), ParseError> {
        let mut r = Rd::new(b, "DEVICE_FEATURE", Self::LEN)?;
        let f = DeviceFeature {
            argsz: r.u32()?,
            flags: r.u32()?,
        };
        Ok((f, r.rest()))
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put32(out, self.argsz);
        put32(out, self.flags);
    }
}

/// MIG_DATA_READ / MIG_DATA_WRITE payload head (8 bytes, `struct
/// vfio_user_mig_data`); data follows in a write request and a read reply.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MigData {
    pub argsz: u32,
    pub size: u32,
}

impl MigData {
    pub const LEN: usize = 8;

    /// Parses the head and returns the data after it, which must be
    /// exactly `size` bytes when `with_data`, else empty.
    pub fn parse<'a>(
        b: &'a [u8],
        what: &'static str,
        with_data: bool,
    ) -> Result<(MigData, &'a [u8]), ParseError> {
        let mut r = Rd::new(b, what, Self::LEN)?;
        let m = MigData {
            argsz: r.u32()?,
            size: r.u32()?,
        };
        let data = r.data(what, m.size, with_data)?;
        Ok((m, data))
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        put32(out, self.argsz);
        put32(out, self.size);
    }
}

/// A parsed command, borrowing variable data from the payload.
#[derive(Clone, Debug, PartialEq)]
pub enum Request<'a> {
    Version(Version),
    DmaMap(DmaMap),
    DmaUnmap(DmaUnmap),
    DeviceGetInfo(DeviceInfo),
    GetRegionInfo(RegionInfo),
    GetIrqInfo(IrqInfo),
    SetIrqs(SetIrqs, &'a [u8]),
    RegionRead(RegionAccess),
    RegionWrite(RegionAccess, &'a [u8]),
    DeviceReset,
    /// DEVICE_FEATURE and the feature's data.
    DeviceFeature(DeviceFeature, &'a [u8]),
    MigDataRead(MigData),
    MigDataWrite(MigData, &'a [u8]),
    /// A command we know of but do not serve, or an unknown number.
    Unsupported(u16),
}

impl<'a> Request<'a> {
    /// Parses the payload of a command whose header is `header`.
    pub fn parse(header: &Header, payload: &'a [u8]) -> Result<Request<'a>, ParseError> {
        if !header.is_command() {
            return Err(ParseError::NotCommand(header.msg_type()));
        }
        Ok(match header.command_kind() {
            Some(Command::Version) => Request::Version(Version::parse(payload)?),
            Some(Command::DmaMap) => Request::DmaMap(DmaMap::parse(payload)?),
            Some(Command::DmaUnmap) => Request::DmaUnmap(DmaUnmap::parse(payload)?),
            Some(Command::DeviceGetInfo) => Request::DeviceGetInfo(DeviceInfo::parse(payload)?),
            Some(Command::DeviceGetRegionInfo) => {
                Request::GetRegionInfo(RegionInfo::parse(payload)?)
            }
            Some(Command::GetIrqInfo) => Request::GetIrqInfo(IrqInfo::parse(payload)?),
            Some(Command::SetIrqs) => {
                let (s, data) = SetIrqs::parse(payload)?;
                Request::SetIrqs(s, data)
            }
            Some(Command::RegionRead) => {
                Request::RegionRead(RegionAccess::parse(payload, "REGION_READ", false)?.0)
            }
            Some(Command::RegionWrite) => {
                let (a, data) = RegionAccess::parse(payload, "REGION_WRITE", true)?;
                Request::RegionWrite(a, data)
            }
            Some(Command::DeviceReset) => Request::DeviceReset,
            Some(Command::DeviceFeature) => {
                let (f, data) = DeviceFeature::parse(payload)?;
                Request::DeviceFeature(f, data)
            }
            Some(Command::MigDataRead) => {
                Request::MigDataRead(MigData::parse(payload, "MIG_DATA_READ", false)?.0)
            }
            Some(Command::MigDataWrite) => {
                let (m, data) = MigData::parse(payload, "MIG_DATA_WRITE", true)?;
                Request::MigDataWrite(m, data)
            }
            _ => Request::Unsupported(header.cmd),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut v = Vec::new();
        f(&mut v);
        v
    }

    #[test]
    fn header_round_trip_and_flags() {
        let h = Header::command(7, Command::RegionWrite, 20, true);
        let b = enc(|o| h.encode(o));
        assert_eq!(b.len(), HEADER_SIZE);
        let p = Header::parse(&b).expect("parse");
        assert_eq!(p, h);
        assert!(p.is_command() && p.no_reply() && !p.is_error());
        assert_eq!(Header::size_of(&b), 36);
        let e = h.error_reply(libc::EINVAL);
        assert!(e.is_reply() && e.is_error());
        assert_eq!(e.error, libc::EINVAL as u32);
        assert_eq!(e.msg_size, 16);
        assert!(matches!(
            Header::parse(&b[..15]),
            Err(ParseError::Short {
                need: 16,
                got: 15,
                ..
            })
        ));
        assert_eq!(Header::size_of(&[1, 2, 3]), 0);
    }

    #[test]
    fn version_round_trip() {
        let v = Version {
            major: 0,
            minor: 1,
            capabilities: Capabilities {
                max_msg_fds: Some(8),
                max_data_xfer_size: Some(1 << 20),
                pgsizes: Some(4096),
                ..Default::default()
            },
        };
        let b = enc(|o| v.encode(o));
        assert_eq!(b.last(), Some(&0));
        assert_eq!(Version::parse(&b).expect("parse"), v);
    }

    #[test]
    fn version_accepts_foreign_capabilities_and_defaults() {
        let mut b = vec![0, 0, 1, 0];
        b.extend_from_slice(
            br#"{"capabilities":{"max_msg_fds":1,"migration":{"pgsize":4096},"unknown":[1]}}"#,
        );
        b.push(0);
        let v = Version::parse(&b).expect("parse");
        assert_eq!((v.major, v.minor), (0, 1));
        assert_eq!(v.capabilities.max_msg_fds(), 1);
        assert_eq!(v.capabilities.max_data_xfer_size(), 1 << 20);
        assert!(v.capabilities.migration.is_some());
        // No JSON at all: defaults.
        let v = Version::parse(&[0, 0, 0, 0]).expect("parse");
        assert_eq!(v.capabilities, Capabilities::default());
    }

    #[test]
    fn version_rejects_malformed() {
        assert!(matches!(
            Version::parse(&[0, 0, 1]),
            Err(ParseError::Short { .. })
        ));
        let mut b = vec![0, 0, 1, 0];
        b.extend_from_slice(b"{not json\0");
        assert!(matches!(
            Version::parse(&b),
            Err(ParseError::Capabilities(_))
        ));
        let mut b = vec![0, 0, 1, 0];
        b.extend_from_slice(br#"{"capabilities":{"max_msg_fds":"many"}}"#);
        assert!(matches!(
            Version::parse(&b),
            Err(ParseError::Capabilities(_))
        ));
        let mut b = vec![0, 0, 1, 0];
        b.extend_from_slice(&[0xff, 0xfe, 0]);
        assert!(Version::parse(&b).is_err());
    }

    #[test]
    fn fixed_payloads_round_trip_and_reject_short() {
        let m = DmaMap {
            argsz: 32,
            flags: 3,
            offset: 0x1000,
            addr: 0x8000_0000,
            size: 0x20_0000,
        };
        let b = enc(|o| m.encode(o));
        assert_eq!(b.len(), DmaMap::LEN);
        assert_eq!(DmaMap::parse(&b), Ok(m));
        assert!(DmaMap::parse(&b[..31]).is_err());

        let u = DmaUnmap {
            argsz: 24,
            flags: 0,
            addr: 0x8000_0000,
            size: 0x20_0000,
        };
        let b = enc(|o| u.encode(o));
        assert_eq!(b.len(), DmaUnmap::LEN);
        assert_eq!(DmaUnmap::parse(&b), Ok(u));
        assert!(DmaUnmap::parse(&b[..23]).is_err());

        let d = DeviceInfo {
            argsz: 16,
            flags: 3,
            num_regions: 9,
            num_irqs: 5,
        };
        let b = enc(|o| d.encode(o));
        assert_eq!(DeviceInfo::parse(&b), Ok(d));
        assert!(DeviceInfo::parse(&b[..15]).is_err());

        let r = RegionInfo {
            argsz: 32,
            flags: 3,
            index: 7,
            cap_offset: 0,
            size: 256,
            offset: 0,
        };
        let b = enc(|o| r.encode(o));
        assert_eq!(b.len(), RegionInfo::LEN);
        assert_eq!(RegionInfo::parse(&b), Ok(r));
        assert!(RegionInfo::parse(&b[..31]).is_err());

        let i = IrqInfo {
            argsz: 16,
            flags: 7,
            index: 0,
            count: 1,
        };
        let b = enc(|o| i.encode(o));
        assert_eq!(IrqInfo::parse(&b), Ok(i));
        assert!(IrqInfo::parse(&[]).is_err());
    }

    #[test]
    fn set_irqs_with_and_without_bool_data() {
        let s = SetIrqs {
            argsz: 20,
            flags: super::super::IRQ_SET_DATA_EVENTFD | super::super::IRQ_SET_ACTION_TRIGGER,
            index: 0,
            start: 0,
            count: 1,
        };
        let b = enc(|o| s.encode(o));
        assert_eq!(SetIrqs::parse(&b), Ok((s, &[][..])));
        let s = SetIrqs {
            flags: IRQ_SET_DATA_BOOL | super::super::IRQ_SET_ACTION_TRIGGER,
            count: 2,
            ..s
        };
        let mut b = enc(|o| s.encode(o));
        assert!(matches!(
            SetIrqs::parse(&b),
            Err(ParseError::DataLength { .. })
        ));
        b.extend_from_slice(&[1, 0]);
        assert_eq!(SetIrqs::parse(&b), Ok((s, &[1u8, 0][..])));
        assert!(SetIrqs::parse(&b[..19]).is_err());
    }

    #[test]
    fn region_access_checks_data_length() {
        let a = RegionAccess {
            offset: 0x10,
            region: 0,
            count: 4,
        };
        let mut b = enc(|o| a.encode(o));
        assert_eq!(
            RegionAccess::parse(&b, "REGION_READ", false),
            Ok((a, &[][..]))
        );
        assert!(RegionAccess::parse(&b, "REGION_WRITE", true).is_err());
        b.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            RegionAccess::parse(&b, "REGION_WRITE", true),
            Ok((a, &[1u8, 2, 3, 4][..]))
        );
        assert!(RegionAccess::parse(&b, "REGION_READ", false).is_err());
        b.push(5);
        assert!(RegionAccess::parse(&b, "REGION_WRITE", true).is_err());
        assert!(RegionAccess::parse(&b[..15], "REGION_READ", false).is_err());
    }

    #[test]
    fn requests_parse_by_command() {
        let h = Header::command(1, Command::DeviceReset, 0, false);
        assert_eq!(Request::parse(&h, &[]), Ok(Request::DeviceReset));
        let h = Header::command(1, Command::GetRegionIoFds, 0, false);
        assert_eq!(Request::parse(&h, &[]), Ok(Request::Unsupported(6)));
        let h = Header {
            cmd: 999,
            ..Header::command(1, Command::DeviceReset, 0, false)
        };
        assert_eq!(Request::parse(&h, &[]), Ok(Request::Unsupported(999)));
        let r = h.reply(0);
        assert_eq!(Request::parse(&r, &[]), Err(ParseError::NotCommand(1)));
        let h = Header::command(1, Command::RegionRead, 3, false);
        assert!(Request::parse(&h, &[0, 0, 0]).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        // A cheap deterministic fuzz: every command number against
        // payloads of every length up to 64 and pseudo-random content.
        let mut x: u32 = 0x1234_5678;
        for cmd in 0..20u16 {
            for len in 0..64usize {
                let payload: Vec<u8> = (0..len)
                    .map(|_| {
                        x ^= x << 13;
                        x ^= x >> 17;
                        x ^= x << 5;
                        x as u8
                    })
                    .collect();
                let h = Header {
                    cmd,
                    ..Header::command(0, Command::Version, len, false)
                };
                let _ = Request::parse(&h, &payload);
                let _ = Header::parse(&payload);
            }
        }
    }
}
