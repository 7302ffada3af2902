//! A tiny guest of our own on this machine's /dev/kvm (PVM, no nesting):
//! its ring-3 loop reads and writes a proxy function's BAR0 (dma-example
//! in a spawned `remote-host`), raises the device's INTx and waits for the
//! ring-0 handler, and has the device DMA a page with a completion
//! interrupt. Also prints the MMIO exit round trips it measured.
//!
//! Skips (outside CI) when /dev/kvm, `remote-host` or the plugin is
//! missing; under `CI=true` that is a failure. Build them with
//! `cargo build -p remote-host -p dma-example`.

#![allow(clippy::unwrap_used, clippy::panic)]

#[path = "support/prerequisites.rs"]
mod prerequisites;
#[path = "support/tiny_guest.rs"]
mod tiny_guest;

use std::time::Duration;

use tiny_guest::Report;

const N: u32 = 2000;
const IRQS: u32 = 8;

fn check(r: &Report) {
    let p = &r.protocol;
    assert_eq!(
        r.id,
        tiny_guest::ID_VALUE,
        "{p}: ID register read by the guest"
    );
    assert_eq!(
        r.liveness,
        !tiny_guest::LIVE_PAT,
        "{p}: LIVENESS reads back inverted"
    );
    assert_eq!(r.mismatches, 0, "{p}: SCRATCH read-back mismatches");
    assert_eq!(
        r.timeouts, 0,
        "{p}: guest waits without an interrupt ({} waits outlasted their spin budget)",
        r.slow_waits
    );
    // `irqs` raised while spinning, `irqs` while polling, 1 DMA completion.
    let raised = 2 * r.irqs;
    assert_eq!(
        r.irq_count,
        raised + 1,
        "{p}: interrupts handled ({raised} raised + 1 DMA completion)"
    );
    // Every invocation (real or spurious) interrupted the ring-3 loop:
    // the interrupt went through the IDT gate and TSS.RSP0 from CPL 3.
    for (i, e) in r.log.iter().enumerate() {
        assert_eq!(
            e[3], 0x1b,
            "{p}: invocation {i} interrupted CS {:#x}, not ring 3",
            e[3]
        );
    }
    // The causes, in order, of the invocations that found one: each
    // raised interrupt, then the DMA completion.
    let causes: Vec<u32> = r.log.iter().map(|e| e[0]).filter(|c| *c != 0).collect();
    let mut want = vec![tiny_guest::IRQ_SOFT; raised as usize];
    want.push(tiny_guest::IRQ_DMA_DONE);
    assert_eq!(causes, want, "{p}: IRQ_STATUS per handled interrupt");
    assert_eq!(r.invocations, r.irq_count + r.spurious, "{p}: invocations");
    // The EOIs reached the IOAPIC (remote IRR clear) and nothing is left
    // in service or pending.
    assert_eq!(
        r.ioapic_entry_at_end & (1 << 14),
        0,
        "{p}: IOAPIC remote IRR still set: an EOI went missing"
    );
    assert_eq!(
        r.lapic_isr_at_end, 0,
        "{p}: vector still in service at the end"
    );
    assert_eq!(
        r.irq_status_or,
        tiny_guest::IRQ_SOFT | tiny_guest::IRQ_DMA_DONE,
        "{p}: causes the handler saw in IRQ_STATUS"
    );
    assert_eq!(r.after_ack_or, 0, "{p}: IRQ_STATUS after the handler's ack");
    assert_eq!(r.dma_result, 0, "{p}: DMA_RESULT");
    assert!(
        r.dma_copied_ok,
        "{p}: DMA destination differs from the source"
    );
    assert_eq!(
        r.ioapic_irr_at_end & (1 << tiny_guest::GSI),
        0,
        "{p}: INTx still pending at the IOAPIC at the end"
    );
    // Every access the guest made really exited: 3 per-iteration loops
    // of reads (null, SCRATCH, checked) plus ID, LIVENESS, one
    // IRQ_STATUS pair per handled interrupt, one IRQ_STATUS read per
    // spurious one, and DMA_RESULT (the LAPIC is in-kernel: its reads and
    // the EOI do not reach user space).
    let n = u64::from(r.n);
    let irqs = u64::from(raised) + 1;
    assert_eq!(
        r.mmio_reads,
        3 * n + 2 + 2 * irqs + u64::from(r.spurious) + 1,
        "{p}: MMIO reads"
    );
    assert_eq!(
        r.mmio_writes,
        2 * n + 1 + u64::from(raised) + 6 + irqs,
        "{p}: MMIO writes"
    );
}

fn print(r: &Report) {
    eprintln!(
        "{}: ring-3 guest, {} iterations: null MMIO read {:.1} µs; BAR0 write {:.1} µs (proxy {:.1}); \
         BAR0 read {:.1} µs (proxy {:.1}); write+read {:.1} µs; raise→handler→back {:.1} µs per interrupt spinning in ring 3, {:.1} µs exiting while waiting; \
         handler: {} invocations, {} spurious (IRQ_STATUS empty); {} waits outlasted their spin budget",
        r.protocol,
        r.n,
        r.ns_null_read / 1e3,
        r.ns_write / 1e3,
        r.ns_proxy_write / 1e3,
        r.ns_read / 1e3,
        r.ns_proxy_read / 1e3,
        r.ns_write_read_pair / 1e3,
        r.ns_per_irq / 1e3,
        r.ns_per_irq_polling / 1e3,
        r.invocations,
        r.spurious,
        r.slow_waits,
    );
    eprintln!(
        "{}: per invocation [IRQ_STATUS, LAPIC ISR 32..63, IRR 32..63, CS]: {:x?}",
        r.protocol, r.log
    );
}

fn run(protocol: &str) {
    if prerequisites::or_skip().is_none() {
        return;
    }
    let done = tiny_guest::watchdog(Duration::from_secs(300), &format!("ring3_guest {protocol}"));
    let r = tiny_guest::run(protocol, N, IRQS);
    done.store(true, std::sync::atomic::Ordering::Release);
    print(&r);
    check(&r);
}

#[test]
fn ring3_guest_drives_proxy_function_vfio_user() {
    run("vfio-user");
}

#[test]
fn ring3_guest_drives_proxy_function_mpqemu() {
    run("mpqemu");
}
