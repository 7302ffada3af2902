//! The LSI53C895A controller as a guest drives it, in the plugin
//! harness: the input is a little program of register, configuration and
//! guest-RAM operations; SCRIPTS the guest starts run from that RAM and
//! send SCSI commands to two disks (one read-only).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use plugin_api::harness::{PluginSource, TestBench, BENCH_RAM_SIZE};

use crate::{timed, Input};

/// Operations, by the first byte of each (modulo their number).
pub mod op {
    pub const REG_WRITE: u8 = 0;
    pub const REG_READ: u8 = 1;
    pub const PORT_WRITE: u8 = 2;
    pub const PORT_READ: u8 = 3;
    pub const SCRIPT_RAM_WRITE: u8 = 4;
    pub const SCRIPT_RAM_READ: u8 = 5;
    /// Guest RAM in the first 64 KiB (where SCRIPTS and tables go).
    pub const RAM_WRITE_LOW: u8 = 6;
    /// Guest RAM anywhere in the bench's 16 MiB.
    pub const RAM_WRITE: u8 = 7;
    /// Put SCRIPTS in guest RAM and start them (write DSP).
    pub const START_SCRIPTS: u8 = 8;
    pub const CONFIG_WRITE: u8 = 9;
    /// Let the I/O worker run (up to 0.21 ms, enough for a command on
    /// the 1 MiB disks: SCRIPTS that loop keep it busy for the whole
    /// wait, and longer waits made up to half of an input's time sleep).
    pub const WAIT: u8 = 10;
    /// Reset, or a control operation as the VMM would ask for it.
    pub const HOST: u8 = 11;
    pub const COUNT: u8 = 12;
}

/// Most operations one input runs.
const MAX_OPS: usize = 512;

/// Size of each disk image.
const DISK_SIZE: u64 = 1 << 20;

fn image_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(
        || match tempfile::Builder::new().prefix("fuzz-lsi").tempdir() {
            Ok(d) => d,
            Err(e) => panic!("temporary directory: {e}"),
        },
    )
    .path()
}

/// Two fresh images (zeros; an input may have written or resized them)
/// and the controller settings that attach them at SCSI IDs 0 and 1.
fn settings() -> String {
    // Each thread has its own images: tests run in parallel in one
    // process, and one test truncating an image while another's bench
    // opens it made that bench see a 0-byte disk.
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static SLOT: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    let slot = SLOT.with(|s| *s);
    let dir = image_dir();
    let mut s = String::new();
    for (id, ro) in [(0, false), (1, true)] {
        let path: PathBuf = dir.join(format!("disk{id}-{slot}"));
        let r = File::create(&path).and_then(|f| f.set_len(DISK_SIZE));
        if let Err(e) = r {
            panic!("disk image: {e}");
        }
        s.push_str(&format!(
            "[[drive]]\nfile = {:?}\nscsi-id = {id}\nread-only = {ro}\n",
            path.display().to_string()
        ));
    }
    s
}

fn mmio_width(b: u8) -> usize {
    1 << (b % 4)
}

fn port_width(b: u8) -> usize {
    [1, 2, 4, 1][usize::from(b % 4)]
}

/// Keeps large allocations (the bench's 16 MiB of RAM) on fresh `mmap`s:
/// glibc otherwise raises its mmap threshold after the first free and
/// serves the next one from the heap, zeroing 16 MiB by hand per input
/// (0.6 ms, most of an input's time).
fn fresh_zero_pages() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt only changes a malloc tunable; it is called
        // once, before this target allocates a bench.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
        }
    });
}

/// A controller with two disks (SCSI IDs 0 and 1, the second read-only),
/// BARs placed: what both LSI targets start from.
pub(crate) fn controller() -> TestBench {
    fresh_zero_pages();
    let source = PluginSource::Linked(lsi53c895a::plugin_module());
    let mut tb = match TestBench::new(source, None, &settings()) {
        Ok(tb) => tb,
        Err(e) => panic!("cannot make the LSI bench: {e}"),
    };
    tb.map_bars();
    tb
}

