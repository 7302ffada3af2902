//! Guest RAM shared by the VMM as file descriptors (memfd or file), mapped
//! into this process and served to devices as DMA.
//!
//! Every access is bounds-checked against the regions mapped so far: a DMA
//! anywhere else is an error returned to the device, never a fault. A region
//! stays mapped until the last in-flight access to it ends (regions are
//! reference-counted), so an unmap racing a DMA cannot pull memory out from
//! under a copy.
//!
//! A file its owner can still shrink (not sealed with `F_SEAL_SHRINK`: a
//! plain file, an unsealed memfd) is not mapped: a truncation would turn
//! the next DMA into SIGBUS for the whole process, with all its devices.
//! Its DMA goes through `pread`/`pwrite` on the file instead, where a
//! truncated file is a short read, an error to the device. Sealed memfds
//! (our VMM's; QEMU's memfd backends seal by default) are mapped.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::{Arc, RwLock};

use plugin_api::function::GuestMemory;

/// Errors mapping guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The region has zero size or its end overflows.
    #[error("region at {gpa:#x} of {size:#x} bytes is empty or overflows")]
    BadRange { gpa: u64, size: u64 },
    /// The region overlaps one already mapped.
    #[error("region at {gpa:#x} of {size:#x} bytes overlaps a mapped region")]
    Overlap { gpa: u64, size: u64 },
    /// mmap failed (bad fd, offset beyond the file, ...).
    #[error("cannot map fd at offset {offset:#x} ({size:#x} bytes): {errno}")]
    Map {
        offset: u64,
        size: u64,
        errno: std::io::Error,
    },
    /// No region matches exactly.
    #[error("no mapped region at {gpa:#x} of {size:#x} bytes")]
    NotMapped { gpa: u64, size: u64 },
    /// The peer claims more of the file than the file has: mapping it would
    /// turn a DMA past the file's end into SIGBUS for the whole process.
    #[error("region of {size:#x} bytes at file offset {offset:#x} ends past the end of the file ({file_size:#x} bytes)")]
    PastEnd {
        offset: u64,
        size: u64,
        file_size: u64,
    },
    /// The fd is not a regular file or memfd (its size cannot be checked).
    #[error("guest memory must be a memfd or a regular file")]
    NotAFile,
}

/// Checks that `offset..offset+size` lies inside the file behind `fd`;
/// returns whether the file is sealed against shrinking (then it may be
/// mapped: see the module docs).
fn check_file_size(fd: BorrowedFd<'_>, offset: u64, size: u64) -> Result<bool, MemoryError> {
    let file = std::fs::File::from(fd.try_clone_to_owned().map_err(|errno| MemoryError::Map {
        offset,
        size,
        errno,
    })?);
    let meta = file.metadata().map_err(|errno| MemoryError::Map {
        offset,
        size,
        errno,
    })?;
    if !meta.file_type().is_file() {
        return Err(MemoryError::NotAFile);
    }
    let file_size = meta.len();
    if offset.checked_add(size).is_none_or(|end| end > file_size) {
        return Err(MemoryError::PastEnd {
            offset,
            size,
            file_size,
        });
    }
    // SAFETY: F_GET_SEALS on a valid fd reads an integer; nothing else.
    let seals = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS) };
    let sealed = seals >= 0 && seals & libc::F_SEAL_SHRINK != 0;
    if !sealed {
        tracing::info!(
            "guest memory at file offset {offset:#x} is not sealed against shrinking: \
             its DMA goes through pread/pwrite (a truncation is an error, not a fault)"
        );
    }
    Ok(sealed)
}

/// Where a region's bytes are.
enum Backing {
    /// An mmap of a sealed file.
    Mapped(*mut u8),
    /// A file its owner may shrink, read and written at `offset` + the
    /// offset in the region.
    File { file: std::fs::File, offset: u64 },
}

/// One region of guest RAM.
pub struct MappedRegion {
    gpa: u64,
    size: u64,
    backing: Backing,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory owned by this struct; the raw
// pointer is only used for bounds-checked copies.
unsafe impl Send for MappedRegion {}
// SAFETY: as above; concurrent copies into shared memory are how DMA works
// (the guest itself writes the same memory concurrently).
unsafe impl Sync for MappedRegion {}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        if let Backing::Mapped(ptr) = self.backing {
            // SAFETY: `ptr`/`size` came from a successful mmap in `map` and
            // the mapping is unmapped exactly once, here.
            unsafe {
                libc::munmap(ptr.cast(), self.size as usize);
            }
        }
    }
}

