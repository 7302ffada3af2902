//! Our mpqemu client against our server over a socketpair, with a small
//! device that places one BAR from configuration writes.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::mpqemu::client::{ClientError, ClientOptions, MpqemuClient, SysmemRegion};
use crate::mpqemu::messages::{Command, SyncSysmem};

const BAR_SIZE: u64 = 0x100;

/// Config: vendor 0x1af4, device 0x1234, BAR0 32-bit memory of 256 bytes.
/// BAR0 is RAM; a write at 0xf0 copies 16 bytes from the guest address
/// stored at 0xe0 to BAR offset 0x80 and signals the irqfd.
struct TestDevice {
    config: [u8; 256],
    bar: [u8; BAR_SIZE as usize],
    ram: Vec<(SysmemSlot, File)>,
    irqfd: Option<File>,
    resample: Option<File>,
    disconnects: u32,
    resets: u32,
}

impl TestDevice {
    fn new() -> Self {
        let mut config = [0u8; 256];
        config[0..2].copy_from_slice(&0x1af4u16.to_le_bytes());
        config[2..4].copy_from_slice(&0x1234u16.to_le_bytes());
        TestDevice {
            config,
            bar: [0; BAR_SIZE as usize],
            ram: Vec::new(),
            irqfd: None,
            resample: None,
            disconnects: 0,
            resets: 0,
        }
    }

    fn bar_base(&self) -> u64 {
        u64::from(
            u32::from_le_bytes([
                self.config[0x10],
                self.config[0x11],
                self.config[0x12],
                self.config[0x13],
            ]) & !0xf,
        )
    }

    fn decode(&self, addr: u64, len: usize) -> Result<usize, DeviceError> {
        let base = self.bar_base();
        match addr.checked_sub(base) {
            Some(off) if base != 0 && off + len as u64 <= BAR_SIZE => Ok(off as usize),
            _ => Err(DeviceError::invalid(format!("no BAR at {addr:#x}"))),
        }
    }

    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> bool {
        self.ram.iter().any(|(r, f)| {
            addr >= r.gpa
                && addr + buf.len() as u64 <= r.gpa + r.size
                && f.read_exact_at(buf, r.offset + addr - r.gpa).is_ok()
        })
    }
}

impl MpqemuDevice for TestDevice {
    fn sync_sysmem(&mut self, regions: Vec<(SysmemSlot, OwnedFd)>) -> Result<(), DeviceError> {
        self.ram = regions
            .into_iter()
            .map(|(s, fd)| (s, File::from(fd)))
            .collect();
        Ok(())
    }

    fn set_irqfd(&mut self, irqfd: OwnedFd, resamplefd: OwnedFd) -> Result<(), DeviceError> {
        self.irqfd = Some(File::from(irqfd));
        self.resample = Some(File::from(resamplefd));
        Ok(())
    }

    fn config_read(&mut self, addr: u32, data: &mut [u8]) -> Result<(), DeviceError> {
        let a = addr as usize;
        data.copy_from_slice(&self.config[a..a + data.len()]);
        Ok(())
    }

    fn config_write(&mut self, addr: u32, data: &[u8]) -> Result<(), DeviceError> {
        let a = addr as usize;
        self.config[a..a + data.len()].copy_from_slice(data);
        if a == 0x10 {
            // Size mask of a 256-byte 32-bit memory BAR.
            let v = u32::from_le_bytes([
                self.config[0x10],
                self.config[0x11],
                self.config[0x12],
                self.config[0x13],
            ]) & !(BAR_SIZE as u32 - 1);
            self.config[0x10..0x14].copy_from_slice(&v.to_le_bytes());
        }
        Ok(())
    }

    fn bar_read(&mut self, addr: u64, memory: bool, data: &mut [u8]) -> Result<(), DeviceError> {
        if !memory {
            return Err(DeviceError::invalid("no I/O BAR"));
        }
        let off = self.decode(addr, data.len())?;
        data.copy_from_slice(&self.bar[off..off + data.len()]);
        Ok(())
    }

