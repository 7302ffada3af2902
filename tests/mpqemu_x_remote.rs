//! Our mpqemu client (`channel::mpqemu::MpqemuClient`) against a peer we
//! did not write: Debian 12's QEMU 7.2 `-machine x-remote` running its own
//! `lsi53c895a`, on one end of a socketpair it inherits as fd 3 (the
//! orchestrator style of `docs/system/multi-process.rst`). No KVM: the
//! remote process itself runs no guest code.
//!
//! Checked: the probe `x-pci-proxy-dev` does at realize (ids, BAR sizes),
//! BAR writes and reads through memory and I/O BARs at the absolute
//! addresses we place them at, and a SCRIPTS `INT` placed in the shared
//! memfd that raises the irqfd (DSTAT then reads DFE|SIR = 0x84).
//!
//! QEMU 7.2 often exits with "Bad address febf0034 for mem read" on the
//! first BAR access right after the configuration writes that place the
//! BAR (the shared `protocols.md` §3). The test then starts a fresh
//! remote and tries again, and says so on its output.

#![allow(clippy::unwrap_used, clippy::panic)]

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use channel::mpqemu::{ClientError, ClientOptions, MpqemuClient, SysmemRegion};
use testenv::{Env, QemuKind};

const RAM_GPA: u64 = 0;
const RAM_SIZE: u64 = 16 << 20;
const IO_BASE: u64 = 0xc000;
const MMIO_BASE: u64 = 0xfebf_0000;
const RAM_BAR_BASE: u64 = 0xfebf_2000;
const SCRIPT_ADDR: u64 = 0x10_0000;

// LSI53C895A registers (offsets in BAR0 I/O and BAR1 memory).
const DSTAT: u64 = 0x0c;
const ISTAT: u64 = 0x14;
const DSP: u64 = 0x2c;
const DSPS: u64 = 0x30;
const SCRATCHA: u64 = 0x34;
const DIEN: u64 = 0x39;
const DIEN_SIR: u64 = 0x04;

struct Remote {
    child: Child,
    stderr: std::path::PathBuf,
}

impl Remote {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// Starts `qemu-system-x86_64 -machine x-remote` with its LSI on fd 3 of
/// a fresh socketpair; returns it with a client on our end.
fn start_remote(env: &Env, attempt: u32) -> (Remote, MpqemuClient) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let stderr = std::env::temp_dir().join(format!(
        "mpqemu-x-remote-{}-{attempt}.stderr",
        std::process::id()
    ));
    let mut cmd = env.qemu_command(QemuKind::Debian12);
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
    .stdout(Stdio::null())
    .stderr(File::create(&stderr).unwrap());
    testenv::inherit_as_fd3(&mut cmd, theirs.as_raw_fd());
    let child = cmd.spawn().unwrap();
    drop(theirs);
    let client = MpqemuClient::from_stream(
        ours,
        ClientOptions {
            timeout: Duration::from_secs(10),
            ..Default::default()
        },
    );
    (Remote { child, stderr }, client)
}

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is
    // checked and then owned by the File.
    let f = unsafe {
        let fd = libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create");
        File::from_raw_fd(fd)
    };
    f.set_len(size).unwrap();
    f
}

fn eventfd() -> File {
    // SAFETY: eventfd returns a new fd (checked) that the File owns.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
        assert!(fd >= 0, "eventfd");
        File::from_raw_fd(fd)
    }
}

fn fired(f: &File, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: f.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
        return false;
    }
    let mut b = [0u8; 8];
    (&*f).read_exact(&mut b).is_ok()
}

/// What x-pci-proxy-dev does at realize after SYNC_SYSMEM and SET_IRQFD:
/// ids, then each BAR sized with the proxy's formula.
fn probe(c: &mut MpqemuClient) -> Result<(u32, u32, Vec<u32>), ClientError> {
    let vendor = c.config_read(0, 2)?;
    let device = c.config_read(2, 2)?;
    let _class = c.config_read(0x0a, 2)?;
    let _subsys = c.config_read(0x2e, 2)?;
    let mut sizes = Vec::new();
    for i in 0..6u32 {
        let off = 0x10 + 4 * i;
        let orig = c.config_read(off, 4)?;
        c.config_write(off, 0xffff_ffff, 4)?;
        let v = c.config_read(off, 4)?;
        c.config_write(off, orig, 4)?;
        sizes.push(if v == 0 {
            0
        } else {
            (!(v & 0xffff_fff0)).wrapping_add(1)
        });
    }
    Ok((vendor, device, sizes))
}

/// Places the BARs as a guest would and enables decoding and bus mastering.
fn place(c: &mut MpqemuClient) -> Result<(), ClientError> {
    c.config_write(0x10, IO_BASE as u32, 4)?;
    c.config_write(0x14, MMIO_BASE as u32, 4)?;
    c.config_write(0x18, RAM_BAR_BASE as u32, 4)?;
    c.config_write(0x04, 0x0007, 2)
}

/// Whether the remote still has the placement of [`place`].
fn placed(c: &mut MpqemuClient) -> Result<bool, ClientError> {
    Ok(c.config_read(0x10, 4)? & !0x3 == IO_BASE as u32
        && c.config_read(0x14, 4)? & !0xf == MMIO_BASE as u32
        && c.config_read(0x18, 4)? & !0xf == RAM_BAR_BASE as u32
        && c.config_read(0x04, 2)? & 0x7 == 0x7)
}

