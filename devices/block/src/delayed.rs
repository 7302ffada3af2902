//! A backend that answers slowly: every read, write and flush of the inner
//! backend waits a fixed time first. For testing what a slow disk does to
//! a guest (the drive option `delay-us`, like QEMU's blkdebug delays): a
//! slow device may make the guest slow, it must never make it crash.

use std::io;
use std::time::Duration;

use crate::backend::Backend;

/// Longest delay a drive may ask for (a typo must not stall a guest for
/// minutes per request).
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// `inner`, with `delay` before each data operation.
pub struct Delayed {
    inner: Box<dyn Backend>,
    delay: Duration,
}

impl Delayed {
    pub fn new(inner: Box<dyn Backend>, delay: Duration) -> Self {
        Delayed {
            inner,
            delay: delay.min(MAX_DELAY),
        }
    }
}

impl Backend for Delayed {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        std::thread::sleep(self.delay);
        self.inner.flush()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    fn resize(&self, new_size: u64) -> io::Result<()> {
        self.inner.resize(new_size)
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.inner.discard(offset, len)
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }

    fn supports_discard(&self) -> bool {
        self.inner.supports_discard()
    }
}
