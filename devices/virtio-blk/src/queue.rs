//! A split virtqueue (§2.7) read and written through the host's DMA
//! calls: the descriptor table, the driver's available ring and the
//! device's used ring all live in guest RAM.
//!
//! Why not rust-vmm's `virtio-queue`: it walks rings through a
//! `vm-memory` `GuestMemory`, and a plugin sees guest RAM only through
//! [`Host::dma_read`]/[`Host::dma_write`] (checked copies across the
//! plugin ABI, the same in a remote and in the VMM), so its queue would
//! need an adapter of `GuestMemory` over copies; the split ring is small
//! and every value the guest controls is checked here.

use std::sync::atomic::{fence, Ordering};

use plugin_api::Host;
use virtio_bindings::virtio_ring as vr;

use crate::transport::QueueConfig;

/// Descriptor flags.
pub const DESC_F_NEXT: u16 = vr::VRING_DESC_F_NEXT as u16;
pub const DESC_F_WRITE: u16 = vr::VRING_DESC_F_WRITE as u16;
pub const DESC_F_INDIRECT: u16 = vr::VRING_DESC_F_INDIRECT as u16;

/// A guest mistake in a ring; the device then needs a reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueueError {
    /// A ring or descriptor outside guest RAM.
    Dma(String),
    /// A chain longer than the queue (a loop).
    ChainTooLong,
    /// A descriptor index past the table.
    BadIndex(u16),
    /// An indirect descriptor (the feature is not offered).
    Indirect,
    /// The driver made more buffers available than the queue holds.
    TooManyAvailable(u16),
}

impl std::fmt::Display for QueueError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QueueError::Dma(e) => write!(f, "ring access outside guest RAM: {e}"),
            QueueError::ChainTooLong => f.write_str("a descriptor chain longer than its queue"),
            QueueError::BadIndex(i) => write!(f, "descriptor index {i} past the table"),
            QueueError::Indirect => f.write_str("an indirect descriptor (not offered)"),
            QueueError::TooManyAvailable(n) => {
                write!(f, "{n} buffers made available in a smaller queue")
            }
        }
    }
}

/// One descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

impl Desc {
    pub fn device_writable(&self) -> bool {
        self.flags & DESC_F_WRITE != 0
    }
}

/// A chain the driver made available: its head index and descriptors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub head: u16,
    pub descs: Vec<Desc>,
}

/// The device's side of one queue: where it is in each ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SplitQueue {
    pub cfg: QueueConfig,
    /// The next available-ring entry to take.
    pub next_avail: u16,
    /// The next used-ring entry to fill.
    pub next_used: u16,
    /// The driver accepted `VIRTIO_RING_F_EVENT_IDX` (§2.7.10): it says
    /// in `used_event` when it wants an interrupt, and the device says in
    /// `avail_event` when it wants a notification.
    pub event_idx: bool,
    /// The used index at the last interrupt decision; `None` after the
    /// queue was set up or restored (the next completion interrupts).
    signalled: Option<u16>,
}

fn dma(e: plugin_api::DmaError) -> QueueError {
    QueueError::Dma(e.0)
}

impl SplitQueue {
    pub fn new(cfg: QueueConfig) -> Self {
        SplitQueue {
            cfg,
            next_avail: 0,
            next_used: 0,
            event_idx: false,
            signalled: None,
        }
    }

    /// `used_event`: the entry after the available ring.
    fn used_event_gpa(&self) -> u64 {
        self.cfg.avail + 4 + 2 * u64::from(self.cfg.size)
    }

    /// `avail_event`: the entry after the used ring.
    fn avail_event_gpa(&self) -> u64 {
        self.cfg.used + 4 + 8 * u64::from(self.cfg.size)
    }

    /// With `EVENT_IDX`, called when the device found the queue empty:
    /// asks the driver for a notification at its next buffer (`avail_event`
    /// = the next entry to take), then looks once more, since a buffer
    /// published before the driver saw that request brings none. Returns
    /// whether buffers are waiting (serve on). While the device serves,
    /// `avail_event` stays behind, so the driver does not notify for the
    /// buffers the device will find by itself.
    ///
    /// Without `EVENT_IDX` the driver notifies for every buffer (the device
    /// never sets `VRING_USED_F_NO_NOTIFY`), and this returns false.
    pub fn arm_notification(&mut self, host: &Host) -> Result<bool, QueueError> {
        if !self.event_idx || self.cfg.size == 0 {
            return Ok(false);
        }
        host.dma_write(self.avail_event_gpa(), &self.next_avail.to_le_bytes())
            .map_err(dma)?;
        // The driver writes its index, then reads `avail_event`; the
        // device writes `avail_event`, then reads the index: one of the
        // two sees the other's write.
        fence(Ordering::SeqCst);
        let avail_idx = Self::u16_at(host, self.cfg.avail + 2)?;
        Ok(avail_idx != self.next_avail)
    }

