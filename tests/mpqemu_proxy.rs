//! QEMU 7.2 as the VMM (`-device x-pci-proxy-dev`, the mpqemu client we
//! did not write) against our `remote-host serve --protocol mpqemu --fd 3`
//! with the dma-example plugin, under TCG: the Linux guest sees the
//! device's ids in `/sys/bus/pci`, binds it to uio_pci_generic, reads and
//! writes its BAR0 registers with `devmem` (each access a
//! BAR_READ/BAR_WRITE to our process at the address SeaBIOS placed the
//! BAR at) and runs a DMA between two buffers in guest RAM, which our
//! process reaches through the memfd QEMU sent with SYNC_SYSMEM (the job
//! is in `mpqemu_guest.rs`).
//!
//! Under TCG the proxy delivers no interrupts (its INTx path is a KVM
//! irqfd with resample), so no interrupt is checked here.
//!
//! The socketpair end QEMU uses is made non-CLOEXEC in this process and
//! passed as `fd=N` (see `mpqemu_guest::run_pair`); this test is alone in
//! its binary.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::time::Instant;

#[path = "mpqemu_guest.rs"]
mod guest;

#[test]
fn qemu_7_2_proxy_sees_our_remote_host_device() {
    system_tests::guest_test("mpqemu_proxy", |env| {
        let t0 = Instant::now();
        // No interrupt will come under TCG: do not wait long for it.
        let r = guest::run_pair(env, "mpqemu_proxy", "tcg", "max", 2);
        // Under TCG the proxy delivers no interrupt: everything else must work.
        guest::check(&r.output, false, &|| r.log.clone());
        if r.output.contains("uio-event none") {
            eprintln!(
            "mpqemu_proxy: no interrupt under TCG, as expected (the proxy's INTx needs KVM irqfd)"
        );
        }
        eprintln!(
            "mpqemu_proxy: passed in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
    });
}
