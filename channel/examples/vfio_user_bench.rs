//! Round-trip and posted-write numbers for a vfio-user server.
//!
//! ```text
//! cargo run -p channel --example vfio_user_bench -- SOCKET \
//!     [--region 0] [--offset 0x8] [--iters 20000] [--poll-us 50] [--idle-us 0]
//! ```
//!
//! Reads and writes 4 bytes at `offset` of `region` (default: BAR0 offset
//! 8, dma-example's SCRATCH register). Prints REGION_READ round trip
//! p50/p99 and posted REGION_WRITE throughput (posted writes followed by
//! one read, which sees them all).

#![allow(clippy::unwrap_used)] // a benchmark: a failure is fatal anyway

use std::path::PathBuf;
use std::time::{Duration, Instant};

use channel::vfio_user::{ClientOptions, VfioUserClient};

fn parse_u64(s: &str) -> u64 {
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).unwrap(),
        None => s.parse().unwrap(),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut socket: Option<PathBuf> = None;
    let (mut region, mut offset, mut iters, mut poll_us, mut idle_us) =
        (0u32, 8u64, 20000usize, 50u64, 0u64);
    while let Some(a) = args.next() {
        let mut val = || parse_u64(&args.next().expect("missing value"));
        match a.as_str() {
            "--region" => region = val() as u32,
            "--offset" => offset = val(),
            "--iters" => iters = val() as usize,
            "--poll-us" => poll_us = val(),
            "--idle-us" => idle_us = val(),
            "-h" | "--help" => {
                println!("usage: vfio_user_bench SOCKET [--region N] [--offset X] [--iters N] [--poll-us N] [--idle-us N]");
                return;
            }
            _ => socket = Some(PathBuf::from(a)),
        }
    }
    let socket = socket.expect("usage: vfio_user_bench SOCKET [options]");
    let opts = ClientOptions {
        poll: Duration::from_micros(poll_us),
        ..Default::default()
    };
    let mut c = VfioUserClient::connect(&socket, opts).unwrap();
    let mut b = [0u8; 4];
    for _ in 0..1000.min(iters) {
        c.region_read(region, offset, &mut b).unwrap();
    }
    let mut samples: Vec<Duration> = Vec::with_capacity(iters);
    for _ in 0..iters {
        if idle_us > 0 {
            std::thread::sleep(Duration::from_micros(idle_us));
        }
        let t = Instant::now();
        c.region_read(region, offset, &mut b).unwrap();
        samples.push(t.elapsed());
    }
    samples.sort();
    let pct = |p: usize| samples[(samples.len() * p / 100).min(samples.len() - 1)];
    println!(
        "REGION_READ round trip ({iters} reads, client poll {poll_us} us, idle gap {idle_us} us): p50 {:?} p99 {:?} max {:?}",
        pct(50),
        pct(99),
        samples[samples.len() - 1]
    );
    let t = Instant::now();
    for i in 0..iters as u32 {
        c.region_write_posted(region, offset, &i.to_le_bytes())
            .unwrap();
    }
    c.region_read(region, offset, &mut b).unwrap();
    let el = t.elapsed();
    assert_eq!(
        u32::from_le_bytes(b),
        iters as u32 - 1,
        "the read sees the last posted write"
    );
    println!(
        "posted REGION_WRITE: {iters} in {el:?} = {:.0} writes/s (then one read saw the last)",
        iters as f64 / el.as_secs_f64()
    );
    let t = Instant::now();
    for i in 0..(iters / 4) as u32 {
        c.region_write(region, offset, &i.to_le_bytes()).unwrap();
    }
    let el = t.elapsed();
    println!(
        "acknowledged REGION_WRITE: {} in {el:?} = {:.0} writes/s",
        iters / 4,
        (iters / 4) as f64 / el.as_secs_f64()
    );
}