/// Runs `data` as a guest program against a fresh controller.
pub fn lsi(data: &[u8]) {
    let mut tb = controller();
    let io = tb.bar_address(0);
    let regs = tb.bar_address(1);
    let sram = tb.bar_address(2);
    let mut input = Input::new(data);
    let mut ops = 0;
    while !input.is_empty() && ops < MAX_OPS {
        ops += 1;
        match input.u8() % op::COUNT {
            op::REG_WRITE => {
                let off = u64::from(input.u16() & 0x3ff);
                let len = mmio_width(input.u8());
                let v = u64::from(input.u32());
                timed("register write", || tb.mmio_write(regs + off, len, v));
            }
            op::REG_READ => {
                let off = u64::from(input.u16() & 0x3ff);
                let len = mmio_width(input.u8());
                timed("register read", || tb.mmio_read(regs + off, len));
            }
            op::PORT_WRITE => {
                let off = u64::from(input.u8());
                let len = port_width(input.u8());
                let v = u64::from(input.u32());
                timed("port write", || tb.pio_write(io + off, len, v));
            }
            op::PORT_READ => {
                let off = u64::from(input.u8());
                let len = port_width(input.u8());
                timed("port read", || tb.pio_read(io + off, len));
            }
            op::SCRIPT_RAM_WRITE => {
                let off = u64::from(input.u16() & 0x1fff);
                let len = mmio_width(input.u8());
                let v = u64::from(input.u32());
                timed("script RAM write", || tb.mmio_write(sram + off, len, v));
            }
            op::SCRIPT_RAM_READ => {
                let off = u64::from(input.u16() & 0x1fff);
                let len = mmio_width(input.u8());
                timed("script RAM read", || tb.mmio_read(sram + off, len));
            }
            op::RAM_WRITE_LOW => {
                let addr = u64::from(input.u16());
                let n = usize::from(input.u8());
                let bytes = input.take(n);
                tb.ram().write_all(addr, bytes);
            }
            op::RAM_WRITE => {
                let addr = u64::from(input.u32()) % (BENCH_RAM_SIZE as u64 - 256);
                let n = usize::from(input.u8());
                let bytes = input.take(n);
                tb.ram().write_all(addr, bytes);
            }
            op::START_SCRIPTS => {
                let addr = u64::from(input.u16() & !3);
                let n = 4 * usize::from(input.u8() % 64);
                let bytes = input.take(n);
                tb.ram().write_all(addr, bytes);
                timed("DSP write", || tb.mmio_write(regs + 0x2c, 4, addr));
            }
            op::CONFIG_WRITE => {
                let off = usize::from(input.u8());
                let len = port_width(input.u8());
                let v = input.u32();
                timed("config write", || tb.cfg_write(off, len, v));
            }
            op::WAIT => {
                let us = u64::from(input.u8() % 8) * 30;
                let _ = tb.wait_idle(Duration::from_micros(us));
            }
            _ => host_op(&mut tb, &mut input),
        }
    }
    if let Some(why) = tb.failure() {
        panic!("the controller failed: {why}");
    }
    timed("shutdown", || drop(tb));
}

/// What the VMM, not the guest, does: a reset, or a control operation.
fn host_op(tb: &mut TestBench, input: &mut Input<'_>) {
    let sub = input.u8();
    let arg = input.u32();
    let r = timed("host operation", || match sub % 5 {
        0 => tb
            .function()
            .reset()
            .map(|_| serde_json::Value::Null)
            .map_err(|e| format!("{e:?}")),
        1 => tb.control("stats", &serde_json::Value::Null),
        2 => tb.control("drive-list", &serde_json::Value::Null),
        3 => tb.control(
            "drive-resize",
            &serde_json::json!({"scsi-id": arg & 1, "size": u64::from(arg >> 1 & 0xfff) * 512}),
        ),
        _ => tb.control("drive-del", &serde_json::json!({"scsi-id": arg % 16})),
    });
    let _ = r;
}
