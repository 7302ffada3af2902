//! The virtio-blk device through the test bench, linked and loaded from
//! its `.so`, driven as a virtio driver does (§3.1): the capabilities
//! found by walking configuration space, features negotiated, a split
//! queue set up in the bench's RAM, requests made available and notified,
//! completions read from the used ring after the INTx interrupt. Data is
//! checked on the image file.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::cell::RefCell;
use std::path::PathBuf;
use std::time::Duration;

use plugin_api::harness::{PluginSource, TestBench};

const WAIT: Duration = Duration::from_secs(10);
const IMAGE_SIZE: u64 = 1 << 20;

// Guest RAM layout of the test driver.
const DESC: u64 = 0x10000;
const AVAIL: u64 = 0x11000;
const USED: u64 = 0x12000;
const HEADER: u64 = 0x20000;
const DATA: u64 = 0x30000;
const STATUS: u64 = 0x40000;
const QSIZE: u16 = 16;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_WRITE_ZEROES: u64 = 1 << 14;
const F_EVENT_IDX: u64 = 1 << 29;
const VERSION_1: u64 = 1 << 32;

thread_local! {
    static DIR: RefCell<Option<tempfile::TempDir>> = const { RefCell::new(None) };
}

fn image() -> PathBuf {
    DIR.with(|d| d.borrow().as_ref().unwrap().path().join("disk.img"))
}

fn make_bench(source: PluginSource, extra: &str) -> Result<TestBench, String> {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(IMAGE_SIZE).unwrap();
    let settings = format!(
        "file = \"{}\"\nserial = \"VD-SERIAL-1\"\n{extra}",
        img.display()
    );
    DIR.with(|slot| *slot.borrow_mut() = Some(d));
    TestBench::new(source, None, &settings)
}

fn bench(source: PluginSource) -> Result<TestBench, String> {
    make_bench(source, "")
}

plugin_api::plugin_tests! {
    plugin: virtio_blk,
    bench: bench,
    tests: [
        identity_and_virtio_capabilities,
        write_then_read_back_through_the_queue,
        flush_get_id_and_write_zeroes,
        out_of_range_and_unknown_requests_fail_cleanly,
        a_broken_ring_needs_a_reset_and_a_reset_recovers,
        features_the_device_did_not_offer_are_refused,
        resize_grows_the_disk_with_a_configuration_interrupt,
        the_rings_survive_a_restart,
        a_crash_in_the_middle_of_io_neither_repeats_nor_loses_a_request,
        hostile_state_is_refused,
        msix_vectors_carry_completions_and_masking_holds_them,
        each_queue_notify_is_a_doorbell,
        event_idx_interrupts_and_notifications_only_when_asked,
    ],
}

/// Where each virtio structure is: cfg_type → offset in BAR 0.
struct Layout {
    common: u64,
    notify: u64,
    multiplier: u64,
    isr: u64,
    device: u64,
}

fn layout(tb: &mut TestBench) -> Layout {
    let mut found = [None; 5];
    let mut multiplier = 0;
    assert_ne!(tb.cfg_read(0x06, 2) & 0x10, 0, "capability list");
    let mut ptr = tb.cfg_read(0x34, 1) as usize;
    let mut seen = 0;
    while ptr != 0 && seen < 48 {
        seen += 1;
        if tb.cfg_read(ptr, 1) == 0x09 {
            let cfg_type = tb.cfg_read(ptr + 3, 1) as usize;
            assert_eq!(tb.cfg_read(ptr + 4, 1), 0, "BAR 0");
            let off = u64::from(tb.cfg_read(ptr + 8, 4));
            if cfg_type == 2 {
                multiplier = u64::from(tb.cfg_read(ptr + 16, 4));
            }
            if cfg_type < 5 {
                found[cfg_type] = Some(off);
            }
        }
        ptr = tb.cfg_read(ptr + 1, 1) as usize;
    }
    Layout {
        common: found[1].unwrap(),
        notify: found[2].unwrap(),
        multiplier,
        isr: found[3].unwrap(),
        device: found[4].unwrap(),
    }
}

/// A split-ring descriptor (§2.7.5) as the driver writes it.
fn desc_bytes(addr: u64, len: u32, flags: u16, next: u16) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..8].copy_from_slice(&addr.to_le_bytes());
    d[8..12].copy_from_slice(&len.to_le_bytes());
    d[12..14].copy_from_slice(&flags.to_le_bytes());
    d[14..16].copy_from_slice(&next.to_le_bytes());
    d
}

/// A driver of one queue.
struct Driver {
    base: u64,
    l: Layout,
    /// Next free descriptor and available index.
    avail_idx: u16,
    /// Notify through the bench's doorbell (as KVM delivers it) instead
    /// of a memory write.
    by_doorbell: bool,
    used_seen: u16,
}

