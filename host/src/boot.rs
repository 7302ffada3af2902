//! Linux boot: kernel (bzImage or ELF vmlinux) and initrd into guest RAM,
//! the command line, the zero page (boot_params with the e820 map), and
//! the identity page tables and GDT for the 64-bit entry.

use std::fs::File;
use std::path::Path;

use anyhow::{bail, Context, Result};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{
    bzimage::BzImage, elf::Elf, load_cmdline, Cmdline, KernelLoader, KernelLoaderResult,
};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::{GuestRam, MMIO_HOLE_END};
use crate::mptable;

/// Where the kernel goes (and what counts as high memory).
pub const HIMEM_START: u64 = 0x10_0000;
/// Zero page (boot_params).
pub const ZERO_PAGE: u64 = 0x7000;
/// Initial stack of the boot vCPU.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line.
pub const CMDLINE_MAX: usize = 4096;
/// GDT.
pub const GDT_START: u64 = 0x500;
/// IDT (empty).
pub const IDT_START: u64 = 0x520;
/// Page tables: PML4, PDPT, 4 page directories (identity map of 4 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
/// End of conventional memory we report as RAM (the MP table sits above).
pub const EBDA_START: u64 = 0x9_fc00;

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

/// What the vCPU setup needs from the boot.
#[derive(Clone, Copy, Debug)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: u64,
}

fn load_kernel(mem: &GuestMemoryMmap, kernel: &Path) -> Result<(KernelLoaderResult, bool)> {
    let mut f = File::open(kernel).with_context(|| format!("open kernel {} (set `kernel` in [vm] to a bzImage or ELF vmlinux; relative paths are relative to the config file)", kernel.display()))?;
    match BzImage::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => Ok((r, true)),
        Err(bz) => {
            let mut f = File::open(kernel)?;
            let r =
                Elf::load(mem, None, &mut f, Some(GuestAddress(HIMEM_START))).map_err(|elf| {
                    anyhow::anyhow!(
                        "{}: neither a bzImage ({bz}) nor an ELF vmlinux ({elf})",
                        kernel.display()
                    )
                })?;
            Ok((r, false))
        }
    }
}

/// Loads everything and writes the boot structures; returns the entry.
pub fn setup(
    ram: &GuestRam,
    kernel: &Path,
    initrd: Option<&Path>,
    cmdline: &str,
    vcpus: u8,
    pci_irqs: &[mptable::PciIrq],
    acpi: bool,
) -> Result<BootInfo> {
    let mem = &ram.mem;
    let (kr, bzimage) = load_kernel(mem, kernel)?;
    let entry = if bzimage {
        // The 64-bit entry point is 0x200 past the protected-mode code start.
        kr.kernel_load.raw_value() + 0x200
    } else {
        kr.kernel_load.raw_value()
    };

    let mut params = boot_params::default();
    if let Some(hdr) = kr.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.kernel_alignment = 0x100_0000;

    let mut cl = Cmdline::new(CMDLINE_MAX).context("cmdline")?;
    cl.insert_str(cmdline)
        .map_err(|e| anyhow::anyhow!("kernel command line: {e}"))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cl).context("writing the command line")?;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline.len() as u32 + 1;

    if let Some(initrd) = initrd {
        let data = std::fs::read(initrd).with_context(|| {
            format!(
                "read initrd {} (`initrd` in [vm]; relative to the config file)",
                initrd.display()
            )
        })?;
        let max = if params.hdr.initrd_addr_max != 0 {
            u64::from(params.hdr.initrd_addr_max) + 1
        } else {
            0x3800_0000
        };
        let top = ram.low_end().min(max);
        let size = data.len() as u64;
        let kernel_end = kr.kernel_end.max(HIMEM_START);
        let Some(addr) = top.checked_sub(size).map(|a| a & !0xfff) else {
            bail!("initrd of {size} bytes does not fit in guest RAM");
        };
        if addr < kernel_end {
            bail!("initrd of {size} bytes does not fit in guest RAM above the kernel");
        }
        mem.write_slice(&data, GuestAddress(addr))
            .context("writing the initrd")?;
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    // e820: low RAM, the EBDA/ROM hole (MP table lives there), RAM from
    // 1 MiB up to the hole, RAM above 4 GiB.
    let mut e820 = vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for r in &ram.regions {
        if r.gpa == 0 {
            e820.push((HIMEM_START, r.size - HIMEM_START, E820_RAM));
        } else {
            e820.push((r.gpa, r.size, E820_RAM));
        }
    }
    // The IOAPIC/LAPIC/BIOS area at the top of the hole is reserved.
    e820.push((0xfec0_0000, MMIO_HOLE_END - 0xfec0_0000, E820_RESERVED));
    for (i, (addr, size, ty)) in e820.iter().enumerate() {
        params.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *ty,
        };
    }
    params.e820_entries = e820.len() as u8;
    // ACPI tables in the reserved hole below 1 MiB, beside the MP table
    // (which a guest booted with `acpi=off` still uses).
    if acpi {
        params.acpi_rsdp_addr =
            crate::acpi::tables::write(mem, vcpus, pci_irqs).context("writing the ACPI tables")?;
    }
    mem.write_obj(params, GuestAddress(ZERO_PAGE))
        .context("writing boot_params")?;

    write_gdt_and_page_tables(mem)?;
    mptable::setup(mem, vcpus, pci_irqs).context("writing the MP table")?;
    Ok(BootInfo { entry })
}

/// GDT entry from flags, base and limit (the usual packing).
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << (56 - 24))
        | ((u64::from(flags) & 0x0000_f0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << (48 - 16))
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The boot GDT: null, code64, data, TSS.
pub const BOOT_GDT: [(u16, u32, u32); 4] = [
    (0, 0, 0),
    (0xa09b, 0, 0xfffff),
    (0xc093, 0, 0xfffff),
    (0x808b, 0, 0xfffff),
];

fn write_gdt_and_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, (f, b, l)) in BOOT_GDT.iter().enumerate() {
        mem.write_obj(
            gdt_entry(*f, *b, *l),
            GuestAddress(GDT_START + 8 * i as u64),
        )?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_START))?;
    // PML4[0] -> PDPT; PDPT[0..4] -> PD[0..4]; each PD maps 1 GiB with 2 MiB pages.
    mem.write_obj(PDPT_START | 0x03, GuestAddress(PML4_START))?;
    for i in 0..4u64 {
        let pd = PD_START + i * 0x1000;
        mem.write_obj(pd | 0x03, GuestAddress(PDPT_START + i * 8))?;
        for j in 0..512u64 {
            let addr = ((i * 512 + j) << 21) | 0x83;
            mem.write_obj(addr, GuestAddress(pd + j * 8))?;
        }
    }
    Ok(())
}
