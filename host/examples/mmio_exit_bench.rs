//! MMIO exit microbenchmark on this machine's /dev/kvm with the tiny
//! ring-3 guest of `tests/ring3_guest.rs`: for each protocol and each
//! iteration count, the guest-visible round trip of a bare MMIO exit (an
//! address nothing decodes, answered by the vCPU loop itself), of a
//! dma-example BAR0 write and read through the proxy, and of one INTx
//! (raise → ring-0 handler → back in ring 3), awaited by a pure ring-3
//! spin and by a loop that exits on every iteration.
//!
//! `cargo build -p remote-host -p dma-example`, then
//! `cargo run -p host --example mmio_exit_bench -- [N ...]` (default N:
//! 1000 10000 30000). Prints a Markdown table. Not a test: nothing is
//! asserted about time, only that the guest's results are right.

#![allow(clippy::unwrap_used, clippy::panic)]

// A benchmark does not skip: it reports what is missing and exits.
#[allow(dead_code)]
#[path = "../tests/support/prerequisites.rs"]
mod prerequisites;
#[path = "../tests/support/tiny_guest.rs"]
mod tiny_guest;

use std::time::Duration;

fn main() {
    if let Some(why) = prerequisites::missing() {
        eprintln!("mmio_exit_bench: {why}");
        std::process::exit(2);
    }
    let ns: Vec<u32> = {
        let v: Vec<u32> = std::env::args()
            .skip(1)
            .map(|a| a.parse().expect("iteration counts"))
            .collect();
        if v.is_empty() {
            vec![1000, 10_000, 30_000]
        } else {
            v
        }
    };
    let done = tiny_guest::watchdog(Duration::from_secs(1800), "mmio_exit_bench");
    println!(
        "| protocol | iterations | null exit µs | BAR0 write µs (in proxy) | BAR0 read µs (in proxy) | write+read µs | INTx round trip µs (spinning / exiting) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for protocol in ["vfio-user", "mpqemu"] {
        for &n in &ns {
            let r = tiny_guest::run(protocol, n, 8);
            assert_eq!(r.mismatches, 0, "{protocol}: read-back mismatches");
            assert_eq!(r.id, tiny_guest::ID_VALUE);
            assert_eq!(r.irq_count, 17, "{protocol}: interrupts handled");
            println!(
                "| {protocol} | {n} | {:.1} | {:.1} ({:.1}) | {:.1} ({:.1}) | {:.1} | {:.0} / {:.0} |",
                r.ns_null_read / 1e3,
                r.ns_write / 1e3,
                r.ns_proxy_write / 1e3,
                r.ns_read / 1e3,
                r.ns_proxy_read / 1e3,
                r.ns_write_read_pair / 1e3,
                r.ns_per_irq / 1e3,
                r.ns_per_irq_polling / 1e3,
            );
        }
    }
    done.store(true, std::sync::atomic::Ordering::Release);
}