impl Driver {
    fn common_w(&self, tb: &mut TestBench, off: u64, len: usize, v: u64) {
        tb.mmio_write(self.base + self.l.common + off, len, v);
    }

    fn common_r(&self, tb: &mut TestBench, off: u64, len: usize) -> u64 {
        tb.mmio_read(self.base + self.l.common + off, len)
    }

    fn device_features(&self, tb: &mut TestBench) -> u64 {
        self.common_w(tb, 0x00, 4, 0);
        let lo = self.common_r(tb, 0x04, 4);
        self.common_w(tb, 0x00, 4, 1);
        lo | self.common_r(tb, 0x04, 4) << 32
    }

    /// Negotiates `want` (∩ offered) and sets up queue 0; returns what
    /// the device offered.
    fn init(tb: &mut TestBench, want: u64) -> (Driver, u64) {
        tb.map_bars();
        let base = tb.bar_address(0);
        let l = layout(tb);
        let d = Driver {
            base,
            l,
            avail_idx: 0,
            by_doorbell: false,
            used_seen: 0,
        };
        d.common_w(tb, 0x14, 1, 0);
        d.common_w(tb, 0x14, 1, 1 | 2);
        let offered = d.device_features(tb);
        let take = offered & want;
        d.common_w(tb, 0x08, 4, 0);
        d.common_w(tb, 0x0c, 4, take & 0xffff_ffff);
        d.common_w(tb, 0x08, 4, 1);
        d.common_w(tb, 0x0c, 4, take >> 32);
        d.common_w(tb, 0x14, 1, 1 | 2 | 8);
        assert_ne!(d.common_r(tb, 0x14, 1) & 8, 0, "FEATURES_OK kept");
        d.common_w(tb, 0x16, 2, 0);
        assert!(d.common_r(tb, 0x18, 2) >= u64::from(QSIZE));
        d.common_w(tb, 0x18, 2, u64::from(QSIZE));
        d.common_w(tb, 0x20, 4, DESC);
        d.common_w(tb, 0x24, 4, 0);
        d.common_w(tb, 0x28, 4, AVAIL);
        d.common_w(tb, 0x2c, 4, 0);
        d.common_w(tb, 0x30, 4, USED);
        d.common_w(tb, 0x34, 4, 0);
        d.common_w(tb, 0x1c, 2, 1);
        d.common_w(tb, 0x14, 1, 1 | 2 | 8 | 4);
        (d, offered)
    }

    /// Makes a chain of (address, length, device-writable) available at
    /// descriptors 0.. and notifies queue 0.
    fn submit(&mut self, tb: &mut TestBench, bufs: &[(u64, u32, bool)]) {
        self.make_available(tb, bufs);
        if self.by_doorbell {
            tb.ring_doorbell(0);
        } else {
            tb.mmio_write(self.base + self.l.notify, 2, 0);
        }
    }

    /// [`submit`](Self::submit) without the notification.
    fn make_available(&mut self, tb: &mut TestBench, bufs: &[(u64, u32, bool)]) {
        for (i, &(addr, len, w)) in bufs.iter().enumerate() {
            let next = i + 1 < bufs.len();
            let flags: u16 = u16::from(next) | if w { 2 } else { 0 };
            let d = desc_bytes(addr, len, flags, (i + 1) as u16);
            tb.ram().write_all(DESC + 16 * i as u64, &d);
        }
        let slot = u64::from(self.avail_idx % QSIZE);
        tb.ram()
            .write_all(AVAIL + 4 + 2 * slot, &0u16.to_le_bytes());
        self.avail_idx = self.avail_idx.wrapping_add(1);
        tb.ram().write_all(AVAIL + 2, &self.avail_idx.to_le_bytes());
    }

    /// Waits for the interrupt, acknowledges it, returns the used
    /// element's length.
    fn complete(&mut self, tb: &mut TestBench) -> u32 {
        assert!(tb.irq().wait_for(true, WAIT), "no interrupt");
        let isr = tb.mmio_read(self.base + self.l.isr, 1);
        assert_eq!(isr & 1, 1, "ISR queue bit");
        assert!(!tb.irq().level(), "reading the ISR lowers the line");
        let used_idx = u16::from_le_bytes(tb.ram().read_vec(USED + 2, 2).try_into().unwrap());
        assert_eq!(used_idx, self.used_seen.wrapping_add(1));
        let slot = u64::from(self.used_seen % QSIZE);
        self.used_seen = used_idx;
        let e = tb.ram().read_vec(USED + 4 + 8 * slot, 8);
        assert_eq!(u32::from_le_bytes(e[0..4].try_into().unwrap()), 0, "head");
        u32::from_le_bytes(e[4..8].try_into().unwrap())
    }

