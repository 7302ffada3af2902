//! Our client against our server over a socketpair, with a small device.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::*;
use crate::vfio_user::client::{ClientError, ClientOptions, VfioUserClient};
use crate::vfio_user::messages::Command;
use crate::vfio_user::{
    DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, IRQ_INFO_EVENTFD, PCI_CONFIG_REGION_INDEX, PCI_NUM_IRQS,
    PCI_NUM_REGIONS,
};

/// BAR0: 256 bytes of RAM; writing offset 0xf0 copies 16 bytes from DMA
/// address (u64 at 0xe0) to BAR offset 0x80 and fires INTx.
#[derive(Default)]
struct TestDevice {
    bar0: Vec<u8>,
    config: Vec<u8>,
    maps: Vec<(DmaMap, File)>,
    intx: Option<OwnedFd>,
    disconnects: u32,
    resets: u32,
}

impl TestDevice {
    fn new() -> Self {
        TestDevice {
            bar0: vec![0; 256],
            config: vec![0x34; 256],
            ..Default::default()
        }
    }

    fn dma_read(&self, addr: u64, buf: &mut [u8]) -> bool {
        for (m, f) in &self.maps {
            if addr >= m.addr && addr + buf.len() as u64 <= m.addr + m.size {
                return f.read_exact_at(buf, m.offset + addr - m.addr).is_ok();
            }
        }
        false
    }
}

impl VfioUserDevice for TestDevice {
    fn device_info(&self) -> DeviceInfo {
        DeviceInfo {
            argsz: 0,
            flags: DEVICE_FLAGS_PCI | DEVICE_FLAGS_RESET,
            num_regions: PCI_NUM_REGIONS,
            num_irqs: PCI_NUM_IRQS,
        }
    }

    fn region_info(&self, index: u32) -> Option<RegionInfo> {
        let size = match index {
            0 => 256,
            PCI_CONFIG_REGION_INDEX => 256,
            i if i < PCI_NUM_REGIONS => 0,
            _ => return None,
        };
        let flags = if size > 0 {
            REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
        } else {
            0
        };
        Some(RegionInfo {
            flags,
            index,
            size,
            ..Default::default()
        })
    }

    fn irq_info(&self, index: u32) -> Option<IrqInfo> {
        (index < PCI_NUM_IRQS).then(|| IrqInfo {
            argsz: 0,
            flags: if index == 0 { IRQ_INFO_EVENTFD } else { 0 },
            index,
            count: u32::from(index == 0),
        })
    }

    fn region_read(
        &mut self,
        region: u32,
        offset: u64,
        data: &mut [u8],
    ) -> Result<(), DeviceError> {
        let src = if region == 0 {
            &self.bar0
        } else {
            &self.config
        };
        let o = offset as usize;
        data.copy_from_slice(&src[o..o + data.len()]);
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let o = offset as usize;
        if region == 0 {
            self.bar0[o..o + data.len()].copy_from_slice(data);
            if o == 0xf0 {
                let mut a = [0u8; 8];
                a.copy_from_slice(&self.bar0[0xe0..0xe8]);
                let mut buf = [0u8; 16];
                if !self.dma_read(u64::from_le_bytes(a), &mut buf) {
                    return Err(DeviceError::new(libc::EFAULT, "DMA outside the maps"));
                }
                self.bar0[0x80..0x90].copy_from_slice(&buf);
                if let Some(fd) = &self.intx {
                    let mut f = File::from(
                        fd.try_clone()
                            .map_err(|e| DeviceError::invalid(e.to_string()))?,
                    );
                    let _ = f.write_all(&1u64.to_ne_bytes());
                }
            }
        } else {
            self.config[o..o + data.len()].copy_from_slice(data);
        }
        Ok(())
    }

    fn dma_map(&mut self, map: &DmaMap, fd: Option<OwnedFd>) -> Result<(), DeviceError> {
        let fd = fd.ok_or_else(|| DeviceError::unsupported("DMA without fd"))?;
        if self
            .maps
            .iter()
            .any(|(m, _)| map.addr < m.addr + m.size && m.addr < map.addr + map.size)
        {
            return Err(DeviceError::new(libc::EEXIST, "overlap"));
        }
        self.maps.push((*map, File::from(fd)));
        Ok(())
    }

