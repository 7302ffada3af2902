//! Our client against the rust-vmm `vfio_user` crate's server: a peer we
//! did not write, which answers version 0.0.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use channel::vfio_user::{
    ClientError, ClientOptions, VfioUserClient, DEVICE_FLAGS_PCI, IRQ_INFO_EVENTFD,
    PCI_CONFIG_REGION_INDEX, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
use vfio_bindings::bindings::vfio::vfio_region_info;
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion};

#[derive(Default)]
struct State {
    bar0: Vec<u8>,
    config: Vec<u8>,
    maps: Vec<(u64, u64, u64, File)>,
    trigger: Option<File>,
    resets: u32,
}

/// BAR0 (256 bytes of RAM): a write at 0xf0 copies 16 bytes from the DMA
/// address in 0xe0 to BAR offset 0x80 and fires the INTx eventfd.
struct Backend(Arc<Mutex<State>>);

impl ServerBackend for Backend {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> std::io::Result<()> {
        let s = self.0.lock().unwrap();
        let src = if region == 0 { &s.bar0 } else { &s.config };
        let o = offset as usize;
        data.copy_from_slice(&src[o..o + data.len()]);
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut s = self.0.lock().unwrap();
        let o = offset as usize;
        if region != 0 {
            s.config[o..o + data.len()].copy_from_slice(data);
            return Ok(());
        }
        s.bar0[o..o + data.len()].copy_from_slice(data);
        if o == 0xf0 {
            let addr = u64::from_le_bytes(s.bar0[0xe0..0xe8].try_into().unwrap());
            let mut buf = [0u8; 16];
            let (gpa, _, off, f) = s
                .maps
                .iter()
                .find(|(gpa, size, _, _)| addr >= *gpa && addr + 16 <= gpa + size)
                .ok_or_else(|| std::io::Error::from_raw_os_error(libc::EFAULT))?;
            f.read_exact_at(&mut buf, off + addr - gpa)?;
            s.bar0[0x80..0x90].copy_from_slice(&buf);
            if let Some(t) = &s.trigger {
                (&*t).write_all(&1u64.to_ne_bytes())?;
            }
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> std::io::Result<()> {
        let fd = fd.ok_or_else(|| std::io::Error::from_raw_os_error(libc::ENOTSUP))?;
        self.0
            .lock()
            .unwrap()
            .maps
            .push((address, size, offset, fd));
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, address: u64, size: u64) -> std::io::Result<()> {
        self.0
            .lock()
            .unwrap()
            .maps
            .retain(|(a, s, _, _)| !(*a == address && *s == size));
        Ok(())
    }

    fn reset(&mut self) -> std::io::Result<()> {
        let mut s = self.0.lock().unwrap();
        s.resets += 1;
        s.bar0.fill(0);
        Ok(())
    }

    fn set_irqs(
        &mut self,
        _index: u32,
        _flags: u32,
        _start: u32,
        _count: u32,
        mut fds: Vec<File>,
    ) -> std::io::Result<()> {
        self.0.lock().unwrap().trigger = fds.pop();
        Ok(())
    }
}

fn region(index: u32, size: u64) -> ServerRegion {
    ServerRegion {
        region_info: vfio_region_info {
            argsz: std::mem::size_of::<vfio_region_info>() as u32,
            flags: if size > 0 {
                REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE
            } else {
                0
            },
            index,
            cap_offset: 0,
            size,
            offset: 0,
        },
        sparse_areas: Vec::new(),
        mmap_fd: None,
    }
}

fn memfd(size: u64) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is
    // checked and then owned by the File.
    let f = unsafe {
        let fd = libc::memfd_create(c"ram".as_ptr(), libc::MFD_CLOEXEC);
        assert!(fd >= 0);
        File::from_raw_fd(fd)
    };
    f.set_len(size).unwrap();
    f
}

fn eventfd() -> File {
    // SAFETY: eventfd returns a new fd (checked) that the File owns.
    unsafe {
        let fd = libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK);
        assert!(fd >= 0);
        File::from_raw_fd(fd)
    }
}

