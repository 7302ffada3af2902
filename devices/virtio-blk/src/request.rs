//! One virtio-blk request (§5.2.6): the 16-byte header (type, sector) in
//! the chain's driver-readable part, then the data, then one status byte
//! at the end of its device-writable part. The device does not assume how
//! the driver split that into descriptors.
//!
//! Data moves in pieces of at most [`CHUNK`] bytes, so a request never
//! makes the device hold more than that, whatever lengths the guest wrote.

use block::Backend;
use plugin_api::Host;

use crate::queue::{Chain, Desc};

use virtio_bindings::virtio_blk as vb;

/// Request types.
pub const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
pub const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
pub const T_FLUSH: u32 = vb::VIRTIO_BLK_T_FLUSH;
pub const T_GET_ID: u32 = vb::VIRTIO_BLK_T_GET_ID;
pub const T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
pub const T_WRITE_ZEROES: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;

/// Status values.
pub const S_OK: u8 = vb::VIRTIO_BLK_S_OK as u8;
pub const S_IOERR: u8 = vb::VIRTIO_BLK_S_IOERR as u8;
pub const S_UNSUPP: u8 = vb::VIRTIO_BLK_S_UNSUPP as u8;

/// A sector is 512 bytes whatever the block size (§5.2.6).
pub const SECTOR: u64 = 512;
/// The most bytes a request moves at once.
pub const CHUNK: usize = 1 << 20;
/// Bytes of the serial number `GET_ID` returns.
pub const ID_BYTES: usize = vb::VIRTIO_BLK_ID_BYTES as usize;

/// What the device needs to serve a request.
pub struct Disk<'a> {
    pub backend: &'a dyn Backend,
    pub serial: &'a [u8],
    /// The driver accepted discard / write zeroes.
    pub discard: bool,
    pub write_zeroes: bool,
}

/// The outcome: the status written and the bytes the device wrote into
/// the chain (the used length), or `None` when the chain cannot carry a
/// status at all (the driver's mistake; the device needs a reset).
pub type Outcome = Option<(u8, u32)>;

/// A run of bytes across descriptors, as (descriptor, offset, length).
fn spans(descs: &[Desc], mut skip: u64, mut len: u64) -> Vec<(Desc, u64, u64)> {
    let mut out = Vec::new();
    for d in descs {
        let dlen = u64::from(d.len);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let take = (dlen - skip).min(len);
        if take > 0 {
            out.push((*d, skip, take));
        }
        len -= take;
        skip = 0;
        if len == 0 {
            break;
        }
    }
    out
}

fn total(descs: &[Desc]) -> u64 {
    descs.iter().map(|d| u64::from(d.len)).sum()
}

/// Serves `chain`.
pub fn execute(host: &Host, disk: &Disk<'_>, chain: &Chain) -> Outcome {
    // The driver-readable part comes first, then the device-writable part.
    let split = chain
        .descs
        .iter()
        .position(Desc::device_writable)
        .unwrap_or(chain.descs.len());
    let (readable, writable) = chain.descs.split_at(split);
    if writable.iter().any(|d| !d.device_writable()) {
        return None;
    }
    let in_len = total(writable);
    if in_len == 0 {
        return None;
    }
    let data_in = in_len - 1;
    let put_status = |s: u8| -> Outcome {
        let span = spans(writable, data_in, 1);
        let (d, off, _) = span.first()?;
        host.dma_write(d.addr.wrapping_add(*off), &[s]).ok()?;
        Some((s, u32::try_from(in_len).unwrap_or(u32::MAX)))
    };
    let mut header = [0u8; 16];
    let out_len = total(readable);
    if out_len < 16 || copy_out(host, readable, 0, &mut header).is_err() {
        return put_status(S_IOERR);
    }
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let sector = u64::from_le_bytes(header[8..16].try_into().unwrap_or_default());
    let data_out = out_len - 16;
    let status = match kind {
        T_IN => read(host, disk, writable, sector, data_in),
        T_OUT => write(host, disk, readable, sector, data_out),
        T_FLUSH => {
            if disk.backend.flush().is_ok() {
                S_OK
            } else {
                S_IOERR
            }
        }
        T_GET_ID => {
            let mut id = [0u8; ID_BYTES];
            let n = disk.serial.len().min(ID_BYTES);
            id[..n].copy_from_slice(&disk.serial[..n]);
            let n = (data_in as usize).min(ID_BYTES);
            if copy_in(host, writable, 0, &id[..n]).is_ok() {
                S_OK
            } else {
                S_IOERR
            }
        }
        T_DISCARD | T_WRITE_ZEROES => {
            let allowed = if kind == T_DISCARD {
                disk.discard
            } else {
                disk.write_zeroes
            };
            if allowed {
                zero_ranges(host, disk, readable, data_out, kind == T_DISCARD)
            } else {
                S_UNSUPP
            }
        }
        _ => S_UNSUPP,
    };
    put_status(status)
}