    /// A request of `kind` at `sector` with `data` out (or `len_in` bytes
    /// in); returns (status, used length).
    fn request(
        &mut self,
        tb: &mut TestBench,
        kind: u32,
        sector: u64,
        data: &[u8],
        len_in: u32,
    ) -> (u8, u32) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        tb.ram().write_all(HEADER, &h);
        tb.ram().write_all(STATUS, &[0xee]);
        let mut bufs = vec![(HEADER, 16, false)];
        if !data.is_empty() {
            tb.ram().write_all(DATA, data);
            bufs.push((DATA, data.len() as u32, false));
        }
        if len_in > 0 {
            bufs.push((DATA, len_in, true));
        }
        bufs.push((STATUS, 1, true));
        self.submit(tb, &bufs);
        let len = self.complete(tb);
        (tb.ram().read_vec(STATUS, 1)[0], len)
    }
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn identity_and_virtio_capabilities(mut tb: TestBench) {
    assert_eq!(tb.cfg_read(0x00, 4), 0x1042_1af4);
    assert_eq!(tb.cfg_read(0x08, 4) >> 8, 0x01_80_00);
    assert_eq!(tb.cfg_read(0x2c, 4), 0x0002_1af4, "subsystem");
    assert_eq!(tb.cfg_read(0x3d, 1), 1, "INTA");
    let l = layout(&mut tb);
    assert_eq!(l.multiplier, 4);
    tb.map_bars();
    let base = tb.bar_address(0);
    // Capacity in 512-byte sectors, and one queue.
    assert_eq!(tb.mmio_read(base + l.device, 8), IMAGE_SIZE / 512);
    assert_eq!(tb.mmio_read(base + l.common + 0x12, 2), 1);
    assert_eq!(tb.mmio_read(base + l.device + 20, 4), 512, "blk_size");
}

fn write_then_read_back_through_the_queue(mut tb: TestBench) {
    let (mut d, offered) = Driver::init(&mut tb, VERSION_1 | F_FLUSH);
    assert_ne!(offered & VERSION_1, 0);
    assert_eq!(offered & F_RO, 0);
    let data = pattern(8192, 7);
    let (status, used) = d.request(&mut tb, 1, 24, &data, 0);
    assert_eq!((status, used), (0, 1), "OUT: OK, only the status written");
    let img = std::fs::read(image()).unwrap();
    assert_eq!(
        &img[24 * 512..24 * 512 + 8192],
        &data[..],
        "bytes on the image"
    );
    tb.ram().write_all(DATA, &[0u8; 8192]);
    let (status, used) = d.request(&mut tb, 0, 24, &[], 8192);
    assert_eq!((status, used), (0, 8193));
    assert_eq!(tb.ram().read_vec(DATA, 8192), data);
}

fn flush_get_id_and_write_zeroes(mut tb: TestBench) {
    let (mut d, offered) = Driver::init(&mut tb, VERSION_1 | F_FLUSH | F_WRITE_ZEROES);
    assert_ne!(offered & F_WRITE_ZEROES, 0);
    assert_eq!(d.request(&mut tb, 4, 0, &[], 0).0, 0, "FLUSH");
    let (status, used) = d.request(&mut tb, 8, 0, &[], 20);
    assert_eq!((status, used), (0, 21));
    assert_eq!(&tb.ram().read_vec(DATA, 11), b"VD-SERIAL-1");
    let data = pattern(4096, 1);
    assert_eq!(d.request(&mut tb, 1, 100, &data, 0).0, 0);
    // One segment: 4 sectors at 101.
    let mut seg = [0u8; 16];
    seg[0..8].copy_from_slice(&101u64.to_le_bytes());
    seg[8..12].copy_from_slice(&4u32.to_le_bytes());
    assert_eq!(d.request(&mut tb, 13, 0, &seg, 0).0, 0, "WRITE_ZEROES");
    let img = std::fs::read(image()).unwrap();
    let at = 100 * 512;
    assert_eq!(&img[at..at + 512], &data[..512]);
    assert!(img[at + 512..at + 2560].iter().all(|&b| b == 0));
    assert_eq!(&img[at + 2560..at + 4096], &data[2560..]);
}

fn out_of_range_and_unknown_requests_fail_cleanly(mut tb: TestBench) {
    let (mut d, _) = Driver::init(&mut tb, VERSION_1);
    let last = IMAGE_SIZE / 512;
    assert_eq!(
        d.request(&mut tb, 0, last, &[], 512).0,
        1,
        "read past the end: IOERR"
    );
    assert_eq!(
        d.request(&mut tb, 0, u64::MAX, &[], 512).0,
        1,
        "overflowing sector"
    );
    assert_eq!(d.request(&mut tb, 0, 0, &[], 100).0, 1, "not whole sectors");
    assert_eq!(
        d.request(&mut tb, 99, 0, &[], 0).0,
        2,
        "unknown type: UNSUPP"
    );
    // The device still works.
    assert_eq!(d.request(&mut tb, 0, last - 1, &[], 512).0, 0);
}