    /// Whether the driver wants an interrupt for the buffers used since
    /// the last call: always without `EVENT_IDX`; with it, when the used
    /// index passed `used_event` since then (`vring_need_event`, §2.7.10).
    pub fn needs_interrupt(&mut self, host: &Host) -> Result<bool, QueueError> {
        if !self.event_idx {
            return Ok(true);
        }
        // The used index is published before `used_event` is read (the
        // driver writes `used_event`, then reads the used index).
        fence(Ordering::SeqCst);
        let new = self.next_used;
        let Some(old) = self.signalled.replace(new) else {
            return Ok(true);
        };
        let event = Self::u16_at(host, self.used_event_gpa())?;
        Ok(new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old))
    }

    fn u16_at(host: &Host, gpa: u64) -> Result<u16, QueueError> {
        let mut b = [0u8; 2];
        host.dma_read(gpa, &mut b).map_err(dma)?;
        Ok(u16::from_le_bytes(b))
    }

    /// The next chain the driver made available, if any.
    pub fn pop(&mut self, host: &Host) -> Result<Option<Chain>, QueueError> {
        let size = self.cfg.size;
        if size == 0 {
            return Ok(None);
        }
        let avail_idx = Self::u16_at(host, self.cfg.avail + 2)?;
        let pending = avail_idx.wrapping_sub(self.next_avail);
        if pending == 0 {
            return Ok(None);
        }
        if pending > size {
            return Err(QueueError::TooManyAvailable(pending));
        }
        // The ring entry and the descriptors are read after the index
        // that published them.
        fence(Ordering::Acquire);
        let slot = u64::from(self.next_avail % size);
        let head = Self::u16_at(host, self.cfg.avail + 4 + 2 * slot)?;
        let mut descs = Vec::new();
        let mut index = head;
        loop {
            if index >= size {
                return Err(QueueError::BadIndex(index));
            }
            if descs.len() >= usize::from(size) {
                return Err(QueueError::ChainTooLong);
            }
            let mut raw = [0u8; 16];
            host.dma_read(self.cfg.desc + 16 * u64::from(index), &mut raw)
                .map_err(dma)?;
            let addr = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
            let len = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([raw[12], raw[13]]);
            let next = u16::from_le_bytes([raw[14], raw[15]]);
            if flags & DESC_F_INDIRECT != 0 {
                return Err(QueueError::Indirect);
            }
            descs.push(Desc { addr, len, flags });
            if flags & DESC_F_NEXT == 0 {
                break;
            }
            index = next;
        }
        self.next_avail = self.next_avail.wrapping_add(1);
        Ok(Some(Chain { head, descs }))
    }

    /// Takes the indexes from guest RAM: the used ring's index is where
    /// the device stood when it last published a completion, and (the
    /// device serving requests one at a time, in order) the next request
    /// to take is the one after the last completed. A used index the
    /// guest moved past its available index is refused.
    pub fn resync(&mut self, host: &Host) -> Result<(), QueueError> {
        if self.cfg.size == 0 {
            return Ok(());
        }
        let used = Self::u16_at(host, self.cfg.used + 2)?;
        let avail = Self::u16_at(host, self.cfg.avail + 2)?;
        let pending = avail.wrapping_sub(used);
        if pending > self.cfg.size {
            return Err(QueueError::TooManyAvailable(pending));
        }
        self.next_used = used;
        self.next_avail = used;
        self.signalled = None;
        Ok(())
    }

    /// Returns chain `head` to the driver with `len` bytes written into
    /// its device-writable buffers.
    pub fn push_used(&mut self, host: &Host, head: u16, len: u32) -> Result<(), QueueError> {
        let size = self.cfg.size;
        if size == 0 {
            return Ok(());
        }
        let slot = u64::from(self.next_used % size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        host.dma_write(self.cfg.used + 4 + 8 * slot, &elem)
            .map_err(dma)?;
        self.next_used = self.next_used.wrapping_add(1);
        // The element is visible before the index that publishes it.
        fence(Ordering::Release);
        host.dma_write(self.cfg.used + 2, &self.next_used.to_le_bytes())
            .map_err(dma)
    }
}