#[test]
fn our_client_drives_the_rust_vmm_server() {
    let tmp = std::env::temp_dir().join(format!("vu-rust-vmm-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let regions: Vec<ServerRegion> = (0..9)
        .map(|i| match i {
            0 => region(0, 256),
            7 => region(7, 256),
            i => region(i, 0),
        })
        .collect();
    let irqs = vec![IrqInfo {
        index: 0,
        flags: IRQ_INFO_EVENTFD,
        count: 1,
    }];
    let server = Server::new(&tmp, true, irqs, regions).unwrap();
    let state = Arc::new(Mutex::new(State {
        bar0: vec![0; 256],
        config: vec![0x5a; 256],
        ..Default::default()
    }));
    let backend_state = state.clone();
    let t = std::thread::spawn(move || {
        let mut backend = Backend(backend_state);
        server.run(&mut backend)
    });

    let mut c = VfioUserClient::connect(
        &tmp,
        ClientOptions {
            timeout: Duration::from_secs(10),
            ..Default::default()
        },
    )
    .unwrap();
    assert_eq!(c.server_version(), (0, 0), "the crate's server answers 0.0");
    let info = c.device_info().unwrap();
    assert_eq!(info.num_regions, 9);
    assert_eq!(info.flags & DEVICE_FLAGS_PCI, DEVICE_FLAGS_PCI);
    let (r, fd) = c.region_info(0).unwrap();
    assert_eq!((r.index, r.size), (0, 256));
    assert!(fd.is_none());
    let (r, _) = c.region_info(PCI_CONFIG_REGION_INDEX).unwrap();
    assert_eq!(r.size, 256);
    let irq = c.irq_info(0).unwrap();
    assert_eq!(irq.count, 1);

    let mut b = [0u8; 4];
    c.region_read(PCI_CONFIG_REGION_INDEX, 0, &mut b).unwrap();
    assert_eq!(b, [0x5a; 4]);
    c.region_write(0, 8, &[1, 2, 3, 4]).unwrap();
    c.region_read(0, 8, &mut b).unwrap();
    assert_eq!(b, [1, 2, 3, 4]);
    // Its server honours No_reply on REGION_WRITE.
    for i in 0..50u8 {
        c.region_write_posted(0, 16, &[i]).unwrap();
    }
    let mut one = [0u8; 1];
    c.region_read(0, 16, &mut one).unwrap();
    assert_eq!(one[0], 49);

    let ram = memfd(0x10000);
    ram.write_all_at(b"fedcba9876543210", 0x3000).unwrap();
    c.dma_map(0x8000_0000, 0x10000, ram.as_fd(), 0).unwrap();
    let ev = eventfd();
    c.set_irq_eventfds(0, 0, &[ev.as_fd()]).unwrap();
    c.region_write(0, 0xe0, &0x8000_3000u64.to_le_bytes())
        .unwrap();
    c.region_write(0, 0xf0, &[1]).unwrap();
    let mut copy = [0u8; 16];
    c.region_read(0, 0x80, &mut copy).unwrap();
    assert_eq!(&copy, b"fedcba9876543210");
    let mut n = [0u8; 8];
    (&ev).read_exact(&mut n).unwrap();
    assert_eq!(u64::from_ne_bytes(n), 1, "interrupt eventfd fired");
    c.dma_unmap(0x8000_0000, 0x10000).unwrap();
    assert!(state.lock().unwrap().maps.is_empty());

    // An error reply (its backend refuses the DMA) is reported, and the
    // channel goes on.
    assert!(matches!(
        c.region_write(0, 0xf0, &[1]),
        Err(ClientError::Remote { .. })
    ));
    c.reset().unwrap();
    assert_eq!(state.lock().unwrap().resets, 1);
    c.region_read(0, 8, &mut b).unwrap();
    assert_eq!(b, [0; 4]);
    drop(c);
    t.join().unwrap().unwrap();
    let _ = std::fs::remove_file(&tmp);
}