    fn dma_unmap(&mut self, unmap: &DmaUnmap) -> Result<(), DeviceError> {
        if unmap.flags & DMA_UNMAP_FLAG_ALL != 0 {
            self.maps.clear();
            return Ok(());
        }
        let before = self.maps.len();
        self.maps
            .retain(|(m, _)| !(m.addr == unmap.addr && m.size == unmap.size));
        if before == self.maps.len() {
            return Err(DeviceError::invalid("no such mapping"));
        }
        Ok(())
    }

    fn set_irqs(
        &mut self,
        set: &SetIrqs,
        _data: &[u8],
        mut fds: Vec<OwnedFd>,
    ) -> Result<(), DeviceError> {
        if set.flags & IRQ_SET_DATA_EVENTFD != 0 {
            self.intx = fds.pop();
        } else {
            self.intx = None;
        }
        Ok(())
    }

    fn reset(&mut self) -> Result<(), DeviceError> {
        self.resets += 1;
        self.bar0.fill(0);
        Ok(())
    }

    fn client_disconnected(&mut self) {
        self.disconnects += 1;
        self.maps.clear();
        self.intx = None;
    }
}

type Shared = Arc<Mutex<TestDevice>>;

fn start_server(dev: &Shared) -> (UnixStream, JoinHandle<Result<(), ServerError>>) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let dev = dev.clone();
    let t = std::thread::spawn(move || {
        let opts = ServerOptions {
            name: "test".into(),
            ..Default::default()
        };
        serve_connection(b, &*dev, &opts)
    });
    (a, t)
}

fn client(dev: &Shared) -> (VfioUserClient, JoinHandle<Result<(), ServerError>>) {
    let (sock, t) = start_server(dev);
    let c = VfioUserClient::from_stream(sock, ClientOptions::default()).expect("negotiate");
    (c, t)
}

fn eventfd() -> File {
    // SAFETY: eventfd returns a new fd (checked) that the File owns.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC);
        assert!(fd >= 0, "eventfd");
        File::from_raw_fd(fd)
    }
}

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned
    // fd (checked) is owned by the File.
    let f = unsafe {
        let fd = libc::memfd_create(c"test".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0, "memfd_create");
        File::from_raw_fd(fd)
    };
    f.set_len(size).expect("set_len");
    f
}

#[test]
fn negotiation_and_info() {
    let dev = Arc::new(Mutex::new(TestDevice::new()));
    let (mut c, t) = client(&dev);
    assert_eq!(c.server_version(), (0, 1));
    assert_eq!(c.server_capabilities().max_msg_fds(), 8);
    let info = c.device_info().expect("info");
    assert_eq!(info.num_regions, PCI_NUM_REGIONS);
    assert_eq!(info.flags & DEVICE_FLAGS_PCI, DEVICE_FLAGS_PCI);
    let (r, fd) = c.region_info(0).expect("region 0");
    assert_eq!((r.index, r.size, r.argsz), (0, 256, 32));
    assert!(fd.is_none());
    let (r, _) = c.region_info(3).expect("region 3");
    assert_eq!(r.size, 0);
    assert!(matches!(
        c.region_info(42),
        Err(ClientError::Remote {
            errno: libc::EINVAL,
            ..
        })
    ));
    let irq = c.irq_info(0).expect("irq");
    assert_eq!((irq.index, irq.count), (0, 1));
    drop(c);
    t.join().expect("join").expect("clean close");
    assert_eq!(dev.lock().expect("lock").disconnects, 1);
}

#[test]
fn reads_writes_and_posted_writes() {
    let dev = Arc::new(Mutex::new(TestDevice::new()));
    let (mut c, _t) = client(&dev);
    c.region_write(0, 8, &[1, 2, 3, 4]).expect("write");
    let mut b = [0u8; 4];
    c.region_read(0, 8, &mut b).expect("read");
    assert_eq!(b, [1, 2, 3, 4]);
    for i in 0..100u8 {
        c.region_write_posted(0, 16 + u64::from(i % 64), &[i])
            .expect("posted");
    }
    let mut b = [0u8; 64];
    c.region_read(0, 16, &mut b).expect("read after posted");
    for (i, v) in b.iter().enumerate() {
        let last = if i + 64 < 100 { i + 64 } else { i };
        assert_eq!(usize::from(*v), last);
    }
    // Config space region.
    let mut b = [0u8; 2];
    c.region_read(PCI_CONFIG_REGION_INDEX, 0, &mut b)
        .expect("cfg");
    assert_eq!(b, [0x34, 0x34]);
    // Outside the region: an error reply, and the channel goes on.
    let mut b = [0u8; 8];
    assert!(matches!(
        c.region_read(0, 252, &mut b),
        Err(ClientError::Remote {
            errno: libc::EINVAL,
            ..
        })
    ));
    assert!(matches!(
        c.region_write(1, 0, &[0]),
        Err(ClientError::Remote {
            errno: libc::EINVAL,
            ..
        })
    ));
    assert!(matches!(
        c.region_read(0, u64::MAX - 2, &mut b),
        Err(ClientError::Remote {
            errno: libc::EINVAL,
            ..
        })
    ));
    c.region_read(0, 248, &mut b).expect("still serving");
    c.reset().expect("reset");
    assert_eq!(dev.lock().expect("lock").resets, 1);
}

