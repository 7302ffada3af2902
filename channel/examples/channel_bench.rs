//! One table, one run: BAR-read round trip and write throughput for
//! - our vfio-user client ↔ `remote-host --protocol vfio-user` (dma-example),
//! - our mpqemu client ↔ `remote-host --protocol mpqemu` (dma-example),
//! - our mpqemu client ↔ QEMU 7.2 `-machine x-remote` (its own lsi53c895a).
//!
//! ```text
//! cargo build --release -p remote-host -p dma-example
//! cargo run --release -p channel --example channel_bench -- \
//!     [--iters 20000] [--writes 100000] [--remote-host PATH] [--plugin-dir DIR] [--qemu PATH]
//! ```
//!
//! `remote-host` and `libdma_example.so` default to the target directory
//! this example was built in. A 4-byte read of a scratch register (dma-example
//! SCRATCH, LSI SCRATCHA) is timed back to back ("busy") and after 1 ms of
//! idleness; writes go to the same register, posted (vfio-user `No_reply`;
//! mpqemu: RETs collected later in batches of 64) and acknowledged.
//! This is a benchmark, not a test: failures abort it.

#![allow(clippy::unwrap_used)] // a benchmark: a failure is fatal anyway

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use channel::mpqemu::{ClientOptions as MpOptions, MpqemuClient};
use channel::vfio_user::{ClientOptions as VuOptions, VfioUserClient};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[derive(Default)]
struct Row {
    name: &'static str,
    p50: Duration,
    p99: Duration,
    idle_p50: Duration,
    posted_per_s: f64,
    acked_per_s: f64,
}

fn percentile(s: &mut [Duration], p: f64) -> Duration {
    s.sort();
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i.min(s.len() - 1)]
}

/// Times `iters` reads back to back and `iters / 10` reads after 1 ms idle,
/// `writes` posted writes (plus the read that sees them all) and
/// `writes / 4` acknowledged writes.
fn measure(
    name: &'static str,
    iters: usize,
    writes: usize,
    read: &mut dyn FnMut() -> u32,
    posted: &mut dyn FnMut(u32),
    acked: &mut dyn FnMut(u32),
) -> Row {
    for _ in 0..1000 {
        read();
    }
    let mut busy = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t = Instant::now();
        read();
        busy.push(t.elapsed());
    }
    let mut idle = Vec::with_capacity(iters / 10);
    for _ in 0..(iters / 10).max(1) {
        std::thread::sleep(Duration::from_millis(1));
        let t = Instant::now();
        read();
        idle.push(t.elapsed());
    }
    let t = Instant::now();
    for i in 0..writes {
        posted(i as u32);
    }
    let last = read();
    let posted_s = t.elapsed().as_secs_f64();
    assert_eq!(
        last,
        (writes - 1) as u32,
        "{name}: a read sees every posted write"
    );
    let n_acked = (writes / 4).max(1);
    let t = Instant::now();
    for i in 0..n_acked {
        acked(i as u32);
    }
    let acked_s = t.elapsed().as_secs_f64();
    Row {
        name,
        p50: percentile(&mut busy, 0.5),
        p99: percentile(&mut busy, 0.99),
        idle_p50: percentile(&mut idle, 0.5),
        posted_per_s: writes as f64 / posted_s,
        acked_per_s: n_acked as f64 / acked_s,
    }
}

fn config(dir: &Path) -> PathBuf {
    let p = dir.join("vm.toml");
    std::fs::write(
        &p,
        "[vm]\nmemory = \"64M\"\nkernel = \"vmlinuz\"\n\n[[remote]]\nid = \"r\"\n\n\
         [[device]]\nid = \"dma0\"\nremote = \"r\"\nplugin = \"dma-example\"\nslot = 4\n",
    )
    .unwrap();
    p
}

fn remote_host(bin: &Path, plugins: &Path, cfg: &Path, protocol: &str) -> Command {
    let mut c = Command::new(bin);
    c.env_remove("PLUGIN_PATH")
        .env("RUST_LOG", "warn")
        .args(["serve", "--remote", "r", "--protocol", protocol, "--config"])
        .arg(cfg)
        .arg("--plugin-dir")
        .arg(plugins)
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    c
}

const SCRATCH: u64 = 0x08;
const BAR0: u64 = 0xfebf_0000;