impl MappedRegion {
    fn contains(&self, gpa: u64, len: u64) -> Option<usize> {
        let off = gpa.checked_sub(self.gpa)?;
        let end = off.checked_add(len)?;
        (end <= self.size).then_some(off as usize)
    }
}

/// The guest memory a remote can reach.
#[derive(Default)]
pub struct GuestRam {
    regions: RwLock<Vec<Arc<MappedRegion>>>,
}

impl GuestRam {
    pub fn new() -> Self {
        Self::default()
    }

    fn regions(&self) -> Vec<Arc<MappedRegion>> {
        self.regions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Maps `size` bytes of `fd` from `offset` at guest address `gpa`.
    pub fn map(
        &self,
        fd: BorrowedFd<'_>,
        offset: u64,
        size: u64,
        gpa: u64,
        writable: bool,
    ) -> Result<(), MemoryError> {
        let bad = MemoryError::BadRange { gpa, size };
        if size == 0 || gpa.checked_add(size).is_none() {
            return Err(bad);
        }
        let len = usize::try_from(size).map_err(|_| bad)?;
        let file_offset = libc::off_t::try_from(offset).map_err(|_| MemoryError::Map {
            offset,
            size,
            errno: std::io::Error::from_raw_os_error(libc::EINVAL),
        })?;
        // As mmap takes them, whichever way the region is reached.
        if offset % 4096 != 0 {
            return Err(MemoryError::Map {
                offset,
                size,
                errno: std::io::Error::from_raw_os_error(libc::EINVAL),
            });
        }
        let sealed = check_file_size(fd, offset, size)?;
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        if regions
            .iter()
            .any(|r| gpa < r.gpa + r.size && r.gpa < gpa + size)
        {
            return Err(MemoryError::Overlap { gpa, size });
        }
        if !sealed {
            let file =
                std::fs::File::from(fd.try_clone_to_owned().map_err(|errno| MemoryError::Map {
                    offset,
                    size,
                    errno,
                })?);
            regions.push(Arc::new(MappedRegion {
                gpa,
                size,
                backing: Backing::File { file, offset },
                writable,
            }));
            return Ok(());
        }
        let prot = libc::PROT_READ | if writable { libc::PROT_WRITE } else { 0 };
        // SAFETY: a fresh shared mapping chosen by the kernel (addr NULL);
        // the result is checked before use and owned by MappedRegion.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                file_offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(MemoryError::Map {
                offset,
                size,
                errno: std::io::Error::last_os_error(),
            });
        }
        regions.push(Arc::new(MappedRegion {
            gpa,
            size,
            backing: Backing::Mapped(ptr.cast()),
            writable,
        }));
        Ok(())
    }

    /// Unmaps the region mapped at exactly `gpa`/`size`.
    pub fn unmap(&self, gpa: u64, size: u64) -> Result<(), MemoryError> {
        let mut regions = self.regions.write().unwrap_or_else(|e| e.into_inner());
        let before = regions.len();
        regions.retain(|r| !(r.gpa == gpa && r.size == size));
        if regions.len() == before {
            return Err(MemoryError::NotMapped { gpa, size });
        }
        Ok(())
    }

    /// Drops every mapping (a client went away).
    pub fn clear(&self) {
        self.regions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// `(gpa, size)` of every mapped region.
    pub fn layout(&self) -> Vec<(u64, u64)> {
        self.regions().iter().map(|r| (r.gpa, r.size)).collect()
    }

    /// Runs `f(region, offset_in_region, chunk_len, done)` over the regions
    /// covering `[gpa, gpa+len)`, which may span adjacent regions.
    fn for_each_chunk(
        &self,
        gpa: u64,
        len: usize,
        write: bool,
        mut f: impl FnMut(&MappedRegion, usize, usize, usize) -> Result<(), String>,
    ) -> Result<(), String> {
        // The read guard, not a copy of the list: this runs for every
        // descriptor, header and buffer a device touches, and a copy was
        // an allocation and an atomic per region each time. A map or
        // unmap waits for the copy in progress (bounded by `len`).
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        let mut done = 0usize;
        while done < len {
            let addr = gpa
                .checked_add(done as u64)
                .ok_or_else(|| format!("DMA at {gpa:#x} + {len:#x} overflows"))?;
            let Some(region) = regions.iter().find(|r| r.contains(addr, 1).is_some()) else {
                return Err(format!(
                    "DMA of {len} bytes at {gpa:#x}: {addr:#x} is not in guest memory shared with this device"
                ));
            };
            if write && !region.writable {
                return Err(format!("DMA write at {addr:#x}: region is read-only"));
            }
            let off = (addr - region.gpa) as usize;
            let chunk = (len - done).min(region.size as usize - off);
            f(region, off, chunk, done)?;
            done += chunk;
        }
        Ok(())
    }
}

