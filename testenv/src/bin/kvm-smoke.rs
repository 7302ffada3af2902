//! `kvm-smoke`: a minimal KVM program. It sets up a 64-bit long-mode guest
//! (identity page tables, GDT, CR0/CR4/EFER) whose code writes an MMIO
//! address three times, writes one byte to an I/O port and halts, and checks
//! that exactly those exits reach user space.
//!
//! Usage: `kvm-smoke [--repeat N]` (N runs of the guest code, for timing).
//! Exit status 0 when every run saw the expected exits.

use anyhow::{bail, Context, Result};
use kvm_bindings::{kvm_segment, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuExit};
use std::time::Instant;

const MEM_SIZE: usize = 2 << 20;
const PML4: usize = 0x1000;
const PDPT: usize = 0x2000;
const PD: usize = 0x3000;
const GDT: usize = 0x500;
const CODE: usize = 0x8000;
const MMIO_ADDR: u64 = 0x1000_0000;
const PORT: u16 = 0x1234;
const PORT_VALUE: u8 = 0x5a;
const MMIO_VALUES: [u32; 3] = [0x1122_3344, 0x5566_7788, 0x99aa_bbcc];

#[derive(Debug, PartialEq, Eq)]
enum Exit {
    MmioWrite(u64, Vec<u8>),
    IoOut(u16, Vec<u8>),
    Hlt,
    Other(String),
}

fn guest_code() -> Vec<u8> {
    let mut c = Vec::new();
    // mov eax, MMIO_ADDR (zero-extends into rax)
    c.push(0xb8);
    c.extend_from_slice(&u32::try_from(MMIO_ADDR).unwrap_or(0).to_le_bytes());
    for v in MMIO_VALUES {
        // mov dword [rax], imm32
        c.extend_from_slice(&[0xc7, 0x00]);
        c.extend_from_slice(&v.to_le_bytes());
    }
    // mov dx, PORT
    c.extend_from_slice(&[0x66, 0xba]);
    c.extend_from_slice(&PORT.to_le_bytes());
    // mov al, PORT_VALUE; out dx, al; hlt
    c.extend_from_slice(&[0xb0, PORT_VALUE, 0xee, 0xf4]);
    c
}

struct GuestMem {
    ptr: *mut u8,
}

impl GuestMem {
    fn new() -> Result<Self> {
        // SAFETY: anonymous private mapping with no address hint; the result
        // is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM_SIZE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            bail!("mmap guest memory: {}", std::io::Error::last_os_error());
        }
        Ok(GuestMem { ptr: ptr.cast() })
    }

    fn slice(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live MEM_SIZE-byte read/write mapping owned by
        // self; the borrow of self prevents aliasing slices.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, MEM_SIZE) }
    }
}