#[test]
fn our_client_drives_qemu_7_2_x_remote_lsi() {
    system_tests::guest_test("mpqemu_x_remote", |env| {
        let t0 = Instant::now();
        let ram = memfd(RAM_SIZE);
        let irq = eventfd();
        let resample = eventfd();
        let mut retries = 0;
        let mut replaced = 0;
        let (remote, mut c) = loop {
            let (remote, mut c) = start_remote(env, retries);
            c.sync_sysmem(&[SysmemRegion {
                gpa: RAM_GPA,
                size: RAM_SIZE,
                offset: 0,
                fd: ram.as_fd(),
            }])
            .unwrap();
            c.set_irqfd(irq.as_fd(), resample.as_fd()).unwrap();
            let (vendor, device, sizes) =
                probe(&mut c).unwrap_or_else(|e| panic!("probe failed: {e}\n{}", remote.stderr()));
            assert_eq!((vendor, device), (0x1000, 0x0012), "LSI53C895A ids");
            assert_eq!(
                sizes,
                vec![0x100, 0x400, 0x2000, 0, 0, 0],
                "BAR sizes (I/O 256, MMIO 1 KiB, RAM 8 KiB)"
            );
            place(&mut c).unwrap();
            // x-remote serves the socket before its machine-init reset: config
            // writes that land before that reset are wiped (we measured BARs
            // reading 0 while the later command write stuck), and the first
            // BAR access then fails with "Bad address". Check and place again.
            if !placed(&mut c).unwrap() {
                replaced += 1;
                println!(
                "mpqemu_x_remote: x-remote lost our BAR placement (its startup reset came after \
                 our config writes); placing the BARs again"
            );
                place(&mut c).unwrap();
            }
            // The first BAR access after placing: where QEMU 7.2 may fail.
            match c
                .bar_read(MMIO_BASE + SCRATCHA, 4, true)
                .and_then(|_| c.bar_write(MMIO_BASE + SCRATCHA, 0x1234_5678, 4, true))
            {
                Ok(()) => break (remote, c),
                Err(e) => {
                    retries += 1;
                    let mut remote = remote;
                    let status = remote.child.wait().ok();
                    println!(
                    "mpqemu_x_remote: QEMU 7.2 x-remote failed the first BAR access after BAR placement \
                     ({e}; remote exited {status:?}; its stderr: {:?}) -- known QEMU 7.2 behaviour \
                     (protocols.md §3); retrying with a fresh remote ({retries})",
                    remote.stderr().trim()
                );
                    assert!(retries < 8, "x-remote failed {retries} times in a row");
                }
            }
        };
        // BAR reads and writes, memory and I/O.
        assert_eq!(
            c.bar_read(MMIO_BASE + SCRATCHA, 4, true).unwrap(),
            0x1234_5678,
            "SCRATCHA through BAR1 memory"
        );
        assert_eq!(
            c.bar_read(IO_BASE + SCRATCHA, 4, false).unwrap(),
            0x1234_5678,
            "SCRATCHA through BAR0 I/O"
        );
        c.bar_write(IO_BASE + SCRATCHA, 0xa5a5_0001, 4, false)
            .unwrap();
        assert_eq!(
            c.bar_read(MMIO_BASE + SCRATCHA + 2, 2, true).unwrap(),
            0xa5a5
        );
        // Posted writes against QEMU's remote: RETs collected later.
        for i in 0..32u64 {
            c.bar_write_posted(MMIO_BASE + SCRATCHA, i, 4, true)
                .unwrap();
        }
        assert_eq!(c.bar_read(MMIO_BASE + SCRATCHA, 4, true).unwrap(), 31);
        assert_eq!(c.posted_failures(), 0);
        // Script RAM (BAR2).
        c.bar_write(RAM_BAR_BASE + 0x10, 0xfeed_f00d, 4, true)
            .unwrap();
        assert_eq!(
            c.bar_read(RAM_BAR_BASE + 0x10, 4, true).unwrap(),
            0xfeed_f00d
        );

        // A SCRIPTS INT in the shared memfd: fetched by the remote through
        // its mapping of our memfd, raises SIR and the irqfd.
        let script: Vec<u8> = [0x9808_0000u32, 0x0000_00ab]
            .iter()
            .flat_map(|w| w.to_le_bytes())
            .collect();
        ram.write_all_at(&script, SCRIPT_ADDR - RAM_GPA).unwrap();
        c.bar_write(MMIO_BASE + DIEN, DIEN_SIR, 1, true).unwrap();
        assert!(!fired(&irq, 0), "no interrupt before the script");
        c.bar_write(MMIO_BASE + DSP, SCRIPT_ADDR, 4, true).unwrap();
        assert!(
            fired(&irq, 10_000),
            "irqfd fired after SCRIPTS INT\n{}",
            remote.stderr()
        );
        assert_eq!(
            c.bar_read(MMIO_BASE + DSPS, 4, true).unwrap(),
            0xab,
            "DSPS holds the INT vector"
        );
        assert_eq!(
            c.bar_read(MMIO_BASE + DSP, 4, true).unwrap(),
            SCRIPT_ADDR + 8,
            "DSP past the INT"
        );
        let istat = c.bar_read(MMIO_BASE + ISTAT, 1, true).unwrap();
        assert_eq!(istat & 0x01, 0x01, "ISTAT.DIP (got {istat:#x})");
        assert_eq!(
            c.bar_read(MMIO_BASE + DSTAT, 1, true).unwrap(),
            0x84,
            "DSTAT = DFE|SIR"
        );

        c.reset().unwrap();
        drop(c);
        // EOF: x-remote shuts down by itself.
        let mut remote = remote;
        let start = Instant::now();
        while remote.child.try_wait().unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "x-remote did not exit at EOF"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        println!(
        "mpqemu_x_remote: passed in {:.1} s; QEMU 7.2 first-BAR-access failure: {retries} fresh \
         remote(s), {replaced} re-placement(s) needed",
        t0.elapsed().as_secs_f64()
    );
    });
}