fn a_broken_ring_needs_a_reset_and_a_reset_recovers(mut tb: TestBench) {
    let (d, _) = Driver::init(&mut tb, VERSION_1);
    // A chain whose next descriptor is past the table.
    let mut desc = [0u8; 16];
    desc[0..8].copy_from_slice(&HEADER.to_le_bytes());
    desc[8..12].copy_from_slice(&16u32.to_le_bytes());
    desc[12..14].copy_from_slice(&1u16.to_le_bytes());
    desc[14..16].copy_from_slice(&500u16.to_le_bytes());
    tb.ram().write_all(DESC, &desc);
    tb.ram().write_all(AVAIL + 4, &0u16.to_le_bytes());
    tb.ram().write_all(AVAIL + 2, &1u16.to_le_bytes());
    tb.mmio_write(d.base + d.l.notify, 2, 0);
    assert!(tb.irq().wait_for(true, WAIT), "configuration interrupt");
    assert_eq!(tb.mmio_read(d.base + d.l.isr, 1) & 2, 2, "ISR config bit");
    assert_ne!(d.common_r(&mut tb, 0x14, 1) & 0x40, 0, "NEEDS_RESET");
    // A reset and a new set-up on fresh rings (the driver clears them
    // before it enables the queue again): requests work again.
    tb.ram().write_all(AVAIL + 2, &0u16.to_le_bytes());
    tb.ram().write_all(USED + 2, &0u16.to_le_bytes());
    let (mut d, _) = Driver::init(&mut tb, VERSION_1);
    assert_eq!(
        d.common_r(&mut tb, 0x14, 1) & 0x40,
        0,
        "NEEDS_RESET cleared"
    );
    assert_eq!(d.request(&mut tb, 4, 0, &[], 0).0, 0);
}

fn features_the_device_did_not_offer_are_refused(mut tb: TestBench) {
    tb.map_bars();
    let base = tb.bar_address(0);
    let l = layout(&mut tb);
    let c = base + l.common;
    tb.mmio_write(c + 0x14, 1, 3);
    // Not VERSION_1 (a legacy driver): refused.
    tb.mmio_write(c + 0x08, 4, 0);
    tb.mmio_write(c + 0x0c, 4, F_FLUSH);
    tb.mmio_write(c + 0x14, 1, 3 | 8);
    assert_eq!(tb.mmio_read(c + 0x14, 1) & 8, 0);
    // A read-only drive offers RO and refuses writes.
    drop(tb);
}

#[test]
fn a_read_only_drive_refuses_writes() {
    let tb = make_bench(
        PluginSource::Linked(virtio_blk::plugin_module()),
        "read-only = true\n",
    );
    let mut tb = tb.unwrap();
    let (mut d, offered) = Driver::init(&mut tb, VERSION_1 | F_RO);
    assert_ne!(offered & F_RO, 0);
    assert_eq!(offered & F_WRITE_ZEROES, 0);
    assert_eq!(d.request(&mut tb, 1, 0, &pattern(512, 3), 0).0, 1);
    assert!(std::fs::read(image()).unwrap().iter().all(|&b| b == 0));
}

#[test]
fn settings_errors_are_clear() {
    let src = || PluginSource::Linked(virtio_blk::plugin_module());
    let e = make_bench(src(), "queues = 0\n").err().unwrap();
    assert!(e.contains("queues = 0"), "{e}");
    let e = make_bench(src(), "queue-size = 100\n").err().unwrap();
    assert!(e.contains("power of two"), "{e}");
    let e = make_bench(src(), "io-threads = 0\n").err().unwrap();
    assert!(e.contains("io-threads = 0"), "{e}");
    let e = TestBench::new(src(), None, "file = \"/nonexistent/disk.img\"\n")
        .err()
        .unwrap();
    assert!(e.contains("/nonexistent/disk.img"), "{e}");
}

fn resize_grows_the_disk_with_a_configuration_interrupt(mut tb: TestBench) {
    let (mut d, _) = Driver::init(&mut tb, VERSION_1);
    let gen_before = d.common_r(&mut tb, 0x15, 1);
    let grow = |tb: &mut TestBench, size: u64| {
        tb.control("resize", &plugin_api::serde_json::json!({ "size": size }))
    };
    let e = grow(&mut tb, IMAGE_SIZE / 2).unwrap_err();
    assert!(e.contains("shrinking"), "{e}");
    assert!(grow(&mut tb, 1000).unwrap_err().contains("multiple of 512"));
    assert!(!tb.irq().level(), "a refused resize says nothing");
    let reply = grow(&mut tb, 2 * IMAGE_SIZE).unwrap();
    assert_eq!(reply["sectors"], 2 * IMAGE_SIZE / 512);
    assert!(tb.irq().wait_for(true, WAIT), "configuration interrupt");
    assert_eq!(
        tb.mmio_read(d.base + d.l.isr, 1),
        2,
        "ISR: configuration only"
    );
    assert_ne!(
        d.common_r(&mut tb, 0x15, 1),
        gen_before,
        "config_generation moved"
    );
    assert_eq!(tb.mmio_read(d.base + d.l.device, 8), 2 * IMAGE_SIZE / 512);
    assert_eq!(std::fs::metadata(image()).unwrap().len(), 2 * IMAGE_SIZE);
    // The new space is usable.
    let data = pattern(512, 9);
    let last = 2 * IMAGE_SIZE / 512 - 1;
    assert_eq!(d.request(&mut tb, 1, last, &data, 0).0, 0);
}

