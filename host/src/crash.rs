//! What a developer needs when a guest crashes (a triple fault, a failed
//! VM entry, a KVM internal error): each vCPU's registers, the last exits
//! each vCPU took (with the time the VMM spent on them), and the tail of
//! the console. `host run` prints it to standard error when the VM ends
//! that way.
//!
//! The exit log costs two clock reads and an uncontended lock per exit;
//! it is a fixed ring, so a long run costs no memory.
//!
//! On AMD, KVM re-initializes a vCPU's VMCB at a shutdown intercept: the
//! vCPU that triple-faulted shows its reset state there (its last exits
//! still tell where it was); the other vCPUs show where they were.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;

/// Exits kept per vCPU.
pub const EXITS_KEPT: usize = 32;

/// The kind of one exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    MmioRead,
    MmioWrite,
    PioIn,
    PioOut,
    Other(&'static str),
}

/// One exit a vCPU took.
#[derive(Clone, Copy, Debug)]
pub struct ExitRecord {
    /// Time since the VM started.
    pub at: Duration,
    pub kind: ExitKind,
    pub addr: u64,
    /// The access's bytes (little-endian, up to 8).
    pub data: u64,
    pub len: u8,
    /// How long the VMM took to serve it (for a proxy BAR read: the round
    /// trip to the remote).
    pub took: Duration,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn le_value(data: &[u8]) -> u64 {
    let mut v = [0u8; 8];
    let n = data.len().min(8);
    v[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(v)
}

/// One vCPU's part of the record.
#[derive(Debug, Default)]
struct VcpuRecord {
    exits: Mutex<VecDeque<ExitRecord>>,
    state: Mutex<Option<String>>,
}

/// The vCPUs' record, shared by the vCPU threads (the console's tail is
/// kept by [`ExitSignal`](crate::exit::ExitSignal), which sees every line).
#[derive(Debug)]
pub struct CrashRecord {
    start: Instant,
    vcpus: Vec<VcpuRecord>,
}

impl CrashRecord {
    pub fn new(vcpus: usize) -> Self {
        CrashRecord {
            start: Instant::now(),
            vcpus: (0..vcpus).map(|_| VcpuRecord::default()).collect(),
        }
    }

    /// Records an exit of vCPU `id` that began at `began`.
    pub fn exit(&self, id: u8, began: Instant, kind: ExitKind, addr: u64, data: &[u8]) {
        let Some(v) = self.vcpus.get(usize::from(id)) else {
            return;
        };
        let rec = ExitRecord {
            at: began.saturating_duration_since(self.start),
            kind,
            addr,
            data: le_value(data),
            len: data.len().min(255) as u8,
            took: began.elapsed(),
        };
        let mut q = lock(&v.exits);
        if q.len() == EXITS_KEPT {
            q.pop_front();
        }
        q.push_back(rec);
    }

    /// The last exits of vCPU `id`, oldest first.
    pub fn exits(&self, id: u8) -> Vec<ExitRecord> {
        self.vcpus
            .get(usize::from(id))
            .map(|v| lock(&v.exits).iter().copied().collect())
            .unwrap_or_default()
    }

    /// Reads vCPU `id`'s registers now (from its own thread, out of
    /// KVM_RUN) and keeps them for the report; a later capture replaces
    /// an earlier one only if there was none.
    pub fn capture(&self, id: u8, vcpu: &VcpuFd, why: &str) {
        let Some(v) = self.vcpus.get(usize::from(id)) else {
            return;
        };
        let mut s = lock(&v.state);
        if s.is_none() {
            *s = Some(format!("({why})\n{}", vcpu_state(vcpu)));
        }
    }

    /// The report, for `reason` (a line saying how the VM ended), with
    /// the console's last lines.
    pub fn report(&self, reason: &str, console: &[String]) -> String {
        self.render("crash report", reason, console, |id| {
            lock(&self.vcpus[id].state).clone()
        })
    }

    /// The same report for a VM that runs on (QMP `x-debug-report`: a
    /// guest that went quiet), with `registers` read now by the caller
    /// (`None` for a vCPU it could not stop). The crash captures are left
    /// alone for a crash that may still come.
    pub fn report_now(
        &self,
        reason: &str,
        console: &[String],
        registers: &[Option<String>],
    ) -> String {
        self.render("debug report", reason, console, |id| {
            registers.get(id).cloned().flatten()
        })
    }

    fn render(
        &self,
        title: &str,
        reason: &str,
        console: &[String],
        registers: impl Fn(usize) -> Option<String>,
    ) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "host: {title}: {reason}");
        for (id, v) in self.vcpus.iter().enumerate() {
            let _ = writeln!(out, "--- vCPU {id} registers");
            match registers(id) {
                Some(s) => out.push_str(&s),
                None => out.push_str("(not captured: the vCPU did not leave KVM_RUN in time)\n"),
            }
            let _ = writeln!(out, "--- vCPU {id} last exits (oldest first)");
            for e in lock(&v.exits).iter() {
                let dir = match e.kind {
                    ExitKind::MmioRead => "mmio-read ",
                    ExitKind::MmioWrite => "mmio-write",
                    ExitKind::PioIn => "pio-in    ",
                    ExitKind::PioOut => "pio-out   ",
                    ExitKind::Other(k) => k,
                };
                let _ = writeln!(
                    out,
                    "  t={:>10.6}s {dir} addr={:#010x} len={} data={:#x} took={}us",
                    e.at.as_secs_f64(),
                    e.addr,
                    e.len,
                    e.data,
                    e.took.as_micros()
                );
            }
        }
        let _ = writeln!(out, "--- console (last {} lines)", console.len());
        for l in console {
            let _ = writeln!(out, "  | {l}");
        }
        let _ = writeln!(out, "--- end of {title}");
        out
    }
}