#[test]
fn dma_through_a_memfd_and_interrupt_eventfd() {
    let dev = Arc::new(Mutex::new(TestDevice::new()));
    let (mut c, t) = client(&dev);
    let mem = memfd(0x10000);
    mem.write_all_at(b"0123456789abcdef", 0x2010)
        .expect("pattern");
    c.dma_map(0x4000_0000, 0x8000, mem.as_fd(), 0x1000)
        .expect("map");
    assert!(matches!(
        c.dma_map(0x4000_1000, 0x1000, mem.as_fd(), 0),
        Err(ClientError::Remote {
            errno: libc::EEXIST,
            ..
        })
    ));
    let ev = eventfd();
    c.set_irq_eventfds(0, 0, &[ev.as_fd()]).expect("set_irqs");
    c.region_write(0, 0xe0, &0x4000_1010u64.to_le_bytes())
        .expect("addr");
    c.region_write(0, 0xf0, &[1]).expect("go");
    let mut b = [0u8; 16];
    c.region_read(0, 0x80, &mut b).expect("read copy");
    assert_eq!(&b, b"0123456789abcdef");
    let mut n = [0u8; 8];
    (&ev).read_exact(&mut n).expect("irq fired");
    assert_eq!(u64::from_ne_bytes(n), 1);
    // More fds than the server announced: refused before sending.
    let nine: Vec<_> = (0..9).map(|_| ev.as_fd()).collect();
    assert!(matches!(
        c.set_irq_eventfds(0, 0, &nine),
        Err(ClientError::Invalid(_))
    ));
    // Wrong count of eventfds, fds on a read: refused, channel goes on.
    assert!(c.set_irq_eventfds(0, 0, &[ev.as_fd(), ev.as_fd()]).is_err());
    assert!(c.set_irq_eventfds(1, 0, &[ev.as_fd()]).is_err());
    c.disable_irqs(0).expect("disable");
    c.dma_unmap(0x4000_0000, 0x8000).expect("unmap");
    assert!(matches!(
        c.region_write(0, 0xf0, &[1]),
        Err(ClientError::Remote {
            errno: libc::EFAULT,
            ..
        })
    ));
    assert!(c.dma_unmap(0x4000_0000, 0x8000).is_err());
    c.dma_map(0x4000_0000, 0x8000, mem.as_fd(), 0x1000)
        .expect("map again");
    drop(c);
    t.join().expect("join").expect("clean");
    let d = dev.lock().expect("lock");
    assert!(d.maps.is_empty(), "disconnect drops the maps");
    assert_eq!(&d.bar0[0x80..0x90], b"0123456789abcdef", "state kept");
}

/// DMA_UNMAP with the flag values on the wire that Linux's `vfio.h`, the
/// spec, libvfio-user and QEMU's client use: 2 unmaps everything (QEMU's
/// client sends it when it lets a device go), 1 asks for a dirty bitmap
/// (not offered: ENOTSUP), anything else is refused.
#[test]
fn dma_unmap_flags_as_the_spec_numbers_them() {
    let dev = Arc::new(Mutex::new(TestDevice::new()));
    let (mut c, _t) = client(&dev);
    let mem = memfd(0x10000);
    c.dma_map(0x4000_0000, 0x8000, mem.as_fd(), 0).expect("map");
    c.dma_map(0x5000_0000, 0x8000, mem.as_fd(), 0x8000)
        .expect("map");
    let unmap = |c: &mut VfioUserClient, id: u16, flags: u32| -> Header {
        let mut m = raw_header(Command::DmaUnmap as u16, 16 + 24, 0);
        m[0] = id as u8;
        DmaUnmap {
            argsz: 24,
            flags,
            addr: 0,
            size: 0,
        }
        .encode(&mut m);
        c.send_raw(&m).expect("send");
        let mut reply = [0u8; 16];
        let mut s = c.socket();
        s.read_exact(&mut reply).expect("reply");
        let h = Header::parse(&reply).expect("header");
        if !h.is_error() {
            let mut body = [0u8; 24];
            s.read_exact(&mut body).expect("reply body");
        }
        h
    };
    let h = unmap(&mut c, 0x31, 1);
    assert!(h.is_error(), "a dirty bitmap was not asked for");
    assert_eq!(h.error, libc::ENOTSUP as u32);
    assert_eq!(dev.lock().expect("lock").maps.len(), 2);
    let h = unmap(&mut c, 0x32, 4);
    assert!(h.is_error(), "an unknown flag is refused");
    assert_eq!(h.error, libc::EINVAL as u32);
    let h = unmap(&mut c, 0x33, 2);
    assert!(!h.is_error(), "unmap-all refused: error {}", h.error);
    assert_eq!(h.msg_id, 0x33);
    assert!(dev.lock().expect("lock").maps.is_empty());
    // The channel goes on.
    c.region_read(0, 0, &mut [0u8; 4]).expect("read after");
}

