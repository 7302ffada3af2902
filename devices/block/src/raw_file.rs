//! Raw image files: the guest's blocks are the file's bytes.
//!
//! With `direct`, the file is opened with `O_DIRECT` so guest I/O bypasses
//! the host page cache. `O_DIRECT` needs the memory buffer, the offset and
//! the length aligned. The offset/length alignment is asked from the kernel
//! (`statx` `STATX_DIOALIGN`, Linux 6.1+) and is 4 KiB when it cannot say;
//! buffers are always 4 KiB aligned. Aligned requests go through an aligned
//! bounce buffer on the direct descriptor, and requests that are not aligned
//! (for instance 512-byte guest blocks on a 4 KiB-sector host device) use a
//! second, buffered descriptor of the same file.
//! Linux keeps the two coherent: a direct read first writes back dirty page
//! cache in its range, and a direct write invalidates it.

use std::alloc::{self, Layout};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::backend::Backend;

/// Alignment of `O_DIRECT` bounce buffers, and of offsets and lengths when
/// the kernel does not report the file's own requirement.
pub const DIRECT_IO_ALIGN: usize = 4096;

/// Largest bounce buffer used for one direct I/O step.
const BOUNCE_CHUNK: usize = 1 << 20;

/// A raw image file.
#[derive(Debug)]
pub struct RawFile {
    path: PathBuf,
    /// The descriptor used for I/O (`O_DIRECT` when `direct`).
    file: File,
    /// Buffered descriptor for unaligned requests when `direct`.
    buffered: Option<File>,
    read_only: bool,
    size: AtomicU64,
    /// Offset and length alignment for the direct descriptor.
    dio_align: u64,
}

impl RawFile {
    /// Opens `path`. `read_only` opens it `O_RDONLY`; `direct` adds `O_DIRECT`.
    pub fn open(path: &Path, read_only: bool, direct: bool) -> io::Result<Self> {
        let open = |direct: bool| {
            let mut o = OpenOptions::new();
            o.read(true).write(!read_only);
            if direct {
                o.custom_flags(libc::O_DIRECT);
            }
            o.open(path)
        };
        let mut file = open(direct)?;
        let buffered = if direct { Some(open(false)?) } else { None };
        let dio_align = if direct { dio_offset_align(&file) } else { 1 };
        // Seeking to the end works for regular files and block devices alike.
        let size = file.seek(SeekFrom::End(0))?;
        Ok(RawFile {
            path: path.to_path_buf(),
            file,
            buffered,
            read_only,
            size: AtomicU64::new(size),
            dio_align,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_direct(&self) -> bool {
        self.buffered.is_some()
    }

    /// Offset and length alignment used for direct I/O (1 when not direct).
    pub fn direct_io_alignment(&self) -> u64 {
        self.dio_align
    }

    /// The buffered descriptor, when the request cannot go through `O_DIRECT`.
    fn unaligned_fallback(&self, offset: u64, len: usize) -> Option<&File> {
        let buffered = self.buffered.as_ref()?;
        let align = self.dio_align;
        if offset % align != 0 || len as u64 % align != 0 {
            Some(buffered)
        } else {
            None
        }
    }
}

impl Backend for RawFile {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.buffered.is_none() {
            return self.file.read_exact_at(buf, offset);
        }
        if let Some(f) = self.unaligned_fallback(offset, buf.len()) {
            return f.read_exact_at(buf, offset);
        }
        let mut bounce = AlignedBuf::new(buf.len().min(BOUNCE_CHUNK))?;
        let mut pos = offset;
        for chunk in buf.chunks_mut(BOUNCE_CHUNK) {
            let b = bounce.slice_mut(chunk.len());
            self.file.read_exact_at(b, pos)?;
            chunk.copy_from_slice(b);
            pos += chunk.len() as u64;
        }
        Ok(())
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        if self.buffered.is_none() {
            return self.file.write_all_at(buf, offset);
        }
        if let Some(f) = self.unaligned_fallback(offset, buf.len()) {
            return f.write_all_at(buf, offset);
        }
        let mut bounce = AlignedBuf::new(buf.len().min(BOUNCE_CHUNK))?;
        let mut pos = offset;
        for chunk in buf.chunks(BOUNCE_CHUNK) {
            let b = bounce.slice_mut(chunk.len());
            b.copy_from_slice(chunk);
            self.file.write_all_at(b, pos)?;
            pos += chunk.len() as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        // fdatasync covers writes made through either descriptor: it works on
        // the inode.
        self.file.sync_data()
    }

    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn resize(&self, new_size: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        self.file.set_len(new_size)?;
        self.size.store(new_size, Ordering::Release);
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        if len == 0 {
            return Ok(());
        }
        let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
            return Err(io::Error::from(io::ErrorKind::InvalidInput));
        };
        // SAFETY: fallocate only operates on the descriptor we own; no memory
        // is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                l,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => {
                Err(io::Error::new(io::ErrorKind::Unsupported, e))
            }
            _ => Err(e),
        }
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn supports_discard(&self) -> bool {
        !self.read_only
    }
}

/// The file's `O_DIRECT` offset alignment from `statx(STATX_DIOALIGN)`, or
/// [`DIRECT_IO_ALIGN`] when the kernel or file system does not report one
/// we can use with our 4 KiB-aligned buffers.
fn dio_offset_align(file: &File) -> u64 {
    // SAFETY: `statx` is plain old data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is an empty C string used with AT_EMPTY_PATH on a
    // descriptor we own, and `stx` is a valid, writable statx buffer.
    let r = unsafe {
        libc::statx(
            file.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    let fallback = DIRECT_IO_ALIGN as u64;
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 {
        return fallback;
    }
    let (mem, off) = (stx.stx_dio_mem_align, stx.stx_dio_offset_align);
    let usable = |a: u32| a.is_power_of_two() && a as usize <= DIRECT_IO_ALIGN;
    if usable(mem) && usable(off) {
        u64::from(off)
    } else {
        fallback
    }
}

/// A zeroed heap buffer aligned to [`DIRECT_IO_ALIGN`] for `O_DIRECT`.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize) -> io::Result<Self> {
        let size = len
            .max(1)
            .checked_next_multiple_of(DIRECT_IO_ALIGN)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let layout = Layout::from_size_align(size, DIRECT_IO_ALIGN)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: `layout` has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).ok_or_else(|| io::Error::from(io::ErrorKind::OutOfMemory))?;
        Ok(AlignedBuf { ptr, layout })
    }