fn the_rings_survive_a_restart(mut tb: TestBench) {
    let (mut d, _) = Driver::init(&mut tb, VERSION_1 | F_FLUSH);
    let data = pattern(4096, 5);
    assert_eq!(d.request(&mut tb, 1, 8, &data, 0).0, 0);
    assert_eq!(d.request(&mut tb, 4, 0, &[], 0).0, 0);
    // A new device from the saved state: the driver goes on with the
    // same rings, indexes and all, without setting anything up again.
    tb.restart_device().unwrap();
    tb.ram().write_all(DATA, &[0u8; 4096]);
    let (status, used) = d.request(&mut tb, 0, 8, &[], 4096);
    assert_eq!((status, used), (0, 4097));
    assert_eq!(tb.ram().read_vec(DATA, 4096), data);
    assert_ne!(d.common_r(&mut tb, 0x14, 1) & 4, 0, "still DRIVER_OK");
}

/// The device's process dies in the middle of the guest's I/O and comes
/// back from a state saved before the guest's last requests (as a VMM
/// keeps it: saved while the guest left the device alone, and still
/// current because the device declares that its state outlives its
/// doorbells). The write the driver saw done is not run again (the
/// image, changed under it since, keeps the change), the one made
/// available but never taken is served, and the queue's interrupt comes.
fn a_crash_in_the_middle_of_io_neither_repeats_nor_loses_a_request(mut tb: TestBench) {
    assert!(tb.function().state_outlives_doorbells());
    let (mut d, _) = Driver::init(&mut tb, VERSION_1 | F_FLUSH);
    assert_eq!(d.request(&mut tb, 1, 8, &pattern(512, 1), 0).0, 0);
    let old = tb.function().save_state().unwrap();
    // Done since the save, and seen done by the driver; its descriptors
    // (0..) and buffers stay as they were.
    assert_eq!(d.request(&mut tb, 1, 16, &pattern(1024, 2), 0).0, 0);
    // Someone else changes those sectors: the write run again would undo it.
    let img = image();
    let mut bytes = std::fs::read(&img).unwrap();
    bytes[16 * 512..16 * 512 + 1024].fill(0x5a);
    std::fs::write(&img, &bytes).unwrap();
    // A write made available at descriptors 4.., its notification lost
    // with the process.
    let (header, data, status) = (HEADER + 0x100, DATA + 0x4000, STATUS + 0x10);
    let c = pattern(512, 3);
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&1u32.to_le_bytes());
    h[8..16].copy_from_slice(&24u64.to_le_bytes());
    tb.ram().write_all(header, &h);
    tb.ram().write_all(data, &c);
    tb.ram().write_all(status, &[0xee]);
    for (i, (addr, len, flags)) in [(header, 16u32, 1u16), (data, 512, 1), (status, 1, 2)]
        .into_iter()
        .enumerate()
    {
        let raw = desc_bytes(addr, len, flags, 5 + i as u16);
        tb.ram().write_all(DESC + 16 * (4 + i as u64), &raw);
    }
    let slot = u64::from(d.avail_idx % QSIZE);
    tb.ram()
        .write_all(AVAIL + 4 + 2 * slot, &4u16.to_le_bytes());
    d.avail_idx = d.avail_idx.wrapping_add(1);
    tb.ram().write_all(AVAIL + 2, &d.avail_idx.to_le_bytes());

    tb.crash_and_restore(&old).unwrap();
    assert!(tb.irq().wait_for(true, WAIT), "the queue's interrupt");
    let used_idx = || u16::from_le_bytes(tb.ram().read_vec(USED + 2, 2).try_into().unwrap());
    let deadline = std::time::Instant::now() + WAIT;
    while used_idx() != 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(1));
    }
    // Let a device that wrongly runs old requests again finish doing so.
    assert!(tb.wait_idle(WAIT).is_ok());
    assert_eq!(used_idx(), 3, "one completion more: the waiting write");
    let e = tb.ram().read_vec(USED + 4 + 8 * 2, 8);
    assert_eq!(
        u32::from_le_bytes(e[0..4].try_into().unwrap()),
        4,
        "its head"
    );
    assert_eq!(tb.ram().read_vec(status, 1)[0], 0);
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(&bytes[24 * 512..25 * 512], &c[..], "the waiting write ran");
    assert!(
        bytes[16 * 512..16 * 512 + 1024].iter().all(|&x| x == 0x5a),
        "a write the driver saw done ran again"
    );
    assert_eq!(&bytes[8 * 512..9 * 512], &pattern(512, 1)[..]);
    // The driver goes on where it was.
    assert_eq!(tb.mmio_read(d.base + d.l.isr, 1) & 1, 1);
    d.used_seen = 3;
    tb.ram().write_all(DATA, &[0u8; 512]);
    assert_eq!(d.request(&mut tb, 0, 24, &[], 512), (0, 513));
    assert_eq!(tb.ram().read_vec(DATA, 512), c);
}

