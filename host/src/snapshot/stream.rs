//! The snapshot stream: a magic and a format version, then records, the
//! same on a file and on a migration socket.
//!
//! ```text
//! "VMMSNAP\n" u32 format
//! record := 1 u16 name-len name u32 len bytes     a section (JSON or a device state)
//!         | 2 u64 gpa u32 len bytes               guest RAM
//!         | 3 u64 gpa u64 len                     guest RAM that is all zero
//!         | 0xff                                  the end
//! ```
//!
//! Integers are little-endian. RAM records may repeat (a live migration
//! sends a page again once the guest dirtied it); the last one counts.
//! Everything a reader takes from the stream is bounded: a section's
//! length ([`MAX_SECTION`]), a RAM record's ([`MAX_RAM_RECORD`]), a
//! name's; RAM addresses are checked against the guest's RAM by the
//! caller.

use std::io::{Read, Write};

/// The stream's first bytes.
pub const MAGIC: [u8; 8] = *b"VMMSNAP\n";
/// The format this VMM writes and reads.
pub const FORMAT: u32 = 1;
/// The largest section a reader takes (a device state, the machine's
/// JSON).
pub const MAX_SECTION: u32 = 64 << 20;
/// The largest RAM record.
pub const MAX_RAM_RECORD: u32 = 1 << 20;
const MAX_NAME: u16 = 256;

const SECTION: u8 = 1;
const RAM: u8 = 2;
const RAM_ZERO: u8 = 3;
const END: u8 = 0xff;

/// What is wrong with a stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading or writing the stream failed.
    #[error("snapshot stream: {0}")]
    Io(#[from] std::io::Error),
    /// The stream does not start with the snapshot magic.
    #[error("not a snapshot of this VMM (its first bytes are not the snapshot magic)")]
    NotASnapshot,
    /// The stream was written in a format this VMM does not read.
    #[error("snapshot format {0}; this VMM reads format {FORMAT}")]
    Format(u32),
    /// A record this format does not have.
    #[error("unknown record type {0:#x} in the snapshot stream")]
    UnknownRecord(u8),
    /// A section or RAM record longer than a reader takes.
    #[error("record `{name}` of {len} bytes is longer than the {max} a snapshot may hold")]
    TooLong { name: String, len: u64, max: u64 },
    /// A section name that is not UTF-8.
    #[error("a section name is not UTF-8")]
    BadName,
}

/// One record.
#[derive(Debug, PartialEq, Eq)]
pub enum Record {
    Section { name: String, bytes: Vec<u8> },
    Ram { gpa: u64, bytes: Vec<u8> },
    RamZero { gpa: u64, len: u64 },
    End,
}

/// Writes the magic and the format.
pub fn write_header(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(&MAGIC)?;
    w.write_all(&FORMAT.to_le_bytes())
}

/// Reads and checks the magic and the format.
pub fn read_header(r: &mut impl Read) -> Result<(), StreamError> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => StreamError::NotASnapshot,
        _ => StreamError::Io(e),
    })?;
    if magic != MAGIC {
        return Err(StreamError::NotASnapshot);
    }
    let format = u32::from_le_bytes(read_array(r)?);
    if format != FORMAT {
        return Err(StreamError::Format(format));
    }
    Ok(())
}

/// Writes a section.
pub fn write_section(w: &mut impl Write, name: &str, bytes: &[u8]) -> Result<(), StreamError> {
    let n = u16::try_from(name.len())
        .ok()
        .filter(|&n| n <= MAX_NAME)
        .ok_or(StreamError::BadName)?;
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&l| l <= MAX_SECTION)
        .ok_or_else(|| StreamError::TooLong {
            name: name.to_owned(),
            len: bytes.len() as u64,
            max: u64::from(MAX_SECTION),
        })?;
    w.write_all(&[SECTION])?;
    w.write_all(&n.to_le_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(bytes)?;
    Ok(())
}

/// Writes guest RAM at `gpa` (at most [`MAX_RAM_RECORD`] bytes).
pub fn write_ram(w: &mut impl Write, gpa: u64, bytes: &[u8]) -> Result<(), StreamError> {
    let len = u32::try_from(bytes.len())
        .ok()
        .filter(|&l| l <= MAX_RAM_RECORD)
        .ok_or_else(|| StreamError::TooLong {
            name: format!("RAM at {gpa:#x}"),
            len: bytes.len() as u64,
            max: u64::from(MAX_RAM_RECORD),
        })?;
    w.write_all(&[RAM])?;
    w.write_all(&gpa.to_le_bytes())?;
    w.write_all(&len.to_le_bytes())?;
    w.write_all(bytes)?;
    Ok(())
}

/// Writes a range of guest RAM that is all zero.
pub fn write_ram_zero(w: &mut impl Write, gpa: u64, len: u64) -> std::io::Result<()> {
    w.write_all(&[RAM_ZERO])?;
    w.write_all(&gpa.to_le_bytes())?;
    w.write_all(&len.to_le_bytes())
}

/// Writes the end record.
pub fn write_end(w: &mut impl Write) -> std::io::Result<()> {
    w.write_all(&[END])
}

