//! `remote-host serve --protocol mpqemu` with the dma-example plugin,
//! driven by our own mpqemu client (`channel::mpqemu`) the way QEMU's
//! `x-pci-proxy-dev` drives `x-remote`: over an inherited socketpair end,
//! and over a listening socket.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

mod common;
use common::*;

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use channel::mpqemu::messages::{ConfigAccess, Header, Message};
use channel::mpqemu::{ClientError, ClientOptions, MpqemuClient, SysmemRegion, RET_FAILURE};

/// Where the test places BAR0, and the guest RAM it shares.
const BAR0: u64 = 0xfebf_0000;
const RAM_GPA: u64 = 0x4000_0000;
const RAM_SIZE: u64 = 1 << 20;

fn command(tmp: &Path, devices: &[&str]) -> Command {
    serve_command(tmp, devices, "mpqemu")
}

fn log(tmp: &Path) -> String {
    remote_log(tmp)
}

/// Kills the child on drop (a failed test leaves no process behind).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether the eventfd was signalled within `ms` (consumed if so).
fn fired(f: &File, ms: u64) -> bool {
    wait_eventfd(f, Duration::from_millis(ms)).is_some()
}

fn client(sock: UnixStream) -> MpqemuClient {
    MpqemuClient::from_stream(
        sock,
        ClientOptions {
            timeout: Duration::from_secs(10),
            ..Default::default()
        },
    )
}

fn rd(c: &mut MpqemuClient, reg: u64) -> u32 {
    c.bar_read(BAR0 + reg, 4, true).unwrap() as u32
}

fn wr(c: &mut MpqemuClient, reg: u64, v: u32) {
    c.bar_write(BAR0 + reg, u64::from(v), 4, true).unwrap();
}

/// What x-pci-proxy-dev does at realize, then placing BAR0 as a guest
/// would. Returns the BAR sizes it computed.
fn probe_and_place(c: &mut MpqemuClient) -> Vec<u32> {
    assert_eq!(c.config_read(0, 2).unwrap(), 0x1234, "vendor");
    assert_eq!(c.config_read(2, 2).unwrap(), 0x11e9, "device");
    assert_eq!(c.config_read(0x0a, 2).unwrap(), 0x00ff, "class");
    assert_eq!(c.config_read(0x2e, 2).unwrap(), 0x0001, "subsystem");
    let mut sizes = Vec::new();
    for i in 0..6u32 {
        let off = 0x10 + 4 * i;
        let orig = c.config_read(off, 4).unwrap();
        c.config_write(off, 0xffff_ffff, 4).unwrap();
        let v = c.config_read(off, 4).unwrap();
        c.config_write(off, orig, 4).unwrap();
        sizes.push(if v == 0 {
            0
        } else {
            (!(v & 0xffff_fff0)).wrapping_add(1)
        });
    }
    c.config_write(0x10, BAR0 as u32, 4).unwrap();
    // Memory decoding and bus mastering.
    c.config_write(0x04, 0x0006, 2).unwrap();
    sizes
}