fn hostile_state_is_refused(mut tb: TestBench) {
    let (mut d, _) = Driver::init(&mut tb, VERSION_1);
    let good = tb.function().save_state().unwrap();
    for bad in [
        good[..good.len() - 1].to_vec(),
        [good.clone(), vec![0]].concat(),
        b"not a state".to_vec(),
        {
            let mut v = good.clone();
            v[4] = 200;
            v
        },
    ] {
        assert!(tb.function().restore_state(&bad).is_err());
    }
    // The device is as it was.
    assert_eq!(d.request(&mut tb, 4, 0, &[], 0).0, 0);
}

fn used_idx(tb: &TestBench) -> u16 {
    u16::from_le_bytes(tb.ram().read_vec(USED + 2, 2).try_into().unwrap())
}

fn msix_vectors_carry_completions_and_masking_holds_them(mut tb: TestBench) {
    let m = tb.msix().expect("an MSI-X capability");
    assert_eq!(m.layout.vectors, 2, "configuration + one queue");
    assert_ne!(m.layout.table_bar, 0, "in a BAR of its own");
    let (mut d, _) = Driver::init(&mut tb, VERSION_1 | F_FLUSH);
    tb.enable_msix(&[0, 1]).unwrap();
    // Vector 0 for configuration changes, 1 for queue 0, as Linux does.
    d.common_w(&mut tb, 0x10, 2, 0);
    d.common_w(&mut tb, 0x16, 2, 0);
    d.common_w(&mut tb, 0x1a, 2, 1);
    assert_eq!(d.common_r(&mut tb, 0x10, 2), 0);
    assert_eq!(d.common_r(&mut tb, 0x1a, 2), 1);
    // A vector past the function's is refused ("no vector").
    d.common_w(&mut tb, 0x1a, 2, 7);
    assert_eq!(d.common_r(&mut tb, 0x1a, 2), 0xffff);
    d.common_w(&mut tb, 0x1a, 2, 1);

    let flush = |d: &mut Driver, tb: &mut TestBench| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&4u32.to_le_bytes());
        tb.ram().write_all(HEADER, &h);
        d.submit(tb, &[(HEADER, 16, false), (STATUS, 1, true)]);
    };
    flush(&mut d, &mut tb);
    assert!(tb.irq().wait_msix(1, 1, WAIT), "the queue's vector");
    let msgs = tb.irq().msix_messages();
    assert_eq!(msgs[0].0, 1);
    assert_eq!((msgs[0].1.address, msgs[0].1.data), (0xfee0_0000, 0x4001));
    assert_eq!(used_idx(&tb), 1);
    assert!(!tb.irq().level(), "no INTx with MSI-X enabled");
    assert_eq!(tb.mmio_read(d.base + d.l.isr, 1), 0, "and no ISR bit");

    // Vector 1 masked: the completion leaves it pending, in the PBA.
    let table = tb.bar_address(usize::from(m.layout.table_bar));
    tb.mmio_write(table + 16 + 12, 4, 1);
    flush(&mut d, &mut tb);
    let t0 = std::time::Instant::now();
    while used_idx(&tb) != 2 && t0.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(used_idx(&tb), 2);
    assert!(tb.irq().msix_pending(1));
    assert_eq!(tb.irq().msix_count(1), 1, "held while masked");
    let pba = tb.mmio_read(table + u64::from(m.layout.pba_offset), 8);
    assert_eq!(pba, 0b10, "the PBA shows vector 1 pending");
    // Unmasked: sent at once, no longer pending.
    tb.mmio_write(table + 16 + 12, 4, 0);
    assert_eq!(tb.irq().msix_count(1), 2);
    assert!(!tb.irq().msix_pending(1));

    // A configuration change goes to vector 0.
    tb.control(
        "resize",
        &plugin_api::serde_json::json!({ "size": 2 * IMAGE_SIZE }),
    )
    .unwrap();
    assert!(tb.irq().wait_msix(0, 1, WAIT), "the configuration vector");
}

