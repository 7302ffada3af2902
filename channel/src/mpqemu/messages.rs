//! mpqemu messages: the header and the payload of each command, each with
//! `parse` (never panics: short, long or inconsistent input is a
//! [`ParseError`]) and `encode`. Fields are in the host's native byte
//! order, laid out as QEMU's C structs are on x86-64 (`size_t` and
//! `off_t` are 64-bit).
//!
//! The checks are QEMU 7.2's `mpqemu_msg_valid`, plus what it leaves out:
//! an exact payload size for every command (a `RET` has 0 or 8 bytes).

use super::{HEADER_SIZE, MAX_FDS, MAX_PAYLOAD, SYSMEM_SLOTS};

/// A message the peer got wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("unknown command {0}")]
    UnknownCommand(i32),
    #[error("{what}: payload of {got} bytes, expected {expected}")]
    Size {
        what: &'static str,
        expected: &'static str,
        got: usize,
    },
    #[error("{what}: {got} file descriptors, expected {expected}")]
    Fds {
        what: &'static str,
        expected: &'static str,
        got: usize,
    },
    #[error("header: need {HEADER_SIZE} bytes, got {0}")]
    ShortHeader(usize),
    #[error("header announces {announced} payload bytes, message has {got}")]
    Length { announced: u64, got: usize },
    #[error("{0}")]
    Invalid(String),
}

/// Commands (`MPQemuCmd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum Command {
    SyncSysmem = 0,
    Ret = 1,
    PciCfgWrite = 2,
    PciCfgRead = 3,
    BarWrite = 4,
    BarRead = 5,
    SetIrqfd = 6,
    DeviceReset = 7,
}

impl Command {
    pub fn from_i32(v: i32) -> Option<Command> {
        use Command::*;
        Some(match v {
            0 => SyncSysmem,
            1 => Ret,
            2 => PciCfgWrite,
            3 => PciCfgRead,
            4 => BarWrite,
            5 => BarRead,
            6 => SetIrqfd,
            7 => DeviceReset,
            _ => return None,
        })
    }
}

fn rd<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    if let Some(s) = b.get(at..at + N) {
        a.copy_from_slice(s);
    }
    a
}

/// The 16-byte header: `int cmd; (4 bytes padding); size_t size`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub cmd: i32,
    /// Payload bytes that follow the header.
    pub size: u64,
}

impl Header {
    pub fn parse(b: &[u8]) -> Result<Header, ParseError> {
        if b.len() < HEADER_SIZE {
            return Err(ParseError::ShortHeader(b.len()));
        }
        Ok(Header {
            cmd: i32::from_ne_bytes(rd(b, 0)),
            size: u64::from_ne_bytes(rd(b, 8)),
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.cmd.to_ne_bytes());
        out.extend_from_slice(&[0u8; 4]);
        out.extend_from_slice(&self.size.to_ne_bytes());
    }

    /// Whole message size (header included) from a header buffer, for
    /// the framing; saturates (and is then refused as oversized) instead
    /// of overflowing.
    pub fn size_of(b: &[u8]) -> usize {
        let size = u64::from_ne_bytes(rd(b, 8));
        usize::try_from(size)
            .ok()
            .and_then(|s| s.checked_add(HEADER_SIZE))
            .unwrap_or(usize::MAX)
    }
}

/// One region of a `SYNC_SYSMEM`: `size` bytes of the message's fd of the
/// same index, from `offset`, at guest-physical address `gpa`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SysmemSlot {
    pub gpa: u64,
    pub size: u64,
    pub offset: u64,
}

/// `SyncSysmemMsg`: `u64 gpas[8]; u64 sizes[8]; off_t offsets[8]`. The
/// number of regions is the number of fds that came with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncSysmem {
    pub regions: Vec<SysmemSlot>,
}

impl SyncSysmem {
    pub const LEN: usize = 3 * 8 * SYSMEM_SLOTS;

    /// The first `nfds` regions of the payload.
    pub fn parse(b: &[u8], nfds: usize) -> Result<SyncSysmem, ParseError> {
        if b.len() != Self::LEN {
            return Err(ParseError::Size {
                what: "SYNC_SYSMEM",
                expected: "192",
                got: b.len(),
            });
        }
        if nfds == 0 || nfds > MAX_FDS {
            return Err(ParseError::Fds {
                what: "SYNC_SYSMEM",
                expected: "1 to 7",
                got: nfds,
            });
        }
        let regions = (0..nfds)
            .map(|i| SysmemSlot {
                gpa: u64::from_ne_bytes(rd(b, 8 * i)),
                size: u64::from_ne_bytes(rd(b, 64 + 8 * i)),
                offset: u64::from_ne_bytes(rd(b, 128 + 8 * i)),
            })
            .collect();
        Ok(SyncSysmem { regions })
    }