impl Drop for GuestMem {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`.
        unsafe {
            libc::munmap(self.ptr.cast(), MEM_SIZE);
        }
    }
}

fn put_u64(mem: &mut [u8], off: usize, v: u64) {
    mem[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

fn setup_memory(mem: &mut [u8]) {
    // Identity-map the first 1 GiB with 2 MiB pages.
    put_u64(mem, PML4, PDPT as u64 | 0x3);
    put_u64(mem, PDPT, PD as u64 | 0x3);
    for i in 0..512u64 {
        put_u64(mem, PD + (i as usize) * 8, (i << 21) | 0x83);
    }
    // GDT: null, 64-bit code (0x08), data (0x10).
    put_u64(mem, GDT, 0);
    put_u64(mem, GDT + 8, 0x00af_9a00_0000_ffff);
    put_u64(mem, GDT + 16, 0x00cf_9200_0000_ffff);
    let code = guest_code();
    mem[CODE..CODE + code.len()].copy_from_slice(&code);
}

fn run() -> Result<()> {
    let mut repeat = 1u32;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--repeat" => {
                repeat = args
                    .next()
                    .context("--repeat needs a number")?
                    .parse()
                    .context("--repeat needs a number")?;
            }
            "-h" | "--help" => {
                println!("usage: kvm-smoke [--repeat N]");
                return Ok(());
            }
            other => bail!("unknown argument `{other}` (usage: kvm-smoke [--repeat N])"),
        }
    }
    // Declared before the VM so that it is dropped (unmapped) after it.
    let mut mem = GuestMem::new()?;
    setup_memory(mem.slice());
    let kvm = Kvm::new().context("open /dev/kvm")?;
    let vm = kvm.create_vm().context("KVM_CREATE_VM")?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: MEM_SIZE as u64,
        userspace_addr: mem.ptr as u64,
    };
    // SAFETY: the region points at `mem`, a MEM_SIZE mapping that outlives
    // the VM (`mem` is declared first, so dropped last).
    unsafe { vm.set_user_memory_region(region) }.context("KVM_SET_USER_MEMORY_REGION")?;
    let mut vcpu = vm.create_vcpu(0).context("KVM_CREATE_VCPU")?;
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .context("KVM_GET_SUPPORTED_CPUID")?;
    vcpu.set_cpuid2(&cpuid).context("KVM_SET_CPUID2")?;

    let mut sregs = vcpu.get_sregs().context("KVM_GET_SREGS")?;
    let code_seg = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x08,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        ..Default::default()
    };
    let data_seg = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        db: 1,
        l: 0,
        ..code_seg
    };
    sregs.cs = code_seg;
    sregs.ds = data_seg;
    sregs.es = data_seg;
    sregs.fs = data_seg;
    sregs.gs = data_seg;
    sregs.ss = data_seg;
    sregs.gdt.base = GDT as u64;
    sregs.gdt.limit = 23;
    sregs.cr3 = PML4 as u64;
    sregs.cr4 = 1 << 5; // PAE
    sregs.cr0 = 0x8000_0031; // PG | NE | ET | PE
    sregs.efer = 0x500; // LMA | LME
    vcpu.set_sregs(&sregs)
        .context("KVM_SET_SREGS (long mode)")?;

    let mut expected = Vec::new();
    for v in MMIO_VALUES {
        expected.push(Exit::MmioWrite(MMIO_ADDR, v.to_le_bytes().to_vec()));
    }
    expected.push(Exit::IoOut(PORT, vec![PORT_VALUE]));
    expected.push(Exit::Hlt);

    let start = Instant::now();
    let mut total_exits = 0u64;
    for round in 0..repeat {
        let mut regs = vcpu.get_regs().context("KVM_GET_REGS")?;
        regs.rip = CODE as u64;
        regs.rflags = 0x2;
        regs.rsp = 0x10_0000;
        vcpu.set_regs(&regs).context("KVM_SET_REGS")?;
        let mut seen = Vec::new();
        while seen.len() < 16 {
            let exit = match vcpu.run() {
                Ok(VcpuExit::MmioWrite(addr, data)) => Exit::MmioWrite(addr, data.to_vec()),
                Ok(VcpuExit::IoOut(port, data)) => Exit::IoOut(port, data.to_vec()),
                Ok(VcpuExit::Hlt) => Exit::Hlt,
                Ok(VcpuExit::InternalError) => {
                    Exit::Other("InternalError (KVM emulation failure)".into())
                }
                Ok(other) => Exit::Other(format!("{other:?}")),
                Err(e) => Exit::Other(format!("KVM_RUN error: {e}")),
            };
            let stop = !matches!(exit, Exit::MmioWrite(..) | Exit::IoOut(..));
            seen.push(exit);
            if stop {
                break;
            }
        }
        total_exits += seen.len() as u64;
        if seen != expected {
            let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or_default();
            bail!(
                "round {round}: unexpected exits (rip {rip:#x}):\n  seen:     {seen:x?}\n  expected: {expected:x?}"
            );
        }
    }
    let el = start.elapsed();
    println!(
        "kvm-smoke: OK: {repeat} run(s), each: 3 x MmioWrite({MMIO_ADDR:#x}, 4 bytes), IoOut({PORT:#x}, {PORT_VALUE:#x}), Hlt; {total_exits} exits in {:.1} ms ({:.2} us/exit)",
        el.as_secs_f64() * 1e3,
        el.as_secs_f64() * 1e6 / total_exits as f64
    );
    Ok(())
}

fn main() {
    if let Err(e) = run() {
        eprintln!("kvm-smoke: FAILED: {e:#}");
        std::process::exit(1);
    }
}