/// Walks `len` bytes of the chain part `descs` from byte `at`:
/// `step(guest address, range of the caller's buffer)` for each piece. An
/// error when a step fails or the descriptors end first.
fn walk(
    descs: &[Desc],
    at: u64,
    len: usize,
    mut step: impl FnMut(u64, std::ops::Range<usize>) -> bool,
) -> Result<(), ()> {
    let mut pos = 0usize;
    for (d, off, n) in spans(descs, at, len as u64) {
        let n = n as usize;
        if !step(d.addr.wrapping_add(off), pos..pos + n) {
            return Err(());
        }
        pos += n;
    }
    if pos == len {
        Ok(())
    } else {
        Err(())
    }
}

/// Reads `buf.len()` bytes of the driver-readable part at `at`.
fn copy_out(host: &Host, descs: &[Desc], at: u64, buf: &mut [u8]) -> Result<(), ()> {
    let len = buf.len();
    walk(descs, at, len, |gpa, r| {
        host.dma_read(gpa, &mut buf[r]).is_ok()
    })
}

/// Writes `buf` into the device-writable part at `at`.
fn copy_in(host: &Host, descs: &[Desc], at: u64, buf: &[u8]) -> Result<(), ()> {
    walk(descs, at, buf.len(), |gpa, r| {
        host.dma_write(gpa, &buf[r]).is_ok()
    })
}

/// Whether `len` bytes at `sector` are whole sectors inside the disk.
fn in_range(disk: &Disk<'_>, sector: u64, len: u64) -> Option<u64> {
    let start = sector.checked_mul(SECTOR)?;
    let end = start.checked_add(len)?;
    (len % SECTOR == 0 && end <= disk.backend.size()).then_some(start)
}

fn read(host: &Host, disk: &Disk<'_>, writable: &[Desc], sector: u64, len: u64) -> u8 {
    let Some(start) = in_range(disk, sector, len) else {
        return S_IOERR;
    };
    in_chunks(len, |done, b| {
        disk.backend.read_at(b, start + done).is_ok() && copy_in(host, writable, done, b).is_ok()
    })
}

/// Moves `len` bytes in pieces of at most [`CHUNK`] through one buffer
/// (zeros at first): `step(done, piece)` for each; a `false` ends the
/// request with IOERR.
fn in_chunks(len: u64, mut step: impl FnMut(u64, &mut [u8]) -> bool) -> u8 {
    let mut buf = vec![0u8; usize::try_from(len).unwrap_or(CHUNK).min(CHUNK)];
    let mut done = 0u64;
    while done < len {
        let n = usize::try_from(len - done).unwrap_or(CHUNK).min(CHUNK);
        if !step(done, &mut buf[..n]) {
            return S_IOERR;
        }
        done += n as u64;
    }
    S_OK
}

fn write(host: &Host, disk: &Disk<'_>, readable: &[Desc], sector: u64, len: u64) -> u8 {
    if disk.backend.is_read_only() {
        return S_IOERR;
    }
    let Some(start) = in_range(disk, sector, len) else {
        return S_IOERR;
    };
    in_chunks(len, |done, b| {
        copy_out(host, readable, 16 + done, b).is_ok()
            && disk.backend.write_at(b, start + done).is_ok()
    })
}

/// DISCARD and WRITE_ZEROES: segments of (sector u64, sectors u32, flags
/// u32) after the header. A discard may leave the range reading zeros or
/// as it was; write zeroes must read zeros after, so when the backend
/// cannot deallocate it writes zeros.
fn zero_ranges(host: &Host, disk: &Disk<'_>, readable: &[Desc], len: u64, discard: bool) -> u8 {
    if disk.backend.is_read_only() {
        return S_IOERR;
    }
    if len == 0 || len % 16 != 0 || len / 16 > u64::from(crate::MAX_DISCARD_SEGMENTS) {
        return S_UNSUPP;
    }
    for i in 0..len / 16 {
        let mut seg = [0u8; 16];
        if copy_out(host, readable, 16 + 16 * i, &mut seg).is_err() {
            return S_IOERR;
        }
        let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap_or_default());
        let sectors = u64::from(u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]));
        // At most what the configuration advertises (2 GiB a segment).
        if sectors > u64::from(crate::MAX_ZERO_SECTORS) {
            return S_IOERR;
        }
        let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
        // Bit 0 is "unmap" for write zeroes; a discard has no flags.
        if flags & !1 != 0 || (discard && flags != 0) {
            return S_UNSUPP;
        }
        let Some(start) = in_range(disk, sector, sectors * SECTOR) else {
            return S_IOERR;
        };
        let bytes = sectors * SECTOR;
        let freed = disk.backend.supports_discard() && disk.backend.discard(start, bytes).is_ok();
        if freed || discard {
            continue;
        }
        // The buffer is never written: zeros.
        if in_chunks(bytes, |done, zeros| {
            disk.backend.write_at(zeros, start + done).is_ok()
        }) != S_OK
        {
            return S_IOERR;
        }
    }
    S_OK
}