/// General, special and event registers of a vCPU, as text (read from
/// any thread while the vCPU is out of KVM_RUN).
pub fn vcpu_state(vcpu: &VcpuFd) -> String {
    let mut out = String::new();
    match vcpu.get_regs() {
        Ok(r) => {
            let _ = writeln!(
                out,
                "  rip={:#018x} rsp={:#018x} rbp={:#018x} rflags={:#x}",
                r.rip, r.rsp, r.rbp, r.rflags
            );
            let _ = writeln!(
                out,
                "  rax={:#018x} rbx={:#018x} rcx={:#018x} rdx={:#018x}",
                r.rax, r.rbx, r.rcx, r.rdx
            );
            let _ = writeln!(
                out,
                "  rsi={:#018x} rdi={:#018x} r8={:#018x} r9={:#018x}",
                r.rsi, r.rdi, r.r8, r.r9
            );
            let _ = writeln!(
                out,
                "  r10={:#018x} r11={:#018x} r12={:#018x} r13={:#018x} r14={:#018x} r15={:#018x}",
                r.r10, r.r11, r.r12, r.r13, r.r14, r.r15
            );
        }
        Err(e) => {
            let _ = writeln!(out, "  KVM_GET_REGS: {e}");
        }
    }
    match vcpu.get_sregs() {
        Ok(s) => {
            let _ = writeln!(
                out,
                "  cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} cr8={:#x} efer={:#x} apic_base={:#x}",
                s.cr0, s.cr2, s.cr3, s.cr4, s.cr8, s.efer, s.apic_base
            );
            let _ = writeln!(
                out,
                "  cs={:#06x} (base {:#x}, l={}, dpl={}) ss={:#06x} tr={:#06x} (base {:#x})",
                s.cs.selector, s.cs.base, s.cs.l, s.cs.dpl, s.ss.selector, s.tr.selector, s.tr.base
            );
            let _ = writeln!(
                out,
                "  gdt={:#x}/{:#x} idt={:#x}/{:#x} interrupt_bitmap={:x?}",
                s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit, s.interrupt_bitmap
            );
        }
        Err(e) => {
            let _ = writeln!(out, "  KVM_GET_SREGS: {e}");
        }
    }
    match vcpu.get_vcpu_events() {
        Ok(ev) => {
            let _ = writeln!(
                out,
                "  exception: injected={} nr={} has_error={} error={:#x}; interrupt: injected={} nr={}; nmi: injected={} pending={} masked={}",
                ev.exception.injected,
                ev.exception.nr,
                ev.exception.has_error_code,
                ev.exception.error_code,
                ev.interrupt.injected,
                ev.interrupt.nr,
                ev.nmi.injected,
                ev.nmi.pending,
                ev.nmi.masked
            );
        }
        Err(e) => {
            let _ = writeln!(out, "  KVM_GET_VCPU_EVENTS: {e}");
        }
    }
    match vcpu.get_mp_state() {
        Ok(m) => {
            let _ = writeln!(out, "  mp_state={}", m.mp_state);
        }
        Err(e) => {
            let _ = writeln!(out, "  KVM_GET_MP_STATE: {e}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rings_keep_the_newest() {
        let r = CrashRecord::new(2);
        for i in 0..(EXITS_KEPT as u64 + 5) {
            r.exit(1, Instant::now(), ExitKind::MmioWrite, 0x1000 + i, &[1, 2]);
        }
        let e = r.exits(1);
        assert_eq!(e.len(), EXITS_KEPT);
        assert_eq!(e[0].addr, 0x1005);
        assert_eq!(e.last().map(|e| e.data), Some(0x0201));
        assert!(r.exits(0).is_empty());
        // An id past the vCPUs is ignored, not a panic.
        r.exit(9, Instant::now(), ExitKind::PioIn, 0, &[]);
        let text = r.report("test", &["line 3".to_owned()]);
        assert!(text.contains("  | line 3\n"), "{text}");
        assert!(text.contains("not captured"), "{text}");
        assert!(text.contains("addr=0x00001024"), "{text}");
    }
}