    /// The first `len` bytes (clamped to the allocation).
    fn slice_mut(&mut self, len: usize) -> &mut [u8] {
        let len = len.min(self.layout.size());
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed) bytes
        // owned by `self`, `len` does not exceed that, and the returned
        // borrow is tied to `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: `ptr` was allocated in `new` with exactly this layout and
        // is freed only here.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn image(len: usize) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
        f.write_all(&data).unwrap();
        f.flush().unwrap();
        f
    }

    #[test]
    fn buffered_read_write() {
        let f = image(8192);
        let r = RawFile::open(f.path(), false, false).unwrap();
        assert_eq!(r.size(), 8192);
        let mut buf = vec![0u8; 100];
        r.read_at(&mut buf, 1000).unwrap();
        assert_eq!(buf[0], (1000 * 7 + 3) as u8);
        r.write_at(&[0xaa; 10], 4000).unwrap();
        r.flush().unwrap();
        let host = std::fs::read(f.path()).unwrap();
        assert_eq!(&host[4000..4010], &[0xaa; 10]);
        // Reads past the end fail.
        let mut big = vec![0u8; 512];
        assert!(r.read_at(&mut big, 8000).is_err());
    }

    #[test]
    fn read_only_refuses_writes() {
        let f = image(4096);
        let r = RawFile::open(f.path(), true, false).unwrap();
        assert!(r.is_read_only());
        assert!(!r.supports_discard());
        assert!(r.write_at(&[1], 0).is_err());
        assert!(r.resize(8192).is_err());
        assert!(r.discard(0, 4096).is_err());
        assert!(r.flush().is_ok());
    }

    #[test]
    fn direct_aligned_and_unaligned() {
        let f = image(3 * 4096 + 512);
        let r = match RawFile::open(f.path(), false, true) {
            Ok(r) => r,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                eprintln!("O_DIRECT not supported here; skipping");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert!(r.is_direct());
        let align = r.direct_io_alignment();
        assert!(align.is_power_of_two() && align <= 4096, "{align}");
        eprintln!("direct I/O alignment {align}");
        let pattern: Vec<u8> = (0..8192).map(|i| (i % 251) as u8).collect();
        r.write_at(&pattern, 4096).unwrap();
        // Unaligned write at the tail, then an aligned read covering it.
        r.write_at(&[0x55; 512], 3 * 4096).unwrap();
        let mut back = vec![0u8; 8192];
        r.read_at(&mut back, 4096).unwrap();
        assert_eq!(back, pattern);
        let mut tail = vec![0u8; 512];
        r.read_at(&mut tail, 3 * 4096).unwrap();
        assert_eq!(tail, vec![0x55; 512]);
        let mut odd = vec![0u8; 512];
        r.read_at(&mut odd, 4096 + 512).unwrap();
        assert_eq!(odd, pattern[512..1024]);
        // Byte-granular requests take the buffered descriptor.
        r.write_at(&[0x99; 10], 3).unwrap();
        let mut few = [0u8; 12];
        r.read_at(&mut few, 2).unwrap();
        assert_eq!(&few[1..11], &[0x99; 10]);
        r.flush().unwrap();
        let host = std::fs::read(f.path()).unwrap();
        assert_eq!(&host[4096..4096 + 8192], &pattern[..]);
        assert_eq!(&host[3..13], &[0x99; 10]);
    }

    #[test]
    fn resize_and_discard() {
        let f = image(8192);
        let r = RawFile::open(f.path(), false, false).unwrap();
        r.resize(16384).unwrap();
        assert_eq!(r.size(), 16384);
        assert_eq!(std::fs::metadata(f.path()).unwrap().len(), 16384);
        match r.discard(0, 4096) {
            Ok(()) => {
                let mut buf = vec![1u8; 4096];
                r.read_at(&mut buf, 0).unwrap();
                assert!(buf.iter().all(|&b| b == 0));
            }
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::Unsupported),
        }
        assert_eq!(r.size(), 16384);
    }

    #[test]
    fn aligned_buf_is_aligned() {
        let mut b = AlignedBuf::new(5000).unwrap();
        assert_eq!(b.ptr.as_ptr() as usize % DIRECT_IO_ALIGN, 0);
        assert_eq!(b.slice_mut(5000).len(), 5000);
        assert_eq!(b.slice_mut(1 << 20).len(), 8192);
    }
}
