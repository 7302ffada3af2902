//! Storage behind a SCSI disk. The disk model only needs byte-addressed
//! positional I/O, so a backend is a small trait; [`crate::RawFile`] is the
//! only implementation today, and other image formats can be added beside it.
//!
//! All methods take `&self`: implementations must be safe to call from
//! several threads at once (positional I/O has no shared file offset), so the
//! disk never holds a lock across I/O.

use std::io;

pub trait Backend: Send + Sync {
    /// Fills `buf` from byte `offset`. A short read (past the end) is an error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;

    /// Writes all of `buf` at byte `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;

    /// Makes completed writes durable (fdatasync for files).
    fn flush(&self) -> io::Result<()>;

    /// Current size in bytes.
    fn size(&self) -> u64;

    /// Changes the size (grows with zeros or truncates).
    fn resize(&self, new_size: u64) -> io::Result<()>;

    /// Deallocates `len` bytes at `offset`; the range then reads as zeros.
    /// Returns an error of kind [`io::ErrorKind::Unsupported`] when the
    /// storage cannot do it, in which case nothing changed.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()>;

    /// True when writes are refused.
    fn is_read_only(&self) -> bool;

    /// True when [`Backend::discard`] may succeed (advertised to the guest as
    /// logical block provisioning).
    fn supports_discard(&self) -> bool;
}