fn vfio_user_row(bin: &Path, plugins: &Path, dir: &Path, iters: usize, writes: usize) -> Row {
    let sock = dir.join("dma0.sock");
    let _ = std::fs::remove_file(&sock);
    let _child = Killed(
        remote_host(bin, plugins, &config(dir), "vfio-user")
            .arg("--socket")
            .arg(&sock)
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    let mut c = loop {
        if sock.exists() {
            if let Ok(c) = VfioUserClient::connect(&sock, VuOptions::default()) {
                break c;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no vfio-user socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let c = std::cell::RefCell::new(&mut c);
    measure(
        "vfio-user: our client ↔ remote-host (dma-example)",
        iters,
        writes,
        &mut || {
            let mut b = [0u8; 4];
            c.borrow_mut().region_read(0, SCRATCH, &mut b).unwrap();
            u32::from_le_bytes(b)
        },
        &mut |v| {
            c.borrow_mut()
                .region_write_posted(0, SCRATCH, &v.to_le_bytes())
                .unwrap()
        },
        &mut |v| {
            c.borrow_mut()
                .region_write(0, SCRATCH, &v.to_le_bytes())
                .unwrap()
        },
    )
}

fn mpqemu_rows(
    c: &mut MpqemuClient,
    name: &'static str,
    addr: u64,
    iters: usize,
    writes: usize,
) -> Row {
    let c = std::cell::RefCell::new(c);
    measure(
        name,
        iters,
        writes,
        &mut || c.borrow_mut().bar_read(addr, 4, true).unwrap() as u32,
        &mut |v| {
            c.borrow_mut()
                .bar_write_posted(addr, u64::from(v), 4, true)
                .unwrap()
        },
        &mut |v| {
            c.borrow_mut()
                .bar_write(addr, u64::from(v), 4, true)
                .unwrap()
        },
    )
}

fn mpqemu_row(bin: &Path, plugins: &Path, dir: &Path, iters: usize, writes: usize) -> Row {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut cmd = remote_host(bin, plugins, &config(dir), "mpqemu");
    cmd.args(["--fd", "3"]);
    testenv::inherit_as_fd3(&mut cmd, theirs.as_raw_fd());
    let _child = Killed(cmd.spawn().unwrap());
    drop(theirs);
    let mut c = MpqemuClient::from_stream(ours, MpOptions::default());
    c.config_write(0x10, BAR0 as u32, 4).unwrap();
    c.config_write(0x04, 0x0006, 2).unwrap();
    mpqemu_rows(
        &mut c,
        "mpqemu: our client ↔ remote-host (dma-example)",
        BAR0 + SCRATCH,
        iters,
        writes,
    )
}

fn x_remote_row(qemu: &Path, iters: usize, writes: usize) -> Row {
    const MMIO: u64 = 0xfebf_0000;
    const SCRATCHA: u64 = 0x34;
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut cmd = Command::new(qemu);
    cmd.args([
        "-machine",
        "x-remote",
        "-nodefaults",
        "-display",
        "none",
        "-device",
        "lsi53c895a,id=lsi1",
        "-object",
        "x-remote-object,id=robj1,devid=lsi1,fd=3",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::null());
    testenv::inherit_as_fd3(&mut cmd, theirs.as_raw_fd());
    let _child = Killed(cmd.spawn().unwrap());
    drop(theirs);
    let mut c = MpqemuClient::from_stream(ours, MpOptions::default());
    // x-remote serves the socket before its startup reset, which wipes
    // config writes that came earlier: place, check, place again.
    let place = |c: &mut MpqemuClient| {
        c.config_write(0x14, MMIO as u32, 4).unwrap();
        c.config_write(0x04, 0x0006, 2).unwrap();
    };
    place(&mut c);
    std::thread::sleep(Duration::from_millis(200));
    if c.config_read(0x14, 4).unwrap() & !0xf != MMIO as u32 {
        eprintln!(
            "channel_bench: x-remote lost the BAR placement to its startup reset; placing again"
        );
        place(&mut c);
    }
    mpqemu_rows(
        &mut c,
        "mpqemu: our client ↔ QEMU 7.2 x-remote (lsi53c895a)",
        MMIO + SCRATCHA,
        iters,
        writes,
    )
}

fn us(d: Duration) -> String {
    format!("{:.1} µs", d.as_secs_f64() * 1e6)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let exe = std::env::current_exe().unwrap();
    // target/<profile>/examples/channel_bench -> target/<profile>
    let profile = exe.parent().unwrap().parent().unwrap().to_path_buf();
    let mut bin = profile.join("remote-host");
    let mut plugins = profile.clone();
    let mut qemu = PathBuf::from("/usr/bin/qemu-system-x86_64");
    let (mut iters, mut writes) = (20000usize, 100_000usize);
    while let Some(a) = args.next() {
        let mut val = || args.next().expect("missing value");
        match a.as_str() {
            "--iters" => iters = val().parse().unwrap(),
            "--writes" => writes = val().parse().unwrap(),
            "--remote-host" => bin = PathBuf::from(val()),
            "--plugin-dir" => plugins = PathBuf::from(val()),
            "--qemu" => qemu = PathBuf::from(val()),
            _ => {
                println!("usage: channel_bench [--iters N] [--writes N] [--remote-host PATH] [--plugin-dir DIR] [--qemu PATH]");
                return;
            }
        }
    }
    assert!(bin.is_file(), "{} not built", bin.display());
    assert!(
        plugins.join("libdma_example.so").is_file(),
        "libdma_example.so not in {}",
        plugins.display()
    );
    let dir = std::env::temp_dir().join(format!("channel-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rows = vec![
        vfio_user_row(&bin, &plugins, &dir, iters, writes),
        mpqemu_row(&bin, &plugins, &dir, iters, writes),
        x_remote_row(&qemu, iters, writes),
    ];
    std::fs::remove_dir_all(&dir).ok();
    println!("| pair | read p50 | read p99 | read p50 after 1 ms idle | posted writes/s | acknowledged writes/s |");
    println!("|---|---|---|---|---|---|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.0} | {:.0} |",
            r.name,
            us(r.p50),
            us(r.p99),
            us(r.idle_p50),
            r.posted_per_s,
            r.acked_per_s
        );
    }
}