#[test]
fn a_second_queue_serves_its_own_ring() {
    let mut tb = make_bench(
        PluginSource::Linked(virtio_blk::plugin_module()),
        "queues = 2\n",
    )
    .unwrap();
    let (mut d, offered) = Driver::init(&mut tb, VERSION_1 | F_FLUSH | (1 << 12));
    assert_ne!(offered & (1 << 12), 0, "VIRTIO_BLK_F_MQ");
    // A request on queue 0 first: the device has set up its side of the
    // rings before queue 1 is enabled (a queue enabled then was never
    // served).
    assert_eq!(d.request(&mut tb, 4, 0, &[], 0).0, 0, "FLUSH on queue 0");
    assert_eq!(d.common_r(&mut tb, 0x12, 2), 2, "num_queues");
    assert_eq!(
        tb.mmio_read(d.base + d.l.device + 34, 2),
        2,
        "config num_queues"
    );
    // Queue 1 on rings of its own (set up after DRIVER_OK, as allowed).
    let (desc, avail, used) = (0x50000u64, 0x51000u64, 0x52000u64);
    d.common_w(&mut tb, 0x16, 2, 1);
    d.common_w(&mut tb, 0x18, 2, u64::from(QSIZE));
    d.common_w(&mut tb, 0x20, 4, desc);
    d.common_w(&mut tb, 0x28, 4, avail);
    d.common_w(&mut tb, 0x30, 4, used);
    d.common_w(&mut tb, 0x1c, 2, 1);
    assert_eq!(d.common_r(&mut tb, 0x1e, 2), 1, "queue_notify_off");
    // One FLUSH: header, status.
    let mut h = [0u8; 16];
    h[0..4].copy_from_slice(&4u32.to_le_bytes());
    tb.ram().write_all(HEADER, &h);
    let mut chain = Vec::new();
    for (i, (addr, len, flags)) in [(HEADER, 16u32, 1u16), (STATUS, 1, 2)]
        .into_iter()
        .enumerate()
    {
        chain.extend_from_slice(&desc_bytes(addr, len, flags, (i + 1) as u16));
    }
    tb.ram().write_all(desc, &chain);
    tb.ram().write_all(avail + 4, &0u16.to_le_bytes());
    tb.ram().write_all(avail + 2, &1u16.to_le_bytes());
    tb.ram().write_all(STATUS, &[0xee]);
    tb.mmio_write(d.base + d.l.notify + d.l.multiplier, 2, 1);
    assert!(tb.irq().wait_for(true, WAIT), "interrupt");
    assert_eq!(tb.mmio_read(d.base + d.l.isr, 1) & 1, 1);
    assert_eq!(
        tb.ram().read_vec(used + 2, 2),
        vec![1, 0],
        "queue 1's used ring"
    );
    assert_eq!(
        tb.ram().read_vec(USED + 2, 2),
        vec![1, 0],
        "queue 0's as it was"
    );
    assert_eq!(tb.ram().read_vec(STATUS, 1), vec![0]);
}

/// Each queue's notification is declared as a doorbell at the address
/// and with the value the notify capability gives a driver, and a
/// request rung only through it completes.
fn each_queue_notify_is_a_doorbell(mut tb: TestBench) {
    let (mut d, _) = Driver::init(&mut tb, VERSION_1);
    let queues = d.common_r(&mut tb, 0x12, 2);
    let bells = tb.doorbells();
    assert_eq!(bells.len() as u64, queues, "one doorbell per queue");
    for (q, b) in bells.iter().enumerate() {
        let q = q as u64;
        assert_eq!(
            (b.bar, b.offset, b.len, b.value),
            (0, d.l.notify + q * d.l.multiplier, 2, q),
            "queue {q}'s doorbell"
        );
    }
    d.by_doorbell = true;
    let data = pattern(4096, 3);
    assert_eq!(d.request(&mut tb, 1, 8, &data, 0), (0, 1), "OUT");
    let (status, used) = d.request(&mut tb, 0, 8, &[], 4096);
    assert_eq!((status, used), (0, 4097), "IN");
    assert_eq!(tb.ram().read_vec(DATA, 4096), data);
}