fn raw_header(cmd: u16, size: u32, flags: u32) -> Vec<u8> {
    let mut v = Vec::new();
    Header {
        msg_id: 1,
        cmd,
        msg_size: size,
        flags,
        error: 0,
    }
    .encode(&mut v);
    v
}

#[test]
fn malformed_messages_close_the_channel_only() {
    let dev = Arc::new(Mutex::new(TestDevice::new()));
    // Size below the header.
    let (mut c, t) = client(&dev);
    c.send_raw(&raw_header(9, 8, 0)).expect("send");
    assert!(matches!(
        t.join().expect("join"),
        Err(ServerError::Framing(FramingError::Undersized { .. }))
    ));
    // Oversized.
    let (mut c, t) = client(&dev);
    c.send_raw(&raw_header(10, 64 << 20, 0)).expect("send");
    assert!(matches!(
        t.join().expect("join"),
        Err(ServerError::Framing(FramingError::Oversized { .. }))
    ));
    // Short payload for its command.
    let (mut c, t) = client(&dev);
    let mut m = raw_header(9, 20, 0);
    m.extend_from_slice(&[0; 4]);
    c.send_raw(&m).expect("send");
    assert!(matches!(
        t.join().expect("join"),
        Err(ServerError::Parse { command: 9, .. })
    ));
    // A reply sent as a command.
    let (mut c, t) = client(&dev);
    c.send_raw(&raw_header(13, 16, 1)).expect("send");
    assert!(matches!(
        t.join().expect("join"),
        Err(ServerError::Parse { .. })
    ));
    // Truncated then EOF.
    let (mut c, t) = client(&dev);
    let mut m = raw_header(9, 32, 0);
    m.extend_from_slice(&[0; 4]);
    c.send_raw(&m).expect("send");
    drop(c);
    assert!(matches!(
        t.join().expect("join"),
        Err(ServerError::Framing(FramingError::Truncated { .. }))
    ));
    // A command before VERSION.
    let (mut sock, t) = start_server(&dev);
    sock.write_all(&raw_header(13, 16, 0)).expect("send");
    assert!(matches!(
        t.join().expect("join"),
        Err(ServerError::Protocol(_))
    ));
    let mut b = [0u8; 1];
    assert_eq!(sock.read(&mut b).expect("eof"), 0);
    // The device is still served on a new connection.
    let (mut c, _t) = client(&dev);
    c.region_read(0, 0, &mut [0u8; 4])
        .expect("new connection works");
}

#[test]
fn unsupported_commands_get_enotsup() {
    let dev = Arc::new(Mutex::new(TestDevice::new()));
    let (mut c, _t) = client(&dev);
    let mut m = raw_header(Command::GetRegionIoFds as u16, 16 + 16, 0);
    m[0] = 0x77;
    m.extend_from_slice(&[0; 16]);
    c.send_raw(&m).expect("send");
    let mut reply = [0u8; 16];
    let mut s = c.socket();
    s.read_exact(&mut reply).expect("reply");
    let h = Header::parse(&reply).expect("header");
    assert!(h.is_error() && h.is_reply());
    assert_eq!(h.error, libc::ENOTSUP as u32);
    assert_eq!(h.msg_id, 0x77);
}