    /// All 8 slots; those beyond `regions` are zero.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let slot = |i: usize| self.regions.get(i).copied().unwrap_or_default();
        for i in 0..SYSMEM_SLOTS {
            out.extend_from_slice(&slot(i).gpa.to_ne_bytes());
        }
        for i in 0..SYSMEM_SLOTS {
            out.extend_from_slice(&slot(i).size.to_ne_bytes());
        }
        for i in 0..SYSMEM_SLOTS {
            out.extend_from_slice(&slot(i).offset.to_ne_bytes());
        }
    }
}

/// `PciConfDataMsg`: `u32 addr; u32 val; int len` (12 bytes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigAccess {
    pub addr: u32,
    /// The value to write (0 in a read).
    pub val: u32,
    /// 1, 2 or 4 bytes.
    pub len: i32,
}

impl ConfigAccess {
    pub const LEN: usize = 12;

    pub fn parse(b: &[u8]) -> Result<ConfigAccess, ParseError> {
        if b.len() != Self::LEN {
            return Err(ParseError::Size {
                what: "PCI config access",
                expected: "12",
                got: b.len(),
            });
        }
        Ok(ConfigAccess {
            addr: u32::from_ne_bytes(rd(b, 0)),
            val: u32::from_ne_bytes(rd(b, 4)),
            len: i32::from_ne_bytes(rd(b, 8)),
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.addr.to_ne_bytes());
        out.extend_from_slice(&self.val.to_ne_bytes());
        out.extend_from_slice(&self.len.to_ne_bytes());
    }
}

/// `BarAccessMsg`: `hwaddr addr; u64 val; unsigned size; bool memory;`
/// and 3 bytes of padding (24 bytes). `addr` is absolute: the BAR base
/// the guest programmed plus the offset.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BarAccess {
    pub addr: u64,
    /// The value to write (0 in a read), little-endian device data in the
    /// low `size` bytes.
    pub val: u64,
    /// 1, 2, 4 or 8 bytes.
    pub size: u32,
    /// Memory space (`true`) or I/O space.
    pub memory: bool,
}

impl BarAccess {
    pub const LEN: usize = 24;

    pub fn parse(b: &[u8]) -> Result<BarAccess, ParseError> {
        if b.len() != Self::LEN {
            return Err(ParseError::Size {
                what: "BAR access",
                expected: "24",
                got: b.len(),
            });
        }
        Ok(BarAccess {
            addr: u64::from_ne_bytes(rd(b, 0)),
            val: u64::from_ne_bytes(rd(b, 8)),
            size: u32::from_ne_bytes(rd(b, 16)),
            memory: b.get(20).is_some_and(|&m| m != 0),
        })
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.addr.to_ne_bytes());
        out.extend_from_slice(&self.val.to_ne_bytes());
        out.extend_from_slice(&self.size.to_ne_bytes());
        out.extend_from_slice(&[u8::from(self.memory), 0, 0, 0]);
    }
}

/// One parsed message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// Guest RAM regions, one per fd; no reply.
    SyncSysmem(SyncSysmem),
    /// A reply: `Some(value)` (8 bytes), or `None` (empty, the reply to
    /// DEVICE_RESET).
    Ret(Option<u64>),
    /// Replied with `RET` 0 (or `u64::MAX` on failure).
    PciCfgWrite(ConfigAccess),
    /// Replied with `RET` value.
    PciCfgRead(ConfigAccess),
    /// Replied with `RET` 0 (or `u64::MAX`).
    BarWrite(BarAccess),
    /// Replied with `RET` value.
    BarRead(BarAccess),
    /// Two fds: irqfd, resamplefd; no payload, no reply.
    SetIrqfd,
    /// Replied with an empty `RET`.
    DeviceReset,
}

impl Message {
    pub fn command(&self) -> Command {
        match self {
            Message::SyncSysmem(_) => Command::SyncSysmem,
            Message::Ret(_) => Command::Ret,
            Message::PciCfgWrite(_) => Command::PciCfgWrite,
            Message::PciCfgRead(_) => Command::PciCfgRead,
            Message::BarWrite(_) => Command::BarWrite,
            Message::BarRead(_) => Command::BarRead,
            Message::SetIrqfd => Command::SetIrqfd,
            Message::DeviceReset => Command::DeviceReset,
        }
    }

