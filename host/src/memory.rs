//! Guest physical memory: one memfd from the start (so remotes can map it),
//! split around the 32-bit MMIO hole.
//!
//! ```text
//! 0            .. min(ram, 3 GiB)   RAM (memfd offset 0)
//! 3 GiB        .. 4 GiB             MMIO hole: PCI BARs, IOAPIC, LAPIC
//! 4 GiB        .. 4 GiB + rest      RAM (memfd offset 3 GiB), if ram > 3 GiB
//! ```

use std::ffi::CString;
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd};

use anyhow::{bail, Context, Result};
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// PCI memory BARs are placed in `[PCI_MMIO_START, PCI_MMIO_END)`.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
/// Below the IOAPIC (0xfec0_0000) and LAPIC (0xfee0_0000).
pub const PCI_MMIO_END: u64 = 0xFE00_0000;
/// PCI I/O BARs are placed in `[PCI_IO_START, PCI_IO_END)`.
pub const PCI_IO_START: u64 = 0xC000;
/// End of the PCI I/O window.
pub const PCI_IO_END: u64 = 0x1_0000;

/// One RAM slot: guest address, size, offset in the memfd.
#[derive(Clone, Copy, Debug)]
pub struct RamRegion {
    pub gpa: u64,
    pub size: u64,
    pub fd_offset: u64,
}

/// The guest's RAM.
pub struct GuestRam {
    pub mem: GuestMemoryMmap,
    pub memfd: File,
    pub regions: Vec<RamRegion>,
}

impl std::fmt::Debug for GuestRam {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestRam")
            .field("regions", &self.regions)
            .finish()
    }
}

/// The RAM regions for `size` bytes of guest RAM.
pub fn layout(size: u64) -> Vec<RamRegion> {
    let low = size.min(MMIO_HOLE_START);
    let mut v = vec![RamRegion {
        gpa: 0,
        size: low,
        fd_offset: 0,
    }];
    if size > low {
        v.push(RamRegion {
            gpa: MMIO_HOLE_END,
            size: size - low,
            fd_offset: low,
        });
    }
    v
}

impl GuestRam {
    /// Creates `size` bytes of RAM in a sealed-size memfd.
    pub fn new(size: u64) -> Result<GuestRam> {
        let name = CString::new("guest-ram").context("memfd name")?;
        // SAFETY: memfd_create with a valid NUL-terminated name; the
        // returned fd (checked) is owned by the File below.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error()).context("memfd_create");
        }
        // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(size).context("sizing guest RAM memfd")?;
        // Remotes map it: none may change its size under the others (a
        // shrink would turn their DMA into SIGBUS), and the seals are final.
        // SAFETY: F_ADD_SEALS on the memfd just created; no memory is
        // touched.
        let sealed = unsafe {
            libc::fcntl(
                memfd.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if sealed < 0 {
            return Err(std::io::Error::last_os_error()).context("sealing the guest RAM memfd");
        }
        let regions = layout(size);
        let mut mapped = Vec::new();
        for r in &regions {
            let file = memfd.try_clone().context("dup memfd")?;
            let len = usize::try_from(r.size).context("RAM size")?;
            let map = MmapRegion::from_file(FileOffset::new(file, r.fd_offset), len)
                .with_context(|| format!("mmap guest RAM at {:#x}", r.gpa))?;
            let Some(region) = GuestRegionMmap::new(map, GuestAddress(r.gpa)) else {
                bail!("guest RAM region at {:#x} overflows", r.gpa);
            };
            mapped.push(region);
        }
        let mem = GuestMemoryMmap::from_regions(mapped).context("guest memory")?;
        Ok(GuestRam {
            mem,
            memfd,
            regions,
        })
    }

    /// The memfd, to pass to remotes.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// End of RAM below the MMIO hole.
    pub fn low_end(&self) -> u64 {
        self.regions.first().map_or(0, |r| r.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_cannot_be_resized_by_anyone() {
        let ram = GuestRam::new(16 << 20).unwrap();
        // SAFETY: F_GET_SEALS reads an integer.
        let seals = unsafe { libc::fcntl(ram.memfd.as_raw_fd(), libc::F_GET_SEALS) };
        assert_eq!(
            seals & (libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL),
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL
        );
        assert!(ram.memfd.set_len(4096).is_err(), "shrinking a sealed memfd");
        assert!(
            ram.memfd.set_len(32 << 20).is_err(),
            "growing a sealed memfd"
        );
    }

    #[test]
    fn layout_splits_around_the_hole() {
        let l = layout(512 << 20);
        assert_eq!(l.len(), 1);
        let l = layout(4 << 30);
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].gpa, MMIO_HOLE_END);
        assert_eq!(l[1].size, 1 << 30);
        assert_eq!(l[1].fd_offset, MMIO_HOLE_START);
    }
}