#[test]
fn client_times_out_on_a_silent_server() {
    let (a, _b) = UnixStream::pair().expect("socketpair");
    let start = Instant::now();
    let r = VfioUserClient::from_stream(
        a,
        ClientOptions {
            timeout: Duration::from_millis(50),
            ..Default::default()
        },
    );
    assert!(matches!(
        r,
        Err(ClientError::Framing(FramingError::Timeout(_)))
    ));
    assert!(start.elapsed() < Duration::from_secs(10));
}

fn latency2(
    client_poll: Duration,
    poll: Duration,
    gap: Option<Duration>,
    adaptive_poll: bool,
) -> (Duration, Duration) {
    let dev = Arc::new(Mutex::new(TestDevice::new()));
    let (a, b) = UnixStream::pair().expect("socketpair");
    let server_dev = dev.clone();
    let _t = std::thread::spawn(move || {
        let opts = ServerOptions {
            poll,
            adaptive_poll,
            ..Default::default()
        };
        serve_connection(b, &*server_dev, &opts)
    });
    let mut c = VfioUserClient::from_stream(
        a,
        ClientOptions {
            poll: client_poll,
            adaptive_poll,
            ..Default::default()
        },
    )
    .expect("negotiate");
    let mut b = [0u8; 4];
    for _ in 0..500 {
        c.region_read(0, 0, &mut b).expect("warm up");
    }
    let n = if gap.is_some() { 500 } else { 5000 };
    let mut samples: Vec<Duration> = (0..n)
        .map(|_| {
            if let Some(g) = gap {
                std::thread::sleep(g);
            }
            let s = Instant::now();
            c.region_read(0, 0, &mut b).expect("read");
            s.elapsed()
        })
        .collect();
    samples.sort();
    (
        samples[samples.len() / 2],
        samples[samples.len() * 99 / 100],
    )
}

#[test]
#[ignore = "a benchmark (numbers, no pass/fail): cargo test -p channel -- --ignored --nocapture region_read_round_trip"]
fn region_read_round_trip_latency() {
    // Back-to-back reads with and without the busy-poll, and reads after
    // an idle gap; adaptive and fixed windows. Numbers depend heavily on
    // the machine's load; `examples/vfio_user_bench.rs` measures the same
    // against a real remote over a socket.
    let us = Duration::from_micros;
    let ms1 = Some(Duration::from_millis(1));
    for (name, cpoll, spoll, gap, adaptive) in [
        ("busy, poll 50us adaptive", us(50), us(50), None, true),
        ("busy, poll 50us fixed", us(50), us(50), None, false),
        ("busy, no poll", us(0), us(0), None, false),
        ("idle 1ms, poll 50us adaptive", us(50), us(50), ms1, true),
        ("idle 1ms, poll 50us fixed", us(50), us(50), ms1, false),
        (
            "idle 1ms, client 200us server 50us fixed",
            us(200),
            us(50),
            ms1,
            false,
        ),
    ] {
        let (p50, p99) = latency2(cpoll, spoll, gap, adaptive);
        println!("REGION_READ round trip, in-process server, {name}: p50 {p50:?} p99 {p99:?}");
    }
}

#[test]
fn version_must_come_within_the_timeout() {
    let dev = Arc::new(Mutex::new(TestDevice::new()));
    let (a, b) = UnixStream::pair().expect("socketpair");
    let d = dev.clone();
    let t = std::thread::spawn(move || {
        let opts = ServerOptions {
            timeout: Duration::from_millis(50),
            ..Default::default()
        };
        serve_connection(b, &*d, &opts)
    });
    assert!(matches!(
        t.join().expect("join"),
        Err(ServerError::Framing(FramingError::Timeout(_)))
    ));
    drop(a);
}

#[test]
fn random_messages_never_panic_the_server() {
    // Valid framing, random command, flags and payload: the server
    // answers or closes, and never panics.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for _ in 0..200 {
        let dev = Arc::new(Mutex::new(TestDevice::new()));
        let (mut c, t) = client(&dev);
        for _ in 0..4 {
            let len = (next() % 48) as usize;
            let mut m = Vec::new();
            Header {
                msg_id: next() as u16,
                cmd: (next() % 20) as u16,
                msg_size: (HEADER_SIZE + len) as u32,
                flags: (next() % 64) as u32 & !0x1,
                error: 0,
            }
            .encode(&mut m);
            m.extend((0..len).map(|_| next() as u8));
            if c.send_raw(&m).is_err() {
                break;
            }
        }
        drop(c);
        // Ok (clean close) or Err (closed for cause); a panic would fail
        // the join.
        let _ = t.join().expect("server thread panicked");
    }
}