impl GuestMemory for GuestRam {
    fn read(&self, gpa: u64, data: &mut [u8]) -> Result<(), String> {
        let len = data.len();
        self.for_each_chunk(gpa, len, false, |r, off, chunk, done| {
            let buf = &mut data[done..done + chunk];
            match &r.backing {
                Backing::Mapped(ptr) => {
                    // SAFETY: `off + chunk <= r.size` (checked by
                    // for_each_chunk), so the source lies in the live
                    // mapping, which the Arc keeps alive. Shared memory may
                    // change under the copy, exactly like a device DMA on
                    // real hardware. The file is sealed against shrinking,
                    // so the pages cannot vanish (no SIGBUS).
                    unsafe { std::ptr::copy_nonoverlapping(ptr.add(off), buf.as_mut_ptr(), chunk) };
                    Ok(())
                }
                Backing::File { file, offset } => {
                    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset + off as u64)
                        .map_err(|e| {
                            format!("DMA read at {:#x}: guest memory: {e}", r.gpa + off as u64)
                        })
                }
            }
        })
    }

    fn write(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        self.for_each_chunk(gpa, data.len(), true, |r, off, chunk, done| {
            match &r.backing {
                Backing::Mapped(ptr) => {
                    // SAFETY: as in `read`, with the destination in the mapping
                    // (which is writable, checked by for_each_chunk) and the
                    // source `done + chunk <= data.len()`.
                    unsafe {
                        std::ptr::copy_nonoverlapping(data[done..].as_ptr(), ptr.add(off), chunk)
                    };
                    Ok(())
                }
                Backing::File { file, offset } => {
                    let at = offset + off as u64;
                    // A write past the end would grow the file, not reach the
                    // guest: the region must still be all there.
                    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
                    if at + chunk as u64 > len {
                        return Err(format!(
                            "DMA write at {:#x}: guest memory was cut short under the device",
                            r.gpa + off as u64
                        ));
                    }
                    std::os::unix::fs::FileExt::write_all_at(file, &data[done..done + chunk], at)
                        .map_err(|e| {
                            format!("DMA write at {:#x}: guest memory: {e}", r.gpa + off as u64)
                        })
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, SeekFrom, Write};
    use std::os::fd::AsFd;

    fn memfd(size: u64) -> std::fs::File {
        let f = tempfile::tempfile().unwrap();
        f.set_len(size).unwrap();
        f
    }

    /// A memfd, sealed against shrinking and growing when `sealed`.
    fn real_memfd(size: u64, sealed: bool) -> std::fs::File {
        use std::os::fd::FromRawFd;
        // SAFETY: memfd_create with a NUL-terminated name; the fd is
        // checked and then owned by the File.
        let f = unsafe {
            let fd = libc::memfd_create(c"ram".as_ptr(), libc::MFD_ALLOW_SEALING);
            assert!(fd >= 0);
            std::fs::File::from_raw_fd(fd)
        };
        f.set_len(size).unwrap();
        if sealed {
            // SAFETY: F_ADD_SEALS on our memfd.
            let r = unsafe {
                libc::fcntl(
                    f.as_raw_fd(),
                    libc::F_ADD_SEALS,
                    libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
                )
            };
            assert_eq!(r, 0);
        }
        f
    }

    #[test]
    fn only_a_sealed_file_is_mapped() {
        for sealed in [true, false] {
            let f = real_memfd(0x4000, sealed);
            let ram = GuestRam::new();
            ram.map(f.as_fd(), 0, 0x4000, 0x10_0000, true).unwrap();
            let mapped = matches!(ram.regions()[0].backing, Backing::Mapped(_));
            assert_eq!(mapped, sealed);
            ram.write(0x10_1000, b"both ways").unwrap();
            let mut b = [0u8; 9];
            ram.read(0x10_1000, &mut b).unwrap();
            assert_eq!(&b, b"both ways");
            let mut on_file = [0u8; 9];
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut on_file, 0x1000).unwrap();
            assert_eq!(&on_file, b"both ways");
        }
    }

    /// The owner of unsealed guest memory truncates it under the device:
    /// DMA there is an error to the device, not SIGBUS for the process
    /// (which would end this test).
    #[test]
    fn memory_cut_short_under_the_device_is_an_error_not_a_fault() {
        let f = real_memfd(1 << 20, false);
        let ram = GuestRam::new();
        ram.map(f.as_fd(), 0, 1 << 20, 0x10_0000, true).unwrap();
        f.set_len(0x1000).unwrap();
        let mut b = [0u8; 16];
        let e = ram.read(0x10_2000, &mut b).unwrap_err();
        assert!(e.contains("DMA read at 0x102000"), "{e}");
        let e = ram.write(0x10_2000, &[1; 16]).unwrap_err();
        assert!(e.contains("cut short"), "{e}");
        assert_eq!(
            f.metadata().unwrap().len(),
            0x1000,
            "the write did not grow it"
        );
        // What is left still works.
        ram.write(0x10_0010, &[7; 16]).unwrap();
        ram.read(0x10_0010, &mut b).unwrap();
        assert_eq!(b, [7; 16]);
    }

    #[test]
    fn dma_reaches_the_shared_file() {
        let mut f = memfd(0x4000);
        let ram = GuestRam::new();
        ram.map(f.as_fd(), 0x1000, 0x2000, 0x10_0000, true).unwrap();
        ram.write(0x10_0010, b"hello").unwrap();
        let mut back = [0u8; 5];
        f.seek(SeekFrom::Start(0x1010)).unwrap();
        f.read_exact(&mut back).unwrap();
        assert_eq!(&back, b"hello");
        f.seek(SeekFrom::Start(0x1020)).unwrap();
        f.write_all(b"world").unwrap();
        let mut got = [0u8; 5];
        ram.read(0x10_0020, &mut got).unwrap();
        assert_eq!(&got, b"world");
    }

    /// A peer that claims more of the file than there is gets an error,
    /// not a mapping whose tail raises SIGBUS on the first DMA there.
    #[test]
    fn a_region_past_the_end_of_its_file_is_refused() {
        let f = memfd(0x2000);
        let ram = GuestRam::new();
        let e = ram.map(f.as_fd(), 0x1000, 0x2000, 0x10_0000, true);
        assert!(
            matches!(
                e,
                Err(MemoryError::PastEnd {
                    file_size: 0x2000,
                    ..
                })
            ),
            "{e:?}"
        );
        let e = ram.map(f.as_fd(), u64::MAX - 0xfff, 0x1000, 0x10_0000, true);
        assert!(e.is_err(), "{e:?}");
        assert!(ram.regions().is_empty());
        // What fits is still mapped.
        ram.map(f.as_fd(), 0x1000, 0x1000, 0x10_0000, true).unwrap();
        // A pipe is not memory.
        let (r, _w) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(matches!(
            ram.map(r.as_fd(), 0, 0x1000, 0x20_0000, true),
            Err(MemoryError::NotAFile)
        ));
    }

    #[test]
    fn access_outside_shared_memory_is_an_error() {
        let f = memfd(0x2000);
        let ram = GuestRam::new();
        ram.map(f.as_fd(), 0, 0x2000, 0x1000, true).unwrap();
        let mut b = [0u8; 16];
        assert!(ram.read(0x0, &mut b).is_err());
        assert!(ram.read(0x2ff8, &mut b).is_err(), "straddles the end");
        assert!(ram.write(u64::MAX - 4, &b).is_err());
        assert!(ram.read(0x1000, &mut b).is_ok());
    }

    #[test]
    fn access_spanning_adjacent_regions() {
        let f = memfd(0x2000);
        let ram = GuestRam::new();
        ram.map(f.as_fd(), 0, 0x1000, 0x0, true).unwrap();
        ram.map(f.as_fd(), 0x1000, 0x1000, 0x1000, true).unwrap();
        let data: Vec<u8> = (0..64).collect();
        ram.write(0xfe0, &data).unwrap();
        let mut back = vec![0u8; 64];
        ram.read(0xfe0, &mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn overlap_unmap_and_read_only() {
        let f = memfd(0x2000);
        let ram = GuestRam::new();
        ram.map(f.as_fd(), 0, 0x1000, 0x0, false).unwrap();
        assert!(matches!(
            ram.map(f.as_fd(), 0, 0x1000, 0x800, true),
            Err(MemoryError::Overlap { .. })
        ));
        assert!(ram.write(0x10, b"x").is_err(), "read-only region");
        assert!(matches!(
            ram.unmap(0, 0x800),
            Err(MemoryError::NotMapped {
                gpa: 0,
                size: 0x800
            })
        ));
        ram.unmap(0, 0x1000).unwrap();
        assert!(ram.layout().is_empty());
        assert!(ram.map(f.as_fd(), 0, 0, 0, true).is_err());
    }

    #[test]
    fn bad_fd_or_offset_is_an_error() {
        let f = memfd(0x2000);
        let ram = GuestRam::new();
        // Offset not page aligned.
        assert!(matches!(
            ram.map(f.as_fd(), 3, 0x1000, 0, true),
            Err(MemoryError::Map { .. })
        ));
    }
}