    /// Parses a whole message (header and payload) that came with `nfds`
    /// file descriptors.
    pub fn parse(b: &[u8], nfds: usize) -> Result<Message, ParseError> {
        let h = Header::parse(b)?;
        let payload = b.get(HEADER_SIZE..).unwrap_or(&[]);
        if h.size != payload.len() as u64 {
            return Err(ParseError::Length {
                announced: h.size,
                got: payload.len(),
            });
        }
        if payload.len() > MAX_PAYLOAD {
            return Err(ParseError::Size {
                what: "message",
                expected: "at most 192",
                got: payload.len(),
            });
        }
        if nfds > MAX_FDS {
            return Err(ParseError::Fds {
                what: "message",
                expected: "at most 7",
                got: nfds,
            });
        }
        let cmd = Command::from_i32(h.cmd).ok_or(ParseError::UnknownCommand(h.cmd))?;
        let no_fds = |what: &'static str| {
            if nfds == 0 {
                Ok(())
            } else {
                Err(ParseError::Fds {
                    what,
                    expected: "0",
                    got: nfds,
                })
            }
        };
        let empty = |what: &'static str| {
            if payload.is_empty() {
                Ok(())
            } else {
                Err(ParseError::Size {
                    what,
                    expected: "0",
                    got: payload.len(),
                })
            }
        };
        Ok(match cmd {
            Command::SyncSysmem => Message::SyncSysmem(SyncSysmem::parse(payload, nfds)?),
            Command::Ret => {
                no_fds("RET")?;
                match payload.len() {
                    0 => Message::Ret(None),
                    8 => Message::Ret(Some(u64::from_ne_bytes(rd(payload, 0)))),
                    got => {
                        return Err(ParseError::Size {
                            what: "RET",
                            expected: "0 or 8",
                            got,
                        })
                    }
                }
            }
            Command::PciCfgWrite => {
                no_fds("PCI_CFGWRITE")?;
                Message::PciCfgWrite(ConfigAccess::parse(payload)?)
            }
            Command::PciCfgRead => {
                no_fds("PCI_CFGREAD")?;
                Message::PciCfgRead(ConfigAccess::parse(payload)?)
            }
            Command::BarWrite => {
                no_fds("BAR_WRITE")?;
                Message::BarWrite(BarAccess::parse(payload)?)
            }
            Command::BarRead => {
                no_fds("BAR_READ")?;
                Message::BarRead(BarAccess::parse(payload)?)
            }
            Command::SetIrqfd => {
                empty("SET_IRQFD")?;
                if nfds != 2 {
                    return Err(ParseError::Fds {
                        what: "SET_IRQFD",
                        expected: "2",
                        got: nfds,
                    });
                }
                Message::SetIrqfd
            }
            Command::DeviceReset => {
                no_fds("DEVICE_RESET")?;
                empty("DEVICE_RESET")?;
                Message::DeviceReset
            }
        })
    }

    /// Appends header and payload to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let start = out.len();
        Header {
            cmd: self.command() as i32,
            size: 0,
        }
        .encode(out);
        match self {
            Message::SyncSysmem(s) => s.encode(out),
            Message::Ret(Some(v)) => out.extend_from_slice(&v.to_ne_bytes()),
            Message::Ret(None) | Message::SetIrqfd | Message::DeviceReset => {}
            Message::PciCfgWrite(a) | Message::PciCfgRead(a) => a.encode(out),
            Message::BarWrite(a) | Message::BarRead(a) => a.encode(out),
        }
        let size = (out.len() - start - HEADER_SIZE) as u64;
        out[start + 8..start + 16].copy_from_slice(&size.to_ne_bytes());
    }

    /// The encoded message as a new vector.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_SIZE + MAX_PAYLOAD);
        self.encode(&mut v);
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(m: Message, nfds: usize) {
        let b = m.to_bytes();
        assert_eq!(Message::parse(&b, nfds), Ok(m));
    }

    #[test]
    fn layouts_match_qemu() {
        // Header: cmd at 0, padding, size at 8.
        let b = Message::BarRead(BarAccess {
            addr: 0xfebf_0034,
            val: 0,
            size: 4,
            memory: true,
        })
        .to_bytes();
        assert_eq!(b.len(), HEADER_SIZE + 24);
        assert_eq!(&b[0..4], &5i32.to_ne_bytes());
        assert_eq!(&b[4..8], &[0; 4]);
        assert_eq!(&b[8..16], &24u64.to_ne_bytes());
        assert_eq!(&b[16..24], &0xfebf_0034u64.to_ne_bytes());
        assert_eq!(&b[32..36], &4u32.to_ne_bytes());
        assert_eq!(b[36], 1);
        assert_eq!(Header::size_of(&b), 40);
        let s = Message::SyncSysmem(SyncSysmem {
            regions: vec![SysmemSlot {
                gpa: 0x1000,
                size: 0x2000,
                offset: 0x3000,
            }],
        })
        .to_bytes();
        assert_eq!(s.len(), HEADER_SIZE + 192);
        assert_eq!(&s[16..24], &0x1000u64.to_ne_bytes());
        assert_eq!(&s[16 + 64..16 + 72], &0x2000u64.to_ne_bytes());
        assert_eq!(&s[16 + 128..16 + 136], &0x3000u64.to_ne_bytes());
        let c = Message::PciCfgWrite(ConfigAccess {
            addr: 0x10,
            val: 0xffff_ffff,
            len: 4,
        })
        .to_bytes();
        assert_eq!(c.len(), HEADER_SIZE + 12);
    }

    #[test]
    fn every_message_round_trips() {
        round_trip(
            Message::SyncSysmem(SyncSysmem {
                regions: (0..7)
                    .map(|i| SysmemSlot {
                        gpa: i << 20,
                        size: 1 << 20,
                        offset: i * 4096,
                    })
                    .collect(),
            }),
            7,
        );
        round_trip(Message::Ret(Some(0x1234)), 0);
        round_trip(Message::Ret(None), 0);
        let c = ConfigAccess {
            addr: 4,
            val: 7,
            len: 2,
        };
        round_trip(Message::PciCfgWrite(c), 0);
        round_trip(Message::PciCfgRead(c), 0);
        let a = BarAccess {
            addr: 0xc000,
            val: 0xdead_beef,
            size: 8,
            memory: false,
        };
        round_trip(Message::BarWrite(a), 0);
        round_trip(Message::BarRead(a), 0);
        round_trip(Message::SetIrqfd, 2);
        round_trip(Message::DeviceReset, 0);
    }

    #[test]
    fn malformed_messages_are_errors() {
        let bar = Message::BarRead(BarAccess::default()).to_bytes();
        // Short payload with a consistent header.
        let mut short = bar[..HEADER_SIZE + 20].to_vec();
        short[8..16].copy_from_slice(&20u64.to_ne_bytes());
        assert!(matches!(
            Message::parse(&short, 0),
            Err(ParseError::Size { got: 20, .. })
        ));
        // Header size disagrees with the bytes.
        assert!(matches!(
            Message::parse(&bar[..30], 0),
            Err(ParseError::Length { .. })
        ));
        assert!(matches!(
            Message::parse(&bar[..8], 0),
            Err(ParseError::ShortHeader(8))
        ));
        // fds where none belong, and the wrong number where some do.
        assert!(matches!(
            Message::parse(&bar, 1),
            Err(ParseError::Fds { .. })
        ));
        let irq = Message::SetIrqfd.to_bytes();
        assert!(Message::parse(&irq, 1).is_err());
        assert!(Message::parse(&irq, 3).is_err());
        let sync = Message::SyncSysmem(SyncSysmem::default()).to_bytes();
        assert!(Message::parse(&sync, 0).is_err(), "no fds");
        assert!(Message::parse(&sync, 8).is_err(), "8 fds: QEMU refuses");
        // Unknown commands, including MAX and negatives.
        for cmd in [8, 9, -1, i32::MIN, i32::MAX] {
            let mut b = Message::DeviceReset.to_bytes();
            b[0..4].copy_from_slice(&cmd.to_ne_bytes());
            assert_eq!(Message::parse(&b, 0), Err(ParseError::UnknownCommand(cmd)));
        }
        // Oversized payload.
        let mut big = Message::DeviceReset.to_bytes();
        big.resize(HEADER_SIZE + 200, 0);
        big[8..16].copy_from_slice(&200u64.to_ne_bytes());
        assert!(matches!(
            Message::parse(&big, 0),
            Err(ParseError::Size { got: 200, .. })
        ));
        // A RET of odd size.
        let mut ret = Message::Ret(Some(1)).to_bytes();
        ret.truncate(HEADER_SIZE + 4);
        ret[8..16].copy_from_slice(&4u64.to_ne_bytes());
        assert!(Message::parse(&ret, 0).is_err());
        // A size near u64::MAX does not overflow the framing's arithmetic.
        let mut huge = [0u8; 16];
        huge[8..16].copy_from_slice(&u64::MAX.to_ne_bytes());
        assert_eq!(Header::size_of(&huge), usize::MAX);
    }

    #[test]
    fn random_input_never_panics() {
        let mut x: u32 = 0x9e37_79b9;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x
        };
        for cmd in -2..12i32 {
            for len in 0..=MAX_PAYLOAD + 8 {
                let mut b = Vec::new();
                Header {
                    cmd,
                    size: len as u64,
                }
                .encode(&mut b);
                b.extend((0..len).map(|_| next() as u8));
                for nfds in 0..10 {
                    let _ = Message::parse(&b, nfds);
                }
                let _ = Message::parse(&b[..b.len().min(HEADER_SIZE + 3)], 0);
            }
        }
    }
}