/// `VIRTIO_RING_F_EVENT_IDX` (§2.7.10): the device interrupts only when
/// the used index passes the driver's `used_event`, and when it finds the
/// queue empty sets `avail_event` to the next entry it will take, so the
/// driver notifies only for a buffer the device would not find by itself.
fn event_idx_interrupts_and_notifications_only_when_asked(mut tb: TestBench) {
    let (mut d, offered) = Driver::init(&mut tb, VERSION_1 | F_EVENT_IDX);
    assert_ne!(offered & F_EVENT_IDX, 0, "EVENT_IDX offered");
    tb.enable_msix(&[0, 1]).unwrap();
    d.common_w(&mut tb, 0x16, 2, 0);
    d.common_w(&mut tb, 0x1a, 2, 1);
    let used_event = AVAIL + 4 + 2 * u64::from(QSIZE);
    let avail_event = USED + 4 + 8 * u64::from(QSIZE);
    let flush = |d: &mut Driver, tb: &mut TestBench| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&4u32.to_le_bytes());
        tb.ram().write_all(HEADER, &h);
        d.submit(tb, &[(HEADER, 16, false), (STATUS, 1, true)]);
    };
    let wait_used = |tb: &TestBench, n: u16| {
        let t0 = std::time::Instant::now();
        while used_idx(tb) != n && t0.elapsed() < WAIT {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(used_idx(tb), n);
    };
    // used_event 0: an interrupt at the first completion.
    tb.ram().write_all(used_event, &0u16.to_le_bytes());
    flush(&mut d, &mut tb);
    assert!(tb.irq().wait_msix(1, 1, WAIT), "the first completion");
    // used_event 3: none when the used index becomes 2 or 3. The device
    // decides right after it publishes a completion and before it takes
    // the next request, so once request 3 is used, request 2's decision
    // has been made.
    tb.ram().write_all(used_event, &3u16.to_le_bytes());
    flush(&mut d, &mut tb);
    wait_used(&tb, 2);
    flush(&mut d, &mut tb);
    wait_used(&tb, 3);
    assert_eq!(tb.irq().msix_count(1), 1, "no interrupt for request 2");
    // One when it becomes 4.
    flush(&mut d, &mut tb);
    assert!(tb.irq().wait_msix(1, 2, WAIT), "used_event passed");
    assert_eq!(used_idx(&tb), 4);
    // A reset waits for the device's pass: then avail_event asks for a
    // notification at entry 4, the next the device would take.
    d.common_w(&mut tb, 0x14, 1, 0);
    let at = u16::from_le_bytes(tb.ram().read_vec(avail_event, 2).try_into().unwrap());
    assert_eq!(at, 4, "avail_event");
    assert_eq!(tb.irq().msix_count(1), 2, "no interrupt for request 3");
}

/// Five writes made available at once (one notification) run as one
/// batch on several threads (`io-threads = 4`): each lands where it was
/// sent, and the used ring holds the five in the order they were made
/// available.
#[test]
fn a_batch_runs_on_several_threads_and_completes_in_order() {
    let mut tb = make_bench(
        PluginSource::Linked(virtio_blk::plugin_module()),
        "io-threads = 4\n",
    )
    .unwrap();
    let (d, _) = Driver::init(&mut tb, VERSION_1);
    const N: u64 = 5;
    let put_desc = |tb: &mut TestBench, i: u64, addr: u64, len: u32, flags: u16| {
        tb.ram()
            .write_all(DESC + 16 * i, &desc_bytes(addr, len, flags, (i + 1) as u16));
    };
    for k in 0..N {
        // Request k writes 4 KiB of pattern k at sector 8k (chain 3k..3k+2).
        let (header, data, status) = (HEADER + 16 * k, DATA + 4096 * k, STATUS + k);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&1u32.to_le_bytes());
        h[8..16].copy_from_slice(&(8 * k).to_le_bytes());
        tb.ram().write_all(header, &h);
        tb.ram().write_all(data, &pattern(4096, k as u8));
        tb.ram().write_all(status, &[0xee]);
        put_desc(&mut tb, 3 * k, header, 16, 1);
        put_desc(&mut tb, 3 * k + 1, data, 4096, 1);
        put_desc(&mut tb, 3 * k + 2, status, 1, 2);
        tb.ram()
            .write_all(AVAIL + 4 + 2 * k, &((3 * k) as u16).to_le_bytes());
    }
    tb.ram().write_all(AVAIL + 2, &(N as u16).to_le_bytes());
    tb.mmio_write(d.base + d.l.notify, 2, 0);
    assert!(tb.irq().wait_for(true, WAIT), "no interrupt");
    let t0 = std::time::Instant::now();
    while u64::from(used_idx(&tb)) != N && t0.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(u64::from(used_idx(&tb)), N);
    let img = std::fs::read(image()).unwrap();
    for k in 0..N {
        let e = tb.ram().read_vec(USED + 4 + 8 * k, 8);
        assert_eq!(
            u32::from_le_bytes(e[0..4].try_into().unwrap()),
            (3 * k) as u32,
            "used entry {k}: the order requests were made available"
        );
        assert_eq!(tb.ram().read_vec(STATUS + k, 1)[0], 0, "request {k} OK");
        let at = (8 * k * 512) as usize;
        assert_eq!(
            &img[at..at + 4096],
            &pattern(4096, k as u8)[..],
            "request {k} on the image"
        );
    }
    let stats = tb
        .control("stats", &plugin_api::serde_json::Value::Null)
        .unwrap();
    assert_eq!(stats["requests"], 5, "{stats}");
    assert_eq!(stats["batches"], 1, "one notification, one batch: {stats}");
    assert_eq!(
        stats["on-helpers"], 3,
        "runs of two and one on helpers: {stats}"
    );
}
