//! The virtio-over-PCI transport, modern (virtio 1.x) only: where BAR 0
//! holds each structure, the vendor-specific capabilities that tell the
//! driver so (§4.1.4), and the common configuration structure (§4.1.4.3)
//! as a plain register file.
//!
//! BAR 0 (32-bit memory, 16 KiB), one structure per 4 KiB page:
//!
//! | offset | structure |
//! |--------|-----------|
//! | 0x0000 | common configuration (0x38 bytes) |
//! | 0x1000 | ISR status (1 byte, read clears) |
//! | 0x2000 | device configuration (`virtio_blk_config`) |
//! | 0x3000 | notifications: queue N at 0x3000 + 4 × N |

use plugin_api::CapabilityDesc;

/// The BAR holding every structure.
pub const BAR: u8 = 0;
pub const BAR_SIZE: u64 = 0x4000;
pub const COMMON_OFF: u64 = 0x0000;
pub const COMMON_LEN: u64 = 0x38;
pub const ISR_OFF: u64 = 0x1000;
pub const DEVICE_OFF: u64 = 0x2000;
pub const DEVICE_LEN: u64 = 0x40;
pub const NOTIFY_OFF: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_MULTIPLIER: u32 = 4;
/// The most queues a device offers (the notify area's size).
pub const MAX_QUEUES: u16 = 16;

/// Device status bits (§2.1).
pub mod status {
    use virtio_bindings::virtio_config as vc;
    pub const ACKNOWLEDGE: u8 = vc::VIRTIO_CONFIG_S_ACKNOWLEDGE as u8;
    pub const DRIVER: u8 = vc::VIRTIO_CONFIG_S_DRIVER as u8;
    pub const DRIVER_OK: u8 = vc::VIRTIO_CONFIG_S_DRIVER_OK as u8;
    pub const FEATURES_OK: u8 = vc::VIRTIO_CONFIG_S_FEATURES_OK as u8;
    pub const NEEDS_RESET: u8 = vc::VIRTIO_CONFIG_S_NEEDS_RESET as u8;
    pub const FAILED: u8 = vc::VIRTIO_CONFIG_S_FAILED as u8;
}

/// ISR status bits (§4.1.4.5).
pub const ISR_QUEUE: u8 = 1;
pub const ISR_CONFIG: u8 = 2;

/// "No MSI-X vector": the driver uses INTx and the ISR for this source.
pub const NO_VECTOR: u16 = 0xffff;

/// Feature bit 32: the device is a virtio 1.x device (required of modern
/// drivers and devices).
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// The four capabilities (common, notify, ISR, device), in the order the
/// host places them in configuration space.
pub fn capabilities() -> Vec<CapabilityDesc> {
    // virtio_pci_cap after the ID and next pointer: cap_len, cfg_type,
    // bar, id, two bytes of padding, offset, length; the notify
    // capability adds notify_off_multiplier.
    let cap = |cfg_type: u8, offset: u64, length: u64, extra: &[u8]| {
        let mut body = vec![16 + extra.len() as u8, cfg_type, BAR, 0, 0, 0];
        body.extend_from_slice(&(offset as u32).to_le_bytes());
        body.extend_from_slice(&(length as u32).to_le_bytes());
        body.extend_from_slice(extra);
        CapabilityDesc::new(0x09, body)
    };
    vec![
        cap(1, COMMON_OFF, COMMON_LEN, &[]),
        cap(
            2,
            NOTIFY_OFF,
            u64::from(NOTIFY_MULTIPLIER) * u64::from(MAX_QUEUES),
            &NOTIFY_MULTIPLIER.to_le_bytes(),
        ),
        cap(3, ISR_OFF, 1, &[]),
        cap(4, DEVICE_OFF, DEVICE_LEN, &[]),
    ]
}

