//! A tiny 64-bit guest of our own, for this machine's PVM `/dev/kvm`:
//! its hot loop runs in ring 3 (native speed under PVM) and touches a
//! proxy function's BAR0; ring 0 only runs a ~35-instruction interrupt
//! handler (PVM emulates every ring-0 instruction, ~250 ns each).
//!
//! No boot code at all: the host writes page tables, GDT, TSS, IDT and the
//! machine code into guest RAM, programs the IOAPIC redirection entry and
//! the LAPIC through KVM_SET_IRQCHIP / KVM_SET_LAPIC, and starts the vCPU
//! directly in ring 3, long mode, IF=1, IOPL=3 (so `out` works from ring 3).
//!
//! Shared by `tests/ring3_guest.rs` and `examples/mmio_exit_bench.rs`
//! (included with `#[path]`).

#![allow(clippy::unwrap_used, clippy::panic, dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use host::memory::GuestRam;
use host::pci::proxy::ProxyFunction;
use host::pci::root::{PciRoot, CONFIG_ADDRESS, CONFIG_DATA};
use kvm_bindings::{kvm_irqchip, kvm_segment, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

// ---- Guest-physical layout (all inside the first 2 MiB page) ----------
const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
/// 2 MiB pages for 0..1 GiB: RAM, user-accessible.
const PD_LOW: u64 = 0x3000;
/// 2 MiB pages for 3..4 GiB: BARs, IOAPIC, LAPIC; uncached.
const PD_HOLE: u64 = 0x4000;
const GDT: u64 = 0x5000;
const TSS: u64 = 0x6000;
const IDT: u64 = 0x7000;
/// Ring-0 stack top (TSS.RSP0): where the CPU switches on ring 3 → ring 0.
const KSTACK_TOP: u64 = 0x9000;
/// One 8-byte stub per unexpected vector: reports the vector on PORT_FAULT.
const STUBS: u64 = 0xA000;
const HANDLER: u64 = 0xB000;
const USER_CODE: u64 = 0xC000;
/// Result block the guest fills in (offsets `D_*`).
pub const DATA: u64 = 0xD000;
const USTACK_TOP: u64 = 0xF000;
pub const DMA_SRC: u64 = 0x10_0000;
pub const DMA_DST: u64 = 0x20_0000;
pub const DMA_LEN: u32 = 4096;

// ---- Result block offsets --------------------------------------------
const D_ID: i32 = 0x00;
const D_MISMATCHES: i32 = 0x04;
/// Handler invocations that found a cause in IRQ_STATUS: what ring 3
/// spins on.
const D_IRQ_COUNT: i32 = 0x08;
/// OR of IRQ_STATUS as the handler found it.
const D_IRQ_STATUS_OR: i32 = 0x0c;
/// All handler invocations.
const D_INVOCATIONS: i32 = 0x10;
/// Waits in ring 3 that gave up (no interrupt within the spin budget).
const D_TIMEOUTS: i32 = 0x14;
const D_DMA_RESULT: i32 = 0x18;
/// OR of IRQ_STATUS read back after the handler's ack (0 expected).
const D_AFTER_ACK_OR: i32 = 0x1c;
const D_LIVENESS: i32 = 0x20;
/// Invocations that found IRQ_STATUS empty.
const D_SPURIOUS: i32 = 0x24;
/// Per handler invocation (64 slots of 16 bytes, wrapping): IRQ_STATUS,
/// LAPIC ISR and IRR bits 32..63, the interrupted CS.
const D_LOG: i32 = 0x100;

// ---- Ports the guest uses to talk to the test ------------------------
/// `out` of a phase number: the host timestamps phase boundaries.
const PORT_MARK: u16 = 0xe0;
/// The guest is done; the result block is complete.
const PORT_DONE: u16 = 0xe2;
/// `in` from it: an exit for polling waits. Reads 1 once a slow wait
/// (see [`PORT_SLOW_WAIT`]) has lasted [`SLOW_WAIT_LIMIT`], else 0.
const PORT_POLL: u16 = 0xe6;
/// `out` to it: a wait spent its spin budget and goes on polling the host
/// clock; the host starts timing it.
const PORT_SLOW_WAIT: u16 = 0xe7;
/// How long (host time) a wait whose spin budget ran out may still take
/// before the guest counts it as a timeout: an interrupt that a loaded
/// machine delivers late is late, not lost.
const SLOW_WAIT_LIMIT: Duration = Duration::from_secs(10);
/// A ring-0 stub ran: the byte is the vector (an exception, or a stray
/// interrupt).
const PORT_FAULT: u16 = 0xe4;

/// Vector the IOAPIC pin is routed to.
pub const VECTOR: u8 = 0x30;
/// An address in the MMIO hole that nothing decodes: the test answers it
/// itself, so reading it measures the bare exit round trip.
const NULL_MMIO: u64 = 0xfd00_0000;
const LAPIC: u64 = 0xfee0_0000;
/// Ring-3 spin budget per interrupt wait (~1 s natively).
const SPIN: u32 = 0x4000_0000;
/// The same with an exit per iteration (~3 s at ~30 µs per exit).
const POLL_SPIN: u32 = 100_000;
/// The written LIVENESS pattern (reads back inverted).
pub const LIVE_PAT: u32 = 0x0f0f_0000;

const SLOT: u8 = 3;
pub const GSI: u32 = 19;

// dma-example registers (devices/dma-example/src/lib.rs).
// dma-example's register map (its crate is the one source), as the 32-bit
// displacements the assembler below encodes.
const fn reg(offset: u64) -> i32 {
    offset as i32
}
const REG_ID: i32 = reg(dma_example::REG_ID);
const REG_LIVENESS: i32 = reg(dma_example::REG_LIVENESS);
const REG_SCRATCH: i32 = reg(dma_example::REG_SCRATCH);
const REG_IRQ_STATUS: i32 = reg(dma_example::REG_IRQ_STATUS);
const REG_IRQ_RAISE: i32 = reg(dma_example::REG_IRQ_RAISE);
const REG_IRQ_ACK: i32 = reg(dma_example::REG_IRQ_ACK);
const REG_DMA_SRC: i32 = reg(dma_example::REG_DMA_SRC);
const REG_DMA_DST: i32 = reg(dma_example::REG_DMA_DST);
const REG_DMA_LEN: i32 = reg(dma_example::REG_DMA_LEN);
const REG_DMA_CMD: i32 = reg(dma_example::REG_DMA_CMD);
const REG_DMA_RESULT: i32 = reg(dma_example::REG_DMA_RESULT);
pub const ID_VALUE: u32 = dma_example::ID_VALUE;
pub const IRQ_DMA_DONE: u32 = dma_example::IRQ_DMA_DONE;
/// IRQ_RAISE bit the guest uses for its "software" interrupts.
pub const IRQ_SOFT: u32 = 1;

// ---- A very small x86-64 assembler ------------------------------------
// Only 32-bit operations on the legacy registers (no REX prefix needed;
// a 32-bit write zero-extends into the 64-bit register, which is how the
// code below loads addresses < 4 GiB).
const EAX: u8 = 0;
const ECX: u8 = 1;
const EDX: u8 = 2;
const EBX: u8 = 3;
const ESI: u8 = 6;
const EDI: u8 = 7;

#[derive(Default)]
struct Asm {
    c: Vec<u8>,
}

impl Asm {
    fn pos(&self) -> usize {
        self.c.len()
    }
    fn bytes(&mut self, b: &[u8]) {
        self.c.extend_from_slice(b);
    }
    /// ModRM with a `[base + disp]` memory operand; disp8 when it fits.
    /// (base must not be ESP, which would need a SIB byte.)
    fn mem(&mut self, reg: u8, base: u8, disp: i32) {
        assert_ne!(base, 4);
        if let Ok(d) = i8::try_from(disp) {
            self.c.push(0x40 | (reg << 3) | base); // mod=01
            self.c.push(d as u8);
        } else {
            self.c.push(0x80 | (reg << 3) | base); // mod=10
            self.c.extend_from_slice(&disp.to_le_bytes());
        }
    }
    /// `mov [rcx + rbx + disp32], r32` (89 /r, mod=10 rm=100 with SIB
    /// scale 1, index rbx, base rcx): the handler's log slot.
    fn store_log(&mut self, disp: i32, r: u8) {
        self.bytes(&[0x89, 0x84 | (r << 3), 0x19]);
        self.c.extend_from_slice(&disp.to_le_bytes());
    }
    /// `mov r32, imm32` (B8+r id).
    fn mov_imm(&mut self, r: u8, imm: u32) {
        self.c.push(0xb8 + r);
        self.c.extend_from_slice(&imm.to_le_bytes());
    }
    /// `mov r32, [base+disp]` (8B /r): one MMIO read when base is the BAR.
    fn load(&mut self, r: u8, base: u8, disp: i32) {
        self.c.push(0x8b);
        self.mem(r, base, disp);
    }
    /// `mov [base+disp], r32` (89 /r).
    fn store(&mut self, base: u8, disp: i32, r: u8) {
        self.c.push(0x89);
        self.mem(r, base, disp);
    }
    /// `mov dword [base+disp], imm32` (C7 /0 id).
    fn store_imm(&mut self, base: u8, disp: i32, imm: u32) {
        self.c.push(0xc7);
        self.mem(0, base, disp);
        self.c.extend_from_slice(&imm.to_le_bytes());
    }
    /// `or [base+disp], r32` (09 /r).
    fn or_store(&mut self, base: u8, disp: i32, r: u8) {
        self.c.push(0x09);
        self.mem(r, base, disp);
    }
    /// `cmp [base+disp], r32` (39 /r).
    fn cmp_mem(&mut self, base: u8, disp: i32, r: u8) {
        self.c.push(0x39);
        self.mem(r, base, disp);
    }
    /// `inc dword [base+disp]` (FF /0).
    fn inc_mem(&mut self, base: u8, disp: i32) {
        self.c.push(0xff);
        self.mem(0, base, disp);
    }
    /// `cmp dst, src` (39 /r, register form).
    fn cmp_rr(&mut self, dst: u8, src: u8) {
        self.bytes(&[0x39, 0xc0 | (src << 3) | dst]);
    }
    /// `mov dst, src` (89 /r, register form).
    fn mov_rr(&mut self, dst: u8, src: u8) {
        self.bytes(&[0x89, 0xc0 | (src << 3) | dst]);
    }
    /// `xor dst, src` (31 /r, register form).
    fn xor_rr(&mut self, dst: u8, src: u8) {
        self.bytes(&[0x31, 0xc0 | (src << 3) | dst]);
    }
    /// `xor r32, imm32` (81 /6 id).
    fn xor_imm(&mut self, r: u8, imm: u32) {
        self.bytes(&[0x81, 0xf0 | r]);
        self.c.extend_from_slice(&imm.to_le_bytes());
    }
    /// `inc r32` (FF /0, register form).
    fn inc(&mut self, r: u8) {
        self.bytes(&[0xff, 0xc0 | r]);
    }
    /// `dec r32` (FF /1, register form).
    fn dec(&mut self, r: u8) {
        self.bytes(&[0xff, 0xc8 | r]);
    }
    /// `push r64` / `pop r64` (50+r / 58+r).
    fn push(&mut self, r: u8) {
        self.c.push(0x50 + r);
    }
    fn pop(&mut self, r: u8) {
        self.c.push(0x58 + r);
    }
    /// `mov al, imm8; out imm8, al` (B0 ib; E6 ib).
    fn out(&mut self, port: u16, v: u8) {
        let port = u8::try_from(port).unwrap();
        self.bytes(&[0xb0, v, 0xe6, port]);
    }
    /// `jnz rel8` back to `target` (75 cb).
    fn jnz_back(&mut self, target: usize) {
        let rel = i8::try_from(target as isize - (self.pos() as isize + 2)).unwrap();
        self.bytes(&[0x75, rel as u8]);
    }
    /// `jz rel8` back to `target` (74 cb).
    fn jz_back(&mut self, target: usize) {
        let rel = i8::try_from(target as isize - (self.pos() as isize + 2)).unwrap();
        self.bytes(&[0x74, rel as u8]);
    }
    /// A forward `jcc rel8` (74 je / 75 jne); patched by `bind`.
    fn jcc_fwd(&mut self, op: u8) -> usize {
        self.bytes(&[op, 0]);
        self.pos()
    }
    fn bind(&mut self, after_jump: usize) {
        let rel = u8::try_from(self.pos() - after_jump).unwrap();
        assert!(rel < 0x80);
        self.c[after_jump - 1] = rel;
    }
    /// `jmp $` (EB FE): parks the vCPU if the host ever resumes it.
    fn park(&mut self) {
        self.bytes(&[0xeb, 0xfe]);
    }
}

/// The ring-0 interrupt handler for `VECTOR`. Kept to plain `mov`/`push`/
/// `pop`/`inc`/`or`/`test`/`jz`/`iretq`, which PVM's emulator handles.
///
/// Like a Linux handler for a (possibly shared) level-triggered line, it
/// asks the device first: an invocation that finds IRQ_STATUS empty is
/// counted as spurious and only EOI'd. (On this PVM host every INTx is
/// delivered twice; see `docs/host.md`.)
fn handler_code(bar0: u32) -> Vec<u8> {
    let mut a = Asm::default();
    a.push(EAX);
    a.push(ECX);
    a.push(EDX);
    a.push(EBX);
    a.mov_imm(ECX, DATA as u32); // ecx = result block
                                 // ebx = (invocations % 64) * 16: this invocation's D_LOG slot.
    a.load(EBX, ECX, D_INVOCATIONS);
    a.bytes(&[0x83, 0xe3, 0x3f]); // and ebx, 63 (83 /4 ib)
    a.bytes(&[0xc1, 0xe3, 0x04]); // shl ebx, 4 (C1 /4 ib)
    a.inc_mem(ECX, D_INVOCATIONS);
    a.bytes(&[0x8b, 0x54, 0x24, 0x28]); // mov edx, [rsp+40]: interrupted CS
    a.store_log(D_LOG + 12, EDX);
    a.mov_imm(EAX, LAPIC as u32); // eax = LAPIC
    a.load(EDX, EAX, 0x110); // ISR bits 32..63: vector 0x30 is bit 16
    a.store_log(D_LOG + 4, EDX);
    a.load(EDX, EAX, 0x210); // IRR bits 32..63
    a.store_log(D_LOG + 8, EDX);
    a.mov_imm(EAX, bar0); // eax = BAR0
    a.load(EDX, EAX, REG_IRQ_STATUS); // edx = IRQ_STATUS (MMIO read)
    a.store_log(D_LOG, EDX);
    a.bytes(&[0x85, 0xd2]); // test edx, edx
    let spurious = a.jcc_fwd(0x74); // jz spurious
    a.or_store(ECX, D_IRQ_STATUS_OR, EDX); // record the cause
                                           // INTx is level-triggered: lower it at the device before the EOI, or
                                           // the IOAPIC would deliver it again at once.
    a.store(EAX, REG_IRQ_ACK, EDX); // IRQ_ACK = what was pending
                                    // Read back: flushes a posted ack (mpqemu) before the EOI, and lets
                                    // the test check that the line really went down.
    a.load(EDX, EAX, REG_IRQ_STATUS);
    a.or_store(ECX, D_AFTER_ACK_OR, EDX);
    a.inc_mem(ECX, D_IRQ_COUNT); // what ring 3 waits for
    let eoi = a.jcc_fwd(0xeb); // jmp eoi
    a.bind(spurious);
    a.inc_mem(ECX, D_SPURIOUS);
    a.bind(eoi);
    a.mov_imm(EAX, LAPIC as u32);
    a.store_imm(EAX, 0xb0, 0); // EOI
    a.pop(EBX);
    a.pop(EDX);
    a.pop(ECX);
    a.pop(EAX);
    a.bytes(&[0x48, 0xcf]); // iretq (REX.W CF)
    a.c
}

/// Ring 3 waits until the handler bumped D_IRQ_COUNT past `edi` (the value
/// read before triggering), for a bounded number of iterations. With
/// `poll`, every iteration also exits to the VMM (`in al, PORT_POLL`),
/// which shows how fast an interrupt arrives when the vCPU leaves guest
/// mode often, against a pure ring-3 spin. A wait that spends its budget
/// goes on polling the host's clock (`PORT_SLOW_WAIT`, then `PORT_POLL`)
/// and counts in D_TIMEOUTS only after `SLOW_WAIT_LIMIT`: the guest never
/// hangs, and a slow machine is not taken for a lost interrupt.
/// Clobbers eax, edx.
fn wait_irq(a: &mut Asm, poll: bool) {
    a.mov_imm(EDX, if poll { POLL_SPIN } else { SPIN });
    let top = a.pos();
    if poll {
        a.bytes(&[0xe4, PORT_POLL as u8]); // in al, PORT_POLL
    }
    a.cmp_mem(ESI, D_IRQ_COUNT, EDI); // cmp [count], edi
    let got = a.jcc_fwd(0x75); // jne got
    a.dec(EDX);
    a.jnz_back(top);
    // Budget spent: poll until the interrupt or the host says "too long".
    a.out(PORT_SLOW_WAIT, 0);
    let slow = a.pos();
    a.bytes(&[0xe4, PORT_POLL as u8]); // in al, PORT_POLL
    a.cmp_mem(ESI, D_IRQ_COUNT, EDI); // cmp [count], edi
    let got_late = a.jcc_fwd(0x75); // jne got
    a.bytes(&[0x84, 0xc0]); // test al, al
    a.jz_back(slow);
    a.inc_mem(ESI, D_TIMEOUTS);
    a.bind(got);
    a.bind(got_late);
}

/// The ring-3 program. Phases end with `out PORT_MARK, phase` so that the
/// host can time each one:
///
/// 1. ID and LIVENESS once;
/// 2. `n` reads of NULL_MMIO (bare exits);
/// 3. `n` SCRATCH writes;
/// 4. `n` SCRATCH reads;
/// 5. `n` checked write + read-back pairs;
/// 6. `irqs` interrupts via IRQ_RAISE, each awaited with a pure spin;
/// 7. the same, awaited with an exit per spin iteration;
/// 8. a DMA copy with its completion interrupt.
///
/// Then `out PORT_DONE`.
fn user_code(bar0: u32, n: u32, irqs: u32) -> Vec<u8> {
    let mut a = Asm::default();
    a.mov_imm(EBX, bar0); // rbx = BAR0 for the whole program
    a.mov_imm(ESI, DATA as u32); // rsi = result block

    a.load(EAX, EBX, REG_ID);
    a.store(ESI, D_ID, EAX);
    a.store_imm(EBX, REG_LIVENESS, LIVE_PAT);
    a.load(EAX, EBX, REG_LIVENESS);
    a.store(ESI, D_LIVENESS, EAX);
    a.out(PORT_MARK, 1);

    a.mov_imm(EDI, NULL_MMIO as u32);
    a.mov_imm(ECX, n);
    let l = a.pos();
    a.load(EAX, EDI, 0); // read nothing-decodes address
    a.dec(ECX);
    a.jnz_back(l);
    a.out(PORT_MARK, 2);

    a.mov_imm(ECX, n);
    let l = a.pos();
    a.store(EBX, REG_SCRATCH, ECX); // SCRATCH = counter
    a.dec(ECX);
    a.jnz_back(l);
    a.out(PORT_MARK, 3);

    a.mov_imm(ECX, n);
    let l = a.pos();
    a.load(EAX, EBX, REG_SCRATCH);
    a.dec(ECX);
    a.jnz_back(l);
    a.out(PORT_MARK, 4);

    a.mov_imm(ECX, n);
    a.xor_rr(EDI, EDI); // edi = mismatches
    let l = a.pos();
    a.mov_rr(EDX, ECX);
    a.xor_imm(EDX, 0x5a5a_0000); // a value that differs from phase 3's
    a.store(EBX, REG_SCRATCH, EDX);
    a.load(EAX, EBX, REG_SCRATCH);
    a.cmp_rr(EAX, EDX);
    let same = a.jcc_fwd(0x74); // je same
    a.inc(EDI);
    a.bind(same);
    a.dec(ECX);
    a.jnz_back(l);
    a.store(ESI, D_MISMATCHES, EDI);
    a.out(PORT_MARK, 5);

    for (poll, mark) in [(false, 6), (true, 7)] {
        if irqs > 0 {
            a.mov_imm(ECX, irqs);
            let l = a.pos();
            a.load(EDI, ESI, D_IRQ_COUNT); // count before
            a.store_imm(EBX, REG_IRQ_RAISE, IRQ_SOFT); // INTx goes high
            wait_irq(&mut a, poll);
            a.dec(ECX);
            a.jnz_back(l);
        }
        a.out(PORT_MARK, mark);
    }

    a.store_imm(EBX, REG_DMA_SRC, DMA_SRC as u32);
    a.store_imm(EBX, REG_DMA_SRC + 4, 0);
    a.store_imm(EBX, REG_DMA_DST, DMA_DST as u32);
    a.store_imm(EBX, REG_DMA_DST + 4, 0);
    a.store_imm(EBX, REG_DMA_LEN, DMA_LEN);
    a.load(EDI, ESI, D_IRQ_COUNT);
    a.store_imm(
        EBX,
        REG_DMA_CMD,
        dma_example::DMA_CMD_START | dma_example::DMA_CMD_IRQ,
    );
    wait_irq(&mut a, false);
    a.load(EAX, EBX, REG_DMA_RESULT);
    a.store(ESI, D_DMA_RESULT, EAX);
    a.out(PORT_MARK, 8);

    a.out(PORT_DONE, 0);
    a.park();
    a.c
}

/// Stub for vector `v`: `mov al, v; out PORT_FAULT, al; jmp $` (8 bytes
/// with padding).
fn stub(v: u8) -> [u8; 8] {
    [0xb0, v, 0xe6, PORT_FAULT as u8, 0xeb, 0xfe, 0x90, 0x90]
}

fn put(ram: &GuestRam, gpa: u64, bytes: &[u8]) {
    ram.mem.write_slice(bytes, GuestAddress(gpa)).unwrap();
}

fn put64(ram: &GuestRam, gpa: u64, v: u64) {
    put(ram, gpa, &v.to_le_bytes());
}

fn get32(ram: &GuestRam, gpa: u64) -> u32 {
    let mut b = [0u8; 4];
    ram.mem.read_slice(&mut b, GuestAddress(gpa)).unwrap();
    u32::from_le_bytes(b)
}

const K_CODE: u16 = 0x08;
const K_DATA: u16 = 0x10;
const U_CODE: u16 = 0x18 | 3;
const U_DATA: u16 = 0x20 | 3;
const TSS_SEL: u16 = 0x28;
/// 104-byte TSS + 32-byte I/O bitmap (ports 0..255) + terminator byte.
const TSS_LIMIT: u32 = 104 + 32 + 1 - 1;

/// Page tables, GDT, TSS, IDT and code.
fn build_image(ram: &GuestRam, bar0: u32, n: u32, irqs: u32) {
    // P | RW | US at every level: ring 3 needs US all the way down.
    put64(ram, PML4, PDPT | 0x7);
    put64(ram, PDPT, PD_LOW | 0x7);
    put64(ram, PDPT + 3 * 8, PD_HOLE | 0x7);
    for i in 0..512u64 {
        // 2 MiB pages (PS): RAM write-back; the hole PCD|PWT (uncached),
        // covering the BAR, NULL_MMIO, the IOAPIC and the LAPIC.
        put64(ram, PD_LOW + i * 8, (i << 21) | 0x87);
        put64(ram, PD_HOLE + i * 8, (0xc000_0000 + (i << 21)) | 0x9f);
    }

    // GDT: null, ring-0 code/data, ring-3 code/data (64-bit code: L=1),
    // then the 16-byte TSS descriptor (type 0xb: busy 64-bit TSS, as it
    // is already loaded through KVM_SET_SREGS).
    put64(ram, GDT, 0);
    put64(ram, GDT + 0x08, 0x00af_9b00_0000_ffff);
    put64(ram, GDT + 0x10, 0x00cf_9300_0000_ffff);
    put64(ram, GDT + 0x18, 0x00af_fb00_0000_ffff);
    put64(ram, GDT + 0x20, 0x00cf_f300_0000_ffff);
    let limit = u64::from(TSS_LIMIT);
    let tss_lo = limit
        | ((TSS & 0xffff) << 16)
        | (((TSS >> 16) & 0xff) << 32)
        | (0x8b << 40)
        | (((TSS >> 24) & 0xff) << 56);
    put64(ram, GDT + 0x28, tss_lo);
    put64(ram, GDT + 0x30, TSS >> 32);

    // TSS: RSP0 (offset 4) is the stack for ring 3 → ring 0. Ring 3's
    // `out`s are allowed by the I/O permission bitmap right after the
    // 104-byte TSS (PVM runs the guest with IOPL forced to 0, so IOPL=3
    // does not work here): ports 0..255, all denied (1) except
    // 0xe0..0xe7, plus the all-ones byte the CPU requires after it.
    put64(ram, TSS + 4, KSTACK_TOP);
    put(ram, TSS + 0x66, &104u16.to_le_bytes());
    let mut bitmap = [0xffu8; 33];
    bitmap[usize::from(PORT_MARK / 8)] = 0;
    put(ram, TSS + 104, &bitmap);

    // IDT: 256 interrupt gates (type 0xe, DPL 0, present), every vector
    // to its reporting stub except VECTOR to the handler.
    for v in 0..256u64 {
        let target = if v == u64::from(VECTOR) {
            HANDLER
        } else {
            STUBS + v * 8
        };
        let lo = (target & 0xffff)
            | (u64::from(K_CODE) << 16)
            | (0x8e << 40)
            | (((target >> 16) & 0xffff) << 48);
        put64(ram, IDT + v * 16, lo);
        put64(ram, IDT + v * 16 + 8, target >> 32);
        put(ram, STUBS + v * 8, &stub(v as u8));
    }
    put(ram, HANDLER, &handler_code(bar0));
    put(ram, USER_CODE, &user_code(bar0, n, irqs));
    let pattern: Vec<u8> = (0..DMA_LEN).map(|i| (i * 7 + 3) as u8).collect();
    put(ram, DMA_SRC, &pattern);
}

fn seg(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Long mode, paging on, ring 3, IF=1.
fn setup_vcpu(kvm: &Kvm, vm: &VmFd) -> VcpuFd {
    let vcpu = vm.create_vcpu(0).unwrap();
    let cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .unwrap();
    vcpu.set_cpuid2(&cpuid).unwrap();

    // LAPIC software-enabled (SVR bit 8, spurious vector 0xff), TPR 0.
    let mut lapic = vcpu.get_lapic().unwrap();
    let set = |regs: &mut [std::os::raw::c_char; 1024], off: usize, v: u32| {
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as std::os::raw::c_char;
        }
    };
    set(&mut lapic.regs, 0xf0, 0x1ff);
    set(&mut lapic.regs, 0x80, 0);
    vcpu.set_lapic(&lapic).unwrap();

    let mut s = vcpu.get_sregs().unwrap();
    s.cs = seg(U_CODE, true, 3);
    let d = seg(U_DATA, false, 3);
    s.ds = d;
    s.es = d;
    s.fs = d;
    s.gs = d;
    s.ss = d;
    s.tr = kvm_segment {
        base: TSS,
        limit: TSS_LIMIT,
        selector: TSS_SEL,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    s.gdt.base = GDT;
    s.gdt.limit = 0x37;
    s.idt.base = IDT;
    s.idt.limit = 256 * 16 - 1;
    s.cr3 = PML4;
    s.cr4 = 0x20; // PAE
    s.cr0 = 0x8001_0033; // PG | WP | NE | ET | MP | PE
    s.efer = 0x500; // LMA | LME
    vcpu.set_sregs(&s).unwrap();

    let regs = kvm_bindings::kvm_regs {
        rip: USER_CODE,
        rsp: USTACK_TOP,
        rflags: 0x2 | 0x200, // IF
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
    vcpu
}

/// Routes IOAPIC pin `gsi` to VECTOR on APIC 0, level-triggered, active
/// high, unmasked: what a guest OS would program, done by the host so the
/// guest needs no ring-0 setup code.
fn route_gsi(vm: &VmFd, gsi: u32) {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: chip_id IOAPIC selects the ioapic member of the union, and
    // `bits` covers the whole redirection entry.
    unsafe {
        chip.chip.ioapic.redirtbl[gsi as usize].bits = u64::from(VECTOR) | (1 << 15);
    }
    vm.set_irqchip(&chip).unwrap();
}

fn ioapic_entry(vm: &VmFd, gsi: u32) -> u64 {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: chip_id IOAPIC selects the ioapic member of the union;
    // `bits` covers the whole entry.
    unsafe { chip.chip.ioapic.redirtbl[gsi as usize].bits }
}

fn ioapic_irr(vm: &VmFd) -> u32 {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).unwrap();
    // SAFETY: chip_id IOAPIC selects the ioapic member of the union.
    unsafe { chip.chip.ioapic.irr }
}

/// What the run measured and what the guest reported.
#[derive(Debug, Default)]
pub struct Report {
    pub protocol: String,
    pub n: u32,
    pub irqs: u32,
    pub id: u32,
    pub liveness: u32,
    pub mismatches: u32,
    pub irq_count: u32,
    pub irq_status_or: u32,
    pub after_ack_or: u32,
    pub invocations: u32,
    pub spurious: u32,
    pub timeouts: u32,
    /// Waits that spent their spin budget and then polled the host clock
    /// (a slow machine, or an interrupt that never came).
    pub slow_waits: u32,
    pub dma_result: u32,
    pub dma_copied_ok: bool,
    pub ioapic_irr_at_end: u32,
    /// Per handler invocation (first 64): IRQ_STATUS, LAPIC ISR and IRR
    /// bits 32..63, interrupted CS.
    pub log: Vec<[u32; 4]>,
    /// IOAPIC redirection entry of the GSI at the end (remote IRR: bit 14).
    pub ioapic_entry_at_end: u64,
    /// LAPIC ISR bits 32..63 at the end, host view.
    pub lapic_isr_at_end: u32,
    /// MMIO exits seen by the host, all phases.
    pub mmio_reads: u64,
    pub mmio_writes: u64,
    /// Guest-visible round trip per access, from phase timestamps.
    pub ns_null_read: f64,
    pub ns_write: f64,
    pub ns_read: f64,
    pub ns_write_read_pair: f64,
    /// Part of that spent in PciRoot (the proxy) on the host.
    pub ns_proxy_write: f64,
    pub ns_proxy_read: f64,
    pub ns_per_irq: f64,
    /// The same when ring 3 exits on every spin iteration.
    pub ns_per_irq_polling: f64,
}

/// Kills the whole process if `limit` passes before the returned flag is
/// set: a wedged vCPU or remote can then never hang a test run.
pub fn watchdog(limit: Duration, what: &str) -> Arc<AtomicBool> {
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let what = what.to_string();
    std::thread::spawn(move || {
        let start = Instant::now();
        while !d.load(Ordering::Acquire) {
            if start.elapsed() > limit {
                eprintln!("FAIL: {what} still running after {limit:?}; aborting");
                std::process::exit(101);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    done
}

fn dump(vcpu: &VcpuFd, ram: &GuestRam) -> String {
    let r = vcpu.get_regs().unwrap();
    let s = vcpu.get_sregs().unwrap();
    // The ring-0 stack holds the interrupted frame (and maybe an error
    // code) when a stub reports an exception.
    let mut frame = [0u64; 6];
    for (i, f) in frame.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        ram.mem
            .read_slice(&mut b, GuestAddress(KSTACK_TOP - 48 + i as u64 * 8))
            .unwrap();
        *f = u64::from_le_bytes(b);
    }
    format!(
        "rip {:#x} rsp {:#x} rflags {:#x} rax {:#x} rcx {:#x} rdx {:#x}\n\
         cs {:?}\nss {:?}\ntr {:?}\ncr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}\n\
         top of ring-0 stack: {frame:#x?}",
        r.rip,
        r.rsp,
        r.rflags,
        r.rax,
        r.rcx,
        r.rdx,
        s.cs,
        s.ss,
        s.tr,
        s.cr0,
        s.cr2,
        s.cr3,
        s.cr4,
        s.efer
    )
}

/// One full run: spawn `remote-host` with dma-example over `protocol`,
/// build the guest, run it to PORT_DONE, collect the report.
pub fn run(protocol: &str, n: u32, irqs: u32) -> Report {
    let dir = crate::prerequisites::profile_dir();
    std::env::set_var("REMOTE_HOST", dir.join("remote-host"));
    let work = dir.join(format!(
        "host-ring3-guest-{}-{protocol}",
        std::process::id()
    ));
    std::fs::create_dir_all(&work).unwrap();
    let (_, cfg) = crate::prerequisites::dma_example_config(
        &work,
        "dev",
        &format!("log = \"remote.log\"\nprotocol = \"{protocol}\"\ntimeout-ms = 30000"),
        SLOT,
    );

    let kvm = Kvm::new().unwrap();
    let vm = kvm.create_vm().unwrap();
    let ram = GuestRam::new(64 << 20).unwrap();
    for (slot, r) in ram.regions.iter().enumerate() {
        let host = ram.mem.get_host_address(GuestAddress(r.gpa)).unwrap();
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: r.gpa,
            memory_size: r.size,
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of `r.size` bytes owned by
        // `ram`, which is dropped after `vm` (declared later, dropped
        // first).
        unsafe { vm.set_user_memory_region(region) }.unwrap();
    }
    vm.create_irq_chip().unwrap();

    let (proc, mut clients) = host::remote::connect(&cfg, &cfg.remotes[0], None).unwrap();
    let mut proc = proc.expect("spawned");
    let (_, client) = clients.pop().unwrap();
    let func = ProxyFunction::new("dma0", client, &ram, &vm, GSI).unwrap();
    let mut root = PciRoot::new();
    root.add(SLOT, Box::new(func)).unwrap();
    root.assign_resources(&|s| (s == SLOT).then_some(GSI as u8))
        .unwrap();
    // BAR0 as placed: read it like firmware would.
    let a = 0x8000_0000u32 | (u32::from(SLOT) << 11) | 0x10;
    root.pio_write(CONFIG_ADDRESS, &a.to_le_bytes());
    let mut d = [0u8; 4];
    root.pio_read(CONFIG_DATA, &mut d);
    let bar0 = u32::from_le_bytes(d) & !0xf;
    assert!(
        u64::from(bar0) >= host::memory::PCI_MMIO_START && u64::from(bar0) < NULL_MMIO,
        "BAR0 at {bar0:#x}"
    );

    build_image(&ram, bar0, n, irqs);
    route_gsi(&vm, GSI);
    let mut vcpu = setup_vcpu(&kvm, &vm);

    let mut rep = Report {
        protocol: protocol.to_string(),
        n,
        irqs,
        ..Default::default()
    };
    let mut marks: Vec<(u8, Instant)> = Vec::new();
    let mut slow_wait_since: Option<Instant> = None;
    // Host time spent in PciRoot per phase (index = phase ending).
    let mut proxy_by_phase = [(Duration::ZERO, Duration::ZERO); 9];
    let start = Instant::now();
    marks.push((0, start));
    // Far beyond any plausible run (~0.2 ms per iteration here), yet
    // bounded: the guest's waits are bounded too, so this always trips.
    let limit = Duration::from_secs(30) + Duration::from_micros(500) * n;
    let deadline = start + limit;
    loop {
        assert!(
            Instant::now() < deadline,
            "{protocol}: guest not done after {limit:?}\n{}",
            dump(&vcpu, &ram)
        );
        let phase = marks.len().min(8);
        match vcpu.run() {
            Ok(VcpuExit::MmioRead(addr, data)) => {
                rep.mmio_reads += 1;
                if (NULL_MMIO..NULL_MMIO + 0x1000).contains(&addr) {
                    data.fill(0);
                } else {
                    let t = Instant::now();
                    let hit = root.mmio_read(addr, data);
                    let e = t.elapsed();
                    proxy_by_phase[phase].0 += e;
                    assert!(hit, "{protocol}: guest read {addr:#x}: nothing decodes it");
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                rep.mmio_writes += 1;
                let t = Instant::now();
                let hit = root.mmio_write(addr, data);
                let e = t.elapsed();
                proxy_by_phase[phase].1 += e;
                assert!(hit, "{protocol}: guest wrote {addr:#x}: nothing decodes it");
            }
            Ok(VcpuExit::IoOut(PORT_MARK, data)) => marks.push((data[0], Instant::now())),
            Ok(VcpuExit::IoOut(PORT_DONE, _)) => break,
            Ok(VcpuExit::IoOut(PORT_FAULT, data)) => {
                let v = data[0];
                panic!(
                    "{protocol}: guest took vector {v:#x} (expected only {VECTOR:#x})\n{}",
                    dump(&vcpu, &ram)
                );
            }
            Ok(VcpuExit::IoOut(PORT_SLOW_WAIT, _)) => {
                rep.slow_waits += 1;
                slow_wait_since = Some(Instant::now());
            }
            Ok(VcpuExit::IoIn(PORT_POLL, data)) => {
                let too_long = slow_wait_since.is_some_and(|t| t.elapsed() > SLOW_WAIT_LIMIT);
                data.fill(u8::from(too_long));
            }
            Ok(VcpuExit::Intr) => {}
            Ok(other) => {
                let what = format!("{other:?}");
                panic!("{protocol}: unexpected exit {what}\n{}", dump(&vcpu, &ram));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => panic!("{protocol}: KVM_RUN: {e}\n{}", dump(&vcpu, &ram)),
        }
    }
    let phases: Vec<u8> = marks.iter().map(|m| m.0).collect();
    assert_eq!(
        phases,
        vec![0, 1, 2, 3, 4, 5, 6, 7, 8],
        "{protocol}: phase marks"
    );
    let span = |p: usize| (marks[p].1 - marks[p - 1].1).as_secs_f64() * 1e9;
    let nf = f64::from(n);
    rep.ns_null_read = span(2) / nf;
    rep.ns_write = span(3) / nf;
    rep.ns_read = span(4) / nf;
    rep.ns_write_read_pair = span(5) / nf;
    rep.ns_per_irq = if irqs > 0 {
        span(6) / f64::from(irqs)
    } else {
        0.0
    };
    rep.ns_per_irq_polling = if irqs > 0 {
        span(7) / f64::from(irqs)
    } else {
        0.0
    };
    rep.ns_proxy_write = proxy_by_phase[3].1.as_secs_f64() * 1e9 / nf;
    rep.ns_proxy_read = proxy_by_phase[4].0.as_secs_f64() * 1e9 / nf;

    rep.id = get32(&ram, DATA + D_ID as u64);
    rep.liveness = get32(&ram, DATA + D_LIVENESS as u64);
    rep.mismatches = get32(&ram, DATA + D_MISMATCHES as u64);
    rep.irq_count = get32(&ram, DATA + D_IRQ_COUNT as u64);
    rep.irq_status_or = get32(&ram, DATA + D_IRQ_STATUS_OR as u64);
    rep.after_ack_or = get32(&ram, DATA + D_AFTER_ACK_OR as u64);
    rep.invocations = get32(&ram, DATA + D_INVOCATIONS as u64);
    rep.spurious = get32(&ram, DATA + D_SPURIOUS as u64);
    let slot = |i: u32, k: u64| get32(&ram, DATA + D_LOG as u64 + u64::from(i) * 16 + k * 4);
    rep.log = (0..rep.invocations.min(64))
        .map(|i| [slot(i, 0), slot(i, 1), slot(i, 2), slot(i, 3)])
        .collect();
    rep.timeouts = get32(&ram, DATA + D_TIMEOUTS as u64);
    rep.dma_result = get32(&ram, DATA + D_DMA_RESULT as u64);
    let mut src = vec![0u8; DMA_LEN as usize];
    let mut dst = vec![0u8; DMA_LEN as usize];
    ram.mem.read_slice(&mut src, GuestAddress(DMA_SRC)).unwrap();
    ram.mem.read_slice(&mut dst, GuestAddress(DMA_DST)).unwrap();
    rep.dma_copied_ok = src == dst
        && src
            .iter()
            .enumerate()
            .all(|(i, b)| *b == (i as u32 * 7 + 3) as u8);
    rep.ioapic_irr_at_end = ioapic_irr(&vm);
    let l = vcpu.get_lapic().unwrap();
    rep.lapic_isr_at_end = u32::from_le_bytes([0, 1, 2, 3].map(|i| l.regs[0x110 + i] as u8));
    rep.ioapic_entry_at_end = ioapic_entry(&vm, GSI);

    root.shutdown();
    proc.stop(Duration::from_secs(3));
    std::fs::remove_dir_all(&work).ok();
    rep
}