fn read_array<const N: usize>(r: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    r.read_exact(&mut b)?;
    Ok(b)
}

/// Reads `len` bytes without trusting `len` for the allocation beyond
/// what actually arrives.
fn read_vec(r: &mut impl Read, len: u64) -> std::io::Result<Vec<u8>> {
    let mut v = Vec::new();
    r.take(len).read_to_end(&mut v)?;
    if v.len() as u64 != len {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("the stream ends {} bytes into a {len}-byte record", v.len()),
        ));
    }
    Ok(v)
}

/// Reads the next record.
pub fn read_record(r: &mut impl Read) -> Result<Record, StreamError> {
    let [kind] = read_array(r)?;
    match kind {
        SECTION => {
            let n = u16::from_le_bytes(read_array(r)?);
            if n > MAX_NAME {
                return Err(StreamError::BadName);
            }
            let name =
                String::from_utf8(read_vec(r, u64::from(n))?).map_err(|_| StreamError::BadName)?;
            let len = u32::from_le_bytes(read_array(r)?);
            if len > MAX_SECTION {
                return Err(StreamError::TooLong {
                    name,
                    len: u64::from(len),
                    max: u64::from(MAX_SECTION),
                });
            }
            let bytes = read_vec(r, u64::from(len))?;
            Ok(Record::Section { name, bytes })
        }
        RAM => {
            let gpa = u64::from_le_bytes(read_array(r)?);
            let len = u32::from_le_bytes(read_array(r)?);
            if len > MAX_RAM_RECORD {
                return Err(StreamError::TooLong {
                    name: format!("RAM at {gpa:#x}"),
                    len: u64::from(len),
                    max: u64::from(MAX_RAM_RECORD),
                });
            }
            Ok(Record::Ram {
                gpa,
                bytes: read_vec(r, u64::from(len))?,
            })
        }
        RAM_ZERO => Ok(Record::RamZero {
            gpa: u64::from_le_bytes(read_array(r)?),
            len: u64::from_le_bytes(read_array(r)?),
        }),
        END => Ok(Record::End),
        other => Err(StreamError::UnknownRecord(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut buf = Vec::new();
        write_header(&mut buf).unwrap();
        write_section(&mut buf, "machine", b"{}").unwrap();
        write_ram(&mut buf, 0x1000, &[7; 4096]).unwrap();
        write_ram_zero(&mut buf, 0x2000, 1 << 20).unwrap();
        write_end(&mut buf).unwrap();
        let mut r = &buf[..];
        read_header(&mut r).unwrap();
        assert_eq!(
            read_record(&mut r).unwrap(),
            Record::Section {
                name: "machine".into(),
                bytes: b"{}".to_vec()
            }
        );
        assert_eq!(
            read_record(&mut r).unwrap(),
            Record::Ram {
                gpa: 0x1000,
                bytes: vec![7; 4096]
            }
        );
        assert_eq!(
            read_record(&mut r).unwrap(),
            Record::RamZero {
                gpa: 0x2000,
                len: 1 << 20
            }
        );
        assert_eq!(read_record(&mut r).unwrap(), Record::End);
    }

    #[test]
    fn another_file_or_format_is_refused() {
        let mut r: &[u8] = b"\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00";
        assert!(matches!(
            read_header(&mut r),
            Err(StreamError::NotASnapshot)
        ));
        let mut r: &[u8] = b"VM";
        assert!(matches!(
            read_header(&mut r),
            Err(StreamError::NotASnapshot)
        ));
        let mut buf = MAGIC.to_vec();
        buf.extend_from_slice(&2u32.to_le_bytes());
        let e = read_header(&mut &buf[..]).unwrap_err();
        assert_eq!(e.to_string(), "snapshot format 2; this VMM reads format 1");
    }

    #[test]
    fn a_lying_length_is_refused_before_any_allocation() {
        // A section that claims 4 GiB - 1, and a RAM record over the limit.
        let mut buf = vec![SECTION];
        buf.extend_from_slice(&1u16.to_le_bytes());
        buf.push(b'x');
        buf.extend_from_slice(&u32::MAX.to_le_bytes());
        let e = read_record(&mut &buf[..]).unwrap_err();
        assert!(matches!(e, StreamError::TooLong { .. }), "{e}");
        let mut buf = vec![RAM];
        buf.extend_from_slice(&0u64.to_le_bytes());
        buf.extend_from_slice(&(MAX_RAM_RECORD + 1).to_le_bytes());
        assert!(matches!(
            read_record(&mut &buf[..]),
            Err(StreamError::TooLong { .. })
        ));
        // A length within limits the stream does not hold: an error, not
        // a short record.
        let mut buf = vec![RAM];
        buf.extend_from_slice(&0u64.to_le_bytes());
        buf.extend_from_slice(&4096u32.to_le_bytes());
        buf.extend_from_slice(&[0; 100]);
        let e = read_record(&mut &buf[..]).unwrap_err();
        assert!(
            e.to_string()
                .contains("ends 100 bytes into a 4096-byte record"),
            "{e}"
        );
        assert!(matches!(
            read_record(&mut &[0x42u8][..]),
            Err(StreamError::UnknownRecord(0x42))
        ));
    }
}