#[test]
fn inherited_socketpair_probe_bar_dma_irq_reset() {
    let tmp = tempfile::tempdir().unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let mut cmd = command(tmp.path(), &["dma0"]);
    cmd.args(["--fd", "3"]);
    testenv::inherit_as_fd3(&mut cmd, theirs.as_raw_fd());
    let mut child = Killed(cmd.spawn().unwrap());
    drop(theirs);
    let mut c = client(ours);

    // Realize order of x-pci-proxy-dev: memory, irqfd, probe.
    let ram = memfd(RAM_SIZE);
    c.sync_sysmem(&[SysmemRegion {
        gpa: RAM_GPA,
        size: RAM_SIZE,
        offset: 0,
        fd: ram.as_fd(),
    }])
    .unwrap();
    let irq = eventfd();
    let resample = eventfd();
    c.set_irqfd(irq.as_fd(), resample.as_fd()).unwrap();
    let sizes = probe_and_place(&mut c);
    assert_eq!(sizes, vec![0x1000, 0, 0, 0, 0, 0], "BAR sizes");

    // Registers through absolute addresses.
    assert_eq!(rd(&mut c, REG_ID), ID_VALUE);
    wr(&mut c, REG_SCRATCH, 0x5a5a_1234);
    assert_eq!(rd(&mut c, REG_SCRATCH), 0x5a5a_1234);
    wr(&mut c, REG_LIVENESS, 0x0f0f_0f0f);
    assert_eq!(rd(&mut c, REG_LIVENESS), 0xf0f0_f0f0);
    assert_eq!(c.bar_read(BAR0 + REG_ID, 2, true).unwrap(), 0x0001);
    for i in 0..100u32 {
        c.bar_write_posted(BAR0 + REG_SCRATCH, u64::from(i), 4, true)
            .unwrap();
    }
    assert_eq!(rd(&mut c, REG_SCRATCH), 99, "posted writes seen in order");
    assert_eq!(c.posted_failures(), 0);

    // DMA through the memfd, then INTx through the irqfd.
    let pattern: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(7)).collect();
    ram.write_all_at(&pattern, 0x100).unwrap();
    wr(&mut c, REG_DMA_SRC, (RAM_GPA + 0x100) as u32);
    wr(&mut c, REG_DMA_SRC + 4, ((RAM_GPA + 0x100) >> 32) as u32);
    wr(&mut c, REG_DMA_DST, (RAM_GPA + 0x8000) as u32);
    wr(&mut c, REG_DMA_DST + 4, ((RAM_GPA + 0x8000) >> 32) as u32);
    wr(&mut c, REG_DMA_LEN, 64);
    wr(&mut c, REG_DMA_CMD, DMA_CMD_START | DMA_CMD_IRQ);
    assert!(fired(&irq, 10_000), "irqfd fired after the DMA");
    assert_eq!(rd(&mut c, REG_DMA_RESULT), 0);
    let mut back = vec![0u8; 64];
    ram.read_exact_at(&mut back, 0x8000).unwrap();
    assert_eq!(back, pattern, "the device copied through the shared memfd");
    assert_eq!(rd(&mut c, REG_IRQ_STATUS), IRQ_DMA_DONE);
    // EOI while the level is high: the resample fd re-raises.
    (&resample).write_all_ne(1);
    assert!(fired(&irq, 10_000), "re-signalled at resample");
    // Status.INTERRUPT shows the level; Command.INTX_DISABLE masks it
    // (what Linux's pci_check_and_mask_intx does), clearing re-signals.
    assert_eq!(
        c.config_read(0x06, 1).unwrap() & 0x08,
        0x08,
        "status INTERRUPT"
    );
    assert_eq!(c.config_read(0x04, 4).unwrap() >> 16 & 0x08, 0x08);
    c.config_write(0x04, 0x0406, 2).unwrap();
    (&resample).write_all_ne(1);
    assert!(!fired(&irq, 200), "masked by INTX_DISABLE");
    c.config_write(0x04, 0x0006, 2).unwrap();
    assert!(fired(&irq, 10_000), "unmasked while high: signalled");
    wr(&mut c, REG_IRQ_ACK, IRQ_DMA_DONE);
    (&resample).write_all_ne(1);
    assert!(!fired(&irq, 200), "no signal once the level is low");
    assert_eq!(
        c.config_read(0x06, 1).unwrap() & 0x08,
        0,
        "status INTERRUPT clear"
    );

    // Refusals get RET u64::MAX and the channel goes on.
    let r = c
        .call(
            &Message::PciCfgRead(ConfigAccess {
                addr: 0xfd,
                val: 0,
                len: 4,
            }),
            &[],
        )
        .unwrap();
    assert_eq!(r, Some(RET_FAILURE), "config read beyond 256 bytes");
    assert!(matches!(
        c.bar_read(BAR0 + 0x1000, 4, true),
        Err(ClientError::Failed { .. })
    ));
    assert!(matches!(
        c.bar_read(BAR0, 4, false),
        Err(ClientError::Failed { .. })
    ));
    assert_eq!(rd(&mut c, REG_ID), ID_VALUE);

    // Reset: RET of size 0; the configuration space forgets BAR0.
    c.reset().unwrap();
    assert!(matches!(
        c.bar_read(BAR0 + REG_ID, 4, true),
        Err(ClientError::Failed { .. })
    ));
    probe_and_place(&mut c);
    assert_eq!(rd(&mut c, REG_SCRATCH), 0, "device registers reset");

    // The VMM goes away: the process ends by itself, status 0.
    drop(c);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "remote-host did not exit after its client left:\n{}",
            log(tmp.path())
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}:\n{}", log(tmp.path()));
}

trait WriteNe {
    fn write_all_ne(self, v: u64);
}

impl WriteNe for &File {
    fn write_all_ne(mut self, v: u64) {
        std::io::Write::write_all(&mut self, &v.to_ne_bytes()).unwrap();
    }
}

fn connect(path: &Path, child: &mut Killed, tmp: &Path) -> UnixStream {
    let start = Instant::now();
    loop {
        if let Ok(s) = UnixStream::connect(path) {
            return s;
        }
        if let Some(st) = child.0.try_wait().unwrap() {
            panic!("remote-host exited with {st}:\n{}", log(tmp));
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "remote-host does not listen on {}:\n{}",
            path.display(),
            log(tmp)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn socket_directory_bad_message_closes_one_channel_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sockets");
    let mut cmd = command(tmp.path(), &["a", "b"]);
    cmd.arg("--socket").arg(&dir);
    let mut child = Killed(cmd.spawn().unwrap());
    let sa = connect(&dir.join("a.sock"), &mut child, tmp.path());
    let sb = connect(&dir.join("b.sock"), &mut child, tmp.path());
    let mut b = client(sb);
    probe_and_place(&mut b);
    wr(&mut b, REG_SCRATCH, 0xb0b0);

    // A header announcing 1 TiB: refused before any body is read, and
    // that connection is closed.
    let mut bad = client(sa);
    let mut raw = Vec::new();
    Header {
        cmd: 5,
        size: 1 << 40,
    }
    .encode(&mut raw);
    bad.send_raw(&raw, &[]).unwrap();
    let mut byte = [0u8; 1];
    bad.socket()
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    match bad.socket().read(&mut byte) {
        Ok(n) => assert_eq!(n, 0, "EOF"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
    }
    // Too many fds on a SYNC_SYSMEM: closed as well.
    let mut bad = client(connect(&dir.join("a.sock"), &mut child, tmp.path()));
    let f = memfd(4096);
    let fds = vec![f.as_fd(); 8];
    let sync = Message::SyncSysmem(Default::default()).to_bytes();
    bad.send_raw(&sync, &fds).unwrap();
    assert!(matches!(
        bad.config_read(0, 2),
        Err(ClientError::Framing(_))
    ));

    // The same device serves the next client; the other never noticed.
    let mut a = client(connect(&dir.join("a.sock"), &mut child, tmp.path()));
    assert_eq!(a.config_read(0, 2).unwrap(), 0x1234);
    assert_eq!(rd(&mut b, REG_SCRATCH), 0xb0b0);
    assert!(child.0.try_wait().unwrap().is_none(), "still serving");
    let l = log(tmp.path());
    assert!(l.contains("mpqemu channel closed"), "{l}");
}