/// One queue's configuration as the driver wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueConfig {
    /// Entries (a power of two, at most the device's maximum).
    pub size: u16,
    pub ready: bool,
    /// Guest-physical addresses of the descriptor table, the driver
    /// (available) ring and the device (used) ring.
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub msix_vector: u16,
}

/// The common configuration structure and the ISR.
#[derive(Debug, Clone)]
pub struct Transport {
    /// Features the device offers.
    pub device_features: u64,
    /// Features the driver accepted.
    pub driver_features: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    pub msix_config: u16,
    pub status: u8,
    /// Bumped when the device configuration changes.
    pub config_generation: u8,
    queue_select: u16,
    pub queues: Vec<QueueConfig>,
    /// The largest queue the device takes.
    pub max_queue_size: u16,
    pub isr: u8,
    /// MSI-X vectors the function has (0: INTx only).
    pub msix_vectors: u16,
}

/// What a write to the common configuration asks of the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    None,
    /// The driver wrote 0 to the status: reset the device.
    Reset,
    /// The driver set DRIVER_OK: queues may be served.
    DriverOk,
}

impl Transport {
    pub fn new(device_features: u64, queues: u16, max_queue_size: u16, msix_vectors: u16) -> Self {
        let q = QueueConfig {
            size: max_queue_size,
            ready: false,
            desc: 0,
            avail: 0,
            used: 0,
            msix_vector: NO_VECTOR,
        };
        Transport {
            device_features: device_features | F_VERSION_1,
            driver_features: 0,
            device_feature_select: 0,
            driver_feature_select: 0,
            msix_config: NO_VECTOR,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            queues: vec![q; usize::from(queues.clamp(1, MAX_QUEUES))],
            max_queue_size,
            isr: 0,
            msix_vectors,
        }
    }

    /// A vector the driver asked for: kept if the function has it, else
    /// "no vector" (the driver reads that back and falls back).
    fn vector(&self, v: u16) -> u16 {
        if v < self.msix_vectors {
            v
        } else {
            NO_VECTOR
        }
    }

    /// Back to the state after power-on (the device's features and queue
    /// count stay).
    pub fn reset(&mut self) {
        let fresh = Transport::new(
            self.device_features,
            self.queues.len() as u16,
            self.max_queue_size,
            self.msix_vectors,
        );
        let generation = self.config_generation;
        *self = fresh;
        self.config_generation = generation;
    }

    pub fn driver_ok(&self) -> bool {
        self.status & status::DRIVER_OK != 0 && self.status & status::NEEDS_RESET == 0
    }

    /// Whether the driver accepted `feature` (a mask).
    pub fn negotiated(&self, feature: u64) -> bool {
        self.driver_features & feature != 0
    }

    fn selected(&self) -> Option<&QueueConfig> {
        self.queues.get(usize::from(self.queue_select))
    }

    /// The structure as bytes (what a read of any width returns from).
    fn image(&self) -> [u8; COMMON_LEN as usize] {
        let mut b = [0u8; COMMON_LEN as usize];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0x00, &self.device_feature_select.to_le_bytes());
        let feat = match self.device_feature_select {
            0 => self.device_features as u32,
            1 => (self.device_features >> 32) as u32,
            _ => 0,
        };
        put(0x04, &feat.to_le_bytes());
        put(0x08, &self.driver_feature_select.to_le_bytes());
        let drv = match self.driver_feature_select {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        };
        put(0x0c, &drv.to_le_bytes());
        put(0x10, &self.msix_config.to_le_bytes());
        put(0x12, &(self.queues.len() as u16).to_le_bytes());
        put(0x14, &[self.status, self.config_generation]);
        put(0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected() {
            put(0x18, &q.size.to_le_bytes());
            put(0x1a, &q.msix_vector.to_le_bytes());
            put(0x1c, &u16::from(q.ready).to_le_bytes());
            // queue_notify_off: queue N notifies at N × multiplier.
            put(0x1e, &self.queue_select.to_le_bytes());
            put(0x20, &q.desc.to_le_bytes());
            put(0x28, &q.avail.to_le_bytes());
            put(0x30, &q.used.to_le_bytes());
        }
        b
    }