    fn bar_write(&mut self, addr: u64, memory: bool, data: &[u8]) -> Result<(), DeviceError> {
        if !memory {
            return Err(DeviceError::invalid("no I/O BAR"));
        }
        let off = self.decode(addr, data.len())?;
        self.bar[off..off + data.len()].copy_from_slice(data);
        if off == 0xf0 {
            let mut a = [0u8; 8];
            a.copy_from_slice(&self.bar[0xe0..0xe8]);
            let mut buf = [0u8; 16];
            if !self.dma_read(u64::from_le_bytes(a), &mut buf) {
                return Err(DeviceError::new(libc::EFAULT, "DMA outside RAM"));
            }
            self.bar[0x80..0x90].copy_from_slice(&buf);
            if let Some(mut f) = self.irqfd.as_ref() {
                let _ = f.write_all(&1u64.to_ne_bytes());
            }
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.resets += 1;
        self.bar = [0; BAR_SIZE as usize];
        Ok(())
    }

    fn client_disconnected(&mut self) {
        self.disconnects += 1;
        self.ram.clear();
        self.irqfd = None;
        self.resample = None;
    }
}

type Served = JoinHandle<Result<(), ServerError>>;

fn start(opts: ServerOptions) -> (UnixStream, Arc<Mutex<TestDevice>>, Served) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let dev = Arc::new(Mutex::new(TestDevice::new()));
    let d = dev.clone();
    let t = std::thread::spawn(move || serve_connection(b, &*d, &opts));
    (a, dev, t)
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

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the result is
    // checked.
    let fd = unsafe { libc::memfd_create(c"mpqemu-test".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create");
    // SAFETY: `fd` is a fresh descriptor we own.
    let f = unsafe { File::from_raw_fd(fd) };
    f.set_len(size).expect("set_len");
    f
}

fn eventfd() -> File {
    // SAFETY: eventfd creates a new descriptor; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    assert!(fd >= 0, "eventfd");
    // SAFETY: `fd` is a fresh descriptor we own.
    unsafe { File::from_raw_fd(fd) }
}

fn wait_event(f: &File, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut b = [0u8; 8];
    while Instant::now() < deadline {
        if std::io::Read::read(&mut &*f, &mut b).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

#[test]
fn probe_place_bar_access_dma_irq_reset() {
    let (sock, dev, t) = start(ServerOptions::default());
    let mut c = client(sock);
    // Memory first, as x-pci-proxy-dev does.
    let ram = memfd(0x10000);
    ram.write_all_at(b"0123456789abcdef", 0x2010)
        .expect("write");
    c.sync_sysmem(&[SysmemRegion {
        gpa: 0x10_0000,
        size: 0x8000,
        offset: 0x1000,
        fd: ram.as_fd(),
    }])
    .expect("sync");
    let irq = eventfd();
    let resample = eventfd();
    c.set_irqfd(irq.as_fd(), resample.as_fd()).expect("irqfd");

    assert_eq!(c.config_read(0, 2).expect("vendor"), 0x1af4);
    assert_eq!(c.config_read(2, 2).expect("device"), 0x1234);
    // BAR sizing as the proxy does it.
    c.config_write(0x10, 0xffff_ffff, 4).expect("size");
    let v = c.config_read(0x10, 4).expect("mask");
    assert_eq!(!(v & 0xffff_fff0) + 1, 0x100);
    c.config_write(0x10, 0xfebf_0000, 4).expect("place");

    c.bar_write(0xfebf_0010, 0x1122_3344_5566_7788, 8, true)
        .expect("write");
    assert_eq!(
        c.bar_read(0xfebf_0010, 8, true).expect("read"),
        0x1122_3344_5566_7788
    );
    assert_eq!(c.bar_read(0xfebf_0012, 2, true).expect("read"), 0x5566);
    // Posted writes: seen by the next read, RETs collected in one go.
    for i in 0..200u64 {
        c.bar_write_posted(0xfebf_0020, i, 4, true).expect("posted");
    }
    assert_eq!(c.bar_read(0xfebf_0020, 4, true).expect("read"), 199);
    assert_eq!(c.posted_failures(), 0);
    // A posted write nothing decodes counts as a failure, later.
    c.bar_write_posted(0x1000, 1, 4, true).expect("posted");
    c.flush().expect("flush");
    assert_eq!(c.posted_failures(), 1);

    // DMA from the shared file, then the irqfd.
    c.bar_write(0xfebf_00e0, 0x10_1010, 8, true).expect("addr");
    c.bar_write(0xfebf_00f0, 1, 4, true).expect("go");
    let mut got = Vec::new();
    for off in (0x80..0x90).step_by(8) {
        got.extend_from_slice(
            &c.bar_read(0xfebf_0000 + off, 8, true)
                .expect("read")
                .to_le_bytes(),
        );
    }
    assert_eq!(got, b"0123456789abcdef");
    assert!(wait_event(&irq, Duration::from_secs(10)), "irqfd fired");
    assert!(dev.lock().expect("lock").resample.is_some());

    // Refusals keep the channel open.
    assert!(matches!(
        c.bar_read(0xfebf_0100, 4, true),
        Err(ClientError::Failed {
            cmd: Command::BarRead
        })
    ));
    assert!(matches!(
        c.bar_write(0xfebf_0000, 0, 4, false),
        Err(ClientError::Failed {
            cmd: Command::BarWrite
        })
    ));
    assert!(matches!(
        c.call(
            &Message::PciCfgRead(ConfigAccess {
                addr: 0xfd,
                val: 0,
                len: 4
            }),
            &[]
        ),
        Ok(Some(RET_FAILURE))
    ));
    assert!(matches!(
        c.call(
            &Message::PciCfgRead(ConfigAccess {
                addr: 0,
                val: 0,
                len: 3
            }),
            &[]
        ),
        Ok(Some(RET_FAILURE))
    ));
    assert!(matches!(
        c.config_read(0xfe, 4),
        Err(ClientError::Invalid(_))
    ));
    c.reset().expect("reset");
    assert_eq!(c.bar_read(0xfebf_0010, 4, true).expect("read"), 0);
    assert_eq!(dev.lock().expect("lock").resets, 1);

    drop(c);
    t.join().expect("join").expect("clean close");
    let d = dev.lock().expect("lock");
    assert_eq!(d.disconnects, 1);
    assert!(d.ram.is_empty() && d.irqfd.is_none());
}

fn expect_closed(
    mut raw: UnixStream,
    t: Served,
    bytes: &[u8],
    fds: &[std::os::fd::BorrowedFd<'_>],
) -> ServerError {
    let f = crate::framing::Framed::new(raw.try_clone().expect("clone"));
    f.send(bytes, fds, Duration::from_secs(1)).expect("send");
    let e = t.join().expect("join").expect_err("channel closed");
    // The server closed its end: we see EOF (or a reset, when it left
    // bytes unread).
    let mut b = [0u8; 1];
    match std::io::Read::read(&mut raw, &mut b) {
        Ok(n) => assert_eq!(n, 0, "EOF"),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
    }
    e
}

#[test]
fn malformed_messages_close_the_channel() {
    // Oversized: refused from the header, before the body.
    let (s, _d, t) = start(ServerOptions::default());
    let mut b = Vec::new();
    Header {
        cmd: 4,
        size: 1 << 40,
    }
    .encode(&mut b);
    let e = expect_closed(s, t, &b, &[]);
    assert!(
        matches!(e, ServerError::Framing(FramingError::Oversized { .. })),
        "{e}"
    );

    // Unknown command.
    let (s, _d, t) = start(ServerOptions::default());
    let mut b = Vec::new();
    Header { cmd: 8, size: 0 }.encode(&mut b);
    let e = expect_closed(s, t, &b, &[]);
    assert!(
        matches!(e, ServerError::Parse(ParseError::UnknownCommand(8))),
        "{e}"
    );

    // A short BAR access.
    let (s, _d, t) = start(ServerOptions::default());
    let mut b = Vec::new();
    Header { cmd: 5, size: 20 }.encode(&mut b);
    b.extend_from_slice(&[0; 20]);
    let e = expect_closed(s, t, &b, &[]);
    assert!(
        matches!(e, ServerError::Parse(ParseError::Size { .. })),
        "{e}"
    );

    // 8 fds: more than QEMU (and we) accept.
    let (s, _d, t) = start(ServerOptions::default());
    let f = File::open("/dev/null").expect("open");
    let fds = vec![f.as_fd(); 8];
    let b = Message::SyncSysmem(SyncSysmem::default()).to_bytes();
    let e = expect_closed(s, t, &b, &fds);
    assert!(
        matches!(e, ServerError::Framing(FramingError::TooManyFds { .. })),
        "{e}"
    );

    // SET_IRQFD with one fd.
    let (s, _d, t) = start(ServerOptions::default());
    let e = expect_closed(s, t, &Message::SetIrqfd.to_bytes(), &[f.as_fd()]);
    assert!(
        matches!(e, ServerError::Parse(ParseError::Fds { .. })),
        "{e}"
    );

    // A RET sent to the device side.
    let (s, _d, t) = start(ServerOptions::default());
    let e = expect_closed(s, t, &Message::Ret(Some(0)).to_bytes(), &[]);
    assert!(matches!(e, ServerError::Protocol(_)), "{e}");

    // Half a message, then silence: the rest times out.
    let (s, _d, t) = start(ServerOptions {
        timeout: Duration::from_millis(50),
        ..Default::default()
    });
    let e = expect_closed(s, t, &[5, 0, 0], &[]);
    assert!(
        matches!(e, ServerError::Framing(FramingError::Timeout(_))),
        "{e}"
    );
}

#[test]
fn client_times_out_and_breaks() {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let mut c = MpqemuClient::from_stream(
        a,
        ClientOptions {
            timeout: Duration::from_millis(50),
            ..Default::default()
        },
    );
    let start = Instant::now();
    let e = c.config_read(0, 4).expect_err("no answer");
    assert!(
        matches!(e, ClientError::Framing(FramingError::Timeout(_))),
        "{e}"
    );
    assert!(start.elapsed() >= Duration::from_millis(50));
    assert!(matches!(c.config_read(0, 4), Err(ClientError::Broken)));
    // A reply that is not a RET breaks a fresh client too.
    let (a2, b2) = UnixStream::pair().expect("socketpair");
    let mut c2 = client(a2);
    let peer = crate::framing::Framed::new(b2);
    peer.send(
        &Message::DeviceReset.to_bytes(),
        &[],
        Duration::from_secs(1),
    )
    .expect("send");
    assert!(matches!(
        c2.config_read(0, 4),
        Err(ClientError::Protocol(_))
    ));
    assert!(c2.is_broken());
    drop(b);
    // Too many regions are refused before anything is sent.
    let f = File::open("/dev/null").expect("open");
    let r = SysmemRegion {
        gpa: 0,
        size: 4096,
        offset: 0,
        fd: f.as_fd(),
    };
    let (a3, _b3) = UnixStream::pair().expect("socketpair");
    let mut c3 = client(a3);
    assert!(matches!(
        c3.sync_sysmem(&[r; 8]),
        Err(ClientError::Invalid(_))
    ));
    assert!(f.as_raw_fd() >= 0);
}

#[test]
fn posted_writes_with_a_small_window() {
    let (sock, _dev, t) = start(ServerOptions::default());
    let mut c = MpqemuClient::from_stream(
        sock,
        ClientOptions {
            timeout: Duration::from_secs(10),
            max_posted: 4,
            ..Default::default()
        },
    );
    c.config_write(0x10, 0xfebf_0000, 4).expect("place");
    for i in 0..1000u64 {
        c.bar_write_posted(0xfebf_0020, i, 4, true).expect("posted");
    }
    assert_eq!(c.bar_read(0xfebf_0020, 4, true).expect("read"), 999);
    assert_eq!(c.posted_failures(), 0);
    drop(c);
    t.join().expect("join").expect("clean close");
}