    /// A read of `data.len()` bytes at `offset` in the structure.
    pub fn read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let img = self.image();
        for (i, d) in data.iter_mut().enumerate() {
            if let Some(b) = img.get(offset as usize + i) {
                *d = *b;
            }
        }
    }

    /// A write at `offset`: each field the bytes touch takes their value
    /// (merged into its other bytes), read-only fields ignore it.
    pub fn write(&mut self, offset: u64, data: &[u8]) -> Effect {
        let mut img = self.image();
        let end = (offset as usize + data.len()).min(img.len());
        let start = (offset as usize).min(end);
        img[start..end].copy_from_slice(&data[..end - start]);
        let touched = |off: usize, len: usize| start < off + len && off < end;
        let u16_at = |off: usize| u16::from_le_bytes([img[off], img[off + 1]]);
        let u32_at =
            |off: usize| u32::from_le_bytes([img[off], img[off + 1], img[off + 2], img[off + 3]]);
        let u64_at = |off: usize| u64::from(u32_at(off)) | u64::from(u32_at(off + 4)) << 32;
        let mut effect = Effect::None;
        if touched(0x00, 4) {
            self.device_feature_select = u32_at(0x00);
        }
        if touched(0x08, 4) {
            self.driver_feature_select = u32_at(0x08);
        }
        if touched(0x0c, 4) && self.status & status::FEATURES_OK == 0 {
            let v = u64::from(u32_at(0x0c));
            match self.driver_feature_select {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                1 => self.driver_features = (self.driver_features & 0xffff_ffff) | v << 32,
                _ => {}
            }
        }
        if touched(0x10, 2) {
            self.msix_config = self.vector(u16_at(0x10));
        }
        if touched(0x14, 1) {
            effect = self.write_status(img[0x14]);
        }
        if touched(0x16, 2) {
            self.queue_select = u16_at(0x16);
        }
        let max = self.max_queue_size;
        let sel = usize::from(self.queue_select);
        let vector = self.vector(u16_at(0x1a));
        if let Some(q) = self.queues.get_mut(sel) {
            // A queue's configuration is fixed once it is enabled.
            if !q.ready {
                // A split queue's size is a power of two (§2.7); another
                // value leaves the size as it was.
                let size = u16_at(0x18);
                if touched(0x18, 2) && size.is_power_of_two() && size <= max {
                    q.size = size;
                }
                if touched(0x20, 8) {
                    q.desc = u64_at(0x20);
                }
                if touched(0x28, 8) {
                    q.avail = u64_at(0x28);
                }
                if touched(0x30, 8) {
                    q.used = u64_at(0x30);
                }
                if touched(0x1c, 2) && u16_at(0x1c) == 1 {
                    q.ready = true;
                }
            }
            if touched(0x1a, 2) {
                q.msix_vector = vector;
            }
        }
        effect
    }

    fn write_status(&mut self, v: u8) -> Effect {
        if v == 0 {
            return Effect::Reset;
        }
        let was = self.status;
        let mut v = v;
        // FEATURES_OK only if what the driver accepted is offered and it
        // speaks virtio 1.x; the driver reads the status back to learn.
        if v & status::FEATURES_OK != 0 && was & status::FEATURES_OK == 0 {
            let ok = self.driver_features & !self.device_features == 0
                && self.driver_features & F_VERSION_1 != 0;
            if !ok {
                v &= !status::FEATURES_OK;
            }
        }
        // The device's NEEDS_RESET is its own: the driver cannot clear it.
        self.status = v | (was & status::NEEDS_RESET);
        if v & status::DRIVER_OK != 0 && was & status::DRIVER_OK == 0 {
            Effect::DriverOk
        } else {
            Effect::None
        }
    }

    /// Reads the ISR: returns it and clears it (§4.1.4.5).
    pub fn take_isr(&mut self) -> u8 {
        std::mem::take(&mut self.isr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write32(t: &mut Transport, off: u64, v: u32) -> Effect {
        t.write(off, &v.to_le_bytes())
    }

    fn read32(t: &Transport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn features_are_negotiated_per_select_and_checked() {
        let mut t = Transport::new(1 << 9, 1, 256, 0);
        assert_eq!(read32(&t, 0x04), 1 << 9);
        write32(&mut t, 0x00, 1);
        assert_eq!(read32(&t, 0x04), 1, "VERSION_1 is bit 32");
        // The driver accepts a feature the device does not offer.
        write32(&mut t, 0x08, 0);
        write32(&mut t, 0x0c, (1 << 9) | (1 << 3));
        write32(&mut t, 0x08, 1);
        write32(&mut t, 0x0c, 1);
        t.write(
            0x14,
            &[status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK],
        );
        assert_eq!(t.status & status::FEATURES_OK, 0, "refused");
        write32(&mut t, 0x08, 0);
        write32(&mut t, 0x0c, 1 << 9);
        t.write(
            0x14,
            &[status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK],
        );
        assert_ne!(t.status & status::FEATURES_OK, 0);
        assert!(t.negotiated(1 << 9) && t.negotiated(F_VERSION_1));
        // Fixed once FEATURES_OK is set.
        write32(&mut t, 0x0c, 0);
        assert!(t.negotiated(1 << 9));
    }

    #[test]
    fn queue_addresses_in_halves_and_fixed_once_enabled() {
        let mut t = Transport::new(0, 2, 256, 0);
        t.write(0x16, &1u16.to_le_bytes());
        t.write(0x18, &128u16.to_le_bytes());
        write32(&mut t, 0x20, 0x1000);
        write32(&mut t, 0x24, 0x1);
        write32(&mut t, 0x28, 0x2000);
        write32(&mut t, 0x30, 0x3000);
        t.write(0x1c, &1u16.to_le_bytes());
        let q = t.queues[1];
        assert_eq!(
            (q.size, q.desc, q.avail, q.used),
            (128, 0x1_0000_1000, 0x2000, 0x3000)
        );
        assert!(q.ready && !t.queues[0].ready);
        write32(&mut t, 0x20, 0x9000);
        assert_eq!(t.queues[1].desc, 0x1_0000_1000);
        assert_eq!(read32(&t, 0x1e) & 0xffff, 1, "notify offset = queue index");
        // A queue index past the last reads as size 0.
        t.write(0x16, &7u16.to_le_bytes());
        assert_eq!(read32(&t, 0x18) & 0xffff, 0);
    }

    #[test]
    fn status_zero_resets_and_msix_requests_answer_no_vector() {
        let mut t = Transport::new(0, 1, 256, 0);
        assert_eq!(t.write(0x14, &[status::DRIVER_OK]), Effect::DriverOk);
        assert_eq!(t.write(0x14, &[0]), Effect::Reset);
        t.write(0x1a, &0u16.to_le_bytes());
        assert_eq!(read32(&t, 0x18) >> 16, u32::from(NO_VECTOR));
        t.isr = ISR_QUEUE;
        assert_eq!(t.take_isr(), ISR_QUEUE);
        assert_eq!(t.take_isr(), 0);
    }

    #[test]
    fn vectors_the_function_has_are_kept() {
        let mut t = Transport::new(0, 1, 256, 2);
        t.write(0x10, &1u16.to_le_bytes());
        t.write(0x1a, &0u16.to_le_bytes());
        assert_eq!((t.msix_config, t.queues[0].msix_vector), (1, 0));
        t.write(0x1a, &2u16.to_le_bytes());
        assert_eq!(t.queues[0].msix_vector, NO_VECTOR, "past the last vector");
        t.reset();
        assert_eq!(
            (t.msix_config, t.queues[0].msix_vector),
            (NO_VECTOR, NO_VECTOR)
        );
    }
}
